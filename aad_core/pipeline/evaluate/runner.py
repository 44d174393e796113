"""Per-cluster evaluation on the held-out split: base student vs specialist vs teacher, latency,
cost, and the parity gate. Writes ``.aad/state/eval.json`` and records promotions.

The teacher's answers are the references, so the teacher scores 1.0 on itself by definition;
user feedback on a trace (``feedback={"correct": False}`` etc.) lowers that item's teacher score.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import EVAL as EVAL_STATE
from aad_core.artifacts import ClusterState, EvalReport
from aad_core.formats.answers import answer_string, teacher_quality
from aad_core.pipeline.evaluate.choose import evaluator_name_for
from aad_core.pipeline.evaluate.costs import latency_summary, recorded_price_per_mtok, specialist_price_per_mtok
from aad_core.pipeline.evaluate.gate import parity_gate

if TYPE_CHECKING:
    from aad_core.schema import Cluster, Trace
    from aad_core.workspace import Workspace

_EXAMPLES = 3
_CLIP = 400


def _clip(text: str) -> str:
    return text if len(text) <= _CLIP else text[: _CLIP - 1] + "…"


def _make_evaluator(name: str, ws: Workspace) -> Any:
    from aad_core.models.embedding import get_embedder
    from aad_core.plugins.params import Lazy, build_component

    return build_component("evaluator", name, ws.config, workspace=ws, embedder=Lazy(lambda: get_embedder(ws.config)))


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "per_item"}


def _teacher(traces: Sequence[Trace]) -> dict[str, Any]:
    qualities = [teacher_quality(t) for t in traces]
    rated = [q for q in qualities if q is not None]
    score = sum(1.0 if q is None else q for q in qualities) / len(qualities) if qualities else 1.0
    source = (
        "recorded answers (1.0 on itself by definition)"
        if not rated
        else f"recorded answers, adjusted by user feedback on {len(rated)} of {len(qualities)} items"
    )
    return {"score": score, "source": source, "n_feedback": len(rated)}


def _generate(runtime: Any, requests: list[Any], adapter: str | None, max_new_tokens: int) -> tuple[list[Any], float]:
    start = time.perf_counter()
    gens = runtime.generate(requests, adapter=adapter, max_new_tokens=max_new_tokens)
    return list(gens), time.perf_counter() - start


def _status_entry(cluster: Cluster) -> dict[str, Any]:
    return {
        "cluster_id": cluster.id,
        "label": cluster.label,
        "task": cluster.task,
        "size": cluster.size,
        "routine": cluster.routine,
        "share_calls": cluster.share_calls,
        "promoted": False,
    }


def evaluate_cluster(
    ws: Workspace,
    cluster: Cluster,
    heldout: Sequence[Trace],
    runtime: Any,
    specialist: Any,
) -> dict[str, Any]:
    """Evaluate one cluster's specialist against the base student and the teacher."""
    cfg = ws.config.eval
    entry = _status_entry(cluster)
    name, why = evaluator_name_for(ws.config, cluster, heldout)
    evaluator = _make_evaluator(name, ws)
    references = [answer_string(t) for t in heldout]
    requests = [t.request for t in heldout]

    base_gens, base_s = _generate(runtime, requests, None, cfg.max_new_tokens)
    spec_gens, spec_s = _generate(runtime, requests, specialist.name, cfg.max_new_tokens)
    single = [runtime.generate([r], adapter=specialist.name, max_new_tokens=cfg.max_new_tokens)[0]
              for r in requests[: cfg.latency_samples]]
    context = _context(ws, name, heldout)
    base_m = evaluator.evaluate([g.text for g in base_gens], references, **context)
    spec_m = evaluator.evaluate([g.text for g in spec_gens], references, **context)
    teacher = _teacher(heldout)
    gate = parity_gate(spec_m["score"], base_m["score"], teacher["score"], cfg.parity)

    prompt_tokens = sum((t.usage.prompt_tokens if t.usage else 0) for t in heldout)
    spec_tokens = prompt_tokens + sum(int(g.n_tokens) for g in spec_gens)
    teacher_tokens = [(t.usage.total_tokens if t.usage else None) for t in heldout]
    entry.update(
        status="evaluated",
        evaluator=name,
        evaluator_source=why,
        metric=spec_m.get("metric", name),
        weakest_metric=bool(spec_m.get("weakest_metric", False)),
        n_heldout=len(heldout),
        specialist={"name": specialist.name, "version": specialist.version, **_public(spec_m),
                    "mean_logprob": _mean([g.mean_logprob for g in spec_gens])},
        base={**_public(base_m), "mean_logprob": _mean([g.mean_logprob for g in base_gens])},
        teacher=teacher,
        latency={
            "specialist": {
                **latency_summary([g.latency_ms for g in (single or spec_gens)]),
                "source": f"measured, one request at a time ({len(single)} requests)" if single
                else "measured, amortised over batches",
            },
            "specialist_batched": {**latency_summary([g.latency_ms for g in spec_gens]),
                                   "source": "measured, amortised over batches"},
            "base": {**latency_summary([g.latency_ms for g in base_gens]), "source": "measured, amortised over batches"},
            "teacher": {**latency_summary([t.latency_ms for t in heldout]), "source": "recorded traces"},
            "specialist_wall_s": spec_s,
            "base_wall_s": base_s,
        },
        cost={
            "teacher_per_mtok": cfg.teacher_price_per_mtok,
            "teacher_recorded_per_mtok": recorded_price_per_mtok([t.cost for t in heldout], teacher_tokens),
            "specialist_per_mtok": specialist_price_per_mtok(cfg.hardware_price_per_hour, spec_s, spec_tokens),
            "specialist_tokens": spec_tokens,
            "specialist_seconds": spec_s,
        },
        parity_target=gate.target,
        promoted=gate.promoted,
        reason=gate.reason,
        examples=[
            {
                "request": _clip(t.request.last_user_message()),
                "teacher": _clip(ref),
                "base": _clip(b.text),
                "specialist": _clip(s.text),
                "specialist_correct": bool(spec_m.get("per_item", [0.0] * len(heldout))[i]),
            }
            for i, (t, ref, b, s) in enumerate(zip(heldout, references, base_gens, spec_gens))
            if i < _EXAMPLES
        ],
    )
    return entry


