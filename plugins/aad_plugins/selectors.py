"""Selectors: which of a cluster's scored training samples the specialist trains on.

* ``top``: the highest scores (the seed paper's top 30 %).
* ``random``: a seeded uniform sample, the baseline every selection should beat.
* ``diverse``: greedy facility location over embeddings plus a score bonus (DELIFT-style), so the
  chosen samples cover the cluster instead of being near-copies of its hardest example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aad_core.errors import param_error
from aad_core.plugins import Selector, hookimpl

if TYPE_CHECKING:
    import numpy as np


def n_selected(n: int, fraction: float) -> int:
    """``ceil(fraction * n)``, at least one (zero for an empty cluster)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise param_error("fraction", "Selector.select", "a float in (0, 1]", fraction)
    return 0 if n == 0 else max(1, math.ceil(fraction * n - 1e-9))


def _check(ids: Sequence[str], scores: Sequence[float], owner: str) -> None:
    if len(ids) != len(scores):
        raise param_error("scores", owner, f"a sequence as long as ids ({len(ids)})", f"{len(scores)} scores")


class TopSelector(Selector):
    """Keep the top ``fraction`` by score; ties are broken by id for reproducibility."""

    needs_embeddings = False

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        _check(ids, scores, type(self).__name__)
        k = n_selected(len(ids), fraction)
        ranked = sorted(zip(ids, scores), key=lambda p: (-float(p[1]), p[0]))
        return [i for i, _ in ranked[:k]]


class RandomSelector(Selector):
    """A seeded uniform sample of ``fraction`` (the baseline)."""

    needs_embeddings = False

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        import numpy as np

        _check(ids, scores, type(self).__name__)
        k = n_selected(len(ids), fraction)
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(ids), size=k, replace=False) if k else []
        return [ids[int(i)] for i in picked]


class DiverseSelector(Selector):
    """Greedy facility location traded off against the divergence score (DELIFT-style).

    Each step picks the sample maximising ``(1 - score_weight) * coverage_gain + score_weight * score``,
    both min-max normalised over the candidates left: ``coverage_gain`` is the facility-location
    gain ``sum_i max(sim(i, j) - covered_i, 0)`` of cosine similarities shifted to [0, 1]. Because
    the coverage gain is renormalised at every step, ``score_weight`` stays a real trade-off all
    the way through: 0 = pure coverage, 1 = ``top``. This keeps every kind of answer in the
    selection even when the student's surprise is a function of the answer alone (e.g. a label):
    plain ``top`` then keeps a few labels and drops the rest. Without embeddings it falls back to ``top``.

    Parameters
    ----------
    score_weight : float
        Weight of the divergence score against coverage, in [0, 1]: 0 = pure coverage, 1 = ``top``.
    """

    needs_embeddings = True

    def __init__(self, score_weight: float = 0.5) -> None:
        self.score_weight = score_weight

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        import numpy as np

        _check(ids, scores, type(self).__name__)
        w = self.score_weight
        if not (isinstance(w, (int, float)) and 0 <= w <= 1):
            raise param_error("score_weight", type(self).__name__, "a float in [0, 1]", w)
        k = n_selected(len(ids), fraction)
        if embeddings is None:
            return TopSelector().select(ids, scores, fraction)
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.shape[0] != len(ids):
            raise param_error("embeddings", type(self).__name__, f"an array with {len(ids)} rows", emb.shape)
        emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
        sim = (emb @ emb.T + 1.0) / 2.0
        s = np.asarray(scores, dtype=np.float64)
        s = np.where(np.isfinite(s), s, np.nanmax(np.where(np.isfinite(s), s, np.nan)) if np.isfinite(s).any() else 0.0)
        s_norm = _minmax(s)
        covered = np.zeros(len(ids))
        chosen: list[int] = []
        available = np.ones(len(ids), dtype=bool)
        for _ in range(k):
            gain = np.maximum(sim - covered[None, :], 0.0).sum(axis=1)
            gain_norm = np.zeros_like(gain)
            gain_norm[available] = _minmax(gain[available], constant=1.0)
            total = (1.0 - w) * gain_norm + w * s_norm
            total[~available] = -np.inf
            best = int(np.argmax(total))
            chosen.append(best)
            available[best] = False
            covered = np.maximum(covered, sim[best])
        return [ids[i] for i in chosen]


def _minmax(values: np.ndarray, constant: float = 0.0) -> np.ndarray:
    """Min-max scale to [0, 1]; all-equal values map to ``constant``."""
    import numpy as np

    span = float(values.max() - values.min()) if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.full_like(values, constant, dtype=np.float64)


@hookimpl
def aad_register_selectors(register: Any) -> None:
    register("top", TopSelector, description="Top fraction by score per cluster (seed paper: 30 %)")
    register("random", RandomSelector, description="Seeded random fraction per cluster (baseline)")
    register("diverse", DiverseSelector, description="Facility location over embeddings + score (DELIFT-style)")
