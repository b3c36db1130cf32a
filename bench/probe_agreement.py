"""Probe training policy: do `mixers` and `probed` probes rank layers as `all` probes do (issue 19)?

``selection.probe_trainable`` says what a GA-S2 probe trains: ``all`` (every parameter, as the paper's
probes), ``mixers`` (every layer's attention / linear attention) or ``probed`` (only the mixer of the layer
the probe scores). This runs the GA-S2 selection with hybridize's own code
(:class:`hybridize.selection.engine.SelectionEngine`: ``kl-greedy-add``, ``kl`` scorer, GDN probes, the
``fixed-budget`` stop so every probe sees the same tokens) for each teacher x seed x policy. Per seed ONE
stage-1 pass is run and adopted by all three policies (``stage1_from``), so within a seed the policies
differ only in what their probes train. Also recorded per seed: each probe's held-out KL before any
stage-2 step (``untrained``: the ranking stage 1 alone gives), which tells whether stage 2 moved the
ranking at all at this budget.

Compared: Spearman rank correlation of the layer scores and top-K Jaccard of ``mixers`` / ``probed`` /
``untrained`` vs ``all`` of the same seed, and the noise floor, ``all`` seed s vs ``all`` seed s'. The data
split is hybridize's (held-out fraction 0.05, split seed 0) for every seed; the seed sets stage 1's
initialisation and the order of the training blocks. One torch thread.

    python bench/probe_agreement.py --teachers stories260K --probe-tokens 32768 --stage1-tokens 200000 \
        --eval-blocks 32 --out bench/results/probe_agreement_stories260k.json          # ~5 min, one CPU thread
    python bench/probe_agreement.py --teachers tiny12 --probe-tokens 20480 --stage1-tokens 100000 \
        --eval-blocks 24 --out bench/results/probe_agreement_tiny12.json               # ~10 min (needs train_tiny_teacher.py)
    python bench/probe_agreement.py --merge bench/results/probe_agreement_stories260k.json \
        bench/results/probe_agreement_tiny12.json --out bench/results/probe_agreement.json --plot docs/probe_agreement.png
    python bench/probe_agreement.py --seeds 0 --probe-tokens 8192 --stage1-tokens 8192 \\
        --teachers stories260K --out /tmp/pa.json                                     # smoke test
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hybridize.distill.stages import DistillConfig
from hybridize.model.teacher import load_teacher
from hybridize.registry.configs import ComponentRef
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.contract import Probe, choose, jaccard, resolve_budget, spearman
from hybridize.selection.engine import SelectionConfig, SelectionEngine
from hybridize.training.data import DataConfig, prepare_data

TEACHERS = {"stories260K": "../shared/teachers/stories260K", "tiny12": "/work/models/tiny12"}
POLICIES = ("all", "mixers", "probed")
TEXT = "../shared/data/tinystories_val.txt"


def settings(args: argparse.Namespace, policy: str, budget: tuple[int, int]) -> tuple[DistillConfig, SelectionConfig]:
    """The stage-1 and selection settings of one run; ``budget`` = (probe tokens, stage-1 tokens)."""
    probe_tokens, stage1_tokens = budget
    distill = DistillConfig(stage1_tokens=stage1_tokens, stage2_tokens=0, batch_size=args.batch,
                            eval_blocks=args.eval_blocks, checkpoint_every=0, stage1_lr=args.stage1_lr,
                            stage2_lr_attn=args.lr_attn, stage2_lr_other=args.lr_other)
    steps = -(-probe_tokens // (args.batch * args.seq))
    sel = SelectionConfig(selector=ComponentRef(name="kl-greedy-add"), scorer=ComponentRef(name="kl"),
                          stop=ComponentRef(name="fixed-budget"), probe_tokens=probe_tokens,
                          eval_every=max(1, steps // args.windows), probe_trainable=policy, probe_group_size=0)
    return distill, sel


def engine(teacher: Any, data: Any, args: argparse.Namespace, policy: str, seed: int, k: int, budget: tuple[int, int],
           stage1_from: Any = None) -> SelectionEngine:
    distill, sel = settings(args, policy, budget)
    return SelectionEngine(teacher=teacher, data=data, cfg=sel, distill=distill, variant=ComponentRef(name="gdn"),
                           pm=get_plugin_manager(), device=torch.device("cpu"), k=k, seed=seed, progress=False,
                           stage1_from=stage1_from)


def top_ks(importance: dict[int, float], ks: list[int]) -> dict[str, list[int]]:
    return {str(k): choose(importance, k) for k in ks}


def untrained(base: SelectionEngine, n_layers: int) -> dict[int, float]:
    """Each probe's held-out KL before any stage-2 step (importance = -KL, as kl-greedy-add's)."""
    builder = base._probe_builder()
    raw = {}
    for layer in range(n_layers):
        model, _ = builder.model(Probe(layer=layer, softmax_layers=(layer,)))
        raw[layer] = base._heldout_kl(model)
    return raw


def run_seed(teacher: Any, data: Any, args: argparse.Namespace, seed: int, k: int, ks: list[int],
             budget: tuple[int, int]) -> dict[str, Any]:
    """One shared stage 1, the untrained probes' KL, then one selection per policy adopting that stage 1."""
    base = engine(teacher, data, args, "all", seed, k, budget)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    base.distiller.evaluator.prepare()
    modules = base.shared_stage1()
    stage1 = {"wall_s": round(time.perf_counter() - t0, 1), "tokens": base.stage1_tokens()}
    n_layers = base.n_layers
    raw0 = untrained(base, n_layers)
    imp0 = {l: -v for l, v in raw0.items()}
    out = {"stage1": stage1, "untrained": {"raw_scores": raw0, "scores": imp0, "top_k": top_ks(imp0, ks)}, "policies": {}}
    for policy in args.policies:
        t0 = time.perf_counter()
        res = engine(teacher, data, args, policy, seed, k, budget, stage1_from=(modules, base.stage1_tokens())).run()
        wall = time.perf_counter() - t0
        rec = {"raw_scores": res["raw_scores"], "scores": res["scores"], "ranking": res["ranking"],
               "top_k": top_ks(res["scores"], ks), "wall_s": round(wall, 1), "probe_each": res["tokens"]["probe_each"],
               "trajectory": [{"step": w["step"], "raw": w["raw"], "top_k": w["top_k"]} for w in res["trajectory"]],
               "failed_layers": res["failed_layers"]}
        out["policies"][policy] = rec
        print(f"  seed {seed} {policy:7s} top-{k} {rec['top_k'][str(k)]}  raw {fmt(res['raw_scores'])}  {wall:.0f}s", flush=True)
    print(f"  seed {seed} untrain top-{k} {out['untrained']['top_k'][str(k)]}  raw {fmt(raw0)}", flush=True)
    return out


