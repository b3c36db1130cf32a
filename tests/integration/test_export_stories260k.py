"""``hybridize export --heal-tokens`` on a real teacher: a GDN hybrid of stories260K (Llama) to qwen3_5.

Its softmax layer gets the q/k RMSNorm that qwen3_5 always applies, so the export is approximate: the command
heals the converted model by KL to the hybrid and reports the held-out KL before and after, which must fall.
Skips when ../shared/teachers/stories260K (or tinystories_val.txt) is absent.
"""
from __future__ import annotations

import json

import torch

from hybridize.cli import main
from hybridize.model.export import REPORT
from hybridize.model.hybrid import save_hybrid
from hybridize.model.surgery import build_student
from hybridize.model.teacher import load_teacher

from conftest import shared_path


def test_stories260k_export_heals_and_reports_the_kl(tmp_path, capsys):
    teacher = load_teacher(shared_path("teachers", "stories260K"))
    data = shared_path("data", "tinystories_val.txt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the GDN gates' initial values
        hybrid = build_student(teacher.model, [2], "gdn")
    path = save_hybrid(hybrid, tmp_path / "model", teacher.tokenizer)
    capsys.readouterr()
    argv = ["export", str(path), "--out", str(tmp_path / "out"), "--heal-tokens", "32768", "--data", str(data),
            "--seq-len", "128", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    heal = report["heal"]
    assert not report["exact"] and any("q/k RMSNorm" in d for d in report["differences"])
    assert heal["tokens"] >= 32768 and heal["heldout_blocks"] == 32
    assert heal["heldout_kl_after"] < heal["heldout_kl_before"], heal
    out = capsys.readouterr().out
    assert f"held-out KL to the hybrid {heal['heldout_kl_before']:.4g} -> {heal['heldout_kl_after']:.4g}" in out
    assert report["parity"]["prompts"] == 4 and report["parity_before_heal"]["kl"] > 0
