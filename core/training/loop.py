"""A small, exact-resume training loop shared by stage 1, stage 2, stage 3 and probes.

One optimizer step = ``batch_size`` blocks split into micro-batches (gradient accumulation).
Checkpoints hold the trainable state, optimizer, scheduler, RNG states and the data position,
and are written to a temporary name and renamed, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one. Resuming from a checkpoint gives the
same weights as an uninterrupted run (tests/unit/test_train.py proves it on CPU).

:class:`Optimization` is the one optimizer of every training run in hybridize: AdamW with per-group
lrs, the lr schedule, gradient clipping, the NaN guard and their checkpointable state. :class:`Loop`
owns one for a whole stage; each selection probe owns one and is stepped window by window
(:mod:`hybridize.selection.probes`); the quickstart teacher is trained with one.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from hybridize import faults
from hybridize.training.data import BlockSampler
from hybridize.training.checkpoints import full_state, load_checkpoint, load_full_state
from hybridize.training.parallel import SINGLE, check_batch, ddp_root, shard_batch
from hybridize.errors import HybridizeError
from hybridize.atomic_io import atomic_torch_save

LossFn = Callable[[torch.Tensor], torch.Tensor]


@attrs.frozen(kw_only=True)
class LoopConfig:
    """Optimisation settings of one stage."""

    steps: int
    batch_size: int
    micro_batch_size: int
    lr: float | list[float]
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0


def cosine_lambda(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay from 1 to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteLossError(HybridizeError):
    """A training loss became NaN or infinite; the step was not applied."""


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def move_tensor(t: torch.Tensor, device: torch.device, *, pin: bool = False) -> torch.Tensor:
    """``t`` on ``device`` (itself when already there); ``pin``: into pinned host memory, so that the move
    back to the GPU is asynchronous (a pinned source is copied with ``non_blocking``)."""
    device = torch.device(device)
    if t.device == device or (device.index is None and t.device.type == device.type):
        return t
    if pin:
        return t.to("cpu").pin_memory()
    return t.to(device, non_blocking=t.is_pinned())


@attrs.define(slots=False)
class Optimization:
    """The one optimizer of a training run: AdamW, its lr schedule, clipping, the NaN guard and their state.

    :class:`Loop` owns one for a whole stage; a selection probe owns one and is stepped window by
    window, in lockstep with the other probes. One :meth:`step` is: clip the gradients, step AdamW,
    step the schedule, drop the gradients.

    Args:
        param_groups: AdamW parameter groups; ``cfg.lr`` gives one lr per group (or one for all).
        cfg: the settings (``steps``, ``lr``, ``betas``, ``weight_decay``, ``grad_clip``,
            ``warmup_steps``, ``min_lr_ratio``; the batch fields are not used here).
        device: fused AdamW on CUDA.
        schedule: step -> lr factor (None: :func:`cosine_lambda` of ``cfg``).
        clip_params: the tensors whose gradient norm is clipped (None: those of ``param_groups``).
    """

    param_groups: list[dict[str, Any]]
    cfg: LoopConfig
    device: torch.device
    schedule: Callable[[int], float] | None = None
    clip_params: list[torch.Tensor] | None = None

    def __attrs_post_init__(self) -> None:
        groups = [dict(g, lr=lr) for g, lr in zip(self.param_groups, self.peak_lrs(len(self.param_groups)))]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay, fused=fused)
        lam = self.schedule or cosine_lambda(self.cfg.steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        if self.clip_params is None:
            self.clip_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._finite: torch.Tensor | None = None

    def peak_lrs(self, n: int) -> list[float]:
        return list(self.cfg.lr) if isinstance(self.cfg.lr, list) else [self.cfg.lr] * n

    @property
    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- the NaN guard ----------------------------------------------------------------------------
    def guard(self, loss: float, name: str, step: int) -> None:
        """Raise :class:`NonFiniteLossError` (before the step) when ``loss`` of step ``step`` of ``name`` is NaN / inf."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"{name}: the training loss is {loss} at step {step} (lr {self.last_lr:.3g}); "
                "the step was not applied. Lower the learning rate, then --resume continues from the last checkpoint"
            )

    def watch(self, loss: torch.Tensor) -> None:
        """Note whether ``loss`` is finite without a host sync (read back by :meth:`take_finite`)."""
        ok = torch.isfinite(loss.detach())
        self._finite = ok if self._finite is None else self._finite & ok

    def take_finite(self) -> bool:
        """Whether every loss watched since the last call was finite (one host sync)."""
        ok, self._finite = self._finite, None
        return True if ok is None else bool(ok)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Clip, step AdamW and the schedule, drop the gradients."""
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``state["optimizer"]`` (when present: FSDP loads it elsewhere) and ``state["scheduler"]``."""
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def apply_configured_lrs(self) -> None:
        """After loading a checkpoint: this run's peak lrs (``--resume`` may lower them) on the same schedule.

        The optimizer and scheduler states carry the lrs of the run that wrote them; with an unchanged
        config this recomputes exactly the same values (``base * lambda(step)``, as LambdaLR does).
        """
        lrs = self.peak_lrs(len(self.optimizer.param_groups))
        self.scheduler.base_lrs = list(lrs)
        for group, base, lam in zip(self.optimizer.param_groups, lrs, self.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * lam(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def scale_lrs(self, scale: float) -> None:
        """Multiply the current and peak lrs by ``scale`` (the schedule goes on from here)."""
        for g in self.optimizer.param_groups:
            g["lr"] *= scale
            if "initial_lr" in g:
                g["initial_lr"] *= scale
        self.scheduler.base_lrs = [lr * scale for lr in self.scheduler.base_lrs]

    def to(self, device: torch.device, *, pin: bool = False) -> None:
        """Move the optimizer state (not its step counters) to ``device`` (``pin``: into pinned host memory)."""
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = move_tensor(value, device, pin=pin)


@attrs.define(slots=False)
class Loop:
    """Runs ``cfg.steps`` optimizer steps of ``loss_fn`` over ``blocks``.

    Args:
        name: stage name, for progress bars, hooks and checkpoint files.
        model: the module whose ``state_dict`` is checkpointed (only trainable tensors are saved).
        param_groups: AdamW parameter groups; ``cfg.lr`` gives one lr per group (``self.opt``, an
            :class:`Optimization`, owns the optimizer, schedule, clipping and NaN guard).
        loss_fn: maps a (micro_batch, T) block of token ids to a scalar loss.
        blocks: (N, T) token ids on CPU.
        cfg: the loop settings.
        ckpt_path: checkpoint file, or None for no checkpoints.
        evaluate: called every ``cfg.eval_every`` steps and at the end; returns metrics.
        on_step: called after every step with (step, tokens, metrics); may raise to stop.
        dist: this process's place in a multi-process job (:class:`hybridize.training.parallel.Dist`);
            with several ranks each step's global batch is split over them and the gradients are
            averaged by DDP, and rank 0 alone writes the checkpoint.
        root: the FSDP2 root (a ``fully_shard``-ed :class:`hybridize.training.parallel.CallRoot` over
            ``model``) when the model is sharded; the loss then runs inside its forward.
    """

    name: str
    model: nn.Module
    param_groups: list[dict[str, Any]]
    loss_fn: LossFn
    blocks: torch.Tensor
    cfg: LoopConfig
    device: torch.device
    ckpt_path: Path | None = None
    evaluate: Callable[[], dict[str, float]] | None = None
    on_step: Callable[[int, int, dict[str, float]], None] | None = None
    progress: bool = True
    dist: Any = None
    root: Any = None
    step: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.opt = Optimization(self.param_groups, self.cfg, self.device)
        self.sampler = BlockSampler(self.blocks.shape[0], self.cfg.batch_size, seed=self.cfg.seed)
        self._trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.par = self.dist or SINGLE
        self._micro = check_batch(self.cfg.batch_size, self.cfg.micro_batch_size, self.par)
        self._ddp = ddp_root(self.model, self.par) if self.par.active and self.root is None else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.opt.optimizer

    @property
    def scheduler(self) -> Any:
        return self.opt.scheduler

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (with an FSDP-sharded model a collective: every rank must call it)."""
        if self.root is not None:
            model, optim = full_state(self.model, self.optimizer, self._trainable)
        else:
            params = dict(self.model.named_parameters())
            model, optim = {n: params[n].detach().cpu() for n in self._trainable}, self.optimizer.state_dict()
        return {
            "name": self.name, "step": self.step, "tokens": self.tokens, "history": self.history,
            "model": model, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": rng_state(), **({"fsdp": True} if self.root is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("fsdp")) != (self.root is not None):
            how = "with FSDP (distill.parallel fsdp)" if state.get("fsdp") else "without FSDP"
            raise HybridizeError(
                f"{self.name}: checkpoint {str(self.ckpt_path)!r} was written {how}, unlike this run; resume with the "
                "same --nproc and distill.parallel, or delete that file to redo the stage"
            )
        if self.root is not None:
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            self.opt.load_state_dict({"scheduler": state["scheduler"]})
        else:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in state["model"].items():
                    params[n].copy_(t)
            self.opt.load_state_dict(state)
        self.opt.apply_configured_lrs()
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step, self.tokens, self.history = state["step"], state["tokens"], state["history"]

    def save(self) -> None:
        """Checkpoint (rank 0 writes; the state is the same on every rank)."""
        if self.ckpt_path is None or (self.root is None and not self.par.is_main):
            return
        state = self.state_dict()  # with FSDP a collective: every rank gathers, rank 0 writes
        if self.par.is_main:
            atomic_torch_save(state, self.ckpt_path)

    def try_resume(self) -> bool:
        """Load the checkpoint if one exists; True when resumed."""
        if self.ckpt_path is None or not self.ckpt_path.exists():
            return False
        self.load_state_dict(load_checkpoint(self.ckpt_path))
        return True

    # -- the loop ---------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        if self._ddp is not None:
            return self._ddp(self.loss_fn, batch)
        if self.root is not None:
            return self.root(self.loss_fn, batch)
        return self.loss_fn(batch)

    def _grad_sync(self, on: bool) -> Any:
        """Gradient averaging over the ranks only after the step's last micro-batch (accumulation)."""
        if self._ddp is not None and not on:
            return self._ddp.no_sync()
        if self.root is not None:
            self.root.set_requires_gradient_sync(on)
        return nullcontext()

    def _one_step(self) -> float:
        idx = self.sampler.next_indices()  # the global batch; this rank takes its share
        parts = list(shard_batch(idx, self.par).split(self._micro))
        acc = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        total = torch.zeros((), dtype=acc, device=self.device)
        for i, part in enumerate(parts):
            batch = self.blocks[part].to(self.device, non_blocking=True)
            with self._grad_sync(i == len(parts) - 1):
                with autocast_for(self.device):
                    loss = self._loss(batch) / len(parts)
                loss.backward()
            total += loss.detach().to(acc)  # on the device: one host sync per step, not per micro-batch
        total = self.par.mean(float(total))
        self.opt.guard(total, self.name, self.step + 1)
        self.opt.step()
        self.step += 1
        self.tokens += len(idx) * self.blocks.shape[1]
        return total

    def _maybe_eval(self, force: bool = False) -> dict[str, float]:
        due = self.cfg.eval_every and self.step % self.cfg.eval_every == 0
        if self.evaluate is None or not (due or force):
            return {}
        if self.history and self.history[-1].get("step") == self.step:
            return {}
        metrics = self.evaluate()
        self.history.append({"step": self.step, "tokens": self.tokens, **metrics})
        return metrics

    def run(self) -> list[dict[str, Any]]:
        """Run (or finish, after a resume) the loop; returns the evaluation history."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.name, disable=not self.progress, unit="step")
        t0, tok0 = time.perf_counter(), self.tokens
        while self.step < self.cfg.steps:
            loss = self._one_step()
            metrics = {"loss": loss, "lr": self.opt.last_lr, **self._maybe_eval()}
            rate = (self.tokens - tok0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save()
            if self.on_step is not None:
                self.on_step(self.step, self.tokens, metrics)
            faults.kill_point(f"{self.name}-step")
        bar.close()
        self._maybe_eval(force=True)
        self.save()
        return self.history


def param_groups(named: Iterable[tuple[str, nn.Parameter]], is_attention: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Split parameters into [attention, other] groups (empty groups dropped later by the caller)."""
    attn, other = [], []
    for n, p in named:
        if p.requires_grad:
            (attn if is_attention(n) else other).append(p)
    return [{"params": attn, "name": "attention"}, {"params": other, "name": "other"}]
