"""Distillation losses. The KL is computed in token chunks from hidden states, so the full fp32
logits of teacher and student (e.g. 150k vocab x 4096 tokens) never exist at the same time.

Two implementations of the chunked KL give the same value and gradients:

- ``fused`` (default): a custom autograd function that computes, chunk by chunk, the loss AND the
  gradients of the student's hidden states and output projection in the forward pass (the
  gradient of KL(p_t || softmax(z)) w.r.t. the logits z is ``softmax(z) * sum(p_t) - p_t``), so
  no student logits are rebuilt in backward (one vocabulary-sized matmul per token fewer). On CUDA
  the elementwise part (two log-softmaxes, the KL sum and the logit gradient) is one
  ``torch.compile``-d function, so the fp32 (chunk, vocab) tensors are read a few times instead
  of about fifteen.
- ``checkpoint``: plain autograd with activation checkpointing of each chunk.
"""
from __future__ import annotations

import functools
import warnings

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
    impl: str = "fused",
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at temperature tau, scaled by tau^2.

    Teacher log-probs are made chunk by chunk without grad, so peak memory holds one chunk's fp32
    logits of each model rather than the whole sequence's. ``impl="fused"`` makes the gradients
    in the forward pass (see the module docstring); ``impl="checkpoint"`` recomputes the
    student's chunk logits in backward.

    Args:
        h_student: the student's final hidden states (after the final norm).
        h_teacher: the teacher's final hidden states.
        lm_head_student: the student's output projection.
        lm_head_teacher: the teacher's output projection.
        temperature: tau; both distributions are softened by it.
        chunk_tokens: tokens per chunk.
        mask: 1 for tokens that count; None = all.
        impl: ``fused`` or ``checkpoint``.

    Shape:
        h_student, h_teacher: (B, T, D); mask: (B, T) -> scalar
    """
    if impl not in ("fused", "checkpoint"):
        raise ValueError(f"chunked_kl field 'impl' must be 'fused' or 'checkpoint'; got {impl!r}")
    hs = h_student.reshape(-1, h_student.shape[-1])  # (N, D)
    ht = h_teacher.reshape(-1, h_teacher.shape[-1])
    keep = None if mask is None else mask.reshape(-1).bool()
    if keep is not None:
        hs, ht = hs[keep], ht[keep]
    n = hs.shape[0]
    if impl == "fused":
        args = (hs, lm_head_student.weight, lm_head_student.bias, ht, lm_head_teacher.weight, lm_head_teacher.bias,
                float(temperature), int(chunk_tokens))
        if torch.is_grad_enabled():
            return _FusedLinearKL.apply(*args)
        return _fused_kl(*args, need=(False, False, False))[0]
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


def kl_rows(raw_s: torch.Tensor, raw_t: torch.Tensor, tau: float, scale: torch.Tensor, want_grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed KL(teacher || student) of a chunk of rows and its gradient w.r.t. the raw student logits.

    With ``z = raw_s / tau``, ``p_t = softmax(raw_t / tau)``: loss = sum_rows sum_v p_t (log p_t - log_softmax(z));
    d loss / d raw_s = (softmax(z) * sum(p_t) - p_t) / tau, returned times ``scale`` in ``raw_s``'s dtype.

    Shape:
        raw_s, raw_t: (n, V) -> loss: () fp32, grad: (n, V) or None
    """
    s = raw_s.float() / tau
    logp_t = torch.log_softmax(raw_t.float() / tau, dim=-1)
    logp_s = torch.log_softmax(s, dim=-1)
    p_t = logp_t.exp()
    loss = (p_t * (logp_t - logp_s)).sum()
    if not want_grad:
        return loss, None
    grad = (logp_s.exp() * p_t.sum(-1, keepdim=True) - p_t) * (scale / tau)
    return loss, grad.to(raw_s.dtype)


#: compile the elementwise part of the fused KL on CUDA (set False to measure or debug the eager form)
COMPILE_KL_ON_CUDA = True


@functools.lru_cache(maxsize=1)
def _compiled_kl_rows():
    return torch.compile(kl_rows, dynamic=False)


_compile_failed: list[str] = []


def _kl_rows_for(raw_s: torch.Tensor):
    """The compiled ``kl_rows`` on CUDA (once it has compiled), else the eager one."""
    if raw_s.is_cuda and COMPILE_KL_ON_CUDA and not _compile_failed:
        compiled = _compiled_kl_rows()

        def run(*args):
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - no working compiler: stay correct, eager
                _compile_failed.append(f"{type(exc).__name__}: {exc}")
                warnings.warn(f"torch.compile of the fused KL failed ({_compile_failed[0][:300]}); using the eager form",
                              RuntimeWarning, stacklevel=3)
                return kl_rows(*args)

        return run
    return kl_rows


def _acc_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` (in place; through a temporary when the dtypes differ, e.g. fp32 params under autocast)."""
    if out.dtype == a.dtype == b.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b.to(a.dtype)))


def _fused_kl(hs, w_s, b_s, ht, w_t, b_t, tau: float, chunk: int, need: tuple[bool, bool, bool]):
    """The loss and, where ``need`` asks, the gradients of (hs, w_s, b_s) of the mean KL times tau^2.

    Shape:
        hs, ht: (N, D); w_s, w_t: (V, D); b_s, b_t: (V,) or None -> loss (), grads like their inputs
    """
    n = hs.shape[0]
    gh = torch.zeros_like(hs) if need[0] else None
    gw = torch.zeros_like(w_s) if need[1] else None
    gb = torch.zeros_like(b_s) if (need[2] and b_s is not None) else None
    want = gh is not None or gw is not None or gb is not None
    scale = torch.full((), tau**2 / max(n, 1), dtype=torch.float32, device=hs.device)
    rows = _kl_rows_for(hs)
    total = torch.zeros((), dtype=torch.float32, device=hs.device)
    with torch.no_grad():
        for i in range(0, n, chunk):
            h = hs[i : i + chunk]
            loss, g = rows(F.linear(h, w_s, b_s), F.linear(ht[i : i + chunk], w_t, b_t), tau, scale, want)  # g: (n_c, V)
            total = total + loss
            if gh is not None:
                gh[i : i + chunk] = torch.mm(g, w_s.to(g.dtype))
            if gw is not None:
                _acc_matmul(gw, g.t(), h)
            if gb is not None:
                gb.add_(g.sum(0))
    return total * (tau**2 / max(n, 1)), gh, gw, gb


class _FusedLinearKL(torch.autograd.Function):
    """Chunked KL(teacher || student) from hidden states, gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hs, w_s, b_s, ht, w_t, b_t, tau: float, chunk: int):  # type: ignore[override]
        loss, gh, gw, gb = _fused_kl(hs, w_s, b_s, ht, w_t, b_t, tau, chunk, need=tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        gh, gw, gb = ctx.saved_tensors
        scale = lambda t: None if t is None else t.mul_(grad_out.to(t.dtype))  # noqa: E731
        return scale(gh), scale(gw), scale(gb), None, None, None, None, None


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