def fmt(raw: dict[int, float]) -> str:
    return "[" + " ".join(f"{raw[l]:.3f}" for l in sorted(raw)) + "]"


def compare(a: dict[str, Any], b: dict[str, Any], ks: list[int]) -> dict[str, Any]:
    return {"spearman": spearman(a["scores"], b["scores"]),
            "jaccard": {str(k): jaccard(a["top_k"][str(k)], b["top_k"][str(k)]) for k in ks}}


def agreement(runs: dict[int, dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """Policy vs `all` of the same seed, and `all` seed s vs `all` seed s' (the noise floor)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed, run in runs.items():
        ref = run["policies"]["all"]
        for name in [p for p in run["policies"] if p != "all"] + ["untrained"]:
            other = run["untrained"] if name == "untrained" else run["policies"][name]
            rows.setdefault(f"{name} vs all (same seed)", []).append({"seeds": [seed], **compare(other, ref, ks)})
    for s, t in itertools.combinations(sorted(runs), 2):
        for name in runs[s]["policies"]:
            row = compare(runs[s]["policies"][name], runs[t]["policies"][name], ks)
            rows.setdefault(f"{name} seed s vs {name} seed s' (noise floor)" if name == "all" else f"{name} s vs s'", []).append(
                {"seeds": [s, t], **row})
    return {name: {"pairs": pairs, **summary(pairs, ks)} for name, pairs in rows.items()}


def summary(pairs: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    rho = [p["spearman"] for p in pairs if p["spearman"] is not None]
    out = {"spearman_mean": statistics.fmean(rho) if rho else None, "spearman_min": min(rho) if rho else None}
    out["jaccard_mean"] = {str(k): statistics.fmean(p["jaccard"][str(k)] for p in pairs) for k in ks}
    return out


def table(results: dict[str, Any]) -> str:
    """The markdown table: one row per teacher x comparison."""
    lines = ["| teacher | comparison | pairs | Spearman mean (min) | top-K Jaccard mean | wall per selection |",
             "|---|---|---|---|---|---|"]
    for name, t in results["teachers"].items():
        walls = {p: statistics.fmean(r["policies"][p]["wall_s"] for r in t["runs"].values()) for p in t["policies"]}
        for comp, a in t["agreement"].items():
            pol = comp.split()[0]
            rho = "-" if a["spearman_mean"] is None else f"{a['spearman_mean']:.2f} ({a['spearman_min']:.2f})"
            jac = ", ".join(f"K={k}: {v:.2f}" for k, v in a["jaccard_mean"].items())
            wall = f"{walls[pol]:.0f} s" if pol in walls else "-"
            lines.append(f"| {name} ({t['n_layers']} layers) | {comp} | {len(a['pairs'])} | {rho} | {jac} | {wall} |")
    return "\n".join(lines)


def budget_line(results: dict[str, Any]) -> str:
    """One line per teacher: the budgets and settings its rows were measured at."""
    lines = []
    for n, t in results["teachers"].items():
        a = t["args"]
        lines.append(f"- {n}: K={t['ks']}, {t['probe_tokens']:,} tokens per probe, stage 1 {t['stage1_tokens']:,} tokens, "
                     f"batch {a['batch']} x {a['seq']}, {a['windows']} windows, {a['eval_blocks']} held-out blocks, lr stage 1 "
                     f"{a['stage1_lr']:g}, probes {a['lr_attn']:g} attention / {a['lr_other']:g} other, seeds {a['seeds']}")
    return "GDN probes, kl-greedy-add + kl scorer + fixed-budget stop, one torch thread:\n" + "\n".join(lines)


#: Qwen2.5-3B-Instruct's shape (its config.json), for the memory per probe of each policy
QWEN25_3B = dict(vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=32_768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


def memory_per_probe(n_probes_host: int = 36) -> dict[str, Any]:
    """What one GDN probe owns at Qwen2.5-3B shape under each policy (meta-device counts; a bf16 teacher whose
    probes own fp32 master copies on CUDA, 4 bytes): parameters, GiB on the GPU while training (parameters,
    gradients, AdamW's two moments) and GiB waiting off the GPU (parameters + moments, as
    :mod:`hybridize.recipes.plan` counts), and that for all 36 probes."""
    from transformers import Qwen2Config

    from hybridize.recipes.plan import GIB, count_params

    counts = count_params(Qwen2Config(**QWEN25_3B), ComponentRef(name="gdn"), get_plugin_manager())
    out: dict[str, Any] = {"shape": "Qwen2.5-3B", "teacher_params": counts.teacher, "bytes_per_param": 4}
    for policy in POLICIES:
        owned = max(counts.probe_params(policy, l) for l in range(len(counts.attention)))
        out[policy] = {"params": owned, "gpu_gib": owned * 4 * 4 / GIB, "waiting_gib": owned * 4 * 3 / GIB,
                       f"waiting_{n_probes_host}_probes_gib": n_probes_host * owned * 4 * 3 / GIB}
    return out


def memory_table(mem: dict[str, Any]) -> str:
    rows = ["| policy | params per probe | GiB per probe on the GPU (fp32 masters: params + grads + AdamW) | GiB per waiting probe | 36 probes waiting |",
            "|---|---|---|---|---|"]
    for p in POLICIES:
        m = mem[p]
        rows.append(f"| {p} | {m['params']:,} | {m['gpu_gib']:.2f} | {m['waiting_gib']:.2f} | {m['waiting_36_probes_gib']:.1f} |")
    return f"{mem['shape']} shape (teacher {mem['teacher_params']:,} params), GDN probes:\n\n" + "\n".join(rows)


def run_teacher(name: str, path: str, args: argparse.Namespace, probe_tokens: int, stage1_tokens: int) -> dict[str, Any]:
    """Every seed and policy on one teacher, and their agreement."""
    teacher = load_teacher(path, device="cpu")
    data = prepare_data(DataConfig(train=TEXT, seq_len=args.seq, heldout_fraction=0.05), teacher.tokenizer, seed=0)
    n_layers = len(teacher.model.model.layers)
    k = resolve_budget(0.25, n_layers)
    ks = sorted({k, *(kk for kk in args.extra_k if kk < n_layers and name == "stories260K")})
    print(f"{name}: {n_layers} layers, K={k} (also {ks}), {probe_tokens:,} tokens per probe", flush=True)
    runs = {seed: run_seed(teacher.model, data, args, seed, k, ks, (probe_tokens, stage1_tokens)) for seed in args.seeds}
    return {"path": path, "n_layers": n_layers, "k": k, "ks": ks, "probe_tokens": probe_tokens, "stage1_tokens": stage1_tokens,
            "policies": list(args.policies), "args": vars(args), "runs": runs, "agreement": agreement(runs, ks)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/probe_agreement.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the teachers of these result files into --out; run nothing")
    ap.add_argument("--plot", help="also draw the layer scores of seed 0 per policy (PNG), e.g. docs/probe_agreement.png")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), help="names (stories260K, tiny12) or NAME=PATH")
    ap.add_argument("--probe-tokens", type=int, nargs="+", default=[32768, 24576], help="per probe, one per teacher")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--stage1-tokens", type=int, nargs="+", default=[200_000, 150_000], help="one per teacher")
    ap.add_argument("--stage1-lr", type=float, default=3e-3)
    ap.add_argument("--lr-attn", type=float, default=3e-3)
    ap.add_argument("--lr-other", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--extra-k", type=int, nargs="*", default=[1, 2], help="extra K for stories260K")
    args = ap.parse_args()
    if "all" not in args.policies:
        ap.error("--policies must include 'all' (the reference)")
    return args


def plot(results: dict[str, Any], path: Path, seed: str = "0") -> None:
    """Held-out KL of every layer's probe per policy (and untrained), one panel per teacher, for one seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = results["teachers"]
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 3.6), squeeze=False)
    styles = {"all": ("k", "o", "-"), "mixers": ("tab:blue", "s", "--"), "probed": ("tab:orange", "^", ":"),
              "untrained": ("tab:gray", "x", "-.")}
    for ax, (name, t) in zip(axes[0], teachers.items()):
        run = t["runs"][seed]
        curves = {**run["policies"], "untrained": run["untrained"]}
        for label, rec in curves.items():
            layers = sorted(rec["raw_scores"], key=int)
            color, marker, line = styles[label]
            top = rec["top_k"][str(t["k"])]
            ax.plot([int(l) for l in layers], [rec["raw_scores"][l] for l in layers], color=color, marker=marker, ls=line,
                    label=f"{label} (top-{t['k']} {top})")
        ax.set(title=f"{name}, seed {seed}: {t['probe_tokens']:,} tokens per probe", xlabel="probed layer (softmax)",
               ylabel="held-out KL(teacher || probe)", xticks=range(t["n_layers"]))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    """The JSON, the markdown table beside it (same name, .md), and the table on stdout."""
    results["memory_per_probe"] = memory_per_probe()
    md = budget_line(results) + "\n\n" + table(results) + "\n\n" + memory_table(results["memory_per_probe"]) + "\n"
    results["table_md"] = md
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        merged = {"teachers": {n: t for part in parts for n, t in part["teachers"].items()}, "merged_from": args.merge,
                  "wall_s": sum(part["wall_s"] for part in parts), "machine": parts[0]["machine"]}
        write(merged, Path(args.out))
        if args.plot:
            plot(merged, Path(args.plot))
        return
    t0 = time.perf_counter()
    results: dict[str, Any] = {"teachers": {}}
    for i, spec in enumerate(args.teachers):
        name, _, path = spec.partition("=")
        budget = [v[min(i, len(v) - 1)] for v in (args.probe_tokens, args.stage1_tokens)]
        results["teachers"][name] = run_teacher(name, path or TEACHERS[name], args, *budget)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}
    write(results, Path(args.out))
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
