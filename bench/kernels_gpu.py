"""fla Triton kernels vs hybridize's pure-torch reference, on a CUDA GPU.

Part 1 (accuracy): for each variant (GDN = gated delta rule, GLA), the fla kernel and the
torch reference get the same inputs; relative error ||fla - ref|| / ||ref|| of the output,
the final state and every input gradient, in fp32 and bf16. The reference always runs in
float64 on the (rounded) inputs, so the figure is the kernel's own error. Also the whole
variant module (projections, conv, gates, norm) with backend="fla" vs backend="torch".

Part 2 (speed): forward+backward time of the fla kernel, of the torch reference, and of
torch SDPA causal attention (flash) at T = 2048, 4096, 8192, bf16.

Usage (on the GPU machine):
    python bench/kernels_gpu.py --out bench/results/kernels_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.ops.delta_rule import gated_delta_rule
from hybridize.ops.gla import gla


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(variant: str, B: int, T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = {"q": rnd(B, T, H, D), "k": rnd(B, T, H, D), "v": rnd(B, T, H, D), "h0": rnd(B, H, D, D) * 0.1}
    if variant == "gdn":
        x["g"] = F.logsigmoid(rnd(B, T, H) + 3.0) * 0.5  # log decay, mostly close to 0
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    else:
        x["gk"] = F.logsigmoid(rnd(B, T, H, D) + 3.0) / 4.0
    # fla keeps recurrent states in fp32 (and asserts it), so the initial state stays fp32
    return {k: v.to(torch.float32 if k == "h0" else dtype).requires_grad_(True) for k, v in x.items()}


def run_op(variant: str, x: dict, backend: str, mode: str = "chunk"):
    kw = dict(initial_state=x["h0"], output_final_state=True, mode=mode, backend=backend)
    if variant == "gdn":
        return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    return gla(x["q"], x["k"], x["v"], x["gk"], **kw)


def grads(variant: str, x: dict, backend: str, do: torch.Tensor, dht: torch.Tensor) -> tuple:
    for t in x.values():
        t.grad = None
    o, ht = run_op(variant, x, backend)
    ((o.float() * do).sum() + (ht.float() * dht).sum()).backward()
    return o.detach(), ht.detach(), {k: t.grad.detach().clone() for k, t in x.items()}


def accuracy(variant: str, dtype: torch.dtype, B=2, T=1024, H=4, D=64) -> dict:
    print(f"accuracy {variant} {dtype} T={T} ...", flush=True)
    x = make_inputs(variant, B, T, H, D, dtype)
    x64 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(B, T, H, D, device="cuda", generator=gen)
    dht = torch.randn(B, H, D, D, device="cuda", generator=gen)
    o, ht, gr = grads(variant, x, "fla", do, dht)
    o_ref, ht_ref, gr_ref = grads(variant, x64, "torch", do.double(), dht.double())
    row = {"variant": variant, "dtype": str(dtype).replace("torch.", ""), "what": "op", "o": rel_err(o, o_ref), "ht": rel_err(ht, ht_ref)}
    row.update({f"d{k}": rel_err(gr[k], gr_ref[k]) for k in gr})
    return row


def module_accuracy(name: str, dtype: torch.dtype, B=2, T=512) -> dict:
    from hybridize.linear import AttentionSpec
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.testing.conformance import random_teacher_weights

    entry = get_plugin_manager().registry("linear_attention")[name]
    spec = AttentionSpec(layer_idx=0, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    torch.manual_seed(0)
    mod = entry.factory(spec, entry.build_config({}))
    mod.load_teacher_weights(random_teacher_weights(spec, seed=0))
    mod = mod.cuda().to(dtype)
    x = torch.randn(B, T, 256, device="cuda", dtype=dtype, requires_grad=True)
    outs = {}
    for backend in ("fla", "torch"):
        mod.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = mod.mix(x, backend=backend)
        y.float().square().mean().backward()
        outs[backend] = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None})
    (y1, gx1, gp1), (y2, gx2, gp2) = outs["fla"], outs["torch"]
    worst = max(gp2, key=lambda n: rel_err(gp1[n], gp2[n]))
    return {"variant": name, "dtype": str(dtype).replace("torch.", ""), "what": "module", "o": rel_err(y1, y2),
            "dx": rel_err(gx1, gx2), "dparams_max": rel_err(gp1[worst], gp2[worst]), "worst_param": worst}


def bench(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def speed(T: int, B: int, H: int, D: int, with_ref: bool) -> dict:
    row = {"T": T, "B": B, "H": H, "D": D}
    for variant in ("gdn", "gla"):
        x = make_inputs(variant, B, T, H, D, torch.bfloat16)
        x.pop("h0")
        x["h0"] = None
        for backend in ("fla", "torch") if with_ref else ("fla",):
            def step(variant=variant, x=x, backend=backend):
                kw = dict(mode="chunk", backend=backend)
                args = (x["q"], x["k"], x["v"], x["g"], x["beta"]) if variant == "gdn" else (x["q"], x["k"], x["v"], x["gk"])
                o, _ = (gated_delta_rule if variant == "gdn" else gla)(*args, **kw)
                o.sum().backward()
            row[f"{variant}_{backend}_ms"] = bench(step)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    row["sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    return row


def fmt(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.2e}" if isinstance(v, float) and v < 1 else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/kernels_gpu.json")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-ref-timing", action="store_true", help="skip timing the torch reference")
    ap.add_argument("--acc-len", type=int, default=1024, help="sequence length of the accuracy check")
    ap.add_argument("--variants", default="gdn,gla")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--skip-module", action="store_true", help="skip the whole-module comparison")
    args = ap.parse_args()
    import fla
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "fla": fla.__version__, "python": platform.python_version()}
    print(env)
    out = {"env": env, "accuracy": [], "speed": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def record(key: str, row: dict) -> None:  # print and save each row as it comes: runs can be cut off
        out[key].append(row)
        print(row, flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))

    for v in args.variants.split(","):
        for dt in [getattr(torch, d) for d in args.dtypes.split(",")]:
            record("accuracy", accuracy(v, dt, T=args.acc_len))
    if not args.skip_module:
        for v in ("gdn", "gla"):
            for dt in (torch.float32, torch.bfloat16):
                record("accuracy", module_accuracy(v, dt))
    print("\nAccuracy: relative error ||fla - reference|| / ||reference|| (reference in float64)\n" + fmt(out["accuracy"]))
    for T in filter(None, args.lengths.split(",")):
        record("speed", speed(int(T), args.batch, args.heads, args.head_dim, not args.no_ref_timing))
    print("\nForward+backward time (ms), bf16\n" + fmt(out["speed"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