def _context(ws: Workspace, evaluator: str, traces: Sequence[Trace]) -> dict[str, Any]:
    """Per-item evaluation context: a trace's own SQLite file (``metadata["sql_database"]``)."""
    if evaluator != "sql":
        return {}
    from pathlib import Path

    dbs = [t.metadata.get("sql_database") for t in traces]
    if not any(dbs):
        return {}
    return {"databases": [None if not d else str(Path(d) if Path(d).is_absolute() else ws.root / d) for d in dbs]}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_evaluate(ws: Workspace, *, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate every cluster's latest specialist on its held-out split, apply the parity gate,
    record promotions in the specialist registry, and write ``.aad/state/eval.json``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aad_core.errors import StageError

    cfg = ws.config
    if not ClusterState.exists(ws):
        raise StageError(
            f"{ClusterState.path(ws)} does not exist yet: there are no task clusters to evaluate.",
            hint="Run 'aad cluster' then 'aad train' (or 'aad distill' for every stage).",
        )
    from aad_core.specialists import SpecialistRegistry

    state = ClusterState.load(ws)
    registry = SpecialistRegistry(ws)
    latest = {c.id: registry.latest(c.id) for c in state.clusters}
    if not any(latest.values()):
        raise StageError(
            "No specialist has been trained yet, so there is nothing to evaluate.",
            hint="Run 'aad train' (or 'aad distill') first.",
        )
    runtimes: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    store = ws.store()
    try:
        with Progress(
            TextColumn("[bold]evaluate[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            disable=not show_progress, transient=False,
        ) as progress:
            task = progress.add_task("clusters", total=len(state.clusters))
            for cluster in state.clusters:
                progress.update(task, description=f"cluster {cluster.id} ({cluster.label[:40]})")
                spec = latest[cluster.id]
                entry = _status_entry(cluster)
                if spec is None:
                    entry.update(
                        status="no specialist",
                        reason=("routine, but no specialist trained yet: run 'aad train'" if cluster.routine
                                else "not routine: stays with the teacher"),
                    )
                    results.append(entry)
                    progress.advance(task)
                    continue
                ids = list(state.heldout_ids(cluster.id))
                if cfg.eval.max_heldout is not None:
                    ids = ids[: cfg.eval.max_heldout]
                heldout = [t for t in store.iter_traces(ids=ids) if t.response is not None]
                if not heldout:
                    entry.update(status="no held-out", reason="not promoted: no held-out traces to evaluate on")
                    registry.set_promoted(spec.name, spec.version, False, entry["reason"])
                    results.append(entry)
                    progress.advance(task)
                    continue
                if spec.base_model not in runtimes:
                    from aad_core.models.runtime import SpecialistRuntime

                    runtimes[spec.base_model] = SpecialistRuntime(spec.base_model)
                runtime = runtimes[spec.base_model]
                runtime.add_specialist(spec)
                entry = evaluate_cluster(ws, cluster, heldout, runtime, spec)
                registry.set_promoted(spec.name, spec.version, entry["promoted"], entry["reason"])
                results.append(entry)
                progress.advance(task)
    finally:
        store.close()

    evaluated = [r for r in results if r["status"] == "evaluated"]
    report = EvalReport(
        seed=cfg.seed,
        parity=cfg.eval.parity,
        teacher_price_per_mtok=cfg.eval.teacher_price_per_mtok,
        hardware_price_per_hour=cfg.eval.hardware_price_per_hour,
        teacher_score_note="The teacher's recorded answers are the references: the teacher scores 1.0 on itself "
        "by definition, lowered only where user feedback marks its answers wrong.",
        clusters=results,
        summary={
            "n_clusters": len(results),
            "evaluated": len(evaluated),
            "promoted": sum(r["promoted"] for r in evaluated),
            "promoted_clusters": [r["cluster_id"] for r in evaluated if r["promoted"]],
        },
    )
    report.save(ws)
    return report.to_json()
