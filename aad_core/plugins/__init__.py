"""The public plugin API: everything a plugin (the defaults included) needs from aad's plugin system.

* :data:`hookimpl` marks hook implementations; :mod:`aad_core.plugins.hookspecs` documents every hook.
* The component base classes (:class:`Embedder`, :class:`Clusterer`, :class:`Scorer`,
  :class:`Selector`, :class:`Trainer`, :class:`Evaluator`, :class:`Router`, :class:`Redactor`), and
  :class:`Predictor`, what a trainer of a specialist kind other than "lora" serves.
* :func:`create_component` builds another registered component by kind and name.

The plugin manager (loading, dispatch, the registry) loads lazily on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aad_core.plugins.components import (Clusterer, Component, Embedder, Evaluator, Predictor, Redactor, Router,
                                         Scorer, Selector, Trainer)
from aad_core.plugins.hookspecs import Register, hookimpl

__all__ = [
    "hookimpl", "Register",
    "Component", "Embedder", "Clusterer", "Scorer", "Selector", "Trainer", "Evaluator", "Router", "Redactor",
    "Predictor", "PluginManager", "PluginInfo", "Hooks", "get_plugin_manager", "reset_plugin_manager", "get_registry",
    "create_component",
]

_MANAGER_NAMES = ("PluginManager", "PluginInfo", "Hooks", "get_plugin_manager", "reset_plugin_manager",
                  "get_registry", "create_component")

if TYPE_CHECKING:
    from aad_core.plugins.manager import (Hooks, PluginInfo, PluginManager, create_component, get_plugin_manager,
                                          get_registry, reset_plugin_manager)


def __getattr__(name: str) -> Any:
    if name in _MANAGER_NAMES:
        from aad_core.plugins import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'aad_core.plugins' has no attribute {name!r}")
