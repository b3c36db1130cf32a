"""Scale rehearsal: the paper's recipe (GA-S2) at a real teacher shape, measured, and extrapolated to the full budgets.

One command per configuration. It (1) saves a random-weight teacher of ``--shape`` (bench/rehearsal_model.py:
qwen2.5-3b, llama-3.2-3b, qwen2.5-1.5b, qwen2.5-7b, tiny; bf16 on CUDA) with stories260K's tokenizer, (2) writes
a run config of the paper's recipe (kl-greedy-add + kl scorer, 25% softmax, GDN, rolling-jaccard, probe lr 1e-4
attention / 7e-6 other, stage 1 at 96 x 512 per step, stage 2 as configs/paper_qwen2.5-3b-instruct.yaml; only
the budgets cut, evaluators: heldout-kl) on tinystories_val.txt, (3) runs ``python -m hybridize run CONFIG --out
OUT [--nproc N]`` as a subprocess, streaming its log, sampling GPU memory (nvidia-smi), host RSS of its process
tree and OUT's disk (bench/rehearsal_monitor.py), (4) measures the independent-probe recipe of the paper's own
scripts at the same shape in a second subprocess: hybridize's Distiller on one student with one softmax layer,
a few stage-1 steps and a few stage-2 steps (teacher forward + the whole student trained, AdamW), and (5)
reports per phase tokens/s, MFU, peak GPU / host memory and disk, and the H200-hours of the paper's budgets
(stage 1 100M tokens, n_layers probes x 200M without early stop, final stage 2 600M) for both recipes.

Rates: ``e2e`` = the phase's tokens / wall time as result.json ``phases`` records them (warm-up, evaluations and
checkpoints included); ``steady`` = between the first and the last OUT/metrics.jsonl line of the phase (steps or
selection windows; the first step or window, with kernel autotuning, left out). The extrapolation uses steady
rates (e2e where a phase has too few lines). A probe window here is short (``--probe-steps / --probe-windows``
steps), so the held-out scoring of every probe (``--eval-blocks`` blocks per window) weighs more in the probe rate
than in the paper's 10M-token windows: the probe hours are an upper bound. GPU-hours = hours x GPUs. MFU = model FLOP/s / (989 TFLOP/s x
GPUs), the bf16 dense peak of H100 and H200 SXM; the FLOP model is in bench/rehearsal_model.py: teacher forward
2 N_t, a trained student 6 N_s, a probe 4 N_s + 2 N_train (``selection.probe_trainable``), plus attention terms.

    python bench/scale_rehearsal.py --shape qwen2.5-3b --probe-trainable probed           # one GPU, ~4-6 min
    python bench/scale_rehearsal.py --shape qwen2.5-3b --probe-trainable probed --nproc 2  # two GPUs
    python bench/scale_rehearsal.py --shape tiny --device cpu                              # CPU smoke, < 2 min
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import perf_common as pc
import rehearsal_model as rm
from rehearsal_monitor import Monitor

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
PAPER = {"stage1": 100_000_000, "probe": 200_000_000, "stage2": 600_000_000}
PHASES = ("stage1", "probes", "stage2", "indep")


def _shared(*rel: str) -> str:
    """The first of REPO/../shared, /work/shared, REPO/shared that holds ``rel``."""
    for root in (REPO.parent / "shared", Path("/work/shared"), REPO / "shared"):
        if (root.joinpath(*rel)).exists():
            return str(root.joinpath(*rel))
    return str(REPO.parent / "shared" / Path(*rel))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-3b", choices=sorted(rm.SHAPES))
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) of the run: hybridize run --nproc N")
    ap.add_argument("--phases", default=",".join(PHASES), help="what to run, of stage1,probes,stage2,indep (no probes: "
                    "`hybridize distill` at the uniform 25%% layers)")
    ap.add_argument("--probe-trainable", default=None, help="selection.probe_trainable (all | mixers | probed); unset: "
                    "the run's default")
    ap.add_argument("--probe-group-size", default="auto", help="selection.probe_group_size")
    ap.add_argument("--seq", type=int, default=None, help="data.seq_len of stage 2 and the probes (default 4096; tiny 128)")
    ap.add_argument("--stage1-seq", type=int, default=None, help="distill.stage1_seq_len (default 512; tiny 32)")
    ap.add_argument("--stage1-batch", type=int, default=None, help="distill.stage1_batch_size (default 96; tiny 16)")
    ap.add_argument("--stage1-micro", type=int, default=0, help="distill.stage1_micro_batch_size (0 = auto)")
    ap.add_argument("--batch", type=int, default=2, help="distill.batch_size: blocks per stage-2 / probe step")
    ap.add_argument("--micro", type=int, default=2, help="distill.micro_batch_size (the paper's 2)")
    ap.add_argument("--stage1-steps", type=int, default=20, help="stage-1 optimizer steps of the run")
    ap.add_argument("--probe-steps", type=int, default=4, help="steps per probe")
    ap.add_argument("--probe-windows", type=int, default=2, help="evaluation windows per probe")
    ap.add_argument("--stage2-steps", type=int, default=4, help="stage-2 steps of the final hybrid")
    ap.add_argument("--indep-steps", type=int, default=4, help="stage-1 and stage-2 steps of the independent-probe measurement")
    ap.add_argument("--eval-blocks", type=int, default=2, help="distill.eval_blocks: held-out blocks per evaluation (each "
                    "probe's every window; few, so that scoring weighs about as little as in the paper's long windows)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for the run")
    ap.add_argument("--work", default="/tmp/hybridize-rehearsal", help="teacher and run directories (large)")
    ap.add_argument("--results", default=str(HERE.parent / "results"), help="where JSON, table, config and log go")
    ap.add_argument("--tag", default=None, help="results name suffix (default: GPU name or cpu, and np<N>)")
    ap.add_argument("--data", default=_shared("data", "tinystories_val.txt"))
    ap.add_argument("--tokenizer", default=_shared("teachers", "stories260K"))
    ap.add_argument("--timeout", type=int, default=400, help="seconds the run may take before it is killed (the teacher build "
                    "and the independent-probe measurement come on top: keep the whole under a 10-minute call)")
    ap.add_argument("--worker", choices=["build", "indep", "plan"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.shape == "tiny"
    args.seq = args.seq or (128 if tiny else 4096)
    args.stage1_seq = args.stage1_seq or (32 if tiny else 512)
    args.stage1_batch = args.stage1_batch or (16 if tiny else 96)
    args.phases = [p for p in args.phases.split(",") if p]
    if bad := [p for p in args.phases if p not in PHASES]:
        ap.error(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    if args.probe_steps < args.probe_windows:
        ap.error("--probe-steps must be >= --probe-windows")
    if not Path(args.data).is_file() or not (Path(args.tokenizer) / "tokenizer.json").is_file():
        ap.error(f"--data {args.data!r} (a text file) and --tokenizer {args.tokenizer!r} (a folder with tokenizer.json) must "
                 "exist: by default they are looked for in ../shared, /work/shared and ./shared beside the checkout")
    return args


# -- the run config -----------------------------------------------------------------------------------------------
def run_config(args: argparse.Namespace, teacher: Path, n_layers: int) -> dict[str, Any]:
    """The paper's recipe (configs/paper_qwen2.5-3b-instruct.yaml) with the budgets of ``args``."""
    on = set(args.phases)
    window = args.probe_steps // args.probe_windows
    cfg = {
        "teacher": str(teacher), "device": "cpu" if args.device == "cpu" else "auto", "seed": 0,
        "data": {"train": args.data, "seq_len": args.seq, "heldout_fraction": 0.05},
        "linear_attention": {"name": "gdn"}, "softmax_layers": 0.25,
        "distill": {"stage1_tokens": args.stage1_steps * args.stage1_batch * args.stage1_seq if "stage1" in on else 0,
                    "stage1_seq_len": args.stage1_seq, "stage1_batch_size": args.stage1_batch,
                    "stage1_micro_batch_size": args.stage1_micro, "stage1_lr": 1e-3,
                    "stage2_tokens": args.stage2_steps * args.batch * args.seq if "stage2" in on else 0,
                    "stage2_lr_attn": 1e-4, "stage2_lr_other": 7e-6, "min_lr_ratio": 1.0, "warmup_fraction": 0.01,
                    "batch_size": args.batch, "micro_batch_size": args.micro, "betas": [0.9, 0.95], "grad_clip": 1.0,
                    "checkpoint_every": 0, "eval_blocks": args.eval_blocks,
                    "eval_every": max(args.stage1_steps, args.stage2_steps)},  # held-out KL at the end of a stage only
        "evaluators": [{"name": "heldout-kl"}],
    }
    if "probes" in on:
        cfg["selection"] = {"selector": {"name": "kl-greedy-add"}, "scorer": {"name": "kl"},
                            "stop": {"name": "rolling-jaccard", "windows": 10, "threshold": 0.9},
                            "probe_tokens": args.probe_steps * args.batch * args.seq, "eval_every": window,
                            "probe_lr_attn": 1e-4, "probe_lr_other": 7e-6,
                            "probe_group_size": args.probe_group_size if args.probe_group_size == "auto" else int(args.probe_group_size)}
    else:
        cfg["softmax_layers"] = pc.quarter_softmax(n_layers)
    return cfg


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the lent H200 machines need it)
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.nproc))))
    return env


