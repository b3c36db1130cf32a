"""Distance regularisation of the top-K choice (min_gap, gap_penalty) and the Spearman rank correlation."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridize.errors import ConfigError, HybridizeError
from hybridize.registry.manager import get_plugin_manager
from hybridize.recipes.runconfig import run_config_from_dict
from hybridize.selection.contract import ChoiceConfig, build_selector_configs, choose, rank, spearman

SETTINGS = settings(max_examples=60, deadline=None)
score = st.one_of(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), st.sampled_from([0.0, 1.0, math.inf, -math.inf]))


@st.composite
def gapped(draw):
    """(importance over n layers, K, min_gap) with K layers min_gap apart possible."""
    n = draw(st.integers(2, 24))
    gap = draw(st.integers(1, n))
    room = (n - 1) // gap + 1
    k = draw(st.integers(1, min(room, n - 1)))
    values = draw(st.lists(score, min_size=n, max_size=n))
    return dict(enumerate(values)), k, gap


def test_defaults_are_the_plain_top_k():
    imp = {0: 0.5, 1: 0.9, 2: 0.1, 3: 0.9, 4: -1.0}
    assert not ChoiceConfig().active
    assert choose(imp, 2) == choose(imp, 2, ChoiceConfig()) == sorted(rank(imp)[:2]) == [1, 3]


@SETTINGS
@given(case=gapped())
def test_min_gap_is_respected(case):
    imp, k, gap = case
    picked = choose(imp, k, ChoiceConfig(min_gap=gap))
    assert len(picked) == len(set(picked)) == k
    assert all(b - a >= gap for a, b in zip(picked, picked[1:]))
    assert choose(imp, k, ChoiceConfig(min_gap=gap)) == picked  # deterministic


@SETTINGS
@given(case=gapped())
def test_min_gap_keeps_the_top_k_when_it_is_already_spread(case):
    imp, k, gap = case
    top = sorted(rank(imp)[:k])
    if all(b - a >= gap for a, b in zip(top, top[1:])):
        assert choose(imp, k, ChoiceConfig(min_gap=gap)) == top


def test_min_gap_skips_neighbours_and_leaves_room():
    imp = {0: 0.2, 1: 1.0, 2: 0.9, 3: 0.8, 4: 0.1}
    assert choose(imp, 2, ChoiceConfig(min_gap=2)) == [1, 3]  # 2 is adjacent to 1
    # K=3 among 5 at gap 2 fits only {0, 2, 4}: the best layer (1) cannot be kept
    assert choose(imp, 3, ChoiceConfig(min_gap=2)) == [0, 2, 4]


def test_penalty_changes_picks_as_specified():
    imp = {0: 1.0, 1: 0.9, 2: 0.2, 3: 0.8}  # spread = 0.8
    assert choose(imp, 2) == [0, 1]
    # an adjacent pick costs gap_penalty x spread: 0.9 - 0.1 * 0.8 = 0.82 > 0.8 keeps layer 1 ...
    assert choose(imp, 2, ChoiceConfig(gap_penalty=0.1)) == [0, 1]
    # ... 0.9 - 0.2 * 0.8 = 0.74 < 0.8 gives layer 3
    assert choose(imp, 2, ChoiceConfig(gap_penalty=0.2)) == [0, 3]
    # radius 2: distance 1 costs the full penalty, distance 2 half of it: 0.9 - 0.16 = 0.74, 0.2 - 0.08, 0.8 - 0
    assert choose(imp, 2, ChoiceConfig(gap_penalty=0.2, gap_radius=2)) == [0, 3]
    # soft: the third pick is layer 1 after all (0.9 - 0.16 = 0.74 beats layer 2's 0.2 - 0.16, next to 3)
    assert choose(imp, 3, ChoiceConfig(gap_penalty=0.2)) == [0, 1, 3]


def test_penalty_is_in_units_of_the_score_range():
    imp = {0: 1.0, 1: 0.9, 2: 0.2, 3: 0.8}
    scaled = {l: 1000 * v - 5 for l, v in imp.items()}
    for penalty in (0.05, 0.2, 1.0):
        assert choose(scaled, 2, ChoiceConfig(gap_penalty=penalty)) == choose(imp, 2, ChoiceConfig(gap_penalty=penalty))


def test_impossible_gap_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"selector 'kl-greedy-add' field 'min_gap' must leave room for K=3 softmax layers among 5 "
                                          r"\(min_gap=3 fits at most 2\); got 3. Lower min_gap to at most 2 or K to at most 2"):
        ChoiceConfig(min_gap=3).check(5, 3, "kl-greedy-add")
    ChoiceConfig(min_gap=2).check(5, 3, "kl-greedy-add")  # {0, 2, 4} fits
    with pytest.raises(HybridizeError, match="cannot choose K=2 layers min_gap=3 apart"):
        choose({0: 1.0, 1: 0.5, 2: 0.2}, 2, ChoiceConfig(min_gap=3))  # e.g. after failed probes left few layers


def test_distance_options_are_selector_params():
    reg = get_plugin_manager().registry("selector")
    config, choice = build_selector_configs(reg["kl-greedy-add"], {"min_gap": 2, "gap_penalty": 0.5})
    assert choice == ChoiceConfig(min_gap=2, gap_penalty=0.5) and choice.to_dict() == {"min_gap": 2, "gap_penalty": 0.5}
    with pytest.raises(ConfigError) as err:
        build_selector_configs(reg["uniform"], {"min_gap": 0, "gap_penalty": -1.0, "bogus": 1})
    text = str(err.value)
    assert "selector 'uniform' field 'min_gap' must be >= 1; got 0" in text
    assert "selector 'uniform' has no field 'bogus'" in text


def test_run_config_reports_bad_distance_options(tmp_path):
    tree = {"teacher": "t", "data": {"train": "x.txt"}, "selection": {"selector": {"name": "swap-kl", "min_gap": "two"}}}
    with pytest.raises(ConfigError, match="selector 'swap-kl' field 'min_gap' must be int; got 'two'"):
        run_config_from_dict(tree)
    tree["selection"]["selector"]["min_gap"] = 2
    assert run_config_from_dict(tree).selection.selector.params == {"min_gap": 2}


# -- Spearman --------------------------------------------------------------------------------------
def test_spearman_simple_cases():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    assert spearman(a, {0: 10.0, 1: 20.0, 2: 25.0, 3: 100.0}) == pytest.approx(1.0)
    assert spearman(a, {0: 4.0, 1: 3.0, 2: 2.0, 3: 1.0}) == pytest.approx(-1.0)
    assert spearman(a, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}) is None  # constant: undefined
    assert spearman({0: 1.0}, {0: 2.0}) is None
    assert spearman(a, {0: 1.0, 5: 2.0}) is None  # one common layer


@SETTINGS
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)), min_size=3, max_size=30))
def test_spearman_matches_scipy(pairs):
    from scipy.stats import spearmanr

    a = {i: float(x) for i, (x, _) in enumerate(pairs)}
    b = {i: float(y) for i, (_, y) in enumerate(pairs)}
    ours = spearman(a, b)
    if len(set(a.values())) < 2 or len(set(b.values())) < 2:
        assert ours is None
    else:
        assert ours == pytest.approx(spearmanr(list(a.values()), list(b.values())).statistic, abs=1e-9)
