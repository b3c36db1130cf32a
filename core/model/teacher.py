"""The teacher: load a supported causal LM (frozen) and read its attention layers.

Supported families are listed in :data:`SUPPORTED_ARCHITECTURES`. Everything else is
refused with one :class:`~hybridize.errors.UnsupportedArchitectureError` before any
weights are loaded. The readers here never modify the teacher: weights come back as
detached clones.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from hybridize.errors import HybridizeError, UnsupportedArchitectureError
from hybridize.linear import AttentionSpec, TeacherAttentionWeights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The attention implementation every teacher (and so every student copy) runs with.
ATTN_IMPLEMENTATION = "sdpa"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@attrs.frozen(kw_only=True)
class AttentionLayout:
    """How to read the attention of one supported architecture.

    Biases are read from the modules (``attention_bias`` decides them for Llama and Qwen3,
    Qwen2 always has q/k/v biases), so the layout only names the modules.

    Attributes:
        family: the model family, e.g. ``"llama"``.
        model_type: the ``config.model_type`` the architecture must have.
        q_proj, k_proj, v_proj, o_proj: names of the ``nn.Linear`` projections in ``self_attn``.
        q_norm, k_norm: names of the per-head RMSNorms applied to q and k (Qwen3), or None.
    """

    family: str
    model_type: str
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None


#: architecture class name -> how to read its attention
SUPPORTED_ARCHITECTURES: dict[str, AttentionLayout] = {
    "LlamaForCausalLM": AttentionLayout(family="llama", model_type="llama"),
    "Qwen2ForCausalLM": AttentionLayout(family="qwen2", model_type="qwen2"),
    "Qwen3ForCausalLM": AttentionLayout(family="qwen3", model_type="qwen3", q_norm="q_norm", k_norm="k_norm"),
    "MistralForCausalLM": AttentionLayout(family="mistral", model_type="mistral"),
}


@attrs.frozen
class Teacher:
    """A loaded teacher: the frozen model, its tokenizer (or None) and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    path: str


# -- architecture checks ---------------------------------------------------------------------
def _unsupported(name: str, arch: str | None, model_type: str | None) -> UnsupportedArchitectureError:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    return UnsupportedArchitectureError(
        f"teacher {name!r} is a {arch or 'model of unknown architecture'} (model_type {model_type!r}); "
        f"hybridize supports: {supported}. Use a checkpoint of one of these families."
    )


def _check_config(config: Any, name: str) -> AttentionLayout:
    """Return the layout of a config's architecture, or raise UnsupportedArchitectureError."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    by_type = [a for a, lay in SUPPORTED_ARCHITECTURES.items() if lay.model_type == model_type]
    arch = archs[0] if archs else (by_type[0] if by_type else None)
    layout = SUPPORTED_ARCHITECTURES.get(arch or "")
    if layout is None or layout.model_type != model_type:
        raise _unsupported(name, arch, model_type)
    return layout


def check_supported(model: nn.Module) -> AttentionLayout:
    """Check that an in-memory model is a supported causal LM and return its layout.

    The class (or one of its bases) must be a supported architecture and its config's
    ``model_type`` must match it.

    Raises:
        UnsupportedArchitectureError: naming the architecture and listing the supported ones.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    for cls in type(model).__mro__:
        layout = SUPPORTED_ARCHITECTURES.get(cls.__name__)
        if layout is not None and model_type in (layout.model_type, f"hybridize_{layout.model_type}"):
            return layout
    raise _unsupported(name, type(model).__name__, model_type)


