"""End-to-end check of ``hybridize run --nproc N`` on GPUs (NCCL) against one GPU: selection, DDP, FSDP2.

A tiny random Llama teacher (6 layers) and a small synthetic corpus are written to a temporary
directory; the same config then runs three times:

- ``one``: one GPU;
- ``ddp``: ``--nproc N``: probes over N ranks, stage 1 and the final distillation data parallel (DDP);
- ``fsdp``: ``--nproc N --set distill.parallel=fsdp``: the final stages with FSDP2 (``fully_shard``).

It checks that the N-GPU runs select the same layers as one GPU, that scores and the final
held-out KL agree within ``--rtol`` (bf16 on GPU, gradients reduced in another order), that
result.json records the distribution, and that each rank wrote its own probe checkpoints; it prints
a table, writes JSON and exits 1 if a check fails. About 2 minutes on 2 GPUs.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python bench/multigpu_check.py --nproc 2
    python bench/multigpu_check.py --nproc 2 --device cpu       # the same on CPU processes (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve()
TEXT = "\n\n".join(f"record {i}: key {chr(97 + i % 26)}{chr(97 + (7 * i) % 26)} has value {i % 10}; "
                   f"again {chr(97 + i % 26)}{chr(97 + (7 * i) % 26)} is {i % 10}." for i in range(400))


def config(root: Path, device: str) -> Path:
    from hybridize.testing.models import save_tiny_teacher

    (root / "corpus.txt").write_text(TEXT)
    teacher = save_tiny_teacher(root / "teacher", n_layer=6, d=64, heads=4, kv_heads=2, seed=3)
    cfg = {"teacher": str(teacher), "data": {"train": str(root / "corpus.txt"), "seq_len": 32}, "device": device,
           "linear_attention": {"name": "gdn"}, "softmax_layers": 2, "seed": 0,
           "selection": {"selector": {"name": "kl-greedy-add"}, "stop": {"name": "fixed-budget"}, "probe_tokens": 1024,
                         "eval_every": 2},
           "distill": {"stage1_tokens": 512, "stage2_tokens": 1024, "batch_size": 8, "eval_blocks": 4, "checkpoint_every": 2,
                       "stage1_lr": 3e-3, "stage2_lr_attn": 1e-3, "stage2_lr_other": 1e-4}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: Path, out: Path, extra: list[str], timeout: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "hybridize", "run", str(cfg), "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out / "result.json").read_text()), time.perf_counter() - t0


def compare(name: str, ref: dict, got: dict, out: Path, nproc: int, rtol: float) -> dict:
    raw = {l: abs(got["raw_scores"][l] - v) / max(abs(v), 1e-12) for l, v in ref["raw_scores"].items()}
    kl = abs(got["metrics"]["heldout_kl"] - ref["metrics"]["heldout_kl"]) / ref["metrics"]["heldout_kl"]
    ranks = sorted(p.name for p in (out / "checkpoints" / "selection").glob("rank*-of-*"))
    checks = {
        "same_layers": got["softmax_layers"] == ref["softmax_layers"],
        "same_top_k_every_window": [w["top_k"] for w in got["selection"]["trajectory"]] == [w["top_k"] for w in ref["selection"]["trajectory"]],
        "scores_within_rtol": max(raw.values()) <= rtol,
        "heldout_kl_within_rtol": kl <= rtol,
        "same_tokens": got["tokens"] == ref["tokens"],
        "per_rank_probe_checkpoints": ranks == [f"rank{r}-of-{nproc}" for r in range(nproc)],
    }
    return {"run": name, "distributed": got.get("distributed"), "softmax_layers": got["softmax_layers"],
            "max_rel_score_diff": max(raw.values()), "rel_heldout_kl_diff": kl, "checks": checks, "ok": all(checks.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rtol", type=float, default=0.02, help="relative tolerance of scores and held-out KL vs one process")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/multigpu_check_<device>.json)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = config(root, args.device)
        one, t_one = run(cfg, root / "one", [], args.timeout)
        rows = [{"run": "one", "softmax_layers": one["softmax_layers"], "seconds": t_one, "ok": True}]
        for name, extra in (("ddp", ["--set", "distill.parallel=ddp"]), ("fsdp", ["--set", "distill.parallel=fsdp"])):
            got, secs = run(cfg, root / name, ["--nproc", str(args.nproc), *extra], args.timeout)
            rows.append({**compare(name, one, got, root / name, args.nproc, args.rtol), "seconds": secs})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"{gpu}, torch {torch.__version__}, {args.nproc} processes vs 1")
    print("| run | layers | final distillation | max rel score diff | rel held-out KL diff | s | checks |\n|---|---|---|---|---|---|---|")
    for r in rows:
        failed = [k for k, v in r.get("checks", {}).items() if not v]
        print(f"| {r['run']} | {r['softmax_layers']} | {(r.get('distributed') or {}).get('final_distillation', '-')} | "
              f"{r.get('max_rel_score_diff', 0):.2e} | {r.get('rel_heldout_kl_diff', 0):.2e} | {r['seconds']:.0f} | "
              f"{'ok' if not failed else 'FAILED: ' + ', '.join(failed)} |")
    tag = "cpu" if gpu == "cpu" else gpu.lower().replace("nvidia ", "").split()[0]
    out = Path(args.out or HERE.parent / "results" / f"multigpu_check_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
