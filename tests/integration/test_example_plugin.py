"""The worked plugin in examples/hybridize-retention: pip-installed, listed, conformant, usable in a compare.

The package is installed with pip into a temporary directory (``--target``) and used from
subprocesses with that directory on ``PYTHONPATH``, exactly as an installed third-party
distribution: hybridize finds it through its ``hybridize`` entry point, not by import path.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridize.testing.models import save_tiny_teacher

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hybridize-retention"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, never into the repo
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (EXAMPLE / "build").exists(), "the example plugin must be built out of tree"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    return env


def _run(args, env, **kw):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kw)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


def test_hybridize_plugins_lists_the_example_variant(installed):
    listing = json.loads(_run(["-m", "hybridize", "plugins", "--json"], installed))
    text = json.dumps(listing)
    assert '"retention"' in text and "hybridize-retention" in text, text[:2000]


def test_example_variant_passes_the_conformance_suite(installed):
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "conformance" / "test_linear_attention.py"),
                "-k", "retention"], installed, cwd=ROOT)
    from hybridize.testing.conformance import MODULE_CHECKS

    # every module check on both conformance specs (GQA; MQA with biases and q/k norms)
    assert f"{2 * len(MODULE_CHECKS)} passed" in out and "failed" not in out, out[-1500:]


def test_compare_runs_with_the_example_variant(installed, tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher", "llama", n_layer=3, seed=1)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"note {i}: the {i % 9} jars hold {i % 4} figs." for i in range(120)))
    cfg = {
        "teacher": str(teacher), "device": "cpu", "seed": 0,
        "data": {"train": str(tmp_path / "corpus.txt"), "seq_len": 32, "heldout_fraction": 0.1},
        "linear_attention": {"name": "retention", "decay_exponents": [4, 8]}, "softmax_layers": 1,
        "selection": {"stop": {"name": "fixed-budget"}, "probe_tokens": 256, "eval_every": 1},
        "distill": {"stage1_tokens": 512, "stage2_tokens": 256, "batch_size": 8, "eval_blocks": 2},
        "compare": {"selectors": ["kl-greedy-add", "uniform"], "softmax_layers": [1], "seeds": [0]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    _run(["-m", "hybridize", "compare", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--quiet"], installed)
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["linear_attention"] == "retention"
    assert result["plugins"].get("hybridize-retention") == "0.1.0" or "hybridize-retention" in json.dumps(result["plugins"])
    assert {r["selector"] for r in result["rows"]} == {"kl-greedy-add", "uniform"}
    assert all(r["metrics"]["heldout_kl"] >= 0 for r in result["rows"])
