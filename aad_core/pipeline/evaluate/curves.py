"""Learning-curve helpers for the selection experiment (held-out accuracy vs training samples)."""

from __future__ import annotations

from collections.abc import Sequence


def samples_to_reach(budgets: Sequence[float], accuracies: Sequence[float], target: float) -> float | None:
    """The smallest budget at which the curve reaches ``target``, linearly interpolated between
    measured points; None when it never does within the measured budgets."""
    if len(budgets) != len(accuracies):
        raise ValueError(f"budgets and accuracies must have the same length. Got {len(budgets)} and {len(accuracies)} instead.")
    points = sorted(zip(budgets, accuracies))
    prev_b, prev_a = None, None
    for b, a in points:
        if a >= target:
            if prev_b is None or a == prev_a:
                return float(b)
            return float(prev_b + (target - prev_a) / (a - prev_a) * (b - prev_b))
        prev_b, prev_a = b, a
    return None


def sample_ratio(budgets: Sequence[float], selected: Sequence[float], random: Sequence[float], at: float) -> float | None:
    """How many times more samples random selection needs to match the accuracy that the
    selected curve reaches at budget ``at`` (None when random never gets there)."""
    if at not in budgets:
        raise ValueError(f"The 'at' parameter of sample_ratio must be one of the budgets {list(budgets)}. Got {at!r} instead.")
    target = selected[list(budgets).index(at)]
    needed = samples_to_reach(budgets, random, target)
    return None if needed is None else needed / at
