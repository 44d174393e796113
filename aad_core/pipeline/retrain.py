"""``aad distill --if-needed``: retrain only the tasks that need it, and keep a new version only when it
is at least as good as the served one.

A task (a cluster with a trained specialist) retrains when, since its specialist was last trained
(the newest version's ``created_at`` in its manifest):

- **new traces**: at least ``[route] retrain_min_new_traces`` new teacher traces belong to it. A
  trace is new when its id is not among the version's training ids and it was recorded after that
  version was trained (or clusters.json does not know it yet). It belongs to the task by the cluster
  id the router recorded on it (escalations ``aad_escalation``, shadow pairs ``aad_shadow``, teacher
  answers of ``aad serve`` ``aad_route``), by clusters.json, else by its agent node (system prompt):
  the cluster most of that node's clustered calls are in. A specialist's own answers never count and
  never become training data (:func:`aad_core.schema.is_specialist_answer`);
- **drift**: ``aad monitor`` flags a drift statistic for it (share below the similarity threshold,
  new labels in the teacher's answers, embedding shift, a changed teacher model) over the serving
  logs since the day it was trained;
- **shadow disagreements**: the served version's live shadow pairs hold disagreements and their
  Clopper-Pearson lower bound is below ``[eval] target_agreement`` (or shadow evaluation demoted it).

Drift and disagreements retrain a task only when at least one new trace belongs to it: retraining on
the same data learns the same specialist. Retraining runs the ``aad distill`` stages (new traces,
escalations and shadow pairs are clustered and split like any trace; the held-out split of a trace
never changes), trains a new version of the tasks that need it, and evaluates it with the
risk-coverage gate. Where a version is served, both versions then answer the same calls — the test
part of the task's held-out split, which neither trained on — and the new one is promoted only when
its agreement with the teacher there is at least the served version's; otherwise the served version
stays promoted and the new one's manifest says why. ``.aad/state/retrain.json`` records the plan and
the outcome of the last run. When no task needs retraining nothing is loaded (no model, no embedder).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import ClusterState
from aad_core.schema import is_specialist_answer, node_key

if TYPE_CHECKING:
    from collections.abc import Callable

    from aad_core.pipeline.distill import Profile, StageResult
    from aad_core.schema import Cluster, Specialist, Trace
    from aad_core.workspace import Workspace

#: The last ``--if-needed`` run: its plan and what became of each retrained task.
RETRAIN_STATE = "retrain.json"
#: Clustered calls per cluster read to learn which cluster an agent node's new calls belong to.
NODE_SAMPLE = 50
#: Metadata keys in which the routing engine records a request's cluster id.
CLUSTER_KEYS = ("aad_escalation", "aad_shadow", "aad_route")


@dataclass
class TaskPlan:
    """Whether one task retrains, and why (or why not)."""

    cluster_id: int
    task: str
    specialist: str | None
    served_version: int | None
    latest_version: int | None
    trained_at: str | None
    new_traces: int = 0
    drift: list[str] = field(default_factory=list)
    shadow: str | None = None
    retrain: bool = False
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IfNeededResult:
    """The plan, the distill stages run (none when nothing retrained) and each retrained task's outcome."""

    plan: list[TaskPlan]
    stages: list[StageResult] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def retrained(self) -> list[TaskPlan]:
        return [p for p in self.plan if p.retrain]


# -- the plan (no model is loaded) -----------------------------------------------------------------

def _routed_cluster(trace: Trace) -> int | None:
    """The cluster id the routing engine recorded on a trace, if any."""
    for key in CLUSTER_KEYS:
        info = trace.metadata.get(key)
        if isinstance(info, dict) and isinstance(info.get("cluster_id"), int):
            return int(info["cluster_id"])
    return None


