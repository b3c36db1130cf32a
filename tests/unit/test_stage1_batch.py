"""Stage 1's own batch (distill.stage1_batch_size / stage1_micro_batch_size): auto resolution, validation,
micro-batches equal to one big batch, exact resume, token accounting, the plan and --resume of older runs."""
from __future__ import annotations

import json

import attrs
import pytest
import torch

from hybridize.distill.batches import stage1_batch
from hybridize.distill.stages import DistillConfig, Distiller, alignment_losses, linear_modules
from hybridize.errors import ConfigError
from hybridize.model.surgery import build_student
from hybridize.testing.models import tiny_model, tiny_tokenizer
from hybridize.training.data import DataConfig, prepare_data
from tests.conftest import base

TEXT = "\n\n".join(f"note {i}: the {'red' if i % 3 else 'blue'} fox jumped {i % 7} times over {chr(97 + i % 26) * 2}."
                   for i in range(160))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("s1") / "corpus.txt"
    path.write_text(TEXT)
    return prepare_data(DataConfig(train=str(path), seq_len=32, heldout_fraction=0.1), tiny_tokenizer(), seed=0)


# -- resolution and validation ----------------------------------------------------------------------------------
def test_auto_micro_batch_keeps_stage_2_tokens_per_forward():
    paper = DistillConfig(batch_size=32, micro_batch_size=2, stage1_seq_len=512, stage1_batch_size=96)
    s1 = stage1_batch(paper, 4096)
    assert (s1.seq_len, s1.batch_size, s1.micro_batch_size, s1.tokens_per_forward) == (512, 96, 16, 2 * 4096)
    assert stage1_batch(paper, 4096, world=2).micro_batch_size == 16  # 48 per rank: 16 divides it
    assert stage1_batch(attrs.evolve(paper, stage1_batch_size=8), 4096).micro_batch_size == 8  # capped at the batch
    odd = attrs.evolve(paper, stage1_batch_size=12, batch_size=10, micro_batch_size=5, stage1_seq_len=0)  # 5 blocks per forward
    assert stage1_batch(odd, 512).micro_batch_size == 4  # lowered to a divisor of 12
    assert stage1_batch(odd, 512, world=2).micro_batch_size == 3  # ... of the 6 per rank
    assert stage1_batch(attrs.evolve(paper, stage1_micro_batch_size=32), 4096).micro_batch_size == 32  # explicit wins
    assert stage1_batch(attrs.evolve(paper, stage1_micro_batch_size=96), 4096, world=2).micro_batch_size == 48


def test_defaults_keep_the_old_stage_1_batch():
    cfg = DistillConfig(batch_size=16, micro_batch_size=4)
    s1 = stage1_batch(cfg, 256)  # stage1_seq_len 0 and seq 256: stage 1 runs on the same blocks as stage 2
    assert (s1.seq_len, s1.batch_size, s1.micro_batch_size) == (256, 16, 4)
    assert stage1_batch(DistillConfig(batch_size=16), 2048).seq_len == 512  # the paper's 512 when seq is a multiple


def test_bad_stage_1_batches_name_the_field():
    with pytest.raises(ConfigError, match=r"distill field 'stage1_micro_batch_size' must divide stage1_batch_size=96; got 7 \(0 = auto\)"):
        DistillConfig(stage1_batch_size=96, stage1_micro_batch_size=7)
    with pytest.raises(ConfigError, match=r"must divide stage1_batch_size \(0: batch_size\)=16; got 3"):
        DistillConfig(batch_size=16, stage1_micro_batch_size=3)
    with pytest.raises(ConfigError, match=r"distill field 'stage1_batch_size' must be divisible by the number of processes \(2\); got 95"):
        stage1_batch(DistillConfig(stage1_batch_size=95), 4096, world=2)
    with pytest.raises(ConfigError, match=r"'stage1_micro_batch_size' must divide the stage-1 batch / processes = 96 / 2 = 48; got 32"):
        stage1_batch(DistillConfig(stage1_batch_size=96, stage1_micro_batch_size=32), 4096, world=2)


