"""Several processes on torch.distributed: probes fanned out over ranks, data-parallel distillation.

One process per GPU (or several CPU processes on gloo), started by ``torchrun`` or by
``hybridize run --nproc N``, which re-launches itself through ``torch.distributed.run``::

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
  stage checkpoints (identical on every rank); every rank checkpoints its own probes
  (:class:`ProbeCheckpoints`), so a killed run resumes per rank, also with another number of ranks.
"""
from __future__ import annotations

import copy
import datetime
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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
        from hybridize.recipes.run import resolve_device

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


# -- the launcher behind `hybridize run --nproc N` --------------------------------------------------------
def check_nproc(nproc: int, device: str) -> None:
    """Refuse an --nproc that this machine cannot run, before any process starts.

    Raises:
        ConfigError: ``nproc < 1``, or more processes than GPUs on CUDA.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1; got {nproc}")
    if launched():
        raise ConfigError("--nproc starts torchrun itself; this process already runs under torchrun, so leave --nproc out")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if nproc > 1 and device.startswith("cuda:"):
        raise ConfigError(f"run field 'device' must be auto or cuda with --nproc {nproc} (rank r takes GPU r); got {device!r}")
    if cuda and nproc > 1:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise ConfigError(
                f"--nproc {nproc} needs {nproc} GPUs (one per process) but this machine shows {count}{shown}; "
                f"use --nproc {max(count, 1)} or fewer, or --set device=cpu to run {nproc} CPU processes on gloo"
            )


def torchrun_args(argv: Sequence[str], nproc: int) -> list[str]:
    """torchrun's arguments for ``hybridize ARGV`` on ``nproc`` local processes (``--standalone``: a free port)."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "hybridize", *argv]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``hybridize ARGV`` on ``nproc`` local processes through torchrun (``torch.distributed.run``).

    Returns:
        0, or the exit status of the first process that failed (2 for a hybridize error, whose
        message that process printed); torchrun stops the others.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(get_args_parser().parse_args(torchrun_args(argv, nproc)))
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"hybridize: {len(exc.failures)} of {nproc} processes stopped (exit status {', '.join(map(str, codes))}); "
              "the error is printed above", file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    return 0


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


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


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str]) -> tuple[dict, dict]:
    """Whole tensors of ``names`` and the optimizer state of an FSDP2-sharded model (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    return {n: weights[n] for n in names if n in weights}, optim  # with cpu_offload only rank 0 gets the tensors


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load whole tensors and optimizer state (as :func:`full_state` gives them) into an FSDP2-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))


# -- probe checkpoints, per rank --------------------------------------------------------------------------------
_RANK_DIR = re.compile(r"rank(\d+)-of-(\d+)$")
_STEP_FILE = re.compile(r"probes-(\d+)\.pt$")


@attrs.define
class ProbeCheckpoints:
    """Where a selection's probes are checkpointed.

    One process writes ``DIR/probes.pt`` (every probe). With N ranks, rank r writes its own probes
    to ``DIR/rank{r}-of-{N}/probes-{step}.pt`` at every evaluation window; its older windows are
    deleted only after every rank has written the new one (a barrier), so a kill at any moment
    leaves a step that every rank has. Resume takes the newest step that some layout holds
    completely, so a run may also resume with another number of ranks: each rank reads its probes
    from whichever files hold them.

    Args:
        root: the selection's checkpoint directory.
        par: this process's place in the job.
    """

    root: Path
    par: Dist = SINGLE
    _where: dict[int, Path] = attrs.field(factory=dict)  # layer -> the file with its last checkpoint

    def _own_dir(self) -> Path:
        return self.root / f"rank{self.par.rank}-of-{self.par.world}"

    def path(self, step: int) -> Path:
        return self.root / "probes.pt" if not self.par.active else self._own_dir() / f"probes-{step:08d}.pt"

    def save(self, state: dict[str, Any]) -> Path:
        """Write this rank's probes at ``state["step"]``, then drop what no rank needs any more."""
        from hybridize.training.loop import atomic_torch_save

        path = self.path(state["step"])
        atomic_torch_save(state, path)
        self._where = dict.fromkeys(state["probes"], path)
        self.par.barrier()  # every rank has this step now
        self._prune(path)
        return path

    def _prune(self, keep: Path) -> None:
        from hybridize.atomic_io import forget_checkpoint

        if self.par.active:
            for old in self._own_dir().glob("probes-*.pt"):
                if old != keep:
                    forget_checkpoint(old)
        if not self.par.is_main:
            return
        mine = self._own_dir().name if self.par.active else None
        for d in self.root.glob("rank*-of-*"):
            m = _RANK_DIR.match(d.name)
            if m and d.is_dir() and int(m.group(2)) != self.par.world and d.name != mine:
                shutil.rmtree(d, ignore_errors=True)
        if self.par.active and (self.root / "probes.pt").exists():
            forget_checkpoint(self.root / "probes.pt")

    def _layouts(self, cache: dict[Path, dict[str, Any]]) -> list[tuple[int, int, dict[int, Path]]]:
        """(step, ranks, rank -> file) of every step some layout holds completely (``probes.pt`` is read into ``cache``)."""
        found: dict[tuple[int, int], dict[int, Path]] = {}
        for d in self.root.glob("rank*-of-*"):
            m = _RANK_DIR.match(d.name)
            if not (m and d.is_dir()):
                continue
            r, n = int(m.group(1)), int(m.group(2))
            for f in d.glob("probes-*.pt"):
                s = _STEP_FILE.match(f.name)
                if s:
                    found.setdefault((int(s.group(1)), n), {})[r] = f
        out = [(step, n, files) for (step, n), files in found.items() if len(files) == n and n > 1]
        single = self.root / "probes.pt"
        if single.exists():
            from hybridize.training.loop import load_checkpoint

            cache[single] = load_checkpoint(single)
            out.append((int(cache[single]["step"]), 1, {0: single}))
        return out

    def load(self, plan: Sequence[int]) -> dict[str, Any] | None:
        """The newest complete checkpoint, with ``probes`` holding this rank's layers; None when there is none.

        Args:
            plan: the layers of the selector's probes, in plan order (probe i ran on rank i mod N).
        """
        from hybridize.training.loop import load_checkpoint

        found: dict[Path, dict[str, Any]] = {}
        layouts = self._layouts(found)
        if not layouts:
            return None
        step, n, files = max(layouts, key=lambda x: (x[0], x[1] == self.par.world))
        mine = [l for i, l in enumerate(plan) if self.par.owns(i)]
        source = {l: files[plan.index(l) % n] for l in mine}
        cache = {}
        for path in sorted(set(source.values())) or [files[0]]:
            cache[path] = found[path] if path in found else load_checkpoint(path)
        state = dict(next(iter(cache.values())))
        state["probes"] = {l: cache[source[l]]["probes"][l] for l in mine}
        self._where = source
        return state

    def probe_state(self, layer: int) -> tuple[int, dict[str, Any]]:
        """(step, saved state) of one of this rank's probes at its last checkpoint."""
        from hybridize.training.loop import load_checkpoint

        state = load_checkpoint(self._where.get(layer, self.path(0)))
        return state["step"], state["probes"][layer]


def probes_per_rank(n_probes: int, world: int) -> list[int]:
    """How many of ``n_probes`` probes each rank runs (round robin)."""
    return [len(range(r, n_probes, world)) for r in range(world)]


def gather_window(par: Dist, raw: dict[int, float], status: dict[int, dict], eval_tokens: int,
                  plan: Sequence[int]) -> tuple[dict[int, float], dict[int, dict], int]:
    """Every rank's window: raw scores (in plan order), its probes' status records, its held-out eval tokens (summed)."""
    if not par.active:
        return raw, status, eval_tokens
    merged_raw: dict[int, float] = {}
    merged_status: dict[int, dict] = {}
    parts = par.all_gather((raw, status, eval_tokens))
    for r, s, _ in parts:
        merged_raw.update(r)
        merged_status.update(s)
    return {l: merged_raw[l] for l in plan if l in merged_raw}, merged_status, sum(p[2] for p in parts)