def _node_clusters(ws: Workspace, state: ClusterState) -> dict[str, int]:
    """{agent node key: the cluster most of its clustered calls (a sample per cluster) are in}."""
    by_cluster: dict[int, list[str]] = {}
    for tid, cid in state.assignments.items():
        ids = by_cluster.setdefault(int(cid), [])
        if len(ids) < NODE_SAMPLE:
            ids.append(tid)
    owner = {tid: cid for cid, ids in by_cluster.items() for tid in ids}
    votes: dict[str, Counter[int]] = {}
    with ws.store() as store:
        for trace in store.iter_traces(ids=sorted(owner)):
            votes.setdefault(node_key(trace), Counter())[owner[trace.id]] += 1
    return {node: count.most_common(1)[0][0] for node, count in votes.items()}


def new_trace_counts(ws: Workspace, state: ClusterState, latest: dict[int, Specialist]) -> dict[int, int]:
    """{cluster id: new teacher traces since its newest specialist version was trained} (see the module)."""
    from aad_core.specialists import SpecialistRegistry

    if not latest:
        return {}
    registry = SpecialistRegistry(ws)
    trained = {cid: set(registry.manifest(spec).get("selection") or []) for cid, spec in latest.items()}
    since = min(spec.created_at for spec in latest.values())
    known = set(state.assignments) | set(state.dropped or {})
    with ws.store() as store:
        unknown = sorted(set(store.ids()) - known)
        candidates = {t.id: t for t in store.iter_traces(since=since)}
        candidates.update((t.id, t) for t in store.iter_traces(ids=unknown) if t.id not in candidates)
    nodes: dict[str, int] | None = None
    counts: dict[int, int] = {cid: 0 for cid in latest}
    for trace in candidates.values():
        if trace.response is None or trace.status != "ok" or is_specialist_answer(trace):
            continue
        cid = _routed_cluster(trace)
        if cid is None:
            cid = state.assignments.get(trace.id)
        if cid is None:
            nodes = _node_clusters(ws, state) if nodes is None else nodes
            cid = nodes.get(node_key(trace))
        if cid is None or int(cid) not in latest:
            continue
        spec = latest[int(cid)]
        if trace.id in trained[int(cid)]:
            continue
        if trace.created_at > spec.created_at or trace.id not in known:
            counts[int(cid)] += 1
    return counts


def plan_retraining(ws: Workspace) -> list[TaskPlan]:
    """Per task with a trained specialist: does ``aad distill --if-needed`` retrain it, and why."""
    from aad_core.serving.monitor import drift_flags, monitor_summary
    from aad_core.specialists import SpecialistRegistry

    state = ClusterState.load_optional(ws)
    if state is None:
        return []
    registry = SpecialistRegistry(ws)
    clusters = {c.id: c for c in state.clusters}
    latest = {cid: spec for cid in clusters if (spec := registry.latest(cid)) is not None}
    served = registry.promoted()
    counts = new_trace_counts(ws, state, latest)
    summaries: dict[str, dict[Any, dict[str, Any]]] = {}  # by the day a task was last trained
    cfg = ws.config
    plans: list[TaskPlan] = []
    for cid, spec in sorted(latest.items()):
        day = spec.created_at.astimezone(timezone.utc).date().isoformat()
        if day not in summaries:
            summaries[day] = {t["cluster_id"]: t for t in monitor_summary(ws, days=None, since=day)["tasks"]}
        stats = summaries[day].get(cid) or {}
        current = served.get(cid)
        plan = TaskPlan(cluster_id=cid, task=str(clusters[cid].task or clusters[cid].label),
                        specialist=current.name if current else spec.name,
                        served_version=current.version if current else None, latest_version=spec.version,
                        trained_at=spec.created_at.isoformat(), new_traces=counts.get(cid, 0),
                        drift=drift_flags(stats) if stats else [])
        if stats.get("state") == "demoted" and stats.get("demotions"):
            plan.shadow = f"v{stats.get('version')} demoted by shadow evaluation"
        elif (stats.get("window_pairs") and stats["agreeing_pairs"] < stats["window_pairs"]
              and stats.get("lower_bound") is not None and stats["lower_bound"] < cfg.eval.target_agreement):
            plan.shadow = (f"{stats['window_pairs'] - stats['agreeing_pairs']} shadow disagreement(s), live lower "
                           f"bound {100 * stats['lower_bound']:.1f} % < target {100 * cfg.eval.target_agreement:.0f} %")
        _decide(plan, cfg.route.retrain_min_new_traces)
        plans.append(plan)
    return plans


