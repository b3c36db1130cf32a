"""Train the recall teacher of issue 20: a 12-layer GQA Llama that finds needles at 2048 tokens, then measure it.

The teacher trains on rows of bench/recall_data.py: RULER-style retrieval documents (needles in repeated-sentence,
essay and needle haystacks; several keys, values and queries; variable tracking; after lm-eval's question, more
questions about the haystack's other needles), from position 0 of a row and packed while they fit, then natural
text (TinyStories, essays); and plain natural-text rows. Curriculum (:data:`SHORT_PHASES`): rows of 512 holding
documents of at most 192 tokens drawn from :data:`recall_data.DENSE_MIX` (30% of the run: several short documents
per row, each needle close to its question, mostly needle haystacks asked several times), then all kinds with
documents up to 512, then rows and documents of 1024 (10% each), then the full length (50%), at a constant number
of tokens per step. On the CPU (2 layers, d=128, rows of 512) documents near the row length kept the answer digits
at chance for 12M tokens, while 192-token packed documents of the dense mix reached 0.91-0.93 answer-token accuracy
after 10-14M tokens, twice (docs/benchmarks.md, issue 20). Loss: the mean next-token
cross-entropy over all tokens plus ``--answer-weight`` x the mean over the answer tokens (and their EOS), so the
few answer tokens per row are not drowned by the haystack. AdamW (hybridize's ``Optimization``: fused on CUDA,
clipping 1.0) with warm-up and a cosine to 10% over the run's progress (its steps, or its wall-clock budget with
``--minutes``). bf16 autocast on CUDA, fp32 on CPU; torch.compile only with ``--compile``.

After training (bench/recall_eval.py): RULER niah_single_1/2 and niah_multikey_1/2 at the training length through
the project's own ``lm-eval`` evaluator (``--eval-limit`` samples each, essays from ../shared/data/pg_essays), the
held-out loss on TinyStories the teacher never saw, and a per-layer ablation (each layer's attention output
replaced by its mean over held-out text): the drop in each niah task (16-token greedy generations on lm-eval's own
samples) and in held-out loss, so the table says where retrieval lives.

Outputs in ``--out``: ``teacher/`` (an HF Llama directory with its tokenizer, fp32 weights that are exactly the
bf16-rounded ones; load it as any hybridize teacher), ``teacher.bf16.tar.NN`` (the same teacher in bf16 as a tar
split into pieces of ``--part-mb`` MiB, to move between machines: ``join`` rebuilds ``teacher/``),
``recall_teacher.json`` (settings, training log, tokens/s, RULER, ablation; ``--json`` elsewhere),
``recall_teacher.md`` (the tables) and ``recall_ablation.png``.

    python bench/recall_teacher.py train --device cuda --minutes 6.5 --out runs/recall12/teacher_run       # one H200
    python bench/recall_teacher.py train --device cpu --preset tiny --steps 20 --eval-limit 4 --out /tmp/rt  # smoke
    python bench/recall_teacher.py join runs/recall12/teacher_run runs/recall12/teacher                     # pieces -> teacher/
    python bench/recall_teacher.py corpus --teacher runs/recall12/teacher --out runs/recall12/corpus.jsonl --tokens 2e6

(``python bench/recall_teacher.py --device ...`` without a subcommand means ``train``.)
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recall_data as rd  # noqa: E402

#: model and run shapes: recall12 is the issue's teacher; tiny is the CPU test's; cpu a CPU-sized check of the recipe
PRESETS: dict[str, dict[str, Any]] = {
    "recall12": dict(layers=12, hidden=384, heads=6, kv_heads=2, mlp=1024, vocab=4096, seq=2048,
                     batch_tokens=65_536, micro_tokens=65_536, lr=2e-3),
    "cpu": dict(layers=4, hidden=128, heads=2, kv_heads=1, mlp=384, vocab=2048, seq=512,
                batch_tokens=16_384, micro_tokens=8_192, lr=3e-3),
    "tiny": dict(layers=2, hidden=64, heads=2, kv_heads=1, mlp=128, vocab=1024, seq=512,
                 batch_tokens=2_048, micro_tokens=1_024, lr=3e-3),
}
TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2")
PART_PREFIX = "teacher.bf16.tar."


# -- command line ---------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "join", "corpus", "-h", "--help"):
        argv = ["train", *argv]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train, evaluate, ablate, save")
    t.add_argument("--out", required=True, help="output directory (refused when it is not empty)")
    t.add_argument("--preset", choices=sorted(PRESETS), default="recall12")
    for name in ("layers", "hidden", "heads", "kv-heads", "mlp", "vocab", "seq", "batch-tokens", "micro-tokens"):
        t.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of the training loop (0 = none)")
    t.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = until --minutes)")
    t.add_argument("--warmup", type=float, default=0.03, help="warm-up share of the run")
    t.add_argument("--answer-weight", type=float, default=1.0, help="weight of the answer tokens' mean loss")
    t.add_argument("--doc-max", type=int, default=0, help="longest retrieval document in every phase (0 = the curriculum's)")
    t.add_argument("--mix", default="", help="row kinds and shares, e.g. single_repeat=1,text=1 (default recall_data.DEFAULT_MIX)")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--workers", type=int, default=-1, help="data processes (-1 = auto: 0 on CPU, up to 8 on CUDA)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=float, default=15.0, help="seconds between progress lines")
    t.add_argument("--eval-limit", type=int, default=100, help="RULER samples per task (0 = no evaluation)")
    t.add_argument("--eval-batch", type=int, default=0, help="lm-eval batch size (0 = 32 on CUDA, 8 on CPU)")
    t.add_argument("--ablation-limit", type=int, default=-1, help="samples per task for the ablation (-1 = --eval-limit, 0 = none)")
    t.add_argument("--heldout-blocks", type=int, default=16)
    t.add_argument("--part-mb", type=int, default=16, help="size of the bf16 pieces in MiB")
    t.add_argument("--peak-tflops", type=float, default=989.4, help="MFU denominator (H100/H200 bf16 dense datasheet)")
    t.add_argument("--essays", default=str(rd.ESSAYS))
    t.add_argument("--stories", default=str(rd.STORIES))
    t.add_argument("--json", default=None, help="results JSON (default OUT/recall_teacher.json)")
    j = sub.add_parser("join", help="rebuild teacher/ (fp32) from the bf16 pieces")
    j.add_argument("parts", help="directory holding teacher.bf16.tar.NN (and recall_teacher.json to check the hash)")
    j.add_argument("out", help="the teacher directory to write (refused when it exists and is not empty)")
    c = sub.add_parser("corpus", help="write a compare corpus of rows that fill data.seq_len blocks exactly")
    c.add_argument("--teacher", required=True, help="the teacher directory (its tokenizer)")
    c.add_argument("--out", required=True, help="the .jsonl file to write (refused when it exists)")
    c.add_argument("--tokens", type=float, default=2e6)
    c.add_argument("--seq", type=int, default=2048)
    c.add_argument("--seed", type=int, default=1000)
    c.add_argument("--essays", default=str(rd.ESSAYS))
    c.add_argument("--stories", default=str(rd.STORIES))
    args = ap.parse_args(argv)
    if args.cmd == "train":
        for k, v in PRESETS[args.preset].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    return args


def check_train(args: argparse.Namespace) -> list[str]:
    """Every problem of the train settings, before anything is written."""
    p = []
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.append(f"--out {args.out!r} exists and is not an empty directory; give a new directory")
    if args.minutes <= 0 and args.steps <= 0:
        p.append("give a budget: --minutes M (wall clock) and/or --steps N (both > 0)")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.append(f"--hidden ({args.hidden}) must divide by --heads ({args.heads}) and --heads by --kv-heads ({args.kv_heads})")
    if args.seq < 256:
        p.append(f"--seq must be >= 256 (the smallest retrieval document); got {args.seq}")
    rows = args.batch_tokens // args.seq
    if rows < 1 or args.batch_tokens % args.micro_tokens or args.micro_tokens % args.seq:
        p.append(f"--batch-tokens ({args.batch_tokens}) must be a multiple of --micro-tokens ({args.micro_tokens}), "
                 f"itself a multiple of --seq ({args.seq})")
    for flag, path in (("--essays", args.essays), ("--stories", args.stories)):
        if not Path(path).exists():
            p.append(f"{flag} {path!r} does not exist; copy ../shared/data into REPO/shared/data on a machine without it")
    try:
        parse_mix(args.mix)
    except ValueError as exc:
        p.append(f"--mix {args.mix!r}: {exc}; give kind=share pairs with kinds among {', '.join(rd.KINDS)}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        p.append(f"--device {args.device} but CUDA is not available here; use --device cpu")
    return p


def parse_mix(text: str) -> dict[str, float] | None:
    if not text:
        return None
    mix = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    if set(mix) - set(rd.KINDS) or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError("unknown kind or no positive share")
    return mix


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


# -- model ----------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, tok: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.model.teacher import ATTN_IMPLEMENTATION

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                      max_position_embeddings=args.seq, rope_theta=10_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.02, attn_implementation=ATTN_IMPLEMENTATION)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def flops_per_token(model: torch.nn.Module, T: int) -> float:
    """Training FLOPs per token: 6 x matmul weights (the tied output projection counted once as a matmul) plus
    causal attention's QK^T and AV (forward 2 x T x H*D per layer on average, times 3 with the backward)."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    n += c.vocab_size * c.hidden_size  # the lm_head matmul (its weight is the embedding's)
    return 6.0 * n + 6.0 * c.num_hidden_layers * T * c.num_attention_heads * c.head_dim


