"""Surgery: turn a teacher into a hybrid student.

The student is a deep copy of the teacher in which every layer NOT in ``softmax_layers``
gets a linear-attention module built by a variant plugin from that teacher layer's
q/k/v/o weights. The teacher itself is never modified.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from hybridize.registry.configs import config_to_dict
from hybridize.errors import ConfigError, PluginReturnError
from hybridize.linear import LinearAttention
from hybridize.registry.entries import Entry
from hybridize.model.padding import install_padding_hook
from hybridize.model.teacher import Teacher, attention_spec, decoder_layers, teacher_attention_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hybridize.registry.manager import HybridizePluginManager

# -- validation --------------------------------------------------------------------------------
def check_softmax_layers(value: Any, num_layers: int, *, field: str = "build_student field 'softmax_layers'") -> list[int]:
    """Validate ``softmax_layers`` against a model of ``num_layers`` layers; return it sorted.

    Args:
        value: the layer indices.
        num_layers: the teacher's layer count.
        field: how messages name the field (the preflight names the run config's).

    Raises:
        ConfigError: naming the field, the bad value and the valid range.
    """
    where = f"{field} must"
    valid = f"0 <= i < {num_layers} (the teacher has {num_layers} layers)"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} be a list of layer indices {valid}; got {value!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"{where} hold only int layer indices {valid}; got {value!r}")
    problems = []
    bad = [i for i in value if not 0 <= i < num_layers]
    if bad:
        problems.append(f"{where} hold layer indices {valid}; got {list(value)!r} (out of range: {bad})")
    repeated = sorted({i for i in value if list(value).count(i) > 1})
    if repeated:
        problems.append(f"{where} hold distinct layer indices {valid}; got {list(value)!r} (repeated: {repeated})")
    if problems:
        raise ConfigError(problems)
    return sorted(value)


def as_hybrid(model: nn.Module) -> nn.Module:
    """Give a student its hybrid class (cache handling, save/load); see :mod:`hybridize.model.hybrid`."""
    from hybridize.model.hybrid import as_hybrid as convert

    return convert(model)


def _resolve_variant(variant: str | Entry, pm: HybridizePluginManager | None) -> Entry:
    if isinstance(variant, Entry):
        return variant
    if pm is None:
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    return pm.registry("linear_attention")[variant]


# -- building --------------------------------------------------------------------------------------
def _build_linear(teacher: nn.Module, layer_idx: int, entry: Entry, config: Any) -> LinearAttention:
    """Build the variant for one layer from the teacher's weights, on the teacher's device and dtype."""
    module = entry.factory(attention_spec(teacher, layer_idx), config)
    if not isinstance(module, LinearAttention):
        raise PluginReturnError(
            f"linear_attention {entry.name!r} from {entry.origin.describe()}: its factory returned a "
            f"{type(module).__name__}; expected a subclass of hybridize.LinearAttention"
        )
    module.load_teacher_weights(teacher_attention_weights(teacher, layer_idx))
    ref = decoder_layers(teacher)[layer_idx].self_attn.q_proj.weight
    return module.to(device=ref.device, dtype=ref.dtype)


def _record(student: nn.Module, softmax: list[int], entry: Entry, config: Any) -> None:
    n = len(decoder_layers(student))
    student.config.hybridize = {
        "softmax_layers": softmax,
        "linear_layers": [i for i in range(n) if i not in softmax],
        "variant": entry.name,
        "variant_params": config_to_dict(config),
        "plugin": {"distribution": entry.origin.distribution, "version": entry.origin.version},
    }


def build_student(
    teacher: PreTrainedModel | Teacher,
    softmax_layers: Sequence[int],
    variant: str | Entry,
    params: dict[str, Any] | None = None,
    *,
    pm: HybridizePluginManager | None = None,
) -> PreTrainedModel:
    """Build a hybrid student: a copy of the teacher with linear attention outside ``softmax_layers``.

    Args:
        teacher: a supported causal LM (or the :class:`~hybridize.model.teacher.Teacher` from ``load_teacher``).
        softmax_layers: indices of the layers that keep softmax attention; all others become linear.
        variant: a registered linear-attention name (e.g. ``"gdn"``) or a registry ``Entry``.
        params: the variant's config params; unknown keys and wrong types are a ConfigError.
        pm: the plugin manager to look ``variant`` up in; a fresh one by default.

    Returns:
        The student, trainable (``requires_grad`` True), with the padding hook installed and
        ``config.hybridize`` recording the layers, the variant, its params and its plugin.

    Raises:
        ConfigError: bad ``softmax_layers`` or ``params``; an unknown variant name (did-you-mean).
        UnsupportedArchitectureError: the teacher is not a supported family.
    """
    if isinstance(teacher, Teacher):
        teacher = teacher.model
    softmax = check_softmax_layers(softmax_layers, len(decoder_layers(teacher)))
    entry = _resolve_variant(variant, pm)
    config = entry.build_config(params)
    student = copy.deepcopy(teacher).requires_grad_(True)
    for i, layer in enumerate(decoder_layers(student)):
        if i not in softmax:
            layer.self_attn = _build_linear(teacher, i, entry, config).train(student.training)
    _record(student, softmax, entry, config)
    install_padding_hook(student)
    return as_hybrid(student)


def assemble_student(
    teacher: PreTrainedModel,
    softmax_layers: Sequence[int],
    linear: dict[int, nn.Module],
    variant: str | Entry,
    params: dict[str, Any] | None = None,
    *,
    pm: HybridizePluginManager | None = None,
) -> PreTrainedModel:
    """A student that shares every tensor with ``teacher`` and ``linear`` by reference (nothing is copied).

    The module tree is new (so one student's flags, hooks and owned tensors never touch another's), but
    each parameter and buffer is the teacher's (its layers in ``softmax_layers``, embeddings, MLPs, norms)
    or that of ``linear[i]`` (the linear layers, e.g. the shared stage-1 modules). Selection probes are
    built this way, then own a copy of what they train only. ``requires_grad`` is left as it is.

    Raises:
        ConfigError: bad ``softmax_layers``, or a linear layer missing from ``linear``.
    """
    softmax = check_softmax_layers(softmax_layers, len(decoder_layers(teacher)))
    missing = [i for i in range(len(decoder_layers(teacher))) if i not in softmax and i not in linear]
    if missing:
        raise ConfigError(f"assemble_student field 'linear' must hold a module for every linear layer; missing {missing}")
    entry = _resolve_variant(variant, pm)
    config = entry.build_config(params)
    memo: dict[int, Any] = {}
    for module in (teacher, *linear.values()):
        memo.update({id(t): t for t in (*module.parameters(), *module.buffers())})
    skip = {id(decoder_layers(teacher)[i].self_attn): None for i in linear if i not in softmax}  # replaced below
    student = copy.deepcopy(teacher, {**memo, **skip})
    for i, layer in enumerate(decoder_layers(student)):
        if i not in softmax:
            layer.self_attn = copy.deepcopy(linear[i], dict(memo)).train(student.training)
    _record(student, softmax, entry, config)
    install_padding_hook(student)
    return as_hybrid(student)


# -- inspection ------------------------------------------------------------------------------------
def linear_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose attention is linear (a :class:`LinearAttention`)."""
    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, LinearAttention)]


def softmax_layers(model: nn.Module) -> list[int]:
    """Indices of the layers that keep the teacher's softmax attention."""
    linear = set(linear_layers(model))
    return [i for i in range(len(decoder_layers(model))) if i not in linear]
