"""Registries of plugin components: name -> Entry(factory, config class, origin, capabilities)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import attrs

from hybridize.registry.configs import build_config
from hybridize.errors import DuplicateNameError, PluginReturnError, UnknownComponentError

#: kind -> the registration hook that fills it
KINDS: dict[str, str] = {
    "linear_attention": "hybridize_register_linear_attention",
    "selector": "hybridize_register_selectors",
    "scorer": "hybridize_register_scorers",
    "stop_criterion": "hybridize_register_stop_criteria",
    "evaluator": "hybridize_register_evaluators",
    "exporter": "hybridize_register_exporters",
}


class RegisterCallback(Protocol):
    """The ``register`` callback that registration hooks receive."""

    def __call__(
        self, name: str, factory: Callable[..., Any], config_cls: type, *, capabilities: frozenset[str] = ...
    ) -> None: ...


@attrs.frozen
class Origin:
    """Where a component comes from."""

    module: str
    plugin: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin {self.plugin!r} ({self.module}, {dist})"


@attrs.frozen
class Entry:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config_cls: type
    origin: Origin
    capabilities: frozenset[str] = frozenset()

    def build_config(self, params: Mapping[str, Any] | None = None) -> Any:
        """Build this component's config from user params (unknown keys / wrong types are errors)."""
        return build_config(self.config_cls, params, context=f"{self.kind} {self.name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "factory": f"{self.factory.__module__}.{getattr(self.factory, '__qualname__', self.factory)}",
            "config": self.config_cls.__name__,
            "capabilities": sorted(self.capabilities),
            "module": self.origin.module,
            "plugin": self.origin.plugin,
            "distribution": self.origin.distribution,
            "version": self.origin.version,
        }


class Registry(Mapping[str, Entry]):
    """Read-only mapping of the components of one kind; unknown names raise with 'did you mean'."""

    def __init__(self, kind: str, *, why_missing: Callable[[str], str] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._why_missing = why_missing  # name -> why it may be missing ("" when nothing is known)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            why = self._why_missing(name) if self._why_missing else ""
            raise UnknownComponentError(self.kind.replace("_", " "), name, self._entries, why=why) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, entry: Entry) -> None:
        old = self._entries.get(entry.name)
        if old is not None:
            raise DuplicateNameError(
                f"{self.kind} {entry.name!r} is registered twice: by {old.origin.describe()} and by "
                f"{entry.origin.describe()}. Rename one, or block a plugin with HYBRIDIZE_BLOCKED_PLUGINS."
            )
        self._entries[entry.name] = entry

    def _drop_plugin(self, plugin: str) -> None:
        """Forget what one plugin registered (its hook failed half way)."""
        self._entries = {n: e for n, e in self._entries.items() if e.origin.plugin != plugin}

    def make_register(self, *, plugin: str, hook: str, distribution: str | None, version: str | None) -> RegisterCallback:
        """The callback handed to one plugin's registration hook."""

        def register(name: str, factory: Callable[..., Any], config_cls: type, *, capabilities: frozenset[str] = frozenset()) -> None:
            where = f"plugin {plugin!r} ({distribution or 'no distribution'}) in hook {hook}"
            if not isinstance(name, str) or not name:
                raise PluginReturnError(f"{where} registered name {name!r}; expected a non-empty str")
            if not callable(factory):
                raise PluginReturnError(f"{where} registered {name!r} with factory {factory!r}; expected a callable")
            if not (isinstance(config_cls, type) and attrs.has(config_cls)):
                raise PluginReturnError(f"{where} registered {name!r} with config_cls {config_cls!r}; expected an attrs class")
            if isinstance(capabilities, str) or not all(isinstance(c, str) for c in capabilities):
                raise PluginReturnError(f"{where} registered {name!r} with capabilities {capabilities!r}; expected a set of str")
            origin = Origin(module=factory.__module__, plugin=plugin, distribution=distribution, version=version)
            self._add(Entry(self.kind, name, factory, config_cls, origin, frozenset(capabilities)))

        return register
