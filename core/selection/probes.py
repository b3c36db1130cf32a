"""Probes: one student per candidate layer set, seeded from the shared stage 1, trained window by window.

A :class:`ProbeRun` is one probe student with its own :class:`~hybridize.training.loop.Optimization`
(the one optimizer, schedule, clipping and NaN guard of every training run). The selection engine
steps every probe of a group in lockstep over a window of batches whose teacher hidden states it
computed once (:func:`train_window`); between windows a group may be moved off the device
(:meth:`ProbeRun.to`). What a probe checkpoints is its own business (:meth:`ProbeRun.state_dict`),
so its state can be made smaller without touching the engine. A probe whose loss or score turns
NaN / inf is retried once from its last checkpoint at a lower lr, then failed (:class:`DivergenceGuard`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from hybridize import faults
from hybridize.errors import HybridizeError
from hybridize.distill.stages import DistillConfig, linear_modules
from hybridize.selection.components import PROBE_TRAINABLE
from hybridize.selection.contract import Probe
from hybridize.training.loop import LoopConfig, Optimization, autocast_for, move_tensor, param_groups
from hybridize.training.losses import chunked_kl




def trains(policy: str, layer: int) -> Callable[[str], bool]:
    """Whether a probe of ``layer`` under ``policy`` trains the parameter of this name (names as in
    ``student.named_parameters()``, e.g. ``model.layers.3.self_attn.q_proj.weight``)."""
    if policy == "all":
        return lambda name: True
    if policy == "mixers":
        return lambda name: name.startswith("model.layers.") and ".self_attn." in name
    if policy == "probed":
        prefix = f"model.layers.{layer}.self_attn."
        return lambda name: name.startswith(prefix)
    raise ValueError(f"probe_trainable must be one of {', '.join(PROBE_TRAINABLE)}; got {policy!r}")


def _master(p: torch.Tensor, fp32: bool) -> torch.Tensor:
    t = p.detach()
    return t.float() if fp32 and t.is_floating_point() and t.element_size() < 4 else t.clone()


def own_parameters(model: nn.Module, keep: Callable[[str], bool], *, fp32_master: bool = False) -> list[str]:
    """Give ``model`` its own trainable copy of each parameter ``keep`` selects; the rest stay shared and frozen.

    With ``fp32_master`` (under autocast, on CUDA) an owned copy is float32 when the original is 16-bit (a master copy: at the probes' learning rates an
    AdamW step on a bf16 weight rounds away, 7e-6 on 0.02 is below half its spacing); compute stays in the
    autocast dtype. Tied parameters stay tied (one new tensor set in every slot of the original). A shared parameter that
    requires grad (a teacher that is not frozen) is replaced by a frozen alias of the same storage, so no
    gradient ever reaches the teacher or the shared stage 1. Returns the owned names, as in
    ``model.named_parameters()``.
    """
    first = {id(p): (n, p) for n, p in model.named_parameters()}  # one (first) name per tensor, ties included
    new = {pid: nn.Parameter(_master(p, fp32_master), requires_grad=True) if keep(n) else nn.Parameter(p.detach(), requires_grad=False)
           for pid, (n, p) in first.items() if keep(n) or p.requires_grad}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) in new:
                module._parameters[key] = new[id(p)]
    return [n for n, p in model.named_parameters() if p.requires_grad]


class ProbeDivergedWarning(UserWarning):
    """A probe's loss or score became NaN / inf (it is retried once, then left out of the ranking)."""


