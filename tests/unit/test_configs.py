"""Every config shipped in configs/ is a valid run (and compare) config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hybridize.distill.batches import stage1_batch
from hybridize.recipes.compare import compare_config_from_dict
from hybridize.recipes.runconfig import load_run_config, run_config_from_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    text = path.read_text()
    if "../shared/" in text and not Path("../shared").is_dir():
        pytest.skip(f"{path.name} reads ../shared (real data beside the checkout), which is absent here")
    tree = yaml.safe_load(text)
    if "compare" in tree:
        base, ccfg = compare_config_from_dict(tree)
        assert ccfg.selectors
    else:
        base = run_config_from_dict(tree)
    assert base.teacher
    assert load_run_config(path) == base  # `hybridize run FILE` reads the same run (a compare section is left out)


def test_paper_configs_follow_the_paper():
    for name, n_layers in (("paper_qwen2.5-3b-instruct.yaml", 36), ("paper_llama-3.2-3b-instruct.yaml", 28)):
        tree = yaml.safe_load((CONFIGS[0].parent / name).read_text())
        base, _ = compare_config_from_dict(tree)
        d = base.distill
        assert (d.stage1_tokens, d.stage1_seq_len, base.data.seq_len, d.stage2_tokens) == (100_000_000, 512, 4096, 600_000_000)
        assert (d.stage1_lr, d.stage2_lr_attn, d.stage2_lr_other) == (1e-3, 1e-4, 7e-6)
        s1 = stage1_batch(d, base.data.seq_len)
        assert (s1.batch_size, s1.seq_len, s1.micro_batch_size) == (96, 512, 16)  # 96 x 512 per step, 2 x 4096 per forward
        assert base.softmax_layers == 0.25 and round(0.25 * n_layers) in (7, 9)
