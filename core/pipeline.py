"""End-to-end drivers behind the CLI: ``distill`` (explicit softmax layers)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hybridize.data import prepare_data
from hybridize.distill import Distiller
from hybridize.errors import ConfigError
from hybridize.outputs import plot_distill_curve, prepare_out_dir, replace_dir, write_json
from hybridize.runconfig import RunConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _observe(pm: Any) -> Any:
    def on_step(stage: str, step: int, tokens: int, metrics: dict[str, float]) -> None:
        pm.hook.hybridize_step_end(stage=stage, step=step, tokens=tokens, metrics=metrics)

    return on_step


def distill(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Surgery at ``cfg.softmax_layers`` (a list), stage 1 -> 2 -> 3, save the hybrid and result.json.

    Returns:
        The content of ``OUT/result.json``.
    """
    from hybridize.modeling import save_hybrid
    from hybridize.plugins_manager import get_plugin_manager
    from hybridize.surgery import build_student
    from hybridize.teacher import load_teacher

    if not isinstance(cfg.softmax_layers, list):
        raise ConfigError(
            f"hybridize distill field 'softmax_layers' must be an explicit list of layer indices; got "
            f"{cfg.softmax_layers!r} (use `hybridize run` to select layers)"
        )
    out = prepare_out_dir(out, resume=resume, overwrite=overwrite)
    pm = get_plugin_manager()
    pm.hook.hybridize_run_start(run_dir=str(out), config=cfg.to_dict())
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, device=device)
    data = prepare_data(cfg.data, teacher.tokenizer, seed=cfg.seed)
    student = build_student(teacher.model, cfg.softmax_layers, cfg.linear_attention.name, cfg.linear_attention.params, pm=pm)
    distiller = Distiller(teacher=teacher.model, data=data, cfg=cfg.distill, device=device, ckpt_dir=out / "checkpoints",
                          seed=cfg.seed, progress=progress, on_step=_observe(pm))
    report = distiller.run(student)
    tmp = out / ".model.tmp"
    save_hybrid(student.cpu(), tmp, teacher.tokenizer)
    replace_dir(tmp, out / "model")
    result = {
        "softmax_layers": sorted(cfg.softmax_layers),
        "linear_attention": cfg.linear_attention.name,
        "tokens": report["tokens"],
        "metrics": report["metrics"],
        "history": report["history"],
        "data": {"documents": data.n_documents, "tokens": data.n_tokens, "train_blocks": data.train.shape[0],
                 "heldout_blocks": data.heldout.shape[0], "seq_len": data.seq_len},
        "config": cfg.to_dict(),
        "plugins": pm.versions(),
        "device": str(device),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "result.json", result)
    plot_distill_curve(report["history"], report["metrics"].get("heldout_kl_after_surgery"), out / "distill.png",
                       f"{Path(cfg.teacher).name}: {cfg.linear_attention.name}, softmax layers {sorted(cfg.softmax_layers)}")
    pm.hook.hybridize_run_end(run_dir=str(out), result=result)
    return result
