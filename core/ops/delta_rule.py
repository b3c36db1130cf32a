"""Gated delta rule (Gated DeltaNet): naive recurrence, exact chunked torch form, fla dispatch.

Layout (fla's): q, k (B, T, H, K); v (B, T, H, V); g, beta (B, T, H); state (B, H, K, V).
Per step, with ``g`` a log-decay (<= 0) and ``beta`` in (0, 1)::

    S   = S * exp(g_t)
    u   = beta_t * (v_t - S^T k_t)
    S   = S + k_t u^T
    o_t = S^T (scale * q_t)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from hybridize.ops.common import check_choice, check_shape, compute_dtype, l2norm, resolve_backend

OP = "gated_delta_rule"


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: a Python loop over time steps (no normalisation of q, k).

    Args:
        q, k, v: queries, keys, values.
        g: log-decay per step and head (<= 0).
        beta: write strength per step and head.
        scale: query scale, ``K ** -0.5`` when None.
        initial_state: state before the first step (zeros when None).
        output_final_state: also return the state after the last step.

    Shape:
        q, k: (B, T, H, K); v: (B, T, H, V); g, beta: (B, T, H); state: (B, H, K, V)
        -> o: (B, T, H, V) in v's dtype, state in fp32 (float64 stays)
    """
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    cd = compute_dtype(v.dtype)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (t.to(cd) for t in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kt = k[:, t]  # (B, H, K)
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))  # (B, H, V)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, u)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def _pad_time(x: torch.Tensor, T_pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) at the end up to length ``T_pad``."""
    pad = T_pad - x.shape[1]
    if pad == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))


def _chunk_prepare(q, k, v, g, beta, C: int):
    """Per-chunk quantities that do not depend on the state (all chunks at once).

    Shape:
        q, k: (B, N, H, C, K) ... returns W (B, H, N, C, K), U (B, H, N, C, V), A (B, H, N, C, C),
        decays exp(G) (B, H, N, C), exp(G_last - G) (B, H, N, C), exp(G_last) (B, H, N)
    """
    q, k, v = (rearrange(t, "b (n c) h d -> b h n c d", c=C) for t in (q, k, v))
    g, beta = (rearrange(t, "b (n c) h -> b h n c", c=C) for t in (g, beta))
    G = g.cumsum(-1)  # (B, H, N, C) cumulative log decay inside each chunk, <= 0
    diff = G[..., :, None] - G[..., None, :]  # (B, H, N, C, C): G_t - G_s
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    D = diff.masked_fill(~ones.tril(), float("-inf")).exp()  # s <= t, masked before exp: never overflows
    L = beta[..., None] * D.masked_fill(~ones.tril(-1), 0.0) * (k @ k.transpose(-1, -2))  # (B, H, N, C, C), s < t
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], dim=-1)  # (B, H, N, C, V+K)
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # (I + L)^-1 rhs
    U, W = sol.split([v.shape[-1], k.shape[-1]], dim=-1)
    A = (q @ k.transpose(-1, -2)) * D  # (B, H, N, C, C)
    G_last = G[..., -1:]  # (B, H, N, 1)
    return q, k, W, U, A, G.exp(), (G_last - G).exp(), G_last[..., 0].exp()


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact chunked form (WY / UT transform): parallel inside chunks, a loop over chunks.

    Inside a chunk with cumulative log decay G, ``L[t,s] = beta_t exp(G_t - G_s) k_t.k_s`` (s < t),
    ``W = (I+L)^-1 (beta exp(G) K)``, ``U = (I+L)^-1 (beta V) - W H``, then
    ``O = (exp(G) Q) H + ((Q K^T) * D) U`` and ``H' = exp(G_last) H + (K exp(G_last - G))^T U``.
    Same arguments and shapes as :func:`naive_recurrent_gated_delta_rule`.
    """
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    cd = compute_dtype(v.dtype)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    T_pad = -(-T // C) * C
    q, k, v, g, beta = (_pad_time(t.to(cd), T_pad) for t in (q, k, v, g, beta))  # k = v = g = beta = 0 on padding
    q, k, W, U, A, eG, eGrev, eGlast = _chunk_prepare(q * scale, k, v, g, beta, C)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    outs = []
    for n in range(T_pad // C):
        u = U[:, :, n] - W[:, :, n] @ S  # (B, H, C, V)
        outs.append((eG[:, :, n, :, None] * q[:, :, n]) @ S + A[:, :, n] @ u)  # (B, H, C, V)
        S = eGlast[:, :, n, None, None] * S + (k[:, :, n] * eGrev[:, :, n, :, None]).transpose(-1, -2) @ u
    o = rearrange(torch.stack(outs, dim=2), "b h n c v -> b (n c) h v")[:, :T] if outs else q.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    backend: str = "auto",
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule with q/k L2-normalised (as fla does), on fla's kernels or in torch.

    Args:
        q, k, v, g, beta, scale, initial_state, output_final_state: see
            :func:`naive_recurrent_gated_delta_rule`.
        mode: ``chunk`` (parallel within chunks) or ``recurrent`` (one step at a time).
        backend: ``fla`` (CUDA), ``torch``, or ``auto`` (fla when on CUDA and importable).
        use_qk_l2norm: L2-normalise q and k over the head dim first.
        chunk_size: chunk length of the torch chunked form.

    Shape:
        q, k: (B, T, H, K); v: (B, T, H, V); g, beta: (B, T, H); initial_state: (B, H, K, V)
        -> o: (B, T, H, V) in the input dtype, final state (B, H, K, V) in fp32 (or float64) or None
    """
    _check_inputs(q, k, v, g, beta, initial_state, mode)
    if resolve_backend(backend, q) == "fla":
        return _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, mode, use_qk_l2norm)
    cd = compute_dtype(v.dtype)
    q, k = (l2norm(t.to(cd)) if use_qk_l2norm else t.to(cd) for t in (q, k))
    v_in_dtype = v.dtype
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if mode == "chunk":
        o, state = chunk_gated_delta_rule_torch(q, k, v.to(cd), g, beta, chunk_size=chunk_size, **kw)
    else:
        o, state = naive_recurrent_gated_delta_rule(q, k, v.to(cd), g, beta, **kw)
    return o.to(v_in_dtype), state


def _check_inputs(q, k, v, g, beta, initial_state, mode: str) -> None:
    check_choice(OP, "mode", mode, ("chunk", "recurrent"))
    if q.dim() != 4:
        raise ValueError(f"{OP} field 'q' must have 4 dims (B, T, H, K); got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    check_shape(OP, "k", k, (B, T, H, K))
    check_shape(OP, "v", v, (B, T, H, v.shape[-1]))
    check_shape(OP, "g", g, (B, T, H))
    check_shape(OP, "beta", beta, (B, T, H))
    if initial_state is not None:
        check_shape(OP, "initial_state", initial_state, (B, H, K, v.shape[-1]))


@torch.compiler.disable  # fla's Triton kernels are opaque to torch.compile: a clean graph break
def _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, mode, use_qk_l2norm):
    """fla's Triton kernels (imported here only: fla needs triton and CUDA)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = chunk_gated_delta_rule if mode == "chunk" else fused_recurrent_gated_delta_rule
    return fn(
        q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
    )
