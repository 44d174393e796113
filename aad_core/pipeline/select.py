"""S5a ``aad select``: score every routine cluster's training split, keep the most informative share.

Reads ``.aad/state/clusters.json`` (written by ``aad cluster``), scores each routine cluster's
train-split traces with the configured scorer (default ``kl-uncertainty`` on the ``[train]``
student), picks ``fraction`` of them with the configured selector, and writes
``.aad/state/selection.json``::

    {"clusters": {"<cid>": {"selected": [trace ids], "scores": {id: {score, kl, entropy, ...}},
                            "label": ..., "n_train": ...}},
     "fraction": 0.3, "selector": "top", "scorer": "kl-uncertainty", "student": ..., "seed": 0}
"""

from __future__ import annotations

from typing import Any

from aad_core.errors import AADError, StageError
from aad_core.workspace import Workspace

SELECTION_FILE = "selection.json"
CLUSTERS_FILE = "clusters.json"


def load_cluster_state(ws: Workspace) -> dict[str, Any]:
    """The raw ``clusters.json`` artifact (clusters, assignments, split)."""
    state = ws.read_state(CLUSTERS_FILE, stage_hint="aad cluster")
    for key in ("clusters", "assignments", "split"):
        if key not in state:
            raise StageError(f"{ws.state_path(CLUSTERS_FILE)} has no {key!r} key (written by an older aad?).",
                             hint="Run 'aad cluster' again.")
    return state


def routine_train_ids(state: dict[str, Any]) -> dict[int, list[str]]:
    """Train-split trace ids of each routine cluster, in a stable order."""
    routine = {int(c["id"]) for c in state["clusters"] if c.get("routine")}
    out: dict[int, list[str]] = {cid: [] for cid in sorted(routine)}
    for tid, cid in state["assignments"].items():
        if cid is not None and int(cid) in routine and state["split"].get(tid) == "train":
            out[int(cid)].append(tid)
    for ids in out.values():
        ids.sort()
    return out


def load_selection(ws: Workspace) -> dict[str, Any]:
    return ws.read_state(SELECTION_FILE, stage_hint="aad select")


def run_select(
    ws: Workspace,
    *,
    fraction: float | None = None,
    selector: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score and select; returns (and writes) the selection artifact."""
    from aad_core.plugins import create_component, get_registry

    cfg = ws.config
    fraction = cfg.select.fraction if fraction is None else fraction
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise AADError(f"The fraction must be in (0, 1]. Got {fraction!r} instead.", hint="e.g. aad select --fraction 0.3")
    selector_name = selector or cfg.select.selector
    chooser = create_component("selector", selector_name)
    state = load_cluster_state(ws)
    labels = {int(c["id"]): c.get("label", "") for c in state["clusters"]}
    per_cluster = routine_train_ids(state)
    if not per_cluster:
        raise StageError("No routine cluster to select from: every cluster is too varied or too small.",
                         hint="Record more traces of the agent's repeated sub-tasks, or raise [cluster] variance_threshold.")

    scorer_info = get_registry().get("scorer", cfg.select.scorer)
    scorer_params = {"student": cfg.train.student, "uncertainty_weight": cfg.select.uncertainty_weight,
                     "batch_size": cfg.select.batch_size, "max_length": cfg.train.max_length}
    scorer = create_component("scorer", cfg.select.scorer, **_accepted(scorer_info, scorer_params))

    out: dict[str, Any] = {}
    with ws.store() as store:
        for cid, ids in per_cluster.items():
            traces = [t for t in store.iter_traces(ids=ids) if t.response is not None and t.status == "ok"]
            if not traces:
                continue
            if show_progress:
                from rich.console import Console

                Console(stderr=True).print(f"Cluster {cid} ({labels.get(cid, '')}): scoring {len(traces)} training traces")
            scores = scorer.score(traces, show_progress=show_progress)
            kept_ids = [t.id for t in traces]
            embeddings = None
            if getattr(chooser, "needs_embeddings", False):
                from aad_core.models.embedding import embed_texts, get_embedder

                texts = [f"{t.request.last_user_message()}\n{t.answer_text()}" for t in traces]
                embeddings = embed_texts(texts, get_embedder(cfg), cache_dir=ws.cache_dir)
            chosen = chooser.select(kept_ids, [s["score"] for s in scores], fraction, embeddings=embeddings, seed=cfg.seed)
            out[str(cid)] = {
                "label": labels.get(cid, ""),
                "n_train": len(kept_ids),
                "selected": list(chosen),
                "scores": {tid: s for tid, s in zip(kept_ids, scores)},
            }
    artifact = {
        "clusters": out,
        "fraction": fraction,
        "selector": selector_name,
        "scorer": cfg.select.scorer,
        "student": cfg.train.student,
        "uncertainty_weight": cfg.select.uncertainty_weight,
        "seed": cfg.seed,
    }
    ws.write_state(SELECTION_FILE, artifact)
    return artifact


def _accepted(info: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` the component's factory accepts (third-party scorers may take fewer)."""
    import inspect

    factory = getattr(info, "factory", None)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return params
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return params
    return {k: v for k, v in params.items() if k in sig.parameters}