# -- loading ---------------------------------------------------------------------------------
def _looks_local(path: str) -> bool:
    """True for things that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    return path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or Path(path).exists()


def _resolve(path_or_id: str | Path) -> str:
    path = str(path_or_id)
    if not _looks_local(path):
        return path
    local = Path(path).expanduser()
    if not local.is_dir():
        raise HybridizeError(
            f"teacher path '{path}' does not exist or is not a directory (resolved to '{local.resolve()}'); "
            "pass a local model directory or a hub id such as 'Qwen/Qwen2.5-0.5B'"
        )
    return str(local)


def _load_config(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise HybridizeError(f"teacher {path!r} has no config.json; pass a model directory saved with save_pretrained")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise HybridizeError(
            f"could not read the config of teacher '{path}': {exc}. Pass a local model directory "
            "(offline machines cannot reach the hub) or a valid hub id."
        ) from exc


def _load_tokenizer(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase | None:
    """The tokenizer beside the model, or None when the checkpoint has none."""
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises anything on a damaged file; name the directory
        if local.is_dir():
            raise HybridizeError(f"teacher {path!r}: its tokenizer cannot be loaded ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}); put the tokenizer files saved with this checkpoint there") from exc
        return None  # a hub repo without tokenizer files


@attrs.frozen
class TeacherFiles:
    """What a teacher directory holds, checked without loading its weights: config, layout, tokenizer, path."""

    config: Any
    layout: AttentionLayout
    tokenizer: PreTrainedTokenizerBase | None
    path: str

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)


def inspect_teacher(path_or_id: str | Path, *, trust_remote_code: bool = False) -> TeacherFiles:
    """Every check of a teacher that needs no weights loaded, cheapest first.

    The path exists; ``config.json`` is readable and of a supported architecture; the tokenizer loads
    and fits the vocabulary; a local directory's weights are safetensors files, complete, and match
    the config (tensor names and shapes from the safetensors headers).

    Raises:
        UnsupportedArchitectureError: the checkpoint is not one of :data:`SUPPORTED_ARCHITECTURES`.
        HybridizeError: naming the teacher, the file and the fix.
    """
    from hybridize.model.weights import check_weights_match_config

    path = _resolve(path_or_id)
    config = _load_config(path, trust_remote_code)
    layout = _check_config(config, path)
    tokenizer = _load_tokenizer(path, trust_remote_code)
    _check_vocab(tokenizer, config, path)
    if Path(path).is_dir():
        check_weights_match_config(Path(path), config, f"teacher {path!r}")
    return TeacherFiles(config=config, layout=layout, tokenizer=tokenizer, path=path)


def load_teacher(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> Teacher:
    """Load a supported causal LM as a frozen teacher (eval mode, no gradients).

    The config is read first, so an unsupported architecture fails before any weights load.

    Args:
        path_or_id: a local model directory or a hub id.
        dtype: the weights' dtype; None keeps the checkpoint's.
        device: where to put the model; None leaves it on the CPU.
        trust_remote_code: passed to transformers.

    Returns:
        A :class:`Teacher` with the model, its tokenizer (None if the checkpoint has none) and the path.

    Raises:
        UnsupportedArchitectureError: the checkpoint is not one of :data:`SUPPORTED_ARCHITECTURES`.
        HybridizeError: a local path that does not exist, or a config that cannot be read.
    """
    from transformers import AutoModelForCausalLM

    files = inspect_teacher(path_or_id, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        files.path, config=files.config, attn_implementation=ATTN_IMPLEMENTATION, trust_remote_code=trust_remote_code,
        use_safetensors=True, **kwargs
    )
    check_finite_weights(model, f"teacher {files.path!r}")
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    return Teacher(model=model, tokenizer=files.tokenizer, path=files.path)


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN or inf weight (training it would fail later with a misleading message)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise HybridizeError(
                f"{what}: its weights are not finite: tensor {name!r} holds {nan} NaN and {inf} inf value(s); the "
                "checkpoint is damaged or was saved from a diverged training run. Use a checkpoint with finite weights"
            )


def _check_vocab(tokenizer: PreTrainedTokenizerBase | None, config: Any, path: str) -> None:
    """A tokenizer must not produce ids beyond the model's vocabulary (checked before weights load)."""
    vocab = getattr(config, "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise HybridizeError(
            f"teacher {path!r}: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}, so token "
            f"ids >= {vocab} would index past the embedding; use the tokenizer saved with this checkpoint"
        )


# -- reading attention layers -------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (``model.model.layers``) of a supported causal LM."""
    check_supported(model)
    return model.model.layers


def _attention(model: nn.Module, layer_idx: int) -> nn.Module:
    layers = decoder_layers(model)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        raise HybridizeError(f"attention field 'layer_idx' must be an int in [0, {len(layers)}); got {layer_idx!r}")
    return layers[layer_idx].self_attn


def _linear(attn: nn.Module, name: str, layer_idx: int) -> nn.Linear:
    mod = getattr(attn, name, None)
    if not isinstance(mod, nn.Linear):
        raise HybridizeError(
            f"layer {layer_idx}: self_attn.{name} is {type(mod).__name__}, not nn.Linear; "
            "was this layer already converted to linear attention? Read attention from the teacher."
        )
    return mod


def attention_spec(model: nn.Module, layer_idx: int) -> AttentionSpec:
    """The shapes and options of one teacher attention layer.

    ``head_dim`` comes from the config's ``head_dim`` when set (it may differ from
    ``hidden_size // num_attention_heads``, e.g. Qwen3) and is checked against ``q_proj``.
    """
    return spec_of_attention(_attention(model, layer_idx), model.config, check_supported(model), layer_idx)


def spec_of_attention(attn: nn.Module, config: Any, layout: Any, layer_idx: int) -> AttentionSpec:
    """:func:`attention_spec` of one softmax attention module, given its model's config and family layout."""
    q, k, v, o = (_linear(attn, n, layer_idx) for n in (layout.q_proj, layout.k_proj, layout.v_proj, layout.o_proj))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if q.out_features != heads * head_dim:
        raise HybridizeError(
            f"layer {layer_idx}: q_proj has {q.out_features} outputs but the config says "
            f"num_attention_heads * head_dim = {heads} * {head_dim}"
        )
    return AttentionSpec(
        layer_idx=layer_idx,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        q_bias=q.bias is not None,
        k_bias=k.bias is not None,
        v_bias=v.bias is not None,
        o_bias=o.bias is not None,
        qk_norm=layout.q_norm is not None,
        norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
    )


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def teacher_attention_weights(model: nn.Module, layer_idx: int) -> TeacherAttentionWeights:
    """Detached clones of one teacher attention layer's weights (the teacher is never touched)."""
    layout = check_supported(model)
    spec = attention_spec(model, layer_idx)
    attn = _attention(model, layer_idx)
    q, k, v, o = (getattr(attn, n) for n in (layout.q_proj, layout.k_proj, layout.v_proj, layout.o_proj))
    norms = [getattr(attn, n).weight if n else None for n in (layout.q_norm, layout.k_norm)]
    return TeacherAttentionWeights(
        spec=spec,
        q_weight=_clone(q.weight),
        k_weight=_clone(k.weight),
        v_weight=_clone(v.weight),
        o_weight=_clone(o.weight),
        q_bias=_clone(q.bias),
        k_bias=_clone(k.bias),
        v_bias=_clone(v.bias),
        o_bias=_clone(o.bias),
        q_norm=_clone(norms[0]),
        k_norm=_clone(norms[1]),
    )
