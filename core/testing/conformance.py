"""Conformance checks for linear-attention variants, reusable by third-party plugin authors.

Every check builds the variant on a small GQA teacher spec, runs it on CPU in float64 with
``backend="torch"``, and raises ``AssertionError`` with a message naming what differed::

    from hybridize import get_plugin_manager
    from hybridize.testing.conformance import run_all

    run_all(get_plugin_manager().registry("linear_attention")["my-variant"])

A variant is given as a registry :class:`~hybridize.registry.entries.Entry` (its config is built from
``{}`` unless ``config`` is passed) or as a ``LinearAttention`` subclass (called as
``cls(spec, config)``). The op-level checks test the torch chunked recurrences against their
``naive_recurrent_*`` references.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hybridize.linear import AttentionSpec, LinearAttention
from hybridize.registry.entries import Entry
from hybridize.testing.helpers import (  # noqa: F401 - the building blocks are public here too
    PERTURB, TOL, DictCache, _tiny, assert_close, assert_states_close, build_variant, full_spec, make_spec,
    random_inputs, random_op_inputs, random_teacher_weights, single_threaded,
)


def _build(variant: Entry | type, config: Any, spec: AttentionSpec | None, seed: int, **kw: Any) -> LinearAttention:
    return build_variant(variant, config, spec, seed, perturb=kw.pop("perturb", PERTURB), **kw)


def _name(variant: Entry | type) -> str:
    return variant.name if isinstance(variant, Entry) else variant.__name__


# -- module checks --------------------------------------------------------------------------

@_tiny
def check_shapes(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None, seed: int = 0) -> None:
    """Output shape and dtype equal the input's in both modes; a state only when asked for."""
    name, spec = _name(variant), spec or make_spec()
    for dtype in (torch.float64, torch.float32):
        mod = _build(variant, config, spec, seed, dtype=dtype)
        x = random_inputs(spec, 2, 7, seed=seed, dtype=dtype)
        for mode in ("chunk", "recurrent"):
            y, state = mod.mix(x, mode=mode, backend="torch")
            if y.shape != x.shape or y.dtype != x.dtype:
                raise AssertionError(f"{name} ({mode}): output {tuple(y.shape)} {y.dtype}; expected {tuple(x.shape)} {x.dtype}")
            if state is not None:
                raise AssertionError(f"{name} ({mode}): returned a state although output_state=False")
        _, state = mod.mix(x, output_state=True, backend="torch")
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) and t.shape[0] == 2 for t in state.values()):
            raise AssertionError(f"{name}: output_state=True must return a dict of (B, ...) tensors; got {state!r:.200}")
        out = mod(x)
        if not (isinstance(out, tuple) and out[0].shape == x.shape):
            raise AssertionError(f"{name}: forward (Hugging Face signature) must return (output (B, T, hidden), None)")


@_tiny
def check_causal(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None, seed: int = 0) -> None:
    """Perturbing tokens after t leaves outputs up to t unchanged, and does change output t+1."""
    name, spec = _name(variant), spec or make_spec()
    mod, T = _build(variant, config, spec, seed), 20
    x = random_inputs(spec, 2, T, seed=seed)
    y, _ = mod.mix(x, mode="chunk", backend="torch")
    gen = torch.Generator().manual_seed(seed)
    for t in (0, 7, T - 2):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn(x2[:, t + 1:].shape, generator=gen, dtype=x.dtype)
        y2, _ = mod.mix(x2, mode="chunk", backend="torch")
        assert_close(y2[:, : t + 1], y[:, : t + 1], what=f"{name}: outputs <= {t} after changing tokens > {t}", tol=1e-12)
        if torch.equal(y2[:, t + 1], y[:, t + 1]):
            raise AssertionError(f"{name}: output {t + 1} does not depend on input {t + 1}")


@_tiny
def check_chunk_matches_recurrent(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None,
                                  seed: int = 0, T: int = 70) -> None:
    """mode="chunk" equals mode="recurrent" (float64, torch backend), fresh and from a state."""
    name, spec = _name(variant), spec or make_spec()
    mod = _build(variant, config, spec, seed)
    x = random_inputs(spec, 2, T + 5, seed=seed)
    runs = {}
    for mode in ("chunk", "recurrent"):
        y0, s0 = mod.mix(x[:, :T], mode=mode, backend="torch", output_state=True)
        y1, s1 = mod.mix(x[:, T:], state=s0, mode=mode, backend="torch", output_state=True)
        runs[mode] = (y0, s0, y1, s1)
    (c0, cs0, c1, cs1), (r0, rs0, r1, rs1) = runs["chunk"], runs["recurrent"]
    assert_close(c0, r0, what=f"{name}: chunk vs recurrent output (T={T})")
    assert_states_close(cs0, rs0, what=f"{name}: chunk vs recurrent final state (T={T})")
    assert_close(c1, r1, what=f"{name}: chunk vs recurrent output continuing from a state")
    assert_states_close(cs1, rs1, what=f"{name}: chunk vs recurrent state continuing from a state")


