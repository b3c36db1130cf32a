"""Stage 1 / 2 / 3 on a tiny teacher, exact resume of the distiller, and `hybridize distill` end to end."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from hybridize.cli import main
from hybridize.training.data import DataConfig, prepare_data
from hybridize.distill.stages import DistillConfig, Distiller, alignment_losses, capture_attention, linear_modules
from hybridize.errors import ConfigError
from hybridize.training.losses import chunked_kl
from hybridize.model.hybrid import load_hybrid
from hybridize.recipes.runconfig import run_config_from_dict
from hybridize.model.surgery import build_student
from hybridize.testing.models import save_tiny_teacher, tiny_model, tiny_tokenizer

TEXT = "\n\n".join(
    f"story {i}: the cat {'sat' if i % 2 else 'ran'} on the mat and said {chr(97 + i % 26) * 3}. the end."
    for i in range(120)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def data(corpus):
    return prepare_data(DataConfig(train=str(corpus), seq_len=32, heldout_fraction=0.1), tiny_tokenizer(), seed=0)


def test_chunked_kl_matches_full_kl_and_grad():
    torch.manual_seed(0)
    hs, ht = torch.randn(2, 37, 16, requires_grad=True), torch.randn(2, 37, 16)
    ls, lt = torch.nn.Linear(16, 50), torch.nn.Linear(16, 50)
    for tau in (1.0, 2.0):
        kl = chunked_kl(hs, ht, ls, lt, temperature=tau, chunk_tokens=10)
        ref = torch.nn.functional.kl_div(torch.log_softmax(ls(hs) / tau, -1).flatten(0, 1), torch.log_softmax(lt(ht) / tau, -1).flatten(0, 1),
                                         log_target=True, reduction="batchmean") * tau**2
        torch.testing.assert_close(kl, ref)
        torch.testing.assert_close(torch.autograd.grad(kl, hs)[0], torch.autograd.grad(ref, hs)[0])


def test_capture_stops_after_last_layer_and_matches_teacher():
    teacher = tiny_model("llama", n_layer=4)
    ids = torch.randint(3, 64, (2, 9))
    cap = capture_attention(teacher, ids, [0, 2])
    assert sorted(cap) == [0, 2] and cap[0][0].shape == (2, 9, 32)
    student = build_student(teacher, [1, 3], "gdn")
    losses = alignment_losses(teacher, linear_modules(student), ids)
    assert sorted(losses) == [0, 2] and all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_stages_reduce_kl(data):
    teacher = tiny_model("llama", n_layer=3)
    student = build_student(teacher, [1], "gdn")
    cfg = DistillConfig(stage1_tokens=6000, stage2_tokens=6000, stage3_tokens=1000, batch_size=8, stage1_lr=3e-3,
                        stage2_lr_attn=3e-3, stage2_lr_other=1e-3, eval_blocks=4)
    report = Distiller(teacher=teacher, data=data, cfg=cfg, device=torch.device("cpu"), progress=False).run(student)
    m = report["metrics"]
    assert m["heldout_kl_after_stage2"] < m["heldout_kl_after_surgery"]
    assert report["tokens"]["stage1"] >= 6000 and report["tokens"]["stage3"] >= 1000
    assert report["tokens"]["teacher_forward"] >= report["tokens"]["stage1"] + report["tokens"]["stage2"]
    assert all(p.requires_grad for p in student.parameters())


class Crash(Exception):
    pass


def test_distiller_resume_equals_uninterrupted(tmp_path, data):
    cfg = DistillConfig(stage1_tokens=3000, stage2_tokens=3000, batch_size=4, checkpoint_every=3, eval_blocks=2)

    def run(ckpt, crash_at=None):
        torch.manual_seed(0)
        student = build_student(tiny_model("llama", n_layer=3), [2], "gdn")

        def on_step(stage, step, tokens, metrics):
            if (stage, step) == crash_at:
                raise Crash

        d = Distiller(teacher=tiny_model("llama", n_layer=3), data=data, cfg=cfg, device=torch.device("cpu"),
                      ckpt_dir=ckpt, progress=False, on_step=on_step)
        return student, d.run(student)

    ref, ref_report = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=("stage2", 7))
    resumed, report = run(tmp_path / "b")
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert report["metrics"] == ref_report["metrics"]


def test_run_config_errors_are_collected():
    with pytest.raises(ConfigError) as exc:
        run_config_from_dict({"teacher": "x", "data": {"train": "y", "seqlen": 3}, "linear_attention": {"name": "gdm"},
                              "softmax_layers": 0, "distil": {}})
    msg = str(exc.value)
    assert "4 configuration problems" in msg
    assert "no field 'distil'. Did you mean 'distill'?" in msg and "no field 'seqlen'. Did you mean 'seq_len'?" in msg
    assert "Did you mean: gdn?" in msg and "field 'softmax_layers' must be" in msg


def test_cli_distill_end_to_end(tmp_path, corpus, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher", n_layer=3)
    cfg = {"teacher": str(teacher), "data": {"train": str(corpus), "seq_len": 32}, "linear_attention": {"name": "gla"},
           "softmax_layers": [1], "distill": {"stage1_tokens": 2000, "stage2_tokens": 2000, "batch_size": 4, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["distill", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet", "--set", "seed=3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["softmax_layers"] == [1] and result["config"]["seed"] == 3
    assert result["tokens"]["stage1"] > 0 and result["tokens"]["stage2"] > 0
    assert {"heldout_kl", "student_ppl", "teacher_ppl", "heldout_kl_after_surgery"} <= set(result["metrics"])
    assert result["plugins"]["gla"]["distribution"] == "hybridize"
    assert (out / "distill.png").stat().st_size > 0
    model = load_hybrid(out / "model")
    assert model.config.hybridize["softmax_layers"] == [1]
    assert "wrote" in capsys.readouterr().out
    assert main(["distill", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_distill_needs_explicit_layers(tmp_path, corpus, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"teacher": "t", "data": {"train": str(corpus)}, "softmax_layers": 2}))
    assert main(["distill", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "explicit list" in capsys.readouterr().err
