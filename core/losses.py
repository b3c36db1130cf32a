"""Distillation losses. The KL is computed in token chunks from hidden states, so the full fp32
logits of teacher and student (e.g. 150k vocab x 4096 tokens) never exist at the same time."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_kl(h_s: torch.Tensor, logp_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student) for one chunk (student logits rebuilt in backward)."""
    logits = F.linear(h_s, weight, bias).float() / tau  # (n, V)
    logp_s = torch.log_softmax(logits, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum()


def chunked_kl(
    h_student: torch.Tensor,
    h_teacher: torch.Tensor,
    lm_head_student: torch.nn.Linear,
    lm_head_teacher: torch.nn.Linear,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at temperature tau, scaled by tau^2.

    Teacher log-probs are made chunk by chunk without grad; the student's chunk logits are
    recomputed in backward (activation checkpointing), so peak memory holds one chunk's fp32
    logits of each model rather than the whole sequence's.

    Args:
        h_student: the student's final hidden states (after the final norm).
        h_teacher: the teacher's final hidden states.
        lm_head_student: the student's output projection.
        lm_head_teacher: the teacher's output projection.
        temperature: tau; both distributions are softened by it.
        chunk_tokens: tokens per chunk.
        mask: 1 for tokens that count; None = all.

    Shape:
        h_student, h_teacher: (B, T, D); mask: (B, T) -> scalar
    """
    hs = h_student.reshape(-1, h_student.shape[-1])  # (N, D)
    ht = h_teacher.reshape(-1, h_teacher.shape[-1])
    keep = None if mask is None else mask.reshape(-1).bool()
    if keep is not None:
        hs, ht = hs[keep], ht[keep]
    n = hs.shape[0]
    total = hs.new_zeros((), dtype=torch.float32)
    w, b = lm_head_student.weight, lm_head_student.bias
    for i in range(0, n, chunk_tokens):
        with torch.no_grad():
            logp_t = torch.log_softmax(lm_head_teacher(ht[i : i + chunk_tokens]).float() / temperature, dim=-1)
        part = hs[i : i + chunk_tokens]
        if torch.is_grad_enabled() and part.requires_grad:
            total = total + checkpoint(_chunk_kl, part, logp_t, w, b, temperature, use_reentrant=False)
        else:
            total = total + _chunk_kl(part, logp_t, w, b, temperature)
    return total / max(n, 1) * temperature**2


def chunked_ce(h: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Linear, *, chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy from hidden states, chunked like :func:`chunked_kl`.

    ``labels`` are already shifted (label t is the token after position t); -100 is ignored.

    Shape:
        h: (B, T, D); labels: (B, T) -> scalar
    """
    hs, ys = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    n = int((ys != -100).sum())
    total = hs.new_zeros((), dtype=torch.float32)

    def part_ce(hp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(hp).float(), yp, ignore_index=-100, reduction="sum")

    for i in range(0, hs.shape[0], chunk_tokens):
        hp, yp = hs[i : i + chunk_tokens], ys[i : i + chunk_tokens]
        if torch.is_grad_enabled() and hp.requires_grad:
            total = total + checkpoint(part_ce, hp, yp, use_reentrant=False)
        else:
            total = total + part_ce(hp, yp)
    return total / max(n, 1)
