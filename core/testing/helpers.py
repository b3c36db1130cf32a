"""Building blocks of the conformance checks (:mod:`hybridize.testing.conformance`): small specs, random
teacher weights and inputs, variant construction, float64 comparisons and a minimal cache.

All names are re-exported by :mod:`hybridize.testing.conformance`, the public import path.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from hybridize.linear import AttentionSpec, LinearAttention, TeacherAttentionWeights
from hybridize.registry.entries import Entry

#: std of the noise added to every parameter after the teacher transfer, so that no part of a
#: variant (a pass-through convolution, a zero-initialised gate) hides behind its initial value
PERTURB = 0.2
#: relative tolerance of float64 equalities (chunk vs recurrent, decoding vs parallel, padding)
TOL = 1e-6


_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the previous count.

    The checks use tiny tensors: extra threads only add synchronisation, which on a loaded
    2-core machine made the suite ~30x slower.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _tiny(fn: _F) -> _F:
    """Decorator: run a check :func:`single_threaded`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_threaded():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- building blocks ------------------------------------------------------------------------

def make_spec(*, hidden_size: int = 32, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
              layer_idx: int = 0, **options: Any) -> AttentionSpec:
    """A small teacher attention spec (GQA by default); ``options`` sets biases, ``qk_norm`` ...."""
    return AttentionSpec(layer_idx=layer_idx, hidden_size=hidden_size, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, **options)


def full_spec() -> AttentionSpec:
    """A spec with one KV head (MQA) and every option on: q/k/v/o biases and q/k RMSNorm (Qwen2/3 style)."""
    return make_spec(num_kv_heads=1, q_bias=True, k_bias=True, v_bias=True, o_bias=True, qk_norm=True)


def random_teacher_weights(spec: AttentionSpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> TeacherAttentionWeights:
    """Random teacher weights for ``spec`` (biases and q/k norms only where the spec has them)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * std

    H, Hkv, D, hidden = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    std_in, std_out = hidden ** -0.5, (H * D) ** -0.5
    return TeacherAttentionWeights(
        spec=spec,
        q_weight=rnd(H * D, hidden, std=std_in), k_weight=rnd(Hkv * D, hidden, std=std_in),
        v_weight=rnd(Hkv * D, hidden, std=std_in), o_weight=rnd(hidden, H * D, std=std_out),
        q_bias=rnd(H * D, std=0.1) if spec.q_bias else None,
        k_bias=rnd(Hkv * D, std=0.1) if spec.k_bias else None,
        v_bias=rnd(Hkv * D, std=0.1) if spec.v_bias else None,
        o_bias=rnd(hidden, std=0.1) if spec.o_bias else None,
        q_norm=1 + rnd(D, std=0.1) if spec.qk_norm else None,
        k_norm=1 + rnd(D, std=0.1) if spec.qk_norm else None,
    )


def build_variant(variant: Entry | type, config: Any = None, spec: AttentionSpec | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.float64, *, perturb: float = 0.0) -> LinearAttention:
    """Build a variant module from random teacher weights, in eval mode.

    Args:
        variant: a registry entry or a ``LinearAttention`` subclass.
        config: the variant's config; None = the entry's defaults (a class gets ``None``).
        spec: teacher spec, :func:`make_spec` when None.
        seed: seeds the module's own init and the teacher weights (the global RNG is left alone).
        dtype: the module's dtype.
        perturb: std of noise added to every parameter after the teacher transfer.
    """
    spec = spec or make_spec()
    factory = variant.factory if isinstance(variant, Entry) else variant
    if config is None and isinstance(variant, Entry):
        config = variant.build_config({})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory(spec, config)
        module.load_teacher_weights(random_teacher_weights(spec, seed))
        if perturb:
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * perturb)
    return module.to(dtype).eval()


def random_inputs(spec: AttentionSpec, B: int = 2, T: int = 20, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                  scale: float = 1.0) -> torch.Tensor:
    """Random layer inputs ``(B, T, hidden)``."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(B, T, spec.hidden_size, generator=gen, dtype=dtype) * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str, tol: float = TOL) -> None:
    """``max|actual - expected| <= tol * max(1, max|expected|)``, else AssertionError naming ``what``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    ref = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    if not err <= tol * ref:  # also catches NaN
        raise AssertionError(f"{what}: max |difference| = {err:.3e} exceeds {tol:.0e} * {ref:.3g}")


def assert_states_close(actual: Any, expected: Any, *, what: str, tol: float = TOL, rows: slice | int | None = None) -> None:
    """Compare two state dicts key by key (optionally only batch ``rows`` of ``actual``)."""
    if not isinstance(actual, dict) or not isinstance(expected, dict):
        raise AssertionError(f"{what}: states must be dicts of tensors; got {type(actual).__name__} and {type(expected).__name__}")
    if set(actual) != set(expected):
        raise AssertionError(f"{what}: state keys {sorted(actual)} != {sorted(expected)}")
    for key in sorted(expected):
        a = actual[key] if rows is None else actual[key][rows]
        assert_close(a, expected[key].reshape(a.shape), what=f"{what}, state[{key!r}]", tol=tol)


class DictCache:
    """The smallest cache the Hugging Face adapter of :class:`LinearAttention` accepts."""

    def __init__(self) -> None:
        self.states: dict[int, Any] = {}
        self.seen: dict[int, int] = {}

    def get_linear_state(self, layer_idx: int) -> Any:
        return self.states.get(layer_idx)

    def set_linear_state(self, layer_idx: int, state: Any, num_tokens: int) -> None:
        self.states[layer_idx] = state
        self.seen[layer_idx] = self.seen.get(layer_idx, 0) + num_tokens


def random_op_inputs(op: str, B: int, T: int, H: int, K: int, V: int, *, seed: int = 0,
                     dtype: torch.dtype = torch.float64, decay: float = 1.0) -> dict[str, torch.Tensor]:
    """Random inputs of ``gdn`` (q, k, v, g, beta) or ``gla`` (q, k, v, gk), plus ``initial_state``.

    Keys are L2-normalised for ``gdn`` (the delta rule's regime); ``decay`` scales the log-decays.
    """
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V), "initial_state": rnd(B, H, K, V) * 0.5}
    if op == "gdn":
        x["k"] = F.normalize(x["k"], dim=-1)
        x["g"] = F.logsigmoid(rnd(B, T, H) + 2.0) * decay
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    elif op == "gla":
        x["gk"] = F.logsigmoid(rnd(B, T, H, K) + 2.0) * decay
    else:
        raise ValueError(f"random_op_inputs field 'op' must be 'gdn' or 'gla'; got {op!r}")
    return x
