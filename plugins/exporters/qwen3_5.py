"""Export to transformers' native Qwen3.5 text layout (``qwen3_5_text``, ``Qwen3_5ForCausalLM``).

The layout (transformers' ``models/qwen3_5``): a per-layer ``layer_types`` list of ``linear_attention`` and
``full_attention`` layers, a dense SiLU MLP, and

- Gated DeltaNet layers with the parameters of hybridize's ``gdn``: ``in_proj_qkv`` (q, k, v stacked),
  ``in_proj_z`` (the output gate), ``in_proj_a`` / ``in_proj_b``, ``A_log``, ``dt_bias``, one depthwise
  ``conv1d`` over q, k and v followed by ``hidden_act``, a gated RMSNorm (weight as is) and ``out_proj``;
  no biases, no q/k norms, one value head per key head here (H heads of the teacher's head_dim);
- full-attention layers that always apply q/k RMSNorm and a sigmoid output gate: ``q_proj`` yields, per head,
  the query and the gate. The gate's rows are zero, so it is sigmoid(0) = 1/2 everywhere, and ``o_proj`` is
  doubled: exact in binary floating point, and the gate stays trainable;
- RMSNorms (layer norms, final norm, q/k norms) that are zero-centred: they compute ``x * (1 + w)``, so the
  teacher's weight ``w`` is stored as ``w - 1``; rotary embeddings on the whole head (``partial_rotary_factor``
  1, where Qwen3.5's own checkpoints rotate a quarter).

Exact for Qwen3 teachers whose GDN layers leave the q/k norms out (``linear_attention: {name: gdn, qk_norm:
false}``) and use the teacher's ``rms_norm_eps`` as ``norm_eps``. Llama / Qwen2 / Mistral softmax layers get
q/k norms they did not have, and q/k/v(/o) biases (Qwen2, ``attention_bias``) have no place: those exports are
approximate and need ``--heal-tokens``. vLLM reads ``attention_bias`` of this layout nowhere (it sizes the
biases from ``qkv_bias`` and gives ``o_proj`` none), so the export never sets it: a bias would load in
transformers and be dropped by vLLM without a word.
"""
from __future__ import annotations

from typing import Any

import attrs
import torch

from hybridize import hookimpl
from hybridize.export import Converted, ExportCheck

FORMAT = "qwen3_5"
#: every option of hybridize's gdn and whether qwen3_5 represents it; an option not listed is refused
_GDN_KNOWN = {"use_short_conv", "conv_size", "conv_activation", "conv_init", "use_gate", "allow_neg_eigval", "qk_norm",
              "norm_eps", "chunk_size", "backend"}
_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@attrs.frozen(kw_only=True)
class Qwen35ExportConfig:
    """Options of the ``qwen3_5`` exporter (none yet: the layout leaves nothing to choose)."""


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _biases(family: str, config: Any) -> list[str]:
    """The attention biases a teacher of this family and config has (read by transformers the same way)."""
    if family == "qwen2":
        return ["q", "k", "v"]
    if family in ("llama", "qwen3") and getattr(config, "attention_bias", False):
        return ["q", "k", "v", "o"]
    return []


def _window(family: str, config: Any) -> int | None:
    """A sliding window that would apply within the model's context, or None."""
    if family == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    window = getattr(config, "sliding_window", None) if family in ("qwen2", "mistral") else None
    return window if window and window < config.max_position_embeddings else None


def _gdn_findings(section: dict, family: str, config: Any, biases: list[str]) -> tuple[list[str], list[str]]:
    """Refusals and differences of the GDN layers."""
    params, layers = section.get("variant_params") or {}, section.get("linear_layers")
    refusals = [f"gdn option {k!r} has no known mapping to qwen3_5" for k in sorted(set(params) - _GDN_KNOWN)]
    if params.get("use_gate", True) is False:
        refusals.append("gdn option use_gate=false: qwen3_5's GatedDeltaNet always gates its output norm (silu(z))")
    if params.get("allow_neg_eigval", False):
        refusals.append("gdn option allow_neg_eigval=true: qwen3_5's beta is sigmoid(b) (in 0..1), not 2 sigmoid(b)")
    if params.get("conv_activation", "silu") != "silu":
        refusals.append(f"gdn option conv_activation={params['conv_activation']!r}: qwen3_5 applies hidden_act "
                        "after its short convolution")
    if getattr(config, "hidden_act", "silu") != "silu":
        refusals.append(f"teacher hidden_act={config.hidden_act!r}: qwen3_5 applies it after the GDN short "
                        "convolution, where hybridize's gdn applies SiLU")
    differences = []
    if family == "qwen3" and params.get("qk_norm", True):
        differences.append(f"GDN layers {layers} apply the teacher's q/k RMSNorm, which qwen3_5's GatedDeltaNet has no "
                           "place for (left out; build the hybrid with linear_attention qk_norm: false to export exactly)")
    eps = float(params.get("norm_eps", 1e-5))
    if eps != float(config.rms_norm_eps):
        differences.append(f"GDN output norm eps {eps:g} vs rms_norm_eps {config.rms_norm_eps:g}, the one eps of every "
                           f"qwen3_5 norm (build the hybrid with linear_attention norm_eps: {config.rms_norm_eps:g} "
                           "to export exactly)")
    if biases:
        differences.append(f"GDN layers {layers}: the {'/'.join(biases)} projection biases have no place in qwen3_5 "
                           "(left out)")
    return refusals, differences


