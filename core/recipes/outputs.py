"""Run outputs: the metrics log, the run manifest, plots (files are written by :mod:`hybridize.atomic_io`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridize.atomic_io import replace_dir, write_json, write_json_text  # noqa: F401 - re-exported; their home is atomic_io
from hybridize.atomic_io import save_figure as _save_figure
from hybridize.errors import HybridizeError
from hybridize.recipes.rundir import check_out_dir, prepare_out_dir  # noqa: F401 - their home until issue 17; import from rundir


class MetricsLog:
    """``OUT/metrics.jsonl``: one JSON line per optimizer step and per selection window, written as it happens.

    For watching a long run (``tail -f``) and plotting it mid-way; ``result.json`` is only written at the
    end. Lines are flushed at once; the file is created on the first line, so a run that fails before
    training leaves none. A resumed run appends after a ``{"event": "resume"}`` line: the steps between
    the last checkpoint and the interruption then appear twice, the later lines being the ones that count.
    Every line has ``wall`` (seconds since this process opened the log) and ``stage``.
    """

    NAME = "metrics.jsonl"

    def __init__(self, out: Path, *, resume: bool) -> None:
        import time

        self.path = Path(out) / self.NAME
        self._resume = resume and self.path.is_file()
        self._t0 = time.perf_counter()
        self._file: Any = None

    def write(self, record: dict[str, Any]) -> None:
        import time

        if self._file is None:
            self._file = open(self.path, "a")
            if self._resume:
                self._file.write(json.dumps({"event": "resume", "wall": 0.0}) + "\n")
                self._resume = False
        line = {"wall": round(time.perf_counter() - self._t0, 3), **record}
        self._file.write(json.dumps(line, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


from hybridize.recipes.resume import RUN_CONFIG, check_resume_config  # noqa: E402,F401 - re-exported


def finish_run_dir(out: Path) -> Path:
    """Write ``OUT/hybridize-manifest.json`` (every output except checkpoints), last of all."""
    from hybridize.atomic_io import write_manifest

    return write_manifest(out, exclude=("checkpoints",))


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
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(selection: dict[str, Any], path: Path, title: str, raw_label: str) -> Path:
    """Left: the final raw score per layer, selected (softmax) layers highlighted; right: trajectories."""
    plt = _plt()
    raw = {int(k): v for k, v in selection["raw_scores"].items()} or {int(k): v for k, v in selection["scores"].items()}
    layers = sorted(raw)
    chosen = set(selection["softmax_layers"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, gridspec_kw={"width_ratios": [1.2, 1]})
    colors = ["tab:red" if l in chosen else "tab:blue" for l in layers]
    ax.bar(layers, [raw[l] for l in layers], color=colors)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(raw_label)
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:red", label=f"kept softmax (top {len(chosen)}: {sorted(chosen)})"),
               Patch(color="tab:blue", label="linear attention")]
    ax.legend(handles=handles, fontsize=8, ncol=2, loc="upper left")
    top = max(raw.values(), default=0.0)
    if top > 0:  # head-room so the legend sits above the bars
        ax.set_ylim(top=top * 1.22)
    imp = {int(k): v for k, v in selection["scores"].items()}
    if selection["raw_scores"] and len(layers) > 1:
        lo, hi = min(layers, key=raw.get), max(layers, key=raw.get)
        direction = "lower" if imp[lo] > imp[hi] else "higher"
        ax.set_title(f"final scores ({direction} = more important)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    traj = [w for w in selection["trajectory"] if w["raw"]]
    if len(traj) > 1:
        xs = [w["tokens_per_probe"] for w in traj]
        ends = {}
        for l in layers:
            ys = [w["raw"][str(l)] if str(l) in w["raw"] else w["raw"].get(l) for w in traj]
            ax2.plot(xs, ys, color="tab:red" if l in chosen else "tab:blue", alpha=0.9 if l in chosen else 0.5, lw=1.2)
            if ys[-1] is not None:
                ends[l] = ys[-1]
        _label_line_ends(ax2, xs[-1], ends, chosen)
        if selection.get("stop_step") is not None:
            ax2.axvline(xs[-1], color="black", ls="--", lw=0.8, label="stopped")
            ax2.legend(fontsize=8)
        ax2.set_xlabel("probe tokens (each probe)")
        ax2.set_ylabel(raw_label)
        ax2.set_title("score per layer at each evaluation window", fontsize=9)
        ax2.grid(alpha=0.3)
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, "single evaluation (no trajectory)", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _label_line_ends(ax: Any, x: float, ends: dict[int, float], chosen: set[int]) -> None:
    """Name each line at its right end, pushing labels apart so near-equal ends stay readable."""
    if not ends:
        return
    lo, hi = ax.get_ylim()
    gap = 0.045 * (hi - lo)
    placed: list[tuple[int, float]] = []
    for layer, y in sorted(ends.items(), key=lambda kv: kv[1]):
        y_text = max(y, placed[-1][1] + gap) if placed else y
        placed.append((layer, y_text))
    shift = max(0.0, placed[-1][1] - hi + gap / 2)  # keep the stack inside the axes
    x0, x1 = ax.get_xlim()
    for layer, y_text in placed:
        ax.annotate(f"L{layer}", xy=(x, ends[layer]), xytext=(x + 0.02 * (x1 - x0), y_text - shift), fontsize=7,
                    va="center", color="tab:red" if layer in chosen else "tab:blue",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
    ax.set_xlim(x0, x1 + 0.09 * (x1 - x0))


def plot_jaccard(selection: dict[str, Any], path: Path, title: str, windows: int = 10, threshold: float | None = 0.9) -> Path:
    """Top-K Jaccard between consecutive windows and over the trailing ``windows`` windows."""
    from hybridize.selection.contract import mean_pairwise_jaccard

    plt = _plt()
    traj = selection["trajectory"]
    xs = [w["tokens_per_probe"] for w in traj]
    consecutive = [w["jaccard_prev"] if w["jaccard_prev"] is not None else float("nan") for w in traj]
    rolling = [mean_pairwise_jaccard([t["top_k"] for t in traj[max(0, i - windows + 1) : i + 1]]) if i + 1 >= windows else float("nan")
               for i in range(len(traj))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(xs, consecutive, marker="o", ms=3, label="Jaccard with the previous window's top-K")
    ax.plot(xs, rolling, marker="s", ms=3, label=f"mean pairwise Jaccard, last {windows} windows")
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls=":", label=f"stop threshold {threshold}")
    if selection.get("stop_step") is not None and xs:
        ax.axvline(xs[-1], color="black", ls="--", lw=0.8, label="stopped")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("probe tokens (each probe)")
    ax.set_ylabel("Jaccard similarity of top-K layer sets")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
