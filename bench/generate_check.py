"""Greedy generation of a saved hybrid with and without the cache, single prompts and a left-padded batch.

    python bench/generate_check.py runs/stories260k_gdn/model --out bench/results/generate_check.json

Run it under each end of the transformers range the project admits (pyproject.toml); the JSON records
the version it ran under.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park. They saw", "One day"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hybridize  # noqa: F401  (registers the hybrid model types)

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token or tok.unk_token
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    rows = []
    with torch.no_grad():
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        batched = model.generate(**batch, use_cache=True, **kw)[:, batch.input_ids.shape[1]:]
        for i, prompt in enumerate(PROMPTS):
            ids = tok(prompt, return_tensors="pt").input_ids
            cached = model.generate(ids, use_cache=True, **kw)[0, ids.shape[1]:]
            uncached = model.generate(ids, use_cache=False, **kw)[0, ids.shape[1]:]
            rows.append({"prompt": prompt, "text": tok.decode(cached, skip_special_tokens=True),
                         "cache_equals_no_cache": bool(torch.equal(cached, uncached)),
                         "batched_equals_single": bool(torch.equal(batched[i][: len(cached)], cached))})
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{type(model).__name__}, softmax layers {model.config.hybridize['softmax_layers']}, {model.config.hybridize['variant']}")
    for r in rows:
        print(f"- {r['prompt']!r} -> {r['text']!r}\n  cache == no cache: {r['cache_equals_no_cache']}; left-padded batch == single: {r['batched_equals_single']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"transformers": transformers.__version__, "torch": torch.__version__, "model": args.model,
                   "all_cache_equals_no_cache": all(r["cache_equals_no_cache"] for r in rows),
                   "all_batched_equals_single": all(r["batched_equals_single"] for r in rows), "prompts": rows}
        Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
