"""Bad input to `hybridize run`: one exact error message per case, exit status 2, nothing trained.

Unit tests of the same checks live beside their modules (test_plugins, test_data, test_teacher,
test_surgery, test_distill); these pin what a user sees on the command line.
"""
from __future__ import annotations

import copy

import attrs
import pytest
import torch
import yaml
from transformers import AutoConfig

from hybridize.cli import main
from hybridize.distill.stages import DistillConfig
from hybridize.registry.manager import get_plugin_manager
from hybridize.testing.models import save_tiny_teacher, tiny_tokenizer

from conftest import base  # tests/conftest.py: the tiny config on its fixture `files`
from test_plugins import fake_distribution  # tests/unit is on sys.path (pytest's rootdir-relative imports)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: fastest on one thread, also on a busy machine
    yield
    torch.set_num_threads(old)


def site(tmp_path):
    (tmp_path / "site").mkdir()
    return tmp_path / "site"


def run_cli(tmp_path, cfg, capsys, *extra):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet", *extra])
    return code, capsys.readouterr().err


def available(kind):
    return ", ".join(sorted(get_plugin_manager().registry(kind)))


# -- config: unknown names, keys, types, K ----------------------------------------------------------
def case_unknown_selector(cfg, files, tmp_path):
    cfg["selection"]["selector"] = "kl-greedy-ad"
    return f"Unknown selector 'kl-greedy-ad'. Did you mean: kl-greedy-add, mse-greedy-add, kl-greedy-remove? Available: {available('selector')}"


def case_unknown_variant(cfg, files, tmp_path):
    cfg["linear_attention"] = {"name": "gdm"}
    return f"Unknown linear attention 'gdm'. Did you mean: gdn? Available: {available('linear_attention')}"


def case_unknown_key(cfg, files, tmp_path):
    cfg["distill"]["stage2_token"] = 10
    known = ", ".join(f.name for f in attrs.fields(DistillConfig))
    return f"distill has no field 'stage2_token'. Did you mean 'stage2_tokens'? Known fields: {known}"


def case_wrong_type(cfg, files, tmp_path):
    cfg["distill"]["batch_size"] = "eight"
    return "distill field 'batch_size' must be int; got 'eight'"


def case_variant_param_wrong_type(cfg, files, tmp_path):
    cfg["linear_attention"] = {"name": "gdn", "use_short_conv": "yes"}
    return "linear_attention 'gdn' field 'use_short_conv' must be bool; got 'yes'"


def case_k_zero(cfg, files, tmp_path):
    cfg["softmax_layers"] = 0
    return "run field 'softmax_layers' must be an int K >= 1, a ratio in (0, 1), or a list of layer indices; got 0"


def case_k_negative(cfg, files, tmp_path):
    cfg["softmax_layers"] = -2
    return "run field 'softmax_layers' must be an int K >= 1, a ratio in (0, 1), or a list of layer indices; got -2"


def case_k_all_layers(cfg, files, tmp_path):
    cfg["softmax_layers"] = 4
    return "run field 'softmax_layers' must give 1 <= K < 4 (the teacher has 4 layers); got 4 (K = 4)"


# -- teacher -------------------------------------------------------------------------------------------
def case_unsupported_teacher(cfg, files, tmp_path):
    gpt2 = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    cfg["teacher"] = str(gpt2)
    return (f"teacher {str(gpt2)!r} is a GPT2LMHeadModel (model_type 'gpt2'); hybridize supports: LlamaForCausalLM, "
            "Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM. Use a checkpoint of one of these families.")


def case_vocab_mismatch(cfg, files, tmp_path):
    teacher = save_tiny_teacher(tmp_path / "small_vocab", n_layer=4, vocab=48)
    tiny_tokenizer(64).save_pretrained(teacher)  # a tokenizer from another checkpoint
    cfg["teacher"] = str(teacher)
    return (f"teacher {str(teacher)!r}: its tokenizer has 64 tokens but the model's vocab_size is 48, so token ids >= 48 "
            "would index past the embedding; use the tokenizer saved with this checkpoint")


