"""Hybrid model classes: save_pretrained / from_pretrained / generate for hybrids.

For each supported family there is a config subclass with model type ``hybridize_<family>``
(the teacher's config plus a ``hybridize`` section) and a model subclass that (1) rebuilds the
linear-attention layers named in that section when constructed, so ``from_pretrained`` finds a
home for every saved weight, and (2) gives ``forward`` and ``generate`` a :class:`HybridCache`.
They add no state of their own, so a student built from a teacher becomes a hybrid by a class
change (:func:`as_hybrid`) without copying weights.

``import hybridize`` registers these classes with transformers' Auto classes as soon as
transformers is imported, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a hybrid.
"""
from __future__ import annotations

import contextvars
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from hybridize.errors import HybridizeError
from hybridize.linear import LinearAttention
from hybridize.model.teacher import SUPPORTED_ARCHITECTURES, check_supported, decoder_layers, spec_of_attention

PREFIX = "hybridize_"
_FIX = "save it again with hybridize.save_hybrid (or rerun the run with --resume)"
#: the directory load_hybrid has just verified (its from_pretrained call does not hash it again)
_verified: contextvars.ContextVar[str | None] = contextvars.ContextVar("hybridize_verified", default=None)
#: the plugin manager :func:`load_hybrid` was given, for the variant modules built while transformers loads the hybrid
_load_pm: contextvars.ContextVar[Any] = contextvars.ContextVar("hybridize_load_pm", default=None)


class HybridMixin:
    """Methods shared by every hybrid model class (placed before the family's model class)."""

    def _hybrid_cache(self) -> Any:
        from hybridize.model.cache import HybridCache  # not at import: this module loads while transformers does

        layers = decoder_layers(self)
        linear = [i for i, l in enumerate(layers) if isinstance(l.self_attn, LinearAttention)]
        return HybridCache(len(layers), linear)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        from hybridize.linear import check_hybrid_cache, pop_cache
        from hybridize.model.cache import cache_arg_name

        name = cache_arg_name(type(self).forward)
        cache = pop_cache(f"{type(self).__name__}.generate", model_kwargs)
        check_hybrid_cache(cache, f"{type(self).__name__}.generate")
        if cache is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise HybridizeError(
                    f"generation field 'cache_implementation' must be 'dynamic' for a hybrid; "
                    f"got {generation_config.cache_implementation!r}"
                )
            cache = self._hybrid_cache()
        if cache is not None:
            model_kwargs[name] = cache
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``from_pretrained`` that first checks a local directory against its manifest, as :func:`load_hybrid` does.

        So ``AutoModelForCausalLM.from_pretrained(dir)`` refuses a damaged or half-saved hybrid by name
        instead of loading it (with random or inf weights).
        """
        _verify_saved(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _verify_saved(path: Any, subfolder: str = "") -> None:
    """Check a local hybrid directory against the manifest :func:`save_hybrid` wrote (hub ids are left to transformers)."""
    from hybridize.atomic_io import verify_manifest

    local = Path(str(path)) / subfolder
    if not local.is_dir() or _verified.get() == str(local.resolve()):
        return
    verify_manifest(local, fix=_FIX)


def _rebuild_linear_layers(model: nn.Module) -> None:
    """Replace the attention of the layers listed in ``config.hybridize`` by empty variant modules."""
    _rebuild_backbone(model.model, model.config, check_supported(model))


def _rebuild_backbone(backbone: nn.Module, config: Any, layout: Any) -> None:
    from hybridize.registry.manager import get_plugin_manager

    section = getattr(config, "hybridize", None) or {}
    linear = section.get("linear_layers", [])
    if not linear:
        return
    name = section.get("variant")
    try:
        entry = (_load_pm.get() or get_plugin_manager()).registry("linear_attention")[name]
    except KeyError as exc:
        plugin = section.get("plugin") or {}
        raise HybridizeError(
            f"this hybrid uses linear attention {name!r} from {plugin.get('distribution')} {plugin.get('version')}, "
            f"which is not installed here ({exc}); install that plugin to load it"
        ) from None
    variant_config = entry.build_config(section.get("variant_params") or {})
    for i in linear:
        layer = backbone.layers[i]
        ref = layer.self_attn.o_proj.weight
        spec = spec_of_attention(layer.self_attn, config, layout, i)
        layer.self_attn = entry.factory(spec, variant_config).to(device=ref.device, dtype=ref.dtype)


@functools.cache
def hybrid_classes(family: str) -> tuple[type, type]:
    """(config class, model class) of the hybrid of one family, created once."""
    cfg_cls, model_cls, _ = _hybrid_classes(family)
    return cfg_cls, model_cls


@functools.cache
def hybrid_base_class(family: str) -> type:
    """The hybrid's decoder backbone class of one family (what ``AutoModel`` loads from a hybrid directory)."""
    return _hybrid_classes(family)[2]


