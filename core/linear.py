"""The contract between the engine and linear-attention variant plugins.

A variant is an ``nn.Module`` subclass of :class:`LinearAttention`. The engine builds one per
converted layer with ``factory(spec, config)``, copies the teacher's weights into it with
``load_teacher_weights``, and puts it where the teacher layer's ``self_attn`` was. The base
class adapts the Hugging Face attention call (``hidden_states, position_embeddings,
attention_mask, cache / past_key_values, ...``) to the variant's :meth:`LinearAttention.mix`, which is
the only sequence-mixing code a variant writes.
"""
from __future__ import annotations

import contextvars
from typing import Any, Literal

import attrs
import torch
from torch import nn

from hybridize.errors import HybridizeError

Mode = Literal["chunk", "recurrent"]
Backend = Literal["auto", "torch", "fla"]

#: The 2-D padding mask (B, T_total) of the current forward, set by the hook that
#: :func:`hybridize.model.surgery.build_student` installs on the decoder. 1 = real token, 0 = padding.
PADDING_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("hybridize_padding_mask", default=None)


@attrs.frozen(kw_only=True)
class AttentionSpec:
    """Shapes and options of one teacher attention layer (no weights).

    Enough to build an empty variant module, e.g. when loading a saved hybrid.
    """

    layer_idx: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6

    def __attrs_post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise HybridizeError(
                f"layer {self.layer_idx}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def qk_dim(self) -> int:
        """Width of all query heads together (num_heads * head_dim)."""
        return self.num_heads * self.head_dim


def expand_kv(t: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor | None:
    """Repeat each KV head's rows for the query heads it serves.

    KV head ``h`` serves query heads ``h*g ... h*g+g-1`` (``g = num_heads // num_kv_heads``),
    the same order as Hugging Face's ``repeat_kv``.

    Shape:
        t: (num_kv_heads * head_dim, ...) -> (num_heads * head_dim, ...)
    """
    if t is None:
        return None
    heads = t.reshape(spec.num_kv_heads, spec.head_dim, *t.shape[1:])
    return heads.repeat_interleave(spec.kv_groups, dim=0).reshape(spec.qk_dim, *t.shape[1:])


@attrs.frozen(kw_only=True)
class TeacherAttentionWeights:
    """The weights of one teacher attention layer, in Hugging Face layout (detached copies)."""

    spec: AttentionSpec
    q_weight: torch.Tensor  # (H*D, hidden)
    k_weight: torch.Tensor  # (Hkv*D, hidden)
    v_weight: torch.Tensor  # (Hkv*D, hidden)
    o_weight: torch.Tensor  # (hidden, H*D)
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # (D,) RMSNorm weight (Qwen3)
    k_norm: torch.Tensor | None = None

    @property
    def k_weight_expanded(self) -> torch.Tensor:
        return expand_kv(self.k_weight, self.spec)

    @property
    def v_weight_expanded(self) -> torch.Tensor:
        return expand_kv(self.v_weight, self.spec)

    @property
    def k_bias_expanded(self) -> torch.Tensor | None:
        return expand_kv(self.k_bias, self.spec)

    @property
    def v_bias_expanded(self) -> torch.Tensor | None:
        return expand_kv(self.v_bias, self.spec)


class LinearAttention(nn.Module):
    """Base class of linear-attention variants: the Hugging Face adapter around :meth:`mix`.

    Subclasses implement ``__init__(spec, config)``, :meth:`load_teacher_weights` and
    :meth:`mix`, and ship a ``naive`` recurrence used as their reference in tests.

    Args:
        spec: shapes of the teacher layer this module replaces.
        config: the variant's attrs config.
    """

    def __init__(self, spec: AttentionSpec, config: Any):
        super().__init__()
        self.spec = spec
        self.config = config
        self.layer_idx = spec.layer_idx

    def load_teacher_weights(self, weights: TeacherAttentionWeights) -> None:
        """Initialise this module from the teacher layer it replaces (q/k/v/o, biases, norms)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_teacher_weights")

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
        """Mix a sequence causally.

        Args:
            x: layer input after the input norm.
            state: the recurrent state after the previous tokens, or None to start fresh.
            padding_mask: 1 for real tokens, 0 for padding; padded tokens must leave the state unchanged.
            output_state: return the state after the last token.
            mode: ``chunk`` (parallel within chunks) or ``recurrent`` (one token at a time).
            backend: ``torch`` reference, ``fla`` Triton kernels (CUDA), or ``auto``.

        Shape:
            x: (B, T, hidden) -> output (B, T, hidden); padding_mask: (B, T)
        """
        raise NotImplementedError(f"{type(self).__name__} must implement mix")

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Hugging Face attention signature; positions and the 4-D causal mask are not needed.

        The cache comes as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier); a
        ``Cache`` under any other name is refused rather than ignored.
        """
        where = f"layer {self.layer_idx} ({type(self).__name__})"
        cache = pop_cache(where, {"past_key_values": past_key_values, **kwargs})
        B, T, _ = hidden_states.shape
        padding_mask = _current_padding_mask(B, T)
        if cache is None:
            out, _ = self.mix(hidden_states, padding_mask=padding_mask, mode=self._auto_mode(hidden_states))
            return out, None
        check_hybrid_cache(cache, where)
        state = cache.get_linear_state(self.layer_idx)
        past = cache.past_tokens_of(self.layer_idx) if hasattr(cache, "past_tokens_of") else 0
        if state is None and past > 0:
            raise HybridizeError(
                f"{where} is asked to continue a sequence of {past} cached tokens but the cache holds no recurrent "
                "state for it; it would decode without its past. Pass the cache that the previous forward "
                "filled (the output's cache), or start again without one"
            )
        out, state = self._mix_cached(hidden_states, state, padding_mask)
        cache.set_linear_state(self.layer_idx, state, T)
        return out, None

    def _mix_cached(self, x: torch.Tensor, state: Any, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        from hybridize.ops import decode_graphs

        if decode_graphs.usable(self, x, state, padding_mask):  # one token on CUDA: replay a CUDA graph
            out, state = decode_graphs.decode_step(self, x, state)
        else:
            out, state = self.mix(x, state=state, padding_mask=padding_mask, output_state=True, mode=self._auto_mode(x))
        if not state:
            raise HybridizeError(
                f"linear attention {type(self).__name__}.mix returned no state with output_state=True (layer "
                f"{self.layer_idx}); a variant must return its recurrent state dict so decoding can continue"
            )
        return out, state

    def _auto_mode(self, x: torch.Tensor) -> Mode:
        # fla's advice: fused-recurrent kernels for short decode steps at inference; on CPU the
        # torch chunked form is exact and faster than a Python loop for anything but one token
        T = x.shape[1]
        if T == 1 or (x.is_cuda and T <= 64 and not self.training):
            return "recurrent"
        return "chunk"


#: (mask, (B, T), result) of the last call: every linear layer of one forward asks the same
#: question, and answering it (``mask.all()``) waits for the GPU, so it is answered once per forward
_LAST_MASK: tuple[Any, Any, Any] = (None, None, None)


def forget_padding_mask() -> None:
    """Drop the memo of :func:`_current_padding_mask` (the padding hook calls it at every forward)."""
    global _LAST_MASK
    _LAST_MASK = (None, None, None)


def _current_padding_mask(B: int, T: int) -> torch.Tensor | None:
    global _LAST_MASK
    mask = PADDING_MASK.get()
    if mask is None or mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < T:
        return None
    last = _LAST_MASK
    if last[0] is mask and last[1] == (B, T):
        return last[2]
    part = mask[:, -T:]
    result = None if bool(part.all()) else part
    _LAST_MASK = (mask, (B, T), result)
    return result


# -- the cache argument of the attention call (HybridCache: hybridize.model.cache) ------------------
#: The names transformers has given the cache argument of model / layer / attention ``forward``:
#: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the old name a deprecated alias until 5.40).
CACHE_ARG_NAMES = ("cache", "past_key_values")


def pop_cache(layer: str, kwargs: dict[str, Any]) -> Any:
    """Take the cache out of a call's keyword arguments, under whichever name it came.

    Any other keyword argument holding a ``transformers`` ``Cache`` is an error: a cache under a
    name this code does not know would otherwise be ignored, and a linear layer would decode
    without its recurrent state (what transformers 5.24's rename did to earlier versions).

    Raises:
        HybridizeError: two different caches, or a cache under an unknown argument name.
    """
    from transformers.cache_utils import Cache

    given = {n: kwargs.pop(n) for n in CACHE_ARG_NAMES if kwargs.get(n) is not None}
    caches = list({id(c): c for c in given.values()}.values())
    if len(caches) > 1:
        raise HybridizeError(f"{layer} got two different caches ({', '.join(given)}); pass one")
    stray = [n for n, v in kwargs.items() if isinstance(v, Cache)]
    if stray:
        raise HybridizeError(
            f"{layer} got a {type(kwargs[stray[0]]).__name__} as argument {stray[0]!r}, a cache name hybridize does "
            f"not know (it knows {', '.join(CACHE_ARG_NAMES)}); this transformers release is not supported"
        )
    return caches[0] if caches else None


def check_hybrid_cache(cache: Any, where: str) -> None:
    """Refuse a cache that has no place for recurrent state (e.g. a plain ``DynamicCache``)."""
    if cache is not None and not hasattr(cache, "get_linear_state"):
        raise HybridizeError(
            f"{where} has linear-attention layers but got a {type(cache).__name__}, which has no recurrent state; "
            "pass hybridize's HybridCache (HybridCache(num_layers, linear_layers)) or leave the cache out and let "
            "the hybrid make one (generate() and forward(use_cache=True) do)"
        )
