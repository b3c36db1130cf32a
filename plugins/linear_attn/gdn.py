"""Gated DeltaNet (GDN) as a linear-attention variant, built from a teacher attention layer.

Parameter names follow fla's ``GatedDeltaNet`` layer (q_proj, k_proj, v_proj, a_proj, b_proj,
A_log, dt_bias, q_conv1d/k_conv1d/v_conv1d, g_proj, o_norm, o_proj), with head_k_dim =
head_v_dim = the teacher's head_dim and one GDN head per teacher query head; the teacher's
KV heads are expanded (GQA) into the k/v projections.

This module is the reference implementation of the variant author's contract
(:mod:`hybridize.linear`; README, "The variant author's contract"):

- the teacher's weights live in ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (+ ``q_norm``,
  ``k_norm`` for Qwen3-style teachers unless ``qk_norm=False``, which also clears ``spec.qk_norm`` of the
  module), the names the conformance suite checks; GDN's own gates
  (``a_proj``, ``b_proj``, ``A_log``, ``dt_bias``), convolutions and output gate (``g_proj``,
  ``o_norm``) start fresh, as fla initialises them;
- :meth:`GatedDeltaNet.mix` calls :func:`hybridize.ops.delta_rule.gated_delta_rule`; ``naive`` is
  that op's reference loop :func:`~hybridize.ops.delta_rule.naive_recurrent_gated_delta_rule`;
- the state is ``{"recurrent": (B, H, D, D) in fp32 (float64 stays), "conv_q" | "conv_k" |
  "conv_v": (B, H*D, conv_size - 1) in the input dtype}`` (the conv caches only with
  ``use_short_conv``);
- ``mix(backend="auto")`` uses ``GDNConfig.backend``; an explicit ``torch`` / ``fla`` wins;
- capabilities ``recurrent-state`` and ``fla-kernels``.

It imports only :mod:`hybridize`, :mod:`hybridize.linear`, :mod:`hybridize.errors` and
:mod:`hybridize.ops`. :func:`~hybridize.ops.projections.copy_teacher_projections`, :func:`~hybridize.ops.projections.project_qkv`
and :func:`~hybridize.ops.projections.output_projection` live in :mod:`hybridize.ops.projections` (public),
which the built-in GLA plugin and third-party variants use too; no plugin imports another plugin's helpers.
"""
from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hybridize import hookimpl
from hybridize.errors import HybridizeError
from hybridize.linear import AttentionSpec, Backend, LinearAttention, Mode, TeacherAttentionWeights
from hybridize.ops.common import BACKENDS, GatedRMSNorm, RMSNorm, ShortConvolution, compute_dtype
from hybridize.ops.delta_rule import gated_delta_rule, naive_recurrent_gated_delta_rule
from hybridize.ops.projections import copy_teacher_projections, output_projection, project_qkv

_v = attrs.validators


@attrs.frozen(kw_only=True)
class GDNConfig:
    """Options of the Gated DeltaNet variant."""

    use_short_conv: bool = attrs.field(default=True, validator=_v.instance_of(bool))
    conv_size: int = attrs.field(default=4, validator=[_v.instance_of(int), _v.ge(2)])
    #: activation after the short convolution (or on q/k/v directly without one), as fla does
    conv_activation: Literal["silu", "none"] = attrs.field(default="silu", validator=_v.in_(("silu", "none")))
    conv_init: Literal["identity", "random"] = attrs.field(default="identity", validator=_v.in_(("identity", "random")))
    use_gate: bool = attrs.field(default=True, validator=_v.instance_of(bool))
    allow_neg_eigval: bool = attrs.field(default=False, validator=_v.instance_of(bool))
    #: apply the teacher's q/k RMSNorms (Qwen3-style teachers) before the short convolutions; False leaves them
    #: out, as transformers' qwen3_5 Gated DeltaNet does, so that such a hybrid exports to it exactly
    qk_norm: bool = attrs.field(default=True, validator=_v.instance_of(bool))
    norm_eps: float = attrs.field(default=1e-5, validator=_v.gt(0.0))
    chunk_size: int = attrs.field(default=64, validator=[_v.instance_of(int), _v.ge(1)])
    backend: Literal["auto", "torch", "fla"] = attrs.field(default="auto", validator=_v.in_(BACKENDS))


