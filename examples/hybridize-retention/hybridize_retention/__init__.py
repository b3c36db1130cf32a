"""RetNet-style retention as a hybridize linear-attention variant (a worked plugin example).

State per head: ``S_t = gamma_h * S_{t-1} + k_t v_t^T``; output ``o_t = q_t S_t``; then a per-head
RMSNorm and ``o_proj``. ``gamma_h = 1 - 2 ** -e_h`` with ``e_h`` spread evenly over
``decay_exponents`` (RetNet's multi-scale decay): fast-forgetting heads and long-memory heads.
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch
from einops import rearrange
from torch import nn

from hybridize import hookimpl
from hybridize.errors import HybridizeError
from hybridize.linear import AttentionSpec, Backend, LinearAttention, Mode, TeacherAttentionWeights
from hybridize.ops.common import BACKENDS, RMSNorm
from hybridize.ops.gla import gla, naive_recurrent_gla

__version__ = "0.1.0"


def _exponents(inst: object, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    lo, hi = value
    if not 0 < lo <= hi:
        raise ValueError(f"field '{attribute.name}' must be (low, high) with 0 < low <= high; got {value!r}")


@attrs.frozen(kw_only=True)
class RetentionConfig:
    """Options of ``retention``.

    Args:
        decay_exponents: (low, high): head h decays with ``1 - 2**-e_h``, e_h evenly spaced from low
            to high (low 5 keeps ~32 tokens, high 9 ~512).
        learn_decay: make the per-head log-decay a trainable parameter (RetNet keeps it fixed).
        chunk_size: chunk length of the parallel form.
        backend: ``auto`` (fla on CUDA, else torch), ``torch`` or ``fla``.
    """

    decay_exponents: tuple[float, float] = attrs.field(default=(5.0, 9.0), converter=lambda v: tuple(float(x) for x in v),
                                                       validator=_exponents)
    learn_decay: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    chunk_size: int = attrs.field(default=16, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)])
    backend: Literal["auto", "torch", "fla"] = attrs.field(default="auto", validator=attrs.validators.in_(BACKENDS))


class Retention(LinearAttention):
    """Multi-scale retention built from one teacher attention layer.

    Shape:
        x: (B, T, hidden) -> (B, T, hidden); state["recurrent"]: (B, H, D, D)
    """

    naive = staticmethod(naive_recurrent_gla)

    def __init__(self, spec: AttentionSpec, config: RetentionConfig | None = None):
        super().__init__(spec, config if config is not None else RetentionConfig())
        H, D, hidden = spec.num_heads, spec.head_dim, spec.hidden_size
        self.num_heads, self.head_dim = H, D
        self.q_proj = nn.Linear(hidden, H * D, bias=spec.q_bias)
        self.k_proj = nn.Linear(hidden, H * D, bias=spec.k_bias)
        self.v_proj = nn.Linear(hidden, H * D, bias=spec.v_bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, spec.norm_eps), RMSNorm(D, spec.norm_eps)
        self.o_norm = RMSNorm(D, spec.norm_eps)
        lo, hi = self.config.decay_exponents
        exps = torch.linspace(lo, hi, H) if H > 1 else torch.tensor([lo])
        log_decay = torch.log1p(-(2.0 ** -exps))  # (H,), < 0
        if self.config.learn_decay:
            self.log_decay = nn.Parameter(log_decay)
        else:
            self.register_buffer("log_decay", log_decay)

    def load_teacher_weights(self, weights: TeacherAttentionWeights) -> None:
        """q and o as they are; k and v with the teacher's KV heads repeated per query head (GQA)."""
        pairs = {
            "q_proj.weight": weights.q_weight, "k_proj.weight": weights.k_weight_expanded,
            "v_proj.weight": weights.v_weight_expanded, "o_proj.weight": weights.o_weight,
            "q_proj.bias": weights.q_bias, "k_proj.bias": weights.k_bias_expanded,
            "v_proj.bias": weights.v_bias_expanded, "o_proj.bias": weights.o_bias,
        }
        if self.spec.qk_norm:
            pairs |= {"q_norm.weight": weights.q_norm, "k_norm.weight": weights.k_norm}
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, src in pairs.items():
                if name not in params:
                    continue  # e.g. no bias in this teacher
                if src is None or src.shape != params[name].shape:
                    got = None if src is None else tuple(src.shape)
                    raise HybridizeError(f"retention layer {self.layer_idx}: teacher {name} must have shape "
                                         f"{tuple(params[name].shape)}; got {got}")
                params[name].copy_(src)

    def mix(self, x: torch.Tensor, *, state: dict[str, torch.Tensor] | None = None, padding_mask: torch.Tensor | None = None,
            output_state: bool = False, mode: Mode = "chunk", backend: Backend = "auto",
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """See :meth:`hybridize.LinearAttention.mix`."""
        B, T, _ = x.shape
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", d=self.head_dim)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # the per-head decay as GLA's per-key-dim log-gate, constant over time and key dims
        gk = self.log_decay.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        gk = gk.view(1, 1, -1, 1).expand(B, T, self.num_heads, self.head_dim)
        if padding_mask is not None:  # padded tokens: no write (k = v = 0) and no decay (gk = 0)
            keep = padding_mask.to(x.dtype)[..., None, None]
            k, v, gk = k * keep, v * keep, gk * keep.to(gk.dtype)
        o, recurrent = gla(q, k, v, gk, initial_state=(state or {}).get("recurrent"), output_final_state=output_state,
                           mode=mode, backend=self.config.backend if backend == "auto" else backend,
                           chunk_size=self.config.chunk_size)
        y = self.o_proj(rearrange(self.o_norm(o), "b t h d -> b t (h d)"))
        return y, ({"recurrent": recurrent} if output_state else None)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, heads={self.num_heads}, decay_exponents={self.config.decay_exponents}"


@hookimpl
def hybridize_register_linear_attention(register) -> None:
    """Register ``retention``."""
    register("retention", Retention, RetentionConfig, capabilities=frozenset({"recurrent-state"}))
