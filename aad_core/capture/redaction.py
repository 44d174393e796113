"""S2 helper: redact traces with the configured redactor component."""

from __future__ import annotations

from collections.abc import Sequence

from aad_core.config import AADSettings
from aad_core.schema import Trace


def get_redactor(config: AADSettings):  # -> aad_core.plugins.components.Redactor
    from aad_core.plugins import create_component

    return create_component("redactor", config.capture.redactor)


def redact_traces(traces: Sequence[Trace], config: AADSettings) -> list[Trace]:
    """Redacted copies of ``traces`` (already-redacted traces pass through unchanged)."""
    todo = [t for t in traces if not t.redacted]
    if not todo:
        return list(traces)
    done = iter(get_redactor(config).redact(todo))
    return [t if t.redacted else next(done) for t in traces]
