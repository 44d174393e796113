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

#: aad's loggers (one per package; modules log under ``__name__``).
AAD_LOGGERS = ("aad_core", "aad_plugins", "aad_langchain", "aad_llamaindex")
LOG_LEVEL_ENV = "AAD_LOG_LEVEL"


class _FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes aad's records to stderr only while the application has configured no logging of its own
    (then the application's handlers get them by propagation, as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("aad %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        import sys

        self.stream = sys.stderr
        super().emit(record)


_fallback = _FallbackHandler()


def set_log_level(level: str | int | None) -> None:
    """Set the level of aad's own loggers (and only theirs): ``"INFO"``, ``"DEBUG"``, ``logging.WARNING``...

    Records at that level and above print on stderr when the application has configured no logging;
    otherwise they reach the application's handlers. ``None`` puts back the default: aad's loggers
    inherit the root level, so only warnings and errors print (Python's own fallback). ``AAD_LOG_LEVEL``
    sets it when aad is imported; ``aad --verbose`` sets INFO (``-vv``: DEBUG, which also lets the
    progress bars and warnings of third-party libraries through during model loads).
    """
    if isinstance(level, str):
        name = level.strip().upper()
        resolved = (int(name) if name.isdigit() else logging.getLevelName(name)) if name else None
        if name and not isinstance(resolved, int):
            logging.getLogger("aad_core").warning(
                "%s=%r is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL); ignored.", LOG_LEVEL_ENV, level)
            return
        level = resolved
    for name in AAD_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.NOTSET if level is None else level)
        if level is None:
            logger.removeHandler(_fallback)
        elif _fallback not in logger.handlers:
            logger.addHandler(_fallback)


def _level_from_env() -> None:
    import os

    value = os.environ.get(LOG_LEVEL_ENV)
    if value:
        set_log_level(value)


_level_from_env()

__all__ = [
    "__version__",
    "hookimpl",
    "set_log_level",
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
