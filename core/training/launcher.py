"""The launcher behind ``hybridize run --nproc N``: the same command on N local processes through torchrun."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from hybridize.errors import ConfigError
from hybridize.training.parallel import launched


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
