"""Hybrids saved by hybridize, for stock transformers: no import of hybridize.

``save_hybrid`` copies this file and ``linear_hybridize.py`` beside a hybrid's weights and points the
``auto_map`` of its ``config.json`` here, so that::

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=dir,trust_remote_code=True ...

load the hybrid with torch and transformers alone. Each class is the teacher family's own transformers
class whose linear layers (``config.hybridize``) are rebuilt from ``linear_hybridize.py``; ``forward`` and
``generate`` get a cache that holds KV for softmax layers and the recurrent state for linear ones, and a
cache without room for that state is refused rather than decoded without it. hybridize's own classes
(``hybridize.model.hybrid``) are the reference this file is tested against.
"""
from __future__ import annotations

import inspect
from typing import Any

from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .linear_hybridize import LAYERS, LinearLayer, MaskHolder, options

CACHE_NAMES = ("cache", "past_key_values")  # the cache argument's name from transformers 5.24 / before


class LinearStateLayer(DynamicLayer):
    """Cache layer of a linear-attention layer: the layer's state dict and the number of tokens it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.state: dict | None = None
        self.seen = 0

    def _map(self, fn: Any) -> None:
        self.state = None if self.state is None else {k: fn(v) for k, v in self.state.items()}

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("a linear-attention layer has no keys/values")

    def get_seq_length(self, *args: Any) -> int:
        return self.seen

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: Any) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Any) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise ValueError("a linear-attention state cannot be rolled back: generate without an assistant model")


class HybridCache(DynamicCache):
    """A ``DynamicCache`` with :class:`LinearStateLayer` at the linear layers."""

    def __init__(self, num_layers: int, linear_layers: Any):
        linear = set(linear_layers)
        Cache.__init__(self, layers=[LinearStateLayer() if i in linear else DynamicLayer() for i in range(num_layers)])
        self.past_tokens = 0

    def begin_forward(self) -> None:
        self.past_tokens = max((layer.get_seq_length() for layer in self.layers), default=0)

    def past_tokens_of(self, layer_idx: int) -> int:
        return max(self.past_tokens, self.layers[layer_idx].seen)

    def get_linear_state(self, layer_idx: int) -> dict | None:
        return self.layers[layer_idx].state

    def set_linear_state(self, layer_idx: int, state: dict, n_tokens: int) -> None:
        layer = self.layers[layer_idx]
        layer.state, layer.seen = state, layer.seen + n_tokens


def _cache_name(forward: Any) -> str:
    params = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise ValueError(f"{forward.__qualname__} takes no cache argument the hybridize module knows ({CACHE_NAMES})")


def _linear(backbone: Any) -> list[int]:
    return [i for i, layer in enumerate(backbone.layers) if isinstance(layer.self_attn, LinearLayer)]


def _before_backbone(backbone: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pre-hook of the decoder backbone: note the padding mask; give it a HybridCache, refuse any other cache."""
    backbone._hybridize_mask.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    name = _cache_name(type(backbone).forward)
    pos = [n for n in inspect.signature(type(backbone).forward).parameters if n != "self"].index(name)
    args, kwargs = list(args), dict(kwargs)
    cache = args[pos] if len(args) > pos else None
    for n in CACHE_NAMES:
        cache = kwargs.pop(n, None) if kwargs.get(n) is not None else cache
    use_cache = kwargs.get("use_cache")
    if cache is None and (backbone.config.use_cache if use_cache is None else use_cache):
        cache = HybridCache(len(backbone.layers), _linear(backbone))
    if cache is not None and not hasattr(cache, "get_linear_state"):
        raise ValueError(f"this hybrid has linear-attention layers but got a {type(cache).__name__}, which holds no "
                         "recurrent state; leave the cache out and let the model make its own")
    if cache is not None:
        cache.begin_forward()
        if len(args) > pos:
            args[pos] = cache
        else:
            kwargs[name] = cache
    return tuple(args), kwargs


def _after_backbone(backbone: Any, args: tuple, kwargs: dict, output: Any) -> None:
    backbone._hybridize_mask.mask = None


def _rebuild(model: Any) -> None:
    """Replace the attention of the layers ``config.hybridize`` lists by linear layers; install the hooks."""
    section = getattr(model.config, "hybridize", None) or {}
    linear = section.get("linear_layers", [])
    backbone, holder = model.model, MaskHolder()
    backbone._hybridize_mask = holder
    if not linear:
        return
    opts = options(section.get("variant"), section.get("variant_params"))
    config = model.config
    for i in linear:
        attn = backbone.layers[i].self_attn
        spec = {"layer_idx": i, "hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
                "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                "qk_norm": hasattr(attn, "q_norm"), "norm_eps": float(getattr(config, "rms_norm_eps", 1e-6)),
                **{f"{p}_bias": getattr(attn, f"{p}_proj").bias is not None for p in "qkvo"}}
        ref = attn.o_proj.weight
        backbone.layers[i].self_attn = LAYERS[section["variant"]](spec, opts, holder).to(device=ref.device, dtype=ref.dtype)
    backbone.register_forward_pre_hook(_before_backbone, with_kwargs=True)
    backbone.register_forward_hook(_after_backbone, with_kwargs=True, always_call=True)


class HybridizeMixin:
    """Placed before the family's ``...ForCausalLM``: linear layers rebuilt at construction, a HybridCache in generate."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        name = _cache_name(type(self).forward)
        given = [model_kwargs.pop(n) for n in CACHE_NAMES if model_kwargs.get(n) is not None]
        cache = given[0] if given else None
        if cache is not None and not hasattr(cache, "get_linear_state"):
            raise ValueError(f"generate got a {type(cache).__name__}, which holds no recurrent state; leave it out")
        if cache is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError("generation field 'cache_implementation' must be 'dynamic' for a hybrid; "
                                 f"got {generation_config.cache_implementation!r}")
            cache = HybridCache(len(self.model.layers), _linear(self.model))
        if cache is not None:
            model_kwargs[name] = cache
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def _family(name: str, config_cls: type, model_cls: type) -> tuple[type, type]:
    """``Hybridize<Name>Config`` (model type ``hybridize_<name>``) and ``Hybridize<Name>ForCausalLM``."""
    config = type(f"Hybridize{name}Config", (config_cls,), {"model_type": f"hybridize_{name.lower()}", "__module__": __name__})
    model = type(f"Hybridize{name}ForCausalLM", (HybridizeMixin, model_cls), {"config_class": config, "__module__": __name__})
    return config, model


# module-level names: what ``auto_map`` in a hybrid's config.json points at
HybridizeLlamaConfig, HybridizeLlamaForCausalLM = _family("Llama", LlamaConfig, LlamaForCausalLM)
HybridizeQwen2Config, HybridizeQwen2ForCausalLM = _family("Qwen2", Qwen2Config, Qwen2ForCausalLM)
HybridizeQwen3Config, HybridizeQwen3ForCausalLM = _family("Qwen3", Qwen3Config, Qwen3ForCausalLM)
HybridizeMistralConfig, HybridizeMistralForCausalLM = _family("Mistral", MistralConfig, MistralForCausalLM)

#: family -> (config class name, model class name)
CLASSES = {name.lower(): (f"Hybridize{name}Config", f"Hybridize{name}ForCausalLM")
           for name in ("Llama", "Qwen2", "Qwen3", "Mistral")}