def worker_cmd(args: argparse.Namespace, kind: str, out: Path) -> list[str]:
    return [sys.executable, str(HERE), *sys.argv[1:], "--worker", kind, "--worker-out", str(out)]


# -- the independent-probe recipe (a worker process) ---------------------------------------------------------------
def independent(args: argparse.Namespace, teacher_dir: Path) -> dict[str, Any]:
    """A few stage-1 and stage-2 steps of one probe of the paper's scripts: its own stage 1, its own teacher
    passes, every parameter trained; steady tokens/s of each (the first step not timed)."""
    import torch

    from hybridize.distill.stages import DistillConfig, Distiller
    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import load_teacher
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.training.data import DataConfig, prepare_data

    device = pc.resolve(args.device)
    teacher = load_teacher(str(teacher_dir), device=device)
    data = prepare_data(DataConfig(train=args.data, seq_len=args.seq, heldout_fraction=0.05), teacher.tokenizer, seed=0)
    layer = teacher.model.config.num_hidden_layers // 2
    torch.manual_seed(0)
    student = build_student(teacher.model, [layer], "gdn", {}, pm=get_plugin_manager()).to(device).train()
    n = max(2, args.indep_steps)
    cfg = DistillConfig(stage1_tokens=n * args.stage1_batch * args.stage1_seq, stage2_tokens=n * args.batch * args.seq,
                        stage1_seq_len=args.stage1_seq, stage1_batch_size=args.stage1_batch, stage1_micro_batch_size=args.stage1_micro,
                        batch_size=args.batch, micro_batch_size=args.micro, stage1_lr=1e-3, stage2_lr_attn=1e-4,
                        stage2_lr_other=7e-6, min_lr_ratio=1.0, eval_blocks=args.eval_blocks, eval_every=10 ** 9, checkpoint_every=0)
    stamps: dict[str, list[tuple[float, int]]] = {"stage1": [], "stage2": []}

    def on_step(stage: str, step: int, tokens: int, metrics: dict[str, float]) -> None:
        pc.sync(device)
        stamps[stage].append((time.perf_counter(), tokens))

    d = Distiller(teacher=teacher.model, data=data, cfg=cfg, device=device, progress=False, on_step=on_step)
    pc.reset_peak(device)
    d.evaluator.prepare()
    d.stage1(student)
    d.stage2(student)
    out = {"layer": layer, "peak_gpu_gib_allocated": pc.peak_gib(device), "environment": pc.environment(device)}
    for stage, marks in stamps.items():
        out[stage] = {"steady_tokens_per_s": median_rate(marks), "steps": len(marks), **d.phases[stage]}
    return out


