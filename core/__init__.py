"""hybridize: distil a softmax-attention LLM into a linear/softmax hybrid with KL-guided layer selection."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hybridize")

# Public names resolved lazily so that `import hybridize` stays fast (no torch / transformers at import).
_LAZY = {
    "get_plugin_manager": "hybridize.plugins_manager",
    "HybridizePluginManager": "hybridize.plugins_manager",
    "Registry": "hybridize.registry",
    "Entry": "hybridize.registry",
    "ComponentRef": "hybridize.config",
    "AttentionSpec": "hybridize.linear",
    "TeacherAttentionWeights": "hybridize.linear",
    "LinearAttention": "hybridize.linear",
    "load_teacher": "hybridize.teacher",
    "build_student": "hybridize.surgery",
    "SUPPORTED_ARCHITECTURES": "hybridize.teacher",
}

if TYPE_CHECKING:
    from hybridize.config import ComponentRef
    from hybridize.linear import AttentionSpec, LinearAttention, TeacherAttentionWeights
    from hybridize.plugins_manager import HybridizePluginManager, get_plugin_manager
    from hybridize.registry import Entry, Registry
    from hybridize.surgery import build_student
    from hybridize.teacher import SUPPORTED_ARCHITECTURES, load_teacher


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybridize' has no attribute {name!r}")


__all__ = ["hookimpl", "__version__", *_LAZY]
