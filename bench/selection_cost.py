"""Selection cost: a GA-S2 selection with shared stage 1 and lockstep probes vs the independent pipeline.

Both sides use hybridize's own code on the same random-weight 12-layer Llama (``--size sel12``,
bf16 on CUDA), the same random-token data, the same token budgets and the same settings:

- **shared** (this project): :class:`hybridize.selection.engine.SelectionEngine` with ``kl-greedy-add`` and
  the ``fixed-budget`` stop: ONE stage-1 pass over an all-linear student, then every probe ("all
  linear but layer l softmax") trained in lockstep on the same batches, each batch's teacher
  forward run once for all probes, held-out teacher states computed once.
- **independent** (the paper's per-probe scripts): for each layer l, its own
  :class:`hybridize.distill.stages.Distiller` on the student "all linear but l": its own held-out teacher
  pass, its own stage 1 (``stage1_tokens``), its own stage 2 of ``probe_tokens`` with its own
  teacher forwards, evaluated on held-out data at the same window as the shared run.

Reported: wall time and teacher-forward tokens of each side and their ratios (goal: shared <=
0.35x independent), the engine's own ``independent_pipeline_equivalent`` token count, and where the
shared run's time goes (stage 1, teacher windows, probe training, scoring, checkpoints). A warm-up
selection with one step per stage runs first, so kernel autotuning and compilation are not timed.

    python bench/selection_cost.py --out bench/results/selection_cost_h100.json              # GPU
    python bench/selection_cost.py --device cpu --size tiny12 --seq 64 --batch 2 \\
        --probe-steps 2 --stage1-ratio 2 --indep-probes 2                                    # smoke test
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import attrs
import torch

import perf_common as pc
from hybridize.registry.configs import ComponentRef
from hybridize.training.data import PackedData
from hybridize.distill.stages import DistillConfig, Distiller
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.engine import SelectionConfig, SelectionEngine


def make_data(vocab: int, n_train: int, n_heldout: int, seq: int) -> PackedData:
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, vocab, (n_train, seq), generator=g)
    heldout = torch.randint(0, vocab, (n_heldout, seq), generator=g)
    return PackedData(train=train, heldout=heldout, n_documents=n_train + n_heldout, n_tokens=(n_train + n_heldout) * seq)


def configs(args, seq: int, probe_steps: int) -> tuple[DistillConfig, SelectionConfig]:
    probe_tokens = probe_steps * args.batch * seq
    distill = DistillConfig(stage1_tokens=args.stage1_ratio * probe_tokens, stage2_tokens=probe_tokens, batch_size=args.batch,
                            eval_blocks=args.eval_blocks, checkpoint_every=0, stage1_lr=1e-3, stage2_lr_attn=1e-3,
                            stage2_lr_other=1e-4)
    sel = SelectionConfig(selector={"name": "kl-greedy-add"}, stop={"name": "fixed-budget"}, probe_tokens=probe_tokens,
                          eval_every=max(1, probe_steps // args.windows))
    return distill, sel


def instrument(engine: SelectionEngine, device: torch.device) -> dict[str, float]:
    """Wrap the engine's phases with synchronised timers (bench-only); returns the running totals."""
    spent: dict[str, float] = {}
    for name in ("shared_stage1", "_teacher_window", "_train_window", "_score_window", "_save"):
        fn = getattr(engine, name)

        def wrapper(*a, _fn=fn, _name=name, **kw):
            pc.sync(device)
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                pc.sync(device)
                spent[_name.strip("_")] = spent.get(_name.strip("_"), 0.0) + time.perf_counter() - t0

        setattr(engine, name, functools.wraps(fn)(wrapper))
    return spent


def shared_run(teacher, data, distill, sel, device, k: int) -> dict[str, Any]:
    engine = SelectionEngine(teacher=teacher, data=data, cfg=sel, distill=distill, variant=ComponentRef(name="gdn"),
                             pm=get_plugin_manager(), device=device, k=k, ckpt_dir=None, seed=0, progress=False)
    spent = instrument(engine, device)
    t, result = pc.timed(engine.run, device)
    return {"wall_s": t, "tokens": result["tokens"], "phases_s": spent, "softmax_layers": result["softmax_layers"]}


