"""The linear-attention layers of a saved hybrid in plain torch, for stock tools: no import of hybridize.

``save_hybrid`` writes this file and ``modeling_hybridize.py`` beside a hybrid's weights, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and so ``lm_eval --model hf``) loads
it where hybridize is not installed. It implements hybridize's built-in ``gdn`` and ``gla`` variants with
the same parameter names and arithmetic (a chunked pure-torch form; fla's Triton kernels on CUDA when fla
imports). hybridize's own classes are the reference: ``tests/unit/test_remote_code.py`` compares the two on
every option and every supported teacher family, and fails when :data:`OPTIONS` and the plugins' configs
part ways, so one cannot change without the other.

Shapes: q, k (B, T, H, K); v (B, T, H, V); recurrent state (B, H, K, V) in fp32 (float64 stays).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the options of each variant this file computes, with hybridize's defaults; a hybrid saved with an option
#: that is not here is refused (this file would compute something else than hybridize does)
OPTIONS: dict[str, dict[str, Any]] = {
    "gdn": {"use_short_conv": True, "conv_size": 4, "conv_activation": "silu", "conv_init": "identity", "use_gate": True,
            "allow_neg_eigval": False, "qk_norm": True, "norm_eps": 1e-5, "chunk_size": 64, "backend": "auto"},
    "gla": {"use_short_conv": False, "conv_size": 4, "conv_activation": "silu", "conv_init": "identity",
            "gate_low_rank_dim": 16, "gate_logit_normalizer": 16.0, "use_output_gate": True, "norm_eps": 1e-5,
            "chunk_size": 16, "backend": "auto"},
}


def options(variant: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The variant's options: its saved params over the defaults; an unknown variant or option is a ValueError."""
    if variant not in OPTIONS:
        raise ValueError(f"this hybrid uses linear attention {variant!r}; the stock-tools module written beside it runs "
                         f"only {', '.join(OPTIONS)}: load it with hybridize and the plugin that provides {variant!r}")
    unknown = sorted(set(params or {}) - set(OPTIONS[variant]))
    if unknown:
        raise ValueError(f"this hybrid's {variant!r} layers have option(s) {unknown} that the stock-tools module written "
                         "beside it does not know (it computes only the options it lists); load it with hybridize")
    return {**OPTIONS[variant], **(params or {})}


def _cd(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_cd(x.dtype))
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:
            return _rms(x, self.weight, self.eps)
        cd = _cd(x.dtype)
        return (_rms(x.to(cd), self.weight, self.eps) * F.silu(gate.to(cd))).to(x.dtype)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time (weight (C, 1, W)); padded tokens are skipped, the cache holds the
    last ``W - 1`` real inputs (B, C, W - 1)."""

    def __init__(self, channels: int, kernel_size: int, silu: bool):
        super().__init__()
        self.kernel_size, self.silu = kernel_size, silu
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None, mask: torch.Tensor | None):
        B, T, C = x.shape
        W = self.kernel_size
        cache = x.new_zeros(B, C, W - 1) if cache is None else cache.to(x.dtype)
        order = None
        if mask is not None:  # real tokens first (stable), so each sees only real predecessors
            order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
            x = x.gather(1, order[..., None].expand(B, T, C)) * mask.gather(1, order)[..., None].to(x.dtype)
        xp = torch.cat([cache, x.transpose(1, 2)], dim=-1)  # (B, C, W-1+T)
        y = F.conv1d(xp, self.weight.to(x.dtype), groups=C).transpose(1, 2)  # (B, T, C)
        y = F.silu(y) if self.silu else y
        if mask is None:
            new = xp[..., -(W - 1):].clone()
        else:
            idx = mask.ne(0).sum(-1)[:, None] + torch.arange(W - 1, device=x.device)  # (B, W-1)
            new = xp.gather(-1, idx[:, None, :].expand(-1, C, -1))
            y = torch.empty_like(y).scatter_(1, order[..., None].expand(B, T, C), y)
        return y, new


# -- the recurrences: exact chunked forms in torch, fla's kernels on CUDA --------------------------------------
def _chunks(t: torch.Tensor, C: int) -> torch.Tensor:
    """(B, T, H, ...) zero-padded to a multiple of C -> (B, H, N, C, ...)."""
    pad = -t.shape[1] % C
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    t = t.reshape(t.shape[0], -1, C, *t.shape[2:])  # (B, N, C, H, ...)
    return t.movedim(3, 1)


def _unchunk(o: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H, N, C, V) -> (B, T, H, V)."""
    B, H, N, C, V = o.shape
    return o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)