# -- data -----------------------------------------------------------------------------------------------
#: the curriculum before rows of the full length: (end of phase as a share of the run, row length, longest document);
#: the first phase draws recall_data.DENSE_MIX, the others the whole mix
SHORT_PHASES = ((0.30, 512, 192), (0.40, 512, 512), (0.50, 1024, 1024))


def lengths(seq: int) -> list[tuple[float, int, int]]:
    """The curriculum: (end of phase as a share of the run, row length, longest retrieval document). Short documents
    packed several to a row first (many answers per row, needles close to their question), then longer ones."""
    short = [(end, min(T, seq), min(d, seq)) for end, T, d in SHORT_PHASES if min(d, seq) < seq]
    return short + [(1.0, seq, seq)]


def phase(progress: float, seq: int) -> tuple[int, int, bool]:
    """(row length, longest document, whether the dense mix) at ``progress`` in [0, 1)."""
    phases = lengths(seq)
    i = next(i for i, (end, _, _) in enumerate(phases) if progress < end or end == 1.0)
    return phases[i][1], phases[i][2], i == 0 and len(phases) > 1


_WORKER: dict[str, Any] = {}


def _init_worker(data: rd.RecallData) -> None:
    torch.set_num_threads(1)
    _WORKER["data"] = data


def _worker_batch(seed: int, T: int, rows: int, doc_max: int, mix: dict[str, float] | None) -> tuple[Any, Any]:
    return _WORKER["data"].batch(seed, T, rows, doc_max, mix)


