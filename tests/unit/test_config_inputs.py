"""Issue 17 part C, config inputs: YAML errors, numbers as people write them, the device, attrs validators.

Each case pins the exact one-line message a user sees (exit status 2 on the CLI, nothing written).
"""
from __future__ import annotations

import re
from typing import Any

import attrs
import pytest
import torch

from hybridize import hookimpl
from hybridize.cli import main
from hybridize.errors import ConfigError
from hybridize.recipes.runconfig import load_run_config, run_config_from_dict

BASE = "teacher: t\ndata:\n  train: d.txt\n  seq_len: 16\n"


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit status 2 and one error line; return that line's message."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hybridize: error: ") and err.count("\n") == 1, err
    return err[len("hybridize: error: "):-1]


def run_error(tmp_path, capsys, text: str, *extra: str) -> str:
    (tmp_path / "run.yaml").write_text(text)
    msg = cli_error(capsys, "run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet", *extra)
    assert not (tmp_path / "out").exists()
    return msg


# -- 1. YAML ------------------------------------------------------------------------------------------------
def test_malformed_yaml_in_config_file_names_file_line_column(tmp_path, capsys):
    msg = run_error(tmp_path, capsys, "teacher: t\ndata: {train: d.txt\n")
    path = str(tmp_path / "run.yaml")
    assert msg == (f"config file {path!r} is not valid YAML at line 3, column 1: expected ',' or '}}', but got "
                   "'<stream end>' (while parsing a flow mapping started at line 2, column 7)")


def test_tab_indentation_in_config_file(tmp_path, capsys):
    msg = run_error(tmp_path, capsys, BASE + "distill:\n\tstage1_tokens: 10\n")
    assert msg == (f"config file {str(tmp_path / 'run.yaml')!r} is not valid YAML at line 6, column 1: a tab character; "
                   "YAML indents with spaces, so replace the tab with spaces")


def test_duplicate_key_in_config_file_names_key_and_both_lines(tmp_path, capsys):
    msg = run_error(tmp_path, capsys, BASE + "  seq_len: 32\n")
    assert msg == (f"config file {str(tmp_path / 'run.yaml')!r}: key 'seq_len' is given twice in one mapping, at line 4, "
                   "column 3 and line 5, column 3; keep one (YAML would silently use the last)")


def test_yaml_merge_keys_still_override(tmp_path):
    (tmp_path / "run.yaml").write_text(BASE + "distill:\n  <<: {stage1_tokens: 10, stage2_tokens: 20}\n  stage2_tokens: 30\n")
    cfg = load_run_config(tmp_path / "run.yaml")
    assert (cfg.distill.stage1_tokens, cfg.distill.stage2_tokens) == (10, 30)


def test_malformed_yaml_in_set_value(tmp_path, capsys):
    msg = run_error(tmp_path, capsys, BASE, "--set", "distill.stage2_tokens=[1,")
    assert msg == ("--set 'distill.stage2_tokens=[1,': the value is not valid YAML at line 1, column 4: expected the node "
                   "content, but found '<stream end>' (while parsing a flow node)")


def test_tab_in_set_value(tmp_path, capsys):
    msg = run_error(tmp_path, capsys, BASE, "--set", "data=\tseq_len: 8")
    assert msg == ("--set 'data=\\tseq_len: 8': the value is not valid YAML at line 1, column 1: a tab character; YAML "
                   "indents with spaces, so replace the tab with spaces")


def test_duplicate_key_in_set_value(tmp_path, capsys):
    msg = run_error(tmp_path, capsys, BASE, "--set", "linear_attention={name: gdn, name: gla}")
    assert msg == ("--set 'linear_attention={name: gdn, name: gla}': the value: key 'name' is given twice in one mapping, "
                   "at line 1, column 2 and line 1, column 13; keep one (YAML would silently use the last)")


def test_malformed_yaml_in_evaluator(tmp_path, capsys):
    msg = cli_error(capsys, "eval", str(tmp_path), "--evaluator", "{name: perplexity, data: x")
    assert msg == ("--evaluator '{name: perplexity, data: x' is not valid YAML at line 1, column 27: expected ',' or '}', "
                   "but got '<stream end>' (while parsing a flow mapping started at line 1, column 1)")


