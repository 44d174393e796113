"""``aad distill``: curate+cluster -> select -> train -> evaluate -> calibrate router -> report.

Every stage is resumable. After a stage finishes, ``.aad/state/distill.json`` records a hash of its
inputs (the config sections and component tables it reads, the seed, the traces, and the fingerprints
of what the stages before it produced) and a fingerprint of its own output. On the next run a stage is
skipped when both still match: same inputs, and its artifact untouched since. Change ``[train]`` or
``[trainer.qlora]`` in ``aad.toml`` and distill redoes train, evaluate and route but keeps the clusters
and the selection. ``force``
redoes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aad_core import artifacts
from aad_core.artifacts import ClusterState, DistillState, Selection
from aad_core.workspace import Workspace

STAGES: tuple[str, ...] = ("cluster", "select", "train", "evaluate", "route")
#: The [route] keys that change a LoRA specialist's answers, which the gate judges as they are served.
SERVED_ANSWERS: tuple[str, ...] = ("route.fast_path", "route.prompt_lookup_tokens", "route.bf16_from_rows")
#: Config sections (or ``section.key``) each stage reads (besides ``seed``).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "cluster": ("capture", "embed", "cluster"),
    "select": ("select", "train.student", "train.max_length"),  # scoring runs the [train] student
    # training sees only the held-out calibration part; its auditions (a refused kind -> the next kind) run the
    # gate on answers generated as served
    "train": ("train", *(f"eval.{k}" for k in ("test_fraction", "target_agreement", "min_coverage", "gate_alpha",
                                              "parity", "max_heldout", "max_new_tokens", "evaluator",
                                              "cluster_evaluators")), *SERVED_ANSWERS),
    "evaluate": ("eval", *SERVED_ANSWERS),
    "route": ("route", "eval"),
}
#: Component kinds whose ``[<kind>.<name>]`` table (of the component the config picks) each stage reads;
#: evaluate reads every evaluator's table, as the evaluator is chosen per cluster.
STAGE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "cluster": ("embedder", "clusterer"),
    "select": ("scorer", "selector"),
    "train": ("trainer", "evaluator"),
    "evaluate": ("evaluator",),
    "route": ("router",),
}


@dataclass(frozen=True)
class Profile:
    """A named set of in-memory config overrides for one distill run: ``(section, key)``, where a
    section is a core one (``"train"``) or a component's table (``"trainer.qlora"``)."""

    name: str
    overrides: dict[tuple[str, str], Any] = field(default_factory=dict)
    #: Train at most this many routine clusters (largest share of calls x distillability estimate first); None = all.
    max_specialists: int | None = None
    description: str = ""


FULL = Profile("full", description="the workspace's aad.toml as written")
QUICK = Profile(
    "quick",
    # 24 held-out calls, not fewer: the risk-coverage gate checks agreement on the test part, and with 8
    # calls one miss already reads as 0.875 (the demo's intent classifier was refused that way).
    overrides={("trainer.*", "max_steps"): 8, ("trainer.*", "batch_size"): 8, ("train", "max_length"): 128,
               ("eval", "max_heldout"): 24, ("eval", "max_new_tokens"): 40},
    max_specialists=2,
    description="train at most the 2 routine clusters with most calls, for at most 8 steps of 8 each at "
    "128 tokens; evaluate on 24 held-out samples with at most 40 new tokens",
)
PROFILES = {"full": FULL, "quick": QUICK}


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "skipped"
    seconds: float
    detail: str = ""


def _chosen(ws: Workspace, kind: str) -> list[str]:
    """The names of the ``kind`` components the workspace uses (e.g. every trainer ``[train] trainer`` lists)."""
    from aad_core.plugins.params import chosen_components

    return chosen_components(ws.config, kind)


def _accepted_params(kind: str, name: str) -> set[str]:
    """The keyword parameters the registered ``kind`` component ``name`` takes."""
    from aad_core.plugins import get_registry
    from aad_core.plugins.params import signature

    return set(signature(get_registry().get(kind, name).factory).params)


def apply_profile(ws: Workspace, profile: Profile) -> None:
    """Apply ``profile``'s overrides to ``ws.config`` in memory (aad.toml is not changed).

    A value already below the override stays: --quick never makes a run bigger.
    """
    for (section, key), value in profile.overrides.items():
        kind, _, name = section.partition(".")
        if name == "*":  # the components the workspace uses, e.g. "trainer.*" = [train] trainer
            for one in _chosen(ws, kind):
                if key in _accepted_params(kind, one):
                    _override(ws, profile, kind, one, section, key, value)
            continue
        _override(ws, profile, kind, name, section, key, value)


def _override(ws: Workspace, profile: Profile, kind: str, name: str, section: str, key: str, value: Any) -> None:
    """One override of :func:`apply_profile`: a component's table when ``name`` is set, else a core section."""
    if name:
        current = ws.config.component_table(kind, name).get(key)
        if isinstance(current, str):  # AAD_* values are decoded when the component is built
            with contextlib.suppress(ValueError):
                current = json.loads(current)
    else:
        current = getattr(getattr(ws.config, section), key)
    if isinstance(value, (int, float)) and isinstance(current, (int, float)) and current < value:
        return
    if name:
        ws.config.set_component_param(kind, name, key, value, source=f"the '{profile.name}' distill profile")
    else:
        setattr(getattr(ws.config, section), key, value)