class Batches:
    """Training batches made ahead by ``workers`` processes (or here with 0): batch i comes from seed
    (run seed, i), with the row length the curriculum gives at the progress when it is asked for."""

    def __init__(self, data: rd.RecallData, seed: int, workers: int):
        self.data, self.seed, self.next_i = data, seed, 0
        self.pool, self.queue = None, []
        if workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(data,))
            self.depth = 2 * workers

    def _seed(self, i: int) -> int:
        return self.seed * 1_000_003 + i

    def get(self, T: int, rows: int, doc_max: int, mix: dict[str, float] | None = None) -> tuple[Any, Any]:
        if self.pool is None:
            self.next_i += 1
            return self.data.batch(self._seed(self.next_i - 1), T, rows, doc_max, mix)
        key = (T, rows, doc_max, tuple(sorted((mix or {}).items())))
        self.queue = [q for q in self.queue if q[0] == key]  # a new phase: drop the old phase's batches
        while len(self.queue) < self.depth:
            self.queue.append((key, self.pool.submit(_worker_batch, self._seed(self.next_i), T, rows, doc_max, mix)))
            self.next_i += 1
        return self.queue.pop(0)[1].result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# -- training -------------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def step_loss(model: torch.nn.Module, ids: torch.Tensor, flags: torch.Tensor, n_all: int, n_ans: int,
              answer_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step loss (sum over its tokens / the step's token counts) and its sums.

    Shape:
        ids, flags: (b, T) -> loss ()
    """
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (b, T-1, V)
    target, ans = ids[:, 1:], flags[:, 1:].float()
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view_as(ans)
    loss = ce.sum() / n_all + answer_weight * (ce * ans).sum() / max(n_ans, 1)
    hit = (logits.argmax(-1) == target).float() * ans
    return loss, {"ce": ce.detach().sum(), "ans_ce": (ce.detach() * ans).sum(), "ans_hit": hit.sum()}


def train(model: torch.nn.Module, data: rd.RecallData, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The training loop; returns its record (log lines, tokens, seconds, tokens/s, MFU)."""
    from hybridize.training.loop import LoopConfig, Optimization, autocast_for

    budget_s, progress = args.minutes * 60.0, {"p": 0.0}
    warm, lo = args.warmup, 0.1

    def schedule(_step: int) -> float:
        p = progress["p"]
        if p < warm:
            return max(p / warm, 1e-3)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, (p - warm) / (1 - warm))))

    cfg = LoopConfig(steps=max(args.steps, 1), batch_size=1, micro_batch_size=1, lr=args.lr, betas=(0.9, 0.95),
                     weight_decay=args.weight_decay, grad_clip=1.0)
    opt = Optimization(param_groups(model, args.weight_decay), cfg, device, schedule=schedule)
    net = torch.compile(model) if args.compile else model
    workers = args.workers if args.workers >= 0 else (0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 4)))
    batches = Batches(data, args.seed, workers)
    log, phases, step, tokens, flops, skipped = [], {}, 0, 0, 0.0, 0
    t0 = last_t = time.perf_counter()
    sums = {"ce": 0.0, "ans_ce": 0.0, "ans_hit": 0.0, "n": 0, "n_ans": 0, "tokens": 0}
    print(f"[train] {sum(p.numel() for p in model.parameters()):,} params; curriculum {lengths(args.seq)}; "
          f"{args.batch_tokens:,} tokens/step; {workers} data workers; budget "
          f"{'%g min' % args.minutes if budget_s else ''}{' / ' if budget_s and args.steps else ''}"
          f"{'%d steps' % args.steps if args.steps else ''}", flush=True)
    try:
        while True:
            elapsed = time.perf_counter() - t0
            progress["p"] = max(step / args.steps if args.steps else 0.0, elapsed / budget_s if budget_s else 0.0)
            if progress["p"] >= 1.0:
                break
            T, doc_max, dense = phase(progress["p"], args.seq)
            doc_max = min(args.doc_max, T) if args.doc_max else doc_max
            mix = rd.DENSE_MIX if dense and not args.mix else None  # --mix: the same kinds throughout
            ids, flags = (torch.from_numpy(a) for a in batches.get(T, args.batch_tokens // T, doc_max, mix))
            n_all, n_ans = ids[:, 1:].numel(), int(flags[:, 1:].sum())  # on the host: no device sync
            ids, flags = ids.to(device, non_blocking=True), flags.to(device, non_blocking=True)
            for i in range(0, ids.shape[0], max(1, args.micro_tokens // T)):
                sl = slice(i, i + max(1, args.micro_tokens // T))
                with autocast_for(device):
                    loss, parts = step_loss(net, ids[sl], flags[sl], n_all, n_ans, args.answer_weight)
                loss.backward()
                opt.watch(loss)
                for k, v in parts.items():
                    sums[k] = sums[k] + v  # on the device: read at the next progress line, no sync per step
            if not opt.take_finite():  # a NaN / inf loss: drop this step's gradients, count it, go on
                opt.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                if skipped > 10:
                    raise RuntimeError(f"recall_teacher: {skipped} steps with a non-finite loss; lower --lr (now {args.lr})")
                continue
            opt.step()
            step, tokens = step + 1, tokens + ids.numel()
            flops += flops_per_token(model, T) * ids.numel()
            name = f"{T}/{doc_max}" + ("/dense" if mix else "")
            phases[name] = phases.get(name, 0) + ids.numel()
            sums["n"] += n_all
            sums["n_ans"] += n_ans
            sums["tokens"] += ids.numel()
            now = time.perf_counter()
            if now - last_t >= args.log_every or step == 1 or (args.steps and step == args.steps):
                log.append(_log_line(step, T, tokens, now - t0, now - last_t, {k: float(v) for k, v in sums.items()},
                                     opt.last_lr, flops, args, device))
                sums = dict.fromkeys(sums, 0) | {"ce": 0.0, "ans_ce": 0.0, "ans_hit": 0.0}
                last_t, flops = now, 0.0
    finally:
        batches.close()
    seconds = time.perf_counter() - t0
    return {"steps": step, "tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "tokens_by_row_and_doc_length": phases, "workers": workers,
            "skipped_nonfinite_steps": skipped, "log": log}


def _log_line(step: int, T: int, tokens: int, elapsed: float, window: float, sums: dict[str, float], lr: float,
              flops: float, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rec = {"step": step, "row_length": T, "tokens": tokens, "elapsed_s": round(elapsed, 1),
           "tokens_per_s": round(sums["tokens"] / max(window, 1e-9)), "loss": round(sums["ce"] / max(sums["n"], 1), 4),
           "answer_loss": round(sums["ans_ce"] / max(sums["n_ans"], 1), 4),
           "answer_token_acc": round(sums["ans_hit"] / max(sums["n_ans"], 1), 4), "lr": lr,
           "mfu": round(flops / max(window, 1e-9) / (args.peak_tflops * 1e12), 4)}
    print(f"[train] step {step:5d}  T {T:4d}  {tokens / 1e6:8.2f}M tok  {rec['tokens_per_s']:>9,} tok/s  loss {rec['loss']:.3f}  "
          f"answer {rec['answer_loss']:.3f} (acc {rec['answer_token_acc']:.3f})  lr {lr:.2e}  MFU {100 * rec['mfu']:.1f}%  "
          f"{elapsed:.0f}s", flush=True)
    return rec


# -- saving and moving the teacher --------------------------------------------------------------------------
def round_to_bf16(model: torch.nn.Module) -> None:
    """Round every weight to bf16 in place (kept in fp32): the teacher is then exactly its bf16 copy."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def save_teacher(model: torch.nn.Module, tok: Any, out: Path, part_mb: int) -> dict[str, Any]:
    """``out/teacher`` (fp32) and ``out/teacher.bf16.tar.NN`` (the bf16 copy as a split tar); their record."""
    import tempfile

    teacher = out / "teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    with tempfile.TemporaryDirectory(prefix="recall-bf16-") as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        model.float()
        tok.save_pretrained(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in sorted(Path(tmp).iterdir()):
                tar.add(f, arcname=f.name)
    blob = buf.getvalue()
    size = part_mb * 2**20
    parts = []
    for i in range(0, len(blob), size):
        path = out / f"{PART_PREFIX}{i // size:02d}"
        path.write_bytes(blob[i : i + size])
        parts.append(path.name)
    return {"dir": str(teacher), "parts": parts, "tar_bytes": len(blob), "tar_sha256": hashlib.sha256(blob).hexdigest(),
            "fp32_bytes": sum(f.stat().st_size for f in teacher.iterdir())}


def join(parts_dir: str | Path, out: str | Path) -> Path:
    """Rebuild the fp32 teacher directory from the bf16 pieces (hash checked against recall_teacher.json when present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import tempfile

    parts_dir, out = Path(parts_dir), Path(out)
    parts = sorted(parts_dir.glob(PART_PREFIX + "*"))
    if not parts:
        raise SystemExit(f"join: no {PART_PREFIX}NN pieces in {str(parts_dir)!r}; give the directory that holds them")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"join: {str(out)!r} exists and is not empty; give a new directory")
    blob = b"".join(p.read_bytes() for p in parts)
    record = parts_dir / "recall_teacher.json"
    if record.is_file():
        want = json.loads(record.read_text())["teacher"]["tar_sha256"]
        if hashlib.sha256(blob).hexdigest() != want:
            raise SystemExit(f"join: the pieces in {str(parts_dir)!r} do not hash to recall_teacher.json's tar_sha256; copy them again")
    with tempfile.TemporaryDirectory(prefix="recall-join-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(tmp, filter="data")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).float()
        tok = AutoTokenizer.from_pretrained(tmp)
        tmp_out = out.with_name(out.name + ".partial")
        model.save_pretrained(tmp_out)
        tok.save_pretrained(tmp_out)
        os.replace(tmp_out, out)
    return out


# -- the commands -----------------------------------------------------------------------------------------
def make_tokenizer(args: argparse.Namespace, strings: rd.RulerStrings) -> Any:
    texts = rd.story_paragraphs(args.stories) + rd.essay_paragraphs(args.essays)
    return rd.build_tokenizer(rd.tokenizer_corpus(strings, texts, seed=args.seed), vocab_size=args.vocab)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    import recall_eval as re_

    problems = check_train(args)
    if problems:
        raise SystemExit("recall_teacher train: " + "; ".join(problems))
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    strings = rd.ruler_strings()
    tok = make_tokenizer(args, strings)
    data, held = rd.load(tok, essays_dir=args.essays, stories=args.stories, seed=args.seed, mix=parse_mix(args.mix))
    model = build_model(args, tok).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"args": vars(args), "device": str(device), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                              "flops_per_token_at_seq": flops_per_token(model, args.seq), "mix": data.mix}
    record["train"] = train(model.train(), data, args, device)
    model.eval()
    round_to_bf16(model)
    record["teacher"] = save_teacher(model, tok, out, args.part_mb)
    record["teacher"]["parts_dir"] = str(out)
    json_path = Path(args.json) if args.json else out / "recall_teacher.json"
    # the record so far, before the evaluation: a run stopped during it (a device call's time limit) still leaves
    # pieces that `join` can check against their hash
    from hybridize.atomic_io import write_json

    write_json(json_path, {**record, "eval": None, "note": "written before the evaluation; replaced when it ends"})
    record["eval"] = re_.evaluate(model, tok, held, args, device)
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    re_.write_report(record, out, json_path)
    return record


def cmd_corpus(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"recall_teacher corpus: --out {args.out!r} exists; give a new file")
    if not Path(args.teacher).is_dir():
        raise SystemExit(f"recall_teacher corpus: --teacher {args.teacher!r} is not a directory; train or join the teacher first")
    tok = AutoTokenizer.from_pretrained(args.teacher)
    data, _ = rd.load(tok, essays_dir=args.essays, stories=args.stories, seed=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = rd.write_corpus(data, out, tokens=int(args.tokens), T=args.seq, seed=args.seed)
    print(f"[corpus] {summary['rows']} rows of {args.seq} tokens ({summary['documents']} documents) -> {out}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.cmd == "join":
        print(f"[join] {join(args.parts, args.out)}", flush=True)
    elif args.cmd == "corpus":
        cmd_corpus(args)
    else:
        cmd_train(args)


if __name__ == "__main__":
    main()
