"""Two CPU processes on gloo give what one process gives: the same selection, per-rank resume, DDP / FSDP2 distillation.

The ranks are forked from the test process (no re-import of torch and transformers), join a gloo
process group through a file store (no port to pick), run with one torch thread each, and hand
their results back through a queue; a rank that fails or hangs fails the test with its traceback.
``test_cli_nproc_2_equals_one_process`` runs the real launcher: ``hybridize run --nproc 2``
through torchrun (``--standalone`` picks a free port).
"""
from __future__ import annotations

import datetime
import io
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import yaml

from hybridize.registry.configs import ComponentRef
from hybridize.training.data import DataConfig, prepare_data
from hybridize.distill.stages import DistillConfig, Distiller
from hybridize.selection.fanout import ProbeCheckpoints, probes_per_rank
from hybridize.training.launcher import check_nproc, strip_nproc
from hybridize.training.parallel import Dist, check_batch
from hybridize.errors import ConfigError
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.engine import ProbeDivergedWarning, SelectionConfig, SelectionEngine
from hybridize.model.surgery import build_student
from hybridize.testing.models import save_tiny_teacher, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not torch.distributed.is_available(),
                                reason="forks its ranks (POSIX) and needs torch.distributed with gloo")

TEXT = "\n\n".join(
    f"record {i}: key {chr(97 + i % 26)}{chr(97 + (3 * i) % 26)} has value {i % 10}. again, {chr(97 + i % 26)}{chr(97 + (3 * i) % 26)} is {i % 10}."
    for i in range(120)
)
DISTILL = DistillConfig(stage1_tokens=512, stage2_tokens=0, batch_size=4, eval_blocks=4, stage1_lr=3e-3,
                        stage2_lr_attn=3e-3, stage2_lr_other=1e-3, checkpoint_every=2)
TIMEOUT_S = 120


# -- running ranks --------------------------------------------------------------------------------------------
def _rank_main(fn, rank: int, world: int, store: str, results, kwargs: dict) -> None:
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=TIMEOUT_S))
        out = fn(Dist(rank=rank, world=world, backend="gloo"), **kwargs)
        torch.distributed.destroy_process_group()
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not tensors: a queue would share tensor storage that dies with this process
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the test
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(tmp_path, fn, world: int = 2, **kwargs) -> list:
    """``fn(par, **kwargs)`` on ``world`` forked gloo ranks; their results in rank order."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    store = tmp_path / f"store-{fn.__name__}-{len(list(tmp_path.glob('store-*')))}"
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, str(store), results, kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=TIMEOUT_S)
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{value}")
            got[rank] = torch.load(io.BytesIO(value), weights_only=True)
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(world)) - set(got))} did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def data(corpus):
    return prepare_data(DataConfig(train=str(corpus), seq_len=16, heldout_fraction=0.1), tiny_tokenizer(), seed=0)


def one_layer_teacher(informative: int = 2, n_layer: int = 4):
    """A teacher in which only one layer's attention reaches the residual stream (a clear selection)."""
    teacher = tiny_model("llama", n_layer=n_layer, seed=1)
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            layer.self_attn.o_proj.weight.mul_(4.0 if i == informative else 0.05)
    return teacher


