"""Train a 12-layer pretrained Llama teacher from scratch on TinyStories, on the CPU (for bench/probe_agreement.py).

Layer selection needs a teacher whose layers do different, learned things (random weights give meaningless
rankings), with more layers than stories260K's 5. This trains one: Llama, 12 layers, hidden 64, 4 heads /
2 KV heads (GQA, head_dim 16), MLP 172 (2.7x), tied embeddings, the stories260K tokenizer (vocab 512), on
``../shared/data/tinystories_val.txt`` packed into 256-token blocks with hybridize's own data code
(:func:`hybridize.training.data.prepare_data`, held-out fraction 0.05, split seed 0: the same held-out
blocks bench/probe_agreement.py scores probes on). AdamW, linear warm-up then cosine to 10%, a fixed
number of steps, seeded, one torch thread. It prints the loss as it goes and, at the end, the held-out
cross-entropy of the new teacher and of stories260K on the same blocks, then saves the model
(``save_pretrained``) and the tokenizer into ``--out`` (keep it outside the repo: weights are never committed).

    python bench/train_tiny_teacher.py --out /work/models/tiny12                 # ~9 min on one CPU thread
    python bench/train_tiny_teacher.py --out /tmp/t12 --steps 20                 # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.training.data import DataConfig, prepare_data

STORIES = "../shared/teachers/stories260K"
TEXT = "../shared/data/tinystories_val.txt"


def teacher_config(vocab: int, layers: int, hidden: int, bos: int, eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=round(2.6875 * hidden),
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=bos, eos_token_id=eos, initializer_range=0.02)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the held-out blocks."""
    model.eval()
    total, n = 0.0, 0
    for b in blocks.split(batch):
        logits = model(input_ids=b, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        n += b[:, 1:].numel()
    model.train()
    return total / n


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: torch.nn.Module, data, args) -> list[dict]:
    """AdamW + cosine for ``args.steps`` steps of ``args.batch`` blocks; returns the loss log."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    log, t0, run = [], time.perf_counter(), 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids = data.train[torch.randint(0, data.train.shape[0], (args.batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run = loss.item() if step == 0 else 0.95 * run + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss_ema": round(run, 4), "lr": opt.param_groups[0]["lr"], "s": round(time.perf_counter() - t0, 1)}
            log.append(rec)
            print(f"step {rec['step']:5d}  loss(ema) {run:.4f}  lr {rec['lr']:.2e}  {rec['s']:.0f}s", flush=True)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the model and tokenizer (outside the repo)")
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(STORIES)
    data = prepare_data(DataConfig(train=TEXT, seq_len=args.seq, heldout_fraction=0.05), tok, seed=0)
    cfg = teacher_config(len(tok), args.layers, args.hidden, tok.bos_token_id, tok.eos_token_id)
    model = LlamaForCausalLM(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.layers} layers, hidden {args.hidden}, {n_params:,} params; {data.train.shape[0]} train / "
          f"{data.heldout.shape[0]} held-out blocks of {args.seq}; {args.steps} steps x {args.batch}", flush=True)
    t0 = time.perf_counter()
    log = train(model, data, args)
    wall = time.perf_counter() - t0
    ours = heldout_loss(model, data.heldout)
    ref = heldout_loss(AutoModelForCausalLM.from_pretrained(STORIES), data.heldout)
    print(f"held-out CE: tiny12 {ours:.4f} (ppl {math.exp(ours):.2f}), stories260K {ref:.4f} (ppl {math.exp(ref):.2f}); "
          f"train {wall:.0f}s", flush=True)
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    record = {"args": vars(args), "params": n_params, "train_s": round(wall, 1), "heldout_ce": ours, "stories260k_heldout_ce": ref,
              "heldout_blocks": int(data.heldout.shape[0]), "train_blocks": int(data.train.shape[0]), "log": log,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "train_record.json").write_text(json.dumps(record, indent=1))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
