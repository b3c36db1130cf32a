"""The padding hook of a hybrid: linear layers see the ``attention_mask`` of the forward they run in.

A forward pre-hook on the decoder backbone sets :data:`hybridize.linear.PADDING_MASK` and a forward
hook restores it; a second pre-hook (:func:`hybridize.model.cache.guard_backbone_cache`) gives the
backbone a :class:`~hybridize.model.cache.HybridCache`. Installed by surgery and by loading.
"""
from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import nn

from hybridize.linear import PADDING_MASK, forget_padding_mask

# tokens of PADDING_MASK.set calls made by the pre-hook, innermost last (per thread / context)
_MASK_TOKENS: contextvars.ContextVar[tuple[contextvars.Token, ...]] = contextvars.ContextVar(
    "hybridize_padding_mask_tokens", default=()
)


def _mask_from_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _set_padding_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    forget_padding_mask()  # a mask changed in place between forwards must be looked at again
    token = PADDING_MASK.set(_mask_from_call(args, kwargs))
    _MASK_TOKENS.set((*_MASK_TOKENS.get(), token))


def _reset_padding_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    tokens = _MASK_TOKENS.get()
    if tokens:
        _MASK_TOKENS.set(tokens[:-1])
        PADDING_MASK.reset(tokens[-1])


def install_padding_hook(model: nn.Module) -> None:
    """Install the hybrid's hooks on its decoder backbone (``model.model``); idempotent.

    - A forward pre-hook sets :data:`hybridize.linear.PADDING_MASK` from the ``attention_mask``
      argument (None unless it is 2-D), and a forward hook restores the previous value
      afterwards, also when the forward raises, so linear layers see the padding.
    - A forward pre-hook (:func:`hybridize.model.cache.guard_backbone_cache`) gives the backbone a
      :class:`~hybridize.model.cache.HybridCache` when ``use_cache`` is on and refuses a cache without
      recurrent state, under either name transformers uses for the argument; so the base model
      alone (what ``AutoModel`` returns) decodes like the whole hybrid.

    Call it again on hybrids loaded from disk.
    """
    install_backbone_hooks(model.model)


def install_backbone_hooks(backbone: nn.Module) -> None:
    """:func:`install_padding_hook` on the decoder backbone itself (a hybrid's ``model.model``, or what AutoModel loads)."""
    from hybridize.model.cache import guard_backbone_cache

    if _set_padding_mask in backbone._forward_pre_hooks.values():
        return
    backbone.register_forward_pre_hook(guard_backbone_cache, with_kwargs=True)
    backbone.register_forward_pre_hook(_set_padding_mask, with_kwargs=True)
    backbone.register_forward_hook(_reset_padding_mask, with_kwargs=True, always_call=True)