def test_tab_and_duplicate_key_in_evaluator(tmp_path, capsys):
    msg = cli_error(capsys, "eval", str(tmp_path), "--evaluator", "name: perplexity\n\tdata: x")
    assert msg == ("--evaluator 'name: perplexity\\n\\tdata: x' is not valid YAML at line 2, column 1: a tab character; "
                   "YAML indents with spaces, so replace the tab with spaces")
    msg = cli_error(capsys, "eval", str(tmp_path), "--evaluator", "{name: perplexity, name: heldout-kl}")
    assert msg == ("--evaluator '{name: perplexity, name: heldout-kl}': key 'name' is given twice in one mapping, at line 1, "
                   "column 2 and line 1, column 20; keep one (YAML would silently use the last)")


# -- 2. numbers -----------------------------------------------------------------------------------------------
def test_readme_set_stage2_tokens_4e6_works(tmp_path):
    (tmp_path / "run.yaml").write_text(BASE + "distill: {stage1_lr: 1e-3, stage1_tokens: 1_000_000}\n")
    cfg = load_run_config(tmp_path / "run.yaml", ["distill.stage2_tokens=4e6", "distill.stage3_tokens=4e+6", "seed=1e1"])
    d = cfg.distill
    assert (d.stage2_tokens, d.stage3_tokens, d.stage1_tokens, cfg.seed) == (4_000_000, 4_000_000, 1_000_000, 10)
    assert type(d.stage2_tokens) is int and type(cfg.seed) is int
    assert d.stage1_lr == 1e-3 and type(d.stage1_lr) is float


@pytest.mark.parametrize(("value", "got"), [("2.5", "2.5"), ("2.5e0", "'2.5e0'"), ("1e-3", "'1e-3'")])
def test_non_whole_number_for_an_int_field_is_refused(tmp_path, capsys, value, got):
    msg = run_error(tmp_path, capsys, BASE, "--set", f"distill.stage2_tokens={value}")
    assert msg == f"distill field 'stage2_tokens' must be int; got {got}"  # YAML 1.1 reads 2.5 as a float, 2.5e0 as a str


def test_float_forms_in_a_variant_and_evaluator_param(tmp_path, pm):
    @attrs.frozen(kw_only=True)
    class Cfg:
        lr: float = 0.1
        steps: int = 1
        label: str = "x"
        flag: bool = False

    class Plugin:
        @hookimpl
        def hybridize_register_evaluators(self, register):
            register("numbers", lambda cfg: None, Cfg)

    pm.register(Plugin(), name="numbers-plugin")
    cfg = run_config_from_dict({"teacher": "t", "data": {"train": "d.txt"},
                                "evaluators": [{"name": "numbers", "lr": "1e-3", "steps": "4e6", "label": "1e3", "flag": True}]}, pm=pm)
    built = pm.registry("evaluator")["numbers"].build_config(cfg.evaluators[0].params)
    assert (built.lr, built.steps, built.label, built.flag) == (1e-3, 4_000_000, "1e3", True)  # a str field keeps "1e3"
    with pytest.raises(ConfigError, match=re.escape("evaluator 'numbers' field 'flag' must be bool; got 1")):
        pm.registry("evaluator")["numbers"].build_config({"flag": 1})


# -- 3. device ------------------------------------------------------------------------------------------------
def test_device_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    msg = run_error(tmp_path, capsys, BASE + "device: cuda\n")
    assert msg == ("run field 'device' must be a device this machine has; got 'cuda' (this machine has cpu only: torch sees "
                   "no CUDA GPU); set device to one of those or auto (e.g. --set device=cpu)")


