"""Shared pieces of the linear-attention ops: backend choice, norms, the short convolution.

Nothing here imports fla at module import time: ``import fla`` needs triton, which CPU-only
machines do not have. :func:`fla_available` imports it lazily, once.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

Backend = Literal["auto", "torch", "fla"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "fla")


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    """True when CUDA is available and ``import fla.ops`` works (checked once per process)."""
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (no triton, wrong version) means "no fla"
        return False
    return True


def resolve_backend(backend: str, tensor: torch.Tensor) -> Literal["torch", "fla"]:
    """Turn ``auto`` into ``fla`` (CUDA tensor and fla importable) or ``torch``.

    Args:
        backend: ``auto``, ``torch`` or ``fla``.
        tensor: an input of the op; its device decides ``auto``.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "fla" if tensor.is_cuda and fla_available() else "torch"
    if backend == "fla":
        if not tensor.is_cuda:
            raise ValueError(f"linear attention field 'backend' must be 'fla' only for CUDA tensors; got {tensor.device} tensors")
        if not fla_available():
            raise ValueError("linear attention field 'backend' must name an importable kernel library; got 'fla', which does not import")
        return "fla"
    raise ValueError(f"linear attention field 'backend' must be one of {BACKENDS}; got {backend!r}")


#: On CUDA with fla, also run the short convolution (training form: no cache, no padding) and the
#: gated output norm on fla's fused Triton kernels (``backend`` auto / fla). A switch for benchmarks.
FLA_AUX_KERNELS = True