class Qwen35Exporter:
    """Writes ``Qwen3_5ForCausalLM`` (``model_type: qwen3_5_text``) from a GDN hybrid."""

    summary = ("qwen3_5: transformers' Qwen3_5ForCausalLM (qwen3_5_text; vLLM serves it), from gdn hybrids of "
               "Llama / Qwen2 / Qwen3 / Mistral teachers (exact for Qwen3 with gdn qk_norm: false)")

    def __init__(self, config: Qwen35ExportConfig):
        self.config = config

    def unavailable(self) -> str | None:
        try:
            from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5TextConfig  # noqa: F401
        except ImportError as exc:
            import transformers

            return (f"format 'qwen3_5' needs transformers' qwen3_5 model (Qwen3_5ForCausalLM), which transformers "
                    f"{transformers.__version__} does not provide ({exc}); install transformers>=5.17, the range "
                    "hybridize admits (5.17 and later ship it)")
        return None

    def check(self, config: Any) -> ExportCheck:
        section = getattr(config, "hybridize", None) or {}
        family = str(config.model_type).removeprefix("hybridize_")
        if family not in _FAMILIES:
            return ExportCheck(refusals=[f"model type {config.model_type!r} is not a hybrid of {', '.join(_FAMILIES)}"])
        biases, refusals, differences = _biases(family, config), [], []
        if section.get("linear_layers"):
            variant = section.get("variant")
            if variant != "gdn":
                refusals.append(f"linear attention {variant!r} has no counterpart in qwen3_5, whose linear layers are "
                                "Gated DeltaNet (hybridize's 'gdn')")
            else:
                refusals, differences = _gdn_findings(section, family, config, biases)
        if getattr(config, "mlp_bias", False):
            refusals.append("teacher mlp_bias=true: qwen3_5's MLP has no biases")
        window = _window(family, config)
        if window:
            refusals.append(f"teacher sliding_window={window} < max_position_embeddings={config.max_position_embeddings}: "
                            "qwen3_5's full-attention layers see the whole context")
        softmax = section.get("softmax_layers") or []
        if softmax and family != "qwen3":
            differences.append(f"softmax layers {softmax}: qwen3_5 applies q/k RMSNorm, which the {family} teacher's "
                               "attention does not (added with weight 1)")
        if softmax and biases:
            differences.append(f"softmax layers {softmax}: the {'/'.join(biases)} projection biases have no place in "
                               "qwen3_5 (left out)")
        return ExportCheck(refusals=refusals, differences=differences)

    def target_config(self, config: Any) -> Any:
        """The ``Qwen3_5TextConfig`` of the converted model."""
        from transformers.models.qwen3_5 import Qwen3_5TextConfig

        section, H, D = config.hybridize, config.num_attention_heads, _head_dim(config)
        linear = set(section.get("linear_layers") or [])
        rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
        return Qwen3_5TextConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=H, num_key_value_heads=config.num_key_value_heads,
            head_dim=D, hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
            initializer_range=config.initializer_range, rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(config.tie_word_embeddings), rope_parameters={**rope, "partial_rotary_factor": 1.0},
            attention_bias=False, attention_dropout=0.0,
            linear_conv_kernel_dim=int((section.get("variant_params") or {}).get("conv_size", 4)),
            linear_key_head_dim=D, linear_value_head_dim=D, linear_num_key_heads=H, linear_num_value_heads=H,
            layer_types=["linear_attention" if i in linear else "full_attention" for i in range(config.num_hidden_layers)],
            pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        )

    @torch.no_grad()
    def convert(self, model: Any) -> Converted:
        from transformers import AutoModelForCausalLM

        src, cfg = model.state_dict(), model.config
        mapped = _Mapping(src)
        for name in src:
            if not name.startswith("model.layers."):
                mapped.put(name, name, zero_centre=name == "model.norm.weight")
        linear = set(cfg.hybridize.get("linear_layers") or [])
        params = cfg.hybridize.get("variant_params") or {}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                mapped.put(p + f"{norm}.weight", p + f"{norm}.weight", zero_centre=True)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                mapped.put(p + f"mlp.{proj}.weight", p + f"mlp.{proj}.weight")
            if i in linear:
                _gdn_layer(mapped, p, cfg.num_attention_heads * _head_dim(cfg), int(params.get("conv_size", 4)))
            else:
                _attention_layer(mapped, p, cfg.num_attention_heads, _head_dim(cfg))
        mapped.drop_rest(p for p in src if ".self_attn." in p)
        target = AutoModelForCausalLM.from_config(self.target_config(cfg), dtype=next(model.parameters()).dtype)
        target.load_state_dict(mapped.out, strict=True)
        return Converted(model=target.to(next(model.parameters()).device).eval(), read=mapped.read, dropped=mapped.dropped)


