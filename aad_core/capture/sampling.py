"""Whether a call is recorded: the capture switch and the sampling rate.

``[capture] enabled`` (``AAD_CAPTURE=0`` turns it off for one process) and ``[capture] sample_rate``
are decided here, in :meth:`CaptureWriter.submit <aad_core.capture.writer.CaptureWriter.submit>`,
which every capture path goes through (the LangChain and LlamaIndex handlers, ``aad serve``, the
router's escalations). Sampling is a hash of the trace id, not a random draw: a call recorded by two
processes, or retried, is kept or dropped the same way everywhere, and a rate of 0.1 keeps the same
ids that a rate of 0.2 keeps (the kept set only grows with the rate).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aad_core.config import CaptureConfig
    from aad_core.schema import Trace


def sample_point(trace_id: str) -> float:
    """A number in [0, 1) fixed by ``trace_id`` (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(trace_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def sampled(trace_id: str, rate: float) -> bool:
    """Whether the trace ``trace_id`` is kept at sampling ``rate`` (1 keeps all, 0 none)."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    return sample_point(trace_id) < rate


def should_record(trace: Trace, capture: CaptureConfig) -> bool:
    """``[capture] enabled`` and the trace's id within ``[capture] sample_rate``."""
    return bool(capture.enabled) and sampled(trace.id, capture.sample_rate)
