"""Gated linear attention (GLA): naive recurrence, exact chunked torch form, fla dispatch.

Layout (fla's): q, k, gk (B, T, H, K); v (B, T, H, V); state (B, H, K, V).
Per step, with ``gk`` a per-key-dim log-decay (<= 0)::

    S   = diag(exp(gk_t)) S + k_t v_t^T
    o_t = S^T (scale * q_t)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from hybridize.ops.common import check_choice, check_shape, compute_dtype, resolve_backend

OP = "gla"


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: a Python loop over time steps.

    Args:
        q, k, v: queries, keys, values.
        gk: log-decay per step, head and key dim (<= 0).
        scale: query scale, ``K ** -0.5`` when None.
        initial_state: state before the first step (zeros when None).
        output_final_state: also return the state after the last step.

    Shape:
        q, k, gk: (B, T, H, K); v: (B, T, H, V); state: (B, H, K, V)
        -> o: (B, T, H, V) in v's dtype, state in fp32 (float64 stays)
    """
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    cd = compute_dtype(v.dtype)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, gk = (t.to(cd) for t in (q, k, v, gk))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    outs = []
    for t in range(T):
        S = S * gk[:, t].exp()[..., None] + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))  # (B, H, V)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def _chunk_prepare(q, k, v, gk, C: int):
    """Per-chunk quantities that do not depend on the state (all chunks at once).

    The intra-chunk scores use the (C, C, K) broadcast of ``B_t - B_s`` (s <= t), so every
    exponent is <= 0 and nothing overflows however strong the decay.

    Shape:
        q, k, gk: (B, T, H, K); v: (B, T, H, V) -> q, k, B (B, H, N, C, K); v (B, H, N, C, V);
        A (B, H, N, C, C)
    """
    q, k, v, gk = (rearrange(t, "b (n c) h d -> b h n c d", c=C) for t in (q, k, v, gk))
    Bc = gk.cumsum(-2)  # (B, H, N, C, K) cumulative log decay inside each chunk, <= 0
    diff = Bc[..., :, None, :] - Bc[..., None, :, :]  # (B, H, N, C, C, K): B_t - B_s
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~lower[..., None], float("-inf")).exp()  # zero above the diagonal
    A = torch.einsum("...tk,...sk,...tsk->...ts", q, k, decay)  # (B, H, N, C, C)
    return q, k, v, Bc, A


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact chunked form: parallel inside chunks, a loop over chunks.

    Inside a chunk with cumulative log decay B, ``A[t,s] = sum_d q_td k_sd exp(B_td - B_sd)``
    (s <= t), ``O = (Q exp(B)) H + A V`` and ``H' = exp(B_last) H + (K exp(B_last - B))^T V``.
    Same arguments and shapes as :func:`naive_recurrent_gla`.
    """
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    cd = compute_dtype(v.dtype)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    T_pad = -(-T // C) * C
    q, k, v, gk = (F.pad(t.to(cd), (0, 0, 0, 0, 0, T_pad - T)) for t in (q, k, v, gk))  # k = v = gk = 0 on padding
    q, k, v, Bc, A = _chunk_prepare(q * scale, k, v, gk, C)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    outs = []
    for n in range(T_pad // C):
        Bn, Blast = Bc[:, :, n], Bc[:, :, n, -1:]  # (B, H, C, K), (B, H, 1, K)
        outs.append((q[:, :, n] * Bn.exp()) @ S + A[:, :, n] @ v[:, :, n])  # (B, H, C, V)
        S = Blast.transpose(-1, -2).exp() * S + (k[:, :, n] * (Blast - Bn).exp()).transpose(-1, -2) @ v[:, :, n]
    if not outs:
        return v.new_zeros(B, 0, H, V).to(out_dtype), (S if output_final_state else None)
    o = rearrange(torch.stack(outs, dim=2), "b h n c v -> b (n c) h v")[:, :T]
    return o.to(out_dtype), (S if output_final_state else None)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    backend: str = "auto",
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention on fla's kernels or in torch.

    Args:
        q, k, v, gk, scale, initial_state, output_final_state: see :func:`naive_recurrent_gla`.
        mode: ``chunk`` (parallel within chunks) or ``recurrent`` (one step at a time).
        backend: ``fla`` (CUDA), ``torch``, or ``auto`` (fla when on CUDA and importable).
        chunk_size: chunk length of the torch chunked form.

    Shape:
        q, k, gk: (B, T, H, K); v: (B, T, H, V); initial_state: (B, H, K, V)
        -> o: (B, T, H, V) in the input dtype, final state (B, H, K, V) in fp32 (or float64) or None
    """
    _check_inputs(q, k, v, gk, initial_state, mode)
    if resolve_backend(backend, q) == "fla":
        return _fla_gla(q, k, v, gk, scale, initial_state, output_final_state, mode)
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if mode == "chunk":
        return chunk_gla_torch(q, k, v, gk, chunk_size=chunk_size, **kw)
    return naive_recurrent_gla(q, k, v, gk, **kw)


def _check_inputs(q, k, v, gk, initial_state, mode: str) -> None:
    check_choice(OP, "mode", mode, ("chunk", "recurrent"))
    if q.dim() != 4:
        raise ValueError(f"{OP} field 'q' must have 4 dims (B, T, H, K); got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    check_shape(OP, "k", k, (B, T, H, K))
    check_shape(OP, "gk", gk, (B, T, H, K))
    check_shape(OP, "v", v, (B, T, H, v.shape[-1]))
    if initial_state is not None:
        check_shape(OP, "initial_state", initial_state, (B, H, K, v.shape[-1]))


@torch.compiler.disable  # fla's Triton kernels are opaque to torch.compile: a clean graph break
def _fla_gla(q, k, v, gk, scale, initial_state, output_final_state, mode):
    """fla's Triton kernels (imported here only: fla needs triton and CUDA)."""
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    if mode == "chunk":
        return chunk_gla(q, k, v, g=gk, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    return fused_recurrent_gla(q, k, v, gk=gk, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
