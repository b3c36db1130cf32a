"""Run directories: refuse to clobber, write files atomically, plot curves."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hybridize.errors import HybridizeError


def prepare_out_dir(out: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the output directory; an existing non-empty one needs ``resume`` or ``overwrite``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise HybridizeError(
                f"output directory {str(out)!r} already exists and is not empty; pass --resume to continue "
                "that run or --overwrite to start again"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary directory into place (the old one, if any, goes first)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def plot_distill_curve(history: dict[str, list[dict]], after_surgery: float | None, path: Path, title: str) -> Path:
    """Held-out KL against tokens through the stages; stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    offset = 0
    if after_surgery is not None:
        ax.scatter([0], [after_surgery], color="black", zorder=3, label="after surgery")
    for stage, color in (("stage1", "tab:orange"), ("stage2", "tab:blue"), ("stage3", "tab:green")):
        rows = history.get(stage) or []
        if not rows:
            continue
        xs = [offset + r["tokens"] for r in rows]
        ax.plot(xs, [r["heldout_kl"] for r in rows], marker="o", ms=3, color=color, label=stage)
        ax.axvline(offset, color="grey", lw=0.5, ls=":")
        offset = xs[-1]
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (cumulative over stages)")
    ax.set_ylabel("held-out KL(teacher || student) [nats/token]")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
