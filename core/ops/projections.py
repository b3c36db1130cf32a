"""Projection helpers that linear-attention variants share (public: third-party variants use them too).

- :func:`copy_teacher_projections`: the teacher's q/o and GQA-expanded k/v weights (+ biases, q/k norms)
  into a module's ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (+ ``q_norm`` / ``k_norm``);
- :func:`project_qkv`: q/k/v projections, optional q/k RMSNorm, then the short convolutions
  (``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``) with their ``conv_q`` / ``conv_k`` / ``conv_v`` caches;
- :func:`output_projection`: per-head output norm (gated by ``g_proj`` when present), then ``o_proj``.

The built-in GDN and GLA plugins use them; so may any plugin whose modules follow these names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hybridize.errors import HybridizeError
from hybridize.linear import AttentionSpec, TeacherAttentionWeights

__all__ = ["copy_teacher_projections", "project_qkv", "output_projection"]


def copy_teacher_projections(module: nn.Module, weights: TeacherAttentionWeights) -> None:
    """Copy the teacher's q/o and GQA-expanded k/v weights (+ biases, + q/k norms) into ``module``.

    ``module`` has fla/HF-named ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linears over
    ``num_heads * head_dim`` and, when the spec has qk-norm, ``q_norm``/``k_norm`` RMSNorms.
    """
    spec: AttentionSpec = module.spec
    for field in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
        mine, theirs = getattr(spec, field), getattr(weights.spec, field)
        if mine != theirs:
            raise HybridizeError(f"layer {spec.layer_idx}: teacher weights field '{field}' must be {mine}; got {theirs!r}")
    pairs = [
        (module.q_proj.weight, weights.q_weight, "q_weight"),
        (module.k_proj.weight, weights.k_weight_expanded, "k_weight"),
        (module.v_proj.weight, weights.v_weight_expanded, "v_weight"),
        (module.o_proj.weight, weights.o_weight, "o_weight"),
        (module.q_proj.bias, weights.q_bias, "q_bias"),
        (module.k_proj.bias, weights.k_bias_expanded, "k_bias"),
        (module.v_proj.bias, weights.v_bias_expanded, "v_bias"),
        (module.o_proj.bias, weights.o_bias, "o_bias"),
    ]
    if spec.qk_norm:
        pairs += [(module.q_norm.weight, weights.q_norm, "q_norm"), (module.k_norm.weight, weights.k_norm, "k_norm")]
    with torch.no_grad():
        for param, src, name in pairs:
            if param is None:
                continue
            if src is None:
                raise HybridizeError(f"layer {spec.layer_idx}: teacher weights field '{name}' must be set (the spec has it); got None")
            param.copy_(src.reshape(param.shape))




def project_qkv(module: nn.Module, x: torch.Tensor, state: dict[str, torch.Tensor], padding_mask: torch.Tensor | None,
                output_state: bool, *, bare_activation: str | None = None, backend: str = "auto",
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """q/k/v projections, optional q/k RMSNorm, then the short convolutions.

    Padded tokens are zeroed before the convolutions and skipped by them (see
    :class:`~hybridize.ops.common.ShortConvolution`). Shared by GDN and GLA.

    Args:
        module: a GDN/GLA module (``q_proj`` ..., ``q_conv1d`` ... when ``config.use_short_conv``).
        x: layer input.
        state: previous state (``conv_q``/``conv_k``/``conv_v`` caches are read from it).
        padding_mask: 1 for real tokens, 0 for padding, or None.
        output_state: also return the convolution caches after ``x``.
        bare_activation: activation without short convolutions; defaults to ``config.conv_activation``.
        backend: passed to the short convolutions (``torch`` keeps them off fla's kernel).

    Shape:
        x: (B, T, hidden) -> q, k, v: (B, T, H, D); conv caches: (B, H*D, W-1)
    """
    D, cfg = module.spec.head_dim, module.config
    q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)  # (B, T, H*D)
    if module.spec.qk_norm:
        q = rearrange(module.q_norm(rearrange(q, "b t (h d) -> b t h d", d=D)), "b t h d -> b t (h d)")
        k = rearrange(module.k_norm(rearrange(k, "b t (h d) -> b t h d", d=D)), "b t h d -> b t (h d)")
    conv_state: dict[str, torch.Tensor] = {}
    if cfg.use_short_conv:
        outs = []
        for name, t in (("q", q), ("k", k), ("v", v)):
            conv = getattr(module, f"{name}_conv1d")
            y, cache = conv(t, cache=state.get(f"conv_{name}"), output_final_state=output_state, mask=padding_mask,
                            backend=backend)
            outs.append(y)
            if output_state:
                conv_state[f"conv_{name}"] = cache
        q, k, v = outs
    elif (bare_activation or cfg.conv_activation) == "silu":
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k, v = (rearrange(t, "b t (h d) -> b t h d", d=D) for t in (q, k, v))
    return q, k, v, conv_state


def output_projection(module: nn.Module, o: torch.Tensor, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-head output norm (SiLU-gated by ``g_proj(x)`` when the module has one), then ``o_proj``.

    ``backend`` is passed to the gated norm (``torch`` keeps it off fla's kernel).

    Shape:
        o: (B, T, H, D); x: (B, T, hidden) -> (B, T, hidden)
    """
    if hasattr(module, "g_proj"):
        gate = rearrange(module.g_proj(x), "b t (h d) -> b t h d", d=module.spec.head_dim)
        o = module.o_norm(o, gate, backend=backend)
    else:
        o = module.o_norm(o)
    return module.o_proj(rearrange(o, "b t h d -> b t (h d)"))
