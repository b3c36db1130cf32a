"""Several processes on torch.distributed: the process group, data parallel (DDP) and FSDP2 wrapping.

One process per GPU (or several CPU processes on gloo), started by ``torchrun`` or by
``hybridize run --nproc N``, which re-launches itself through ``torch.distributed.run``
(:mod:`hybridize.training.launcher`)::

    torchrun --nproc_per_node 2 -m hybridize run CONFIG --out OUT
    hybridize run CONFIG --out OUT --nproc 2               # the same

- **Selection**: probe ``i`` of the selector's plan runs on rank ``i mod N``. Every rank draws the
  same batches a single process would (the data order depends only on the seed) and runs the
  teacher once per batch for its own probes (lockstep within the rank). After every evaluation
  window the scores are all-gathered, so every rank records the same trajectory and asks the stop
  criterion the same question. A probe's training does not depend on which rank runs it, so 1 and
  N processes give the same selection (tests/unit/test_distributed.py).
- **Stages 1, 2, 3**: data parallel. Each optimizer step's global batch (``distill.batch_size``
  blocks) is split over the ranks and the gradients are averaged by DDP; the result equals one
  process with the same global batch up to the order of float reductions. With
  ``distill.parallel: fsdp`` (or ``auto`` when a replica would not fit the GPU) stages 2 and 3
  shard the student's and the teacher's decoder layers with FSDP2 (``fully_shard``); stage 1 trains
  only attention parameters and stays DDP.
- **Outputs and checkpoints**: rank 0 alone writes outputs (result.json, plots, the hybrid) and the
  stage checkpoints (identical on every rank, :mod:`hybridize.training.checkpoints`); every rank
  checkpoints its own probes (:class:`hybridize.selection.fanout.ProbeCheckpoints`), so a killed run
  resumes per rank, also with another number of ranks.
"""
from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from hybridize.errors import ConfigError, HybridizeError, RemoteError

#: environment variables torchrun sets in every worker
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: seconds a collective may wait for a slow rank (HYBRIDIZE_DIST_TIMEOUT overrides)
DEFAULT_TIMEOUT_S = 3600


@attrs.frozen
class Dist:
    """This process's place in the job: rank, number of ranks, device and backend.

    ``Dist()`` is a single process; every collective is then a no-op.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def active(self) -> bool:
        """True when there are several ranks."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether probe ``index`` of the plan runs on this rank (round robin)."""
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index]) if self.backend == "nccl" else dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def sum(self, value: int) -> int:
        """The sum of an int over the ranks."""
        return int(round(self.mean(float(value)) * self.world)) if self.active else value

    @torch.no_grad()
    def broadcast_module_(self, module: nn.Module, src: int = 0) -> nn.Module:
        """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place."""
        if self.active:
            import torch.distributed as dist

            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src)
        return module

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and give its result to every rank.

        If it raises, rank 0 re-raises the error and the other ranks raise :class:`RemoteError`
        (which the CLI does not print again), so no rank waits on a collective that never comes.
        """
        if not self.active:
            return fn()
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
                error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise RemoteError(f"rank 0 failed: {outcome[1]}")
        return outcome[1]

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 runs ``fn`` first (e.g. to fill a download or data cache), then the other ranks run it.

        If it fails on rank 0, the other ranks raise :class:`RemoteError` instead of running it.
        """
        if not self.active:
            return fn()
        if self.is_main:
            try:
                out = fn()
            except BaseException as exc:  # noqa: BLE001 - the other ranks must learn of every failure
                self.broadcast(("error", f"{type(exc).__name__}: {exc}"))
                raise
            self.broadcast(("ok", None))
            return out
        status = self.broadcast(None)
        if status[0] == "error":
            raise RemoteError(f"rank 0 failed: {status[1]}")
        return fn()


SINGLE = Dist()
_joined_here: list[bool] = []  # setup() initialised the process group (so teardown() destroys it)