def test_unknown_device_string(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    msg = run_error(tmp_path, capsys, BASE + "device: gpu0\n")
    assert msg == ("run field 'device' must be auto, cpu, cuda or cuda:N; got 'gpu0' (this machine has cpu only: torch sees "
                   "no CUDA GPU); set device to one of those or auto (e.g. --set device=cpu)")


def test_cuda_index_beyond_the_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    msg = run_error(tmp_path, capsys, BASE + "device: cuda:3\n")
    assert msg == ("run field 'device' must be a device this machine has; got 'cuda:3' (this machine has cpu, cuda, cuda:0, "
                   "cuda:1, CUDA_VISIBLE_DEVICES='0,1'); set device to one of those or auto (e.g. --set device=cuda:0)")
    assert run_config_from_dict({"teacher": "t", "data": {"train": "d.txt"}, "device": "cuda:1"}).device == "cuda:1"


def test_eval_device_checked_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    msg = cli_error(capsys, "eval", str(tmp_path / "nothing-here"), "--tasks", "niah_single_1", "--device", "cuda")
    assert msg == ("--device must be a device this machine has; got 'cuda' (this machine has cpu only: torch sees no CUDA "
                   "GPU); pass --device cpu or auto")


# -- 5. attrs validators (issue 16, item 4b) ------------------------------------------------------------------
v = attrs.validators


@attrs.frozen(kw_only=True)
class ValidatedConfig:
    """A plugin config using every attrs validator a plugin may reach for."""

    q_activation: str = attrs.field(default="swish", validator=v.in_(("swish", "identity")))
    anything: Any = attrs.field(default=1, validator=v.instance_of(int))
    number: Any = attrs.field(default=1, validator=v.instance_of((int, float)))
    heads: int = attrs.field(default=2, validator=v.ge(1))
    rate: float = attrs.field(default=0.5, validator=[v.gt(0), v.le(1)])
    small: int = attrs.field(default=1, validator=v.lt(8))
    tag: str = attrs.field(default="ab", validator=v.matches_re(r"[a-z]+"))
    both: Any = attrs.field(default=2, validator=v.and_(v.instance_of(int), v.lt(5)))
    maybe: Any = attrs.field(default=None, validator=v.optional(v.in_((1, 2))))
    sizes: Any = attrs.field(default=(1,), validator=v.deep_iterable(v.ge(1), v.instance_of(tuple)))
    short: Any = attrs.field(default=(), validator=v.max_len(2))


VALIDATOR_CASES = {
    "in_": ({"q_activation": "relu"}, "field 'q_activation' must be one of 'swish', 'identity'; got 'relu'"),
    "instance_of": ({"anything": "x"}, "field 'anything' must be int; got 'x'"),
    "instance_of_tuple": ({"number": "x"}, "field 'number' must be int or float; got 'x'"),
    "ge": ({"heads": 0}, "field 'heads' must be >= 1; got 0"),
    "gt": ({"rate": 0}, "field 'rate' must be > 0; got 0.0"),
    "le": ({"rate": 2}, "field 'rate' must be <= 1; got 2.0"),
    "lt": ({"small": 8}, "field 'small' must be < 8; got 8"),
    "matches_re": ({"tag": "AB"}, "field 'tag' must match the regular expression '[a-z]+'; got 'AB'"),
    "and_": ({"both": 7}, "field 'both' must be < 5; got 7"),
    "optional": ({"maybe": 3}, "field 'maybe' must be one of 1, 2 or None; got 3"),
    "deep_iterable_member": ({"sizes": (1, 0)}, "field 'sizes' must hold only items that are >= 1; got (1, 0)"),
    "deep_iterable_iterable": ({"sizes": [1]}, "field 'sizes' must be tuple; got [1]"),
    "max_len": ({"short": (1, 2, 3)}, "field 'short' must have a length <= 2; got (1, 2, 3)"),
}


@pytest.fixture
def validated_pm(pm):
    class Plugin:
        @hookimpl
        def hybridize_register_linear_attention(self, register):
            register("hgrn2", lambda spec, cfg: None, ValidatedConfig)

    pm.register(Plugin(), name="validated")
    return pm


@pytest.mark.parametrize("case", VALIDATOR_CASES, ids=VALIDATOR_CASES)
def test_attrs_validator_message_is_one_standard_line(validated_pm, case):
    params, expected = VALIDATOR_CASES[case]
    with pytest.raises(ConfigError) as exc:
        validated_pm.registry("linear_attention")["hgrn2"].build_config(params)
    assert str(exc.value) == f"linear_attention 'hgrn2' {expected}"


def test_every_field_an_attrs_validator_refuses_is_reported(validated_pm):
    with pytest.raises(ConfigError) as exc:
        run_config_from_dict({"teacher": "t", "data": {"train": "d.txt"},
                              "linear_attention": {"name": "hgrn2", "q_activation": "relu", "heads": 0}}, pm=validated_pm)
    assert exc.value.problems == ["linear_attention 'hgrn2' field 'q_activation' must be one of 'swish', 'identity'; got 'relu'",
                                  "linear_attention 'hgrn2' field 'heads' must be >= 1; got 0"]