def init_gdn_gates(num_heads: int, *, a_range: tuple[float, float] = (0.0, 16.0), dt_min: float = 1e-3,
                   dt_max: float = 0.1, dt_floor: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``A_log`` and ``dt_bias`` as fla's GatedDeltaNet draws them.

    ``A ~ U(a_range)``, ``A_log = log A``; ``dt`` log-uniform in [dt_min, dt_max] floored at
    ``dt_floor``, and ``dt_bias = softplus^-1(dt) = dt + log(-expm1(-dt))``.

    Shape:
        -> A_log: (H,), dt_bias: (H,)
    """
    A = torch.empty(num_heads, dtype=torch.float32).uniform_(*a_range)
    log_dt = torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp_min(dt_floor)
    return A.log(), dt + torch.log(-torch.expm1(-dt))


class GatedDeltaNet(LinearAttention):
    """Gated DeltaNet: a delta-rule recurrence with a per-head scalar forget gate.

    Per head: ``S = exp(g_t) S; S = S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T q_t / sqrt(D)`` with q, k
    L2-normalised, ``g = -exp(A_log) softplus(a_proj(x) + dt_bias)`` and ``beta = sigmoid(b_proj(x))``
    (times 2 with ``allow_neg_eigval``); padded tokens get ``g = beta = 0``.

    Args:
        spec: shapes of the teacher layer this module replaces.
        config: a :class:`GDNConfig` (defaults when None).

    Shape:
        x: (B, T, hidden) -> (B, T, hidden); state["recurrent"]: (B, H, D, D);
        state["conv_q" | "conv_k" | "conv_v"]: (B, H*D, conv_size - 1)
    """

    naive = staticmethod(naive_recurrent_gated_delta_rule)

    def __init__(self, spec: AttentionSpec, config: GDNConfig | None = None):
        config = config if config is not None else GDNConfig()
        if spec.qk_norm and not config.qk_norm:  # the module holds no q/k norms: its spec says so
            spec = attrs.evolve(spec, qk_norm=False)
        super().__init__(spec, config)
        cfg, H, D, hidden = self.config, spec.num_heads, spec.head_dim, spec.hidden_size
        self.num_heads, self.head_dim = H, D
        self.q_proj = nn.Linear(hidden, H * D, bias=spec.q_bias)
        self.k_proj = nn.Linear(hidden, H * D, bias=spec.k_bias)
        self.v_proj = nn.Linear(hidden, H * D, bias=spec.v_bias)
        self.a_proj = nn.Linear(hidden, H, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        A_log, dt_bias = init_gdn_gates(H)
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True  # fla's marker
        if spec.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, spec.norm_eps), RMSNorm(D, spec.norm_eps)
        if cfg.use_short_conv:
            act = None if cfg.conv_activation == "none" else cfg.conv_activation
            for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
                setattr(self, name, ShortConvolution(H * D, cfg.conv_size, activation=act, conv_init=cfg.conv_init))
        if cfg.use_gate:
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
        g, beta = self._gates(x, padding_mask)  # (B, T, H) each
        o, recurrent = gated_delta_rule(
            q, k, v, g, beta, initial_state=state.get("recurrent"), output_final_state=output_state,
            mode=mode, backend=be, chunk_size=self.config.chunk_size,
        )
        y = self._output(o, x, be)
        return y, ({"recurrent": recurrent, **conv_state} if output_state else None)

    def _project(self, x, state, padding_mask, output_state, backend="auto"):
        """q/k/v with norms and short convolutions: :func:`project_qkv`."""
        return project_qkv(self, x, state, padding_mask, output_state, backend=backend)

    def _output(self, o, x, backend="auto"):
        """Gated output norm and ``o_proj``: :func:`output_projection`."""
        return output_projection(self, o, x, backend=backend)

    def _gates(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-decay ``g = -exp(A_log) softplus(a + dt_bias)`` and write strength ``beta = sigmoid(b)``.

        Padded tokens get ``g = 0`` and ``beta = 0``: the state passes them unchanged.

        Shape:
            x: (B, T, hidden) -> g, beta: (B, T, H) in fp32 (float64 stays)
        """
        cd = compute_dtype(x.dtype)
        g = -self.A_log.to(cd).exp() * F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))
        beta = self.b_proj(x).to(cd).sigmoid()
        if self.config.allow_neg_eigval:
            beta = beta * 2.0
        if padding_mask is not None:
            keep = padding_mask.to(cd)  # (B, T)
            g, beta = g * keep[..., None], beta * keep[..., None]
        return g, beta

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, heads={self.num_heads}, head_dim={self.head_dim}"


@hookimpl
def hybridize_register_linear_attention(register) -> None:
    """Register ``gdn``."""
    register("gdn", GatedDeltaNet, GDNConfig, capabilities=frozenset({"recurrent-state", "fla-kernels"}))
