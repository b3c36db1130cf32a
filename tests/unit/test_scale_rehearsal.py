"""The pieces of bench/scale_rehearsal.py that decide its numbers, on CPU in seconds: the run config is a valid
paper-recipe config, the FLOP model's weight counts equal built models', the steady rates, the extrapolation,
the process-tree RSS and the phase labels of the monitor. (The whole script: `python bench/scale_rehearsal.py
--shape tiny --device cpu`, about a minute, bench/README.md.)"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import perf_common as pc  # noqa: E402
import rehearsal_model as rm  # noqa: E402
import scale_rehearsal as sr  # noqa: E402
from rehearsal_monitor import Monitor, tree_rss  # noqa: E402

TOKENIZER = Path(sr._shared("teachers", "stories260K"))
DATA = Path(sr._shared("data", "tinystories_val.txt"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    if not TOKENIZER.is_dir() or not DATA.is_file():
        pytest.skip("needs ../shared/teachers/stories260K and ../shared/data/tinystories_val.txt")
    return rm.build_teacher_dir("tiny", tmp_path_factory.mktemp("t") / "teacher", TOKENIZER, "cpu")


def test_the_run_config_is_the_paper_recipe(teacher, pm):
    from hybridize.recipes.runconfig import run_config_from_dict

    args = sr.parse(["--shape", "tiny", "--device", "cpu"])
    cfg = run_config_from_dict(sr.run_config(args, teacher, 4), pm=pm)
    d, s = cfg.distill, cfg.selection
    assert (s.selector.name, s.scorer.name, s.stop.name, cfg.linear_attention.name, cfg.softmax_layers) == \
        ("kl-greedy-add", "kl", "rolling-jaccard", "gdn", 0.25)
    assert (s.probe_lr_attn, s.probe_lr_other, d.stage2_lr_attn, d.stage2_lr_other, d.min_lr_ratio) == (1e-4, 7e-6, 1e-4, 7e-6, 1.0)
    assert (d.stage1_batch_size, d.stage1_seq_len, d.stage1_tokens) == (16, 32, 20 * 16 * 32)
    assert s.probe_tokens == 4 * 2 * 128 and s.eval_every == 2 and [e.name for e in cfg.evaluators] == ["heldout-kl"]
    no_probes = sr.parse(["--shape", "tiny", "--phases", "stage1,stage2"])
    assert sr.run_config(no_probes, teacher, 4)["softmax_layers"] == [3]  # `hybridize distill` at the uniform 25%


def test_the_flop_model_counts_the_built_models(teacher, pm):
    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import load_teacher

    fm = rm.flop_model(teacher)
    model = load_teacher(str(teacher), device="cpu").model
    # all weights but the embedding: the matmul weights plus norms and biases (0.5% of this tiny model)
    assert fm.n_t == pytest.approx(pc.matmul_params(model), rel=0.01) and fm.n_t >= pc.matmul_params(model)
    assert fm.n_layers == 4 and (fm.heads, fm.head_dim) == (4, 16)
    student = build_student(model, [1], "gdn", pm=pm)
    # the variant modules' small non-matmul tensors (short convolutions, gates' biases, norms) are counted too
    assert abs(fm.n_student([1]) - pc.matmul_params(student)) < 0.05 * fm.n_t
    assert fm.stage2(128, [1]) > fm.probe(128, "all") > fm.probe(128, "probed")
    assert fm.teacher_fwd(128) == pytest.approx(2 * fm.n_t + 4 * 2 * 128 * 4 * 16)


def test_steady_rates_take_the_median_interval():
    assert sr.median_rate([(0.0, 0), (1.0, 100), (11.0, 200), (12.0, 300)]) == 100.0  # the 10 s compile is left out
    assert sr.median_rate([(1.0, 100)]) is None


def test_extrapolation_to_the_paper_budgets():
    rows = [{"phase": "stage1", "steady_tok_s": 2e5, "e2e_tok_s": 1.0}, {"phase": "probes", "steady_tok_s": 4e4, "e2e_tok_s": 1.0},
            {"phase": "stage2", "steady_tok_s": None, "e2e_tok_s": 2e4}]
    indep = {"stage1": {"steady_tokens_per_s": 1e5}, "stage2": {"steady_tokens_per_s": 1e4}}
    h = sr.extrapolate(rows, indep, n_probes=36, gpus=2)
    ours = (1e8 / 1e5 + 36 * 2e8 / 2e4) / 3600  # per-GPU rates: half of the measured ones on 2 GPUs
    assert h["ours"]["selection_gpu_h"] == pytest.approx(ours)
    assert h["independent"]["selection_gpu_h"] == pytest.approx(36 * (1e8 / 1e5 + 2e8 / 1e4) / 3600)
    assert h["ours"]["final_stage2_gpu_h"] == h["independent"]["final_stage2_gpu_h"] == pytest.approx(6e8 / 1e4 / 3600)
    assert h["ratio_selection"] == pytest.approx(ours / h["independent"]["selection_gpu_h"])


def test_the_monitor_reads_the_process_tree_and_labels_phases(tmp_path):
    assert tree_rss(os.getpid()) > 10 * 2**20
    m = Monitor(tmp_path)
    m.samples = [{"t": 1.0, "rss": 2**30, "gpu": {0: 1024}}, {"t": 2.0, "rss": 3 * 2**30, "gpu": {0: 512, 1: 4096}, "disk": 2**30},
                 {"t": 5.0, "rss": 2**30, "gpu": {}}]
    m.lines = [(1.5, "stage1"), (3.0, "selection")]
    peaks = m.peaks()
    assert peaks["stage1"] == {"gpu_gib": 1.0, "host_gib": 1.0, "disk_gib": None}
    assert peaks["probes"] == {"gpu_gib": 4.0, "host_gib": 3.0, "disk_gib": 1.0}
    assert peaks["finish"]["host_gib"] == 1.0 and peaks["all"]["gpu_gib"] == 4.0


def test_plan_vs_measured_pairs_each_phase_with_its_estimate():
    plan = {"memory_gib": {"selection_total": 30.0, "stage2": 50.0}}
    peaks = {"stage1": {"gpu_gib": 40.0}, "probes": {"gpu_gib": 60.0}, "stage2": {"gpu_gib": None}}
    rows = sr.plan_vs_measured(plan, peaks)
    assert [(r["phase"], r["plan_gib"], r["measured_gib"]) for r in rows] == [("stage1", 30.0, 40.0), ("probes", 30.0, 60.0)]
    assert [r["ratio"] for r in rows] == [0.75, 0.5]  # stage 2 unmeasured: no row
    assert sr.plan_vs_measured(None, peaks) == []


def test_overrides_reach_the_run_and_its_plan_alike():
    if not DATA.is_file() or not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("needs ../shared/data/tinystories_val.txt and ../shared/teachers/stories260K for parse()")
    base = ["--shape", "qwen2.5-3b", "--device", "cpu", "--data", str(DATA), "--tokenizer", str(TOKENIZER)]
    assert sr.overrides(sr.parse(base), True) == []
    args = sr.parse(base + ["--probe-trainable", "probed", "--set", "seed=1"])
    assert sr.overrides(args, True) == ["selection.probe_trainable=probed", "seed=1"]
    assert sr.overrides(args, False) == ["seed=1"]  # hybridize distill has no selection section