def _decide(plan: TaskPlan, min_new: int) -> None:
    since = f"since v{plan.latest_version} was trained"
    if plan.new_traces >= min_new:
        plan.retrain = True
        plan.why = f"{plan.new_traces} new traces {since} (>= [route] retrain_min_new_traces = {min_new})"
    elif plan.drift or plan.shadow:
        signal = "; ".join([*(["drift: " + ", ".join(plan.drift)] if plan.drift else []),
                            *([plan.shadow] if plan.shadow else [])])
        if plan.new_traces:
            plan.retrain = True
            plan.why = f"{signal}; {plan.new_traces} new traces {since} join the training data"
        else:
            plan.why = (f"{signal}, but no new trace {since}: retraining would learn the same data (record the "
                        "teacher's answers: escalations and shadow pairs are recorded by 'aad serve')")
    else:
        plan.why = (f"up to date: {plan.new_traces} new traces {since} (< {min_new}), no drift, no shadow "
                    "disagreement below the target")


# -- retraining --------------------------------------------------------------------------------

def _generate_texts(ws: Workspace, spec: Specialist, requests: list[Any], runtimes: dict[str, Any]) -> list[str]:
    """Specialist ``spec``'s answers (each version its own adapter name, so two versions of a task coexist)."""
    max_new = ws.config.eval.max_new_tokens
    if spec.kind != "lora":
        from aad_core.specialists import load_predictor

        return [g.text for g in load_predictor(spec, ws).generate(requests, max_new_tokens=max_new)]
    if spec.base_model not in runtimes:
        from aad_core.models.runtime import SpecialistRuntime

        route = ws.config.route
        runtimes[spec.base_model] = SpecialistRuntime(spec.base_model, fast_path=route.fast_path,
                                                      prompt_lookup=route.prompt_lookup_tokens,
                                                      bf16_from_rows=route.bf16_from_rows)
    runtime = runtimes[spec.base_model]
    adapter = f"{spec.name}@v{spec.version}"
    runtime.add_adapter(adapter, spec.path)
    return [g.text for g in runtime.generate(requests, adapter=adapter, max_new_tokens=max_new)]


def compare_versions(ws: Workspace, state: ClusterState, cluster: Cluster, served: Specialist, new: Specialist,
                     store: Any, runtimes: dict[str, Any]) -> dict[str, Any]:
    """Both versions answer the same calls — the test part of the cluster's held-out split (as the
    evaluation caps it), which neither trained on — scored by the task's evaluator against the teacher:
    ``{"n", "evaluator", "served", "new"}`` (mean agreement; None scores when there is no test call)."""
    from aad_core.formats.answers import answer_string
    from aad_core.pipeline.evaluate.choose import evaluator_name_for
    from aad_core.pipeline.evaluate.risk_coverage import calibration_test_split
    from aad_core.pipeline.evaluate.runner import _context, _make_evaluator

    cfg = ws.config
    ids = list(state.heldout_ids(cluster.id))
    if cfg.eval.max_heldout is not None:
        ids = ids[: cfg.eval.max_heldout]
    _, test_ids = calibration_test_split(ids, cfg.seed, cfg.eval.test_fraction)
    calls = [t for t in store.iter_traces(ids=test_ids) if t.response is not None and t.status == "ok"]
    out: dict[str, Any] = {"n": len(calls), "evaluator": None, "served": None, "new": None}
    if not calls:
        return out
    name, _ = evaluator_name_for(cfg, cluster, calls)
    evaluator = _make_evaluator(name, ws)
    references = [answer_string(t) for t in calls]
    context = _context(ws, name, calls)
    out["evaluator"] = name
    for key, spec in (("served", served), ("new", new)):
        result = evaluator.evaluate(_generate_texts(ws, spec, [t.request for t in calls], runtimes), references,
                                    **context)
        per_item = result.get("per_item")
        out[key] = sum(map(float, per_item)) / len(per_item) if per_item else float(result.get("score") or 0.0)
    return out


