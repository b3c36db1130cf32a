"""`hybridize compare`: selectors head to head, shared stage 1 and final hybrids, table, plots, resume, errors."""
from __future__ import annotations

import json

import pytest
import yaml

from hybridize.cli import main
from hybridize.compare import aggregate, compare_config_from_dict, markdown_table
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