# -- fingerprints ------------------------------------------------------------------------------

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_fingerprint(ws: Workspace) -> str:
    """The stored trace ids, and the ids whose feedback marks the teacher's answer wrong (such a call is
    not trained on: feedback given since the last run re-runs the stages)."""
    from aad_core.formats.answers import WRONG_BELOW, feedback_quality

    with ws.store() as store:
        ids = sorted(store.ids())
        items = store.feedback_items() if hasattr(store, "feedback_items") else []
    wrong = sorted(tid for tid, fb in items if (q := feedback_quality(_loads(fb))) is not None and q < WRONG_BELOW)
    return _sha(ids) if not wrong else _sha({"ids": ids, "wrong_by_feedback": wrong})


def _loads(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, (str, bytes)) else text
    except ValueError:
        return None


def specialists_fingerprint(ws: Workspace) -> str | None:
    """The trained specialists on disk, of every kind: each version folder's adapter config and its
    other files' size and mtime. Manifests are left out: the evaluate stage writes promotions into
    them, which does not change what train produced."""
    root = ws.specialists_dir
    folders = sorted({p.parent for name in ("adapter_config.json", "manifest.json") for p in root.rglob(name)
                      if not any(part.startswith(".") for part in p.relative_to(root).parts)}) if root.exists() else []
    if not folders:
        return None
    items = []
    for folder in folders:
        config = folder / "adapter_config.json"
        files = sorted(f for f in folder.iterdir()
                       if f.is_file() and f.name not in ("manifest.json", "adapter_config.json"))
        items.append([str(folder.relative_to(root)), config.read_text(encoding="utf-8") if config.exists() else None,
                      [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    return _sha(items)


OUTPUTS: dict[str, Callable[[Workspace], str | None]] = {
    "cluster": lambda ws: artifacts.fingerprint(ws, artifacts.CLUSTERS),
    "select": lambda ws: artifacts.fingerprint(ws, artifacts.SELECTION),
    "train": specialists_fingerprint,
    "evaluate": lambda ws: artifacts.fingerprint(ws, artifacts.EVAL),
    "route": lambda ws: artifacts.fingerprint(ws, artifacts.ROUTER),
}


def input_hash(ws: Workspace, stage: str, upstream: str | None, profile: Profile) -> str:
    cfg = ws.config
    sections = {}
    for name in STAGE_SECTIONS[stage]:
        section, _, key = name.partition(".")
        dumped = getattr(cfg, section).model_dump(mode="json")
        sections[name] = dumped[key] if key else dumped
    for kind in STAGE_COMPONENTS[stage]:
        sections[f"[{kind}]"] = _component_tables(cfg, kind)
    extra = {"max_specialists": profile.max_specialists} if stage == "train" else {}
    return _sha({"stage": stage, "seed": cfg.seed, "config": sections, "upstream": upstream, **extra})


def _component_tables(cfg: Any, kind: str) -> dict[str, Any]:
    """The tables of ``kind`` a stage reads: the picked component's (every one for evaluators)."""
    from aad_core.plugins.params import CHOSEN_BY, component_key

    if kind == "evaluator":
        return {component_key(name): table for name, table in cfg.evaluator.items()}
    if kind == "trainer":  # every trainer [train] trainer lists may train a task
        from aad_core.plugins.params import trainer_names

        return {component_key(name): cfg.component_table(kind, name) for name in trainer_names(cfg)}
    section, key = CHOSEN_BY[kind]
    name = getattr(getattr(cfg, section), key)
    return {component_key(name): cfg.component_table(kind, name)}


def load_distill_state(ws: Workspace) -> DistillState:
    """What the last runs did per stage (empty before the first run)."""
    return DistillState.load_optional(ws) or DistillState()


# -- stages ------------------------------------------------------------------------------------

def _routine_cluster_ids(ws: Workspace, limit: int | None) -> list[int]:
    """Clusters that have a selection (the routine ones), most calls first."""
    selected = Selection.load(ws).clusters
    clusters = {c.id: c for c in ClusterState.load(ws).clusters}

    def order(cid: int) -> tuple[float, float, int, int]:
        # the expected served share first: share of calls x distillability estimate (1 for topic clusters)
        c = clusters.get(cid)
        if c is None:
            return (0.0, 0.0, 0, cid)
        estimate = float((c.estimate or {}).get("estimate", 1.0))
        return (-c.share_calls * estimate, -c.share_calls, -c.size, cid)

    ids = sorted(selected, key=order)
    return ids if limit is None else ids[:limit]


def _has_routine_cluster(ws: Workspace) -> bool:
    state = ClusterState.load_optional(ws)
    return state is not None and bool(state.routine_clusters())


def _run_cluster(ws: Workspace, profile: Profile, progress: bool) -> str:
    from aad_core.pipeline.cluster import run_cluster

    state = run_cluster(ws, show_progress=progress)
    detail = f"{len(state.clusters)} clusters, {len(state.routine_clusters())} routine"
    if state.excluded:
        detail += (f"; {len(state.excluded)} training trace(s) left out: their feedback marks the teacher's "
                   "answer wrong")
    return detail


def _run_select(ws: Workspace, profile: Profile, progress: bool) -> str:
    from aad_core.pipeline.select import run_select

    selection = run_select(ws, show_progress=progress)
    detail = f"kept {ws.config.select.fraction:.0%} of each routine cluster's training split ({ws.config.select.selector})"
    excluded = sum(int(c.get("n_excluded") or 0) for c in (selection.get("clusters") or {}).values())
    if excluded:
        detail += f"; {excluded} call(s) left out: their feedback marks the teacher's answer wrong"
    return detail


def _run_train(ws: Workspace, profile: Profile, progress: bool) -> str:
    from aad_core.pipeline.train import run_train

    ids = _routine_cluster_ids(ws, profile.max_specialists)
    if not ids:
        return "no routine cluster: nothing to train, every request stays with the teacher"
    from aad_core.artifacts import read_unfit

    names = []
    for cid in ids:
        for spec in run_train(ws, cluster_id=cid, show_progress=progress, skip_unfit=True) or []:
            names.append(f"{spec.name} ({spec.kind})")
    skipped = len(_routine_cluster_ids(ws, None)) - len(ids)
    more = f"; {skipped} more routine cluster(s) left to the teacher by the '{profile.name}' profile" if skipped else ""
    unfit = [cid for cid in ids if str(cid) in read_unfit(ws)]
    if unfit:
        more += f"; no specialist kind fits cluster(s) {', '.join(map(str, unfit))} (see the report)"
    return f"trained {len(names)} specialist(s): {', '.join(names)}{more}"


def _run_evaluate(ws: Workspace, profile: Profile, progress: bool) -> str:
    from aad_core.pipeline.evaluate import run_evaluate

    report = run_evaluate(ws, show_progress=progress)
    s = report.get("summary", {})
    return f"{s.get('evaluated', 0)} evaluated, {s.get('promoted', 0)} promoted"


def _run_route(ws: Workspace, profile: Profile, progress: bool) -> str:
    from aad_core.pipeline.calibrate import calibrate_router

    calibrate_router(ws, show_progress=progress)
    return "router calibrated"


RUNNERS: dict[str, Callable[[Workspace, Profile, bool], str]] = {
    "cluster": _run_cluster, "select": _run_select, "train": _run_train, "evaluate": _run_evaluate, "route": _run_route,
}


def run_distill(
    ws: Workspace,
    *,
    profile: Profile | str = FULL,
    force: bool = False,
    show_progress: bool = True,
    report: bool = True,
    on_stage: Callable[[StageResult], None] | None = None,
    runners: dict[str, Callable[[Workspace, Profile, bool], str]] | None = None,
) -> list[StageResult]:
    """Run every stage that is not up to date, in order; then write the report.

    ``runners`` replaces stage functions (tests use it to observe which stages run).
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"The 'profile' parameter of run_distill must be one of {sorted(PROFILES)}. Got {profile!r} instead.")
        profile = PROFILES[profile]
    apply_profile(ws, profile)
    runners = {**RUNNERS, **(runners or {})}
    state = load_distill_state(ws)
    results: list[StageResult] = []
    upstream: str | None = store_fingerprint(ws)
    for stage in STAGES:
        if stage != "cluster" and not _has_routine_cluster(ws):
            result = StageResult(stage, "skipped", 0.0, "no routine cluster: every request stays with the teacher")
            results.append(result)
            if on_stage:
                on_stage(result)
            continue
        want = input_hash(ws, stage, upstream, profile)
        prev = state.stages.get(stage, {})
        current_out = OUTPUTS[stage](ws)
        up_to_date = (not force and prev.get("input_hash") == want and current_out is not None
                      and prev.get("output") == current_out)
        start = time.perf_counter()
        if up_to_date:
            result = StageResult(stage, "skipped", 0.0, "up to date with its inputs")
        else:
            detail = runners[stage](ws, profile, show_progress)
            current_out = OUTPUTS[stage](ws)
            result = StageResult(stage, "ran", time.perf_counter() - start, detail)
            state.stages[stage] = {
                "input_hash": want, "output": current_out, "profile": profile.name, "detail": detail,
                "seconds": round(result.seconds, 1), "finished_at": datetime.now(timezone.utc).isoformat(),
            }
            state.seed = ws.config.seed
            state.save(ws)
        results.append(result)
        if on_stage:
            on_stage(result)
        # a stage depends on every stage before it (route reads clusters and eval, for example)
        upstream = _sha([upstream, current_out])
    if report:
        from aad_core.report import write_report

        start = time.perf_counter()
        path = write_report(ws)
        results.append(StageResult("report", "ran", time.perf_counter() - start, str(path)))
        if on_stage:
            on_stage(results[-1])
    return results