def delta_rule(q, k, v, g, beta, state, chunk: int):
    """Gated delta rule, q/k already L2-normalised: ``S = e^g S; S += k (beta (v - S^T k))^T; o = S^T q / sqrt(K)``.

    Chunked (UT transform), exact for any chunk length. Shape: q, k (B, T, H, K); v (B, T, H, V); g, beta (B, T, H).
    """
    B, T, H, K = q.shape
    C = max(1, min(chunk, T))
    q, k, v = _chunks(q * K ** -0.5, C), _chunks(k, C), _chunks(v, C)  # (B, H, N, C, .)
    g, beta = _chunks(g[..., None], C)[..., 0], _chunks(beta[..., None], C)[..., 0]  # (B, H, N, C)
    G = g.cumsum(-1)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # (B, H, N, C, C)
    L = beta[..., None] * decay.tril(-1) * (k @ k.transpose(-1, -2))  # s < t
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], dim=-1)
    U, Wk = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True).split([v.shape[-1], K], dim=-1)
    A = (q @ k.transpose(-1, -2)) * decay
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.to(q.dtype)
    outs = []
    for n in range(q.shape[2]):
        u = U[:, :, n] - Wk[:, :, n] @ S
        outs.append((G[:, :, n, :, None].exp() * q[:, :, n]) @ S + A[:, :, n] @ u)
        last = G[:, :, n, -1:]
        S = last[..., None].exp() * S + (k[:, :, n] * (last - G[:, :, n]).exp()[..., None]).transpose(-1, -2) @ u
    return _unchunk(torch.stack(outs, dim=2), T), S


def gla_rule(q, k, v, gk, state, chunk: int):
    """Gated linear attention: ``S = diag(e^gk) S + k v^T; o = S^T q / sqrt(K)``; chunked, exact.

    Shape: q, k, gk (B, T, H, K); v (B, T, H, V).
    """
    B, T, H, K = q.shape
    C = max(1, min(chunk, T))
    q, k, v, gk = _chunks(q * K ** -0.5, C), _chunks(k, C), _chunks(v, C), _chunks(gk, C)  # (B, H, N, C, .)
    Bc = gk.cumsum(-2)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (Bc[..., :, None, :] - Bc[..., None, :, :]).masked_fill(~lower[..., None], float("-inf")).exp()
    A = torch.einsum("...tk,...sk,...tsk->...ts", q, k, decay)
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.to(q.dtype)
    outs = []
    for n in range(q.shape[2]):
        b, last = Bc[:, :, n], Bc[:, :, n, -1:]
        outs.append((q[:, :, n] * b.exp()) @ S + A[:, :, n] @ v[:, :, n])
        S = last.transpose(-1, -2).exp() * S + (k[:, :, n] * (last - b).exp()).transpose(-1, -2) @ v[:, :, n]
    return _unchunk(torch.stack(outs, dim=2), T), S


@functools.lru_cache(maxsize=None)
def _fla(name: str) -> Any:
    """fla's op module ``fla.ops.<name>``, or None when it does not import (imported only on CUDA)."""
    try:
        import importlib

        return importlib.import_module(f"fla.ops.{name}")
    except Exception:  # noqa: BLE001 - no triton, wrong version: the torch form runs instead
        return None


def _use_fla(opts: dict[str, Any], x: torch.Tensor, op: str) -> Any:
    if opts["backend"] == "torch" or not x.is_cuda or x.dtype == torch.float64:
        if opts["backend"] == "fla" and not x.is_cuda:
            raise ValueError(f"linear attention field 'backend' must be 'fla' only for CUDA tensors; got {x.device} tensors")
        return None
    mod = _fla(op)
    if mod is None and opts["backend"] == "fla":
        raise ValueError("linear attention field 'backend' must name an importable kernel library; got 'fla', which does not import")
    return mod


