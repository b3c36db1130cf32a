"""Tiny random teachers (Llama, Qwen2, Qwen3, Mistral) and a toy linear-attention variant for tests.

Everything here runs on the CPU in milliseconds and needs no download::

    from hybridize.testing.models import tiny_model
    teacher = tiny_model("qwen3", n_layer=4)            # q_norm/k_norm, head_dim != d / heads

Biases and norm weights are randomised (they are zero / one at init, which would hide
bugs in carrying them over to a student).
"""
from __future__ import annotations

from typing import Any

import attrs
import torch
from einops import rearrange
from torch import nn

from hybridize import hookimpl
from hybridize.linear import AttentionSpec, LinearAttention, TeacherAttentionWeights
from hybridize.model.teacher import ATTN_IMPLEMENTATION

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _family_kwargs(family: str, d: int, heads: int) -> dict[str, Any]:
    if family == "qwen3":
        return {"head_dim": 2 * d // heads}  # deliberately != d // heads
    if family == "qwen2":
        return {"use_sliding_window": False}
    return {}


def tiny_config(
    family: str, *, n_layer: int = 4, d: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = 64, **overrides: Any
) -> Any:
    """The config of a tiny causal LM of one supported family.

    Args:
        family: ``llama``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms, head_dim = 2 * d / heads) or ``mistral``.
        n_layer: decoder layers.
        d: hidden size.
        heads: query heads.
        kv_heads: key/value heads (GQA when fewer than ``heads``).
        vocab: vocabulary size.
        **overrides: any other config field, e.g. ``attention_bias=True`` or ``head_dim=8``.
    """
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"tiny_config field 'family' must be one of {', '.join(FAMILIES)}; got {family!r}")
    kwargs = dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layer,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        initializer_range=0.1, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attn_implementation=ATTN_IMPLEMENTATION, **_family_kwargs(family, d, heads),
    )
    return AutoConfig.for_model(family, **{**kwargs, **overrides})


def _randomise_biases_and_norms(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)


