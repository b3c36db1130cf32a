"""The generation cache of a hybrid: KV for softmax layers, recurrent state for linear layers.

Hugging Face's generate() builds a plain ``DynamicCache`` unless told otherwise; a hybrid would
then have nowhere to keep its linear layers' state. :class:`HybridCache` is a ``DynamicCache``
whose linear layers are :class:`LinearStateLayer` objects holding the variant's state dict
(recurrent state and short-convolution caches) and the number of tokens seen, so sequence
length and mask sizes are right whichever layer is asked.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from hybridize.errors import HybridizeError
from hybridize.linear import CACHE_ARG_NAMES, LinearAttention, check_hybrid_cache, pop_cache  # noqa: F401 - re-exported

State = dict[str, torch.Tensor]


def _map_state(state: State | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> State | None:
    return None if state is None else {k: fn(v) for k, v in state.items()}


class LinearStateLayer(DynamicLayer):
    """Cache layer of a linear-attention layer: a state dict instead of keys and values."""

    def __init__(self) -> None:
        super().__init__()
        self.state: State | None = None
        self.seen = 0
        self.device: torch.device | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        raise HybridizeError("a linear-attention layer has no keys/values; use get_linear_state / set_linear_state")

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = _map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = _map_state(self.state, lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise HybridizeError(
            "a linear-attention state cannot be rolled back, so this hybrid cannot crop its cache "
            "(assisted / speculative decoding); generate without an assistant model"
        )

    def offload(self) -> None:
        self.state = _map_state(self.state, lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.state and self.device is not None:
            self.state = _map_state(self.state, lambda t: t.to(self.device, non_blocking=True))


class HybridCache(DynamicCache):
    """A ``DynamicCache`` with :class:`LinearStateLayer` at the linear layers.

    Args:
        num_layers: decoder layers of the model.
        linear_layers: indices of the linear-attention layers.
    """

    def __init__(self, num_layers: int, linear_layers: Iterable[int]):
        linear = set(linear_layers)
        layers = [LinearStateLayer() if i in linear else DynamicLayer() for i in range(num_layers)]
        Cache.__init__(self, layers=layers)
        self.past_tokens = 0  # tokens cached before the current forward (set by begin_forward)

    def begin_forward(self) -> None:
        """Note how many tokens the cache holds before a forward (the backbone's pre-hook calls it).

        A linear layer that finds no state of its own while ``past_tokens > 0`` is being asked to
        continue a sequence it never saw, and raises instead of silently starting afresh.
        """
        self.past_tokens = max((layer.get_seq_length() for layer in self.layers), default=0)

    def past_tokens_of(self, layer_idx: int) -> int:
        """Tokens this cache holds from before the current forward, as far as ``layer_idx`` can tell."""
        return max(self.past_tokens, self._linear_layer(layer_idx).seen)

    def get_linear_state(self, layer_idx: int) -> State | None:
        """The state of a linear layer after the tokens seen so far (None before the first)."""
        return self._linear_layer(layer_idx).state

    def set_linear_state(self, layer_idx: int, state: State | None, n_tokens: int) -> None:
        """Store a linear layer's state after ``n_tokens`` more tokens."""
        layer = self._linear_layer(layer_idx)
        layer.state, layer.seen = state, layer.seen + n_tokens
        if state and layer.device is None:
            layer.device = next(iter(state.values())).device

    def _linear_layer(self, layer_idx: int) -> LinearStateLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, LinearStateLayer):
            raise HybridizeError(f"layer {layer_idx} is a softmax layer in this cache, not a linear one")
        return layer


# -- the cache argument across transformers versions ----------------------------------------------
@functools.cache
def cache_arg_name(forward: Callable[..., Any]) -> str:
    """The name ``forward`` takes its cache under (``cache`` on transformers >= 5.24, else ``past_key_values``)."""
    params = inspect.signature(forward).parameters
    for name in CACHE_ARG_NAMES:
        if name in params:
            return name
    raise HybridizeError(
        f"{getattr(forward, '__qualname__', forward)} takes its cache under none of {CACHE_ARG_NAMES}: "
        "this transformers release is not supported by hybridize (see the README's tested range)"
    )


@functools.cache
def cache_arg_position(forward: Callable[..., Any]) -> int:
    """Position of the cache among ``forward``'s arguments after ``self``."""
    names = [n for n in inspect.signature(forward).parameters if n != "self"]
    return names.index(cache_arg_name(forward))


def guard_backbone_cache(backbone: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of a hybrid's decoder backbone: give it a :class:`HybridCache`, refuse any other.

    Called with the backbone's arguments before its ``forward``: takes the cache under either name
    (or positionally), makes a HybridCache when ``use_cache`` is on and none was given (a plain
    transformers backbone would make a ``DynamicCache``, which holds no recurrent state), and
    passes it on under the name this transformers release uses.
    """
    layers = list(backbone.layers)
    linear = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LinearAttention)]
    if not linear:
        return None
    forward = type(backbone).forward
    name, pos = cache_arg_name(forward), cache_arg_position(forward)
    args, kwargs = list(args), dict(kwargs)
    where = f"{type(backbone).__name__}.forward"
    cache = pop_cache(where, kwargs)
    if len(args) > pos and args[pos] is not None:
        if cache is not None and cache is not args[pos]:
            raise HybridizeError(f"{where} got two different caches (positional and {name!r}); pass one")
        cache = args[pos]
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(backbone.config, "use_cache", False)
    if cache is None and use_cache:
        cache = HybridCache(len(layers), linear)
    check_hybrid_cache(cache, f"this hybrid ({type(backbone).__name__})")
    if cache is not None:
        if hasattr(cache, "begin_forward"):
            cache.begin_forward()
        if len(args) > pos:
            args[pos] = cache
        else:
            kwargs[name] = cache
    return tuple(args), kwargs
