"""aad for LlamaIndex: capture (:class:`AADEventHandler`, :func:`attach` / :func:`detach`) and
routing (:class:`RoutedLLM`).

Requires ``llama-index-core`` (``pip install 'aad[llamaindex]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AADEventHandler", "attach", "detach", "RoutedLLM"]

_LAZY = {
    "AADEventHandler": "aad_llamaindex.events",
    "attach": "aad_llamaindex.events",
    "detach": "aad_llamaindex.events",
    "RoutedLLM": "aad_llamaindex.llm",
}

if TYPE_CHECKING:
    from aad_llamaindex.events import AADEventHandler, attach, detach
    from aad_llamaindex.llm import RoutedLLM


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aad_llamaindex' has no attribute {name!r}")
