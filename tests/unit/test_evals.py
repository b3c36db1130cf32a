"""Evaluator configs, the offline switch, RULER length checks and the metrics table (no model runs)."""
from __future__ import annotations

import os
import sys

import pytest

from hybridize.errors import ConfigError
from hybridize.evaluate import markdown_table, parse_evaluators
from hybridize.plugins.evals import ruler, swde
from hybridize.plugins.evals.network import OFFLINE_VARS, is_offline_error, network
from hybridize.testing.models import tiny_tokenizer


def test_evaluators_registered_through_entry_points(pm):
    reg = pm.registry("evaluator")
    assert {"lm-eval", "heldout-kl", "perplexity"} <= set(reg)
    assert reg["lm-eval"].origin.distribution == "hybridize"


def test_evaluator_errors_are_collected(pm):
    refs, problems = parse_evaluators(
        [{"name": "heldout-kl"}, {"name": "lm-eval", "tasks": ["niah_single_1"], "limt": 3}, {"name": "perplexty"}, "lm-eval"], pm)
    assert [r.name for r in refs] == ["heldout-kl"]
    text = "\n".join(problems)
    assert "no field 'limt'. Did you mean 'limit'?" in text
    assert "Unknown evaluator 'perplexty'. Did you mean: perplexity?" in text
    assert "field 'tasks' is required" in text
    _, problems = parse_evaluators({"name": "lm-eval"}, pm)
    assert "must be a list" in problems[0]


@pytest.mark.parametrize("params, needle", [
    ({"tasks": ["ruler_qa_squad"]}, "cannot run offline"),
    ({"tasks": ["ruler"]}, "online: true (--online)"),
    ({"tasks": ["niah_single_2"]}, "field 'essays_dir' (--essays)"),
    ({"tasks": ["niah_multivalue"], "essays_dir": "/nonexistent"}, "must be a directory of .txt essays"),
    ({"tasks": ["niah_single_1"], "max_seq_lengths": [0]}, "'max_seq_lengths' must be a non-empty list of ints >= 1"),
    ({"tasks": ["ruler_fwe"], "max_seq_lengths": [128]}, "ruler_fwe needs max_seq_lengths >= 200"),
    ({"tasks": ["swde"], "swde_data": "x.csv"}, "'swde_data' must be a .parquet, .jsonl or .json file"),
    ({"tasks": ["niah_single_1"], "swde_data": "x.jsonl"}, "'swde' is not among tasks"),
    ({"tasks": []}, "non-empty list of lm-eval task names"),
    ({"tasks": ["swde"], "limit": 0}, "'limit' must be >= 1"),
])
def test_lm_eval_config_errors_name_the_field(pm, params, needle):
    with pytest.raises(ConfigError) as exc:
        pm.registry("evaluator")["lm-eval"].build_config(params)
    assert needle in str(exc.value)
    assert all(line.count("evaluator 'lm-eval'") == 1 for line in exc.value.problems)


def test_online_or_local_data_is_accepted(pm, tmp_path):
    (tmp_path / "a.txt").write_text("An essay.")
    build = pm.registry("evaluator")["lm-eval"].build_config
    assert build({"tasks": ["ruler"], "online": True}).online
    assert build({"tasks": ["niah_single_2"], "essays_dir": str(tmp_path)}).essays_dir == str(tmp_path)


def test_ruler_group_expands_to_subtasks():
    assert ruler.expand(["swde", "ruler", "niah_single_1"])[:2] == ["swde", "niah_single_1"]
    assert len(ruler.expand(["ruler"])) == 13 and set(ruler.QA) <= set(ruler.expand(["ruler"]))


def test_network_is_off_inside_and_restored(monkeypatch):
    for k in OFFLINE_VARS:
        monkeypatch.delenv(k, raising=False)
    with network(online=False):
        assert all(os.environ[k] == "1" for k in OFFLINE_VARS)
        if "huggingface_hub.constants" in sys.modules:
            assert sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE is True
    assert not any(k in os.environ for k in OFFLINE_VARS)
    with network(online=True):
        assert not any(k in os.environ for k in OFFLINE_VARS)


def test_offline_errors_are_recognised():
    try:
        try:
            raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)")
        except ConnectionError as inner:
            raise RuntimeError("loading failed") from inner
    except RuntimeError as exc:
        assert is_offline_error(exc)
    assert not is_offline_error(ValueError("bad value"))


def test_vt_and_cwe_fail_fast_at_short_lengths():
    tok = tiny_tokenizer()  # one token per character: prompts are long in tokens
    with pytest.raises(ConfigError, match="ruler_vt cannot run with this tokenizer.*loop forever"):
        ruler.check_lengths(["ruler_vt"], tok, [512])
    with pytest.raises(ConfigError, match=r"ruler_cwe needs max_seq_lengths >= \d+ .*divide by zero"):
        ruler.check_lengths(["ruler_cwe"], tok, [512])
    ruler.check_lengths(["ruler_cwe"], Words(), [1024])  # one token per word: fits


class Words:
    """A stand-in tokenizer with one token per word."""

    def __call__(self, text):
        return type("Enc", (), {"input_ids": text.split()})()


def test_vt_minimum_with_a_word_tokenizer():  # vt's 1-shot example fits in 500 word tokens
    need, _ = ruler._vt_minimum(Words())
    assert need is not None and 100 < need < 1000
    with pytest.raises(ConfigError, match="loop forever"):
        ruler.check_lengths(["ruler_vt"], Words(), [need - 20])
    ruler.check_lengths(["ruler_vt"], Words(), [need + 50])


def test_swde_local_file_schema_is_checked(tmp_path):
    path = tmp_path / "swde.jsonl"
    path.write_text('{"doc_id": 1, "key": "year", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"lacks SWDE column\(s\) \['file_name', 'value'\]"):
        swde.load_local(str(path))


def test_markdown_table_one_column_per_model():
    detail = {"tasks": {"niah_single_1": {"samples": 20}}}
    a = {"metrics": {"niah_single_1": 0.5, "perplexity": 4.25}, "evals": [{"details": detail}]}
    b = {"metrics": {"niah_single_1": 0.05}, "evals": [{"details": detail}]}
    table = markdown_table({"teacher": a, "hybrid": b})
    assert table.splitlines()[0] == "| metric | teacher | hybrid | samples |"
    assert "| niah_single_1 | 0.5 | 0.05 | 20 |" in table and "| perplexity | 4.25 |  |  |" in table


def test_merge_metrics_keeps_the_runs_own_measurement():
    from hybridize.evaluate import merge_metrics

    own = {"heldout_kl": 0.2322, "student_ppl": 10.8, "teacher_ppl": 10.6}
    evals = [{"name": "heldout-kl", "metrics": {"heldout_kl": 0.2166, "student_ppl": 11.0, "teacher_ppl": 10.7}},
             {"name": "lm-eval", "metrics": {"niah_single_1": 0.5}}]
    merged = merge_metrics(own, evals)
    assert merged == {**own, "heldout-kl/heldout_kl": 0.2166, "heldout-kl/student_ppl": 11.0,
                      "heldout-kl/teacher_ppl": 10.7, "niah_single_1": 0.5}
    assert own == {"heldout_kl": 0.2322, "student_ppl": 10.8, "teacher_ppl": 10.6}  # not modified