class _Retrainer:
    """The train and evaluate stages of an ``--if-needed`` run, limited to the planned tasks."""

    def __init__(self, todo: list[TaskPlan]) -> None:
        self.todo = {p.cluster_id: p for p in todo}
        self.new: dict[int, Specialist] = {}
        self.outcomes: dict[int, dict[str, Any]] = {}

    def train(self, ws: Workspace, profile: Profile, progress: bool) -> str:
        from aad_core.artifacts import Selection
        from aad_core.pipeline.train import run_train
        from aad_core.specialists import SpecialistRegistry

        registry = SpecialistRegistry(ws)
        selected = Selection.load(ws).clusters
        for cid, plan in self.todo.items():
            if cid not in selected:
                self.outcomes[cid] = {"cluster_id": cid, "promoted": False,
                                      "reason": "not retrained: no longer a routine cluster after re-clustering"}
                continue
            specs = run_train(ws, cluster_id=cid, show_progress=progress, skip_unfit=True) or []
            if not specs:
                self.outcomes[cid] = {"cluster_id": cid, "promoted": False,
                                      "reason": "not retrained: no configured specialist kind fits its task now"}
                continue
            for spec in specs:  # the gate's audition may have promoted one; the comparison decides
                if registry.get(spec.name, spec.version).promoted:  # the registry, not the object run_train returned
                    registry.set_promoted(spec.name, spec.version, False,
                                          "awaiting the comparison with the served version (aad distill --if-needed)")
            self.new[cid] = specs[-1]
        names = ", ".join(f"{s.name} v{s.version}" for s in self.new.values()) or "none"
        return f"retrained {len(self.new)} of {len(self.todo)} task(s) that needed it: {names}"

    def evaluate(self, ws: Workspace, profile: Profile, progress: bool) -> str:
        from aad_core.artifacts import EvalReport
        from aad_core.pipeline.evaluate.runner import candidate_summary, evaluate_specialist
        from aad_core.specialists import SpecialistRegistry

        state = ClusterState.load(ws)
        clusters = {c.id: c for c in state.clusters}
        registry = SpecialistRegistry(ws)
        report = EvalReport.load_optional(ws)
        entries = {int(e["cluster_id"]): e for e in (report.clusters if report else [])}
        runtimes: dict[str, Any] = {}
        with ws.store() as store:
            for cid, new in self.new.items():
                served = registry.promoted().get(cid)
                entry = evaluate_specialist(ws, state, clusters[cid], new, store, runtimes)
                if entry.get("status") == "evaluated":
                    before = (registry.manifest(new).get("hyperparameters") or {}).get("candidates_before") or []
                    entry["candidates"] = [*before, candidate_summary(entry)]
                comparison = None
                if not entry.get("promoted"):
                    promote = False
                    reason = str(entry.get("reason") or "not promoted: not evaluated")
                elif served is None:
                    promote, reason = True, str(entry.get("reason"))
                else:
                    comparison = compare_versions(ws, state, clusters[cid], served, new, store, runtimes)
                    promote, reason = _verdict(comparison, served, new)
                registry.set_promoted(new.name, new.version, promote, reason)
                if promote and served is not None and served.name != new.name:
                    # the task's label (and so its specialist's name) changed: the registry serves the
                    # highest promoted version of a cluster, whatever its name, so the old one steps down
                    registry.set_promoted(served.name, served.version, False,
                                          f"replaced by {new.name} v{new.version} (aad distill --if-needed)")
                outcome = {"cluster_id": cid, "specialist": new.name, "version": new.version, "promoted": promote,
                           "reason": reason, "served_before": served.version if served else None,
                           "comparison": comparison, "gate": entry.get("reason")}
                self.outcomes[cid] = outcome
                entry["retrain"] = outcome
                if promote or (served is None and cid not in entries):
                    entries[cid] = {**entry, "promoted": promote, "reason": reason}
                elif cid in entries:  # the served version's entry stays (its gate threshold keeps serving)
                    entries[cid] = {**entries[cid], "retrain": outcome}
        if report is not None or entries:
            results = sorted(entries.values(), key=lambda e: int(e["cluster_id"]))
            evaluated = [r for r in results if r.get("status") == "evaluated"]
            summary = {"n_clusters": len(results), "evaluated": len(evaluated),
                       "promoted": sum(bool(r.get("promoted")) for r in evaluated),
                       "promoted_clusters": [r["cluster_id"] for r in evaluated if r.get("promoted")]}
            cfg = ws.config
            base = report or EvalReport(clusters=[], seed=cfg.seed)
            EvalReport(clusters=results, summary=summary, seed=cfg.seed, parity=cfg.eval.parity,
                       teacher_price_per_mtok=cfg.eval.teacher_price_per_mtok,
                       hardware_price_per_hour=cfg.eval.hardware_price_per_hour,
                       teacher_score_note=base.teacher_score_note, gate=base.gate).save(ws)
        promoted = sum(bool(o.get("promoted")) for o in self.outcomes.values())
        return f"{len(self.new)} new version(s) evaluated, {promoted} promoted"


