"""Teachers of real shapes with random weights, and the FLOP model of bench/scale_rehearsal.py.

:data:`SHAPES` holds the public shapes (config.json of the hub checkpoints) of the teachers the paper and
the project target; :func:`build_teacher_dir` saves a random-weight one with ``save_pretrained`` next to a
small real tokenizer (stories260K's, vocab 512: its ids are valid in every vocab here), so that
``hybridize run`` loads it like any local teacher.

FLOP model (model FLOPs per token; MFU = FLOP/s / (peak x GPUs)). N_t = the teacher's matmul weights (every
projection and the lm_head, not the input embedding; norms and biases, < 1%, counted in), N_body = N_t without the lm_head, N_s = a student's (the teacher's
with each linear layer's attention weights replaced by its variant module's), N_mix = the weights of every
linear layer's mixer, N_train = what a probe trains (``selection.probe_trainable``: all = N_s). Per token,
with H query heads of size D, L layers, T the block length:

- softmax attention forward: 2 T H D per layer (causal QK^T and AV); GDN forward: 6 H D^2 per layer;
- stage 1 = 2 N_body + L 2 T H D  (teacher forward, no lm_head)  +  3 (2 N_mix + L 6 H D^2)  (mixers trained);
- probe token = 2 N_s (forward) + 2 N_s (backward through the activations) + 2 N_train (weight gradients)
  + 3 x attention terms of the probe student; plus 2 N_t + L 2 T H D per teacher-forward token of the selection
  (one teacher pass per batch and probe group, beyond stage 1);
- stage 2 = 2 N_t + L 2 T H D (teacher)  +  6 N_s + 3 x attention terms (student, every weight trained).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import attrs

QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
             rope_theta=1_000_000.0, max_position_embeddings=32_768, attention_dropout=0.0, use_sliding_window=False)
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
             rope_theta=500_000.0, max_position_embeddings=131_072, attention_bias=False, mlp_bias=False)

#: name -> config.json fields (hub shapes; Qwen2 has q/k/v biases by construction)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {**QWEN2, "num_hidden_layers": 28, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "intermediate_size": 8960, "vocab_size": 151_936, "tie_word_embeddings": True},
    "qwen2.5-3b": {**QWEN2, "num_hidden_layers": 36, "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2,
                   "intermediate_size": 11_008, "vocab_size": 151_936, "tie_word_embeddings": True},
    "qwen2.5-7b": {**QWEN2, "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "intermediate_size": 18_944, "vocab_size": 152_064, "tie_word_embeddings": False},
    "llama-3.2-3b": {**LLAMA, "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 8,
                     "head_dim": 128, "intermediate_size": 8192, "vocab_size": 128_256, "tie_word_embeddings": True},
    # CPU smoke test: a 4-layer Qwen2 (biases included); vocab above the 512 ids (+ the pad token Qwen2 tokenizers add)
    "tiny": {**QWEN2, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 1024, "tie_word_embeddings": True, "max_position_embeddings": 4096},
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def build_teacher_dir(shape: str, out: Path, tokenizer_dir: Path, device: str, seed: int = 0) -> Path:
    """Save a random-weight teacher of ``shape`` (bf16 on CUDA, fp32 on CPU) and the tokenizer to ``out``.

    An ``out`` already holding this shape (``rehearsal-shape.json``) is reused as it is.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    marker = out / "rehearsal-shape.json"
    fields = SHAPES[shape]
    if marker.exists() and json.loads(marker.read_text()) == {"shape": shape, "config": fields, "seed": seed}:
        print(f"reusing the {shape} teacher in {out}", flush=True)
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    extra = {k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
    config = AutoConfig.for_model(fields["model_type"], architectures=fields["architectures"], initializer_range=0.02, **extra)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    marker.write_text(json.dumps({"shape": shape, "config": fields, "seed": seed}))
    n = sum(p.numel() for p in model.parameters())
    print(f"saved a random {shape} teacher ({n / 1e9:.2f}B parameters, {dtype}) to {out}", flush=True)
    return out


@attrs.frozen
class FlopModel:
    """Matmul weight counts and attention shape of one teacher and its GDN students (see the module docstring)."""

    n_t: int
    n_body: int
    attention: list[int]
    variant: list[int]
    heads: int
    head_dim: int
    counts: Any

    @property
    def n_layers(self) -> int:
        return len(self.attention)

    def n_student(self, softmax: list[int]) -> int:
        return self.n_t - sum(a - v for i, (a, v) in enumerate(zip(self.attention, self.variant)) if i not in softmax)

    def attn_fwd(self, T: int, softmax: list[int]) -> float:
        """Attention FLOPs per token, forward, of a model with softmax at ``softmax`` (the rest GDN)."""
        n_soft = len(softmax)
        return n_soft * 2.0 * T * self.heads * self.head_dim + (self.n_layers - n_soft) * 6.0 * self.heads * self.head_dim ** 2

    def teacher_fwd(self, T: int) -> float:
        return 2.0 * self.n_t + self.attn_fwd(T, list(range(self.n_layers)))

    def stage1(self, T: int) -> float:
        body = 2.0 * self.n_body + self.attn_fwd(T, list(range(self.n_layers)))
        return body + 3.0 * (2.0 * sum(self.variant) + self.attn_fwd(T, []))

    def probe(self, T: int, trainable: str) -> float:
        """Student FLOPs per probe token (the teacher's forward counted apart), mean over the layers."""
        total = 0.0
        for layer in range(self.n_layers):
            n_s = self.n_student([layer])
            n_train = n_s if trainable == "all" else self.counts.probe_params(trainable, layer)
            total += 4.0 * n_s + 2.0 * n_train + 3.0 * self.attn_fwd(T, [layer])
        return total / self.n_layers

    def stage2(self, T: int, softmax: list[int]) -> float:
        return self.teacher_fwd(T) + 6.0 * self.n_student(softmax) + 3.0 * self.attn_fwd(T, softmax)


def flop_model(teacher_dir: Path) -> FlopModel:
    """Counts on the meta device (nothing allocated) from the saved config.json."""
    from hybridize.recipes.plan import count_params, teacher_config
    from hybridize.registry.configs import ComponentRef
    from hybridize.registry.manager import get_plugin_manager

    config = teacher_config(str(teacher_dir))
    counts = count_params(config, ComponentRef(name="gdn"), get_plugin_manager())
    embed = counts.vocab * counts.hidden
    n_t = counts.teacher - (0 if config.tie_word_embeddings else embed)  # the lm_head multiplies; the embedding does not
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(n_t=n_t, n_body=n_t - embed, attention=counts.attention, variant=counts.variant,
                     heads=config.num_attention_heads, head_dim=head_dim, counts=counts)
