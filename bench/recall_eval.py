"""What bench/recall_teacher.py measures on its teacher: RULER through lm-eval, held-out loss, a per-layer ablation.

- RULER: niah_single_1/2, niah_multikey_1/2 at the training length through the project's ``lm-eval`` evaluator
  (:func:`hybridize.evaluate.run_evaluators`, as ``hybridize eval`` and every hybrid in ``hybridize compare`` are
  measured): lm-eval's own documents, greedy generation, its string-match score.
- Held-out loss: mean next-token cross-entropy on TinyStories stories held out of training (packed like
  hybridize's data, BOS / EOS between documents).
- Ablation: each layer's attention output is replaced by its mean over the held-out blocks (mean ablation:
  the layer's average contribution stays, what it reads from the context goes). Per layer, the niah score on
  lm-eval's own samples (the same generators, prompts and ``gen_prefix``), generated greedily for at most
  ``GEN_TOKENS`` new tokens (the answer is 9 and its EOS) and scored by lm-eval's RULER ``string_match_all``
  (lm-eval itself generates up to 128), and the held-out loss.
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2")
GEN_TOKENS = 16


def heldout_blocks(tok: Any, texts: Sequence[str], T: int, n: int) -> torch.Tensor:
    """The first ``n`` blocks of T tokens of ``texts`` (fewer when the texts are short; at least one)."""
    from hybridize.training.data import pack, tokenize_documents

    blocks = pack(tokenize_documents(list(texts), tok, max_tokens=T * n + 1), T, field="heldout")
    return blocks[:n]


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, device: torch.device, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over ``blocks``."""
    total, n = 0.0, 0
    for b in blocks.split(batch):
        b = b.to(device)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"))
        n += b[:, 1:].numel()
    return total / n


def ruler_lm_eval(model: torch.nn.Module, tok: Any, *, seq: int, limit: int, batch: int, essays: str) -> dict[str, Any]:
    """The four niah tasks through hybridize's lm-eval evaluator: {metrics, samples, seconds, details}."""
    from hybridize.evaluate import EvalTarget, run_evaluators
    from hybridize.registry.configs import ComponentRef
    from hybridize.registry.manager import get_plugin_manager

    ref = ComponentRef(name="lm-eval", params={"tasks": list(TASKS), "max_seq_lengths": [seq], "limit": limit,
                                                "batch_size": batch, "essays_dir": essays})
    t0 = time.perf_counter()
    out = run_evaluators([ref], EvalTarget(model=model, tokenizer=tok, label="recall teacher", progress=True), get_plugin_manager())
    details = out["evals"][0]["details"]
    samples = {t: details["tasks"][t].get("samples") for t in TASKS}
    return {"metrics": {t: out["metrics"][t] for t in TASKS}, "samples": samples, "seconds": round(time.perf_counter() - t0, 1),
            "lm_eval_version": details.get("lm_eval_version"), "essay_sentence_splitter": details.get("essay_sentence_splitter")}


def ruler_samples(tok: Any, *, seq: int, n: int, essays: str, seed: int) -> dict[str, list[dict]]:
    """``n`` documents per niah task from lm-eval's generators (hybridize's offline RULER plumbing), seeded."""
    import contextlib as cl
    import io

    import numpy as np

    from hybridize.plugins.evals import ruler
    from hybridize.plugins.evals.network import network

    out = {}
    with network(False), cl.redirect_stderr(io.StringIO()):
        ruler.sentence_splitter()
        for i, task in enumerate(TASKS):
            random.seed(seed + i)
            np.random.seed(seed + i)
            out[task] = ruler.samples(task, tok, seq, n, essays)
    return out


def _request(sample: dict) -> str:
    """The context lm-eval's HFLM receives: the prompt, a space where lm-eval puts one, the gen_prefix."""
    from lm_eval.api.utils import requires_delimiter

    sep = " " if requires_delimiter(sample["input"], sample["gen_prefix"]) else ""
    return sample["input"] + sep + sample["gen_prefix"]


def match_items(tok: Any, samples: Sequence[dict]) -> list[tuple[list[int], list[str]]]:
    """(context ids with BOS, the reference strings) of each sample, the context as lm-eval's HFLM encodes it."""
    return [(tok(_request(s))["input_ids"], list(s["outputs"])) for s in samples]