# -- process group -------------------------------------------------------------------------------------
def launched() -> bool:
    """True in a worker that torchrun started with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _device_for(name: str, local_rank: int, world: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"run field 'device' must be auto, cpu or cuda with {world} processes (each rank takes the GPU of its "
            f"LOCAL_RANK); got {name!r}"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run field 'device' is 'cuda' but CUDA is not available; use device: cpu (gloo) or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise HybridizeError(
            f"rank with LOCAL_RANK={local_rank} has no GPU: this machine shows {count} CUDA device(s); start at most "
            f"{count} processes per node (--nproc / --nproc_per_node), or use device: cpu"
        )
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> Dist:
    """The :class:`Dist` of this process; joins the process group when torchrun started several.

    Args:
        device: the run's ``device`` field: ``auto`` (each rank's GPU, else CPU), ``cuda`` or ``cpu``.

    Returns:
        ``Dist()`` with the resolved device in a single process; otherwise the rank's place, its
        device (``cuda:LOCAL_RANK`` on NCCL, the CPU on gloo) and the joined process group.
    """
    if not launched():
        from hybridize.training.devices import resolve_device

        return Dist(device=resolve_device(device))
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ENV_KEYS)
    dev = _device_for(device, local, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=int(os.environ.get("HYBRIDIZE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kw)
        _joined_here.append(True)
    return Dist(rank=rank, world=world, local_rank=local, device=dev, backend=backend)


def teardown(par: Dist) -> None:
    """Leave the process group (a no-op for a single process)."""
    if par.active:
        import torch.distributed as dist

        if dist.is_initialized() and _joined_here:
            dist.destroy_process_group()
            _joined_here.clear()


# -- data parallel and FSDP2 -------------------------------------------------------------------------------------
class CallRoot(nn.Module):
    """A root module whose forward runs a callable, so DDP's and FSDP's forward hooks wrap it.

    The distillation losses call pieces of the student (``student.model``, ``student.lm_head``)
    rather than its ``forward``; running them inside this module's forward gives DDP its reducer
    set-up and FSDP the gathering of the root's parameters (embeddings, final norm, lm_head).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def ddp_root(model: nn.Module, par: Dist) -> nn.Module:
    """``DistributedDataParallel`` over ``model``'s trainable parameters (parameters start equal: DDP broadcasts rank 0's)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [par.device.index] if par.device.type == "cuda" else None
    return DistributedDataParallel(CallRoot(model), device_ids=ids)


def shard_batch(idx: torch.Tensor, par: Dist) -> torch.Tensor:
    """This rank's contiguous share of a global batch of block indices."""
    return idx.tensor_split(par.world)[par.rank] if par.active else idx


def check_batch(batch_size: int, micro: int, par: Dist, what: str = "distill") -> int:
    """Blocks per forward on each rank; the global batch must split evenly.

    Raises:
        ConfigError: naming the field and the numbers.
    """
    if not par.active:
        return micro
    if batch_size % par.world:
        raise ConfigError(
            f"{what} field 'batch_size' must be divisible by the number of processes ({par.world}); got {batch_size}"
        )
    local = batch_size // par.world
    per = min(micro, local)
    if local % per:
        raise ConfigError(
            f"{what} field 'micro_batch_size' must divide batch_size / processes = {batch_size} / {par.world} = {local}; "
            f"got {micro}"
        )
    return per


def replica_bytes(student: nn.Module, teacher: nn.Module) -> int:
    """Bytes one data-parallel replica of stage 2 holds: teacher weights, student weights, grads and 2 AdamW states."""
    s = sum(p.numel() * p.element_size() for p in student.parameters())
    t = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return t + 4 * s


def choose_parallel(setting: str, student: nn.Module, teacher: nn.Module, par: Dist) -> str:
    """``ddp`` or ``fsdp`` for stages 2-3: the setting, or with ``auto`` FSDP when a replica needs > 70% of the GPU."""
    if not par.active:
        return "none"
    if setting != "auto":
        return setting
    if par.device.type != "cuda":
        return "ddp"
    total = torch.cuda.get_device_properties(par.device).total_memory
    return "fsdp" if replica_bytes(student, teacher) > 0.7 * total else "ddp"


@attrs.define
class FSDPShards:
    """Sharded copies (FSDP2 ``fully_shard``) of a student and its teacher for stages 2 and 3.

    The originals move to the CPU and are left untouched; :meth:`finish` gathers the trained
    weights into the original student (on every rank) and moves the teacher back.
    """

    student: nn.Module
    teacher: nn.Module
    root: nn.Module | None
    sharded_student: nn.Module | None
    sharded_teacher: nn.Module | None

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, par: Dist) -> FSDPShards:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from hybridize.model.teacher import decoder_layers

        mesh = init_device_mesh(par.device.type, (par.world,))
        student.cpu(), teacher.cpu()
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        for layer in decoder_layers(t):
            fully_shard(layer, mesh=mesh)
        fully_shard(t.model, mesh=mesh)  # embeddings and final norm; the frozen lm_head stays whole
        t.lm_head.to(par.device)
        for layer in decoder_layers(s):
            fully_shard(layer, mesh=mesh)
        root = fully_shard(CallRoot(s), mesh=mesh)  # embeddings, final norm, lm_head: gathered in the root's forward
        return cls(student, teacher, root, s, t)

    def finish(self, par: Dist) -> nn.Module:
        """The trained weights into the original student on every rank's device; the teacher back on the device too."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.sharded_student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.root = self.sharded_student = self.sharded_teacher = None  # free the shards before the originals return
        self.student.to(par.device)
        if par.is_main:  # with cpu_offload only rank 0 receives the whole tensors
            self.student.load_state_dict(full)
        par.broadcast_module_(self.student)
        self.teacher.to(par.device)
        return self.student