class _Mapping:
    """Target tensors built from source tensors, recording which source names were read and which dropped."""

    def __init__(self, src: dict[str, torch.Tensor]):
        self.src, self.out, self.read, self.dropped = src, {}, set(), set()

    def get(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return self.src[name]

    def has(self, name: str) -> bool:
        return name in self.src

    def put(self, target: str, source: str, *, zero_centre: bool = False) -> None:
        t = self.get(source).detach().clone()
        self.out[target] = t - 1 if zero_centre else t  # qwen3_5's RMSNorm computes x * (1 + w)

    def drop_rest(self, names: Any) -> None:
        """Source tensors the layout has no place for (biases, GDN q/k norms): every one not read."""
        self.dropped |= {n for n in names if n not in self.read}


def _attention_layer(m: _Mapping, p: str, H: int, D: int) -> None:
    """Softmax layer: per head [query rows, zero gate rows] in q_proj, o_proj doubled (gate = sigmoid(0) = 1/2)."""
    a, t = p + "self_attn.", p + "self_attn."
    q = m.get(a + "q_proj.weight").reshape(H, D, -1)
    m.out[t + "q_proj.weight"] = torch.cat([q, torch.zeros_like(q)], dim=1).reshape(2 * H * D, -1)
    m.put(t + "k_proj.weight", a + "k_proj.weight")
    m.put(t + "v_proj.weight", a + "v_proj.weight")
    m.out[t + "o_proj.weight"] = 2 * m.get(a + "o_proj.weight")
    for norm in ("q_norm", "k_norm"):
        if m.has(a + f"{norm}.weight"):
            m.put(t + f"{norm}.weight", a + f"{norm}.weight", zero_centre=True)
        else:  # weight 1 (stored 0): the norm itself is the difference the check reports
            m.out[t + f"{norm}.weight"] = torch.zeros(D, dtype=q.dtype, device=q.device)


def _gdn_layer(m: _Mapping, p: str, width: int, conv_size: int) -> None:
    """GDN layer: q/k/v stacked into in_proj_qkv and conv1d; gates, norms and projections renamed."""
    a, t = p + "self_attn.", p + "linear_attn."
    m.out[t + "in_proj_qkv.weight"] = torch.cat([m.get(a + f"{x}_proj.weight") for x in "qkv"])
    for mine, theirs in (("g_proj", "in_proj_z"), ("a_proj", "in_proj_a"), ("b_proj", "in_proj_b"), ("o_proj", "out_proj")):
        m.put(t + f"{theirs}.weight", a + f"{mine}.weight")
    m.put(t + "A_log", a + "A_log")
    m.put(t + "dt_bias", a + "dt_bias")
    m.put(t + "norm.weight", a + "o_norm.weight")  # the gated norm is not zero-centred
    if m.has(a + "q_conv1d.weight"):
        m.out[t + "conv1d.weight"] = torch.cat([m.get(a + f"{x}_conv1d.weight") for x in "qkv"])
    else:  # no short convolution: an identity filter, then SiLU, is what gdn computes without one
        ref = m.out[t + "in_proj_qkv.weight"]
        identity = torch.zeros(3 * width, 1, conv_size, dtype=ref.dtype, device=ref.device)
        identity[:, 0, -1] = 1.0
        m.out[t + "conv1d.weight"] = identity


@hookimpl
def hybridize_register_exporters(register) -> None:
    """Register ``qwen3_5``."""
    register(FORMAT, Qwen35Exporter, Qwen35ExportConfig, capabilities=frozenset({"transformers-native", "vllm"}))
