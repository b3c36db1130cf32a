"""Healing an export: a short KL stage that trains a converted model (a stock class) towards the hybrid it came from.

Where an export layout holds a hybrid only approximately (q/k norms it adds, biases it drops), the converted
model is distilled to the hybrid's next-token distribution exactly as stage 2 distils a student to its teacher
(:func:`hybridize.distill.stages.stage2_loss`, the chunked KL, the shared training loop), the hybrid frozen.
The held-out KL(hybrid || converted) is measured before and after, on the same blocks.
"""
from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from hybridize.distill.stages import HeldoutEvaluator, stage2_loss
from hybridize.training.data import PackedData
from hybridize.training.loop import Loop, LoopConfig, param_groups

_v = attrs.validators


@attrs.frozen(kw_only=True)
class HealConfig:
    """Budget and optimisation of a heal (the attention and linear-attention layers train at ``lr``, the rest at
    ``lr_other``; AdamW, cosine schedule after a short warm-up, clip 1.0)."""

    tokens: int = attrs.field(validator=_v.gt(0))
    lr: float = attrs.field(default=1e-3, validator=_v.gt(0.0))
    lr_other: float = attrs.field(default=1e-4, validator=_v.gt(0.0))
    batch_size: int = attrs.field(default=8, validator=_v.gt(0))
    eval_blocks: int = attrs.field(default=32, validator=_v.gt(0))
    chunk_tokens: int = attrs.field(default=1024, validator=_v.gt(0))
    seed: int = 0


def _is_mixer(name: str) -> bool:
    return ".self_attn." in name or ".linear_attn." in name


def heal(source: Any, target: Any, data: PackedData, cfg: HealConfig, *, device: torch.device,
         progress: bool = True) -> dict[str, Any]:
    """Train ``target`` by KL to ``source`` for ``cfg.tokens`` tokens of ``data.train``; return what happened.

    Returns:
        ``tokens``, ``steps``, ``heldout_kl_before`` / ``heldout_kl_after`` (on ``cfg.eval_blocks`` held-out
        blocks), the evaluation ``history`` and the settings.
    """
    source.eval().requires_grad_(False)
    held = data.heldout[: cfg.eval_blocks]
    evaluator = HeldoutEvaluator(source, held, batch_size=cfg.batch_size, chunk=cfg.chunk_tokens, device=device)
    before = evaluator(target)["heldout_kl"]
    steps = math.ceil(cfg.tokens / (cfg.batch_size * data.seq_len))
    target.train().requires_grad_(True)
    groups = [g for g in param_groups(target.named_parameters(), _is_mixer) if g["params"]]
    lrs = [cfg.lr if g["name"] == "attention" else cfg.lr_other for g in groups]
    loop_cfg = LoopConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=lrs,
                          warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 5), seed=cfg.seed)
    loop = Loop(name="heal", model=target, param_groups=groups, loss_fn=lambda ids: stage2_loss(
        source, target, ids, 1.0, cfg.chunk_tokens), blocks=data.train, cfg=loop_cfg, device=device,
        evaluate=lambda: evaluator(target), progress=progress)
    history = loop.run()
    target.eval().requires_grad_(False)
    after = evaluator(target)["heldout_kl"]
    return {"tokens": loop.tokens, "steps": loop.step, "heldout_kl_before": before, "heldout_kl_after": after,
            "heldout_blocks": int(held.shape[0]), "seq_len": data.seq_len, "history": history,
            "config": attrs.asdict(cfg)}
