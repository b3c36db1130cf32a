"""Stop criteria: fixed-budget never stops; rolling-jaccard stops exactly when its rule first holds."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridize.errors import ConfigError, HybridizeError
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.contract import mean_pairwise_jaccard

STOPS = sorted(get_plugin_manager().registry("stop_criterion"))
SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager().registry("stop_criterion")


def make(registry, name, k, **params):
    entry = registry[name]
    return entry.factory(entry.build_config(params), k=k)


def decisions(crit, seq):
    return [crit.update(frozenset(s)) for s in seq]


def first_stop(crit, seq):
    """Index of the first window at which ``crit`` says stop, or None."""
    return next((i for i, d in enumerate(decisions(crit, seq)) if d), None)


def test_builtins_registered(registry):
    assert {"fixed-budget", "rolling-jaccard"} <= set(registry)
    for name in ("fixed-budget", "rolling-jaccard"):
        assert registry[name].origin.distribution == "hybridize"
        assert registry[name].origin.module.startswith("hybridize.plugins.stopping.")
    assert "early-stop" in registry["rolling-jaccard"].capabilities


@pytest.mark.parametrize("name", STOPS, ids=STOPS)
def test_state_dict_is_json_and_round_trips(registry, name):
    seq = [{0, 1}, {0, 2}, {0, 1}, {0, 1}]
    crit = make(registry, name, 2)
    decisions(crit, seq)
    state = json.loads(json.dumps(crit.state_dict()))
    fresh = make(registry, name, 2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == crit.state_dict()


def test_fixed_budget_never_stops(registry):
    crit = make(registry, "fixed-budget", 3)
    assert not any(decisions(crit, [{0, 1, 2}] * 50))
    assert crit.state_dict() == {"windows_seen": 50}
    fresh = make(registry, "fixed-budget", 3)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.windows_seen == 50 and fresh.update(frozenset({0, 1, 2})) is False


# -- rolling-jaccard: scripted sequences -----------------------------------------------------------
A, B = {0, 1, 2, 3}, {0, 1, 2, 4}  # J(A, B) = 3/5
NOISY_THEN_SETTLED = [{4, 5, 6, 7}, {0, 5, 6, 7}, {0, 1, 6, 7}, A, B, A, A, A, A, A]


def test_stops_at_the_first_window_where_the_rule_holds(registry):
    # window 6 = [A, B, A, A]: backbone {0, 1, 2} (K-1 = 3), mean Jaccard (3 * 0.6 + 3 * 1) / 6 = 0.8
    crit = make(registry, "rolling-jaccard", 4, windows=4, threshold=0.75)
    assert first_stop(crit, NOISY_THEN_SETTLED) == 6
    # at 0.85, [A, B, A, A] and [B, A, A, A] (0.8) are not enough: the first all-A window is 8
    crit = make(registry, "rolling-jaccard", 4, windows=4, threshold=0.85)
    assert first_stop(crit, NOISY_THEN_SETTLED) == 8
    assert crit.history == [frozenset(s) for s in NOISY_THEN_SETTLED]


def test_never_stops_before_windows_sets(registry):
    same = [{1, 5, 9}] * 20
    assert first_stop(make(registry, "rolling-jaccard", 3), same) == 9  # default windows = 10
    assert first_stop(make(registry, "rolling-jaccard", 3, windows=2), same) == 1
    assert first_stop(make(registry, "rolling-jaccard", 3, windows=2, min_windows=7), same) == 6


def test_backbone_rule_blocks_a_high_jaccard_window(registry):
    # K = 7, default windows 10 and threshold 0.9: two windows each drop a different core layer
    core = set(range(7))
    drop0, drop1 = (core - {0}) | {10}, (core - {1}) | {11}
    seq = [core, core, drop0, core, core, core, core, drop1, core, core]
    assert mean_pairwise_jaccard(seq) >= 0.9  # (28 + 16 * 0.75 + 5/9) / 45 = 0.901
    assert len(set.intersection(*seq)) == 5  # < K - 1 = 6
    crit = make(registry, "rolling-jaccard", 7)
    assert not any(decisions(crit, seq))
    # once drop0 leaves the last 10 windows the backbone is 6 = K-1 and the rule holds
    assert decisions(crit, [core, core, core]) == [False, False, True]


def test_k_equal_one(registry):
    crit = make(registry, "rolling-jaccard", 1, windows=3, threshold=0.9)
    assert first_stop(crit, [{0}, {3}, {2}, {2}, {2}, {2}]) == 4


@st.composite
def sequences(draw):
    """(K, a sequence of top-K sets drawn from a small pool, so that it sometimes settles)."""
    k = draw(st.integers(1, 4))
    pool = draw(st.lists(st.frozensets(st.integers(0, 7), min_size=k, max_size=k), min_size=1, max_size=3))
    return k, draw(st.lists(st.sampled_from(pool), min_size=1, max_size=30))


def reference_rule(history, k, windows, threshold):
    """The rule restated from DESIGN.md, from scratch on the whole history."""
    if len(history) < windows:
        return False
    last = [set(s) for s in history[-windows:]]
    return len(set.intersection(*last)) >= k - 1 and mean_pairwise_jaccard(last) >= threshold - 1e-12


@SETTINGS
@given(seq=sequences(), windows=st.integers(2, 6), threshold=st.sampled_from([0.5, 0.75, 0.9, 1.0]))
def test_matches_the_rule_at_every_window(registry, seq, windows, threshold):
    k, sets = seq
    crit = make(registry, "rolling-jaccard", k, windows=windows, threshold=threshold)
    got = decisions(crit, sets)
    assert got == [reference_rule(sets[: i + 1], k, windows, threshold) for i in range(len(sets))]
    assert not any(got[: windows - 1])


@SETTINGS
@given(seq=sequences(), split=st.integers(0, 30), windows=st.integers(2, 6))
def test_resumed_criterion_decides_the_same(registry, seq, split, windows):
    k, sets = seq
    split = min(split, len(sets))
    whole = make(registry, "rolling-jaccard", k, windows=windows, threshold=0.75)
    expected = decisions(whole, sets)
    first = make(registry, "rolling-jaccard", k, windows=windows, threshold=0.75)
    decisions(first, sets[:split])
    state = json.loads(json.dumps(first.state_dict()))
    assert all(s == sorted(s) and all(isinstance(l, int) for l in s) for s in state["history"])
    resumed = make(registry, "rolling-jaccard", k, windows=windows, threshold=0.75)
    resumed.load_state_dict(state)
    assert decisions(resumed, sets[split:]) == expected[split:]
    assert resumed.history == whole.history


def test_wrong_k_is_an_error(registry):
    crit = make(registry, "rolling-jaccard", 3)
    with pytest.raises(HybridizeError, match=r"K = 3 layers; got \[1, 2\]"):
        crit.update(frozenset({1, 2}))
    other = make(registry, "rolling-jaccard", 2)
    with pytest.raises(HybridizeError, match="saved with K = 3; this selection has K = 2"):
        other.load_state_dict(crit.state_dict())
    with pytest.raises(ConfigError, match="'rolling-jaccard' needs the budget K to be an int >= 1; got 0"):
        make(registry, "rolling-jaccard", 0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"threshold": 1.5}, "stop_criterion 'rolling-jaccard' field 'threshold' must be <= 1.0; got 1.5"),
        ({"threshold": 0.0}, "field 'threshold' must be > 0.0; got 0.0"),
        ({"windows": 1}, "field 'windows' must be >= 2; got 1"),
        ({"min_windows": -1}, "field 'min_windows' must be >= 0; got -1"),
        ({"windows": "ten"}, "field 'windows' must be int; got 'ten'"),
        ({"window": 5}, "has no field 'window'. Did you mean 'windows'?"),
    ],
)
def test_config_errors_name_the_field(registry, params, message):
    with pytest.raises(ConfigError) as exc:
        registry["rolling-jaccard"].build_config(params)
    assert message in str(exc.value)


def test_config_defaults(registry):
    cfg = registry["rolling-jaccard"].build_config({"threshold": 1})
    assert (cfg.windows, cfg.threshold, cfg.min_windows) == (10, 1.0, 0)