def _engine(par, data, ckpt=None, on_window=None, probe_tokens=320, n_layer=4, distill=DISTILL):
    cfg = SelectionConfig(selector=ComponentRef(name="kl-greedy-add"), stop=ComponentRef(name="fixed-budget"),
                          probe_tokens=probe_tokens, eval_every=1)
    return SelectionEngine(teacher=one_layer_teacher(n_layer // 2, n_layer), data=data, cfg=cfg, distill=distill, variant=ComponentRef(name="gdn"),
                           pm=get_plugin_manager(), device=torch.device("cpu"), k=1, ckpt_dir=ckpt, seed=0, progress=False,
                           on_window=on_window, dist=par)


def _select(par, data, ckpt=None, crash_at=None, n_layer=4, batch_size=4):
    def crash(window):
        if window["step"] == crash_at:
            raise KeyboardInterrupt("killed")  # not an Exception: nothing on the way catches it

    import attrs

    distill = attrs.evolve(DISTILL, batch_size=batch_size)
    engine = _engine(par, data, ckpt, on_window=crash if crash_at else None, n_layer=n_layer, distill=distill)
    try:
        result = engine.run()
    except KeyboardInterrupt:
        return "killed"
    return {k: result[k] for k in ("softmax_layers", "ranking", "raw_scores", "trajectory", "tokens", "probe_status")}


def assert_same_selection(a: dict, b: dict, *, exact: bool) -> None:
    """Same layers, ranking and top-K at every window; raw scores equal (``exact``) or within float reduction order."""
    assert a["softmax_layers"] == b["softmax_layers"] and a["ranking"] == b["ranking"]
    assert [w["top_k"] for w in a["trajectory"]] == [w["top_k"] for w in b["trajectory"]]
    for wa, wb in zip(a["trajectory"], b["trajectory"]):
        assert set(wa["raw"]) == set(wb["raw"])
        for layer in wa["raw"]:
            if exact:
                assert wa["raw"][layer] == wb["raw"][layer], (wa["step"], layer)
            else:
                assert math.isclose(wa["raw"][layer], wb["raw"][layer], rel_tol=1e-4, abs_tol=1e-6), (wa["step"], layer)
    assert a["tokens"] == b["tokens"]


# -- the selection --------------------------------------------------------------------------------------------------
def test_two_ranks_select_the_same_layers_as_one_process(tmp_path, data):
    one = _select(None, data)
    two = run_ranks(tmp_path, _select, data=data, ckpt=tmp_path / "ckpt")
    assert one["softmax_layers"] == [2]
    assert_same_selection(two[0], two[1], exact=True)  # every rank holds the gathered result
    # stage 1 ran data parallel (gradients summed in another order), so scores agree to float tolerance
    assert_same_selection(one, two[0], exact=False)
    sel = tmp_path / "ckpt"
    assert sorted(p.name for p in sel.glob("rank*-of-2/probes-*.pt")) == ["probes-00000005.pt"] * 2  # older windows pruned
    assert not (sel / "probes.pt").exists() and (sel / "stage1.pt").exists()
    assert set(torch.load(sel / "rank1-of-2" / "probes-00000005.pt", weights_only=True)["probes"]) == {1, 3}  # probes 1, 3 of 0..3


def test_a_killed_two_rank_selection_resumes_per_rank_and_on_one_process(tmp_path, data):
    ref = run_ranks(tmp_path, _select, data=data, ckpt=tmp_path / "ref")[0]
    assert run_ranks(tmp_path, _select, data=data, ckpt=tmp_path / "a", crash_at=3) == ["killed", "killed"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = run_ranks(tmp_path, _select, data=data, ckpt=tmp_path / "a")
    assert_same_selection(resumed[0], ref, exact=True)
    # the same checkpoints continue on one process: each probe is read from the rank file that holds it
    single = _select(None, data, ckpt=tmp_path / "b")
    assert_same_selection(single, ref, exact=True)
    assert (tmp_path / "b" / "probes.pt").exists() and not list((tmp_path / "b").glob("rank*-of-*"))


def test_a_diverged_probe_is_retried_from_its_rank_checkpoint_and_failed_on_every_rank(tmp_path, data, monkeypatch):
    """Layer 2's probe (rank 0's) is NaN at every step: retried from rank 0's file, then failed; rank 1 learns it too."""
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@2:1+")
    with pytest.warns(ProbeDivergedWarning, match="probe of layer 2 (diverged|failed)"):
        one = _select(None, data, ckpt=tmp_path / "one")
    two = run_ranks(tmp_path, _select, data=data, ckpt=tmp_path / "two")
    assert one["probe_status"][2]["status"] == "failed"
    for rank in two:
        assert rank["probe_status"] == one["probe_status"] and 2 not in rank["ranking"]
        assert_same_selection(one, rank, exact=False)


def test_more_ranks_than_probes(tmp_path, data):
    """3 ranks, 2 probes: rank 2 trains none (and runs no teacher passes) but joins every gather."""
    one = _select(None, data, n_layer=2, batch_size=6)
    three = run_ranks(tmp_path, _select, world=3, data=data, n_layer=2, batch_size=6)  # stage 1: 2 blocks per rank
    assert one["softmax_layers"] == [1]
    assert_same_selection(three[2], three[0], exact=True)
    assert_same_selection(one, three[2], exact=False)


def _fail_on_main(par):
    from hybridize.errors import HybridizeError, RemoteError

    def boom():
        raise HybridizeError("output directory 'x' already exists")

    try:
        par.on_main(boom)
    except RemoteError as exc:
        return f"RemoteError: {exc}"
    except HybridizeError as exc:
        return f"HybridizeError: {exc}"
    return "no error"


def test_a_failure_on_rank_0_reaches_every_rank(tmp_path):
    assert run_ranks(tmp_path, _fail_on_main) == [
        "HybridizeError: output directory 'x' already exists",
        "RemoteError: rank 0 failed: HybridizeError: output directory 'x' already exists"]


def test_probe_checkpoints_pick_the_newest_step_every_rank_has(tmp_path):
    from hybridize.atomic_io import atomic_torch_save

    def state(step, layers):
        return {"step": step, "probes": {l: {"model": {}, "optimizer": {}, "scheduler": {}} for l in layers}}

    root = tmp_path / "sel"
    atomic_torch_save(state(2, [0, 2]), root / "rank0-of-2" / "probes-00000002.pt")
    atomic_torch_save(state(2, [1, 3]), root / "rank1-of-2" / "probes-00000002.pt")
    atomic_torch_save(state(4, [0, 2]), root / "rank0-of-2" / "probes-00000004.pt")  # rank 1 was killed before step 4
    got = ProbeCheckpoints(root, Dist(rank=1, world=2)).load([0, 1, 2, 3])
    assert got["step"] == 2 and set(got["probes"]) == {1, 3}
    got = ProbeCheckpoints(root, Dist(rank=0, world=3)).load([0, 1, 2, 3])  # three ranks now: rank 0 runs probes 0 and 3
    assert got["step"] == 2 and set(got["probes"]) == {0, 3}


# -- data-parallel distillation ---------------------------------------------------------------------------------------
FINAL = DistillConfig(stage1_tokens=128, stage2_tokens=256, batch_size=4, micro_batch_size=1, eval_blocks=2, eval_every=2,
                      stage1_lr=3e-3, stage2_lr_attn=3e-3, stage2_lr_other=1e-3, checkpoint_every=2)


def _distil(par, data, parallel="ddp", ckpt=None, **distill):
    import attrs

    teacher = tiny_model("llama", n_layer=3, seed=2)
    torch.manual_seed(0)  # the linear layers' fresh parameters, as `hybridize distill` seeds them
    student = build_student(teacher, [1], "gdn", {}, pm=get_plugin_manager())
    d = Distiller(teacher=teacher, data=data, cfg=attrs.evolve(FINAL, parallel=parallel, **distill), device=torch.device("cpu"),
                  ckpt_dir=ckpt, seed=0, progress=False, dist=par)
    report = d.run(student)
    weights = {n: p.detach().clone() for n, p in student.state_dict().items()}
    return {"weights": weights, "metrics": report["metrics"], "tokens": report["tokens"], "used": d.parallel_used}


def _assert_close_run(a: dict, b: dict) -> None:
    assert a["tokens"] == b["tokens"]
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        torch.testing.assert_close(a["weights"][n], b["weights"][n], rtol=1e-4, atol=1e-5, msg=n)
    for key in ("heldout_kl", "heldout_kl_after_stage1", "heldout_kl_after_stage2"):
        assert math.isclose(a["metrics"][key], b["metrics"][key], rel_tol=1e-4), key


def test_ddp_distillation_equals_one_process_with_the_same_global_batch(tmp_path, data):
    one = _distil(None, data)
    two = run_ranks(tmp_path, _distil, data=data, ckpt=tmp_path / "ddp")
    assert two[0]["used"] == "ddp"
    _assert_close_run(two[0], two[1])
    _assert_close_run(one, two[0])
    assert (tmp_path / "ddp" / "stage2.pt").exists()


def test_ddp_stage_1_with_its_own_batch_equals_one_process(tmp_path, data):
    """distill.stage1_batch_size 8 of 8-token blocks, auto micro-batch (2 blocks per rank and forward), 2 ranks."""
    s1 = {"stage1_batch_size": 8, "stage1_seq_len": 8, "stage1_tokens": 192, "stage2_tokens": 0}
    one = _distil(None, data, **s1)
    two = run_ranks(tmp_path, _distil, data=data, ckpt=tmp_path / "s1", **s1)
    assert one["tokens"]["stage1"] == two[0]["tokens"]["stage1"] == 3 * 8 * 8
    for n in one["weights"]:
        torch.testing.assert_close(one["weights"][n], two[0]["weights"][n], rtol=1e-4, atol=1e-5, msg=n)
        assert torch.equal(two[0]["weights"][n], two[1]["weights"][n]), n
    assert math.isclose(one["metrics"]["heldout_kl_after_stage1"], two[0]["metrics"]["heldout_kl_after_stage1"], rel_tol=1e-4)


def test_fsdp2_distillation_on_gloo_equals_one_process_and_resumes(tmp_path, data):
    """FSDP2 (fully_shard) shards student and teacher decoder layers; torch 2.13 runs it on CPU with gloo."""
    one = _distil(None, data)
    two = run_ranks(tmp_path, _distil, data=data, parallel="fsdp", ckpt=tmp_path / "fsdp")
    assert two[0]["used"] == "fsdp"
    _assert_close_run(two[0], two[1])
    _assert_close_run(one, two[0])
    state = torch.load(tmp_path / "fsdp" / "stage2.pt", weights_only=True)
    assert state["fsdp"] and state["step"] == 4
    # the finished checkpoint loads back into a freshly sharded model (whole tensors -> shards): same weights
    again = run_ranks(tmp_path, _distil, data=data, parallel="fsdp", ckpt=tmp_path / "fsdp")
    _assert_close_run(again[0], two[0])


# -- checks and the launcher ------------------------------------------------------------------------------------
def test_batch_must_split_evenly_over_the_ranks():
    par = Dist(rank=0, world=2)
    assert check_batch(8, 8, par) == 4 and check_batch(8, 2, par) == 2 and check_batch(8, 8, Dist()) == 8
    with pytest.raises(ConfigError, match=r"distill field 'batch_size' must be divisible by the number of processes \(2\); got 5"):
        check_batch(5, 5, par)
    with pytest.raises(ConfigError, match=r"micro_batch_size' must divide batch_size / processes = 12 / 2 = 6; got 4"):
        check_batch(12, 4, par)


def test_nproc_errors_are_clear(monkeypatch):
    with pytest.raises(ConfigError, match="--nproc must be >= 1; got 0"):
        check_nproc(0, "cpu")
    check_nproc(2, "cpu")  # CPU processes on gloo: fine anywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError) as exc:
        check_nproc(4, "auto")
    assert str(exc.value) == ("--nproc 4 needs 4 GPUs (one per process) but this machine shows 2; use --nproc 2 or fewer, "
                              "or --set device=cpu to run 4 CPU processes on gloo")
    with pytest.raises(ConfigError, match="run field 'device' must be auto or cuda with --nproc 2 .*; got 'cuda:1'"):
        check_nproc(2, "cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already runs under torchrun, so leave --nproc out"):
        check_nproc(2, "cpu")


def test_nproc_is_stripped_for_the_workers():
    assert strip_nproc(["run", "c.yaml", "--nproc", "2", "--out", "o"]) == ["run", "c.yaml", "--out", "o"]
    assert strip_nproc(["run", "c.yaml", "--nproc=2"]) == ["run", "c.yaml"]
    assert probes_per_rank(5, 2) == [3, 2] and probes_per_rank(1, 3) == [1, 0, 0]


def test_cli_refuses_before_launching(tmp_path, capsys, monkeypatch):
    from hybridize.cli import main

    teacher = save_tiny_teacher(tmp_path / "teacher", n_layer=2)
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"teacher": str(teacher), "data": {"train": str(tmp_path / "c.txt")}, "device": "cpu"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--nproc", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"hybridize: error: output directory {str(tmp_path / 'out')!r} already exists")
    assert main(["distill", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o2"), "--nproc", "0"]) == 2
    assert "--nproc must be >= 1; got 0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o3")]) == 2
    assert "hybridize compare runs on one process; only `run` and `distill` run on several" in capsys.readouterr().err


def test_cli_nproc_2_equals_one_process(tmp_path, corpus):
    """`hybridize run --nproc 2` (torchrun, gloo) writes what one process writes, from rank 0 only."""
    from hybridize.cli import main

    cfg = {"teacher": str(save_tiny_teacher(tmp_path / "teacher", n_layer=4)), "data": {"train": str(corpus), "seq_len": 16},
           "softmax_layers": 1, "device": "cpu", "seed": 1,
           "selection": {"selector": {"name": "kl-greedy-add"}, "stop": {"name": "fixed-budget"}, "probe_tokens": 128, "eval_every": 1},
           "distill": {"stage1_tokens": 128, "stage2_tokens": 128, "batch_size": 4, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hybridize", "run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "two"), "--quiet", "--nproc", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes (gloo): probes per rank [2, 2]; final distillation ddp" in proc.stdout
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert two.pop("distributed") == {"world_size": 2, "backend": "gloo", "probes_per_rank": [2, 2], "final_distillation": "ddp"}
    assert_same_selection({**one, **one["selection"]}, {**two, **two["selection"]}, exact=False)
    assert one["tokens"] == two["tokens"]
    assert math.isclose(one["metrics"]["heldout_kl"], two["metrics"]["heldout_kl"], rel_tol=1e-3)
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "selection").iterdir()) == [
        "hybridize-manifest.json", "rank0-of-2", "rank1-of-2", "stage1.pt"]
    assert not list((tmp_path / "two").rglob(".*tmp*"))
