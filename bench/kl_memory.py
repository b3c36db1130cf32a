"""Peak memory of the stage-2 KL: chunked (hybridize.training.losses.chunked_kl) vs full fp32 logits.

Qwen2.5 vocabulary (151,936) x 4096 tokens, hidden 2048, forward + backward, on the CPU: each
variant runs in a fresh subprocess and reports its peak resident memory (ru_maxrss) above the
memory held before the loss (model weights + hidden states).

    python bench/kl_memory.py --out bench/results/kl_memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import resource, sys, time, torch
from hybridize.training.losses import chunked_kl
mode, V, T, D, chunk = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
lm_s, lm_t = torch.nn.Linear(D, V, bias=False), torch.nn.Linear(D, V, bias=False)
h_s, h_t = torch.randn(1, T, D, requires_grad=True), torch.randn(1, T, D)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "full":
    logp_t = torch.log_softmax(lm_t(h_t).float(), -1)
    logp_s = torch.log_softmax(lm_s(h_s).float(), -1)
    loss = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
else:
    loss = chunked_kl(h_s, h_t, lm_s, lm_t, chunk_tokens=chunk)
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{(peak - base) / 2**20:.3f} {time.perf_counter() - t0:.2f} {loss.item():.6f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunks", default="512,1024,2048")
    ap.add_argument("--out", default="bench/results/kl_memory.json")
    args = ap.parse_args()
    rows = []
    for mode, chunk in [("full", 0)] + [("chunked", int(c)) for c in args.chunks.split(",")]:
        cmd = [sys.executable, "-c", CHILD, mode, str(args.vocab), str(args.tokens), str(args.hidden), str(chunk)]
        gib, secs, loss = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        rows.append({"mode": mode, "chunk_tokens": chunk or None, "peak_extra_GiB": float(gib), "seconds": float(secs), "kl": float(loss)})
    full_logits = args.vocab * args.tokens * 4 / 2**30
    print(f"vocab {args.vocab}, {args.tokens} tokens, hidden {args.hidden}; one fp32 logits tensor = {full_logits:.2f} GiB")
    print(f"| mode | chunk tokens | peak extra memory (GiB) | fwd+bwd s | KL |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['chunk_tokens'] or '-'} | {r['peak_extra_GiB']:.2f} | {r['seconds']:.1f} | {r['kl']:.6f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "fp32_logits_GiB": full_logits, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