# -- the memory plan (a worker process: its CUDA context is gone before the run starts) ----------------------------
def plan_of(args: argparse.Namespace, cfg_path: Path) -> dict[str, Any]:
    """What ``hybridize run --dry-run`` would plan for the run: bytes per device (selection, final stage 2), host,
    disk, the group size and where waiting probes go (hybridize.recipes.plan at the run's overrides)."""
    from hybridize.recipes.plan import plan_run
    from hybridize.recipes.runconfig import load_run_config
    from hybridize.registry.manager import get_plugin_manager

    pm = get_plugin_manager()
    cfg = load_run_config(cfg_path, overrides(args, "probes" in args.phases), pm=pm)
    plan = plan_run(cfg, pm, nproc=args.nproc, device=pc.resolve(args.device), check=False)
    return {"memory_gib": {k: v / 2 ** 30 for k, v in plan.memory.items()},
            "available_gib": {k: None if v is None else v / 2 ** 30 for k, v in plan.available.items()},
            "group_size": plan.group_size, "probes_per_rank": plan.probes_per_rank, "offload": plan.offload,
            "probe_trainable": plan.probe_trainable, "probe_params": plan.probe_params}


def plan_vs_measured(plan: dict[str, Any] | None, peaks: dict[str, Any]) -> list[dict[str, Any]]:
    """The planner's GPU estimate per phase next to the measured peak (nvidia-smi, the busiest GPU, less the
    memory in use before the run): ratio = estimate / measured, the target is within 20%."""
    if not plan:
        return []
    m = plan["memory_gib"]
    rows = []
    for phase, key in (("stage1", "selection_total"), ("probes", "selection_total"), ("stage2", "stage2")):
        got = peaks.get(phase, {}).get("gpu_gib")
        if got and m.get(key):
            rows.append({"phase": phase, "plan_key": key, "plan_gib": m[key], "measured_gib": got, "ratio": m[key] / got})
    return rows


