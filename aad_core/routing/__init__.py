"""S6 routing: per-cluster thresholds, output validators, the confidence gate and the escalation
loop that sends a request to a specialist or the teacher.

Importing this package is cheap; the embedder and the specialists load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "RoutingEngine", "RoutedAnswer", "calibrate_router", "load_router_state",
    "ValidationResult", "validate_json", "validate_sql", "validate_tool_calls", "validate_output",
    "parse_tool_calls",
]

_LAZY = {
    "RoutingEngine": "aad_core.routing.engine",
    "RoutedAnswer": "aad_core.routing.engine",
    "calibrate_router": "aad_core.routing.calibration",
    "load_router_state": "aad_core.routing.calibration",
    **{n: "aad_core.routing.validators" for n in ("ValidationResult", "validate_json", "validate_sql",
                                                  "validate_tool_calls", "validate_output")},
    "parse_tool_calls": "aad_core.routing.tool_calls",
}

if TYPE_CHECKING:
    from aad_core.routing.calibration import calibrate_router, load_router_state
    from aad_core.routing.engine import RoutedAnswer, RoutingEngine
    from aad_core.routing.tool_calls import parse_tool_calls
    from aad_core.routing.validators import (ValidationResult, validate_json, validate_output, validate_sql,
                                             validate_tool_calls)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aad_core.routing' has no attribute {name!r}")