@_tiny
def check_decoding_matches_parallel(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None,
                                    seed: int = 0) -> None:
    """Prefix (chunk) -> block (chunk, with state) -> single tokens through ``forward`` with a cache
    equals one parallel forward, outputs and final state."""
    name, spec = _name(variant), spec or make_spec()
    mod, T, P1, P2 = _build(variant, config, spec, seed), 24, 9, 17
    x = random_inputs(spec, 2, T, seed=seed)
    full, full_state = mod.mix(x, mode="chunk", backend="torch", output_state=True)
    y1, state = mod.mix(x[:, :P1], mode="chunk", backend="torch", output_state=True)
    y2, state = mod.mix(x[:, P1:P2], state=state, mode="chunk", backend="torch", output_state=True)
    cache = DictCache()
    cache.set_linear_state(spec.layer_idx, state, P2)
    steps = [mod(x[:, t : t + 1], past_key_values=cache)[0] for t in range(P2, T)]
    assert_close(torch.cat([y1, y2, *steps], dim=1), full, what=f"{name}: decoding token by token vs parallel forward")
    assert_states_close(cache.get_linear_state(spec.layer_idx), full_state, what=f"{name}: state after decoding vs parallel")
    if cache.seen[spec.layer_idx] != T:
        raise AssertionError(f"{name}: forward must report {T - P2} decoded tokens to the cache; got {cache.seen[spec.layer_idx] - P2}")


@_tiny
def check_padding(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None, seed: int = 0) -> None:
    """A padded batch (left-padded, right-padded and full rows, junk in the padding) equals each row
    run alone on its real tokens: outputs there and the final state, in both modes."""
    name, spec = _name(variant), spec or make_spec()
    mod, T = _build(variant, config, spec, seed), 20
    x = random_inputs(spec, 3, T, seed=seed)
    real = [slice(6, T), slice(0, T - 5), slice(0, T)]  # left-padded, right-padded, full
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(real):
        mask[i, r] = 1
    for mode in ("chunk", "recurrent"):
        y, state = mod.mix(x, padding_mask=mask, mode=mode, backend="torch", output_state=True)
        for i, r in enumerate(real):
            yi, si = mod.mix(x[i : i + 1, r], mode=mode, backend="torch", output_state=True)
            what = f"{name} ({mode}): padded row {i} (real tokens {r.start}..{r.stop - 1})"
            assert_close(y[i : i + 1, r], yi, what=f"{what}, outputs")
            assert_states_close(state, si, what=f"{what}, final state", rows=slice(i, i + 1))


