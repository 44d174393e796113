"""aad core: plugin hooks, registry, data model, trace store, configuration and CLI.

Importing this package is cheap: no torch, transformers or sentence-transformers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aad_core.__about__ import __version__
from aad_core.plugins.hookspecs import hookimpl

# bitsandbytes (imported by peft and sentence-transformers) logs a warning about an optional CPU kernel
# package on import, with no handler of its own, so Python prints it to stderr in the user's agent. A
# NullHandler keeps it quiet unless the application configures logging.
logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "hookimpl",
    # data model
    "Trace", "Message", "ChatRequest", "ToolCall", "FunctionCall", "Usage", "TokenLogprob",
    "Cluster", "Specialist", "RoutingDecision",
    # components and plugins
    "Embedder", "Clusterer", "Scorer", "Selector", "Trainer", "Evaluator", "Router", "Redactor", "Predictor",
    "get_plugin_manager", "get_registry", "create_component",
    # workspace
    "Workspace", "AADSettings", "load_config",
    "AADError",
]

_LAZY = {
    **{n: "aad_core.schema" for n in ("Trace", "Message", "ChatRequest", "ToolCall", "FunctionCall", "Usage",
                                       "TokenLogprob", "Cluster", "Specialist", "RoutingDecision")},
    **{n: "aad_core.plugins" for n in ("Embedder", "Clusterer", "Scorer", "Selector", "Trainer",
                                           "Evaluator", "Router", "Redactor", "Predictor")},
    **{n: "aad_core.plugins" for n in ("get_plugin_manager", "get_registry", "create_component")},
    "Workspace": "aad_core.workspace",
    "AADSettings": "aad_core.config",
    "load_config": "aad_core.config",
    "AADError": "aad_core.errors",
}

if TYPE_CHECKING:
    from aad_core.plugins import (Clusterer, Embedder, Evaluator, Predictor, Redactor, Router, Scorer, Selector,
                                  Trainer)
    from aad_core.config import AADSettings, load_config
    from aad_core.errors import AADError
    from aad_core.plugins import create_component, get_plugin_manager, get_registry
    from aad_core.schema import (ChatRequest, Cluster, FunctionCall, Message, RoutingDecision, Specialist,
                                 TokenLogprob, ToolCall, Trace, Usage)
    from aad_core.workspace import Workspace


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aad_core' has no attribute {name!r}")
