"""Probes per hour of a kl-greedy-add selection on 1 vs N processes (torch.distributed, one GPU each).

Each measurement is a real torchrun job (``python -m torch.distributed.run --standalone``) running
:class:`hybridize.selection.engine.SelectionEngine` exactly as ``hybridize run --nproc N`` does: probe i on
rank i mod N, every rank running the teacher once per batch for its own probes, scores all-gathered
after every evaluation window. The teacher is a random-weight Llama of ``--size`` (``sel12``: 12
layers, d=768, 32 x 64 heads, GQA 8, vocab 32k, 12 probes; bf16 on CUDA) on random-token data.
The linear layers use fla's kernels when fla imports, else the pure-torch chunked form (recorded).

Metric: **probes/hour** = 3600 x n_probes / (t_window x 20), where t_window is the mean wall time
of one steady-state evaluation window (``--window`` probe steps of every probe on ``--batch`` x
``--seq`` tokens, the teacher passes, the held-out scoring of every probe and the all-gather) and
20 is the number of windows the engine gives one probe by default (``selection.eval_every`` = 0):
how many such probes, each ``20 x window x batch x seq`` tokens long, one selection finishes per
hour. The first window (kernel autotuning, ``torch.compile`` of the fused KL) is not timed, nor is
stage 1; each window's in-memory probe checkpoint (the NaN guard's restart point; no files are
written) is. Speed-up = probes/hour on N / on 1 (goal >= 1.8x on 2). ``max_rel_score_diff_vs_1``
compares the final raw scores with the 1-process run's (random weights: near-tied layers, so the
selected set itself may differ by noise).

    # 2 GPUs (about 3-4 minutes for both measurements)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python bench/probes_multigpu.py --nprocs 1,2
    # CPU smoke test, 2 gloo processes (about 45 s on 2 cores)
    OMP_NUM_THREADS=1 python bench/probes_multigpu.py --device cpu --size tiny12 --seq 64 --batch 4 --nprocs 1,2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import perf_common as pc

HERE = Path(__file__).resolve()
WINDOWS_PER_PROBE = 20  # SelectionConfig.eval_every = 0 gives a probe about 20 evaluation windows


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", default="1,2", help="comma-separated process counts to measure (default 1,2)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu (gloo)")
    ap.add_argument("--size", default=None, help="teacher size from bench/perf_common.py (default sel12 on CUDA, tiny12 on CPU)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per block")
    ap.add_argument("--batch", type=int, default=8, help="blocks per probe step")
    ap.add_argument("--micro", type=int, default=0, help="blocks per forward (0 = --batch)")
    ap.add_argument("--window", type=int, default=2, help="probe steps per evaluation window")
    ap.add_argument("--windows", type=int, default=4, help="windows to run (the first is not timed)")
    ap.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks each probe is scored on per window")
    ap.add_argument("--group", type=int, default=0, help="selection.probe_group_size (0 = all of a rank's probes together)")
    ap.add_argument("--timeout", type=int, default=280, help="seconds one measurement may take")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/probes_multigpu_<device>.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a torchrun worker: rank 0 writes JSON here
    args = ap.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.size = args.size or ("sel12" if cuda else "tiny12")
    if args.windows < 3:
        ap.error("--windows must be >= 3 (the first window is not timed and the mean needs two more)")
    return args


# -- one torchrun worker -------------------------------------------------------------------------------------
def make_data(vocab: int, n_train: int, n_heldout: int, seq: int) -> Any:
    """Random-token blocks (the throughput does not depend on the text)."""
    from hybridize.training.data import PackedData

    g = torch.Generator().manual_seed(0)
    train, heldout = torch.randint(0, vocab, (n_train, seq), generator=g), torch.randint(0, vocab, (n_heldout, seq), generator=g)
    return PackedData(train=train, heldout=heldout, n_documents=n_train + n_heldout, n_tokens=(n_train + n_heldout) * seq)


def worker(args: argparse.Namespace) -> None:
    from hybridize.training import parallel as distributed
    from hybridize.registry.configs import ComponentRef
    from hybridize.distill.stages import DistillConfig
    from hybridize.ops.common import fla_available
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.selection.engine import SelectionConfig, SelectionEngine
    from hybridize.selection.fanout import probes_per_rank

    par = distributed.setup(args.device)
    dtype = torch.bfloat16 if par.device.type == "cuda" else torch.float32
    teacher = pc.random_teacher(args.size, par.device, dtype)
    n_layers = teacher.config.num_hidden_layers
    data = make_data(teacher.config.vocab_size, 64 * args.batch, args.eval_blocks, args.seq)
    steps = args.window * args.windows
    distill = DistillConfig(stage1_tokens=args.batch * args.seq, stage2_tokens=0, batch_size=args.batch,
                            micro_batch_size=args.micro, eval_blocks=args.eval_blocks, checkpoint_every=0)
    cfg = SelectionConfig(selector=ComponentRef(name="kl-greedy-add"), stop=ComponentRef(name="fixed-budget"),
                          probe_tokens=steps * args.batch * args.seq, eval_every=args.window, probe_group_size=args.group)
    stamps: list[float] = []

    def on_window(_: dict[str, Any]) -> None:
        pc.sync(par.device)
        stamps.append(time.perf_counter())

    engine = SelectionEngine(teacher=teacher, data=data, cfg=cfg, distill=distill, variant=ComponentRef(name="gdn"),
                             pm=get_plugin_manager(), device=par.device, k=max(1, n_layers // 4), ckpt_dir=None, seed=0,
                             progress=False, on_window=on_window, dist=par)
    pc.reset_peak(par.device)
    result = engine.run()
    peak = par.all_gather(pc.peak_gib(par.device))
    if par.is_main:
        t_window = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        record = {"nproc": par.world, "backend": par.backend or "none", "n_layers": n_layers, "n_probes": result["tokens"]["n_probes"],
                  "probes_per_rank": probes_per_rank(result["tokens"]["n_probes"], par.world),
                  "window_seconds": [b - a for a, b in zip(stamps, stamps[1:])], "t_window": t_window,
                  "probes_per_hour": 3600 * result["tokens"]["n_probes"] / (t_window * WINDOWS_PER_PROBE),
                  "probe_tokens_per_s": result["tokens"]["n_probes"] * args.window * args.batch * args.seq / t_window,
                  "peak_gib_per_rank": peak, "linear_backend": "fla" if fla_available() else "torch",
                  "softmax_layers": result["softmax_layers"], "raw_scores": result["raw_scores"],
                  "environment": pc.environment(par.device)}
        Path(args.worker).write_text(json.dumps(record, indent=1, default=str))
    distributed.teardown(par)


# -- the driver: one torchrun job per process count --------------------------------------------------------------
def measure(args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        argv = [a for a in sys.argv[1:]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(HERE),
               *argv, "--worker", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the lent H200 machines need it)
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"the {nproc}-process run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        record = json.loads(out.read_text())
        record["job_seconds"] = time.perf_counter() - t0
        return record


def main() -> None:
    args = parse()
    if args.worker:
        return worker(args)
    counts = [int(n) for n in args.nprocs.split(",")]
    rows = [measure(args, n) for n in counts]
    base = next((r for r in rows if r["nproc"] == 1), rows[0])
    for r in rows:
        r["speedup"] = r["probes_per_hour"] / base["probes_per_hour"]
        common = set(r["raw_scores"]) & set(base["raw_scores"])
        r["max_rel_score_diff_vs_1"] = max((abs(r["raw_scores"][l] - base["raw_scores"][l]) / max(abs(base["raw_scores"][l]), 1e-12)
                                            for l in common), default=math.nan)
    env = rows[-1]["environment"]
    print(f"{env.get('gpu', env['device'])}, torch {env['torch']}; teacher {args.size} ({base['n_layers']} layers, "
          f"{base['n_probes']} probes), {args.batch} x {args.seq} tokens per probe step, {args.window} steps per window, "
          f"linear layers: {base['linear_backend']}")
    keys = ["nproc", "probes_per_rank", "t_window", "probes_per_hour", "speedup", "probe_tokens_per_s", "peak_gib_per_rank",
            "max_rel_score_diff_vs_1", "job_seconds"]
    print(pc.table(rows, keys))
    tag = env.get("gpu", "cpu").lower().replace("nvidia ", "").split()[0] if "gpu" in env else "cpu"
    out = Path(args.out or HERE.parent / "results" / f"probes_multigpu_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "windows_per_probe": WINDOWS_PER_PROBE,
                               "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