@_tiny
def check_gradients_finite(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None,
                           seed: int = 0) -> None:
    """float32, chunk mode, large inputs and a padded row: every trainable parameter and the input
    get finite gradients, through the outputs and the final state."""
    name, spec = _name(variant), spec or make_spec()
    mod = _build(variant, config, spec, seed, dtype=torch.float32).train()
    x = random_inputs(spec, 2, 70, seed=seed, dtype=torch.float32, scale=5.0).requires_grad_(True)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :9] = 0
    y, state = mod.mix(x, padding_mask=mask, mode="chunk", backend="torch", output_state=True)
    loss = y.square().mean() + sum(s.float().square().mean() for s in state.values())
    loss.backward()
    if not torch.isfinite(x.grad).all():
        raise AssertionError(f"{name}: non-finite gradient w.r.t. the input")
    missing = [n for n, p in mod.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in mod.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if missing or bad:
        raise AssertionError(f"{name}: parameters without gradient {missing}, with non-finite gradient {bad}")


@_tiny
def check_teacher_weights_loaded(variant: Entry | type, *, config: Any = None, spec: AttentionSpec | None = None,
                                 seed: int = 0) -> None:
    """q_proj/o_proj equal the teacher's; k_proj/v_proj hold, head by head, the teacher's KV head
    that serves that query head (GQA); biases and q/k norms likewise."""
    name, spec = _name(variant), spec or full_spec()
    mod = _build(variant, config, spec, seed, perturb=0.0)
    w = random_teacher_weights(spec, seed)
    for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(mod, attr, None), nn.Module):
            raise AssertionError(f"{name}: expected a {attr!r} projection (Hugging Face / fla names) to hold the teacher's weights")
    same = lambda a, b, what: _assert_equal(a, b, f"{name}: {what}")  # noqa: E731
    same(mod.q_proj.weight, w.q_weight, "q_proj.weight vs teacher q")
    same(mod.o_proj.weight, w.o_weight, "o_proj.weight vs teacher o")
    if spec.q_bias:
        same(mod.q_proj.bias, w.q_bias, "q_proj.bias vs teacher")
    if spec.o_bias:
        same(mod.o_proj.bias, w.o_bias, "o_proj.bias vs teacher")
    D, g = spec.head_dim, spec.kv_groups
    for h in range(spec.num_heads):
        rows, kv = slice(h * D, (h + 1) * D), slice((h // g) * D, (h // g + 1) * D)
        for proj, weight, bias, has_bias in (("k", w.k_weight, w.k_bias, spec.k_bias), ("v", w.v_weight, w.v_bias, spec.v_bias)):
            layer = getattr(mod, f"{proj}_proj")
            same(layer.weight[rows], weight[kv], f"{proj}_proj head {h} vs teacher KV head {h // g}")
            if has_bias:
                same(layer.bias[rows], bias[kv], f"{proj}_proj.bias head {h} vs teacher KV head {h // g}")
    if mod.spec.qk_norm:  # a variant may leave the norms out by config; its own spec then says qk_norm=False
        for norm, ref in (("q_norm", w.q_norm), ("k_norm", w.k_norm)):
            if not hasattr(mod, norm):
                raise AssertionError(f"{name}: the teacher has q/k RMSNorm; expected a {norm!r} holding its weight")
            same(getattr(mod, norm).weight, ref, f"{norm}.weight vs teacher")


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual is None or actual.shape != expected.shape or not torch.equal(actual.detach().double(), expected.double()):
        got = None if actual is None else tuple(actual.shape)
        raise AssertionError(f"{what}: not equal (shape {got} vs {tuple(expected.shape)})")


MODULE_CHECKS: tuple[Callable[..., None], ...] = (
    check_shapes,
    check_causal,
    check_chunk_matches_recurrent,
    check_decoding_matches_parallel,
    check_padding,
    check_gradients_finite,
    check_teacher_weights_loaded,
)


def run_all(variant: Entry | type, *, config: Any = None, specs: tuple[AttentionSpec, ...] | None = None,
            seed: int = 0) -> list[str]:
    """Run every module check on each spec (GQA, and all options on); return the names run."""
    specs = specs or (make_spec(), full_spec())
    done = []
    for spec in specs:
        for check in MODULE_CHECKS:
            check(variant, config=config, spec=spec, seed=seed)
            done.append(check.__name__)
    return done


# -- op checks ------------------------------------------------------------------------------

@_tiny
def check_op_chunk_matches_naive(op: str, *, B: int = 2, T: int = 37, H: int = 2, K: int = 8, V: int = 4,
                                 chunk_size: int = 16, seed: int = 0, decay: float = 1.0, tol: float = TOL) -> None:
    """The torch chunked op equals its naive recurrence in float64 (output and final state,
    with an initial state), and the public op's ``chunk`` and ``recurrent`` modes agree."""
    from hybridize.ops import delta_rule, gla

    x = random_op_inputs(op, B, T, H, K, V, seed=seed, decay=decay)
    h0 = x.pop("initial_state")
    args = tuple(x.values())
    naive, chunk, public = (
        (delta_rule.naive_recurrent_gated_delta_rule, delta_rule.chunk_gated_delta_rule_torch, delta_rule.gated_delta_rule)
        if op == "gdn" else (gla.naive_recurrent_gla, gla.chunk_gla_torch, gla.gla)
    )
    what = f"{op} B={B} T={T} H={H} K={K} V={V} chunk={chunk_size} decay={decay}"
    o_ref, s_ref = naive(*args, initial_state=h0, output_final_state=True)
    o, s = chunk(*args, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    assert_close(o, o_ref, what=f"{what}: chunk vs naive output", tol=tol)
    assert_close(s, s_ref, what=f"{what}: chunk vs naive final state", tol=tol)
    kw = dict(initial_state=h0, output_final_state=True, backend="torch", chunk_size=chunk_size)
    o_c, s_c = public(*args, mode="chunk", **kw)
    o_r, s_r = public(*args, mode="recurrent", **kw)
    assert_close(o_c, o_r, what=f"{what}: {public.__name__} chunk vs recurrent output", tol=tol)
    assert_close(s_c, s_r, what=f"{what}: {public.__name__} chunk vs recurrent state", tol=tol)
