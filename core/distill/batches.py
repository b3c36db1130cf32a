"""How the stages cut their data: stage 1's block length, blocks per optimizer step and per forward.

Stage 2 and 3 train on ``data.seq_len`` blocks, ``distill.batch_size`` per optimizer step and
``distill.micro_batch_size`` per forward. Stage 1 is layer-local and cheap per token, so it re-cuts the
blocks to ``stage1_seq_len`` (the paper's 512) and takes its own batch: ``stage1_batch_size`` blocks per
step (the paper's 96 x 512) and, by default, as many blocks per forward as keep the tokens per forward
of stage 2 (``micro_batch_size x data.seq_len``): a forward of 2 x 512 tokens leaves a GPU idle
between kernel launches, one of 16 x 512 does not.
"""
from __future__ import annotations

from typing import Any

import attrs
import torch

from hybridize.errors import ConfigError

#: the paper's stage-1 block length, taken when data.seq_len is a larger multiple of it
PAPER_STAGE1_SEQ_LEN = 512


@attrs.frozen
class Stage1Batch:
    """Stage 1's shape: block length, blocks per optimizer step (global), blocks per forward (per rank)."""

    seq_len: int
    batch_size: int
    micro_batch_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens_per_forward(self) -> int:
        return self.micro_batch_size * self.seq_len


def stage1_seq_len(cfg: Any, seq_len: int) -> int:
    """``distill.stage1_seq_len``, or 0 = 512 when ``seq_len`` is a larger multiple of it, else ``seq_len``."""
    if cfg.stage1_seq_len:
        return cfg.stage1_seq_len
    p = PAPER_STAGE1_SEQ_LEN
    return p if seq_len > p and seq_len % p == 0 else seq_len


def stage1_batch(cfg: Any, seq_len: int, world: int = 1) -> Stage1Batch:
    """Resolve stage 1's batch from ``cfg`` (a :class:`~hybridize.distill.stages.DistillConfig`).

    ``stage1_batch_size`` 0 = ``batch_size``. ``stage1_micro_batch_size`` 0 = auto: stage 2's tokens per
    forward (``micro_batch_size x seq_len``) in blocks of the stage-1 length, capped at each rank's share of
    the batch and lowered to a divisor of it.

    Args:
        cfg: the distill settings.
        seq_len: ``data.seq_len`` (stage 2's block length).
        world: the number of data-parallel ranks the batch is split over.

    Raises:
        ConfigError: the batch does not split over the ranks, or an explicit micro-batch does not divide a rank's share.
    """
    s1 = stage1_seq_len(cfg, seq_len)
    batch = cfg.stage1_batch_size or cfg.batch_size
    field = "stage1_batch_size" if cfg.stage1_batch_size else "batch_size"  # stage1_batch_size 0: stage 1 takes batch_size
    if batch % world:
        raise ConfigError(f"distill field {field!r} must be divisible by the number of processes ({world}); got {batch}")
    local = batch // world
    micro = cfg.stage1_micro_batch_size
    if micro:
        micro = min(micro, local)
        if local % micro:
            raise ConfigError(
                f"distill field 'stage1_micro_batch_size' must divide the stage-1 batch / processes = {batch} / {world} = "
                f"{local}; got {cfg.stage1_micro_batch_size}"
            )
        return Stage1Batch(s1, batch, micro)
    micro = min(local, max(1, (cfg.micro_batch_size or cfg.batch_size) * seq_len // s1))
    while local % micro:
        micro -= 1
    return Stage1Batch(s1, batch, micro)


def stage_blocks(blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Re-cut (N, T) blocks into (N*T/seq_len, seq_len) for a stage with shorter sequences."""
    T = blocks.shape[1]
    if not seq_len or seq_len == T:
        return blocks
    if T % seq_len:
        raise ConfigError(f"distill field 'stage1_seq_len' must divide data.seq_len={T}; got {seq_len}")
    return blocks.reshape(-1, seq_len)