@torch.no_grad()
def answer_match(model: torch.nn.Module, tok: Any, items: Sequence[tuple[list[int], list[str]]], device: torch.device,
                 batch: int = 16) -> float:
    """RULER's score of greedy generations of at most GEN_TOKENS tokens (left-padded batches, stop at EOS)."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    preds: dict[int, str] = {}
    for start in range(0, len(order), batch):
        group = order[start : start + batch]
        width = max(len(items[i][0]) for i in group)
        x = torch.full((len(group), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, i in enumerate(group):
            c = items[i][0]
            x[r, width - len(c):], mask[r, width - len(c):] = torch.tensor(c), 1
        out = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), max_new_tokens=GEN_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for r, i in enumerate(group):
            preds[i] = tok.decode(out[r, width:], skip_special_tokens=True)
    ids = sorted(preds)
    return string_match_all(postprocess_pred([preds[i] for i in ids]), [items[i][1] for i in ids])


@torch.no_grad()
def mean_attention(model: torch.nn.Module, blocks: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Each layer's attention output averaged over every position of ``blocks``: (hidden,) per layer."""
    layers = model.model.layers
    sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64, device=device) for _ in layers]
    count = [0]

    def hook(i: int):
        def fn(module, args, output):
            sums[i].add_(output[0].double().sum(dim=(0, 1)))
        return fn

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b in blocks.split(4):
            model(input_ids=b.to(device), use_cache=False)
            count[0] += b.numel()
    finally:
        for h in handles:
            h.remove()
    return [(s / count[0]).float() for s in sums]


@contextlib.contextmanager
def mean_ablated(model: torch.nn.Module, layer: int, mean: torch.Tensor) -> Iterator[None]:
    """Within the block, layer ``layer``'s attention outputs its mean at every position."""
    def fn(module, args, output):
        return (mean.to(output[0].dtype).expand_as(output[0]), *output[1:])

    handle = model.model.layers[layer].self_attn.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def ablation(model: torch.nn.Module, tok: Any, blocks: torch.Tensor, samples: dict[str, list[dict]],
             device: torch.device, batch: int = 16) -> dict[str, Any]:
    """The teacher and each mean-ablated layer: RULER score per task, its mean, held-out loss."""
    items = {t: match_items(tok, s) for t, s in samples.items()}

    def measure() -> dict[str, Any]:
        match = {t: answer_match(model, tok, it, device, batch) for t, it in items.items()}
        return {"match": match, "mean": sum(match.values()) / len(match), "heldout_loss": heldout_loss(model, blocks, device)}

    t0 = time.perf_counter()
    base = measure()
    means = mean_attention(model, blocks, device)
    rows = []
    for layer in range(len(model.model.layers)):
        with mean_ablated(model, layer, means[layer]):
            r = measure()
        rows.append({"layer": layer, **r, "drop": base["mean"] - r["mean"], "delta_loss": r["heldout_loss"] - base["heldout_loss"]})
    return {"method": "mean ablation of each layer's attention output", "samples_per_task": {t: len(i) for t, i in items.items()},
            "teacher": base, "layers": rows, "seconds": round(time.perf_counter() - t0, 1)}


def evaluate(model: torch.nn.Module, tok: Any, held_texts: Sequence[str], args: Any, device: torch.device) -> dict[str, Any]:
    """Everything bench/recall_teacher.py reports about its teacher (see the module docstring)."""
    blocks = heldout_blocks(tok, held_texts, args.seq, args.heldout_blocks)
    out: dict[str, Any] = {"heldout": {"blocks": int(blocks.shape[0]), "seq": args.seq, "data": "held-out TinyStories stories",
                                       "loss": heldout_loss(model, blocks, device)}}
    batch = args.eval_batch or (32 if device.type == "cuda" else 8)
    if args.eval_limit:
        out["ruler"] = ruler_lm_eval(model, tok, seq=args.seq, limit=args.eval_limit, batch=batch, essays=args.essays)
        print(f"[eval] RULER at {args.seq} (lm-eval, {args.eval_limit} per task): "
              + ", ".join(f"{t} {v:.3f}" for t, v in out["ruler"]["metrics"].items()) + f"  ({out['ruler']['seconds']} s)", flush=True)
    n = args.eval_limit if args.ablation_limit < 0 else args.ablation_limit
    if n:
        samples = ruler_samples(tok, seq=args.seq, n=n, essays=args.essays, seed=10_000 + args.seed)
        out["ablation"] = ablation(model, tok, blocks, samples, device, batch)
        print(f"[eval] ablation ({out['ablation']['seconds']} s): teacher match {out['ablation']['teacher']['mean']:.3f}; drop per layer "
              + " ".join(f"{r['layer']}:{r['drop']:+.2f}" for r in out["ablation"]["layers"]), flush=True)
    return out


