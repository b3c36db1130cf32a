"""hybridize: distil a softmax-attention LLM into a linear/softmax hybrid with KL-guided layer selection."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib import import_module
from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hybridize")

# Public names resolved lazily so that `import hybridize` stays fast (no torch / transformers at import).
_LAZY = {
    "get_plugin_manager": "hybridize.registry.manager",
    "HybridizePluginManager": "hybridize.registry.manager",
    "Registry": "hybridize.registry.entries",
    "Entry": "hybridize.registry.entries",
    "ComponentRef": "hybridize.registry.configs",
    "AttentionSpec": "hybridize.linear",
    "TeacherAttentionWeights": "hybridize.linear",
    "LinearAttention": "hybridize.linear",
    "load_teacher": "hybridize.model.teacher",
    "build_student": "hybridize.model.surgery",
    "SUPPORTED_ARCHITECTURES": "hybridize.model.teacher",
    "load_hybrid": "hybridize.model.hybrid",
    "save_hybrid": "hybridize.model.hybrid",
    "HybridCache": "hybridize.model.cache",
}

if TYPE_CHECKING:
    from hybridize.model.cache import HybridCache
    from hybridize.registry.configs import ComponentRef
    from hybridize.model.hybrid import load_hybrid, save_hybrid
    from hybridize.linear import AttentionSpec, LinearAttention, TeacherAttentionWeights
    from hybridize.registry.manager import HybridizePluginManager, get_plugin_manager
    from hybridize.registry.entries import Entry, Registry
    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import SUPPORTED_ARCHITECTURES, load_teacher


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybridize' has no attribute {name!r}")


__all__ = ["hookimpl", "__version__", *_LAZY]


# -- registering hybrid model types with transformers --------------------------------------------
# `AutoModelForCausalLM.from_pretrained(hybrid_dir)` must work after `import hybridize`, but importing
# transformers' model classes takes seconds, which `hybridize plugins` should not pay. So the
# registration runs as soon as transformers itself is imported (now, if it already is).
def _register_hybrids() -> None:
    import_module("hybridize.model.hybrid")  # registers at the end of its import (also when it is mid-import now)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_hybrids` right after ``import transformers`` completes."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register_hybrids()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register_hybrids()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())
