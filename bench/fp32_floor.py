"""The fp32 floor of the chunked linear-attention forms: hybridize's torch chunk kernels in fp32 vs float64.

bench/kernels_gpu.py measures fla's Triton kernels against the float64 reference; this script measures
what a chunked fp32 implementation of the same algorithm can reach on the same inputs (B=2, T=1024, H=4,
D=64, random initial state, gradients against random cotangents), so that a kernel's error can be read
against it. Runs on the CPU (or --device cuda with TF32 off).

    python bench/fp32_floor.py [--device cpu] [--out bench/results/fp32_floor.json]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.ops.delta_rule import gated_delta_rule
from hybridize.ops.gla import gla


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def inputs(variant: str, B: int, T: int, H: int, D: int, device: str) -> dict[str, torch.Tensor]:
    """The input distribution of bench/kernels_gpu.py (drawn on the CPU, so identical on every device)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {"q": rnd(B, T, H, D), "k": rnd(B, T, H, D), "v": rnd(B, T, H, D), "h0": rnd(B, H, D, D) * 0.1}
    if variant == "gdn":
        x["g"] = F.logsigmoid(rnd(B, T, H) + 3.0) * 0.5
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    else:
        x["gk"] = F.logsigmoid(rnd(B, T, H, D) + 3.0) / 4.0
    return {k: v.to(device) for k, v in x.items()}


def run(variant: str, x: dict[str, torch.Tensor], dtype: torch.dtype, do: torch.Tensor, dht: torch.Tensor):
    xx = {k: v.detach().clone().to(dtype).requires_grad_(True) for k, v in x.items()}
    kw = dict(initial_state=xx["h0"], output_final_state=True, mode="chunk", backend="torch")
    if variant == "gdn":
        o, ht = gated_delta_rule(xx["q"], xx["k"], xx["v"], xx["g"], xx["beta"], **kw)
    else:
        o, ht = gla(xx["q"], xx["k"], xx["v"], xx["gk"], **kw)
    ((o * do.to(dtype)).sum() + (ht * dht.to(dtype)).sum()).backward()
    return o.detach(), ht.detach(), {k: v.grad for k, v in xx.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--out", default="bench/results/fp32_floor.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    B, H, D = 2, 4, 64
    rows = []
    for variant in ("gdn", "gla"):
        x = inputs(variant, B, args.T, H, D, args.device)
        g = torch.Generator().manual_seed(1)
        do = torch.randn(B, args.T, H, D, generator=g).to(args.device)
        dht = torch.randn(B, H, D, D, generator=g).to(args.device)
        o32, h32, g32 = run(variant, x, torch.float32, do, dht)
        o64, h64, g64 = run(variant, x, torch.float64, do, dht)
        row = {"variant": variant, "o": rel_err(o32, o64), "ht": rel_err(h32, h64)}
        row.update({f"d{k}": rel_err(g32[k], g64[k]) for k in g32})
        rows.append(row)
    cols = sorted({c for r in rows for c in r if c != "variant"}, key=lambda c: (c != "o", c != "ht", c))
    print(f"torch chunked fp32 vs float64, B={B} T={args.T} H={H} D={D} on {args.device}")
    print("| op | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[c]:.1e}" if c in r else "-" for c in cols) + " |")
    meta = {"device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "shape": {"B": B, "T": args.T, "H": H, "D": D}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
