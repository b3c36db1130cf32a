"""The plugin manager: hookspecs -> entry points (group ``hybridize``) -> check_pending -> registries."""
from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable
from typing import Any

import pluggy

from hybridize import hookspecs
from hybridize.errors import PluginLoadError
from hybridize.registry import KINDS, Registry

ENTRY_POINT_GROUP = "hybridize"
ENV_DISABLE_AUTOLOAD = "HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCKED = "HYBRIDIZE_BLOCKED_PLUGINS"


def _env_blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV_BLOCKED, "").split(",") if n.strip()}


class HybridizePluginManager(pluggy.PluginManager):
    """A pluggy manager that also builds one :class:`Registry` per component kind.

    Registries are built lazily from the registration hooks and rebuilt whenever a plugin
    is registered or unregistered, so a test can register a small plugin class on a fresh
    manager and see it at once.
    """

    def __init__(self) -> None:
        super().__init__("hybridize")
        self.add_hookspecs(hookspecs)
        self._dist: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._registries: dict[str, Registry] = {}

    # -- registration ---------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self._registries.clear()
        return super().register(plugin, name=name)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        self._registries.clear()
        return super().unregister(plugin, name=name)

    def load_entrypoints(self, *, blocked: Iterable[str] = (), skip_broken: bool = False) -> list[str]:
        """Load the ``hybridize`` entry points one at a time; return the names loaded.

        Args:
            blocked: entry-point names to skip (also read from ``HYBRIDIZE_BLOCKED_PLUGINS``).
            skip_broken: warn instead of raising when a plugin fails to import.
        """
        blocked = set(blocked) | _env_blocked()
        loaded = []
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in blocked:
                self.set_blocked(ep.name)
                continue
            if self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                continue
            dist = ep.dist.metadata["Name"] if ep.dist else None
            version = ep.dist.version if ep.dist else None
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
                err = PluginLoadError(
                    f"Plugin entry point {ep.name!r} = {ep.value!r} from distribution "
                    f"{dist or '?'} {version or ''} failed to load: {type(exc).__name__}: {exc}. "
                    f"Fix or uninstall that distribution, or skip it with {ENV_BLOCKED}={ep.name}."
                )
                if not skip_broken:
                    raise err from exc
                warnings.warn(str(err), stacklevel=2)
                continue
            self.register(plugin, name=ep.name)
            if dist:
                self._dist[ep.name] = (dist, version)
            loaded.append(ep.name)
        return loaded

    # -- registries ---------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of one component kind (``linear_attention``, ``selector``, ...)."""
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        if kind not in self._registries:
            self._registries[kind] = self._build_registry(kind)
        return self._registries[kind]

    def _build_registry(self, kind: str) -> Registry:
        hook_name = KINDS[kind]
        reg = Registry(kind)
        impls = getattr(self.hook, hook_name).get_hookimpls()
        for impl in impls:
            others = [i.plugin for i in impls if i.plugin is not impl.plugin]
            caller = self.subset_hook_caller(hook_name, remove_plugins=others)
            plugin = self.get_name(impl.plugin) or repr(impl.plugin)
            dist, version = self._dist.get(plugin, (None, None))
            caller(register=reg.make_register(plugin=plugin, hook=hook_name, distribution=dist, version=version))
        return reg

    def plugin_info(self) -> list[dict[str, Any]]:
        """One dict per registered plugin: name, distribution, version, hooks it implements."""
        out = []
        for name, plugin in sorted(self.list_name_plugin(), key=lambda p: p[0]):
            if plugin is None:
                continue
            dist, version = self._dist.get(name, (None, None))
            hooks = sorted(c.name for c in self.get_hookcallers(plugin) or [])
            out.append({"name": name, "distribution": dist, "version": version, "hooks": hooks})
        return out

    def versions(self) -> dict[str, dict[str, str | None]]:
        """plugin name -> {distribution, version}: recorded with every result."""
        return {p["name"]: {"distribution": p["distribution"], "version": p["version"]} for p in self.plugin_info()}


def get_plugin_manager(
    *, autoload: bool | None = None, blocked: Iterable[str] = (), skip_broken: bool = False
) -> HybridizePluginManager:
    """Build a fresh plugin manager: hookspecs, entry points, then ``check_pending``.

    Args:
        autoload: load entry points; defaults to True unless ``HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD`` is set.
        blocked: entry-point names not to load (added to ``HYBRIDIZE_BLOCKED_PLUGINS``).
        skip_broken: warn about plugins that fail to import instead of raising ``PluginLoadError``.
    """
    pm = HybridizePluginManager()
    if autoload is None:
        autoload = not os.environ.get(ENV_DISABLE_AUTOLOAD)
    if autoload:
        pm.load_entrypoints(blocked=blocked, skip_broken=skip_broken)
    pm.check_pending()
    return pm
