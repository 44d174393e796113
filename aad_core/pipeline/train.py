"""S5b ``aad train``: one adapter per routine cluster on its selected traces.

The cluster's held-out split drives early stopping. Each run trains in
``.aad/specialists/.work/c<id>/``; an interrupted run with the same inputs resumes from its
checkpoint there. The finished adapter becomes the next version in the specialist registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from aad_core.errors import AADError
from aad_core.schema import Specialist
from aad_core.workspace import Workspace

WORK_DIR = ".work"


def run_train(
    ws: Workspace,
    *,
    cluster_id: int | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    answer_hints: int | None = None,
    show_progress: bool = True,
) -> list[Specialist]:
    """Train the routine clusters in ``selection.json`` (or only ``cluster_id``); return the new specialists."""
    from aad_core.artifacts import ClusterState, Selection
    from aad_core.plugins.params import component_params
    from aad_core.specialists import SpecialistRegistry

    cfg = ws.config
    selection = Selection.load(ws)
    state = ClusterState.load(ws)
    clusters = {c.id: c for c in state.clusters}
    chosen = selection.clusters
    if cluster_id is not None:
        if int(cluster_id) not in chosen:
            raise AADError(
                f"Cluster {cluster_id} has no selection (selected clusters: {', '.join(map(str, sorted(chosen))) or 'none'}).",
                hint="Pick a routine cluster from 'aad clusters', or run 'aad select' after 'aad cluster'.",
            )
        todo = [int(cluster_id)]
    else:
        todo = sorted(chosen)

    # the arguments (aad train --epochs ...) win over [trainer.<name>]; a trainer that lacks one says so
    given = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "answer_hints": answer_hints}.items()
             if v is not None}
    trainer_params = component_params("trainer", cfg.train.trainer, cfg, params=given,
                                      params_source="a run_train() argument (aad train option)", workspace=ws)
    params = trainer_params.effective
    registry = SpecialistRegistry(ws)
    out: list[Specialist] = []
    with ws.store() as store:
        for cid in todo:
            entry = chosen[cid]
            train = [t for t in store.iter_traces(ids=entry.selected) if t.response is not None]
            heldout_ids = sorted(state.heldout_ids(cid))
            heldout = [t for t in store.iter_traces(ids=heldout_ids) if t.response is not None and t.status == "ok"]
            if not train:
                raise AADError(f"Cluster {cid}: none of its {len(entry.selected)} selected traces is in the store.",
                               hint="Run 'aad select' again.")
            label = (clusters[cid].label if cid in clusters else "") or entry.label
            if show_progress:
                from rich.console import Console

                Console(stderr=True).print(
                    f"Cluster {cid} ({label}): training on {len(train)} selected traces, {len(heldout)} held out")
            work = _work_dir(ws, cid, params, entry.selected)
            trainer = trainer_params.build()
            metrics = trainer.train(train, heldout, work, show_progress=show_progress)
            spec = registry.save(
                cluster_id=cid,
                label=label,
                adapter_dir=work,
                base_model=str(cfg.train.student),
                centroid=list(clusters[cid].centroid) if cid in clusters else [],
                selection=list(entry.selected),
                hyperparameters={"trainer": cfg.train.trainer, **params,
                                 "selection": {"fraction": selection.fraction, "selector": selection.selector,
                                               "scorer": selection.scorer}},
                metrics=metrics,
                seed=cfg.seed,
            )
            out.append(spec)
    return out


def _work_dir(ws: Workspace, cid: int, params: dict[str, Any], selected: list[str]) -> Path:
    """The cluster's training folder; emptied when its inputs differ from an earlier, unfinished run."""
    key = hashlib.sha256(json.dumps({"params": params, "selected": sorted(selected)}, sort_keys=True, default=str).encode()).hexdigest()
    work = ws.specialists_dir / WORK_DIR / f"c{cid}"
    stamp = work / "inputs.sha256"
    if work.exists() and (not stamp.exists() or stamp.read_text().strip() != key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    return work
