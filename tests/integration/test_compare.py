"""`hybridize compare`: selectors head to head, shared stage 1 and final hybrids, table, plots, resume, errors."""
from __future__ import annotations

import json

import pytest
import yaml

from hybridize.cli import main
from hybridize.recipes.compare import aggregate, compare_config_from_dict, markdown_table
from hybridize.errors import ConfigError
from hybridize.testing.models import save_tiny_teacher

TEXT = "\n\n".join(f"item {i}: the {chr(97 + i % 26)} box holds {i % 7} stones and {i % 5} keys." for i in range(160))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    teacher = save_tiny_teacher(root / "teacher", "llama", n_layer=4, seed=3)
    (root / "corpus.txt").write_text(TEXT)
    return root, teacher


def config(root, teacher, **compare):
    return {
        "teacher": str(teacher), "device": "cpu", "seed": 0,
        "data": {"train": str(root / "corpus.txt"), "seq_len": 32, "heldout_fraction": 0.1},
        "linear_attention": {"name": "gdn"}, "softmax_layers": 1,
        "selection": {"stop": {"name": "fixed-budget"}, "probe_tokens": 512, "eval_every": 1},
        "distill": {"stage1_tokens": 1024, "stage2_tokens": 512, "batch_size": 8, "eval_blocks": 2},
        "evaluators": [{"name": "heldout-kl"}],
        "compare": {"selectors": ["kl-greedy-add", "uniform", "random"], "softmax_layers": [1, 2], "seeds": [0, 1], **compare},
    }


@pytest.fixture(scope="module")
def compared(setup, tmp_path_factory):
    root, teacher = setup
    cfg_path = root / "compare.yaml"
    cfg_path.write_text(yaml.safe_dump(config(root, teacher)))
    out = tmp_path_factory.mktemp("out") / "cmp"
    assert main(["compare", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "compare.json").read_text())


