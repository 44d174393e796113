"""Curation (S2): which traces are fit to cluster, train on and evaluate on.

* Error traces are excluded.
* Exact duplicates (same messages and tools) are dropped; the oldest copy is kept.
* Near-duplicates are dropped: two calls made in the same context (identical system prompt and
  tools) whose conversation part (the user messages / answer of the view) embeds with cosine
  >= ``[cluster] near_duplicate_threshold``. Comparing the conversation part alone matters: the
  shared context would otherwise pull every pair of one agent node close to 1.
* The train / held-out split is made per cluster. Each kept trace gets a seeded hash rank in
  [0, 1); below ``heldout_fraction`` it is held out. A trace keeps its side when the cluster
  grows, and because every duplicate and near-duplicate was reduced to one kept representative,
  no such group can straddle the split.
* A train-side trace whose user feedback marks the teacher's answer wrong
  (:func:`aad_core.formats.answers.teacher_answer_wrong`: quality below 0.5, e.g. ``aad traces
  feedback ID 0`` or ``feedback={"correct": False}``) is moved to the ``"excluded"`` side: it stays
  in its cluster (traffic shares, routing) but is neither selected nor trained on. Held-out traces
  keep their side; the evaluation lowers the teacher's score on them instead.
* A trace made by ``aad augment`` (a teacher-answered paraphrase of a training call) takes no part
  in the split: it is on the training side while its original is, else ``"excluded"``
  (:func:`place_augmented`), so no paraphrase of any call is ever evaluated on.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aad_core.schema import context_key, node_key, request_key

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import Trace


@dataclass
class CurationResult:
    #: Ids kept, in input order.
    kept: list[str]
    #: Dropped id -> reason ("error", "duplicate of <id>", "near-duplicate of <id> (cos 0.991)").
    dropped: dict[str, str] = field(default_factory=dict)
    #: Dropped duplicate id -> the kept id it duplicates (for traffic shares).
    representative: dict[str, str] = field(default_factory=dict)


def curate(
    traces: Sequence[Trace],
    content_vectors: np.ndarray | None,
    *,
    near_duplicate_threshold: float,
) -> CurationResult:
    """Drop error traces, exact duplicates and near-duplicates (see the module doc).

    ``content_vectors`` are unit rows aligned with ``traces`` that embed each trace's conversation
    part; None skips near-duplicate detection.
    """
    import numpy as np

    result = CurationResult(kept=[])
    seen: dict[str, str] = {}
    candidates: list[int] = []
    for i, t in enumerate(traces):
        if t.status == "error":
            result.dropped[t.id] = "error"
            continue
        key = request_key(t)
        if key in seen:
            result.dropped[t.id] = f"duplicate of {seen[key]}"
            result.representative[t.id] = seen[key]
            continue
        seen[key] = t.id
        candidates.append(i)

    near: set[int] = set()
    if content_vectors is not None and len(candidates) > 1:
        X = np.asarray(content_vectors, dtype=np.float32)
        groups: dict[str, list[int]] = defaultdict(list)
        for i in candidates:
            if float(np.linalg.norm(X[i])) > 0:
                groups[context_key(traces[i])].append(i)
        for members in groups.values():
            for i, j, sim in _greedy_near_duplicates(X, members, near_duplicate_threshold):
                near.add(i)
                rep = traces[j].id
                result.dropped[traces[i].id] = f"near-duplicate of {rep} (cos {sim:.3f})"
                result.representative[traces[i].id] = rep
    result.kept = [traces[i].id for i in candidates if i not in near]
    # A duplicate of a dropped near-duplicate counts toward the final representative.
    for dup, rep in list(result.representative.items()):
        while rep in result.representative:
            rep = result.representative[rep]
        result.representative[dup] = rep
    return result


def _greedy_near_duplicates(
    X: np.ndarray, members: list[int], threshold: float, block: int = 1024
) -> list[tuple[int, int, float]]:
    """In order, keep a member unless an earlier kept member is within ``threshold``.
    Returns ``(dropped, kept_representative, similarity)`` triples."""
    import numpy as np

    if len(members) < 2:
        return []
    idx = np.asarray(members)
    M = X[idx]
    kept_mask = np.zeros(len(idx), dtype=bool)
    out: list[tuple[int, int, float]] = []
    for start in range(0, len(idx), block):
        S = M[start : start + block] @ M.T
        for r in range(S.shape[0]):
            a = start + r
            row = S[r, :a]
            hits = np.nonzero((row >= threshold) & kept_mask[:a])[0]
            if hits.size:
                b = int(hits[np.argmax(row[hits])])
                out.append((int(idx[a]), int(idx[b]), float(row[b])))
            else:
                kept_mask[a] = True
    return out


def split_rank(trace_id: str, seed: int) -> float:
    """A seeded, stable pseudo-random number in [0, 1) for a trace id."""
    digest = hashlib.sha256(f"{seed}:{trace_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_clusters(
    assignments: dict[str, int], *, heldout_fraction: float, seed: int
) -> dict[str, str]:
    """Per cluster: a trace is held out when its seeded rank is below ``heldout_fraction``, so its
    side never depends on which other traces exist (re-runs with more traces move nobody from
    held-out to train or back). A cluster of two or more always has at least one held-out and one
    train trace (its lowest / highest rank)."""
    by_cluster: dict[int, list[str]] = defaultdict(list)
    for tid, cid in assignments.items():
        by_cluster[cid].append(tid)
    split: dict[str, str] = {}
    for ids in by_cluster.values():
        ranked = sorted(ids, key=lambda t: (split_rank(t, seed), t))
        for tid in ranked:
            split[tid] = "heldout" if split_rank(tid, seed) < heldout_fraction else "train"
        if len(ranked) > 1:
            if split[ranked[0]] == "train":
                split[ranked[0]] = "heldout"
            if split[ranked[-1]] == "heldout":
                split[ranked[-1]] = "train"
        else:
            split[ranked[0]] = "train"
    return {tid: split[tid] for tid in assignments}


#: The split side of a train trace whose feedback marks the teacher's answer wrong.
EXCLUDED = "excluded"


def exclude_wrong_answers(split: dict[str, str], traces: Mapping[str, Trace]) -> dict[str, str]:
    """Move each ``"train"`` trace of ``split`` whose feedback marks the teacher's answer wrong to the
    :data:`EXCLUDED` side (in place). ``traces`` maps ids to traces. Returns ``{id: reason}`` of the
    traces moved."""
    from aad_core.formats.answers import teacher_answer_wrong, teacher_quality

    moved: dict[str, str] = {}
    for tid, side in split.items():
        trace = traces.get(tid)
        if side == "train" and trace is not None and teacher_answer_wrong(trace):
            split[tid] = EXCLUDED
            moved[tid] = f"feedback marks the teacher's answer wrong (quality {teacher_quality(trace):.2f})"
    return moved


def place_augmented(split: dict[str, str], augmented: Mapping[str, str]) -> dict[str, str]:
    """Put each augmented trace (``{id: original id}``, made by ``aad augment``) on the training side when its
    original is there, else on the :data:`EXCLUDED` side (in place). A paraphrase of a call must never be
    held out: it would leak its original's answer into the evaluation, whichever side that is on. Run it
    after the split of the recorded calls (and :func:`exclude_wrong_answers`). Returns ``{id: reason}`` of
    the augmented traces excluded."""
    moved: dict[str, str] = {}
    for tid, original in augmented.items():
        side = split.get(original) if original else None
        split[tid] = "train" if side == "train" else EXCLUDED
        if side != "train":
            where = "is not a kept call" if side is None else f"is on the {side!r} side"
            moved[tid] = f"augmented from {original or 'an unknown call'}, which {where}"
    return moved