def _verdict(comparison: dict[str, Any], served: Specialist, new: Specialist) -> tuple[bool, str]:
    """(promote the new version?, why) from :func:`compare_versions`."""
    n, old_score, new_score = comparison["n"], comparison["served"], comparison["new"]
    if not n or old_score is None or new_score is None:
        return False, (f"not promoted: the task's held-out split has no test call on which to compare v{new.version} "
                       f"with the served v{served.version}, which stays promoted")
    figures = (f"on the same {n} test calls of the held-out split, agreement with the teacher "
               f"v{new.version} {new_score:.3f} vs served v{served.version} {old_score:.3f}")
    if new_score + 1e-12 >= old_score:
        return True, f"promoted by 'aad distill --if-needed': passes the gate and does at least as well ({figures})"
    return False, f"not promoted: worse than the served version ({figures}); v{served.version} stays promoted"


def run_if_needed(
    ws: Workspace,
    *,
    profile: Profile | str = "full",
    show_progress: bool = True,
    report: bool = True,
    on_plan: Callable[[list[TaskPlan]], None] | None = None,
    on_stage: Callable[[StageResult], None] | None = None,
    runners: dict[str, Callable[[Workspace, Profile, bool], str]] | None = None,
) -> IfNeededResult:
    """Plan (:func:`plan_retraining`); when a task needs it, run the distill stages, training and
    comparing only those tasks. ``runners`` replaces stage functions (tests)."""
    from aad_core.pipeline.distill import load_distill_state, run_distill

    plan = plan_retraining(ws)
    if on_plan:
        on_plan(plan)
    result = IfNeededResult(plan=plan)
    todo = result.retrained
    if todo:
        retrainer = _Retrainer(todo)
        state = load_distill_state(ws)
        for stage in ("train", "evaluate", "route"):  # they run for the planned tasks whatever their hashes say
            state.stages.pop(stage, None)
        state.save(ws)
        result.stages = run_distill(ws, profile=profile, show_progress=show_progress, report=report,
                                    on_stage=on_stage, runners={"train": retrainer.train,
                                                                "evaluate": retrainer.evaluate, **(runners or {})})
        result.outcomes = [retrainer.outcomes[p.cluster_id] for p in todo if p.cluster_id in retrainer.outcomes]
    ws.write_state(RETRAIN_STATE, {"finished_at": datetime.now(timezone.utc).isoformat(),
                                   "plan": [p.to_json() for p in plan], "outcomes": result.outcomes})
    return result


__all__ = ["RETRAIN_STATE", "IfNeededResult", "TaskPlan", "compare_versions", "new_trace_counts", "plan_retraining",
           "run_if_needed"]