def use_fla_aux(backend: str, x: torch.Tensor) -> bool:
    """Whether the short convolution / gated norm should take fla's kernels for ``x``."""
    if torch.compiler.is_compiling():  # inside torch.compile, inductor fuses the torch form itself
        return False
    return FLA_AUX_KERNELS and backend != "torch" and x.is_cuda and fla_available()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch reference computes in: float64 stays float64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``t.shape == shape`` (message in the project's style)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op} field '{name}' must have shape {tuple(shape)}; got {tuple(t.shape)}")


def check_choice(op: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{op} field '{name}' must be one of {choices}; got {value!r}")


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, computed in fp32 (float64 stays), as fla does.

    Shape:
        x: (..., D) -> (..., D), same dtype
    """
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 (float64 stays); returns the input dtype.

    Shape:
        x: (..., D) -> (..., D); weight: (D,)
    """
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``rmsnorm(x) * weight * silu(g)`` in fp32 (fla's FusedRMSNormGated with swish).

    Shape:
        x, g: (..., D) -> (..., D) in x's dtype; weight: (D,)
    """
    cd = compute_dtype(x.dtype)
    y = rms_norm(x.to(cd), weight, eps)
    return (y * F.silu(g.to(cd))).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel weight (initialised to ones).

    Args:
        dim: size of the normalised (last) dim.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """RMSNorm followed by a SiLU output gate: ``rmsnorm(x) * weight * silu(g)``.

    On CUDA (``backend`` auto / fla, fla importable) fla's fused ``rms_norm_gated`` kernel computes
    the same function in one pass.
    """

    def forward(self, x: torch.Tensor, g: torch.Tensor, backend: str = "auto") -> torch.Tensor:  # type: ignore[override]
        if use_fla_aux(backend, x) and x.dtype != torch.float64:
            from fla.modules.fused_norm_gate import rms_norm_gated

            shape = x.shape
            y = rms_norm_gated(x.reshape(-1, shape[-1]), g.reshape(-1, shape[-1]).to(x.dtype), self.weight, None,
                               activation="swish", eps=self.eps)
            return y.reshape(shape).to(x.dtype)
        return gated_rms_norm(x, g, self.weight, self.eps)


class ShortConvolution(nn.Module):
    """Depthwise causal 1-D convolution over time, with a cache of the last ``W - 1`` inputs.

    Args:
        channels: number of channels C (each has its own filter).
        kernel_size: filter width W (>= 2).
        bias: learn a per-channel bias.
        activation: ``"silu"`` or None.
        conv_init: ``"identity"`` (last tap 1, others 0: the input passes through) or ``"random"``.

    Shape:
        x: (B, T, C) -> y: (B, T, C); cache: (B, C, W - 1), the previous inputs, oldest first
    """

    def __init__(self, channels: int, kernel_size: int, *, bias: bool = False, activation: str | None = "silu",
                 conv_init: str = "identity"):
        super().__init__()
        if activation not in ("silu", None):
            raise ValueError(f"ShortConvolution field 'activation' must be 'silu' or None; got {activation!r}")
        check_choice("ShortConvolution", "conv_init", conv_init, ("identity", "random"))
        if kernel_size < 2:
            raise ValueError(f"ShortConvolution field 'kernel_size' must be >= 2; got {kernel_size!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))  # fla's (C, 1, W) layout
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters(conv_init)

    @torch.no_grad()
    def reset_parameters(self, conv_init: str = "identity") -> None:
        """Identity (pass-through) or Conv1d's default uniform init."""
        if conv_init == "identity":
            self.weight.zero_()
            self.weight[:, 0, -1] = 1.0
        else:
            bound = self.kernel_size ** -0.5  # fan_in of a depthwise filter is W
            self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, output_final_state: bool = False,
                mask: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Convolve ``x`` causally, continuing from ``cache``.

        Args:
            x: inputs.
            cache: the last ``W - 1`` inputs before ``x`` (zeros when None).
            output_final_state: also return the cache after ``x``.
            mask: 1 for real tokens, 0 for padding. Padded tokens are invisible: each real token
                sees the previous *real* tokens, and the returned cache holds the last real inputs.
            backend: ``auto`` / ``fla`` take fla's ``causal_conv1d`` kernel on CUDA for the training
                form (no cache in or out, no padding); ``torch`` always runs the torch form.

        Shape:
            x: (B, T, C); cache: (B, C, W - 1); mask: (B, T) -> y: (B, T, C), cache: (B, C, W - 1)
        """
        if cache is None and mask is None and not output_final_state and use_fla_aux(backend, x) and x.dtype != torch.float64:
            from fla.modules.causal_conv1d import causal_conv1d

            w = self.weight[:, 0, :].to(x.dtype)  # (C, W)
            b = None if self.bias is None else self.bias.to(x.dtype)
            y, _ = causal_conv1d(x.contiguous(), weight=w, bias=b, activation=self.activation, backend="triton")
            return y, None
        B, T, C = x.shape
        W = self.kernel_size
        if cache is None:
            cache = x.new_zeros(B, C, W - 1)
        order = None
        if mask is not None:
            # move real tokens to the front (stable), padding to the back: real tokens then see
            # only real predecessors, and the cache ends on the last real token
            order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # (B, T)
            x = x.gather(1, order[..., None].expand(B, T, C)) * mask.gather(1, order)[..., None].to(x.dtype)
        xp = torch.cat([cache.to(x.dtype), rearrange(x, "b t c -> b c t")], dim=-1)  # (B, C, W-1+T)
        y = F.conv1d(xp, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), groups=C)
        y = rearrange(y, "b c t -> b t c")  # (B, T, C)
        if self.activation == "silu":
            y = F.silu(y)
        new_cache = None
        if output_final_state:
            # a copy, not a view: a view would keep the whole (B, C, W-1+T) input of a long prefill alive
            new_cache = xp[..., -(W - 1):].clone() if mask is None else _last_real(xp, mask, W - 1)
        if order is not None:
            y = torch.empty_like(y).scatter_(1, order[..., None].expand(B, T, C), y)
        return y, new_cache

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}, bias={self.bias is not None}"


def _last_real(xp: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` real columns of ``xp`` = [cache (n columns, all real), real tokens..., padding].

    Shape:
        xp: (B, C, n + T) with real tokens moved to the front; mask: (B, T) -> (B, C, n)
    """
    n_real = n + mask.ne(0).sum(-1)  # (B,) real columns, cache included
    idx = n_real[:, None] - n + torch.arange(n, device=xp.device)  # (B, n)
    return xp.gather(-1, idx[:, None, :].expand(-1, xp.shape[1], -1))