# -- data ----------------------------------------------------------------------------------------------
def case_empty_data(cfg, files, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n\n")
    cfg["data"]["train"] = str(tmp_path / "empty.txt")
    return f"data field 'train': {str(tmp_path / 'empty.txt')!r} holds no non-empty documents"


def case_data_shorter_than_a_block(cfg, files, tmp_path):
    (tmp_path / "short.txt").write_text("a cat.")
    cfg["data"]["train"] = str(tmp_path / "short.txt")
    return ("data field 'train' has 8 tokens after tokenization, fewer than one block of seq_len=16; add data or lower "
            "data.seq_len")


def case_missing_data(cfg, files, tmp_path):
    cfg["data"]["train"] = str(tmp_path / "nope.txt")
    return f"data field 'train': {str(tmp_path / 'nope.txt')!r} does not exist; give a file, a directory or a hub id"


# -- output directory -------------------------------------------------------------------------------------
def case_existing_output_dir(cfg, files, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")
    return (f"output directory {str(tmp_path / 'out')!r} already exists and is not empty; pass --resume to continue that "
            "run or --overwrite to start again")


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_bad_input_exact_message(case, files, tmp_path, capsys):
    cfg = copy.deepcopy(base(files))
    expected = CASES[case](cfg, files, tmp_path)
    code, err = run_cli(tmp_path, cfg, capsys)
    assert code == 2
    assert ("\n" + err).endswith(f"\nhybridize: error: {expected}\n"), err  # after any progress bars
    assert not (tmp_path / "out" / "model").exists()
    if case != "existing_output_dir":  # issue 17: every check runs before --out is created
        assert not (tmp_path / "out").exists()


def test_existing_output_dir_with_overwrite_starts_again(files, tmp_path, capsys):
    assert run_cli(tmp_path, base(files), capsys)[0] == 0  # a run of hybridize's: --overwrite may empty it
    (tmp_path / "out" / ".result.json.tmp").write_text("old")  # a leftover of hybridize's own (issue 17: never a user's file)
    code, err = run_cli(tmp_path, base(files), capsys, "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "out" / ".result.json.tmp").exists() and (tmp_path / "out" / "model").is_dir()


# -- plugins --------------------------------------------------------------------------------------------------
def test_broken_entry_point_plugin_is_named_and_can_be_blocked(files, tmp_path, monkeypatch, capsys):
    fake_distribution(site(tmp_path), monkeypatch, name="hybridize-broken", version="1.2.3",
                      entry_points={"broken": "broken_bad_input_mod"}, modules={"broken_bad_input_mod": "raise ImportError('needs libfoo')\n"})
    code, err = run_cli(tmp_path, base(files), capsys)
    assert code == 2
    assert err == ("hybridize: error: Plugin entry point 'broken' = 'broken_bad_input_mod' from distribution hybridize-broken "
                   "1.2.3 failed to load: ImportError: needs libfoo. Fix or uninstall that distribution, or skip it with "
                   "HYBRIDIZE_BLOCKED_PLUGINS=broken.\n")
    monkeypatch.setenv("HYBRIDIZE_BLOCKED_PLUGINS", "broken")
    assert main(["plugins", "--json"]) == 0
    assert '"broken"' not in capsys.readouterr().out


def test_plugin_registering_a_duplicate_name_is_refused(files, tmp_path, monkeypatch, capsys):
    fake_distribution(site(tmp_path), monkeypatch, name="hybridize-clash", version="0.3", entry_points={"clash": "clash_bad_input_mod"},
                      modules={"clash_bad_input_mod": """
                          import attrs
                          from hybridize import hookimpl

                          @attrs.frozen
                          class Cfg:
                              pass

                          def build(spec, cfg):
                              return None

                          @hookimpl
                          def hybridize_register_linear_attention(register):
                              register("gdn", build, Cfg)
                      """})
    code, err = run_cli(tmp_path, base(files), capsys)
    assert code == 2
    assert err == ("hybridize: error: linear_attention 'gdn' is registered twice: by plugin 'clash' (clash_bad_input_mod, "
                   "hybridize-clash 0.3) and by plugin 'gdn' (hybridize.plugins.linear_attn.gdn, hybridize 0.1.0). Rename one, "
                   "or block a plugin with HYBRIDIZE_BLOCKED_PLUGINS.\n")
