"""lm-eval on tiny hybrids: RULER niah + a local SWDE file end to end, batched == single generation,
`hybridize eval` on saved hybrid and teacher directories, evaluators inside `hybridize distill`."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from hybridize.cli import main
from hybridize.registry.configs import ComponentRef
from hybridize.errors import HybridizeError
from hybridize.evaluate import EvalTarget, run_evaluators
from hybridize.model.hybrid import as_hybrid, save_hybrid
from hybridize.plugins.evals import swde
from hybridize.plugins.evals.network import network
from hybridize.model.surgery import build_student
from hybridize.testing.models import save_tiny_teacher, tiny_model, tiny_tokenizer

from conftest import shared_path  # tests/conftest.py: $HYBRIDIZE_SHARED or ../shared, skips when absent

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared CPU
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def hybrid():
    return as_hybrid(build_student(tiny_model("llama", n_layer=2, vocab=64), [1], "gdn").eval())


@pytest.fixture(scope="module")
def swde_file(tmp_path_factory):
    """A small SWDE-format file; texts of different lengths so that batches are left-padded."""
    rows = [{"doc_id": i, "file_name": f"movie{i}.htm", "key": "year", "value": f" 19{i}{i} ",
             "text": f" title: film {i}. " + "cast: a b c. " * i + f"year: 19{i}{i}.\n\nyear:"} for i in range(6)]
    path = tmp_path_factory.mktemp("swde") / "swde.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_niah_single_1_and_local_swde_end_to_end(pm, hybrid, swde_file):
    ref = ComponentRef(name="lm-eval", params={"tasks": ["niah_single_1", "swde"], "max_seq_lengths": [1024], "limit": 2,
                                               "batch_size": 2, "swde_data": str(swde_file)})
    out = run_evaluators([ref], EvalTarget(model=hybrid, tokenizer=tiny_tokenizer(), label="tiny", progress=False), pm)
    assert set(out["metrics"]) == {"niah_single_1", "swde"}
    assert all(0.0 <= v <= 1.0 for v in out["metrics"].values())
    details = out["evals"][0]["details"]
    assert details["lm_eval_version"] and details["limit"] == 2 and not details["online"]
    niah, sw = details["tasks"]["niah_single_1"], details["tasks"]["swde"]
    assert niah["samples"] == 2 and set(niah["metrics"]) == {"1024"} and niah["data"].startswith("synthetic")
    assert sw["samples"] == 2 and sw["documents"] == 6 and "contains" in sw["metrics"]


def _swde_answers(model, tokenizer, path, batch_size):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with network(online=False):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=256, device="cpu")
        tm = TaskManager(include_defaults=False, include_path=[])
        res = simple_evaluate(lm, tasks=[swde.local_task_spec(str(path))], task_manager=tm, bootstrap_iters=0, log_samples=True)
    return {s["doc_id"]: s["resps"] for s in res["samples"]["swde"]}


def test_batched_generation_equals_single(swde_file):
    """HFLM left-pads a batch: the hybrid cache and padding must give the batch-size-1 answers."""
    model = as_hybrid(build_student(tiny_model("llama", n_layer=3, vocab=64, seed=3), [1], "gdn").double().eval())
    tok = tiny_tokenizer()
    single = _swde_answers(model, tok, swde_file, 1)
    batched = _swde_answers(model, tok, swde_file, 4)
    assert len(single) == 6 and batched == single
    assert len({str(v) for v in single.values()}) > 1  # the prompts really differ


def test_hub_task_offline_fails_with_a_clear_message(pm, hybrid):
    ref = ComponentRef(name="lm-eval", params={"tasks": ["swde"], "limit": 1})
    with pytest.raises(HybridizeError, match=r"needs data from the Hugging Face hub.*--online.*swde_data"):
        run_evaluators([ref], EvalTarget(model=hybrid, tokenizer=tiny_tokenizer(), progress=False), pm)


def test_short_length_fails_before_running(pm, hybrid):
    ref = ComponentRef(name="lm-eval", params={"tasks": ["ruler_cwe"], "max_seq_lengths": [512], "limit": 1})
    with pytest.raises(HybridizeError, match="ruler_cwe needs max_seq_lengths >="):
        run_evaluators([ref], EvalTarget(model=hybrid, tokenizer=tiny_tokenizer(), progress=False), pm)


def test_heldout_kl_and_perplexity_are_finite_without_grad(pm, hybrid):
    teacher = tiny_model("llama", n_layer=2, vocab=64)
    blocks = torch.randint(3, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    target = EvalTarget(model=hybrid, tokenizer=tiny_tokenizer(), teacher=teacher, heldout=blocks, progress=False)
    grads = []
    orig = hybrid.model.forward

    def spy(*a, **k):
        grads.append(torch.is_grad_enabled())
        return orig(*a, **k)

    hybrid.model.forward = spy
    try:
        out = run_evaluators([ComponentRef(name="heldout-kl"), ComponentRef(name="perplexity", params={"batch_size": 2})], target, pm)
    finally:
        del hybrid.model.forward
    assert set(out["metrics"]) == {"heldout_kl", "student_ppl", "teacher_ppl", "perplexity"}
    assert all(math.isfinite(v) for v in out["metrics"].values()) and out["metrics"]["heldout_kl"] >= 0
    assert math.isclose(out["metrics"]["perplexity"], out["metrics"]["student_ppl"], rel_tol=1e-4)
    assert grads and not any(grads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"the cat sat on mat {i}. a dog ran to the park and back again." for i in range(40)))
    return path


def test_cli_eval_saved_hybrid_and_teacher(tmp_path, swde_file, corpus, capsys):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", n_layer=2)
    student = build_student(tiny_model("llama", n_layer=2), [0], "gdn")
    hybrid_dir = save_hybrid(student, tmp_path / "run" / "model", tiny_tokenizer())
    capsys.readouterr()  # the saving's own bars
    for d in (teacher_dir, hybrid_dir):
        out = tmp_path / f"eval_{d.parent.name}"
        assert main(["eval", str(d), "--tasks", "swde", "--swde-data", str(swde_file), "--limit", "2", "--batch-size", "2",
                     "--evaluator", f"{{name: perplexity, data: {corpus}, seq_len: 32, blocks: 2}}", "--out", str(out), "--quiet"]) == 0
        result = json.loads((out / "eval.json").read_text())
        assert set(result["metrics"]) == {"swde", "perplexity"} and math.isfinite(result["metrics"]["perplexity"])
        assert "| swde |" in (out / "eval.md").read_text()
    captured = capsys.readouterr()
    assert "| metric | run | samples |" in captured.out
    # --quiet silences the libraries' bars too (weights loading, lm-eval requests), and only during the call
    assert "it/s]" not in captured.err and "Loading weights" not in captured.err
    assert "TQDM_DISABLE" not in os.environ
    assert main(["eval", str(hybrid_dir), "--tasks", "niah_single_2", "--limit", "1"]) == 2
    assert "field 'essays_dir' (--essays)" in capsys.readouterr().err
    assert main(["eval", str(hybrid_dir)]) == 2
    assert "needs --tasks" in capsys.readouterr().err


def test_distill_runs_config_evaluators(tmp_path, corpus, swde_file):
    teacher = save_tiny_teacher(tmp_path / "teacher", n_layer=2)
    cfg = {"teacher": str(teacher), "data": {"train": str(corpus), "seq_len": 32}, "linear_attention": {"name": "gdn"},
           "softmax_layers": [1], "distill": {"stage1_tokens": 256, "stage2_tokens": 256, "batch_size": 4, "eval_blocks": 2},
           "evaluators": [{"name": "perplexity", "blocks": 2},
                          {"name": "lm-eval", "tasks": ["swde"], "swde_data": str(swde_file), "limit": 2, "batch_size": 2},
                          {"name": "heldout-kl", "blocks": 1}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    m = result["metrics"]
    assert {"heldout_kl", "perplexity", "swde"} <= set(m)
    assert [e["name"] for e in result["evals"]] == ["perplexity", "lm-eval", "heldout-kl"]
    # one name, one meaning: the run's own held-out KL (2 blocks) is not replaced by the evaluator's (1 block)
    ev = result["evals"][2]["metrics"]
    assert m["heldout-kl/heldout_kl"] == ev["heldout_kl"] and m["heldout-kl/student_ppl"] == ev["student_ppl"]
    assert m["heldout_kl"] == m["heldout_kl_after_stage2"] != ev["heldout_kl"]
    assert result["config"]["evaluators"][1]["tasks"] == ["swde"]


def test_essay_haystack_from_local_essays(pm, hybrid, shared_dir):
    essays = shared_path("data", "pg_essays")
    ref = ComponentRef(name="lm-eval", params={"tasks": ["niah_single_2"], "max_seq_lengths": [1024], "limit": 1,
                                               "essays_dir": str(essays)})
    out = run_evaluators([ref], EvalTarget(model=hybrid, tokenizer=tiny_tokenizer(), progress=False), pm)
    details = out["evals"][0]["details"]
    assert details["tasks"]["niah_single_2"]["samples"] == 1 and "essays in" in details["tasks"]["niah_single_2"]["data"]
    assert details["essay_sentence_splitter"].startswith("nltk")
