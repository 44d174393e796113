"""The hot path (S6): the routing engine that sends each request to a specialist or the teacher,
and the OpenAI-compatible server built on it.

Importing this package is cheap; the embedder and the specialists load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RoutingEngine", "RoutedAnswer", "RoutedCall", "shared_engine"]

if TYPE_CHECKING:
    from aad_core.serving.engine import RoutedAnswer, RoutedCall, RoutingEngine, shared_engine


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aad_core.serving import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'aad_core.serving' has no attribute {name!r}")