def test_run_config_reports_the_stage_1_field(files):
    from hybridize.recipes.runconfig import run_config_from_dict

    tree = base(files)
    tree["distill"] = {**tree["distill"], "stage1_batch_size": 6, "stage1_micro_batch_size": 4}
    with pytest.raises(ConfigError, match="distill field 'stage1_micro_batch_size' must divide stage1_batch_size=6; got 4"):
        run_config_from_dict(tree)
    tree["distill"] = {**tree["distill"], "stage1_batch_size": -1, "stage1_micro_batch_size": 0}
    with pytest.raises(ConfigError) as exc:
        run_config_from_dict(tree)
    assert "stage1_batch_size" in str(exc.value) and ">= 0" in str(exc.value) and "\n" not in str(exc.value)


# -- numerics ---------------------------------------------------------------------------------------------------
def test_micro_batches_give_the_gradient_of_one_big_batch():
    teacher = tiny_model("llama", n_layer=3, seed=1)
    torch.manual_seed(0)
    modules = linear_modules(build_student(teacher, [1], "gdn"))
    ids = torch.randint(3, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    params = [p for m in modules.values() for p in m.parameters()]

    def grads(parts: int) -> tuple[float, list[torch.Tensor]]:
        total = 0.0
        for chunk in ids.chunk(parts):
            loss = torch.stack(list(alignment_losses(teacher, modules, chunk).values())).mean() / parts
            loss.backward()
            total += float(loss.detach())
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return total, out

    (big, g_big), (small, g_small) = grads(1), grads(4)
    assert small == pytest.approx(big, rel=1e-5)
    for a, b in zip(g_big, g_small):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _stage1(data, ckpt=None, on_step=None, **distill):
    teacher = tiny_model("llama", n_layer=3, seed=1)
    torch.manual_seed(0)
    student = build_student(teacher, [1], "gdn")
    cfg = DistillConfig(stage1_tokens=16 * 8 * 3, stage2_tokens=0, batch_size=2, eval_blocks=2, stage1_seq_len=16,
                        checkpoint_every=1, stage1_lr=3e-3, **distill)
    d = Distiller(teacher=teacher, data=data, cfg=cfg, device=torch.device("cpu"), ckpt_dir=ckpt, progress=False,
                  on_step=on_step)
    hist = d.stage1(student)
    return {n: p.detach().clone() for n, p in student.named_parameters()}, hist, d


def test_stage_1_micro_batches_train_like_one_batch_and_count_tokens(data):
    one, hist_one, d_one = _stage1(data, stage1_batch_size=8, stage1_micro_batch_size=8)
    split, hist_split, d_split = _stage1(data, stage1_batch_size=8, stage1_micro_batch_size=2)
    auto, _, d_auto = _stage1(data, stage1_batch_size=8)  # auto: stage 2's 2 x 32 tokens = 4 blocks of 16 per forward
    assert stage1_batch(d_auto.cfg, data.seq_len).micro_batch_size == 4
    for n in one:
        torch.testing.assert_close(one[n], split[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(one[n], auto[n], rtol=1e-4, atol=1e-6, msg=n)
    assert hist_one[-1]["heldout_kl"] == pytest.approx(hist_split[-1]["heldout_kl"], rel=1e-4)
    # 3 steps of 8 blocks x 16 tokens, whatever the micro-batch; the teacher ran on every one of them
    assert d_one.tokens["stage1"] == d_split.tokens["stage1"] == d_auto.tokens["stage1"] == 3 * 8 * 16
    assert d_split.tokens["teacher_forward"] == 3 * 8 * 16
    assert d_split.phases["stage1"]["tokens"] == 3 * 8 * 16 and d_split.phases["stage1"]["seconds"] > 0


class Crash(Exception):
    pass


def test_a_killed_stage_1_with_its_own_batch_resumes_exactly(tmp_path, data):
    ref, _, _ = _stage1(data, tmp_path / "a", stage1_batch_size=8, stage1_micro_batch_size=2)

    def crash(stage, step, tokens, metrics):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        _stage1(data, tmp_path / "b", crash, stage1_batch_size=8, stage1_micro_batch_size=2)
    state = torch.load(tmp_path / "b" / "stage1.pt", weights_only=True)
    assert (state["step"], state["tokens"]) == (2, 2 * 8 * 16)
    resumed, _, d = _stage1(data, tmp_path / "b", stage1_batch_size=8, stage1_micro_batch_size=2)
    assert d.tokens["stage1"] == 3 * 8 * 16 and d.phases["stage1"]["tokens"] == 8 * 16  # one step after the resume
    for n in ref:
        assert torch.equal(ref[n], resumed[n]), n


# -- the plan and --resume --------------------------------------------------------------------------------------
def test_the_plan_takes_the_larger_tokens_per_forward(files, pm):
    from hybridize.recipes.plan import forward_tokens, plan_run
    from hybridize.recipes.runconfig import run_config_from_dict

    tree = base(files)
    tree["data"]["seq_len"] = 32
    tree["distill"] = {**tree["distill"], "stage1_seq_len": 16, "stage1_batch_size": 8}
    small = run_config_from_dict(tree, pm=pm)
    assert forward_tokens(small) == {"stage2": 2 * 32, "stage1": 4 * 16}  # auto: stage 2's 64 tokens per forward
    tree["distill"]["stage1_micro_batch_size"] = 8
    big = run_config_from_dict(tree, pm=pm)
    assert forward_tokens(big) == {"stage2": 64, "stage1": 128}
    a, b = (plan_run(c, pm, device="cpu", check=False) for c in (small, big))
    assert b.memory["activations"] > a.memory["activations"]
    assert (a.activation_field, b.activation_field) == ("distill.micro_batch_size", "distill.stage1_micro_batch_size")


def test_resume_accepts_a_run_recorded_before_the_stage_1_batch_fields(tmp_path, files):
    from hybridize.recipes.resume import check_resume_config
    from hybridize.recipes.runconfig import run_config_from_dict

    config = run_config_from_dict(base(files)).to_dict()
    old = json.loads(json.dumps(config, default=str))
    for key in ("stage1_batch_size", "stage1_micro_batch_size"):
        del old["distill"][key]
    (tmp_path / "run-config.json").write_text(json.dumps(old))
    assert check_resume_config(tmp_path, config) == []
    changed = json.loads(json.dumps(config, default=str))
    changed["distill"]["stage1_batch_size"] = 8
    with pytest.raises(Exception, match="distill.stage1_batch_size"):
        check_resume_config(tmp_path, changed)


def test_result_json_records_the_wall_time_and_tokens_of_each_phase(tmp_path, files):
    import yaml

    from hybridize.cli import main

    tree = base(files)
    tree["selection"] = {"selector": "kl-greedy-add", "stop": "fixed-budget", "probe_tokens": 32}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    phases, tokens = result["phases"], result["tokens"]
    assert set(phases) == {"stage1", "probes", "stage2"}
    assert (phases["stage1"]["tokens"], phases["probes"]["tokens"], phases["stage2"]["tokens"]) == \
        (tokens["stage1"], tokens["probes"], tokens["stage2"])
    assert all(p["seconds"] > 0 for p in phases.values())
    assert sum(p["seconds"] for p in phases.values()) <= result["wall_seconds"] + 0.1


def test_nproc_refuses_a_stage_1_batch_that_does_not_split_before_launching(tmp_path, files, capsys):
    import yaml

    from hybridize.cli import main

    tree = base(files)
    tree["distill"] = {**tree["distill"], "stage1_batch_size": 5}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["distill", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--nproc", "2"]) == 2
    assert "distill field 'stage1_batch_size' must be divisible by the number of processes (2); got 5" in capsys.readouterr().err
