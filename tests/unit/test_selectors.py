"""Layer selectors: the contract of every registered selector, then each built-in's own rule."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridize.errors import ConfigError, HybridizeError
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.contract import Probe, rank

_REGISTRY = get_plugin_manager().registry("selector")
SELECTORS = sorted(_REGISTRY)
NESTED = [n for n in SELECTORS if "nested" in _REGISTRY[n].capabilities]
SEEDED = [n for n in SELECTORS if "seeded" in _REGISTRY[n].capabilities]
BUILTINS = ["kl-greedy-add", "kl-greedy-remove", "mse-greedy-add", "random", "uniform", "swap-kl", "grad-sensitivity", "attention-entropy"]
SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module")
def registry():
    """The selector registry of a fresh manager with the installed plugins (read only)."""
    return get_plugin_manager().registry("selector")


def make(registry, name, seed=0):
    entry = registry[name]
    return entry.factory(entry.build_config({}), seed=seed)


def raw_for(selector, raw):
    """What the engine hands to ``importance``: nothing for selectors that need no scores."""
    return {} if selector.needs == "none" else raw


score = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, 0.5, 1.0, math.inf, -math.inf]),  # ties and diverged probes
)


@st.composite
def tables(draw, min_layers=2, max_layers=40):
    """(n_layers, K, raw score table covering every layer)."""
    n = draw(st.integers(min_layers, max_layers))
    k = draw(st.integers(1, n - 1))
    values = draw(st.lists(score, min_size=n, max_size=n))
    return n, k, dict(enumerate(values))


def test_builtins_registered_with_origin_hybridize(registry):
    assert set(BUILTINS) <= set(registry)
    for name in BUILTINS:
        entry = registry[name]
        assert entry.origin.distribution == "hybridize"
        assert entry.origin.module.startswith("hybridize.plugins.selectors.")
    assert {"kl-greedy-add", "kl-greedy-remove", "mse-greedy-add", "random"} <= set(NESTED)
    assert "random" in SEEDED


@pytest.mark.parametrize("name", SELECTORS, ids=SELECTORS)
@SETTINGS
@given(table=tables(), seed=st.integers(0, 2**31 - 1))
def test_selector_contract(registry, name, table, seed):
    n, k, raw = table
    sel = make(registry, name, seed)
    assert sel.needs in ("probes", "stage1", "teacher", "none")
    importance = sel.importance(raw_for(sel, raw), n, k)
    assert sorted(importance) == list(range(n))
    assert not any(math.isnan(v) for v in importance.values())
    top = rank(importance)[:k]
    assert len(top) == len(set(top)) == k
    assert all(0 <= l < n for l in top)
    again = make(registry, name, seed)  # same seed, fresh instance -> same answer
    assert again.importance(raw_for(again, raw), n, k) == importance
    assert sel.importance(raw_for(sel, raw), n, k) == importance  # and the same instance is stateless


@pytest.mark.parametrize("name", SELECTORS, ids=SELECTORS)
@pytest.mark.parametrize("n", [2, 3, 12, 40])
def test_plan(registry, name, n):
    sel = make(registry, name)
    probes = sel.plan(n)
    assert sel.plan(n) == probes
    if sel.needs != "probes":
        assert probes == []
        return
    assert sel.default_scorer is None or isinstance(sel.default_scorer, str)
    assert [p.layer for p in probes] == list(range(n))
    for p in probes:
        assert isinstance(p, Probe)
        assert list(p.softmax_layers) == sorted(set(p.softmax_layers))
        assert all(0 <= l < n for l in p.softmax_layers)


@pytest.mark.parametrize("name", NESTED, ids=NESTED)
@SETTINGS
@given(table=tables())
def test_top_k_nested_as_k_grows(registry, name, table):
    n, _, raw = table
    sel = make(registry, name)
    tops = [set(rank(sel.importance(raw_for(sel, raw), n, k))[:k]) for k in range(1, n)]
    assert all(a < b for a, b in zip(tops, tops[1:]))


@pytest.mark.parametrize("name", SEEDED, ids=SEEDED)
def test_seeded_selectors_depend_on_the_seed(registry, name):
    a, b = make(registry, name, seed=0), make(registry, name, seed=1)
    assert rank(a.importance({}, 20, 5)) != rank(b.importance({}, 20, 5))


# -- kl-greedy-add / kl-greedy-remove -------------------------------------------------------------
def test_kl_greedy_plans(registry):
    add, remove = make(registry, "kl-greedy-add"), make(registry, "kl-greedy-remove")
    assert (add.needs, add.default_scorer, remove.needs, remove.default_scorer) == ("probes", "kl", "probes", "kl")
    assert add.plan(4) == [Probe(layer=l, softmax_layers=(l,)) for l in range(4)]
    assert remove.plan(4) == [
        Probe(0, (1, 2, 3)), Probe(1, (0, 2, 3)), Probe(2, (0, 1, 3)), Probe(3, (0, 1, 2)),
    ]


def test_kl_greedy_add_ranks_lowest_kl_first(registry):
    kl = {0: 0.9, 1: 0.7, 2: 0.2, 3: 0.8, 4: 0.6}  # "only layer 2 softmax" recovers the teacher best
    ranking = rank(make(registry, "kl-greedy-add").importance(kl, 5, 2))
    assert ranking == [2, 4, 1, 3, 0]


def test_kl_greedy_remove_ranks_highest_kl_first(registry):
    kl = {0: 0.01, 1: 0.05, 2: 0.02, 3: 0.40, 4: 0.03}  # linearising layer 3 hurts most
    ranking = rank(make(registry, "kl-greedy-remove").importance(kl, 5, 2))
    assert ranking == [3, 1, 4, 2, 0]


@SETTINGS
@given(table=tables())
def test_kl_greedy_top_k_are_the_extreme_kls(registry, table):
    n, k, raw = table
    add = set(rank(make(registry, "kl-greedy-add").importance(raw, n, k))[:k])
    remove = set(rank(make(registry, "kl-greedy-remove").importance(raw, n, k))[:k])
    assert max(raw[l] for l in add) <= min(raw[l] for l in set(range(n)) - add)
    assert min(raw[l] for l in remove) >= max(raw[l] for l in set(range(n)) - remove)


def test_mse_greedy_add_keeps_worst_fitting_layers(registry):
    sel = make(registry, "mse-greedy-add")
    assert (sel.needs, sel.default_scorer, sel.plan(6)) == ("stage1", "mse", [])
    residual = {0: 0.1, 1: 0.9, 2: 0.3, 3: 0.5, 4: 0.05, 5: 0.2}
    assert rank(sel.importance(residual, 6, 2))[:2] == [1, 3]


@pytest.mark.parametrize("name", ["kl-greedy-add", "kl-greedy-remove", "mse-greedy-add"])
def test_raw_must_cover_every_layer(registry, name):
    sel = make(registry, name)
    with pytest.raises(HybridizeError, match=r"every layer 0\.\.3; got missing layers \[2\] and out-of-range layers \[7\]"):
        sel.importance({0: 1.0, 1: 2.0, 3: 0.5, 7: 0.1}, 4, 1)
    with pytest.raises(HybridizeError, match=r"NaN raw scores for layers \[1\]"):
        sel.importance({0: 1.0, 1: math.nan, 2: 0.5, 3: 0.1}, 4, 1)


# -- uniform ---------------------------------------------------------------------------------------
def uniform_top(registry, n, k):
    sel = make(registry, "uniform")
    return sorted(rank(sel.importance({}, n, k))[:k])


def test_uniform_standard_interleaving(registry):
    assert uniform_top(registry, 28, 7) == [3, 7, 11, 15, 19, 23, 27]
    assert uniform_top(registry, 24, 6) == [3, 7, 11, 15, 19, 23]
    assert uniform_top(registry, 8, 2) == [3, 7]
    assert uniform_top(registry, 5, 2) == [1, 4]  # round(2.5) = 2: groups of 2 and 3 layers


@SETTINGS
@given(table=tables())
def test_uniform_groups_are_even(registry, table):
    n, k, _ = table
    top = uniform_top(registry, n, k)
    assert top[-1] == n - 1
    sizes = [b - a for a, b in zip([-1, *top], top)]  # layers per group, each ending in a softmax layer
    assert set(sizes) <= {n // k, -(-n // k)}


def test_uniform_scores_every_layer_and_orders_deterministically(registry):
    importance = make(registry, "uniform").importance({}, 10, 3)
    assert sorted(importance) == list(range(10))
    assert len(set(importance.values())) > 3
    chosen = [l for l, v in importance.items() if v >= 1]
    assert chosen == uniform_top(registry, 10, 3)
    assert all(v < 0 for l, v in importance.items() if l not in chosen)


def test_uniform_rejects_k_out_of_range(registry):
    with pytest.raises(HybridizeError, match="1 <= K <= 4"):
        make(registry, "uniform").importance({}, 4, 0)


# -- random ----------------------------------------------------------------------------------------
def test_random_is_a_seeded_permutation(registry):
    a = make(registry, "random", seed=0).importance({}, 20, 5)
    b = make(registry, "random", seed=1).importance({}, 20, 5)
    assert sorted(a.values()) == sorted(b.values()) == [float(v) for v in range(1, 21)]
    assert rank(a) != rank(b)
    assert rank(a)[:5] != rank(b)[:5]
    assert make(registry, "random", seed=0).importance({}, 20, 5) == a


def test_selector_configs_reject_unknown_keys(registry):
    with pytest.raises(ConfigError, match="selector 'kl-greedy-add' has no field 'budget'"):
        registry["kl-greedy-add"].build_config({"budget": 3})


def test_hybridize_plugins_lists_the_proxies_and_the_distance_options(capsys):
    import json

    from hybridize.cli import main

    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    for name in ("swap-kl", "grad-sensitivity", "attention-entropy"):
        assert f"  {name}" in text.split("\nselector (")[1].split("\nscorer (")[0]
    assert "every selector also takes the distance options min_gap=1, gap_penalty=0.0, gap_radius=1" in text
    assert main(["plugins", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    proxies = {r["name"] for r in payload["components"]["selector"] if "proxy" in r["capabilities"]}
    assert proxies == {"swap-kl", "grad-sensitivity", "attention-entropy"}
    assert payload["selector_distance_params"] == {"min_gap": 1, "gap_penalty": 0.0, "gap_radius": 1}