@functools.cache
def _hybrid_classes(family: str) -> tuple[type, type, type]:
    from hybridize.model.padding import install_backbone_hooks, install_padding_hook

    arch, layout = next((a, lay) for a, lay in SUPPORTED_ARCHITECTURES.items() if lay.family == family)
    transformers = __import__("transformers", fromlist=[arch])
    base_model = getattr(transformers, arch)
    base_config = base_model.config_class
    backbone_cls = getattr(transformers, arch.replace("ForCausalLM", "Model"))
    cfg_cls = type(f"Hybrid{base_config.__name__}", (base_config,), {"model_type": PREFIX + family})

    def __init__(self: Any, config: Any) -> None:
        base_model.__init__(self, config)
        _rebuild_linear_layers(self)
        install_padding_hook(self)

    def backbone_init(self: Any, config: Any) -> None:
        backbone_cls.__init__(self, config)
        _rebuild_backbone(self, config, layout)
        install_backbone_hooks(self)

    model_cls = type(f"Hybrid{arch}", (HybridMixin, base_model), {"config_class": cfg_cls, "__init__": __init__})
    base_cls = type(f"Hybrid{backbone_cls.__name__}", (backbone_cls,), {"config_class": cfg_cls, "__init__": backbone_init})
    cfg_cls.__module__ = model_cls.__module__ = base_cls.__module__ = __name__
    return cfg_cls, model_cls, base_cls


def register_with_transformers() -> None:
    """Register every family's hybrid with AutoConfig / AutoModelForCausalLM (idempotent)."""
    for layout in SUPPORTED_ARCHITECTURES.values():
        cfg_cls, model_cls = hybrid_classes(layout.family)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        AutoModel.register(cfg_cls, hybrid_base_class(layout.family), exist_ok=True)