# -- the layers -------------------------------------------------------------------------------------------------
class MaskHolder:
    """The 2-D padding mask (1 = real token) of the forward in progress, set by the backbone's pre-hook."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def current(self, B: int, T: int) -> torch.Tensor | None:
        m = self.mask
        if m is None or m.dim() != 2 or m.shape[0] != B or m.shape[1] < T:
            return None
        part = m[:, -T:]
        return None if bool(part.all()) else part


class LinearLayer(nn.Module):
    """The Hugging Face attention call around :meth:`mix` (the cache holds the recurrent state dict)."""

    def __init__(self, spec: dict[str, Any], opts: dict[str, Any], holder: MaskHolder):
        super().__init__()
        self.layer_idx, self.opts, self.head_dim = spec["layer_idx"], opts, spec["head_dim"]
        H, D, hidden = spec["num_heads"], spec["head_dim"], spec["hidden_size"]
        self._holder = [holder]  # in a list: not a submodule
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", nn.Linear(hidden, H * D, bias=spec[f"{name}_bias"]))
        self.o_proj = nn.Linear(H * D, hidden, bias=spec["o_bias"])
        self.qk_norm = spec["qk_norm"] and opts.get("qk_norm", True)
        if self.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, spec["norm_eps"]), RMSNorm(D, spec["norm_eps"])
        if opts["use_short_conv"]:
            for name in ("q", "k", "v"):
                conv = ShortConvolution(H * D, opts["conv_size"], silu=opts["conv_activation"] == "silu")
                setattr(self, f"{name}_conv1d", conv)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        from transformers.cache_utils import Cache

        caches = {id(c): c for c in (past_key_values, kwargs.pop("cache", None)) if c is not None}
        stray = [n for n, v in kwargs.items() if isinstance(v, Cache)]
        if len(caches) > 1 or stray:
            raise ValueError(f"layer {self.layer_idx}: a cache under an unknown or a second name {stray}; this "
                             "transformers release is not supported by the hybridize module")
        cache = next(iter(caches.values()), None)
        B, T, _ = hidden_states.shape
        mask = self._holder[0].current(B, T)
        if cache is None:
            return self.mix(hidden_states, None, mask)[0], None
        if not hasattr(cache, "get_linear_state"):
            raise ValueError(f"layer {self.layer_idx} is a linear-attention layer but got a {type(cache).__name__}, which "
                             "holds no recurrent state; leave the cache out and let the model make its own")
        state = cache.get_linear_state(self.layer_idx)
        if state is None and cache.past_tokens_of(self.layer_idx) > 0:
            raise ValueError(f"layer {self.layer_idx} is asked to continue a sequence but the cache holds no recurrent "
                             "state for it; pass the cache that the previous forward filled")
        out, state = self.mix(hidden_states, state, mask)
        cache.set_linear_state(self.layer_idx, state, T)
        return out, None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], -1, self.head_dim)  # (B, T, H*D) -> (B, T, H, D)

    def _qkv(self, x: torch.Tensor, state: dict, mask: torch.Tensor | None, bare_silu: bool):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*D)
        if self.qk_norm:
            q, k = self.q_norm(self._heads(q)).flatten(-2), self.k_norm(self._heads(k)).flatten(-2)
        conv: dict[str, torch.Tensor] = {}
        if self.opts["use_short_conv"]:
            outs = []
            for name, t in (("q", q), ("k", k), ("v", v)):
                y, conv[f"conv_{name}"] = getattr(self, f"{name}_conv1d")(t, state.get(f"conv_{name}"), mask)
                outs.append(y)
            q, k, v = outs
        elif bare_silu:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        return self._heads(q), self._heads(k), self._heads(v), conv

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = self._heads(self.g_proj(x)) if hasattr(self, "g_proj") else None
        return self.o_proj(self.o_norm(o, gate).flatten(-2))

    def _mode(self, x: torch.Tensor) -> str:
        T = x.shape[1]
        return "recurrent" if T == 1 or (x.is_cuda and T <= 64 and not self.training) else "chunk"


class GatedDeltaNet(LinearLayer):
    """hybridize's ``gdn`` variant (fla's GatedDeltaNet names: a_proj, b_proj, A_log, dt_bias, g_proj, o_norm)."""

    def __init__(self, spec: dict[str, Any], opts: dict[str, Any], holder: MaskHolder):
        super().__init__(spec, opts, holder)
        H, D, hidden = spec["num_heads"], spec["head_dim"], spec["hidden_size"]
        self.a_proj, self.b_proj = nn.Linear(hidden, H, bias=False), nn.Linear(hidden, H, bias=False)
        self.A_log, self.dt_bias = nn.Parameter(torch.zeros(H)), nn.Parameter(torch.zeros(H))
        if opts["use_gate"]:
            self.g_proj = nn.Linear(hidden, H * D, bias=False)
        self.o_norm = RMSNorm(D, opts["norm_eps"])

    def mix(self, x: torch.Tensor, state: dict | None, mask: torch.Tensor | None):
        state = state or {}
        q, k, v, conv = self._qkv(x, state, mask, bare_silu=self.opts["conv_activation"] == "silu")
        cd = _cd(x.dtype)
        g = -self.A_log.to(cd).exp() * F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))  # (B, T, H)
        beta = self.b_proj(x).to(cd).sigmoid() * (2.0 if self.opts["allow_neg_eigval"] else 1.0)
        if mask is not None:  # padded tokens leave the state unchanged
            g, beta = g * mask[..., None].to(cd), beta * mask[..., None].to(cd)
        fla = _use_fla(self.opts, x, "gated_delta_rule")
        if fla is not None:
            fn = fla.chunk_gated_delta_rule if self._mode(x) == "chunk" else fla.fused_recurrent_gated_delta_rule
            o, S = fn(q, k, v, g=g, beta=beta, initial_state=state.get("recurrent"), output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
        else:
            o, S = delta_rule(_l2norm(q.to(cd)), _l2norm(k.to(cd)), v.to(cd), g, beta, state.get("recurrent"),
                              self.opts["chunk_size"])
        return self._out(o.to(x.dtype), x), {"recurrent": S, **conv}


class GatedLinearAttention(LinearLayer):
    """hybridize's ``gla`` variant (fla's GatedLinearAttention names: gk_proj, g_proj, o_norm)."""

    def __init__(self, spec: dict[str, Any], opts: dict[str, Any], holder: MaskHolder):
        super().__init__(spec, opts, holder)
        H, D, hidden, r = spec["num_heads"], spec["head_dim"], spec["hidden_size"], opts["gate_low_rank_dim"]
        self.gk_proj = nn.Sequential(nn.Linear(hidden, r, bias=False), nn.Linear(r, H * D, bias=True))
        if opts["use_output_gate"]:
            self.g_proj = nn.Linear(hidden, H * D, bias=False)
        self.o_norm = RMSNorm(D, opts["norm_eps"])

    def mix(self, x: torch.Tensor, state: dict | None, mask: torch.Tensor | None):
        state = state or {}
        q, k, v, conv = self._qkv(x, state, mask, bare_silu=False)
        cd = _cd(x.dtype)
        gk = self._heads(F.logsigmoid(self.gk_proj(x).to(cd)) / self.opts["gate_logit_normalizer"])  # (B, T, H, D)
        if mask is not None:  # k = v = gk = 0: padded tokens leave the state unchanged
            keep = mask.to(x.dtype)[..., None, None]
            k, v, gk = k * keep, v * keep, gk * keep.to(cd)
        fla = _use_fla(self.opts, x, "gla")
        if fla is not None:
            fn = fla.chunk_gla if self._mode(x) == "chunk" else fla.fused_recurrent_gla
            kw = {"g": gk} if self._mode(x) == "chunk" else {"gk": gk}
            o, S = fn(q, k, v, initial_state=state.get("recurrent"), output_final_state=True, **kw)
        else:
            o, S = gla_rule(q.to(cd), k.to(cd), v.to(cd), gk, state.get("recurrent"), self.opts["chunk_size"])
        return self._out(o.to(x.dtype), x), {"recurrent": S, **conv}


LAYERS = {"gdn": GatedDeltaNet, "gla": GatedLinearAttention}
