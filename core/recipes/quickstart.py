"""``hybridize quickstart``: the whole product offline, with no files and no network, in minutes on a CPU.

1. A built-in synthetic corpus mixes plain sentences with associative-recall episodes: a ``facts``
   section lists key=value pairs as single tokens (``k3=v7``), plain text follows, then a ``query``
   section asks every key again and the next token is its value. Only attention that looks the key
   up in context can answer: a layer the hybrid turns linear loses that precision first.
2. A small Llama teacher (4 layers, d=64) is trained on it here and cached under
   ``~/.cache/hybridize/quickstart/`` (``$HYBRIDIZE_CACHE`` or ``--cache-dir`` elsewhere), keyed by
   every setting that shapes it, so the second run starts at once.
3. The recall task is written as a real lm-evaluation-harness task (``hybridize_recall``: a YAML
   file and a jsonl of held-out episodes, generation, exact match) next to the teacher.
4. ``hybridize compare`` runs kl-greedy-add vs uniform vs random at one softmax ratio over two
   seeds, with held-out KL and the recall task as evaluators, and prints the table and the plots.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from hybridize.atomic_io import write_json_text

NOUNS = "cat dog bird fish girl boy king queen tree ship hat cake".split()
VERBS = "sees likes finds takes makes helps".split()
ADJS = "big small red blue old new happy sad".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TASK = "hybridize_recall"
#: bump when the corpus, the teacher or its training change, so cached teachers are rebuilt
TEACHER_VERSION = 1


@attrs.frozen(kw_only=True)
class RecallSpec:
    """The synthetic corpus, the teacher and how it is trained (all of it keys the cache).

    Args:
        n_keys / n_values: key and value alphabets; every (key, value) pair is one token.
        n_pairs: facts per episode (all queried, in a random order).
        seq_len: tokens per document, BOS and EOS included (documents are exactly one block).
        text_only_fraction: share of documents that are plain text.
        hidden / layers / heads / kv_heads: the teacher's shape.
        steps / batch_size / lr / answer_weight: teacher training (answer tokens weigh 1 + answer_weight).
        seed: seed of the teacher's data and initialisation.
    """

    n_keys: int = 12
    n_values: int = 8
    n_pairs: int = 8
    seq_len: int = 48
    text_only_fraction: float = 0.2
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    answer_weight: float = 3.0
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs ({self.n_pairs}) must be <= n_keys ({self.n_keys})")
        if self.text_tokens < 0:
            raise ValueError(f"seq_len {self.seq_len} is too short for {self.n_pairs} pairs; need >= {3 * self.n_pairs + 4}")

    @property
    def text_tokens(self) -> int:
        """Plain-text tokens inside an episode document."""
        return self.seq_len - 2 - (1 + self.n_pairs + 1 + 2 * self.n_pairs)

    def key(self) -> str:
        blob = json.dumps({**attrs.asdict(self), "version": TEACHER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def vocabulary(spec: RecallSpec) -> list[str]:
    words = ["facts", "query", "the", "."] + NOUNS + VERBS + ADJS
    words += [f"k{i}" for i in range(spec.n_keys)] + [f"v{j}" for j in range(spec.n_values)]
    words += [f"k{i}=v{j}" for i in range(spec.n_keys) for j in range(spec.n_values)]
    return SPECIALS + words


def build_tokenizer(spec: RecallSpec) -> Any:
    """A word-level fast tokenizer over the corpus vocabulary (what ``save_pretrained`` writes and reloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(spec))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096)


def _text(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        out += ["the", rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS), "the", rng.choice(NOUNS), "."]
    return out[:n]


def episode(rng: random.Random, spec: RecallSpec) -> tuple[list[str], list[int]]:
    """One recall document (words, without BOS/EOS) and the positions of its answers."""
    keys = rng.sample(range(spec.n_keys), spec.n_pairs)
    values = [rng.randrange(spec.n_values) for _ in keys]
    gap = spec.text_tokens
    a = rng.randint(0, gap)
    b = rng.randint(0, gap - a)
    words = _text(rng, a) + ["facts"] + [f"k{k}=v{v}" for k, v in zip(keys, values)] + _text(rng, b) + ["query"]
    answers = []
    for i in rng.sample(range(spec.n_pairs), spec.n_pairs):
        words.append(f"k{keys[i]}")
        answers.append(len(words))
        words.append(f"v{values[i]}")
    words += _text(rng, gap - a - b)
    return words, answers


