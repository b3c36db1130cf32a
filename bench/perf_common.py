"""Shared pieces of the GPU performance benchmarks (stage-2 step, selection cost, decoding).

Random-weight Llama teachers of a named size, the FLOP count used for MFU, the machine and
version record, timers and a markdown table printer. Imported by the bench scripts, which are
run as ``python bench/NAME.py`` (this folder is then on ``sys.path``).
"""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: bf16 dense peak of an H100 SXM (datasheet, no sparsity): the MFU denominator
H100_BF16_PEAK = 989.4e12

#: Llama-3.2-1B's shape (1.24B parameters with tied embeddings), random weights
LLAMA_1B = dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500_000.0,
                max_position_embeddings=131_072, rms_norm_eps=1e-5, tie_word_embeddings=True)

SIZES: dict[str, dict[str, Any]] = {
    "1b": LLAMA_1B,
    # a 12-layer 150M model for the selection-cost benchmark (12 probes train together on one GPU);
    # attention heads as in 1b (32 x 64, GQA 8), so fla's kernels keep their tuned configurations
    "sel12": dict(vocab_size=32_000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=10_000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # CPU smoke-test sizes
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny12": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False),
}


def resolve(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def random_teacher(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A frozen random-weight Llama of one of :data:`SIZES`, in eval mode, built directly on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hybridize.model.teacher import ATTN_IMPLEMENTATION

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SIZES[size], attn_implementation=ATTN_IMPLEMENTATION, initializer_range=0.02)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def quarter_softmax(n_layers: int, ratio: float = 0.25) -> list[int]:
    """The uniform selector's layers at ``ratio`` (e.g. 16 layers, 25% -> [3, 7, 11, 15])."""
    from hybridize.plugins.selectors.uniform import uniform_layers

    return uniform_layers(n_layers, max(1, round(ratio * n_layers)))


def matmul_params(model: nn.Module) -> int:
    """Weights that take part in matrix products per token: every nn.Linear (lm_head included, embeddings not)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def flops_per_token(model: nn.Module, seq: int, *, train: bool) -> float:
    """Model FLOPs per token: 2 x matmul params + attention, x3 for forward + backward.

    Softmax layers: causal attention, 2 * T * H * D per token forward (QK^T and AV, half the square).
    Linear layers: the recurrent form of the mixer, per head 6 * K * V (gated delta rule: S^T k,
    k u^T, S^T q) or 4 * K * V (GLA), per token forward. (The chunked kernels do somewhat more.)
    """
    from hybridize.linear import LinearAttention
    from hybridize.model.teacher import decoder_layers

    fwd = 2.0 * matmul_params(model)
    for layer in decoder_layers(model):
        attn = layer.self_attn
        if isinstance(attn, LinearAttention):
            per_head = 6 if type(attn).__name__ == "GatedDeltaNet" else 4
            fwd += per_head * attn.num_heads * attn.head_dim * attn.head_dim
        else:
            cfg = model.config
            fwd += 2.0 * seq * cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return fwd * (3.0 if train else 1.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def matmul_ceiling(device: torch.device, n: int = 8192) -> float | None:
    """Measured bf16 TFLOP/s of an n x n x n product on random data (the achievable ceiling)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    t, _ = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * n**3 * 10 / t / 1e12


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import fla
            import triton

            env.update(triton=triton.__version__, fla=fla.__version__)
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            env["fla"] = f"not importable: {type(exc).__name__}"
    return env


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (floats get 3-4 significant digits)."""
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def top_kernels(prof: Any, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` device kernels with the most total time in a torch.profiler run."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.key and not e.key.startswith(("ProfilerStep", "aten::", "autograd::", "cudaDeviceSynchronize")):
            rows.append({"kernel": e.key[:90], "ms": t / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:n]
