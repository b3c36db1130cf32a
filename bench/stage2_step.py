"""Stage-2 training step: tokens/s, MFU and a per-phase breakdown, hybrid students vs the teacher.

A random-weight Llama of Llama-3.2-1B's shape (``--size 1b``) in bf16 is the teacher. Each case
trains one student with hybridize's own stage-2 loop (:class:`hybridize.training.loop.Loop` with
:func:`hybridize.distill.stages.stage2_loss`, the same parameter groups, fused AdamW and clipping as
:meth:`hybridize.distill.stages.Distiller.stage2`):

- ``teacher-ce``: the all-softmax teacher fine-tuned with cross-entropy (stage-3 loss, no teacher pass);
- ``teacher``: the all-softmax teacher "distilled" to itself with the stage-2 KL loop;
- ``gdn`` / ``gla``: the hybrid with 25% softmax layers (uniform placement), the rest GDN / GLA.

Cases are named ``VARIANT[+option...]``; options switch this project's optimisations OFF to
measure what they buy: ``kl=checkpoint`` (the recompute-in-backward KL instead of the fused
one), ``klcompile=0`` (the fused KL's elementwise part eager instead of torch.compile-d),
``aux=torch`` (short convolution and gated norm in torch instead of fla's kernels), and ON:
``compile`` (torch.compile of every decoder layer); ``conv=0`` / ``conv=1`` sets the variant's
``use_short_conv`` (GDN's default is 1, GLA's 0).

For each case: the loop's steps/s after warm-up (tokens/s and MFU = model FLOPs / s / 989.4 TFLOP/s,
model FLOPs = student forward+backward + teacher forward, see ``perf_common.flops_per_token``),
peak memory, a breakdown of one step into teacher forward / student forward / loss (KL or CE,
forward and its backward) / student backward / optimizer (each phase synchronised and timed
separately, median of ``--breakdown-steps``) and, with ``--profile``, the top device kernels.

    python bench/stage2_step.py --out bench/results/stage2_step_h100.json                  # H100
    python bench/stage2_step.py --device cpu --size tiny --seq 64 --steps 2 --warmup 1     # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path
from typing import Any

import torch

import perf_common as pc
from hybridize.training import losses
from hybridize.distill.stages import stage2_loss, stage3_loss
from hybridize.ops import common as ops_common
from hybridize.training.loop import Loop, LoopConfig, autocast_for, param_groups

DEFAULT_CASES = ("teacher-ce,teacher,gdn,gla,teacher+kl=checkpoint,gdn+kl=checkpoint+aux=torch,gla+kl=checkpoint+aux=torch,"
                 "gdn+kl=checkpoint,gdn+klcompile=0,gdn+compile")


def parse_case(case: str) -> tuple[str, dict[str, str]]:
    variant, *opts = case.split("+")
    parsed = dict(o.split("=", 1) if "=" in o else (o, "1") for o in opts)
    unknown = set(parsed) - {"kl", "klcompile", "aux", "compile", "conv"}
    if variant not in ("teacher-ce", "teacher", "gdn", "gla") or unknown:
        raise SystemExit(f"stage2_step field 'cases' must be VARIANT[+opt=value...]; got {case!r}")
    return variant, parsed


def build_student(teacher: torch.nn.Module, variant: str, opts: dict[str, str]) -> torch.nn.Module:
    from hybridize.model.surgery import build_student as surgery
    from hybridize.model.teacher import decoder_layers

    n = len(decoder_layers(teacher))
    if variant in ("teacher", "teacher-ce"):
        return surgery(teacher, list(range(n)), "gdn").train()
    params = {"use_short_conv": opts["conv"] == "1"} if "conv" in opts else {}
    return surgery(teacher, pc.quarter_softmax(n), variant, params).train()


def make_loop(teacher, student, variant: str, opts: dict[str, str], blocks: torch.Tensor, args, device) -> Loop:
    """The loop Distiller.stage2 (or stage3 for teacher-ce) would build, with the case's options."""
    student.requires_grad_(True)
    if variant == "teacher-ce":
        groups, lrs = [{"params": list(student.parameters())}], [1e-5]
        loss_fn = lambda ids: stage3_loss(student, ids, args.kl_chunk)  # noqa: E731
    else:
        groups = [g for g in param_groups(student.named_parameters(), lambda n: ".self_attn." in n) if g["params"]]
        lrs = [1e-4 if g["name"] == "attention" else 7e-6 for g in groups]
        impl = opts.get("kl", "fused")

        def loss_fn(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                h_t = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            h_s = student.model(input_ids=ids, use_cache=False).last_hidden_state
            return losses.chunked_kl(h_s, h_t, student.lm_head, teacher.lm_head, chunk_tokens=args.kl_chunk, impl=impl)

    cfg = LoopConfig(steps=10**6, batch_size=args.batch, micro_batch_size=args.batch, lr=lrs, betas=(0.9, 0.95),
                     grad_clip=1.0, warmup_steps=0, seed=0)
    return Loop(name="stage2", model=student, param_groups=groups, loss_fn=loss_fn, blocks=blocks, cfg=cfg,
                device=device, progress=False)


def breakdown(teacher, student, loop: Loop, variant: str, opts: dict[str, str], blocks, args, device) -> dict[str, float]:
    """Median seconds of each phase of one step, every phase synchronised on its own."""
    phases: dict[str, list[float]] = {k: [] for k in ("teacher_fwd", "student_fwd", "loss_fwd_bwd", "student_bwd", "optimizer")}
    impl = opts.get("kl", "fused")
    for i in range(args.breakdown_steps):
        ids = blocks[i * args.batch : (i + 1) * args.batch].to(device)
        with autocast_for(device):
            if variant == "teacher-ce":
                phases["teacher_fwd"].append(0.0)
            else:
                t, h_t = pc.timed(lambda: _no_grad(lambda: teacher.model(input_ids=ids, use_cache=False).last_hidden_state), device)
                phases["teacher_fwd"].append(t)
            t, h_s = pc.timed(lambda: student.model(input_ids=ids, use_cache=False).last_hidden_state, device)
            phases["student_fwd"].append(t)
            leaf = h_s.detach().requires_grad_(True)

            def loss_step():
                if variant == "teacher-ce":
                    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
                    loss = losses.chunked_ce(leaf, labels, student.lm_head, chunk_tokens=args.kl_chunk)
                else:
                    loss = losses.chunked_kl(leaf, h_t, student.lm_head, teacher.lm_head, chunk_tokens=args.kl_chunk, impl=impl)
                loss.backward()

            phases["loss_fwd_bwd"].append(pc.timed(loss_step, device)[0])
        phases["student_bwd"].append(pc.timed(lambda: h_s.backward(leaf.grad), device)[0])

        def opt_step():
            params = [p for g in loop.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)

        phases["optimizer"].append(pc.timed(opt_step, device)[0])
    return {k: pc.median(v) for k, v in phases.items()}


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def profile_step(loop: Loop, device) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        loop._one_step()
        pc.sync(device)
    return pc.top_kernels(prof, 14)


def apply_options(opts: dict[str, str], student, teacher) -> None:
    ops_common.FLA_AUX_KERNELS = opts.get("aux", "fla") != "torch"
    losses.COMPILE_KL_ON_CUDA = opts.get("klcompile", "1") != "0"
    if opts.get("compile") == "1":
        from hybridize.model.teacher import decoder_layers

        for model in (student, teacher):
            for layer in decoder_layers(model):
                layer.compile()


def run_case(case: str, teacher, blocks, args, device) -> dict[str, Any]:
    variant, opts = parse_case(case)
    print(f"\n== {case}", flush=True)
    student = build_student(teacher, variant, opts)
    apply_options(opts, student, teacher)
    pc.reset_peak(device)
    loop = make_loop(teacher, student, variant, opts, blocks, args, device)
    tokens = args.batch * args.seq
    warm = [pc.timed(loop._one_step, device)[0] for _ in range(args.warmup)]
    print(f"   warm-up steps (s): {[round(w, 3) for w in warm]}", flush=True)
    t, _ = pc.timed(lambda: [loop._one_step() for _ in range(args.steps)], device)
    step_s = t / args.steps
    student_f = pc.flops_per_token(student, args.seq, train=True)
    teacher_f = 0.0 if variant == "teacher-ce" else pc.flops_per_token(teacher, args.seq, train=False)
    row = {"case": case, "tok_s": tokens / step_s, "step_ms": step_s * 1e3,
           "mfu": tokens / step_s * (student_f + teacher_f) / pc.H100_BF16_PEAK,
           "peak_GiB": pc.peak_gib(device), "student_gflop_tok": student_f / 1e9, "teacher_gflop_tok": teacher_f / 1e9,
           "kl_compiled": None if variant == "teacher-ce" or opts.get("kl") == "checkpoint" else
           bool(device.type == "cuda" and losses.COMPILE_KL_ON_CUDA and not losses._compile_failed),
           "warmup_s": warm}
    row["phases_ms"] = {k: v * 1e3 for k, v in breakdown(teacher, student, loop, variant, opts, blocks, args, device).items()}
    if args.profile:
        row["top_kernels"] = profile_step(loop, device)
    print(f"   {row['tok_s']:,.0f} tok/s, {row['step_ms']:.1f} ms/step, MFU {row['mfu']:.1%}, peak {row['peak_GiB']} GiB; "
          f"phases (ms) {', '.join(f'{k} {v:.1f}' for k, v in row['phases_ms'].items())}", flush=True)
    for k in row.get("top_kernels", [])[:8]:
        print(f"     {k['ms']:8.2f} ms  x{k['calls']:<5d} {k['kernel'][:80]}")
    del loop, student
    gc.collect()
    if opts.get("compile") == "1":
        from hybridize.model.teacher import decoder_layers

        for layer in decoder_layers(teacher):
            layer._compiled_call_impl = None  # the teacher is shared with the next cases
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ops_common.FLA_AUX_KERNELS, losses.COMPILE_KL_ON_CUDA = True, True
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="1b", choices=sorted(pc.SIZES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--breakdown-steps", type=int, default=3)
    ap.add_argument("--kl-chunk", type=int, default=1024)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--profile", action="store_true", help="record the top device kernels of one step per case")
    ap.add_argument("--out", default="bench/results/stage2_step.json")
    args = ap.parse_args()
    device = pc.resolve(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = pc.environment(device)
    env["matmul_tflops"] = pc.matmul_ceiling(device)
    print(env, flush=True)
    teacher = pc.random_teacher(args.size, device, dtype)
    vocab = teacher.config.vocab_size
    n_blocks = max(args.batch * max(args.steps, args.warmup, args.breakdown_steps) * 2, 8)
    blocks = torch.randint(0, vocab, (n_blocks, args.seq), generator=torch.Generator().manual_seed(0))
    out = {"env": env, "args": vars(args), "rows": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        try:
            out["rows"].append(run_case(case, teacher, blocks, args, device))
        except Exception as exc:  # noqa: BLE001 - record the failure, measure the other cases
            import traceback

            traceback.print_exc()
            print(f"   {case}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            out["rows"].append({"case": case, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ops_common.FLA_AUX_KERNELS, losses.COMPILE_KL_ON_CUDA = True, True
        Path(args.out).write_text(json.dumps(out, indent=2))
    if losses._compile_failed:
        out["kl_compile_error"] = losses._compile_failed[0][:2000]
        Path(args.out).write_text(json.dumps(out, indent=2))
    keys = ["case", "tok_s", "step_ms", "mfu", "peak_GiB"]
    flat = [{**{k: r.get(k) for k in keys}, **{k: v for k, v in r.get("phases_ms", {}).items()}} for r in out["rows"]]
    print(f"\n{args.size} Llama, seq {args.seq}, batch {args.batch}, {env.get('gpu', env['device'])}; phases in ms")
    print(pc.table(flat))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