def document(rng: random.Random, spec: RecallSpec) -> tuple[list[str], list[int]]:
    if rng.random() < spec.text_only_fraction:
        return _text(rng, spec.seq_len - 2), []
    return episode(rng, spec)


def corpus(spec: RecallSpec, n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(document(rng, spec)[0]) for _ in range(n_docs)]


def recall_docs(spec: RecallSpec, n: int, seed: int) -> list[dict[str, str]]:
    """Held-out recall questions: an episode cut right after one queried key; the answer is its value."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, answers = episode(rng, spec)
        pos = rng.choice(answers)
        out.append({"context": " ".join(["<s>"] + words[:pos]), "answer": words[pos]})
    return out


def teacher_loop_config(spec: RecallSpec) -> Any:
    """The teacher's optimisation settings (a LoopConfig; its schedule is its own: warm-up times cosine to 5%)."""
    from hybridize.training.loop import LoopConfig

    return LoopConfig(steps=spec.steps, batch_size=spec.batch_size, micro_batch_size=spec.batch_size, lr=spec.lr,
                      betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0)


def train_teacher(spec: RecallSpec, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train the teacher on fresh corpus documents and save it (HF directory with tokenizer) to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.training.loop import Optimization

    tok = build_tokenizer(spec)
    ids = {w: i for i, w in enumerate(vocabulary(spec))}
    cfg = LlamaConfig(vocab_size=len(ids), hidden_size=spec.hidden, intermediate_size=2 * spec.hidden, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg)
    rng = random.Random(spec.seed)
    warm = max(1, spec.steps // 10)
    opt = Optimization([{"params": list(model.parameters())}], teacher_loop_config(spec), torch.device("cpu"),
                       schedule=lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, spec.steps) / spec.steps))))

    def batch(n: int, r: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        rows, weights = [], []
        for _ in range(n):
            words, answers = document(r, spec)
            rows.append([ids["<s>"]] + [ids[w] for w in words] + [ids["</s>"]])
            w = [1.0] * spec.seq_len
            for p in answers:
                w[p + 1] += spec.answer_weight  # +1: BOS
            weights.append(w)
        return torch.tensor(rows), torch.tensor(weights)

    from tqdm.auto import tqdm

    bar = tqdm(range(spec.steps), desc="quickstart teacher", disable=not progress, unit="step", file=sys.stderr)
    t0 = time.perf_counter()
    for _ in bar:
        x, w = batch(spec.batch_size, rng)
        logits = model(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none")
        loss = (nll * w[:, 1:].reshape(-1)).sum() / w[:, 1:].sum()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    accuracy = recall_accuracy(model, tok, recall_docs(spec, 256, seed=10_000 + spec.seed))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"spec": attrs.asdict(spec), "version": TEACHER_VERSION, "train_seconds": round(time.perf_counter() - t0, 1),
            "train_tokens": spec.steps * spec.batch_size * spec.seq_len, "recall_accuracy": accuracy}
    (out / "quickstart.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@torch.no_grad()
def recall_accuracy(model: Any, tokenizer: Any, docs: list[dict[str, str]]) -> float:
    """Greedy next-token accuracy on recall questions (batched by context length, no padding)."""
    by_len: dict[int, list[tuple[list[int], int]]] = {}
    for d in docs:
        ids = tokenizer(d["context"], add_special_tokens=False)["input_ids"]
        by_len.setdefault(len(ids), []).append((ids, tokenizer.convert_tokens_to_ids(d["answer"])))
    hits = 0
    for group in by_len.values():
        x = torch.tensor([ids for ids, _ in group], device=model.device)
        pred = model(input_ids=x).logits[:, -1].argmax(-1).cpu()
        hits += int((pred == torch.tensor([a for _, a in group])).sum())
    return round(hits / len(docs), 4)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HYBRIDIZE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybridize"


def ensure_teacher(spec: RecallSpec, cache_dir: str | Path | None = None, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cached teacher for ``spec``, trained first if missing (written to a temporary name, then renamed)."""
    root = cache_root(cache_dir) / "quickstart"
    final = root / f"teacher-{spec.key()}"
    if (final / "quickstart.json").is_file():
        return final, json.loads((final / "quickstart.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".teacher-{spec.key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = train_teacher(spec, tmp, progress=progress)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, info


def write_recall_task(spec: RecallSpec, directory: Path, *, n_docs: int = 200, seed: int = 20_000) -> Path:
    """``hybridize_recall`` as an lm-eval task: ``DIR/hybridize_recall.yaml`` + ``DIR/recall.jsonl``.

    Give ``DIR`` to the ``lm-eval`` evaluator's ``include_path`` (or ``lm_eval --include_path``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "recall.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in recall_docs(spec, n_docs, seed)))
    yaml_text = f"""\
# written by hybridize quickstart: associative recall on the quickstart corpus
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
    regexes_to_ignore: ["\\\\s"]
metadata:
  version: {TEACHER_VERSION}
"""
    (directory / f"{TASK}.yaml").write_text(yaml_text)
    return directory


def quickstart_config(spec: RecallSpec, teacher: Path, corpus_path: Path, task_dir: Path, *, seeds: list[int], ratio: float,
                      selectors: list[str], recall_limit: int | None) -> dict[str, Any]:
    """The compare config the quickstart runs (a normal ``hybridize compare`` config; written to OUT)."""
    return {
        "teacher": str(teacher), "device": "cpu", "seed": seeds[0],
        "data": {"train": str(corpus_path), "seq_len": spec.seq_len, "heldout_fraction": 0.05},
        "linear_attention": {"name": "gdn"},
        "softmax_layers": ratio,
        "selection": {"stop": {"name": "fixed-budget"}, "probe_tokens": 49_152, "eval_every": 16,
                      "probe_lr_attn": 2e-3, "probe_lr_other": 2e-4},
        "distill": {"stage1_tokens": 98_304, "stage1_seq_len": spec.seq_len, "stage1_lr": 3e-3,
                    "stage2_tokens": 147_456, "stage2_lr_attn": 2e-3, "stage2_lr_other": 2e-4,
                    "batch_size": 32, "eval_blocks": 64, "warmup_fraction": 0.05, "checkpoint_every": 0},
        "evaluators": [{"name": "heldout-kl"},
                       {"name": "lm-eval", "tasks": [TASK], "include_path": [str(task_dir)], "limit": recall_limit,
                        "batch_size": 50}],
        "compare": {"selectors": selectors, "softmax_layers": [ratio], "seeds": seeds},
    }


def quickstart(out: str | Path = "hybridize-quickstart", *, cache_dir: str | Path | None = None, seeds: list[int] | None = None,
               ratio: float = 0.25, selectors: list[str] | None = None, recall_limit: int | None = None,
               overrides: Sequence[str] = (), spec: RecallSpec | None = None, n_docs: int = 6000,
               resume: bool = False, overwrite: bool = False, progress: bool = True, pm: Any = None) -> dict[str, Any]:
    """Build (or reuse) the teacher, write corpus and recall task, run the comparison (with the plugin manager ``pm``,
    default a new one, for its validation and its run). Returns compare.json's content.

    ``overrides`` are ``--set``-style ``key.path=value`` edits of the compare config (e.g.
    ``distill.stage2_tokens=300000``); ``spec`` and ``n_docs`` change the teacher and corpus (tests use tiny ones).
    """
    import yaml

    from hybridize.recipes.compare import compare, compare_config_from_dict
    from hybridize.recipes.rundir import prepare_out_dir
    from hybridize.recipes.runconfig import apply_overrides

    t0 = time.perf_counter()
    spec = spec or RecallSpec()
    out = prepare_out_dir(out, resume=resume, overwrite=overwrite, command="quickstart",
                          inputs={"the quickstart cache (--cache-dir)": str(cache_root(cache_dir))})
    teacher, info = ensure_teacher(spec, cache_dir, progress=progress)
    data_dir = teacher.parent / f"data-{spec.key()}-{n_docs}"
    corpus_path = data_dir / "corpus.txt"
    if not corpus_path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        write_json_text(corpus_path, "\n\n".join(corpus(spec, n_docs, seed=1)) + "\n")  # atomic (atomic_io)
    task_dir = write_recall_task(spec, data_dir / "lm_eval_tasks")
    tree = quickstart_config(spec, teacher, corpus_path, task_dir, seeds=seeds or [0, 1], ratio=ratio,
                             selectors=selectors or ["kl-greedy-add", "uniform", "random"], recall_limit=recall_limit)
    tree = apply_overrides(tree, overrides)
    (out / "quickstart.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    if pm is None:
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    base, ccfg = compare_config_from_dict(tree, pm=pm)
    result = compare(base, ccfg, out, resume=True, progress=progress, pm=pm)
    result["quickstart"] = {"teacher": str(teacher), "teacher_info": info, "task_dir": str(task_dir),
                            "wall_seconds": round(time.perf_counter() - t0, 1)}
    from hybridize.atomic_io import write_json

    write_json(out / "compare.json", result)
    return result
