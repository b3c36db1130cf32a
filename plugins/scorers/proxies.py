"""Proxy scorers: layer importance without a distillation run per layer.

Each scores every layer in one or a few passes over the held-out blocks (the blocks the engine's
held-out KL uses), with no probe training:

- ``swap-kl`` (``requires == "stage1"``): held-out KL(teacher || teacher whose layer l attention is
  replaced by its stage-1 linear fit), one forward per layer. The KL that linearising l alone
  causes before any stage-2 training: GR-S2 at zero probe tokens.
- ``grad-sensitivity`` (``requires == "teacher"``): sum over positions t of
  |<a_l(t), dCE/da_l(t)>|, with a_l the output of layer l's attention and CE the teacher's mean
  next-token loss: a first-order estimate of how much the loss moves when l's attention output
  is removed. One forward and one backward of the teacher per batch.
- ``attention-entropy`` (``requires == "teacher"``): entropy of each attention distribution
  divided by log(number of visible keys), averaged over heads, query positions and sequences
  (0 = attends to one key, 1 = uniform). One forward of the teacher, with eager attention so
  the probabilities exist; one sequence at a time, so at most one layer's (H, T, T) is held.

Each counts the tokens it pushes through a network with ``ctx.spend`` (``heldout_kl`` counts its own).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import attrs
import torch

from hybridize import hookimpl
from hybridize.errors import HybridizeError
from hybridize.plugins.scorers import check_layers, require
from hybridize.selection.contract import ScoreContext


@attrs.frozen(kw_only=True)
class ProxyScorerConfig:
    """Options of the proxy scorers (none: the held-out blocks are the engine's)."""


@contextmanager
def attention_hooks(teacher: torch.nn.Module, layers: list[int], make: Callable[[int], Callable]) -> Iterator[None]:
    """Forward hooks ``make(l)`` on the attention module of each of ``layers`` (removed on exit)."""
    from hybridize.model.teacher import decoder_layers

    blocks = decoder_layers(teacher)
    handles = [blocks[l].self_attn.register_forward_hook(make(l), with_kwargs=True) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class _ProxyScorer:
    """Holds the (empty) config; subclasses set ``requires`` and ``__call__``.

    Args:
        config: a :class:`ProxyScorerConfig`.
    """

    requires: Literal["probe", "stage1", "teacher"]

    def __init__(self, config: ProxyScorerConfig):
        self.config = config


class SwapKL(_ProxyScorer):
    """``{l: held-out KL(teacher || teacher with attention l -> stage-1 fit of l)}``."""

    requires: Literal["probe", "stage1", "teacher"] = "stage1"

    def __call__(self, ctx: ScoreContext) -> dict[int, float]:
        """KL caused by swapping each requested layer alone.

        Raises:
            HybridizeError: the context lacks the teacher, the stage-1 modules or ``heldout_kl``, or a layer's module.
        """
        require("swap-kl", "stage1", ctx, ("teacher", "stage1_modules", "heldout_kl"))
        check_layers("swap-kl", "stage-1 module", ctx.stage1_modules, ctx.layers)
        out = {}
        for layer in ctx.layers:
            with attention_hooks(ctx.teacher, [layer], lambda l: self._swap(ctx.stage1_modules[l])):
                out[int(layer)] = float(ctx.heldout_kl(ctx.teacher))
        return out

    @staticmethod
    def _swap(module: torch.nn.Module) -> Callable:
        def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple:
            y, _ = module.mix(_input(args, kwargs))  # (B, T, hidden)
            return (y.to(output[0].dtype), *output[1:])

        return hook


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels (the last position has none)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


class GradSensitivity(_ProxyScorer):
    """``{l: mean over held-out batches of sum_t |<a_l(t), dCE/da_l(t)>|}`` (teacher only)."""

    requires: Literal["probe", "stage1", "teacher"] = "teacher"

    def __call__(self, ctx: ScoreContext) -> dict[int, float]:
        """First-order loss sensitivity of each requested layer's attention output.

        Raises:
            HybridizeError: the context lacks the teacher or the held-out batches.
        """
        from hybridize.training.losses import chunked_ce
        from hybridize.training.loop import autocast_for

        require("grad-sensitivity", "teacher", ctx, ("teacher", "heldout"))
        layers, device = [int(l) for l in ctx.layers], ctx.device or torch.device("cpu")
        sums, seen = dict.fromkeys(layers, 0.0), {}

        def make(l: int) -> Callable:
            def hook(_mod: torch.nn.Module, _args: tuple, _kwargs: dict, output: Any) -> tuple:
                zero = torch.zeros_like(output[0], requires_grad=True)  # d loss / d zero = d loss / d a_l
                seen[l] = (output[0].detach(), zero)
                return (output[0] + zero, *output[1:])

            return hook

        with attention_hooks(ctx.teacher, layers, make), torch.enable_grad():
            for ids in ctx.heldout:
                ids = ids.to(device)
                with autocast_for(device):
                    h = ctx.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
                loss = chunked_ce(h, _labels(ids), ctx.teacher.lm_head)
                grads = torch.autograd.grad(loss, [seen[l][1] for l in layers])
                for l, g in zip(layers, grads):
                    sums[l] += float((seen[l][0].float() * g.float()).sum(-1).abs().sum()) / len(ctx.heldout)
                ctx.spend("teacher_forward", ids.numel())
                ctx.spend("teacher_backward", ids.numel())
                seen.clear()
        return sums


class AttentionEntropy(_ProxyScorer):
    """``{l: mean normalised entropy of layer l's attention}`` (teacher only; lower = sharper)."""

    requires: Literal["probe", "stage1", "teacher"] = "teacher"

    def __call__(self, ctx: ScoreContext) -> dict[int, float]:
        """Normalised attention entropy of each requested layer.

        Raises:
            HybridizeError: the context lacks the teacher or the held-out batches, or the teacher
                cannot return attention probabilities.
        """
        require("attention-entropy", "teacher", ctx, ("teacher", "heldout"))
        layers, device, teacher = [int(l) for l in ctx.layers], ctx.device or torch.device("cpu"), ctx.teacher
        sums, count = dict.fromkeys(layers, 0.0), 0
        impl = teacher.config._attn_implementation
        teacher.set_attn_implementation("eager")  # sdpa / flash never materialise the probabilities
        try:
            with attention_hooks(teacher, layers, lambda l: self._entropy(l, sums)), torch.no_grad():
                for batch in ctx.heldout:
                    for ids in batch.split(1):
                        teacher.model(input_ids=ids.to(device), use_cache=False)
                        count += 1
                    ctx.spend("teacher_forward", batch.numel())
        finally:
            teacher.set_attn_implementation(impl)
        return {l: v / max(count, 1) for l, v in sums.items()}

    @staticmethod
    def _entropy(layer: int, sums: dict[int, float]) -> Callable:
        def hook(mod: torch.nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            p = output[1] if isinstance(output, tuple) and len(output) > 1 else None  # (B, H, T, S)
            if p is None:
                raise HybridizeError(f"scorer 'attention-entropy': layer {layer}'s attention returned no probabilities "
                                     f"under eager attention ({type(mod).__name__}); this teacher is not supported")
            p = p.float()
            T, S = p.shape[-2:]
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, T)
            keys = torch.arange(S - T + 1, S + 1, device=p.device, dtype=torch.float)  # visible keys per query (causal)
            window = getattr(mod, "sliding_window", None)
            if window:
                keys = keys.clamp(max=window)
            ok = keys > 1
            sums[layer] += float((ent[..., ok] / keys[ok].log()).mean()) if bool(ok.any()) else 0.0

        return hook


def swap_kl(config: ProxyScorerConfig) -> SwapKL:
    """Factory of ``swap-kl``."""
    return SwapKL(config)


def grad_sensitivity(config: ProxyScorerConfig) -> GradSensitivity:
    """Factory of ``grad-sensitivity``."""
    return GradSensitivity(config)


def attention_entropy(config: ProxyScorerConfig) -> AttentionEntropy:
    """Factory of ``attention-entropy``."""
    return AttentionEntropy(config)


@hookimpl
def hybridize_register_scorers(register) -> None:
    """Register ``swap-kl``, ``grad-sensitivity`` and ``attention-entropy``."""
    register("swap-kl", swap_kl, ProxyScorerConfig, capabilities=frozenset({"stage1"}))
    register("grad-sensitivity", grad_sensitivity, ProxyScorerConfig, capabilities=frozenset({"teacher"}))
    register("attention-entropy", attention_entropy, ProxyScorerConfig, capabilities=frozenset({"teacher"}))