def test_compare_writes_table_and_plots(compared):
    out, result = compared
    for name in ("compare.json", "compare.md", "compare_metrics.png", "compare_layers.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(result["rows"]) == 3 * 2 * 2
    assert len(result["table"]) == 3 * 2
    md = (out / "compare.md").read_text()
    assert "kl-greedy-add" in md and "uniform" in md and "heldout_kl" in md and "±" in md
    for row in result["rows"]:
        assert len(row["softmax_layers"]) == row["k"]
        assert row["metrics"]["heldout_kl"] >= 0


def test_compare_shares_stage1_and_final_hybrids(compared):
    _, result = compared
    spent, alone = result["tokens"]["spent"], result["tokens"]["standalone_sum"]
    # stage 1 is paid once per seed, not once per selection
    assert spent["selection"] < alone["selection"]
    # rows with the same seed and layers share one final hybrid
    distinct = {(r["seed"], tuple(r["softmax_layers"])) for r in result["rows"]}
    assert spent["final_hybrids"] == len(distinct) <= len(result["rows"])
    same = {}
    for r in result["rows"]:
        same.setdefault((r["seed"], tuple(r["softmax_layers"])), set()).add(r["metrics"]["heldout_kl"])
    assert all(len(v) == 1 for v in same.values())


def test_uniform_rows_are_the_evenly_spaced_layers(compared):
    _, result = compared
    assert {tuple(r["softmax_layers"]) for r in result["rows"] if r["selector"] == "uniform" and r["k"] == 2} == {(1, 3)}


def test_compare_resume_keeps_finished_rows(compared, setup):
    out, result = compared
    root, teacher = setup
    rows = json.loads((out / "checkpoints" / "rows.json").read_text())
    (out / "checkpoints" / "rows.json").write_text(json.dumps(rows[:-2]))  # as if killed before the last two rows
    cfg_path = root / "compare.yaml"
    assert main(["compare", str(cfg_path), "--out", str(out), "--quiet", "--resume"]) == 0
    again = json.loads((out / "compare.json").read_text())
    key = lambda r: (r["seed"], r["selector"], r["k"])  # noqa: E731
    assert sorted(map(key, again["rows"])) == sorted(map(key, result["rows"]))
    for a, b in zip(sorted(again["rows"], key=key), sorted(result["rows"], key=key)):
        assert a["softmax_layers"] == b["softmax_layers"]
        assert a["metrics"]["heldout_kl"] == pytest.approx(b["metrics"]["heldout_kl"], rel=1e-5)


def test_aggregate_mean_and_std():
    rows = [{"selector": "s", "budget": 1, "k": 1, "seed": s, "softmax_layers": [s], "tokens": {"selection_cost": 10},
             "metrics": {"heldout_kl": v}} for s, v in ((0, 1.0), (1, 3.0))]
    (entry,) = aggregate(rows)
    assert entry["metrics"]["heldout_kl"] == (2.0, pytest.approx(2 ** 0.5))
    assert "2.0000 ± 1.4142" in markdown_table([entry])


@pytest.mark.parametrize("section, field", [
    ({"selectors": []}, "compare field 'selectors'"),
    ({"softmax_layers": [0]}, "compare field 'softmax_layers'"),
    ({"seeds": [1, 1]}, "compare field 'seeds'"),
    ({"sedes": [1]}, "sedes"),
])
def test_compare_config_errors_name_the_field(setup, section, field):
    root, teacher = setup
    tree = config(root, teacher)
    tree["compare"] = section
    with pytest.raises(ConfigError, match=field):
        compare_config_from_dict(tree)


def test_compare_unknown_selector_did_you_mean(setup):
    root, teacher = setup
    tree = config(root, teacher, selectors=["kl-greedy-ad"])
    with pytest.raises(ConfigError, match="kl-greedy-add"):
        compare_config_from_dict(tree)


# -- probe variants x final variants, proxies, rank correlation ----------------------------------------
@pytest.fixture(scope="module")
def crossed(setup, tmp_path_factory):
    root, teacher = setup
    tree = config(root, teacher, selectors=["kl-greedy-add", {"name": "grad-sensitivity", "min_gap": 2}, "swap-kl"],
                  softmax_layers=[2], seeds=[0], probe_variants=["gdn", "gla"], final_variants=["gdn", "gla"])
    cfg_path = root / "crossed.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    out = tmp_path_factory.mktemp("out") / "crossed"
    assert main(["compare", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "compare.json").read_text())


def test_compare_crosses_probe_and_final_variants(crossed):
    out, result = crossed
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2
    assert {(r["probe_variant"], r["final_variant"]) for r in rows} == {("gdn", "gdn"), ("gdn", "gla"), ("gla", "gdn"), ("gla", "gla")}
    assert {r["selector"] for r in rows} == {"kl-greedy-add", "grad-sensitivity(min_gap=2)", "swap-kl"}
    by_selection = {}
    for r in rows:  # one selection serves every final variant
        by_selection.setdefault((r["selector"], r["probe_variant"]), set()).add(tuple(r["softmax_layers"]))
    assert all(len(v) == 1 for v in by_selection.values())
    by_final = {}
    for r in rows:  # one final hybrid per (final variant, layers), whatever selected it
        by_final.setdefault((r["final_variant"], tuple(r["softmax_layers"])), set()).add(r["metrics"]["heldout_kl"])
    assert all(len(v) == 1 for v in by_final.values())
    assert result["tokens"]["spent"]["final_hybrids"] == len(by_final)
    for r in rows:
        if r["selector"].startswith("grad-sensitivity"):
            assert abs(r["softmax_layers"][1] - r["softmax_layers"][0]) >= 2
    md = (out / "compare.md").read_text()
    assert "probes -> hybrid" in md and "gdn -> gla" in md and "gla -> gdn" in md


def test_compare_reports_the_overlap_of_probe_variants(crossed):
    _, result = crossed
    overlap = {o["selector"]: o for o in result["overlap"]}
    assert set(overlap) == {"kl-greedy-add", "grad-sensitivity(min_gap=2)", "swap-kl"}
    for o in overlap.values():
        assert o["probe_variants"] == ["gdn", "gla"]
        assert 0.0 <= o["jaccard_top_k"] <= 1.0 and 0.0 <= o["jaccard_trajectory"] <= 1.0
        a, b = (set(t) for t in o["top_k"])
        assert o["jaccard_top_k"] == pytest.approx(len(a & b) / len(a | b))
    # a teacher-only proxy does not depend on the probe variant: identical scores and selections
    g = overlap["grad-sensitivity(min_gap=2)"]
    assert g["jaccard_top_k"] == g["jaccard_trajectory"] == 1.0 and g["spearman"] == pytest.approx(1.0)
    ga = overlap["kl-greedy-add"]
    assert len(next(r for r in result["rows"] if r["selector"] == "kl-greedy-add")["trajectory_top_k"]) >= 2
    assert "Probe variants: overlap" in (crossed[0] / "compare.md").read_text()
    assert ga["spearman"] is None or -1.0 <= ga["spearman"] <= 1.0


def test_compare_rank_correlation_with_the_reference(crossed):
    out, result = crossed
    corr = result["rank_correlation"]
    assert corr["reference"] == "kl-greedy-add"
    assert {(s["selector"], s["probe_variant"]) for s in corr["summary"]} == {
        (s, p) for s in ("grad-sensitivity(min_gap=2)", "swap-kl") for p in ("gdn", "gla")}
    rows = {(r["selector"], r["probe_variant"]): r for r in result["rows"]}
    from hybridize.selection.contract import spearman

    for p in corr["pairs"]:
        row, ref = rows[(p["selector"], p["probe_variant"])], rows[("kl-greedy-add", p["probe_variant"])]
        want = spearman({int(k): v for k, v in row["scores"].items()}, {int(k): v for k, v in ref["scores"].items()})
        assert p["spearman"] == pytest.approx(want)
        assert p["compute_fraction"] == pytest.approx(row["tokens"]["compute"] / ref["tokens"]["compute"], abs=1e-4)
        assert p["compute_beyond_stage1_fraction"] < 1.0  # a proxy costs less than the probes
    md = (out / "compare.md").read_text()
    assert "Against the reference `kl-greedy-add`" in md and "Closing note: Spearman rank correlation" in md
    assert "swap-kl" in md.split("Closing note")[1] and "grad-sensitivity(min_gap=2)" in md.split("Closing note")[1]


@pytest.mark.parametrize("section, message", [
    ({"probe_variants": ["gdm"]}, "compare field 'probe_variants': Unknown linear attention 'gdm'. Did you mean: gdn"),
    ({"final_variants": []}, "compare field 'final_variants' must be a non-empty list"),
    ({"final_variants": ["gla", {"name": "gla"}]}, "compare field 'final_variants' must not repeat a variant"),
    ({"selectors": ["uniform", {"name": "uniform"}]}, "compare field 'selectors' must not repeat a selector"),
    ({"selectors": [{"name": "swap-kl", "min_gap": 0}]}, "selector 'swap-kl' field 'min_gap' must be >= 1; got 0"),
])
def test_compare_variant_and_distance_errors(setup, section, message):
    root, teacher = setup
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare_config_from_dict(config(root, teacher, **section))


def test_compare_refuses_an_impossible_gap_before_any_work(setup, tmp_path):
    from hybridize.recipes.compare import compare

    root, teacher = setup
    base, ccfg = compare_config_from_dict(config(root, teacher, selectors=[{"name": "uniform", "min_gap": 2}], softmax_layers=[3]))
    with pytest.raises(ConfigError, match="selector 'uniform' field 'min_gap' must leave room for K=3 softmax layers among 4"):
        compare(base, ccfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_verify_stop_reads_every_budget_off_one_probe_run(setup, tmp_path):
    """compare.verify_stop: one probe run to the whole budget serves K=1 and K=2; each budget's selection, tokens and
    final hybrid equal those of a compare whose selections stop on their own, and stop_check reports the saving."""
    from hybridize.recipes.compare import compare

    root, teacher = setup
    results = {}
    for verify in (False, True):
        tree = config(root, teacher, selectors=["kl-greedy-add", "uniform"], seeds=[0], verify_stop=verify)
        tree["selection"] = {"stop": {"name": "rolling-jaccard", "windows": 2}, "probe_tokens": 1024, "eval_every": 1,
                             "probe_checkpoints": "memory"}
        base, ccfg = compare_config_from_dict(tree)
        results[verify] = compare(base, ccfg, tmp_path / f"v{verify}", progress=False)
    key = lambda r: (r["selector"], r["k"])  # noqa: E731
    plain, checked = (sorted(results[v]["rows"], key=key) for v in (False, True))
    for a, b in zip(plain, checked):
        assert (a["softmax_layers"], a["stop_step"], a["tokens"]) == (b["softmax_layers"], b["stop_step"], b["tokens"])
        assert a["metrics"]["heldout_kl"] == pytest.approx(b["metrics"]["heldout_kl"], rel=1e-6)
        assert b["seconds"]["selection"] >= 0 and ("stop_check" in b) == (b["selector"] == "kl-greedy-add")
    checks = results[True]["stop_check"]["selections"]
    assert [c["k"] for c in checks] == [1, 2] and all(c["windows"] == 4 and c["tokens_per_probe_budget"] == 1024 for c in checks)
    for c, row in zip(checks, (r for r in checked if r["selector"] == "kl-greedy-add")):
        assert c["saved_fraction"] == pytest.approx(1 - c["tokens_per_probe_at_stop"] / 1024)
        assert c["top_k_at_stop"] == row["softmax_layers"] and c["same_top_k"] == (sorted(c["top_k_at_budget"]) == row["softmax_layers"])
    assert "Stop criterion `rolling-jaccard` against the whole probe budget" in (tmp_path / "vTrue" / "compare.md").read_text()


def test_resume_after_a_kill_replays_the_probe_run_and_keeps_the_ledgers(setup, tmp_path, monkeypatch):
    """A compare killed between rows (a device call's time limit) resumes without training its probes or its
    finished final hybrids again, and reports the same rows and token ledgers as a run that was never stopped."""
    import hybridize.recipes.compare as cmp

    root, teacher = setup
    tree = config(root, teacher, selectors=["kl-greedy-add", "uniform"], seeds=[0], verify_stop=True)
    tree["selection"] = {"stop": {"name": "rolling-jaccard", "windows": 2}, "probe_tokens": 1024, "eval_every": 1,
                         "probe_checkpoints": "memory"}
    base, ccfg = compare_config_from_dict(tree)
    whole = cmp.compare(base, ccfg, tmp_path / "whole", progress=False)

    calls = {"select": 0, "final": 0}
    real_select, real_final = cmp.select, cmp.final_hybrid

    def counting_select(**kw):
        calls["select"] += bool(kw.get("run_to_budget"))  # probe runs only (uniform's selection has no probes)
        return real_select(**kw)

    def killing_final(*a, **kw):
        calls["final"] += 1
        if calls["final"] == 3:  # killed as the third distinct final hybrid starts
            raise KeyboardInterrupt("time limit")
        return real_final(*a, **kw)

    monkeypatch.setattr(cmp, "select", counting_select)
    monkeypatch.setattr(cmp, "final_hybrid", killing_final)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(base, ccfg, tmp_path / "cut", progress=False)
    done = json.loads((tmp_path / "cut" / "checkpoints" / "rows.json").read_text())
    assert 0 < len(done) < len(whole["rows"]) and calls["select"] == 1
    assert list((tmp_path / "cut" / "checkpoints").rglob("probe_run.json"))

    calls.update(select=0, final=-100)
    again = cmp.compare(base, ccfg, tmp_path / "cut", resume=True, progress=False)
    assert calls["select"] == 0  # the probe run was replayed from probe_run.json, not trained again
    assert calls["final"] == -100 + whole["tokens"]["spent"]["final_hybrids"] - 2  # only the unfinished finals trained
    key = lambda r: (r["selector"], r["k"])  # noqa: E731
    for a, b in zip(sorted(again["rows"], key=key), sorted(whole["rows"], key=key)):
        assert (a["softmax_layers"], a["tokens"]) == (b["softmax_layers"], b["tokens"])
        assert a["metrics"]["heldout_kl"] == pytest.approx(b["metrics"]["heldout_kl"], rel=1e-5)
    assert again["tokens"]["standalone_sum"] == whole["tokens"]["standalone_sum"]
    spent, spent_whole = again["tokens"]["spent"], whole["tokens"]["spent"]
    # the one thing a resume pays again: the seed's stage 1 (the replayed probe run keeps no stage-1 modules)
    assert {k: v for k, v in spent.items() if k != "final_stage1"} == {k: v for k, v in spent_whole.items() if k != "final_stage1"}
    # (its cost: the stage-1 tokens and the teacher forward over them)
    assert spent["final_stage1"] == spent_whole["final_stage1"] + 2 * base.distill.stage1_tokens
