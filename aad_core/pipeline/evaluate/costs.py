"""Latency percentiles and cost per 1M tokens, teacher vs specialist."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def latency_summary(values_ms: Sequence[float | None]) -> dict[str, Any]:
    """p50 / p95 / mean of the known latencies (None when there are none)."""
    import numpy as np

    vals = np.asarray([v for v in values_ms if v is not None], dtype=float)
    if vals.size == 0:
        return {"p50_ms": None, "p95_ms": None, "mean_ms": None, "n": 0}
    return {
        "p50_ms": float(np.percentile(vals, 50)),
        "p95_ms": float(np.percentile(vals, 95)),
        "mean_ms": float(vals.mean()),
        "n": int(vals.size),
    }


def specialist_price_per_mtok(hardware_price_per_hour: float, seconds: float, tokens: int) -> float | None:
    """USD per 1M tokens: the hardware's price for the measured time, spread over the tokens
    processed (prompt + generated) in that time."""
    if tokens <= 0 or seconds <= 0:
        return None
    return hardware_price_per_hour * (seconds / 3600.0) / tokens * 1e6


def recorded_price_per_mtok(costs: Sequence[float | None], tokens: Sequence[int | None]) -> float | None:
    """USD per 1M tokens from the traces' recorded costs, when they have them."""
    pairs = [(c, t) for c, t in zip(costs, tokens) if c is not None and t]
    total_tokens = sum(t for _, t in pairs)
    if not pairs or total_tokens <= 0:
        return None
    return sum(c for c, _ in pairs) / total_tokens * 1e6