def tiny_model(family: str = "llama", *, seed: int = 0, **config_kwargs: Any) -> Any:
    """A tiny random causal LM on the CPU: float32, eval mode, deterministic under ``seed``.

    The global RNG is left as it was.

    Args:
        family: see :func:`tiny_config`.
        seed: the seed of every random weight.
        **config_kwargs: passed to :func:`tiny_config` (``n_layer``, ``d``, ``heads``, ...).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    _randomise_biases_and_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


# -- a toy linear-attention variant ------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class CumsumConfig:
    """Config of :class:`CumsumAttention`."""

    eps: float = attrs.field(default=1e-6, validator=attrs.validators.gt(0))


class CumsumAttention(LinearAttention):
    """Toy variant: causal linear attention with an ``elu + 1`` feature map and a cumulative sum.

    ``o_t = phi(q_t) S_t / (phi(q_t) z_t)`` with ``S_t = sum_{s<=t} phi(k_s) v_s^T`` and
    ``z_t = sum_{s<=t} phi(k_s)`` over real (unpadded) tokens. K and V are expanded per query
    head (GQA), biases and Qwen3's q/k norms are kept. Meant for tests, not for quality.
    """

    def __init__(self, spec: AttentionSpec, config: CumsumConfig):
        super().__init__(spec, config)
        qk = spec.qk_dim
        self.q_proj = nn.Linear(spec.hidden_size, qk, bias=spec.q_bias)
        self.k_proj = nn.Linear(spec.hidden_size, qk, bias=spec.k_bias)
        self.v_proj = nn.Linear(spec.hidden_size, qk, bias=spec.v_bias)
        self.o_proj = nn.Linear(qk, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = nn.RMSNorm(spec.head_dim, eps=spec.norm_eps) if spec.qk_norm else None
        self.k_norm = nn.RMSNorm(spec.head_dim, eps=spec.norm_eps) if spec.qk_norm else None

    @torch.no_grad()
    def load_teacher_weights(self, weights: TeacherAttentionWeights) -> None:
        """Copy q/o as they are and k/v expanded per query head; biases and norms too."""
        pairs = [
            (self.q_proj.weight, weights.q_weight), (self.k_proj.weight, weights.k_weight_expanded),
            (self.v_proj.weight, weights.v_weight_expanded), (self.o_proj.weight, weights.o_weight),
            (self.q_proj.bias, weights.q_bias), (self.k_proj.bias, weights.k_bias_expanded),
            (self.v_proj.bias, weights.v_bias_expanded), (self.o_proj.bias, weights.o_bias),
        ]
        if self.q_norm is not None:
            pairs += [(self.q_norm.weight, weights.q_norm), (self.k_norm.weight, weights.k_norm)]
        for mine, theirs in pairs:
            if mine is not None:
                mine.copy_(theirs)

    def _qkv(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        split = lambda t: rearrange(t, "b t (h d) -> b h t d", d=self.spec.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = nn.functional.elu(q) + 1, nn.functional.elu(k) + 1
        if padding_mask is not None:  # padded tokens add nothing to the state
            keep = padding_mask[:, None, :, None].to(k.dtype)  # (B, 1, T, 1)
            k, v = k * keep, v * keep
        return q, k, v

    def mix(self, x, *, state=None, padding_mask=None, output_state=False, mode="chunk", backend="auto"):
        """Cumulative-sum linear attention (same result in every mode).

        Shape:
            x: (B, T, hidden) -> (B, T, hidden)
        """
        q, k, v = self._qkv(x, padding_mask)  # (B, H, T, D)
        S = torch.cumsum(torch.einsum("bhtd,bhte->bhtde", k, v), dim=2)  # (B, H, T, D, D)
        z = torch.cumsum(k, dim=2)  # (B, H, T, D)
        if state is not None:
            S, z = S + state["S"][:, :, None], z + state["z"][:, :, None]
        num = torch.einsum("bhtd,bhtde->bhte", q, S)
        den = (q * z).sum(-1, keepdim=True).clamp_min(self.config.eps)
        out = self.o_proj(rearrange(num / den, "b h t d -> b t (h d)"))
        new_state = {"S": S[:, :, -1], "z": z[:, :, -1]} if output_state else None
        return out, new_state

    def naive(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token-by-token recurrence, the reference for :meth:`mix`."""
        q, k, v = self._qkv(x, padding_mask)
        S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        z, outs = q.new_zeros(*q.shape[:2], q.shape[-1]), []
        for t in range(q.shape[2]):
            S, z = S + torch.einsum("bhd,bhe->bhde", k[:, :, t], v[:, :, t]), z + k[:, :, t]
            den = (q[:, :, t] * z).sum(-1, keepdim=True).clamp_min(self.config.eps)
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S) / den)
        return self.o_proj(rearrange(torch.stack(outs, 2), "b h t d -> b t (h d)"))


class ToyVariantPlugin:
    """Registers :class:`CumsumAttention` as ``toy-cumsum``; register it on a fresh plugin manager."""

    @hookimpl
    def hybridize_register_linear_attention(self, register: Any) -> None:
        register("toy-cumsum", CumsumAttention, CumsumConfig)


# -- a tiny tokenizer and a saved teacher directory ---------------------------------------------
#: characters of the tiny tokenizer, after the 4 special tokens (<pad>, <s>, </s>, <unk>)
CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'\n0123456789:;-ABCDEFGHIJKLMN"


def tiny_tokenizer(vocab: int = 64) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` with ``vocab`` ids (pad 0, bos 1, eos 2, unk 3).

    Built in memory from the ``tokenizers`` library: no download. Characters beyond the
    vocabulary map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in CHARS if c not in specials][: vocab - len(specials)]
    table = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def save_tiny_teacher(path: Any, family: str = "llama", *, seed: int = 0, **config_kwargs: Any) -> Any:
    """Save a tiny random teacher and its tiny tokenizer as a Hugging Face directory; return the path."""
    from pathlib import Path

    path = Path(path)
    model = tiny_model(family, seed=seed, **config_kwargs)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path