@attrs.define
class ProbeRun:
    """One probe student with its optimization (optimizer, schedule, clipping, NaN watch).

    ``owned`` names the parameters the probe trains (its own tensors); every other tensor of ``model`` is the
    teacher's or the shared stage 1's, by reference. Moving, checkpointing and loading touch the owned ones only.
    """

    probe: Probe
    model: nn.Module
    opt: Optimization
    owned: list[str] = attrs.field(factory=list)
    parked: Any = None  # the file holding the owned state while the probe waits on disk

    @property
    def layer(self) -> int:
        return self.probe.layer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.opt.optimizer

    @property
    def scheduler(self) -> Any:
        return self.opt.scheduler

    def owned_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.owned}

    def to(self, device: torch.device) -> None:
        """Move what the probe owns (its parameters and optimizer state) to ``device``; shared tensors stay.

        Off a CUDA device the tensors go to pinned host memory, so the next move back is asynchronous.
        """
        device = torch.device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        for p in self.owned_params().values():
            p.data = move_tensor(p.data, device, pin=pin)
        self.opt.to(device, pin=pin)

    def park(self, path: Any) -> None:
        """Write what the probe owns to ``path`` and free it (the disk tier, when host memory is short).

        A scratch file, not a checkpoint: ``--resume`` starts from the window checkpoints and ignores it.
        """
        torch.save(self.state_dict(), path)
        for p in self.owned_params().values():
            p.data = torch.empty(0, dtype=p.dtype)
        self.optimizer.state.clear()
        self.parked = path

    def unpark(self, device: torch.device) -> None:
        """Read the owned state back from its parking file onto ``device``."""
        saved = torch.load(self.parked, map_location="cpu", weights_only=True)
        for n, p in self.owned_params().items():
            p.data = saved["model"][n].to(device)
        self.opt.load_state_dict(saved)
        self.opt.to(device)
        self.parked = None

    def state_dict(self) -> dict[str, Any]:
        """What a window checkpoint holds of this probe: its owned tensors (on CPU), optimizer and schedule."""
        if self.parked is not None:
            return torch.load(self.parked, map_location="cpu", weights_only=True)
        return {"model": {n: p.detach().cpu() for n, p in self.owned_params().items()}, **self.opt.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        owned = self.owned_params()
        if set(saved["model"]) != set(owned):
            raise HybridizeError(
                f"the checkpoint of the probe of layer {self.layer} holds {len(saved['model'])} tensors, this run's probe "
                f"trains {len(owned)}: selection.probe_trainable differs from the run that wrote it; resume with the "
                "same selection.probe_trainable, or start again with --overwrite")
        if self.parked is not None:  # waiting on disk: the loaded state waits there instead
            torch.save({**saved, "model": {n: t.cpu() for n, t in saved["model"].items()}}, self.parked)
            return
        with torch.no_grad():
            for n, t in saved["model"].items():
                owned[n].copy_(t)
        self.opt.load_state_dict(saved)

    def train_step(self, ids_parts: list[torch.Tensor], h_parts: list[torch.Tensor], teacher: nn.Module,
                   distill: DistillConfig, device: torch.device) -> None:
        """One optimizer step on one batch (its micro-batches) against the teacher's hidden states."""
        for ids, h_t in zip(ids_parts, h_parts):
            with autocast_for(device):
                h_s = self.model.model(input_ids=ids.to(device), use_cache=False).last_hidden_state
                loss = chunked_kl(h_s, h_t.to(device), self.model.lm_head, teacher.lm_head,
                                  temperature=distill.temperature, chunk_tokens=distill.kl_chunk_tokens)
            if faults.fires("probe-nan", self.layer):
                loss = loss * float("nan")
            self.opt.watch(loss)  # no host sync per step
            (loss / len(ids_parts)).backward()
        self.opt.step()


def train_window(group: list[ProbeRun], batches: list[list[torch.Tensor]], teacher_h: list[list[torch.Tensor]],
                 teacher: nn.Module, distill: DistillConfig, device: torch.device) -> dict[int, bool]:
    """The window's optimizer steps for one group of probes in lockstep, on the shared teacher hidden states.

    Returns:
        layer -> whether every training loss of that probe in this window was finite.
    """
    for run in group:
        run.opt.take_finite()  # a fresh watch for this window
    for ids_parts, h_parts in zip(batches, teacher_h):
        for run in group:
            run.train_step(ids_parts, h_parts, teacher, distill, device)
            faults.kill_point("probe-step")
    return {run.layer: run.opt.take_finite() for run in group}


@attrs.define
class ProbeBuilder:
    """Builds probe students from the teacher and the shared stage-1 modules, with their optimization.

    A probe is assembled around the teacher's and the stage-1 modules' tensors by reference
    (:func:`hybridize.model.surgery.assemble_student`) and owns a copy of only what it trains
    (``trainable``, one of :data:`PROBE_TRAINABLE`): building one costs its owned tensors, not a student.
    """

    teacher: nn.Module
    stage1_modules: dict[int, nn.Module]
    variant: Any  # ComponentRef of the probes' linear attention
    pm: Any
    distill: DistillConfig
    lr_attn: float
    lr_other: float
    device: torch.device
    trainable: str = "all"

    def model(self, probe: Probe) -> tuple[nn.Module, list[str]]:
        """The probe's student and the names of the parameters it owns (and trains)."""
        from hybridize.model.surgery import assemble_student

        for module in self.stage1_modules.values():
            module.requires_grad_(False)  # shared by every probe: never trained through one
        model = assemble_student(self.teacher, list(probe.softmax_layers), self.stage1_modules, self.variant.name,
                                 self.variant.params, pm=self.pm)
        owned = own_parameters(model, trains(self.trainable, probe.layer), fp32_master=self.device.type == "cuda")
        return model.train(), owned

    def loop_config(self, steps: int, groups: list[dict[str, Any]]) -> LoopConfig:
        """The stage-2 settings of ``distill`` for a probe of ``steps`` steps (one lr per group)."""
        d = self.distill
        lrs = [self.lr_attn if g["name"] == "attention" else self.lr_other for g in groups]
        return LoopConfig(steps=steps, batch_size=d.batch_size, micro_batch_size=d.micro_batch_size or d.batch_size, lr=lrs,
                          betas=tuple(d.betas), weight_decay=d.weight_decay, grad_clip=d.grad_clip,
                          warmup_steps=round(d.warmup_fraction * steps), min_lr_ratio=d.min_lr_ratio)

    def build(self, probe: Probe, steps: int) -> ProbeRun:
        model, owned = self.model(probe)
        groups = [g for g in param_groups(model.named_parameters(), lambda n: ".self_attn." in n) if g["params"]]
        params = [p for g in groups for p in g["params"]]
        opt = Optimization(groups, self.loop_config(steps, groups), self.device, clip_params=params)
        return ProbeRun(probe, model, opt, owned)


@attrs.define
class DivergenceGuard:
    """The NaN / inf guard of a selection: retry a diverged probe once at a lower lr, then fail it.

    Args:
        lr_scale: the retry's lr factor.
        train: trains a group for a window (``(group, batches, hidden) -> layer -> finite``).
        score: scores a group (``group -> layer -> raw score``).
        restore: puts a probe back to its last checkpoint; returns that checkpoint's step.
        status: layer -> its retried / failed record.
    """

    lr_scale: float
    train: Callable[[list[ProbeRun], list, list], dict[int, bool]]
    score: Callable[[list[ProbeRun]], dict[int, float]]
    restore: Callable[[ProbeRun], int]
    status: dict[int, dict[str, Any]] = attrs.field(factory=dict)

    def failed(self) -> set[int]:
        return {l for l, rec in self.status.items() if rec["status"] == "failed"}

    @staticmethod
    def divergence(run: ProbeRun, finite: dict[int, bool], raw: dict[int, float]) -> str | None:
        layer = run.layer
        if not finite.get(layer, True):
            return "non-finite training loss"
        if not math.isfinite(raw.get(layer, 0.0)):
            return f"non-finite score {raw[layer]}"
        return None

    def scores(self, group: list[ProbeRun], step: int, batches: list, hidden: list) -> dict[int, float]:
        """Train one group for the window, score it, retry or fail the probes that diverged."""
        active = [r for r in group if r.layer not in self.failed()]
        if not active:
            return {}
        finite = self.train(active, batches, hidden)
        raw = self.score(active)
        for run in active:
            why = self.divergence(run, finite, raw)
            if why is not None:
                raw.pop(run.layer, None)
                raw.update(self.retry(run, why, step, batches, hidden))
        return raw

    def retry(self, run: ProbeRun, why: str, step: int, batches: list, hidden: list) -> dict[int, float]:
        """Retry a diverged probe once from its last checkpoint at a lower lr; mark it failed if that diverges too."""
        layer, scale = run.layer, self.lr_scale
        if self.status.get(layer, {}).get("status") == "retried":
            return self.fail(run, f"{why} again after its retry", step)
        since = self.restore(run)
        run.opt.scale_lrs(scale)
        self.status[layer] = {"status": "retried", "step": step, "reason": why, "lr_scale": scale}
        warnings.warn(f"probe of layer {layer} diverged ({why}) in the window ending at probe step {step}; retrying it "
                      f"once from its checkpoint at step {since} with learning rates x{scale}", ProbeDivergedWarning, stacklevel=2)
        finite = self.train([run], batches, hidden)
        raw = self.score([run])
        again = self.divergence(run, finite, raw)
        return self.fail(run, f"{again} after its retry at lr x{scale}", step) if again else raw

    def fail(self, run: ProbeRun, why: str, step: int) -> dict[int, float]:
        layer = run.layer
        self.status[layer] = {"status": "failed", "step": step, "reason": why, "lr_scale": self.lr_scale}
        warnings.warn(f"probe of layer {layer} failed ({why}) at probe step {step}; layer {layer} is left out of the "
                      "ranking and cannot be selected", ProbeDivergedWarning, stacklevel=2)
        return {}
