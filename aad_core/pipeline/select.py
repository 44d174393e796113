"""S5a ``aad select``: score every routine cluster's training split, keep the most informative share.

Reads ``.aad/state/clusters.json`` (written by ``aad cluster``), scores each routine cluster's
train-split traces (never one whose user feedback marks the teacher's answer wrong: those are
counted in ``n_excluded``) with the configured scorer (default ``kl-uncertainty`` on the ``[train]``
student), picks ``fraction`` of them with the configured selector, and writes
``.aad/state/selection.json`` (:class:`aad_core.artifacts.Selection`)::

    {"clusters": {"<cid>": {"selected": [trace ids], "scores": {id: {score, kl, entropy, ...}},
                            "label": ..., "n_train": ...}},
     "fraction": 0.3, "selector": "top", "scorer": "kl-uncertainty", "student": ..., "seed": 0}
"""

from __future__ import annotations

from typing import Any

from aad_core.artifacts import ClusterSelection, ClusterState, Selection
from aad_core.errors import AADError, StageError
from aad_core.workspace import Workspace


def routine_train_ids(state: ClusterState) -> dict[int, list[str]]:
    """Train-split trace ids of each routine cluster, in a stable order."""
    return {c.id: sorted(state.train_ids(c.id)) for c in sorted(state.routine_clusters(), key=lambda c: c.id)}


def run_select(
    ws: Workspace,
    *,
    fraction: float | None = None,
    selector: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score and select; returns (and writes) the selection artifact."""
    from aad_core.formats.answers import teacher_answer_wrong
    from aad_core.pipeline.train import kind_for
    from aad_core.plugins.params import build_component, component_params

    cfg = ws.config
    fraction = cfg.select.fraction if fraction is None else fraction
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise AADError(f"The fraction must be in (0, 1]. Got {fraction!r} instead.", hint="e.g. aad select --fraction 0.3")
    selector_name = selector or cfg.select.selector
    chooser = build_component("selector", selector_name, cfg, workspace=ws)
    state = ClusterState.load(ws)
    labels = {c.id: c.label for c in state.clusters}
    per_cluster = routine_train_ids(state)
    if not per_cluster:
        raise StageError("No routine cluster to select from: every cluster is too varied or too small.",
                         hint="Record more traces of the agent's repeated sub-tasks, or raise [cluster] variance_threshold.")

    scorer_params = component_params("scorer", cfg.select.scorer, cfg, workspace=ws)
    scorer = scorer_params.build()

    out: dict[int, ClusterSelection] = {}
    with ws.store() as store:
        for cid, ids in per_cluster.items():
            traces = [t for t in store.iter_traces(ids=ids) if t.response is not None and t.status == "ok"]
            # calls whose feedback marks the teacher's answer wrong: those the cluster stage moved out of the
            # training split, and any whose feedback arrived since it ran
            late = {t.id for t in traces if teacher_answer_wrong(t)}
            traces = [t for t in traces if t.id not in late]
            n_excluded = sum(1 for tid in state.excluded if state.assignments.get(tid) == cid) + len(late)
            if not traces:
                continue
            kept_ids = [t.id for t in traces]
            trainer = kind_for(ws, traces)
            if trainer is None:  # no configured kind fits the task (the train stage says why): nothing to score
                if show_progress:
                    from rich.console import Console

                    Console(stderr=True).print(f"Cluster {cid} ({labels.get(cid, '')}): no configured specialist "
                                               "kind fits its task; not scored")
                out[cid] = ClusterSelection(label=labels.get(cid, ""), n_train=len(kept_ids), selected=kept_ids,
                                            scores={}, n_excluded=n_excluded)
                continue
            keeps_all = not getattr(trainer, "uses_selection", True)
            if keeps_all or fraction >= 1:
                # e.g. the classifier trains on the whole split, and a fraction of 1 keeps every trace:
                # scoring with the student (a forward pass per trace) would be wasted
                if show_progress:
                    from rich.console import Console

                    who = (f"a {trainer.kind} specialist trains on" if keeps_all
                           else "the selection (fraction 1) keeps")
                    Console(stderr=True).print(f"Cluster {cid} ({labels.get(cid, '')}): {who} all {len(traces)} "
                                               "training traces; not scored")
                out[cid] = ClusterSelection(label=labels.get(cid, ""), n_train=len(kept_ids), selected=kept_ids,
                                            scores={}, n_excluded=n_excluded)
                continue
            if getattr(chooser, "needs_scores", True):
                if show_progress:
                    from rich.console import Console

                    Console(stderr=True).print(f"Cluster {cid} ({labels.get(cid, '')}): scoring {len(traces)} "
                                               "training traces")
                scores = scorer.score(traces, show_progress=show_progress)
            else:  # e.g. 'random': the student's forward pass per trace would be wasted
                scores = [{"score": 0.0} for _ in traces]
            embeddings = None
            if getattr(chooser, "needs_embeddings", False):
                from aad_core.models.embedding import embed_texts, get_embedder

                texts = [f"{t.request.last_user_message()}\n{t.answer_text()}" for t in traces]
                embeddings = embed_texts(texts, get_embedder(cfg), cache_dir=ws.cache_dir)
            extra: dict[str, Any] = {}
            if getattr(chooser, "needs_answers", False):  # answer-aware selectors (e.g. 'stratified')
                from aad_core.formats.answers import answer_string

                extra["answers"] = [answer_string(t) for t in traces]
            chosen = chooser.select(kept_ids, [s["score"] for s in scores], fraction, embeddings=embeddings,
                                    seed=cfg.seed, **extra)
            scored = getattr(chooser, "needs_scores", True)
            out[cid] = ClusterSelection(label=labels.get(cid, ""), n_train=len(kept_ids), selected=list(chosen),
                                        scores={tid: s for tid, s in zip(kept_ids, scores)} if scored else {},
                                        n_excluded=n_excluded)
    selection = Selection(clusters=out, fraction=fraction, selector=selector_name, scorer=cfg.select.scorer,
                          student=cfg.train.student,
                          uncertainty_weight=scorer_params.effective.get("uncertainty_weight"), seed=cfg.seed)
    selection.save(ws)
    return selection.to_json()

