"""The risk-coverage gate's statistics: an exact binomial lower bound on agreement, the confidence
threshold with the largest served share that clears a target agreement, the risk-coverage curve,
and the seeded split of a task's held-out calls into a calibration part and a test part.

A specialist serves a request when its confidence is at or above the threshold; the rest go to the
teacher. The threshold is chosen on the calibration part and checked on the test part, so the
figures that promote a specialist were not used to choose anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from aad_core.errors import param_error

#: The calibration figures of a gate verdict that serving shows (router.json, the escalation reasons).
CALIBRATION_FIGURES = ("coverage", "agreement", "lower_bound", "n_served", "n")
#: How each confidence signal reads in reasons and the report.
SIGNAL_LABELS: dict[str, str] = {"mean_logprob": "mean token log-prob", "confidence": "confidence"}


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and what it serves: ``coverage`` = n_served / n, ``agreement`` = agreeing share
    of the served items, ``lower_bound`` = its one-sided Clopper-Pearson lower bound."""

    threshold: float
    coverage: float
    agreement: float
    lower_bound: float
    n_served: int
    n: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_alpha(alpha: float, where: str) -> None:
    if not 0 < alpha < 1:
        raise param_error("alpha", where, "a float in (0, 1), e.g. 0.05 for 95 % confidence", alpha)


@lru_cache(maxsize=8)
def _log_factorials(n: int) -> Any:
    import numpy as np

    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space."""
    import numpy as np

    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lf = _log_factorials(n)
    i = np.arange(k, n + 1)
    logs = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(logs.max())
    return float(min(1.0, math.exp(top) * float(np.exp(logs - top).sum())))


def clopper_pearson_lower(k: int, n: int, alpha: float = 0.05) -> float:
    """One-sided exact (Clopper-Pearson) lower confidence bound on a binomial proportion: the ``p``
    with ``P(X >= k | n, p) = alpha``, found by bisection. ``k = 0`` gives 0.0; ``k = n`` gives
    ``alpha ** (1 / n)`` (59 of 59 -> 0.9505 at alpha 0.05)."""
    _check_alpha(alpha, "clopper_pearson_lower")
    if not 0 <= k <= n:
        raise param_error("k", "clopper_pearson_lower", f"an integer in [0, n={n}]", k)
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0  # the tail P(X >= k | n, p) grows with p
    for _ in range(60):
        mid = (lo + hi) / 2
        if _upper_tail(k, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def binomial_lower_tail(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p): the one-sided p-value of ``k`` agreeing out of ``n`` against
    "agreement >= p" (small = significantly below ``p``)."""
    if not 0 <= k <= n:
        raise param_error("k", "binomial_lower_tail", f"an integer in [0, n={n}]", k)
    return max(0.0, 1.0 - _upper_tail(k + 1, n, p)) if k < n else 1.0


def min_calls_for(target: float, alpha: float = 0.05) -> int:
    """The fewest calls, all agreeing, whose lower bound reaches ``target``."""
    _check_alpha(alpha, "min_calls_for")
    if not 0 < target < 1:
        return 1 if target <= 0 else 0  # 0 = never
    return math.ceil(math.log(alpha) / math.log(target))


def _sorted_pairs(confidences: Sequence[float], correct: Sequence[Any], where: str) -> list[tuple[float, bool]]:
    if len(confidences) != len(correct):
        raise ValueError(f"The 'confidences' and 'correct' parameters of {where} must have the same length. "
                         f"Got {len(confidences)} and {len(correct)} instead.")
    pairs = []
    for c, ok in zip(confidences, correct):
        value = float("-inf") if c is None or math.isnan(float(c)) else float(c)
        pairs.append((value, bool(float(ok) >= 0.5)))
    return sorted(pairs, key=lambda p: -p[0])


