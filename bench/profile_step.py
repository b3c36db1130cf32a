"""Where one stage-2 training step's time goes on the GPU: teacher forward, student forward, the whole step.

A stage-2 step (also a selection probe's step) is a teacher forward, a student forward and backward through the
chunked KL, gradient clipping and a fused AdamW step. For a small model the GPU's arithmetic is a few
milliseconds and the step is bound by the host: kernel launches, Python, synchronisations. This script measures
the step's pieces side by side on one teacher shape (random weights; ``recall_teacher.py``'s presets or explicit
sizes), for the hybrid and for an all-softmax student of the same shape, and profiles the hybrid's step
(torch.profiler: CUDA kernels per step, GPU-busy time against wall time, the top operators by GPU time and by
host time), then writes JSON:

    python bench/profile_step.py --preset recall12 --softmax 0,2,5 --out bench/results/profile_step_recall12_h200.json

Rows: median milliseconds over ``--steps`` steps (each synchronised), tokens/s, and for the profiled step the
kernel count and GPU-busy fraction. CUDA only (it says so and exits 2 elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="recall12", help="recall_teacher.py preset for the shape")
    p.add_argument("--softmax", default="0,2,5", help="softmax layers of the hybrid (comma separated)")
    p.add_argument("--variant", default="gdn")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="", help="JSON path (stdout only when empty)")
    p.add_argument("--forward-only", action="store_true",
                   help="forwards only (fla's forward kernels run on triton 3.6, its gated backward needs 3.7 on Hopper)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (tiny shapes, no GPU rows)")
    return p.parse_args(argv)


def _device_time(e: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, name):
            return float(getattr(e, name))
    return 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print("profile_step.py: needs a CUDA GPU (none here); --device cpu only checks the script", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    import hybridize.ops.common as common
    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import ATTN_IMPLEMENTATION
    from hybridize.training.losses import chunked_kl
    from hybridize.training.loop import autocast_for
    from recall_teacher import PRESETS

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    s = PRESETS[args.preset]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      head_dim=s["hidden"] // s["heads"], max_position_embeddings=max(args.seq, s["seq"]),
                      tie_word_embeddings=True, attn_implementation=ATTN_IMPLEMENTATION)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    softmax = [int(x) for x in args.softmax.split(",") if x != ""]
    hybrid = build_student(teacher, softmax, args.variant).to(dev).train()
    plain = build_student(teacher, list(range(cfg.num_hidden_layers)), args.variant).to(dev).train()
    teacher.to(dev)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    tokens = ids.numel()

    def step_fn(student: torch.nn.Module) -> Callable[[], None]:
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, fused=dev.type == "cuda")

        def step() -> None:
            with autocast_for(dev):
                with torch.no_grad():
                    h_t = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
                h_s = student.model(input_ids=ids, use_cache=False).last_hidden_state
                loss = chunked_kl(h_s, h_t, student.lm_head, teacher.lm_head, temperature=1.0, chunk_tokens=1024)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def forward_fn(model: torch.nn.Module) -> Callable[[], None]:
        def fwd() -> None:
            with torch.no_grad(), autocast_for(dev):
                model.model(input_ids=ids, use_cache=False)

        return fwd

    def timed(fn: Callable[[], None]) -> dict[str, float]:
        for _ in range(args.warmup):
            fn()
        sync()
        ms = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            sync()
            ms.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(ms)
        return {"median_ms": round(med, 2), "min_ms": round(min(ms), 2), "tokens_per_s": round(tokens / med * 1e3)}

    rows: dict[str, dict[str, float]] = {}
    cases: list[tuple[str, Callable[[], None]]] = [
        ("teacher forward", forward_fn(teacher)),
        ("hybrid forward", forward_fn(hybrid)),
        ("all-softmax student forward", forward_fn(plain)),
        ("hybrid stage-2 step", step_fn(hybrid)),
        ("all-softmax student stage-2 step", step_fn(plain)),
    ]
    if args.forward_only:
        cases = cases[:3]
    for name, fn in cases:
        t0 = time.perf_counter()
        rows[name] = timed(fn)
        rows[name]["first_call_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"case": name, **rows[name]}), flush=True)
    aux = common.FLA_AUX_KERNELS
    common.FLA_AUX_KERNELS = False
    name = "hybrid forward, torch conv / norm" if args.forward_only else "hybrid stage-2 step, torch conv / norm"
    rows[name] = timed(forward_fn(hybrid) if args.forward_only else step_fn(hybrid))
    common.FLA_AUX_KERNELS = aux
    print(json.dumps({"case": name, **rows[name]}), flush=True)

    from torch.profiler import ProfilerActivity, profile

    step = forward_fn(hybrid) if args.forward_only else step_fn(hybrid)
    step()
    sync()
    n = 3
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(float(getattr(e, "device_time", getattr(e, "cuda_time", 0.0))) for e in kernels) / 1e3 / n
    averages = prof.key_averages()
    by_gpu = sorted(averages, key=_device_time, reverse=True)[:20]
    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    profiled = {
        "wall_ms_per_step_profiled": round(wall_ms, 2),
        "cuda_kernels_per_step": round(len(kernels) / n),
        "gpu_busy_ms_per_step": round(busy_ms, 2),
        "top_by_gpu_time": [{"name": e.key, "calls_per_step": round(e.count / n, 1), "gpu_ms_per_step": round(_device_time(e) / 1e3 / n, 3)} for e in by_gpu],
        "top_by_host_time": [{"name": e.key, "calls_per_step": round(e.count / n, 1), "host_ms_per_step": round(e.self_cpu_time_total / 1e3 / n, 3)} for e in by_cpu],
    }
    record = {"args": vars(args), "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "tokens_per_step": tokens, "rows": rows, "profile": profiled}
    print(f"\n| case ({args.batch} x {args.seq} tokens, {record['gpu']}) | median ms | tokens/s |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_ms']} | {r['tokens_per_s']:,} |")
    print(f"\nprofiled hybrid {'forward' if args.forward_only else 'step'}: {profiled['wall_ms_per_step_profiled']} ms wall, {profiled['cuda_kernels_per_step']} kernels, "
          f"GPU busy {profiled['gpu_busy_ms_per_step']} ms")
    for e in profiled["top_by_gpu_time"][:12]:
        print(f"  gpu  {e['gpu_ms_per_step']:8.3f} ms  x{e['calls_per_step']:<7} {e['name'][:90]}")
    for e in profiled["top_by_host_time"][:12]:
        print(f"  host {e['host_ms_per_step']:8.3f} ms  x{e['calls_per_step']:<7} {e['name'][:90]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
