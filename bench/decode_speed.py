"""Decoding speed and memory: a GDN hybrid (25% softmax layers) vs its all-softmax teacher.

A random-weight Llama of Llama-3.2-1B's shape (``--size 1b``) in bf16 is the teacher; the hybrid
is :func:`hybridize.build_student` of it with the uniform 25% softmax layers (4 of 16) and GDN
elsewhere, whose linear layers decode one token at a time through fla's fused recurrent kernel
(``mode="recurrent"``; the short convolutions keep a 3-token cache). Both run the same greedy
loop: one prefill forward of the prompt (``logits_to_keep=1``) into the model's cache (the
teacher: transformers' ``DynamicCache``; the hybrid: :class:`hybridize.model.cache.HybridCache`), then
``--new-tokens`` single-token forwards after ``--warm-tokens`` untimed ones.

The hybrid runs twice: ``hybrid-eager`` launches every kernel of its linear layers from Python,
``hybrid`` replays them as CUDA graphs (:mod:`hybridize.ops.decode_graphs`, the default on CUDA).
For each prompt length and batch: decode tokens/s (batch x new tokens / time), prefill time, the
cache's size after decoding (KV tensors of softmax layers + recurrent and convolution states of
linear layers) and the peak memory above the weights.

    python bench/decode_speed.py --out bench/results/decode_speed_h100.json                   # GPU
    python bench/decode_speed.py --device cpu --size tiny --prompts 64,128 --batches 1,2 --new-tokens 4
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import torch

import perf_common as pc

from hybridize.model.cache import cache_arg_name


def cache_bytes(cache: Any) -> int:
    """Bytes held by a cache: keys/values of softmax layers, state tensors of linear layers."""
    total = 0
    for layer in cache.layers:
        state = getattr(layer, "state", None)
        tensors = list(state.values()) if isinstance(state, dict) else [getattr(layer, "keys", None), getattr(layer, "values", None)]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    if hasattr(model, "_hybrid_cache"):
        return model._hybrid_cache()
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers versions without the config argument
        return DynamicCache()


@torch.no_grad()
def decode(model: Any, ids: torch.Tensor, new_tokens: int, warm_tokens: int, device: torch.device, graphs: bool = True) -> dict[str, Any]:
    """Prefill ``ids`` then greedily decode; times and memory of one run (``graphs``: CUDA-graph linear layers)."""
    from hybridize.ops import decode_graphs

    decode_graphs.ENABLED = graphs
    weights = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    pc.reset_peak(device)
    cache = new_cache(model)
    CACHE = cache_arg_name(type(model.model).forward)  # 'cache' on transformers >= 5.24
    t_pre, out = pc.timed(lambda: model(input_ids=ids, **{CACHE: cache}, use_cache=True, logits_to_keep=1), device)
    nxt = out.logits[:, -1:].argmax(-1)

    def steps(n: int) -> torch.Tensor:
        tok = nxt
        for _ in range(n):
            tok = model(input_ids=tok, **{CACHE: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        return tok

    nxt = steps(warm_tokens)
    t_dec, _ = pc.timed(lambda: steps(new_tokens), device)
    peak = torch.cuda.max_memory_allocated() - weights if device.type == "cuda" else None
    return {"prefill_s": t_pre, "decode_s": t_dec, "decode_tok_s": ids.shape[0] * new_tokens / t_dec,
            "cache_GiB": cache_bytes(cache) / 2**30, "peak_above_weights_GiB": None if peak is None else peak / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="1b", choices=sorted(pc.SIZES))
    ap.add_argument("--prompts", default="4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warm-tokens", type=int, default=4)
    ap.add_argument("--models", default="teacher,hybrid-eager,hybrid")
    ap.add_argument("--sdpa", default="default", choices=("default", "no-cudnn"),
                    help="no-cudnn: keep torch's SDPA off the cuDNN backend (flash / memory-efficient kernels instead)")
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    args = ap.parse_args()
    if args.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    from hybridize.model.surgery import build_student

    device = pc.resolve(args.device)
    env = pc.environment(device)
    print(env, flush=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = pc.random_teacher(args.size, device, dtype)
    n = teacher.config.num_hidden_layers
    hybrid = build_student(teacher, pc.quarter_softmax(n), "gdn").eval().requires_grad_(False)
    # "hybrid-eager": the same hybrid with hybridize.ops.decode_graphs off (every kernel launched from Python)
    models = {"teacher": teacher, "hybrid-eager": hybrid, "hybrid": hybrid}
    models = {k: models[k] for k in args.models.split(",")}
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for name, model in models.items():  # warm-up: kernel autotuning / first calls are not timed
        for b in map(int, args.batches.split(",")):
            decode(model, torch.randint(0, vocab, (b, 256), generator=g).to(device), 4, 2, device, graphs=name != "hybrid-eager")
    rows: list[dict[str, Any]] = []
    out = {"env": env, "args": vars(args), "softmax_layers": pc.quarter_softmax(n), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for P in map(int, args.prompts.split(",")):
        for b in map(int, args.batches.split(",")):
            ids = torch.randint(0, vocab, (b, P), generator=g).to(device)
            res = {}
            for name, model in models.items():
                try:
                    res[name] = decode(model, ids, args.new_tokens, args.warm_tokens, device, graphs=name != "hybrid-eager")
                except Exception as exc:  # noqa: BLE001 - record it (out of memory, ...) and go on
                    res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"prompt {P} batch {b} {name}: {res[name]}", flush=True)
            t, h, e = res.get("teacher", {}), res.get("hybrid", {}), res.get("hybrid-eager", {})
            row = {"prompt": P, "batch": b, "hybrid_eager_decode_tok_s": e.get("decode_tok_s")}
            for key in ("decode_tok_s", "prefill_s", "cache_GiB", "peak_above_weights_GiB"):
                row[f"teacher_{key}"], row[f"hybrid_{key}"] = t.get(key), h.get(key)
            if "decode_tok_s" in t and "decode_tok_s" in h:
                row["speedup"] = h["decode_tok_s"] / t["decode_tok_s"]
                row["cache_ratio"] = h["cache_GiB"] / t["cache_GiB"]
            if "decode_tok_s" in t and "decode_tok_s" in e:
                row["speedup_eager"] = e["decode_tok_s"] / t["decode_tok_s"]
            rows.append(row)
            Path(args.out).write_text(json.dumps(out, indent=2))
    keys = ["prompt", "batch", "teacher_decode_tok_s", "hybrid_eager_decode_tok_s", "speedup_eager", "hybrid_decode_tok_s", "speedup",
            "teacher_cache_GiB", "hybrid_cache_GiB",
            "cache_ratio", "teacher_peak_above_weights_GiB", "hybrid_peak_above_weights_GiB", "teacher_prefill_s", "hybrid_prefill_s"]
    print(f"\n{args.size} Llama teacher vs GDN hybrid (softmax layers {pc.quarter_softmax(n)}), {env.get('gpu', env['device'])}, "
          f"{args.new_tokens} new tokens")
    print(pc.table(rows, keys))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