def as_hybrid(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a student built by surgery (a teacher-class instance) into its hybrid class, in place."""
    if isinstance(model, HybridMixin):
        return model
    layout = next(lay for cls in type(model).__mro__ if (lay := SUPPORTED_ARCHITECTURES.get(cls.__name__)))
    cfg_cls, model_cls = hybrid_classes(layout.family)
    model.config.__class__ = cfg_cls
    if "model_type" in vars(model.config):
        model.config.model_type = cfg_cls.model_type
    model.config.architectures = [model_cls.__name__]
    model.__class__ = model_cls
    return model


#: what lets stock tools load a saved hybrid (``trust_remote_code``): written beside its weights, named by ``auto_map``
REMOTE_CODE = ("modeling_hybridize.py", "linear_hybridize.py")


def stock_auto_map(config: Any) -> dict[str, str] | None:
    """The ``auto_map`` that loads this hybrid with :mod:`hybridize.model.modeling_hybridize` (no hybridize needed),
    or None when that module cannot run it (a variant other than hybridize's own ``gdn`` / ``gla``, or an option it
    does not know)."""
    from hybridize.model import linear_hybridize
    from hybridize.model.modeling_hybridize import CLASSES

    section = getattr(config, "hybridize", None) or {}
    if section.get("linear_layers"):
        if (section.get("plugin") or {}).get("distribution") != "hybridize":
            return None
        try:
            linear_hybridize.options(section.get("variant"), section.get("variant_params"))
        except ValueError:
            return None
    names = CLASSES.get(str(config.model_type).removeprefix(PREFIX))
    if names is None:
        return None
    return {"AutoConfig": f"modeling_hybridize.{names[0]}", "AutoModelForCausalLM": f"modeling_hybridize.{names[1]}"}


def _write_remote_code(directory: Path) -> None:
    from hybridize.model import linear_hybridize, modeling_hybridize

    for module in (modeling_hybridize, linear_hybridize):
        source = Path(module.__file__)
        (directory / source.name).write_bytes(source.read_bytes())


def save_hybrid(model: PreTrainedModel, path: str | Path, tokenizer: Any = None, *, extra: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` a hybrid (config with its ``hybridize`` section, safetensors, tokenizer).

    For hybridize's own variants the directory also holds :data:`REMOTE_CODE` and ``config.json`` an ``auto_map``,
    so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it without hybridize (and
    ``lm_eval --model hf --model_args pretrained=path,trust_remote_code=True`` evaluates it).

    Everything is written to ``.<name>.tmp`` beside ``path``, then a manifest of sha256 hashes
    (:mod:`hybridize.atomic_io`), then the directory is renamed to ``path``: a directory at ``path``
    is always complete, and :func:`load_hybrid` checks it against the manifest.
    """
    from hybridize import faults
    from hybridize.atomic_io import atomic_dir, write_manifest

    model = as_hybrid(model)
    if extra:
        model.config.hybridize = {**model.config.hybridize, **extra}
    path = Path(path)
    auto_map = stock_auto_map(model.config)
    if auto_map is not None:
        model.config.auto_map = auto_map
    elif hasattr(model.config, "auto_map"):
        del model.config.auto_map

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if auto_map is not None:
            _write_remote_code(tmp)

    def finish(tmp: Path) -> None:
        faults.kill_point("save-model")
        write_manifest(tmp)

    needed = sum(t.nelement() * t.element_size() for t in model.state_dict().values())
    atomic_dir(path, write, needed=needed, before_rename=finish)
    return path


def load_hybrid(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                pm: Any = None) -> PreTrainedModel:
    """Load a saved hybrid (the same as ``AutoModelForCausalLM.from_pretrained`` after ``import hybridize``).

    ``pm``: the plugin manager whose ``linear_attention`` registry builds the variant modules (default: a new one).

    A local directory is first checked against the manifest :func:`save_hybrid` wrote; weights are
    read only from safetensors files.

    Raises:
        IntegrityError: the manifest is missing (an interrupted save) or a file does not match it.
        HybridizeError: the directory holds a model that is not a hybrid.
    """
    from hybridize.atomic_io import read_manifest, verify_manifest
    from hybridize.model.padding import install_padding_hook

    register_with_transformers()
    local = Path(path).is_dir()
    listed = local and read_manifest(path, what="saved hybrid") is not None
    if listed:
        verify_manifest(path, fix=_FIX)
    config = AutoConfig.from_pretrained(path)
    if not str(getattr(config, "model_type", "")).startswith(PREFIX):
        raise HybridizeError(f"{str(path)!r} is a {config.model_type!r} checkpoint, not a hybrid saved by hybridize")
    if local and not listed:
        verify_manifest(path, fix=_FIX)  # raises: no manifest
    token, pm_token = _verified.set(str(Path(path).resolve()) if local else None), _load_pm.set(pm)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
    finally:
        _verified.reset(token)
        _load_pm.reset(pm_token)
    install_padding_hook(model)
    return model.to(device) if device is not None else model


register_with_transformers()
