"""The generation cache of a hybrid: KV for softmax layers, recurrent state for linear layers.

Hugging Face's generate() builds a plain ``DynamicCache`` unless told otherwise; a hybrid would
then have nowhere to keep its linear layers' state. :class:`HybridCache` is a ``DynamicCache``
whose linear layers are :class:`LinearStateLayer` objects holding the variant's state dict
(recurrent state and short-convolution caches) and the number of tokens seen, so sequence
length and mask sizes are right whichever layer is asked.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from hybridize.errors import HybridizeError

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
