"""``heldout-kl`` (KL(teacher || model) and perplexities on held-out blocks) and ``perplexity``.

Inside a run both use the run's held-out blocks (and its teacher); on a saved model they read
``data`` (a text / jsonl / parquet file or directory) and, for heldout-kl, load ``teacher``.
"""
from __future__ import annotations

import math
from typing import Any

import attrs

from hybridize import hookimpl
from hybridize.errors import ConfigError
from hybridize.evaluate import EvalResult, EvalTarget

ge1 = attrs.validators.ge(1)


@attrs.frozen(kw_only=True)
class HeldoutKLConfig:
    """Options of ``heldout-kl``.

    Args:
        teacher: teacher directory or hub id; None = the run's teacher.
        data: evaluation text (file, directory or hub id); None = the run's held-out blocks.
        seq_len: block length when reading ``data``.
        blocks: blocks evaluated (the first ones).
        batch_size: blocks per forward.
        chunk_tokens: tokens per chunk of the KL (bounds the fp32 logits in memory).
    """

    teacher: str | None = None
    data: str | None = None
    seq_len: int = attrs.field(default=256, validator=attrs.validators.ge(2))
    blocks: int = attrs.field(default=32, validator=ge1)
    batch_size: int = attrs.field(default=8, validator=ge1)
    chunk_tokens: int = attrs.field(default=1024, validator=ge1)


@attrs.frozen(kw_only=True)
class PerplexityConfig:
    """Options of ``perplexity``: ``data`` (None = the run's held-out blocks), ``seq_len``, ``blocks``, ``batch_size``."""

    data: str | None = None
    seq_len: int = attrs.field(default=256, validator=attrs.validators.ge(2))
    blocks: int = attrs.field(default=32, validator=ge1)
    batch_size: int = attrs.field(default=8, validator=ge1)
    chunk_tokens: int = attrs.field(default=1024, validator=ge1)


def eval_blocks(name: str, data: str | None, target: EvalTarget, seq_len: int, blocks: int) -> Any:
    """The first ``blocks`` token blocks of ``data``, or of the run's held-out set."""
    if data is None:
        if target.heldout is None:
            raise ConfigError(f"evaluator {name!r} field 'data' is required outside a run: a text/jsonl/parquet file or directory")
        return target.heldout[:blocks]
    from hybridize.training.data import load_documents, pack, tokenize_documents

    docs = load_documents(data, field="data", text_field="text")
    tokens = tokenize_documents(docs, target.tokenizer, max_tokens=seq_len * blocks + 1)
    return pack(tokens, seq_len, field="data")[:blocks]


def check_data(name: str, data: str | None) -> list[str]:
    """``data``, when set, must be readable text (read now, before a run writes anything)."""
    from hybridize.training.data import DataError, load_documents

    if data is None:
        return []
    try:
        load_documents(data, field="data", text_field="text")
    except DataError as exc:
        return [f"evaluator {name!r}: {exc}"]
    return []


class HeldoutKL:
    """KL(teacher || model), model and teacher perplexity on held-out blocks."""

    def __init__(self, config: HeldoutKLConfig):
        self.config = config

    def check(self, tokenizer: Any) -> list[str]:
        """Its data file and its own teacher (without loading weights), when set."""
        from hybridize.errors import HybridizeError
        from hybridize.model.teacher import inspect_teacher

        problems = check_data("heldout-kl", self.config.data)
        if self.config.teacher is not None:
            try:
                inspect_teacher(self.config.teacher)
            except HybridizeError as exc:
                problems.append(f"evaluator 'heldout-kl' field 'teacher': {exc}")
        return problems

    def __call__(self, target: EvalTarget) -> EvalResult:
        from hybridize.distill.stages import HeldoutEvaluator

        cfg = self.config
        teacher = target.teacher
        if cfg.teacher is not None:
            from hybridize.model.teacher import load_teacher

            teacher = load_teacher(cfg.teacher, device=target.device).model
        if teacher is None:
            raise ConfigError("evaluator 'heldout-kl' field 'teacher' is required outside a run: the teacher's directory or hub id")
        blocks = eval_blocks("heldout-kl", cfg.data, target, cfg.seq_len, cfg.blocks)
        ev = HeldoutEvaluator(teacher, blocks, batch_size=cfg.batch_size, chunk=cfg.chunk_tokens, device=target.device)
        out = ev(target.model)
        metrics = {"heldout_kl": out["heldout_kl"], "student_ppl": out["student_ppl"], "teacher_ppl": ev.teacher_ppl()}
        return EvalResult(metrics=metrics, details={"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]),
                                                    "data": cfg.data or "run held-out blocks"})


class Perplexity:
    """exp(mean next-token cross-entropy) of the model on held-out blocks."""

    def __init__(self, config: PerplexityConfig):
        self.config = config

    def check(self, tokenizer: Any) -> list[str]:
        """Its data file, when set."""
        return check_data("perplexity", self.config.data)

    def __call__(self, target: EvalTarget) -> EvalResult:
        import torch

        from hybridize.training.losses import chunked_ce

        cfg = self.config
        blocks = eval_blocks("perplexity", cfg.data, target, cfg.seq_len, cfg.blocks)
        model, ces = target.model, []
        for b in blocks.split(cfg.batch_size):
            ids = b.to(target.device)
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            ces.append(chunked_ce(h, labels, model.lm_head, chunk_tokens=cfg.chunk_tokens) * b.shape[0])
        ce = float(torch.stack(ces).sum()) / blocks.shape[0]
        return EvalResult(metrics={"perplexity": math.exp(ce)},
                          details={"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]), "data": cfg.data or "run held-out blocks"})


def heldout_kl(config: HeldoutKLConfig) -> HeldoutKL:
    """Factory of ``heldout-kl``."""
    return HeldoutKL(config)


def perplexity(config: PerplexityConfig) -> Perplexity:
    """Factory of ``perplexity``."""
    return Perplexity(config)


@hookimpl
def hybridize_register_evaluators(register) -> None:
    """Register ``heldout-kl`` and ``perplexity``."""
    register("heldout-kl", heldout_kl, HeldoutKLConfig, capabilities=frozenset({"needs-teacher"}))
    register("perplexity", perplexity, PerplexityConfig)
