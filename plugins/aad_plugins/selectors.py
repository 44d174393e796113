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

from aad_core import hookimpl
from aad_core.components import Selector
from aad_core.errors import param_error

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
    """Greedy maximisation of ``sum_i max_{j in S} sim(i, j) + score_weight * sum_{j in S} s_j``.

    ``sim`` is the cosine similarity of unit embeddings shifted to [0, 1]; scores are min-max
    normalised within the cluster. ``score_weight`` trades informativeness (high KL + entropy)
    against coverage. Without embeddings it falls back to ``top``.
    """

    needs_embeddings = True

    def __init__(self, score_weight: float = 1.0) -> None:
        self.score_weight = score_weight

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        import numpy as np

        _check(ids, scores, type(self).__name__)
        if not (isinstance(self.score_weight, (int, float)) and self.score_weight >= 0):
            raise param_error("score_weight", type(self).__name__, "a float >= 0", self.score_weight)
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
        span = s.max() - s.min() if len(s) else 0.0
        s_norm = (s - s.min()) / span if span > 0 else np.zeros_like(s)
        # Each sample's bonus scales with the cluster size so the two terms stay comparable.
        bonus = self.score_weight * s_norm * len(ids) / max(k, 1)
        covered = np.zeros(len(ids))
        chosen: list[int] = []
        available = np.ones(len(ids), dtype=bool)
        for _ in range(k):
            gains = np.maximum(sim - covered[None, :], 0.0).sum(axis=1) + bonus
            gains[~available] = -np.inf
            best = int(np.argmax(gains))
            chosen.append(best)
            available[best] = False
            covered = np.maximum(covered, sim[best])
        return [ids[i] for i in chosen]


@hookimpl
def aad_register_selectors(register: Any) -> None:
    register("top", TopSelector, description="Top fraction by score per cluster (seed paper: 30 %)")
    register("random", RandomSelector, description="Seeded random fraction per cluster (baseline)")
    register("diverse", DiverseSelector, description="Facility location over embeddings + score (DELIFT-style)")
