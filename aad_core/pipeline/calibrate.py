"""Router calibration: per-cluster similarity thresholds, output kinds and confidence thresholds.

Thresholds come from the training split (so the held-out split stays unseen for the evaluation):
a low quantile (``[route] threshold_quantile``) of the cluster's own requests' similarities,
lowered to the middle of the margin when every other cluster's request stays below it, and
raised when needed to the cut that best keeps other clusters' requests out. The held-out split is
then routed with those thresholds and the result written to ``.aad/state/router_eval.json`` as a
confusion matrix (routine -> specialist, everything else -> teacher). Each promoted specialist's
confidence threshold is the one the risk-coverage gate chose for it in ``eval.json``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import ClusterState, RouterEval, RouterState, still_teacher_only
from aad_core.errors import StageError

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import Specialist, Trace
    from aad_core.workspace import Workspace

#: The most the margin rule lowers a cluster's threshold below its quantile cut.
MAX_MARGIN_DROP = 0.05
__all__ = ["calibrate_router", "evaluate_router", "routing_confusion", "separation_threshold", "still_teacher_only",
           "teacher_only_nodes"]


def teacher_only_nodes(ws: Workspace, state: Any, served: set[int] | Sequence[int],
                       min_calls: int) -> dict[str, dict[str, Any]]:
    """{node key: {"calls": n, "clusters": [...]}} of the agent nodes whose training-split calls (at
    least ``min_calls``) all sit in clusters outside ``served``: the router can send their requests
    to the teacher unembedded, for as long as none of those clusters gets a specialist."""
    from aad_core.schema import node_key

    if min_calls <= 0:
        return {}
    ids = [t for t, s in state.split.items() if s == "train" and t in state.assignments]
    nodes: dict[str, dict[str, Any]] = {}
    for trace in _load(ws, ids):
        if not trace.request.system_prompt():  # no system prompt: no agent node to recognise
            continue
        node = nodes.setdefault(node_key(trace), {"calls": 0, "clusters": set()})
        node["calls"] += 1
        node["clusters"].add(int(state.assignments[trace.id]))
    keep = still_teacher_only(nodes, served, min_calls)
    return {k: {"calls": nodes[k]["calls"], "clusters": sorted(nodes[k]["clusters"])} for k in sorted(keep)}


def separation_threshold(own: Sequence[float], intruders: Sequence[float]) -> float | None:
    """The cut that misroutes fewest of ``own`` (below it) plus ``intruders`` (at or above it).

    Among equally good cuts the one in the middle of the widest gap is taken. None when there
    are no intruders (nothing to keep out).
    """
    if not intruders:
        return None
    points = sorted([(float(s), True) for s in own] + [(float(s), False) for s in intruders])
    values = [v for v, _ in points]
    n_intr = len(intruders)
    best: tuple[int, float, float] | None = None  # (cost, -gap, cut)
    own_below = intr_below = 0
    for i in range(len(points) + 1):
        # The cut admits points[i:]: misroutes = own below it + intruders at or above it.
        if i == 0:
            lo, hi = values[0] - 0.02, values[0]
        elif i == len(points):
            lo, hi = values[-1], values[-1] + 0.02
        else:
            lo, hi = values[i - 1], values[i]
        if hi > lo:
            cost = own_below + (n_intr - intr_below)
            key = (cost, -(hi - lo), (lo + hi) / 2)
            if best is None or key[:2] < best[:2]:
                best = key
        if i < len(points):
            own_below += points[i][1]
            intr_below += not points[i][1]
    return None if best is None else float(best[2])


def _quantile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def _sample(ids: list[str], k: int, seed: int) -> list[str]:
    if len(ids) <= k:
        return ids
    return sorted(random.Random(seed).sample(ids, k))


def _load(ws: Workspace, ids: Sequence[str]) -> list[Trace]:
    store = ws.store()
    try:
        return list(store.iter_traces(ids=ids))
    finally:
        store.close()


def calibrate_router(ws: Workspace, *, show_progress: bool = True, confidence: bool = True) -> dict[str, Any]:
    """Calibrate every cluster's threshold, take each promoted specialist's confidence threshold
    from the eval gate (``confidence=False``: none, every validated answer is served), evaluate the
    router on the held-out split, and save ``router.json`` and ``router_eval.json``. Returns the
    saved router state."""
    import numpy as np

    from aad_core.models.embedding import embed_requests
    from aad_core.formats.kinds import output_kind_of
    from aad_core.specialists import SpecialistRegistry

    cfg = ws.config
    rc = cfg.route
    state = ClusterState.load(ws)
    if not state.clusters:
        raise StageError("There are no clusters to route to.", hint="Run 'aad cluster' first.")
    cids = [c.id for c in state.clusters]
    cents = np.asarray([c.centroid for c in state.clusters], dtype=np.float32)
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    specialists = SpecialistRegistry(ws).promoted()

    by_cluster_train: dict[int, list[str]] = {c: [] for c in cids}
    for tid, cid in state.assignments.items():
        if state.split.get(tid) == "train" and cid in by_cluster_train:
            by_cluster_train[cid].append(tid)
    calib_ids = {c: _sample(sorted(ids), rc.max_calibration_samples, cfg.seed) for c, ids in by_cluster_train.items()}
    flat = [(c, t) for c, ids in calib_ids.items() for t in ids]
    traces = {t.id: t for t in _load(ws, [t for _, t in flat])}
    flat = [(c, t) for c, t in flat if t in traces]
    emb = embed_requests([traces[t].request for _, t in flat], cfg, cache_dir=ws.cache_dir, show_progress=show_progress)
    sims = emb @ cents.T if len(flat) else np.zeros((0, len(cids)))
    nearest = sims.argmax(axis=1) if len(flat) else np.zeros(0, dtype=int)
    flat_clusters = np.asarray([c for c, _ in flat], dtype=np.int64)

    shapes = _request_shapes(ws, by_cluster_train)
    clusters_out: dict[str, Any] = {}
    for j, cid in enumerate(cids):
        own = [float(sims[i, j]) for i, (c, _) in enumerate(flat) if c == cid and nearest[i] == j]
        intruders = [float(sims[i, j]) for i, (c, _) in enumerate(flat) if c != cid and nearest[i] == j]
        t_q = _quantile(own, rc.threshold_quantile) if own else rc.default_threshold
        # Every other cluster's request, wherever it lands: the closest one marks where foreign
        # requests begin. When they all stay below the quantile cut, the cut moves to the middle of
        # that empty margin, so a member slightly weaker than the training sample still gets in.
        foreign = sims[flat_clusters != cid, j]
        foreign_max = float(foreign.max()) if foreign.size else None
        t_margin = None
        if own and foreign_max is not None and foreign_max < t_q:
            # At most MAX_MARGIN_DROP below the quantile: calibration sees only known traffic, and
            # the quantile is also the guard against requests of kinds never recorded.
            t_margin = max((t_q + foreign_max) / 2, t_q - MAX_MARGIN_DROP)
        t_low = t_margin if t_margin is not None else t_q
        t_sep = separation_threshold(own, intruders)
        threshold = max(t_low, t_sep) if t_sep is not None else t_low
        spec = specialists.get(cid)
        clusters_out[str(cid)] = {
            "threshold": round(float(threshold), 5),
            "quantile_threshold": round(float(t_q), 5),
            "closest_foreign": None if foreign_max is None else round(foreign_max, 5),
            "margin_threshold": None if t_margin is None else round(float(t_margin), 5),
            "separation_threshold": None if t_sep is None else round(float(t_sep), 5),
            "n_own": len(own),
            "n_intruders": len(intruders),
            "intruders_admitted": sum(1 for s in intruders if s >= threshold),
            "own_rejected": sum(1 for s in own if s < threshold),
            # the drift monitor compares the mean similarity of recent requests with this
            "mean_own_similarity": round(sum(own) / len(own), 5) if own else None,
            "output_kind": output_kind_of([traces[t] for c, t in flat if c == cid]),
            "routine": bool(next(c.routine for c in state.clusters if c.id == cid)),
            "specialist": spec.name if spec else None,
            "confidence_threshold": None,
            "request_shape": shapes.get(cid),
        }

    if confidence and specialists:
        _confidence_thresholds(ws, specialists, clusters_out)

    RouterState(
        router=rc.router,
        seed=cfg.seed,
        embedder=cfg.embed.embedder,
        embed_model=cfg.component_table("embedder", cfg.embed.embedder).get("model"),
        view=[p for p in cfg.embed.view if p != "answer"],
        threshold_quantile=rc.threshold_quantile,
        clusters={int(cid): entry for cid, entry in clusters_out.items()},
        teacher_nodes=teacher_only_nodes(ws, state, set(specialists), rc.teacher_node_min_calls),
    ).save(ws)
    evaluation = evaluate_router(ws, state, cents, cids, clusters_out, show_progress=show_progress)
    RouterEval.from_json(evaluation).save(ws)
    saved = RouterState.load(ws)
    return {**saved.stamp, **saved.to_json(),
            "evaluation": {k: evaluation[k] for k in ("accuracy", "n") if k in evaluation}}


def _request_shapes(ws: Workspace, by_cluster: dict[int, list[str]]) -> dict[int, dict[str, Any] | None]:
    """Each cluster's training shape (most user turns and messages, tool results, bound tools) over every
    call of its training split: the routing engine sends a request outside it to the teacher."""
    from aad_core.serving.request_shape import request_shape, shape_envelope

    owner = {t: c for c, ids in by_cluster.items() for t in ids}
    shapes: dict[int, list[dict[str, Any]]] = {c: [] for c in by_cluster}
    store = ws.store()
    try:
        for trace in store.iter_traces(ids=sorted(owner)):
            shapes[owner[trace.id]].append(request_shape(trace.request))
    finally:
        store.close()
    return {c: shape_envelope(s) for c, s in shapes.items()}


#: The fields of a task's router.json entry that follow the specialist version it serves.
_SERVED_FIELDS = ("specialist", "confidence_threshold", "confidence_signal", "confidence_label",
                  "confidence_calibration", "confidence_note")

_REFRESH_LOCK = threading.Lock()


def refresh_served_gates(ws: Workspace) -> bool:
    """Make router.json follow the versions the tasks serve now, after a promotion, demotion or
    rollback that ran no calibration: each task takes the confidence threshold its served version's own
    gate chose (the similarity thresholds stay; nothing is embedded). False when there is no router.json."""
    from aad_core.specialists import SpecialistRegistry

    # Shadow demotions run on the server's worker threads: one at a time, each reading the registry
    # afresh, so that the last to write router.json wrote what the registry says now.
    with _REFRESH_LOCK:
        saved = RouterState.load_optional(ws)
        if saved is None:
            return False
        served = SpecialistRegistry(ws).promoted()
        clusters_out: dict[str, Any] = {}
        for cid, entry in saved.clusters.items():
            spec = served.get(cid)
            clusters_out[str(cid)] = {**{k: v for k, v in entry.items() if k not in _SERVED_FIELDS},
                                      "specialist": spec.name if spec else None, "confidence_threshold": None}
        _confidence_thresholds(ws, {c: s for c, s in served.items() if str(c) in clusters_out}, clusters_out)
        saved.clusters = {int(cid): entry for cid, entry in clusters_out.items()}
        saved.save(ws)
        return True


def _confidence_thresholds(ws: Workspace, specialists: dict[int, Specialist], clusters_out: dict[str, Any]) -> None:
    """Each promoted specialist's confidence threshold, signal and calibration figures: those the
    risk-coverage gate chose when it evaluated that very specialist version (``eval.json``, else the
    verdict its manifest keeps: eval.json holds only the newest version of each task). A version no
    gate has judged (promoted by hand before any 'aad eval') serves without a threshold, and says so."""
    from aad_core.artifacts import EvalReport
    from aad_core.pipeline.evaluate.risk_coverage import CALIBRATION_FIGURES, SIGNAL_LABELS
    from aad_core.specialists import SpecialistRegistry

    evaluation = EvalReport.load_optional(ws)
    entries = {int(r["cluster_id"]): r for r in (evaluation.evaluated() if evaluation else [])}
    registry = SpecialistRegistry(ws)
    for cid, spec in specialists.items():
        entry = entries.get(cid) or {}
        gate, evaluated = entry.get("gate") or {}, entry.get("specialist") or {}
        if (evaluated.get("name"), evaluated.get("version")) != (spec.name, spec.version):
            try:
                gate = registry.manifest(spec).get("gate") or {}
            except (OSError, ValueError):  # no readable manifest: no verdict
                gate = {}
        if gate.get("threshold") is None:
            clusters_out[str(cid)]["confidence_note"] = (
                "promoted by parity: no confidence threshold" if gate.get("mode") else
                f"{spec.name} v{spec.version} has no gate verdict of its own (promoted by hand?): it serves without "
                "a confidence threshold; 'aad eval' judges the newest version of its task")
            continue
        calibration = gate.get("calibration") or {}
        signal = str(gate.get("signal") or "mean_logprob")
        clusters_out[str(cid)].update(
            confidence_threshold=float(gate["threshold"]),
            confidence_signal=signal,
            confidence_label=SIGNAL_LABELS.get(signal, signal),
            confidence_calibration={k: calibration.get(k) for k in CALIBRATION_FIGURES},
        )


def evaluate_router(ws: Workspace, state: Any, cents: np.ndarray, cids: list[int], clusters_out: dict[str, Any],
                    *, show_progress: bool = False) -> dict[str, Any]:
    """Route the held-out split with the calibrated thresholds: routine requests of a served
    cluster should reach that cluster's specialist, every other request the teacher."""
    import numpy as np

    from aad_core.models.embedding import embed_requests

    served = {int(c): v["specialist"] for c, v in clusters_out.items() if v.get("specialist")}
    routine = {int(c) for c, v in clusters_out.items() if v.get("routine")}
    heldout = [t for t, s in state.split.items() if s == "heldout" and t in state.assignments]
    traces = _load(ws, heldout)
    emb = embed_requests([t.request for t in traces], ws.config, cache_dir=ws.cache_dir, show_progress=show_progress)
    truth = [state.assignments[t.id] for t in traces]
    thresholds = {int(c): float(v["threshold"]) for c, v in clusters_out.items()}
    result = routing_confusion(emb, truth, cents, cids, thresholds, served)
    # What the router would do if every routine cluster had a promoted specialist.
    all_routine = routing_confusion(emb, truth, cents, cids, thresholds, {c: f"cluster-{c}" for c in routine})
    result["if_all_routine_served"] = {k: all_routine[k] for k in ("matrix", "accuracy", "n")}
    result["served_clusters"] = sorted(served)
    result["routine_clusters"] = sorted(routine)
    result["split"] = "heldout"
    del np
    return result


