"""The contract between the engine and linear-attention variant plugins.

A variant is an ``nn.Module`` subclass of :class:`LinearAttention` with an attrs config class,
registered through ``hybridize_register_linear_attention`` as ``register(name, cls, config_cls,
capabilities=...)``. The engine (:func:`hybridize.model.surgery.build_student`) builds one per
converted layer with ``cls(spec, config)``, copies the teacher's weights into it with
:meth:`LinearAttention.load_teacher_weights`, moves it to the teacher's device and dtype, and puts it
where the teacher layer's ``self_attn`` was. The base class adapts the Hugging Face attention call
(``hidden_states, position_embeddings, attention_mask, cache / past_key_values, ...``) to the
variant's :meth:`LinearAttention.mix`, which is the only sequence-mixing code a variant writes.

What a variant must do (checked by :mod:`hybridize.testing.conformance` on CPU, float64,
``backend="torch"``, most checks after noise of std 0.2 on every parameter):

- hold the teacher's weights in modules named ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (and
  ``q_norm``, ``k_norm`` when ``spec.qk_norm``): q and o exactly as the teacher's, k and v from the
  GQA-expanded views of :class:`TeacherAttentionWeights`; other parameters (gates, convolutions,
  output norms) are the variant's to name;
- ``mix`` keeps shape and dtype, is causal, gives the same result in ``mode="chunk"`` and
  ``mode="recurrent"`` (relative tolerance ``TOL = 1e-6``), fresh and from a state; padded tokens
  leave the state unchanged; every trainable parameter gets a finite gradient;
- ``mix(..., output_state=True)`` returns a non-empty dict of tensors with the batch first (the
  variant's own keys; the built-ins use ``recurrent`` (B, H, D, D) in fp32 and ``conv_q``,
  ``conv_k``, ``conv_v`` (B, H*D, W-1)), the same keys in both modes; ``output_state=False`` returns
  None. The cache hands the last returned dict back as ``state=`` (rows reordered along dim 0 by
  beam search); on CUDA a one-token decode step is replayed from a CUDA graph
  (:mod:`hybridize.ops.decode_graphs`), so keys, shapes and dtypes stay the same from step to step;
- decoding token by token through ``forward`` with a cache equals one parallel ``mix``.

``backend``: ``torch``, ``fla`` (CUDA only) or ``auto`` (fla on CUDA when it imports). The built-in
variants use ``config.backend if backend == "auto" else backend``: an explicit ``mix(backend=...)``
wins; ``forward`` passes the default ``auto``, so in a model the config's ``backend`` decides.

Every variant ships a reference as the class attribute ``naive`` (the built-ins point it at
:func:`hybridize.ops.delta_rule.naive_recurrent_gated_delta_rule` or
:func:`hybridize.ops.gla.naive_recurrent_gla`). The conformance suite compares each op's chunked form
with its naive loop (``check_op_chunk_matches_naive``); its module checks use ``mode="recurrent"`` as
the module's reference and do not call ``naive``.

Capabilities are free strings; the tests read ``fla-kernels`` (compare ``backend="fla"`` with
``backend="torch"`` on a GPU). A plugin imports this module, :mod:`hybridize.errors` and
:mod:`hybridize.ops`, never another plugin's module. The full text, with shapes:
README, "The variant author's contract".
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
    """The weights of one teacher attention layer, in Hugging Face layout (detached copies).

    ``H`` query heads, ``Hkv`` KV heads, head size ``D``; ``q_norm`` / ``k_norm`` are the RMSNorm
    weights of Qwen3-style q/k norms; a bias or norm the teacher lacks is None. The ``*_expanded``
    properties repeat each KV head for the ``spec.kv_groups`` query heads it serves
    (:func:`expand_kv`), so that a variant with one head per query head can copy them as they are.

    Shape:
        q_weight: (H*D, hidden); k_weight, v_weight: (Hkv*D, hidden); o_weight: (hidden, H*D);
        q_bias: (H*D,); k_bias, v_bias: (Hkv*D,); o_bias: (hidden,); q_norm, k_norm: (D,);
        k_weight_expanded, v_weight_expanded: (H*D, hidden); k_bias_expanded, v_bias_expanded: (H*D,)
    """

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
        """``k_weight`` with each KV head repeated for its query heads: (H*D, hidden), see :func:`expand_kv`."""
        return expand_kv(self.k_weight, self.spec)

    @property
    def v_weight_expanded(self) -> torch.Tensor:
        """``v_weight`` with each KV head repeated for its query heads: (H*D, hidden), see :func:`expand_kv`."""
        return expand_kv(self.v_weight, self.spec)

    @property
    def k_bias_expanded(self) -> torch.Tensor | None:
        """``k_bias`` with each KV head repeated for its query heads: (H*D,); None without a bias."""
        return expand_kv(self.k_bias, self.spec)

    @property
    def v_bias_expanded(self) -> torch.Tensor | None:
        """``v_bias`` with each KV head repeated for its query heads: (H*D,); None without a bias."""
        return expand_kv(self.v_bias, self.spec)


class LinearAttention(nn.Module):
    """Base class of linear-attention variants: the Hugging Face adapter around :meth:`mix`.

    Subclasses implement ``__init__(spec, config)``, :meth:`load_teacher_weights` and
    :meth:`mix`, and set the class attribute ``naive`` to their reference recurrence (for a
    variant on a :mod:`hybridize.ops` recurrence, the op's ``naive_recurrent_*``, e.g.
    ``naive = staticmethod(naive_recurrent_gla)``). They do not override :meth:`forward`.

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
        """Initialise this module from the teacher layer it replaces (q/k/v/o, biases, norms).

        Called once, before the module is moved to the teacher's device and dtype. The teacher's
        q/o go into ``q_proj`` / ``o_proj`` as they are, ``k_weight_expanded`` /
        ``v_weight_expanded`` (and the expanded biases) into ``k_proj`` / ``v_proj``, ``q_norm`` /
        ``k_norm`` into modules of those names when ``spec.qk_norm``.
        """
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
            output_state: return the state after the last token; when False the second item is None.
            mode: ``chunk`` (parallel within chunks) or ``recurrent`` (one token at a time); both
                must give the same result.
            backend: ``torch`` reference, ``fla`` Triton kernels (CUDA), or ``auto``. The built-in
                variants let an explicit ``torch`` / ``fla`` here win and resolve ``auto`` (what
                :meth:`forward` passes) to ``config.backend``.

        Returns:
            ``(output, state)``: ``output`` in ``x``'s dtype; ``state`` a non-empty dict of tensors
            with the batch first when ``output_state``, keys of the variant's choosing, the same in
            both modes; the next call gets it back as ``state``.

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
