"""An example aad plugin: a scorer that ranks samples by the length of the teacher's answer.

Longer answers carry more tokens for the student to learn from; this is a cheap stand-in for the
default ``kl-uncertainty`` scorer that needs no model at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from aad_core import Scorer, Trace, hookimpl


class LengthScorer(Scorer):
    """Score = number of whitespace-separated words in the teacher's answer (times ``weight``).

    Parameters
    ----------
    weight : float
        Multiplier of every score (set in aad.toml as ``[scorer.length] weight``).
    """

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def score(self, traces: Sequence[Trace], *, show_progress: bool = False) -> list[dict[str, float]]:
        out = []
        for trace in traces:
            words = float(len(trace.answer_text().split()))
            out.append({"score": self.weight * words, "answer_words": words})
        return out


@hookimpl
def aad_register_scorers(register):
    register("length", LengthScorer, description="Longer teacher answers first (example plugin)")