# -- reading what the run wrote ------------------------------------------------------------------------------------
def median_rate(marks: list[tuple[float, int]]) -> float | None:
    """Tokens/s of the median interval between consecutive (time, tokens) marks: the first step (before the first
    mark) and outliers (a one-time compilation, a periodic evaluation) left out. None with fewer than 2 marks."""
    rates = [(k1 - k0) / (t1 - t0) for (t0, k0), (t1, k1) in zip(marks, marks[1:]) if t1 > t0 and k1 > k0]
    return pc.median(rates) if rates else None


def steady_rates(out: Path, n_probes: int) -> dict[str, float]:
    """Median tokens/s between consecutive metrics.jsonl lines of each phase (probes: windows, every probe's tokens)."""
    path = out / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    rates = {}
    for stage, phase, scale in (("stage1", "stage1", 1), ("selection", "probes", n_probes), ("stage2", "stage2", 1)):
        rate = median_rate([(x["wall"], x["tokens"]) for x in lines if x.get("stage") == stage and "tokens" in x])
        if rate is not None:
            rates[phase] = scale * rate
    return rates


def phase_rows(args: argparse.Namespace, result: dict[str, Any], steady: dict[str, float], peaks: dict[str, Any],
               fm: rm.FlopModel, gpus: int, peak_flops: float | None) -> list[dict[str, Any]]:
    """One row per phase of the run: tokens, seconds, rates, MFU, memory."""
    tok = result["tokens"]
    trainable = args.probe_trainable or "all"
    probe_teacher = max(0, tok["selection_teacher_forward_tokens"] - tok["stage1_selection"])
    per_token = {"stage1": fm.stage1(args.stage1_seq),
                 "probes": fm.probe(args.seq, trainable) + fm.teacher_fwd(args.seq) * probe_teacher / max(1, tok["probes"]),
                 "stage2": fm.stage2(args.seq, result["softmax_layers"])}
    rows = []
    for phase, rec in result.get("phases", {}).items():
        name = "stage1" if phase == "final_stage1" else phase
        if name not in per_token or not rec["tokens"]:
            continue
        e2e = rec["tokens"] / rec["seconds"]
        rate = steady.get(name, e2e)
        mem = peaks.get(name, {})
        rows.append({"phase": phase, "tokens": rec["tokens"], "seconds": rec["seconds"], "e2e_tok_s": e2e,
                     "steady_tok_s": steady.get(name), "tflop_per_token": per_token[name] / 1e12,
                     "mfu": rate * per_token[name] / (peak_flops * gpus) if peak_flops else None,
                     "peak_gpu_gib": mem.get("gpu_gib"), "peak_host_gib": mem.get("host_gib"), "peak_disk_gib": mem.get("disk_gib")})
    return rows


