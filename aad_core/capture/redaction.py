"""S2 helper: redact traces with the configured redactor component."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aad_core.config import AADSettings
from aad_core.schema import Trace


def get_redactor(config: AADSettings, workspace: Any = None):  # -> aad_core.plugins.components.Redactor
    """The ``[capture] redactor`` component with its ``[redactor.<name>]`` table."""
    from aad_core.plugins.params import build_component

    return build_component("redactor", config.capture.redactor, config, workspace=workspace)


def redact_traces(traces: Sequence[Trace], config: AADSettings, workspace: Any = None) -> list[Trace]:
    """Redacted copies of ``traces`` (already-redacted traces pass through unchanged)."""
    todo = [t for t in traces if not t.redacted]
    if not todo:
        return list(traces)
    done = iter(get_redactor(config, workspace).redact(todo))
    return [t if t.redacted else next(done) for t in traces]
