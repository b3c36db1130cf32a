"""Compile and autotune fla's kernels for a model shape ahead of the run that needs them.

On a fresh GPU machine fla's first calls compile and autotune every Triton kernel they touch (one to three
minutes; issue 19 measured 175 s in the first stage-1 step). A device call is limited to 10 minutes, so
``recall_compare.sh teacher`` starts this script in the background while the teacher trains (the teacher needs no
fla): it builds an all-linear student of the compare's shape and runs the passes the compare will run (bf16-autocast
training forward + backward at the stage-1 and stage-2 lengths, fp32 no-grad forward, cached greedy decoding) with
the compare's ``TRITON_CACHE_DIR``, so the compare finds every autotuning candidate compiled on disk and only times
them. (Autotuning results are not cached, ``TRITON_CACHE_AUTOTUNING`` stays off: timings taken while the teacher
trains on the same GPU would choose configurations for a busy GPU.)

    TRITON_CACHE_DIR=/tmp/triton_cache python bench/fla_warmup.py --preset recall12

Writes one JSON line per pass (seconds) to stdout; exits 0 without doing anything when CUDA or fla is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="recall12", help="a recall_teacher.py preset: the model shape")
    p.add_argument("--variant", default="gdn", help="registered linear-attention name")
    p.add_argument("--shapes", default="16x512,4x2048",
                   help="training shapes ROWSxLENGTH (the compare's stage-1 micro-batch, its probe / stage-2 batch)")
    args = p.parse_args(argv)

    import torch

    from hybridize.ops.common import fla_available

    if not torch.cuda.is_available() or not fla_available():
        print(json.dumps({"skipped": "no CUDA or fla does not import"}))
        return 0
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.model.surgery import build_student
    from hybridize.training.loop import autocast_for
    from recall_teacher import PRESETS

    shape = PRESETS[args.preset]
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                      max_position_embeddings=shape["seq"], tie_word_embeddings=True)
    dev = torch.device("cuda")
    teacher = LlamaForCausalLM(cfg)
    student = build_student(teacher, [], args.variant).to(dev)
    del teacher

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(json.dumps({"pass": name, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)

    for B, T in (tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)

        def train_step(ids=ids) -> None:
            with autocast_for(dev):
                out = student(input_ids=ids, labels=ids)
            out.loss.backward()
            student.zero_grad(set_to_none=True)

        timed(f"train bf16 T={T}", train_step)

        def fwd32(ids=ids) -> None:
            with torch.no_grad():
                student(input_ids=ids)

        timed(f"forward fp32 T={T}", fwd32)
    prompt = torch.randint(0, cfg.vocab_size, (4, 300), device=dev)
    mask = torch.ones_like(prompt)
    mask[0, :17] = 0  # left padding, as lm-eval batches prompts

    def generate() -> None:
        with torch.no_grad():
            student.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=0)

    timed("generate fp32", generate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