# -- report -----------------------------------------------------------------------------------------------------
def _train_summary(train: dict[str, Any], seq: int) -> tuple[float | None, float | None]:
    """Mean tokens/s and MFU of the log lines at the full row length (the first line, with start-up, left out)."""
    lines = [r for r in train["log"][1:] if r["row_length"] == seq]
    if not lines:
        return None, None
    return (sum(r["tokens_per_s"] for r in lines) / len(lines), sum(r["mfu"] for r in lines) / len(lines))


def markdown(record: dict[str, Any]) -> str:
    a, tr, ev = record["args"], record["train"], record["eval"]
    tps, mfu = _train_summary(tr, a["seq"])
    lines = [f"# Recall teacher ({record['device']}{', ' + record['gpu'] if record.get('gpu') else ''})", "",
             f"Llama {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads / {a['kv_heads']} KV heads, MLP {a['mlp']}, "
             f"vocab {record['vocab']}, {record['params']:,} parameters; {tr['steps']} steps, {tr['tokens']:,} tokens in "
             f"{tr['seconds']} s ({tr['tokens_per_s']:,.0f} tokens/s overall"
             + (f"; {tps:,.0f} tokens/s and {100 * mfu:.1f}% MFU at rows of {a['seq']}" if tps else "") + "); "
             f"tokens by row / longest document length {tr['tokens_by_row_and_doc_length']}. Held-out loss {ev['heldout']['loss']:.4f} nats/token "
             f"({ev['heldout']['blocks']} blocks of {a['seq']}, {ev['heldout']['data']}).", ""]
    ab = ev.get("ablation")
    if "ruler" in ev or ab:
        lines += [f"| task (RULER at {a['seq']}) | lm-eval score | samples | greedy, {GEN_TOKENS} tokens (the ablation's) | samples |",
                  "|---|---|---|---|---|"]
        for t in TASKS:
            r = ev.get("ruler", {})
            lm = r.get("metrics", {}).get(t)
            lines.append(f"| {t} | {'-' if lm is None else f'{lm:.3f}'} | {r.get('samples', {}).get(t, '-')} | "
                         f"{'-' if not ab else format(ab['teacher']['match'][t], '.3f')} | "
                         f"{'-' if not ab else ab['samples_per_task'][t]} |")
    if ab:
        lines += ["", f"Ablation ({ab['method']}; RULER score of {GEN_TOKENS}-token greedy generations on lm-eval's samples, "
                  "held-out loss in nats/token):", "",
                  "| layer | " + " | ".join(TASKS) + " | mean | drop | held-out loss | delta loss |", "|---" * (len(TASKS) + 5) + "|"]
        base = ab["teacher"]
        lines.append("| none (teacher) | " + " | ".join(f"{base['match'][t]:.3f}" for t in TASKS)
                     + f" | {base['mean']:.3f} | - | {base['heldout_loss']:.4f} | - |")
        for r in ab["layers"]:
            lines.append(f"| {r['layer']} | " + " | ".join(f"{r['match'][t]:.3f}" for t in TASKS)
                         + f" | {r['mean']:.3f} | {r['drop']:+.3f} | {r['heldout_loss']:.4f} | {r['delta_loss']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path | None:
    ab = record["eval"].get("ablation")
    if not ab:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridize.atomic_io import save_figure

    layers = [r["layer"] for r in ab["layers"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(TASKS)
    for j, t in enumerate(TASKS):
        a1.bar([l + (j - 1.5) * width for l in layers], [r["match"][t] for r in ab["layers"]], width, label=t)
    a1.axhline(ab["teacher"]["mean"], color="k", ls="--", lw=1, label="teacher (mean)")
    a1.set(xlabel="mean-ablated layer", ylabel=f"RULER score ({GEN_TOKENS}-token greedy)", title="RULER niah with one layer's attention ablated",
           xticks=layers, ylim=(0, 1.05))
    a1.legend(fontsize=7)
    a2.bar(layers, [r["delta_loss"] for r in ab["layers"]], color="C4")
    a2.set(xlabel="mean-ablated layer", ylabel="held-out loss increase (nats/token)", title="language modelling", xticks=layers)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def write_report(record: dict[str, Any], out: Path, json_path: Path) -> None:
    from hybridize.atomic_io import write_json, write_json_text

    md = markdown(record)
    write_json_text(out / "recall_teacher.md", md)
    plot(record, out / "recall_ablation.png")
    write_json(json_path, record)
    print("\n" + md, flush=True)
    print(f"wrote {json_path}, {out / 'recall_teacher.md'}, {out / 'recall_ablation.png'}, {out / 'teacher'}", flush=True)