def extrapolate(rows: list[dict[str, Any]], indep: dict[str, Any] | None, n_probes: int, gpus: int) -> dict[str, Any]:
    """GPU-hours of the paper's budgets from the measured rates (per GPU), ours vs the independent probes."""
    rate = {r["phase"]: (r["steady_tok_s"] or r["e2e_tok_s"]) / gpus for r in rows}
    hours: dict[str, Any] = {"n_probes": n_probes, "budgets": PAPER}
    if {"stage1", "probes", "stage2"} <= set(rate):
        sel = (PAPER["stage1"] / rate["stage1"] + n_probes * PAPER["probe"] / rate["probes"]) / 3600
        hours["ours"] = {"selection_gpu_h": sel, "final_stage2_gpu_h": PAPER["stage2"] / rate["stage2"] / 3600}
        hours["ours"]["total_gpu_h"] = sel + hours["ours"]["final_stage2_gpu_h"]
    if indep:
        r1, r2 = indep["stage1"]["steady_tokens_per_s"], indep["stage2"]["steady_tokens_per_s"]
        sel = n_probes * (PAPER["stage1"] / r1 + PAPER["probe"] / r2) / 3600
        final = PAPER["stage2"] / rate["stage2"] / 3600 if "stage2" in rate else PAPER["stage2"] / r2 / 3600
        hours["independent"] = {"selection_gpu_h": sel, "final_stage2_gpu_h": final, "total_gpu_h": sel + final}
    if "ours" in hours and "independent" in hours:
        hours["ratio_selection"] = hours["ours"]["selection_gpu_h"] / hours["independent"]["selection_gpu_h"]
        hours["ratio_total"] = hours["ours"]["total_gpu_h"] / hours["independent"]["total_gpu_h"]
    return hours


# -- the driver ----------------------------------------------------------------------------------------------------
def overrides(args: argparse.Namespace, selection: bool) -> list[str]:
    """The ``--set`` items of the run: --probe-trainable (when it selects) and every --set."""
    items = [f"selection.probe_trainable={args.probe_trainable}"] if args.probe_trainable and selection else []
    return items + list(args.set)


def launch(args: argparse.Namespace, cfg_path: Path, out: Path, log: Path) -> tuple[int, Monitor]:
    command = "run" if "probes" in args.phases else "distill"
    cmd = [sys.executable, "-m", "hybridize", command, str(cfg_path), "--out", str(out), "--overwrite"]
    cmd += ["--nproc", str(args.nproc)] if args.nproc > 1 else []
    for item in overrides(args, command == "run"):
        cmd += ["--set", item]
    shutil.rmtree(out, ignore_errors=True)  # --overwrite would too; gone first, the monitor reads only this run's files
    monitor = Monitor(out)
    return monitor.run(cmd, log, child_env(args), args.timeout), monitor


def worker_json(args: argparse.Namespace, kind: str, stem: Path) -> dict[str, Any] | None:
    """Run a worker (build / indep) in its own process; its JSON, or None when it failed (its log says why)."""
    path = stem.with_name(f"{stem.name}.{kind}.json")
    path.unlink(missing_ok=True)
    rc = subprocess.run(worker_cmd(args, kind, path), env=child_env(args)).returncode
    got = json.loads(path.read_text()) if rc == 0 and path.exists() else None
    path.unlink(missing_ok=True)  # the record holds it
    return got


def report(args: argparse.Namespace, record: dict[str, Any], stem: Path) -> None:
    keys = ["phase", "tokens", "seconds", "e2e_tok_s", "steady_tok_s", "tflop_per_token", "mfu", "peak_gpu_gib",
            "peak_host_gib", "peak_disk_gib"]
    md = [f"# scale rehearsal: {args.shape}, {record['gpus']} x {record['device_name']}, probe_trainable "
          f"{args.probe_trainable or '(default)'}", "", pc.table(record["rows"], keys), ""]
    ind = record.get("independent")
    if ind:
        md += ["independent probe (one student, one softmax layer, all parameters trained, 1 GPU):",
               pc.table([{"stage": s, "steady_tok_s": ind[s]["steady_tokens_per_s"], "steps": ind[s]["steps"]}
                         for s in ("stage1", "stage2")]), ""]
    if record.get("plan_vs_measured"):
        md += [f"memory plan (group size {record['plan']['group_size']}, waiting probes on {record['plan']['offload']}) vs "
               "measured peak GPU GiB (target: within 20%):", pc.table(record["plan_vs_measured"]), ""]
    h = record["extrapolation"]
    rows = [{"recipe": k, **{c: v for c, v in h[k].items()}} for k in ("ours", "independent") if k in h]
    if rows:
        md += [f"GPU-hours of the paper's budgets ({h['n_probes']} probes x 200M, stage 1 100M, stage 2 600M):",
               pc.table(rows), ""]
    if "ratio_total" in h:
        md.append(f"ours / independent: selection {h['ratio_selection']:.3f}, total {h['ratio_total']:.3f} (GPU-hours)")
    if record.get("result_tokens", {}).get("selection_cost_ratio"):
        md.append(f"result.json selection_cost_ratio (tokens, vs independent_pipeline_equivalent): "
                  f"{record['result_tokens']['selection_cost_ratio']:.3f}")
    if record.get("error"):
        md.append(f"run failed: {record['error']}")
    text = "\n".join(md)
    print(text, flush=True)
    stem.with_name(stem.name + ".md").write_text(text + "\n")
    stem.with_name(stem.name + ".json").write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {stem.with_name(stem.name + '.json')} and {stem.with_name(stem.name + '.md')}", flush=True)


