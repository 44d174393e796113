"""The parity gate: which specialists may take traffic from the teacher."""

from __future__ import annotations

from dataclasses import dataclass

from aad_core.errors import param_error


@dataclass(frozen=True)
class GateResult:
    promoted: bool
    reason: str
    target: float


def parity_gate(specialist: float, base: float, teacher: float, parity: float = 0.95) -> GateResult:
    """Promote iff ``specialist >= parity * teacher`` AND ``specialist > base`` (all on the
    cluster's held-out split, same metric). The reason names the figures either way."""
    if not 0 < parity <= 1:
        raise param_error("parity", "parity_gate", "a float in (0, 1]", parity)
    target = parity * teacher
    reaches = specialist >= target - 1e-12
    beats = specialist > base
    figures = f"specialist {specialist:.3f}, target {target:.3f} ({parity:.0%} of teacher {teacher:.3f}), base student {base:.3f}"
    if reaches and beats:
        return GateResult(True, f"promoted: reaches parity and beats the base student ({figures})", target)
    if not reaches and not beats:
        why = "below parity and no better than the base student"
    elif not reaches:
        why = "below parity with the teacher"
    else:
        why = "no better than the base student"
    return GateResult(False, f"not promoted: {why} ({figures})", target)