def independent_probe(teacher, data, distill, sel, device, layer: int) -> dict[str, Any]:
    """One probe as its own pipeline: held-out teacher pass, stage 1, stage 2 of probe_tokens, evaluations."""
    from hybridize.model.surgery import build_student

    def run() -> dict[str, int]:
        torch.manual_seed(0)
        student = build_student(teacher, [layer], "gdn").to(device).train()
        d = Distiller(teacher=teacher, data=data, cfg=distill, device=device, seed=0, progress=False)
        d.evaluator.prepare()
        d.stage1(student)
        d.cfg = attrs.evolve(distill, eval_every=sel.eval_every)  # stage-2 windows as the shared run's
        d.stage2(student)
        return {**d.tokens, "teacher_forward": d.tokens["teacher_forward"] + d.evaluator.teacher_tokens}

    t, tokens = pc.timed(run, device)
    return {"layer": layer, "wall_s": t, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="sel12", choices=sorted(pc.SIZES))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--probe-steps", type=int, default=16, help="optimizer steps per probe (probe_tokens = steps x batch x seq)")
    ap.add_argument("--stage1-ratio", type=int, default=5, help="stage1_tokens / probe_tokens (the defaults: 1M / 200k = 5)")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows per probe")
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--indep-probes", type=int, default=0, help="independent probes actually run (0 = all; fewer = scaled up)")
    ap.add_argument("--out", default="bench/results/selection_cost.json")
    args = ap.parse_args()
    device = pc.resolve(args.device)
    env = pc.environment(device)
    print(env, flush=True)
    teacher = pc.random_teacher(args.size, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    n_layers = teacher.config.num_hidden_layers
    data = make_data(teacher.config.vocab_size, 256, args.eval_blocks, args.seq)

    print("warm-up (one step per stage, not timed) ...", flush=True)
    w_distill, w_sel = configs(args, args.seq, 1)
    w_distill = attrs.evolve(w_distill, stage1_tokens=args.batch * args.seq)
    shared_run(teacher, data, w_distill, w_sel, device, args.k)
    independent_probe(teacher, data, w_distill, w_sel, device, 0)

    distill, sel = configs(args, args.seq, args.probe_steps)
    print(f"probe_tokens {sel.probe_tokens:,}, stage1_tokens {distill.stage1_tokens:,}, {n_layers} probes", flush=True)
    shared = shared_run(teacher, data, distill, sel, device, args.k)
    print(f"shared: {shared['wall_s']:.1f} s, teacher-forward tokens {shared['tokens']['teacher_forward']:,}, "
          f"phases {({k: round(v, 2) for k, v in shared['phases_s'].items()})}", flush=True)
    layers = list(range(n_layers))[: args.indep_probes or n_layers]
    indep: list[dict[str, Any]] = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for layer in layers:  # the JSON is rewritten after each probe, so a run cut short keeps what it measured
        indep.append(independent_probe(teacher, data, distill, sel, device, layer))
        print(f"independent probe {layer}: {indep[-1]['wall_s']:.1f} s", flush=True)
        Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "shared": shared, "independent": indep}, indent=2))
    scale = n_layers / len(layers)
    indep_wall = sum(r["wall_s"] for r in indep) * scale
    indep_teacher = sum(r["tokens"]["teacher_forward"] for r in indep) * scale
    row = {
        "probes": n_layers, "probe_tokens": sel.probe_tokens, "stage1_tokens": distill.stage1_tokens,
        "shared_wall_s": shared["wall_s"], "independent_wall_s": indep_wall, "wall_ratio": shared["wall_s"] / indep_wall,
        "shared_teacher_tokens": shared["tokens"]["teacher_forward"], "independent_teacher_tokens": indep_teacher,
        "teacher_token_ratio": shared["tokens"]["teacher_forward"] / indep_teacher,
        "engine_cost_ratio": shared["tokens"]["cost_ratio"], "independent_probes_run": len(layers),
    }
    out = {"env": env, "args": vars(args), "result": row, "shared": shared, "independent": indep}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{args.size}, seq {args.seq}, batch {args.batch}, {env.get('gpu', env['device'])}"
          + ("" if scale == 1 else f" (independent side: {len(layers)} of {n_layers} probes run, scaled x{scale:.2f})"))
    print(pc.table([row]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
