"""Which specialists may take traffic from the teacher: the risk-coverage gate (promotion) and the
parity figures the report shows next to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aad_core.errors import param_error


@dataclass(frozen=True)
class GateResult:
    promoted: bool
    reason: str
    target: float


def parity_gate(specialist: float, base: float | None, teacher: float, parity: float = 0.95) -> GateResult:
    """Promote iff ``specialist >= parity * teacher`` AND ``specialist > base`` (all on the
    cluster's held-out split, same metric; ``base`` None = the base student was not run, e.g. for a
    classifier specialist). The reason names the figures either way."""
    if not 0 < parity <= 1:
        raise param_error("parity", "parity_gate", "a float in (0, 1]", parity)
    target = parity * teacher
    reaches = specialist >= target - 1e-12
    beats = base is None or specialist > base
    figures = (f"specialist {specialist:.3f}, target {target:.3f} ({parity:.0%} of teacher {teacher:.3f}), "
               + ("base student not run" if base is None else f"base student {base:.3f}"))
    if reaches and beats:
        beaten = "" if base is None else " and beats the base student"
        return GateResult(True, f"promoted: reaches parity{beaten} ({figures})", target)
    if not reaches and not beats:
        why = "below parity and no better than the base student"
    elif not reaches:
        why = "below parity with the teacher"
    else:
        why = "no better than the base student"
    return GateResult(False, f"not promoted: {why} ({figures})", target)


# -- the risk-coverage gate ------------------------------------------------------------------------

@dataclass(frozen=True)
class CoverageGate:
    """The risk-coverage gate's verdict: ``gate`` is what eval.json stores (signal, threshold,
    calibration and test figures, target_agreement, min_coverage)."""

    promoted: bool
    reason: str
    gate: dict[str, Any]


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def signal_value(x: float) -> str:
    """A confidence value as reasons show it: 2 decimals, or 3 significant digits near zero."""
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def coverage_gate(
    calibration: tuple[Sequence[float | None], Sequence[Any]],
    test: tuple[Sequence[float | None], Sequence[Any]],
    *,
    signal: str,
    target_agreement: float = 0.95,
    min_coverage: float = 0.2,
    alpha: float = 0.05,
) -> CoverageGate:
    """Choose the confidence threshold on the ``calibration`` (confidences, per-item agreement)
    pairs (:func:`choose_threshold`), then promote iff on the ``test`` pairs the served share is
    >= ``min_coverage`` (at least one call served) and its agreement is not significantly below
    ``target_agreement``.

    The guarantee comes from the calibration part: the threshold is the largest served share whose
    Clopper-Pearson lower bound reaches the target. The test part, never seen by the choice, is a
    falsification check of that claim: it refuses when a one-sided binomial test rejects "agreement
    >= target" at level ``alpha`` (P(X <= agreeing | served, target) < alpha). A point-estimate rule
    on a few dozen test calls refuses good specialists by chance: a classifier right on 97 % of a
    task fails "agreement >= 0.95 on 24 calls" one time in six, and one right on 95 % one time in three."""
    from aad_core.pipeline.evaluate.risk_coverage import (SIGNAL_LABELS, best_lower_bound, binomial_lower_tail,
                                                          choose_threshold, min_calls_for, served_at)

    if not 0 <= min_coverage <= 1:
        raise param_error("min_coverage", "coverage_gate", "a float in [0, 1]", min_coverage)
    label = SIGNAL_LABELS.get(signal, signal)
    gate: dict[str, Any] = {"signal": signal, "threshold": None, "calibration": None, "test": None,
                            "target_agreement": target_agreement, "min_coverage": min_coverage, "alpha": alpha}
    n_cal, n_test = len(calibration[0]), len(test[0])
    if n_cal == 0 or n_test == 0:
        part = "calibration" if n_cal == 0 else "test"
        return CoverageGate(False, f"not promoted: no held-out calls fell in the {part} part "
                            f"({n_cal} calibration, {n_test} test calls)", gate)
    chosen = choose_threshold(*calibration, target_agreement, alpha)
    if chosen is None:
        closest = best_lower_bound(*calibration, alpha)
        gate["calibration"] = {"n": n_cal, "closest": None if closest is None else closest.to_json()}
        near = ("" if closest is None else f"closest: {_pct(closest.coverage)} at agreement "
                f"{closest.agreement:.3f}, lower bound {closest.lower_bound:.3f}; ")
        need = min_calls_for(target_agreement, alpha)
        return CoverageGate(False, f"not promoted: no threshold on {label} reaches agreement {target_agreement:.2f} "
                            f"with {_pct(1 - alpha)} confidence on {n_cal} calibration calls ({near}a lower bound "
                            f"of {target_agreement:.2f} needs at least {need} agreeing calls)", gate)
    on_test = served_at(*test, chosen.threshold, alpha)
    gate.update(threshold=chosen.threshold, calibration=chosen.to_json(), test=on_test.to_json())
    where = (f"threshold {signal_value(chosen.threshold)} on {label}; calibration: {_pct(chosen.coverage)} at "
             f"{chosen.agreement:.3f}, lower bound {chosen.lower_bound:.3f} on {chosen.n} calls")
    served = f"serves {_pct(on_test.coverage)} of the {on_test.n} test calls at agreement {on_test.agreement:.3f}"
    misses = []
    if on_test.n_served == 0:
        misses.append("none served")
    if on_test.coverage < min_coverage:
        misses.append(f"coverage below min_coverage {_pct(min_coverage)}")
    if on_test.n_served and on_test.agreement < target_agreement - 1e-12:
        p_value = binomial_lower_tail(round(on_test.agreement * on_test.n_served), on_test.n_served, target_agreement)
        gate["test"]["p_below_target"] = p_value
        if p_value < alpha:
            misses.append(f"agreement significantly below target_agreement {target_agreement:.2f} "
                          f"(p = {p_value:.2g} < alpha {alpha:g})")
        else:
            served += (f" (below target_agreement {target_agreement:.2f}, but not significantly: "
                       f"p = {p_value:.2g} >= alpha {alpha:g})")
    if misses:
        return CoverageGate(False, f"not promoted: {served}: {', '.join(misses)} ({where})", gate)
    return CoverageGate(True, f"promoted: {served} ({where})", gate)
