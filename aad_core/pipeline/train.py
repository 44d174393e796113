"""S5b ``aad train``: one specialist per routine cluster, of the first kind that fits its task.

``[train] trainer`` names the specialist kinds (trainer components) to try, in order: a name, a list,
or ``"auto"`` (the cheapest first: ``classifier`` when the task's answers form a closed set, else
``qlora``). Each trainer says whether its kind fits the task (``Trainer.applies_to``); the first
that does is trained, on the task's selected traces, or on its whole training split when the
trainer sets ``uses_selection = False``. The manifest records the kind and every kind considered.

The calibration part of the cluster's held-out split (``[eval] test_fraction`` of it is kept back as
the risk-coverage gate's test part, which training never sees) drives early stopping and the
answer bank's vote weights. Each run trains in
``.aad/specialists/.work/c<id>/``; an interrupted run with the same inputs resumes from its
checkpoint there. The finished adapter becomes the next version in the specialist registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.schema import Specialist
from aad_core.workspace import Workspace

if TYPE_CHECKING:
    from aad_core.plugins.params import ComponentParams

WORK_DIR = ".work"


def run_train(
    ws: Workspace,
    *,
    cluster_id: int | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    answer_hints: int | None = None,
    show_progress: bool = True,
    skip_unfit: bool = False,
) -> list[Specialist]:
    """Train the routine clusters in ``selection.json`` (or only ``cluster_id``); return the new specialists.

    A task no configured kind fits is skipped (the reason recorded for the report), except that asking
    for that one ``cluster_id`` is an error unless ``skip_unfit``."""
    from aad_core.artifacts import UNFIT, ClusterState, Selection, read_unfit
    from aad_core.formats.answers import teacher_answer_wrong
    from aad_core.pipeline.evaluate.risk_coverage import calibration_test_split
    from aad_core.pipeline.evaluate.runner import candidate_summary, evaluate_specialist, served_gate
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

    # the arguments (aad train --epochs ...) win over [trainer.<name>]
    given = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "answer_hints": answer_hints}.items()
             if v is not None}
    candidates = _candidate_params(ws, given)
    registry = SpecialistRegistry(ws)
    runtimes: dict[str, Any] = {}  # the auditions' LoRA runtimes, one per base model
    out: list[Specialist] = []
    unfit = read_unfit(ws)
    with ws.store() as store:
        for cid in todo:
            entry = chosen[cid]
            # feedback that marks the teacher's answer wrong keeps a call out of training, even when it
            # arrived after 'aad select'
            train = [t for t in store.iter_traces(ids=entry.selected)
                     if t.response is not None and not teacher_answer_wrong(t)]
            # only the calibration part: the gate's test part must stay unseen by training
            heldout_ids, _ = calibration_test_split(sorted(state.heldout_ids(cid)), cfg.seed, cfg.eval.test_fraction)
            heldout = [t for t in store.iter_traces(ids=heldout_ids) if t.response is not None and t.status == "ok"]
            if not train:
                raise AADError(f"Cluster {cid}: none of its {len(entry.selected)} selected traces is in the store.",
                               hint="Run 'aad select' again.")
            label = (clusters[cid].label if cid in clusters else "") or entry.label
            split_ids = list(state.train_ids(cid))
            fitting, considered = _fitting_trainers(candidates, train, lambda: [
                t for t in store.iter_traces(ids=split_ids)
                if t.response is not None and t.status == "ok" and not teacher_answer_wrong(t)])
            if not fitting:
                why = "; ".join(f"{c['trainer']}: {c['why']}" for c in considered)
                if cluster_id is not None and not skip_unfit:
                    raise AADError(f"Cluster {cid}: no configured specialist kind fits its task ({why}).",
                                   hint='Add a kind that fits to [train] trainer, e.g. trainer = "auto".')
                _say(show_progress, f"Cluster {cid} ({label}): no configured specialist kind fits ({why})")
                unfit[str(cid)] = why
                continue
            unfit.pop(str(cid), None)
            # The cheapest kind first; a later kind trains only when the gate refuses the one before
            # (an audition on the held-out calls, as 'aad eval' runs it), so every candidate tried is kept.
            before: list[dict[str, Any]] = []
            for i, picked in enumerate(fitting):
                name, params, trainer, data = picked.name, picked.params, picked.trainer, picked.data
                _say(show_progress,
                     f"Cluster {cid} ({label}): {trainer.kind} specialist ({name}) on {len(data)} "
                     f"{'selected traces' if data is train else 'traces of its training split'}, {len(heldout)} "
                     f"held-out calibration traces for early stopping")
                used = list(entry.selected) if data is train else [t.id for t in data]
                work = _work_dir(ws, cid, {"trainer": name, **params}, used)
                metrics = trainer.train(data, heldout, work, show_progress=show_progress)
                spec = registry.save(
                    cluster_id=cid,
                    label=label,
                    adapter_dir=work,
                    base_model=str(cfg.train.student),
                    centroid=list(clusters[cid].centroid) if cid in clusters else [],
                    selection=used,
                    hyperparameters={"trainer": name, "kind": trainer.kind, **params,
                                     "selection": {"fraction": selection.fraction, "selector": selection.selector,
                                                   "scorer": selection.scorer, "used": data is train},
                                     "kinds_considered": considered,
                                     "next_kinds": [p.name for p in fitting[i + 1:]],
                                     "candidates_before": list(before)},
                    metrics=metrics,
                    seed=cfg.seed,
                    kind=trainer.kind,
                    trainer=name,
                )
                out.append(spec)
                if i == len(fitting) - 1 or cid not in clusters:
                    break
                audition = evaluate_specialist(ws, state, clusters[cid], spec, store, runtimes)
                registry.set_promoted(spec.name, spec.version, bool(audition.get("promoted")),
                                      str(audition.get("reason", "")), gate=served_gate(audition.get("gate"))
                                      if audition.get("status") == "evaluated" else None)
                if audition.get("status") != "evaluated" or audition.get("promoted"):
                    break
                before.append(candidate_summary(audition))
                _say(show_progress, f"Cluster {cid} ({label}): the gate refused the {trainer.kind} specialist "
                     f"({audition.get('reason')}); trying the next kind, {fitting[i + 1].name}")
    ws.write_state(UNFIT, unfit)
    return out



@dataclass
class _Picked:
    name: str
    params: dict[str, Any]
    trainer: Any
    data: list[Any]


def _candidate_params(ws: Workspace, given: dict[str, Any]) -> list[tuple[str, ComponentParams]]:
    """Each trainer ``[train] trainer`` lists, with its checked parameters. A ``given`` value (an
    ``aad train`` option) goes to the trainers that take it; one that no trainer takes is an error."""
    from aad_core.plugins import get_registry
    from aad_core.plugins.params import component_params, signature, trainer_names

    names = trainer_names(ws.config)
    if not names:
        raise AADError(f"[train] trainer lists no trainer (got {ws.config.train.trainer!r}).",
                       hint='Set [train] trainer = "auto", a trainer name, or a list of names.')
    sigs = {name: signature(get_registry().get("trainer", name).factory) for name in names}
    out = []
    for i, name in enumerate(names):
        takes = {k: v for k, v in given.items() if k in sigs[name].params or sigs[name].var_keyword}
        if i == 0 and any(all(k not in s.params and not s.var_keyword for s in sigs.values()) for k in given):
            takes = given  # a value no trainer takes: the first trainer's check names the key and the trainer
        out.append((name, component_params("trainer", name, ws.config, params=takes,
                                           params_source="a run_train() argument (aad train option)", workspace=ws)))
    return out


def _fitting_trainers(candidates: list[tuple[str, ComponentParams]], selected: list[Any],
                      training_split: Callable[[], list[Any]]) -> tuple[list[_Picked], list[dict[str, Any]]]:
    """The candidates whose kind fits the task (judged on the traces each would train on), in order,
    and ``{"trainer", "kind", "fits", "why"}`` of every candidate."""
    considered: list[dict[str, Any]] = []
    fitting: list[_Picked] = []
    split: list[Any] | None = None
    for name, component in candidates:
        trainer = component.build()
        if getattr(trainer, "uses_selection", True):
            data = selected
        else:
            split = training_split() if split is None else split
            data = split
        fits, why = _fits(trainer, data)
        considered.append({"trainer": name, "kind": getattr(trainer, "kind", "lora"), "fits": fits, "why": why})
        if fits:
            fitting.append(_Picked(name, component.effective, trainer, data))
    return fitting, considered


def kind_for(ws: Workspace, training_split: list[Any]) -> Any:
    """The trainer ``[train] trainer`` would pick for a task, judged on its training split (None
    when no listed kind fits). The select stage asks it to skip scoring tasks whose kind trains on
    the whole split (``uses_selection = False``)."""
    fitting, _ = _fitting_trainers(_candidate_params(ws, {}), training_split, lambda: training_split)
    return fitting[0].trainer if fitting else None


def _say(show: bool, text: str) -> None:
    if show:
        from rich.console import Console

        # reasons name config keys such as "[train] max_length": plain text, not console markup
        Console(stderr=True).print(text, markup=False, highlight=False)


def _fits(trainer: Any, data: list[Any]) -> tuple[bool, str]:
    if not data:
        return False, "no training trace with an answer"
    result = trainer.applies_to(data)
    fits, why = (result, "") if isinstance(result, bool) else result
    return bool(fits), str(why)


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
