"""Exceptions raised by hybridize. Every user-facing error names the field or plugin and the fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

import pluggy


class HybridizeError(Exception):
    """Base class of every error hybridize raises on purpose."""


class RemoteError(HybridizeError):
    """Raised on the other ranks of a torchrun job when a step that rank 0 runs alone failed there (rank 0 reports it)."""


class ConfigError(HybridizeError, ValueError):
    """One or more configuration problems, collected into a single error.

    Args:
        problems: one message per problem, each naming the field and the rule.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} configuration problems:\n{lines}")


class UnknownComponentError(ConfigError, KeyError):
    """A component name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str], *, why: str = ""):
        self.kind, self.name = kind, name
        self.available = sorted(available)
        close = difflib.get_close_matches(name, self.available, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        avail = ", ".join(self.available) or "(none registered)"
        why = f". {why}" if why else ""  # e.g. an environment variable kept the plugin that provides it from loading
        super().__init__(f"Unknown {kind} {name!r}.{hint} Available: {avail}{why}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DuplicateNameError(HybridizeError):
    """Two plugins registered the same component name."""


class PluginLoadError(HybridizeError):
    """An entry-point plugin failed to import or to register."""


class PluginHookNameError(PluginLoadError, pluggy.PluginValidationError):
    """A plugin implements a hook that hybridize does not define (a misspelt hook name)."""

    def __init__(self, plugin: object, message: str):
        pluggy.PluginValidationError.__init__(self, plugin, message)


class PluginLoadWarning(UserWarning):
    """A broken plugin was skipped (``--skip-broken-plugins``)."""


class PluginReturnError(HybridizeError):
    """A plugin passed something unexpected to a registration callback."""


class ExportError(HybridizeError):
    """A hybrid cannot be exported as asked: a variant or option with no place in the format, a layout that holds
    it only approximately without ``--heal-tokens``, or a format this installation cannot write."""


class UnsupportedArchitectureError(HybridizeError, ValueError):
    """The teacher is not one of the supported causal-LM families."""


def unknown_name(kind: str, name: str, available: Iterable[str]) -> UnknownComponentError:
    """Build the 'Unknown <kind> ... Did you mean ...' error (lm-eval style)."""
    return UnknownComponentError(kind, name, available)