def main() -> None:
    args = parse()
    work = Path(args.work)
    teacher_dir = work / f"teacher-{args.shape}"
    if args.worker == "build":
        rm.build_teacher_dir(args.shape, teacher_dir, Path(args.tokenizer), args.device)
        Path(args.worker_out).write_text("{}")
        return
    if args.worker == "indep":
        Path(args.worker_out).write_text(json.dumps(independent(args, teacher_dir), default=str))
        return
    if args.worker == "plan":  # worker_out is <stem>.plan.json, the run's config is <stem>.yaml
        out = Path(args.worker_out)
        cfg_path = out.with_name(out.name.removesuffix(".plan.json") + ".yaml")
        out.write_text(json.dumps(plan_of(args, cfg_path), default=str))
        return
    gpu = Monitor.query_gpu() if args.device != "cpu" else None
    device_name = _gpu_name() if gpu else "cpu"
    tag = args.tag or f"{device_name.lower().replace('nvidia ', '').split()[0] if gpu else 'cpu'}_np{args.nproc}"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"scale_rehearsal_{args.shape}_{tag}"
    if worker_json(args, "build", stem) is None:
        sys.exit("building the teacher failed (see above)")
    fm = rm.flop_model(teacher_dir)
    record: dict[str, Any] = {"args": vars(args), "gpus": args.nproc, "device_name": device_name,  # CPU: processes
                              "flop_model": {"n_t": fm.n_t, "n_body": fm.n_body, "n_mix": sum(fm.variant), "peak_flops": 989.4e12 if gpu else None}}
    rows, n_probes = [], fm.n_layers
    if {"stage1", "probes", "stage2"} & set(args.phases):
        cfg = run_config(args, teacher_dir, fm.n_layers)
        stem.with_name(stem.name + ".yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        out, log = work / f"out-{args.shape}-{tag}", stem.with_name(stem.name + ".log")
        log.unlink(missing_ok=True)
        record["plan"] = worker_json(args, "plan", stem) if "probes" in args.phases else None
        rc, monitor = launch(args, stem.with_name(stem.name + ".yaml"), out, log)
        peaks = monitor.peaks()
        record.update(rc=rc, run_seconds=monitor.seconds, peaks=peaks, gpu_baseline_mib=monitor.gpu_baseline)
        record["plan_vs_measured"] = plan_vs_measured(record["plan"], peaks)
        if rc == 0 and (out / "result.json").exists():
            result = json.loads((out / "result.json").read_text())
            n_probes = result["tokens"]["n_probes"] or fm.n_layers
            record.update(result_phases=result["phases"], result_tokens=result["tokens"], softmax_layers=result["softmax_layers"],
                          out_disk_gib=peaks.get("all", {}).get("disk_gib"))
            rows = phase_rows(args, result, steady_rates(out, n_probes), peaks, fm, max(1, record["gpus"]),
                              record["flop_model"]["peak_flops"])
        else:
            record["error"] = f"exit {rc}; the last lines of {log}: " + " | ".join(log.read_text(errors="replace").splitlines()[-5:])
    record["rows"] = rows
    record["independent"] = worker_json(args, "indep", stem) if "indep" in args.phases else None
    record["extrapolation"] = extrapolate(rows, record["independent"], n_probes, max(1, record["gpus"]))
    report(args, record, stem)


def _gpu_name() -> str:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "gpu"


if __name__ == "__main__":
    main()