def routing_confusion(
    emb: np.ndarray, truth: Sequence[int], cents: np.ndarray, cids: Sequence[int],
    thresholds: dict[int, float], served: dict[int, str],
) -> dict[str, Any]:
    """Confusion matrix of routing decisions: rows = routine (served cluster) / complex, columns =
    specialist / teacher. A routine request sent to another cluster's specialist counts as wrong."""
    import numpy as np

    matrix = [[0, 0], [0, 0]]
    wrong_specialist = 0
    if len(truth):
        sims = np.asarray(emb, dtype=np.float32) @ np.asarray(cents, dtype=np.float32).T
        best = sims.argmax(axis=1)
        for i, true_cid in enumerate(truth):
            cid = int(cids[int(best[i])])
            to_spec = cid in served and float(sims[i, best[i]]) >= thresholds.get(cid, 1.0)
            row = 0 if true_cid in served else 1
            matrix[row][0 if to_spec else 1] += 1
            if row == 0 and to_spec and cid != true_cid:
                wrong_specialist += 1
    n = sum(map(sum, matrix))
    correct = matrix[0][0] - wrong_specialist + matrix[1][1]
    return {
        "labels": ["routine", "complex"],
        "targets": ["specialist", "teacher"],
        "matrix": matrix,
        "wrong_specialist": wrong_specialist,
        "accuracy": round(correct / n, 5) if n else None,
        "routine_recall": round((matrix[0][0] - wrong_specialist) / sum(matrix[0]), 5) if sum(matrix[0]) else None,
        "complex_recall": round(matrix[1][1] / sum(matrix[1]), 5) if sum(matrix[1]) else None,
        "n": n,
    }
