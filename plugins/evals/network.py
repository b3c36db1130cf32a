"""No network unless asked: the Hugging Face offline switches and nltk's download on import.

lm-eval, ``datasets`` and ``huggingface_hub`` read their offline switches when they are imported, so
:func:`network` sets the environment variables and, for modules already imported (a run has loaded
its data through ``datasets`` before it evaluates), their constants as well; both are restored on exit.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

#: (module, attribute) of offline constants that libraries read once at import
_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def network(online: bool) -> Iterator[None]:
    """Within the block, Hugging Face libraries stay offline unless ``online``."""
    if online:
        yield
        return
    old_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    os.environ.update({k: "1" for k in OFFLINE_VARS})
    old_consts = []
    for mod, attr in _CONSTANTS:
        if mod in sys.modules and hasattr(sys.modules[mod], attr):
            old_consts.append((sys.modules[mod], attr, getattr(sys.modules[mod], attr)))
            setattr(sys.modules[mod], attr, True)
    try:
        with _no_nltk_download():
            yield
    finally:
        for module, attr, value in old_consts:
            setattr(module, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _no_nltk_download() -> Iterator[None]:
    """lm-eval's RULER module calls ``nltk.download('punkt_tab')`` on import; offline, that is skipped."""
    try:
        import nltk
    except ImportError:
        yield
        return
    real = nltk.download
    nltk.download = lambda *args, **kwargs: False  # type: ignore[assignment]
    try:
        yield
    finally:
        nltk.download = real


def is_offline_error(exc: BaseException) -> bool:
    """True when an exception (or its cause) looks like a refused or failed hub access."""
    seen = 0
    while exc is not None and seen < 8:
        text = f"{type(exc).__name__}: {exc}".lower()
        if any(w in text for w in ("offline", "connection", "couldn't reach", "could not reach", "not found on the hub",
                                   "doesn't exist on the hub", "datasetnotfound", "max retries", "name resolution")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
