"""Gated Linear Attention (GLA) as a linear-attention variant, built from a teacher attention layer.

Parameter names follow fla's ``GatedLinearAttention`` layer (q_proj, k_proj, v_proj, gk_proj,
g_proj, o_norm, o_proj) with expand_k = expand_v = 1: one GLA head per teacher query head,
head_k_dim = head_v_dim = the teacher's head_dim, the teacher's KV heads expanded (GQA).
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hybridize import hookimpl
from hybridize.linear import AttentionSpec, Backend, LinearAttention, Mode, TeacherAttentionWeights
from hybridize.ops.common import BACKENDS, GatedRMSNorm, RMSNorm, ShortConvolution, compute_dtype
from hybridize.ops.gla import gla, naive_recurrent_gla
from hybridize.ops.projections import copy_teacher_projections, output_projection, project_qkv

_v = attrs.validators


@attrs.frozen(kw_only=True)
class GLAConfig:
    """Options of the Gated Linear Attention variant."""

    use_short_conv: bool = attrs.field(default=False, validator=_v.instance_of(bool))
    conv_size: int = attrs.field(default=4, validator=[_v.instance_of(int), _v.ge(2)])
    #: activation after the short convolution; without one, q/k/v are used as projected
    conv_activation: Literal["silu", "none"] = attrs.field(default="silu", validator=_v.in_(("silu", "none")))
    conv_init: Literal["identity", "random"] = attrs.field(default="identity", validator=_v.in_(("identity", "random")))
    gate_low_rank_dim: int = attrs.field(default=16, validator=[_v.instance_of(int), _v.ge(1)])
    gate_logit_normalizer: float = attrs.field(default=16.0, validator=_v.gt(0.0))
    use_output_gate: bool = attrs.field(default=True, validator=_v.instance_of(bool))
    norm_eps: float = attrs.field(default=1e-5, validator=_v.gt(0.0))
    chunk_size: int = attrs.field(default=16, validator=[_v.instance_of(int), _v.ge(1)])
    backend: Literal["auto", "torch", "fla"] = attrs.field(default="auto", validator=_v.in_(BACKENDS))


class GatedLinearAttention(LinearAttention):
    """Gated linear attention: a linear-attention state with a data-dependent per-key-dim forget gate.

    Args:
        spec: shapes of the teacher layer this module replaces.
        config: a :class:`GLAConfig` (defaults when None).

    Shape:
        x: (B, T, hidden) -> (B, T, hidden); state["recurrent"]: (B, H, D, D);
        state["conv_q" | "conv_k" | "conv_v"]: (B, H*D, conv_size - 1) with short convolutions
    """

    naive = staticmethod(naive_recurrent_gla)

    def __init__(self, spec: AttentionSpec, config: GLAConfig | None = None):
        super().__init__(spec, config if config is not None else GLAConfig())
        cfg, H, D, hidden = self.config, spec.num_heads, spec.head_dim, spec.hidden_size
        self.num_heads, self.head_dim = H, D
        self.q_proj = nn.Linear(hidden, H * D, bias=spec.q_bias)
        self.k_proj = nn.Linear(hidden, H * D, bias=spec.k_bias)
        self.v_proj = nn.Linear(hidden, H * D, bias=spec.v_bias)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden, cfg.gate_low_rank_dim, bias=False), nn.Linear(cfg.gate_low_rank_dim, H * D, bias=True)
        )
        if spec.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, spec.norm_eps), RMSNorm(D, spec.norm_eps)
        if cfg.use_short_conv:
            act = None if cfg.conv_activation == "none" else cfg.conv_activation
            for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
                setattr(self, name, ShortConvolution(H * D, cfg.conv_size, activation=act, conv_init=cfg.conv_init))
        if cfg.use_output_gate:
            self.g_proj = nn.Linear(hidden, H * D, bias=False)
            self.o_norm = GatedRMSNorm(D, cfg.norm_eps)
        else:
            self.o_norm = RMSNorm(D, cfg.norm_eps)
        self.o_proj = nn.Linear(H * D, hidden, bias=spec.o_bias)

    def load_teacher_weights(self, weights: TeacherAttentionWeights) -> None:
        """Copy the teacher's q/o and expanded k/v projections (+ biases, + q/k norms)."""
        copy_teacher_projections(self, weights)

    def mix(
        self,
        x: torch.Tensor,
        *,
        state: dict[str, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        output_state: bool = False,
        mode: Mode = "chunk",
        backend: Backend = "auto",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """See :meth:`hybridize.LinearAttention.mix`.

        Shape:
            x: (B, T, hidden); padding_mask: (B, T) -> (B, T, hidden)
        """
        state = state or {}
        be = self.config.backend if backend == "auto" else backend
        q, k, v, conv_state = self._project(x, state, padding_mask, output_state, be)  # (B, T, H, D) each
        gk = self._gates(x)  # (B, T, H, D)
        if padding_mask is not None:  # k = v = 0 and gk = 0: padded tokens leave the state unchanged
            keep = padding_mask.to(x.dtype)[..., None, None]  # (B, T, 1, 1)
            k, v, gk = k * keep, v * keep, gk * keep.to(gk.dtype)
        o, recurrent = gla(
            q, k, v, gk, initial_state=state.get("recurrent"), output_final_state=output_state,
            mode=mode, backend=be, chunk_size=self.config.chunk_size,
        )
        y = self._output(o, x, be)
        return y, ({"recurrent": recurrent, **conv_state} if output_state else None)

    def _project(self, x, state, padding_mask, output_state, backend="auto"):
        """q/k/v with norms and optional short convolutions (no activation without them, as fla's GLA)."""
        return project_qkv(self, x, state, padding_mask, output_state, bare_activation="none", backend=backend)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, H*D) -> (B, T, H, D)."""
        return rearrange(t, "b t (h d) -> b t h d", d=self.head_dim)

    def _gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-key-dim log-decay ``gk = logsigmoid(gk_proj(x)) / gate_logit_normalizer`` (<= 0).

        Shape:
            x: (B, T, hidden) -> (B, T, H, D) in fp32 (float64 stays)
        """
        gk = F.logsigmoid(self.gk_proj(x).to(compute_dtype(x.dtype))) / self.config.gate_logit_normalizer
        return self._heads(gk)

    def _output(self, o, x, backend="auto"):
        """Gated output norm and ``o_proj``: :func:`~hybridize.plugins.linear_attn.gdn.output_projection`."""
        return output_projection(self, o, x, backend=backend)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, heads={self.num_heads}, head_dim={self.head_dim}"


@hookimpl
def hybridize_register_linear_attention(register) -> None:
    """Register ``gla``."""
    register("gla", GatedLinearAttention, GLAConfig, capabilities=frozenset({"recurrent-state", "fla-kernels"}))
