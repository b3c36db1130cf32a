"""`hybridize quickstart`: corpus, tokenizer, cached teacher, lm-eval recall task, and a tiny end-to-end run."""
from __future__ import annotations

import json
import random
import re

import attrs
import pytest

from hybridize.recipes import quickstart as qs
from hybridize.cli import main

TINY = qs.RecallSpec(n_keys=4, n_values=3, n_pairs=3, seq_len=24, hidden=32, layers=2, heads=2, kv_heads=1,
                     steps=30, batch_size=16, seed=0)
SMALL_BUDGETS = [
    "selection.probe_tokens=1152", "selection.eval_every=4", "distill.stage1_tokens=1152", "distill.stage2_tokens=1152",
    "distill.batch_size=8", "distill.eval_blocks=4", "evaluators.1.limit=12",
]


def test_every_document_is_exactly_one_block():
    tok = qs.build_tokenizer(TINY)
    for doc in qs.corpus(TINY, 50, seed=3):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert len(ids) + 2 == TINY.seq_len  # + BOS + EOS
        assert tok.unk_token_id not in ids


def test_recall_answers_are_the_facts_values():
    for d in qs.recall_docs(TINY, 40, seed=5):
        words = d["context"].split()
        assert words[0] == "<s>" and re.fullmatch(r"k\d+", words[-1])
        facts = dict(w.split("=") for w in words if "=" in w)
        assert facts[words[-1]] == d["answer"]


def test_episodes_query_every_pair_once():
    words, answers = qs.episode(random.Random(0), TINY)
    assert len(answers) == TINY.n_pairs
    asked = [words[p - 1] for p in answers]
    assert sorted(asked) == sorted(w.split("=")[0] for w in words if "=" in w)


def test_spec_key_changes_with_every_setting():
    assert TINY.key() != attrs.evolve(TINY, steps=31).key()
    with pytest.raises(ValueError, match="n_pairs"):
        qs.RecallSpec(n_keys=2, n_pairs=3)
    with pytest.raises(ValueError, match="seq_len"):
        qs.RecallSpec(seq_len=10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs")
    result = qs.quickstart(root / "out", cache_dir=root / "cache", spec=TINY, n_docs=240, overrides=SMALL_BUDGETS, progress=False)
    return root, result


def test_quickstart_end_to_end(tiny_run):
    root, result = tiny_run
    out = root / "out"
    for name in ("compare.json", "compare.md", "compare_metrics.png", "compare_layers.png", "quickstart.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert {r["selector"] for r in result["rows"]} == {"kl-greedy-add", "uniform", "random"}
    assert sorted({r["seed"] for r in result["rows"]}) == [0, 1]
    for row in result["rows"]:
        assert 0.0 <= row["metrics"]["hybridize_recall"] <= 1.0
        assert row["metrics"]["heldout_kl"] >= 0.0
    assert "hybridize_recall" in (out / "compare.md").read_text()
    info = result["quickstart"]["teacher_info"]
    assert info["spec"]["layers"] == TINY.layers and 0.0 <= info["recall_accuracy"] <= 1.0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["quickstart"]["teacher"] == result["quickstart"]["teacher"]


def test_teacher_is_cached_and_reused(tiny_run, monkeypatch):
    root, result = tiny_run
    monkeypatch.setattr(qs, "train_teacher", lambda *a, **k: pytest.fail("the cached teacher was retrained"))
    path, info = qs.ensure_teacher(TINY, root / "cache")
    assert str(path) == result["quickstart"]["teacher"] and info == result["quickstart"]["teacher_info"]
    assert not list(path.parent.glob(".teacher-*"))  # no temporary directory left behind


def test_recall_task_runs_through_lm_eval_on_the_teacher(tiny_run):
    """The YAML task loads from include_path and scores the teacher the same as a direct greedy check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridize.evaluate import EvalTarget, run_evaluators
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.registry.configs import ComponentRef

    root, result = tiny_run
    teacher = result["quickstart"]["teacher"]
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    ref = ComponentRef(name="lm-eval", params={"tasks": [qs.TASK], "include_path": [result["quickstart"]["task_dir"]], "limit": 30,
                                               "batch_size": 7})
    got = run_evaluators([ref], EvalTarget(model=model, tokenizer=tok, label="teacher", progress=False), get_plugin_manager())
    docs = [json.loads(line) for line in (root / "cache").rglob("recall.jsonl").__next__().read_text().splitlines()[:30]]
    assert got["metrics"][qs.TASK] == pytest.approx(qs.recall_accuracy(model, tok, docs))


def test_quickstart_refuses_an_existing_out_dir(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["quickstart", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_lm_eval_include_path_must_exist(tmp_path):
    from hybridize.errors import ConfigError
    from hybridize.registry.manager import get_plugin_manager

    with pytest.raises(ConfigError, match="include_path"):
        get_plugin_manager().registry("evaluator")["lm-eval"].build_config({"tasks": ["x"], "include_path": [str(tmp_path / "nope")]})


def test_a_small_teacher_learns_recall_well_above_chance(tmp_path):
    """The corpus teaches in-context lookup fast: a 4-layer d=64 teacher gets it in 250 steps (chance: 1/6)."""
    spec = qs.RecallSpec(n_keys=8, n_values=6, n_pairs=5, seq_len=32, steps=250, batch_size=32)
    info = qs.train_teacher(spec, tmp_path / "t", progress=False)
    assert info["recall_accuracy"] >= 0.9
