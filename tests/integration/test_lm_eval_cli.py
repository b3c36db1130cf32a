"""lm-eval's own command line evaluates a saved hybrid with hybridize unimportable (``trust_remote_code``).

A local task (a YAML file and a jsonl in a temporary directory, given with ``--include_path``; no hub) of
each request kind: ``multiple_choice`` (log-likelihoods) and ``generate_until`` (batched, left-padded greedy
generation with the hybrid cache).
"""
from __future__ import annotations

import json
import sys

import pytest

from hybridize.model.hybrid import save_hybrid
from hybridize.model.surgery import build_student
from hybridize.testing.models import tiny_model, tiny_tokenizer

from conftest import run_without_hybridize

pytest.importorskip("lm_eval")

TASKS = {
    "hyb_choice": """\
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
    "hyb_greedy": """\
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _task_dir(root):
    root.mkdir()
    docs = [{"question": f"count {'a ' * i}is", "choices": [" one", " two", " many"], "label": min(i, 3) - 1,
             "answer": f" {i}"} for i in range(1, 9)]  # questions of different lengths: padded batches
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for task, body in TASKS.items():
        head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n"
        (root / f"{task}.yaml").write_text(head + body + "metadata:\n  version: 1\n")
    return root


def test_lm_eval_cli_runs_on_a_saved_hybrid(tmp_path):
    student = build_student(tiny_model("llama", n_layer=2, vocab=64), [1], "gdn").eval()
    model = save_hybrid(student, tmp_path / "model", tiny_tokenizer())
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model},trust_remote_code=True", "--tasks", ",".join(TASKS),
            "--include_path", str(_task_dir(tmp_path / "tasks")), "--limit", "5", "--batch_size", "2",
            "--device", "cpu", "--output_path", str(out), "--log_samples"]
    proc = run_without_hybridize(argv, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    [results] = list(out.rglob("results_*.json"))
    payload = json.loads(results.read_text())
    assert set(payload["results"]) == set(TASKS)
    assert 0.0 <= payload["results"]["hyb_choice"]["acc,none"] <= 1.0
    assert 0.0 <= payload["results"]["hyb_greedy"]["exact_match,none"] <= 1.0
    assert all(payload["n-samples"][t]["effective"] == 5 for t in TASKS)
    assert payload["config"]["model_args"] == {"pretrained": str(model), "trust_remote_code": True}
    samples = [json.loads(line) for f in out.rglob("samples_hyb_greedy_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == 5 and all(isinstance(s["resps"][0][0], str) for s in samples)
