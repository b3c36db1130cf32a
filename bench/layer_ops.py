"""Where a GDN layer's time goes: each piece of one layer timed forward and forward+backward.

One decoder layer of the ``--size`` Llama teacher (softmax attention) and the same layer of its
GDN student at (batch, seq) in bf16; then the pieces of the GDN mixer on the same input: the
six projections, the three short convolutions (fla's kernel and the torch form), the gates, the
gated delta rule (fla's chunk kernel), the gated output norm (fla and torch) with ``o_proj``,
and the whole ``mix``. Median of ``--iters`` synchronised runs after warm-up.

    python bench/layer_ops.py --out bench/results/layer_ops_h100.json
    python bench/layer_ops.py --device cpu --size tiny --seq 64 --iters 2       # smoke test
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import perf_common as pc
from hybridize.ops import common as ops_common


def run_time(fn: Callable[[], object], backward: bool, device, iters: int) -> float:
    """Median ms of ``fn`` (and, with ``backward``, a backward of its outputs against random cotangents)."""

    def once() -> None:
        out = fn()
        if backward:
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor) and o.requires_grad]
            torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])

    for _ in range(3):
        once()
    return pc.median([pc.timed(once, device)[0] for _ in range(iters)]) * 1e3


def _first(out: object) -> object:
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="1b", choices=sorted(pc.SIZES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="bench/results/layer_ops.json")
    args = ap.parse_args()
    from einops import rearrange

    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import decoder_layers

    device = pc.resolve(args.device)
    env = pc.environment(device)
    print(env, flush=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = pc.random_teacher(args.size, device, dtype)
    student = build_student(teacher, [], "gdn").train()
    t_layer, s_layer = decoder_layers(teacher)[0].train().requires_grad_(True), decoder_layers(student)[0]
    mod = s_layer.self_attn
    D = mod.head_dim
    x = torch.randn(args.batch, args.seq, teacher.config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(args.seq, device=device)[None].expand(args.batch, -1)
    pe = teacher.model.rotary_emb(x, pos)
    with torch.no_grad():
        q, k, v = mod.q_proj(x), mod.k_proj(x), mod.v_proj(x)
        gate = rearrange(mod.g_proj(x), "b t (h d) -> b t h d", d=D)
    q, k, v, gate = (t.detach().requires_grad_(True) for t in (q, k, v, gate))
    with torch.no_grad():
        qh, kh, vh = (rearrange(mod.q_conv1d(t)[0], "b t (h d) -> b t h d", d=D) for t in (q, k, v))
        g, beta = mod._gates(x, None)
    qh, kh, vh, g, beta = (t.detach().requires_grad_(True) for t in (qh, kh, vh, g, beta))
    from hybridize.ops.delta_rule import gated_delta_rule

    o = torch.randn_like(vh).requires_grad_(True)

    def convs(backend: str):
        return lambda: [conv(t, backend=backend)[0] for conv, t in ((mod.q_conv1d, q), (mod.k_conv1d, k), (mod.v_conv1d, v))]

    def out_norm(backend: str):
        return lambda: mod.o_proj(rearrange(mod.o_norm(o, gate, backend=backend), "b t h d -> b t (h d)"))

    pieces: dict[str, Callable[[], object]] = {
        "teacher decoder layer (softmax attention + MLP)": lambda: _first(t_layer(x, position_embeddings=pe)),
        "student decoder layer (GDN + MLP)": lambda: _first(s_layer(x, position_embeddings=pe)),
        "  softmax attention block (teacher self_attn)": lambda: t_layer.self_attn(x, position_embeddings=pe, attention_mask=None)[0],
        "  GDN mix (whole)": lambda: mod.mix(x)[0],
        "    projections q,k,v,g,a,b": lambda: [mod.q_proj(x), mod.k_proj(x), mod.v_proj(x), mod.g_proj(x), mod.a_proj(x), mod.b_proj(x)],
        "    3 short convs, fla kernel": convs("auto"),
        "    3 short convs, torch": convs("torch"),
        "    gates g, beta": lambda: mod._gates(x, None),
        "    gated delta rule, fla chunk": lambda: gated_delta_rule(qh, kh, vh, g, beta)[0],
        "    gated norm + o_proj, fla": out_norm("auto"),
        "    gated norm + o_proj, torch": out_norm("torch"),
        "  MLP": lambda: t_layer.mlp(x),
    }
    rows = []
    for name, fn in pieces.items():
        row = {"piece": name, "fwd_ms": run_time(fn, False, device, args.iters), "fwd_bwd_ms": run_time(fn, True, device, args.iters)}
        rows.append(row)
        print(row, flush=True)
    ops_common.FLA_AUX_KERNELS = True
    out = {"env": env, "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{args.size} layer 0, batch {args.batch} x seq {args.seq}, {env.get('gpu', env['device'])}")
    print(pc.table(rows))


if __name__ == "__main__":
    main()
