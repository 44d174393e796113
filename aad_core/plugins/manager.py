"""The plugin manager: stevedore finds and imports the ``aad`` entry points, pluggy calls them.

One broken plugin is reported (with its distribution) and skipped; the rest keep working.
pluggy dispatches every hook (registration and observers), so ``tryfirst``/``trylast``/wrappers
behave as pluggy documents.
``AAD_DISABLE_PLUGINS=name,other`` blocks plugins by entry-point name before they are imported.
Core code calls hooks through :class:`Hooks`, a typed facade, never ``pm.hook`` directly.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy
from stevedore import ExtensionManager

from aad_core.plugins import hookspecs
from aad_core.plugins.observers import guard_observers
from aad_core.plugins.registry import KINDS, Registry

if TYPE_CHECKING:
    from aad_core.schema import RoutingDecision, Specialist, Trace

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "aad"
DISABLE_ENV = "AAD_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None
    hooks: list[str] = field(default_factory=list)
    components: list[dict[str, str]] = field(default_factory=list)
    status: str = "loaded"  # loaded | failed | disabled
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def disabled_plugin_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _distributions_by_entry_point() -> dict[tuple[str, str], tuple[str, str]]:
    """(entry-point name, value) -> (distribution name, version)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for dist in importlib.metadata.distributions():
        try:
            eps = dist.entry_points
        except Exception:  # a broken dist-info must not break the listing
            continue
        for ep in eps:
            if ep.group == ENTRY_POINT_GROUP:
                out.setdefault((ep.name, ep.value), (dist.metadata["Name"], dist.version))
    return out


class _Loader(ExtensionManager):
    """stevedore's ExtensionManager that skips disabled names before importing them."""

    def __init__(self, disabled: set[str], on_failure: Any) -> None:
        self._aad_disabled = disabled
        # stevedore memoises entry points per namespace for the process; a new PluginManager
        # must see plugins installed (or put on sys.path) since the last one.
        self.ENTRY_POINT_CACHE.pop(ENTRY_POINT_GROUP, None)
        super().__init__(ENTRY_POINT_GROUP, invoke_on_load=False, on_load_failure_callback=on_failure)

    def _load_one_plugin(self, ep, invoke_on_load, invoke_args, invoke_kwds):  # type: ignore[no-untyped-def]
        if ep.name in self._aad_disabled:
            return None
        return super()._load_one_plugin(ep, invoke_on_load, invoke_args, invoke_kwds)


class PluginManager:
    """Loads plugins, fills the :class:`Registry` through pluggy, and exposes :class:`Hooks`.

    Every hook is dispatched by pluggy. Registration hooks are called once per plugin (a hook caller
    that holds only that plugin's implementations), so each component is credited to the plugin that
    registered it; a plugin added later with :meth:`add_plugin` registers its components right away.
    Observer implementations are guarded when their plugin is added (:mod:`aad_core.plugins.observers`).
    """

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.registry = Registry()
        self.hooks = Hooks(self.pm)
        self._filled = False
        if load_entry_points:
            self._load_entry_points()
        self._fill_registry()

    # -- loading -----------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        dists = _distributions_by_entry_point()
        disabled = disabled_plugin_names()

        def on_failure(_mgr: Any, ep: importlib.metadata.EntryPoint, err: Exception) -> None:
            dist, version = dists.get((ep.name, ep.value), (None, None))
            log.warning("aad plugin %r (%s) failed to load: %s", ep.name, dist or "unknown distribution", err)
            self.plugins[ep.name] = PluginInfo(
                ep.name, ep.value, dist, version, status="failed", error=f"{type(err).__name__}: {err}"
            )

        loader = _Loader(disabled, on_failure)
        for ep in loader.list_entry_points():
            if ep.name in disabled:
                dist, version = dists.get((ep.name, ep.value), (None, None))
                self.plugins[ep.name] = PluginInfo(ep.name, ep.value, dist, version, status="disabled")
        for ext in loader.extensions:
            dist, version = dists.get((ext.name, ext.entry_point.value), (None, None))
            self.add_plugin(ext.plugin, name=ext.name, distribution=dist, version=version)

    def add_plugin(
        self,
        plugin: ModuleType | object,
        *,
        name: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        """Register a plugin object or module by hand (tests, notebooks, applications)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in disabled_plugin_names():
            return
        module = getattr(plugin, "__name__", type(plugin).__name__)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()  # a misspelled hook name fails here, loudly
        except Exception as err:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            log.warning("aad plugin %r failed to register: %s", name, err)
            self.plugins[name] = PluginInfo(name, module, distribution, version, status="failed",
                                            error=f"{type(err).__name__}: {err}")
            return
        origin = f" ({' '.join(p for p in (distribution, version) if p)})" if distribution else ""
        guard_observers(self.pm, plugin, origin)
        hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self.plugins[name] = PluginInfo(name, module, distribution, version, hooks=hooks)
        if self._filled:
            self._register_components_of(name, plugin)

    # -- registry ----------------------------------------------------------------------------
    def _fill_registry(self) -> None:
        for name in list(self.plugins):
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                self._register_components_of(name, plugin)
        self._filled = True

    def _register_components_of(self, plugin_name: str, plugin: object) -> None:
        """Have pluggy call this plugin's ``aad_register_<kind>s`` implementations, and only them."""
        info = self.plugins[plugin_name]
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        for kind in KINDS:
            hook_name = f"aad_register_{kind}s"
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            if not caller.get_hookimpls():
                continue

            def register(name: str, factory: Any, /, _kind: str = kind, **caps: Any) -> None:
                self.registry.register(_kind, name, factory, plugin=plugin_name, distribution=info.distribution,
                                       version=info.version, **caps)
                info.components.append({"kind": _kind, "name": name})

            try:
                caller(register=register)
            except Exception as err:
                log.warning("aad plugin %r failed in %s: %s", plugin_name, hook_name, err)
                info.status, info.error = "failed", f"{hook_name}: {type(err).__name__}: {err}"


class Hooks:
    """Typed calls of the observer hooks; pluggy dispatches each (see :mod:`aad_core.plugins.observers`
    for why an observer that raises is logged, never propagated)."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def trace_captured(self, traces: list[Trace]) -> None:
        self._pm.hook.aad_trace_captured(traces=traces)

    def specialist_trained(self, specialist: Specialist) -> None:
        self._pm.hook.aad_specialist_trained(specialist=specialist)

    def request_routed(self, decisions: list[RoutingDecision]) -> None:
        self._pm.hook.aad_request_routed(decisions=decisions)


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests; after changing sys.path or AAD_DISABLE_PLUGINS)."""
    global _manager
    with _lock:
        _manager = None


def get_registry() -> Registry:
    return get_plugin_manager().registry


def create_component(kind: str, name: str, /, **params: Any) -> Any:
    """Build a registered component by kind and name, e.g. ``create_component("scorer", "kl-uncertainty")``."""
    return get_registry().create(kind, name, **params)
