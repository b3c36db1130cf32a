"""The plugin manager: hookspecs -> entry points (group ``hybridize``) -> check_pending -> registries."""
from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable
from typing import Any

import difflib

import pluggy

from hybridize import hookspecs
from hybridize.errors import HybridizeError, PluginHookNameError, PluginLoadError, PluginLoadWarning, PluginReturnError
from hybridize.registry.entries import KINDS, Registry

ENTRY_POINT_GROUP = "hybridize"
ENV_DISABLE_AUTOLOAD = "HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCKED = "HYBRIDIZE_BLOCKED_PLUGINS"
ENV_SKIP_BROKEN = "HYBRIDIZE_SKIP_BROKEN_PLUGINS"  # what --skip-broken-plugins sets for the command it runs


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
        self.skip_broken = False  # warn about a broken plugin and go on without it
        self.collect_broken = False  # record broken plugins in ``broken`` silently (``hybridize plugins``)
        self.broken: list[HybridizeError] = []  # PluginLoadError / PluginReturnError of the plugins left out
        self.autoload_disabled_by_env = False
        self.env_blocked: dict[str, str] = {}  # installed entry points that HYBRIDIZE_BLOCKED_PLUGINS blocks -> "dist version"

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
        self.skip_broken = self.skip_broken or skip_broken
        env_blocked = _env_blocked()
        blocked = set(blocked) | env_blocked
        loaded = []
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.metadata["Name"] if ep.dist else None
            version = ep.dist.version if ep.dist else None
            if ep.name in blocked:
                self.set_blocked(ep.name)
                if ep.name in env_blocked:
                    self.env_blocked[ep.name] = f"{dist} {version}" if dist else "not from a distribution"
                continue
            if self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any import (or hook signature) failure is the plugin's
                err = PluginLoadError(
                    f"Plugin entry point {ep.name!r} = {ep.value!r} from distribution "
                    f"{dist or '?'} {version or ''} failed to load: {type(exc).__name__}: {_one_line(exc)}. "
                    f"Fix or uninstall that distribution, or skip it with {ENV_BLOCKED}={ep.name}."
                )
                self._broken(err, exc)
                continue
            if dist:
                self._dist[ep.name] = (dist, version)
            loaded.append(ep.name)
        return loaded

    def _broken(self, err: HybridizeError, cause: BaseException | None = None) -> None:
        """Raise ``err``, or (``--skip-broken-plugins``, ``hybridize plugins``) record it and go on."""
        if not (self.skip_broken or self.collect_broken):
            if err is cause or cause is None:
                raise err
            raise err from cause
        self.broken.append(err)
        if not self.collect_broken:
            warnings.warn(f"skipping a broken plugin: {err}", PluginLoadWarning, stacklevel=3)

    def describe(self, plugin: str) -> str:
        """``plugin 'x' (distribution 1.0)`` for messages."""
        dist, version = self._dist.get(plugin, (None, None))
        return f"plugin {plugin!r} ({f'{dist} {version}' if dist else 'not from a distribution'})"

    def check_hook_names(self) -> None:
        """``check_pending`` with a message a user can act on: the plugin, the unknown hook and the likely name."""
        known = [n for n, h in vars(self.hook).items() if n[0] != "_" and h.has_spec()]
        for name, hook in list(vars(self.hook).items()):
            if name[0] == "_" or hook.has_spec():
                continue
            for impl in hook.get_hookimpls():
                if impl.optionalhook or self.get_name(impl.plugin) is None:
                    continue
                plugin = self.get_name(impl.plugin)
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f" Did you mean {close[0]!r}?" if close else f" Hybridize's hooks: {', '.join(sorted(known))}."
                err = PluginHookNameError(impl.plugin, (
                    f"{self.describe(plugin)} implements the hook {name!r}, which hybridize does not define.{hint} "
                    f"Rename it in that plugin, or skip the plugin with {ENV_BLOCKED}={plugin}."))
                self._broken(err)
                self.unregister(impl.plugin)
        self.check_pending()

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
        reg = Registry(kind, why_missing=self._why_missing)
        impls = getattr(self.hook, hook_name).get_hookimpls()
        for impl in impls:
            others = [i.plugin for i in impls if i.plugin is not impl.plugin]
            caller = self.subset_hook_caller(hook_name, remove_plugins=others)
            plugin = self.get_name(impl.plugin) or repr(impl.plugin)
            dist, version = self._dist.get(plugin, (None, None))
            try:
                caller(register=reg.make_register(plugin=plugin, hook=hook_name, distribution=dist, version=version))
            except PluginReturnError as exc:  # it names the plugin, the hook and what was expected
                reg._drop_plugin(plugin)
                self._broken(exc)
            except HybridizeError:  # a duplicate name: two plugins are involved, the message names both
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the plugin's hook raised is the plugin's
                reg._drop_plugin(plugin)
                self._broken(PluginLoadError(
                    f"P{self.describe(plugin)[1:]} failed in its hook {hook_name}: "
                    f"{type(exc).__name__}: {_one_line(exc)}. Fix or uninstall that distribution, or skip the plugin "
                    f"with {ENV_BLOCKED}={plugin}."), exc)
        return reg

    def _why_missing(self, name: str) -> str:
        """Why a component may be missing: autoload disabled, or a blocked plugin that may provide it."""
        if self.autoload_disabled_by_env:
            return (f"{ENV_DISABLE_AUTOLOAD} is set, so no plugin was loaded, not even the built-ins; "
                    f"unset {ENV_DISABLE_AUTOLOAD} to use {name!r}")
        if not self.env_blocked:
            return ""
        likely = [p for p in self.env_blocked if _may_provide(p, name)] or list(self.env_blocked)
        plugins = ", ".join(f"{p!r} ({self.env_blocked[p]})" for p in likely)
        return (f"{ENV_BLOCKED}={os.environ.get(ENV_BLOCKED, '').strip()} blocks the installed plugin"
                f"{'s' if len(likely) > 1 else ''} {plugins}, which may provide it; remove "
                f"{'it' if len(likely) == 1 else 'the one that does'} from {ENV_BLOCKED} to use {name!r}")

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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _may_provide(plugin: str, name: str) -> bool:
    """A blocked entry point whose name looks like the component's (``kl_greedy`` for ``kl-greedy-add``)."""
    p, n = (s.lower().replace("-", "_") for s in (plugin, name))
    return p == n or n.startswith(p + "_") or p.startswith(n)


def get_plugin_manager(
    *, autoload: bool | None = None, blocked: Iterable[str] = (), skip_broken: bool = False, collect_broken: bool = False
) -> HybridizePluginManager:
    """Build a fresh plugin manager: hookspecs, entry points, then ``check_pending``.

    Args:
        autoload: load entry points; defaults to True unless ``HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD`` is set.
        blocked: entry-point names not to load (added to ``HYBRIDIZE_BLOCKED_PLUGINS``).
        skip_broken: warn about broken plugins (failing to import, an unknown hook, a hook that raises) and go
            on without them, instead of raising ``PluginLoadError``; also on when ``HYBRIDIZE_SKIP_BROKEN_PLUGINS`` is set.
        collect_broken: record broken plugins in ``pm.broken`` without a warning (``hybridize plugins`` reports them).
    """
    pm = HybridizePluginManager()
    pm.skip_broken = skip_broken or bool(os.environ.get(ENV_SKIP_BROKEN))
    pm.collect_broken = collect_broken
    if autoload is None:
        autoload = not os.environ.get(ENV_DISABLE_AUTOLOAD)
        pm.autoload_disabled_by_env = not autoload
    if autoload:
        pm.load_entrypoints(blocked=blocked)
    pm.check_hook_names()
    return pm