def _cuts(pairs: list[tuple[float, bool]]) -> list[tuple[float, int, int]]:
    """(threshold, served, agreeing) for every distinct finite confidence, highest first; a
    threshold serves every item at or above it, ties included."""
    out: list[tuple[float, int, int]] = []
    agreeing = 0
    for i, (value, ok) in enumerate(pairs):
        agreeing += ok
        last_of_tie = i + 1 == len(pairs) or pairs[i + 1][0] != value
        if last_of_tie and math.isfinite(value):
            out.append((value, i + 1, agreeing))
    return out


def _choice(threshold: float, served: int, agreeing: int, n: int, alpha: float) -> ThresholdChoice:
    return ThresholdChoice(threshold=threshold, coverage=served / n if n else 0.0,
                           agreement=agreeing / served if served else 0.0,
                           lower_bound=clopper_pearson_lower(agreeing, served, alpha) if served else 0.0,
                           n_served=served, n=n)


def choose_threshold(confidences: Sequence[float], correct: Sequence[Any], target: float,
                     alpha: float = 0.05) -> ThresholdChoice | None:
    """The threshold with the largest served share whose served items' agreement has a one-sided
    ``1 - alpha`` Clopper-Pearson lower bound >= ``target``; None when no threshold qualifies.

    ``correct[i]`` is item i's agreement with the teacher (truthy, or a score >= 0.5); a None or
    NaN confidence is never served.
    """
    _check_alpha(alpha, "choose_threshold")
    if not 0 < target <= 1:
        raise param_error("target", "choose_threshold", "a float in (0, 1]", target)
    pairs = _sorted_pairs(confidences, correct, "choose_threshold")
    best = None
    for threshold, served, agreeing in _cuts(pairs):
        # lower bound >= target  <=>  P(X >= agreeing | served, target) <= alpha (the tail grows with p)
        if agreeing / served >= target and _upper_tail(agreeing, served, target) <= alpha:
            best = (threshold, served, agreeing)
    return None if best is None else _choice(*best, len(pairs), alpha)


def best_lower_bound(confidences: Sequence[float], correct: Sequence[Any], alpha: float = 0.05) -> ThresholdChoice | None:
    """The threshold whose served items have the highest lower bound on agreement (the larger
    share on ties): what came closest when :func:`choose_threshold` found none."""
    pairs = _sorted_pairs(confidences, correct, "best_lower_bound")
    options = [_choice(t, s, a, len(pairs), alpha) for t, s, a in _cuts(pairs)]
    return max(options, key=lambda c: (c.lower_bound, c.coverage), default=None)


def served_at(confidences: Sequence[float], correct: Sequence[Any], threshold: float,
              alpha: float = 0.05) -> ThresholdChoice:
    """Coverage and agreement of the items whose confidence is at or above ``threshold``."""
    pairs = _sorted_pairs(confidences, correct, "served_at")
    served = [ok for value, ok in pairs if value >= threshold]
    return _choice(float(threshold), len(served), sum(served), len(pairs), alpha)


def risk_coverage_curve(confidences: Sequence[float], correct: Sequence[Any]) -> list[dict[str, float]]:
    """Agreement of the served share at every threshold, highest threshold (smallest share) first:
    ``[{"threshold", "coverage", "agreement", "n_served"}]``."""
    pairs = _sorted_pairs(confidences, correct, "risk_coverage_curve")
    n = len(pairs)
    return [{"threshold": t, "coverage": s / n, "agreement": a / s, "n_served": s} for t, s, a in _cuts(pairs)]


def calibration_test_split(ids: Sequence[str], seed: int, test_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """(calibration ids, test ids): an id goes to the test part when a seeded hash of it is below
    ``test_fraction``. The side of an id never depends on the other ids, so the train stage (which
    may early-stop on the calibration part) and the evaluation (on a capped held-out list) agree."""
    if not 0 <= test_fraction <= 1:
        raise param_error("test_fraction", "calibration_test_split", "a float in [0, 1]", test_fraction)
    calibration: list[str] = []
    test: list[str] = []
    for tid in ids:
        digest = hashlib.sha256(f"{seed}:risk-coverage:{tid}".encode()).digest()
        (test if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else calibration).append(tid)
    return calibration, test
