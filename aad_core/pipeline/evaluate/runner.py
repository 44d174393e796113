"""Per-cluster evaluation on the held-out split: base student vs specialist vs teacher, latency,
cost, and the risk-coverage gate. Writes ``.aad/state/eval.json`` and records promotions.

The gate splits the held-out calls into a calibration part (the confidence threshold is chosen on
it; training saw only this part, for early stopping) and a test part (promotion is decided on it).

The teacher's answers are the references, so the teacher scores 1.0 on itself by definition;
user feedback on a trace (``feedback={"correct": False}`` etc.) lowers that item's teacher score.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import EVAL as EVAL_STATE
from aad_core.artifacts import ClusterState, EvalReport, unfit_reason
from aad_core.formats.answers import answer_string, teacher_quality
from aad_core.pipeline.evaluate.choose import evaluator_name_for
from aad_core.pipeline.evaluate.costs import latency_summary, recorded_price_per_mtok, specialist_price_per_mtok
from aad_core.pipeline.evaluate.gate import CoverageGate, coverage_gate, parity_gate
from aad_core.pipeline.evaluate.risk_coverage import CALIBRATION_FIGURES, calibration_test_split, risk_coverage_curve

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


#: Why eval.json has no base-student figures for a specialist that is not a LoRA adapter.
BASE_SKIPPED = ("not run: a {kind} specialist does not run on the base student, so the base student is no "
                "baseline for it; it is judged against the teacher only")


def _generate(generate: Callable[..., Sequence[Any]], requests: list[Any], max_new_tokens: int
              ) -> tuple[list[Any], float]:
    start = time.perf_counter()
    gens = generate(requests, max_new_tokens=max_new_tokens)
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
    *,
    predictor: Any = None,
) -> dict[str, Any]:
    """Evaluate one cluster's specialist against the base student and the teacher.

    A kind "lora" specialist generates through ``runtime`` (its adapter on the shared base, which also
    gives the base student's answers); any other kind through its ``predictor``
    (``Trainer.load_predictor``), and the base student is not run (``runtime`` may be None).
    """
    cfg = ws.config.eval
    entry = _status_entry(cluster)
    name, why = evaluator_name_for(ws.config, cluster, heldout)
    evaluator = _make_evaluator(name, ws)
    references = [answer_string(t) for t in heldout]
    requests = [t.request for t in heldout]

    generate = (predictor.generate if predictor is not None
                else functools.partial(runtime.generate, adapter=specialist.name))
    base_gens, base_s = (_generate(functools.partial(runtime.generate, adapter=None), requests, cfg.max_new_tokens)
                         if predictor is None else (None, None))
    spec_gens, spec_s = _generate(generate, requests, cfg.max_new_tokens)
    single = [generate([r], max_new_tokens=cfg.max_new_tokens)[0] for r in requests[: cfg.latency_samples]]
    context = _context(ws, name, heldout)
    base_m = (evaluator.evaluate([g.text for g in base_gens], references, **context) if base_gens is not None
              else {"score": None, "skipped": BASE_SKIPPED.format(kind=getattr(specialist, "kind", "lora"))})
    spec_m = evaluator.evaluate([g.text for g in spec_gens], references, **context)
    teacher = _teacher(heldout)
    parity = parity_gate(spec_m["score"], base_m["score"], teacher["score"], cfg.parity)
    gate, curves = _risk_coverage(ws, name, heldout, spec_gens, spec_m.get("per_item"),
                                  calibration=(getattr(specialist, "metrics", None) or {}).get("calibration"),
                                  base_per_item=base_m.get("per_item"), teacher_score=teacher["score"])

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
        specialist={"name": specialist.name, "version": specialist.version,
                    "kind": getattr(specialist, "kind", "lora"), **_public(spec_m),
                    "mean_logprob": _mean([g.mean_logprob for g in spec_gens])},
        base={**_public(base_m), "mean_logprob": _mean([g.mean_logprob for g in base_gens or []])},
        teacher=teacher,
        latency={
            "specialist": {
                **latency_summary([g.latency_ms for g in (single or spec_gens)]),
                "source": f"measured, one request at a time ({len(single)} requests)" if single
                else "measured, amortised over batches",
            },
            "specialist_batched": {**latency_summary([g.latency_ms for g in spec_gens]),
                                   "source": "measured, amortised over batches"},
            "base": ({**latency_summary([g.latency_ms for g in base_gens]), "source": "measured, amortised over batches"}
                     if base_gens is not None else {"source": base_m["skipped"]}),
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
        parity_target=parity.target,
        parity={"target": parity.target, "reached": parity.promoted, "reason": parity.reason},
        gate=gate.gate,
        risk_coverage=curves,
        promoted=gate.promoted,
        reason=gate.reason,
        examples=[
            {
                "request": _clip(t.request.last_user_message()),
                "teacher": _clip(ref),
                "base": _clip(b.text) if b is not None else "",
                "specialist": _clip(s.text),
                "specialist_correct": bool(spec_m.get("per_item", [0.0] * len(heldout))[i]),
            }
            for i, (t, ref, b, s) in enumerate(zip(heldout, references, base_gens or [None] * len(heldout), spec_gens))
            if i < _EXAMPLES
        ],
    )
    return entry


def _confidence_signal(gens: Sequence[Any]) -> tuple[str, list[float | None]]:
    """The generations' confidence signal: their ``confidence`` when every one carries it (e.g. a
    classifier's probability), else their mean token log-prob."""
    if gens and all(getattr(g, "confidence", None) is not None for g in gens):
        return "confidence", [float(g.confidence) for g in gens]
    values = [getattr(g, "mean_logprob", None) for g in gens]
    return "mean_logprob", [None if v is None else float(v) for v in values]


def _risk_coverage(ws: Workspace, evaluator: str, heldout: Sequence[Trace], gens: Sequence[Any],
                   per_item: Sequence[float] | None, *, calibration: dict[str, Any] | None = None,
                   base_per_item: Sequence[float] | None = None,
                   teacher_score: float | None = None) -> tuple[CoverageGate, dict[str, Any]]:
    """The risk-coverage gate and its curves. The threshold is chosen on a calibration part: the
    trainer's own out-of-fold pairs when it reports them for this signal (``metrics["calibration"]``,
    e.g. the classifier's), and every held-out call is then a test call; otherwise a seeded share of
    the held-out calls. When the calibration part is too small for any threshold to show the target
    agreement, the parity rule decides on the test part alone (the calibration part may have tuned
    the specialist: early stopping, vote weights) and the reason says so."""
    from aad_core.pipeline.evaluate.risk_coverage import min_calls_for

    cfg = ws.config.eval
    signal, confidences = _confidence_signal(gens)
    if per_item is None or len(per_item) != len(heldout):
        gate = {"signal": signal, "threshold": None, "calibration": None, "test": None,
                "target_agreement": cfg.target_agreement, "min_coverage": cfg.min_coverage, "alpha": cfg.gate_alpha}
        reason = (f"not promoted: the '{evaluator}' evaluator gave no per-call verdicts, which the risk-coverage "
                  "gate needs")
        return CoverageGate(False, reason, gate), {"signal": signal, "calibration": [], "test": []}
    parts: dict[str, tuple[list[float | None], list[float]]] = {"calibration": ([], []), "test": ([], [])}
    source = f"{1 - cfg.test_fraction:.0%} of the held-out calls"
    test_items: list[int] = []  # indices of the held-out calls in the test part
    if calibration and calibration.get("signal") == signal and calibration.get("confidence"):
        parts["calibration"] = (list(calibration["confidence"]), [float(a) for a in calibration["agreement"]])
        parts["test"] = (list(confidences), [float(ok) for ok in per_item])
        test_items = list(range(len(heldout)))
        source = str(calibration.get("source", "the trainer's calibration pairs"))
    else:
        in_cal = set(calibration_test_split([t.id for t in heldout], ws.config.seed, cfg.test_fraction)[0])
        for i, (trace, conf, ok) in enumerate(zip(heldout, confidences, per_item)):
            part = parts["calibration" if trace.id in in_cal else "test"]
            part[0].append(conf)
            part[1].append(float(ok))
            if trace.id not in in_cal:
                test_items.append(i)
    curves = {"signal": signal, "calibration_source": source,
              **{k: risk_coverage_curve(*v) for k, v in parts.items()}}
    n_cal, need = len(parts["calibration"][0]), min_calls_for(cfg.target_agreement, cfg.gate_alpha)
    if teacher_score is not None and 0 < need and n_cal < need:
        if not test_items:
            gate = {"signal": signal, "threshold": None, "calibration": {"n": n_cal, "source": source}, "test": None,
                    "target_agreement": cfg.target_agreement, "min_coverage": cfg.min_coverage,
                    "alpha": cfg.gate_alpha, "mode": "parity-fallback", "calibration_source": source}
            return CoverageGate(False, f"not promoted: {n_cal} calibration calls and no test call", gate), curves
        spec_test = sum(float(per_item[i]) for i in test_items) / len(test_items)
        base_test = (None if base_per_item is None or len(base_per_item) != len(heldout)
                     else sum(float(base_per_item[i]) for i in test_items) / len(test_items))
        parity = parity_gate(spec_test, base_test, teacher_score, cfg.parity)
        gate = {"signal": signal, "threshold": None, "calibration": {"n": n_cal, "source": source}, "test": None,
                "target_agreement": cfg.target_agreement, "min_coverage": cfg.min_coverage, "alpha": cfg.gate_alpha,
                "mode": "parity-fallback", "calibration_source": source}
        gate["test"] = {"n": len(test_items), "agreement": spec_test}
        why = (f"{n_cal} calibration calls cannot show agreement {cfg.target_agreement:.2f} with "
               f"{1 - cfg.gate_alpha:.0%} confidence (that needs at least {need}): the parity rule decides on the "
               f"{len(test_items)} test calls, and a promoted specialist serves without a confidence threshold")
        verdict, _, figures = parity.reason.partition(": ")
        return CoverageGate(parity.promoted, f"{verdict} by parity, {why}: {figures}", gate), curves
    gate = coverage_gate(parts["calibration"], parts["test"], signal=signal, target_agreement=cfg.target_agreement,
                         min_coverage=cfg.min_coverage, alpha=cfg.gate_alpha)
    gate.gate.update(mode="risk-coverage", calibration_source=source)
    return gate, curves


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


def evaluate_specialist(ws: Workspace, state: ClusterState, cluster: Cluster, spec: Any, store: Any,
                        runtimes: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one specialist of ``cluster`` on the cluster's held-out calls (at most ``[eval] max_heldout``)
    and apply the gate; ``runtimes`` caches one LoRA runtime per base model across calls. The caller
    records the promotion (``SpecialistRegistry.set_promoted``)."""
    from aad_core.plugins.components import HELDOUT_TRAINED_ON

    cfg = ws.config
    # held-out calls the specialist was fitted on (a classifier's calibration part) are never scored
    trained_on = set((getattr(spec, "metrics", None) or {}).get(HELDOUT_TRAINED_ON) or ())
    ids = [i for i in state.heldout_ids(cluster.id) if i not in trained_on]
    if cfg.eval.max_heldout is not None and spec.kind == "lora":
        # The cap bounds generation time; a classifier answers every held-out call in milliseconds,
        # and more test calls make its gate's verdict less a matter of chance.
        ids = ids[: cfg.eval.max_heldout]
    heldout = [t for t in store.iter_traces(ids=ids) if t.response is not None]
    if not heldout:
        entry = _status_entry(cluster)
        entry.update(status="no held-out", reason="not promoted: no held-out traces to evaluate on")
        return entry
    if spec.kind != "lora":  # served by its trainer's predictor: no base student to load
        from aad_core.specialists import load_predictor

        return evaluate_cluster(ws, cluster, heldout, None, spec, predictor=load_predictor(spec, ws))
    if spec.base_model not in runtimes:
        from aad_core.models.runtime import SpecialistRuntime

        # The arithmetic and decoding that serve the specialist ([route] fast_path, bf16_from_rows,
        # prompt_lookup_tokens), so that the gate judges what is served.
        route = ws.config.route
        runtimes[spec.base_model] = SpecialistRuntime(spec.base_model, fast_path=route.fast_path,
                                                      prompt_lookup=route.prompt_lookup_tokens,
                                                      bf16_from_rows=route.bf16_from_rows)
    runtime = runtimes[spec.base_model]
    runtime.add_specialist(spec)
    heldout, too_long = _servable(runtime, spec, heldout)
    if not heldout:
        entry = _status_entry(cluster)
        entry.update(status="no held-out", reason=f"not promoted: all {too_long} held-out calls are longer than the "
                     "specialist's max_length, so the router would send every one to the teacher")
        return entry
    entry = evaluate_cluster(ws, cluster, heldout, runtime, spec)
    if too_long:
        entry["n_too_long"] = too_long
        entry["reason"] = (f"{entry.get('reason', '')}; {too_long} held-out calls longer than its max_length were "
                           "left out: the router sends them to the teacher at once")
    return entry


def _servable(runtime: Any, spec: Any, heldout: list[Trace]) -> tuple[list[Trace], int]:
    """The held-out calls a LoRA specialist would be asked to answer: the router sends a prompt longer
    than the specialist's training ``max_length`` to the teacher at once, so the gate judges the rest."""
    from aad_core.serving.specialists import trained_max_length

    limit = trained_max_length(spec)
    if limit is None:
        return heldout, 0
    kept = [t for t in heldout if runtime.prompt_tokens(t.request) <= limit]
    return kept, len(heldout) - len(kept)


def candidate_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One row of a task's candidates table: what the gate measured of one specialist kind."""
    spec = entry.get("specialist") or {}
    gate = entry.get("gate") or {}
    test = gate.get("test") or {}
    latency = (entry.get("latency") or {}).get("specialist") or {}
    return {
        "name": spec.get("name"), "version": spec.get("version"), "kind": spec.get("kind"),
        "score": spec.get("score"), "threshold": gate.get("threshold"), "mode": gate.get("mode"),
        "coverage": test.get("coverage"), "agreement": test.get("agreement"), "n_test": test.get("n"),
        "latency_p50_ms": latency.get("p50_ms"),
        "cost_per_mtok": (entry.get("cost") or {}).get("specialist_per_mtok"),
        "promoted": bool(entry.get("promoted")), "reason": entry.get("reason"),
    }


def served_gate(gate: dict[str, Any] | None) -> dict[str, Any]:
    """What serving needs of a version's gate verdict (the specialist's manifest keeps it)."""
    gate = gate or {}
    calibration = gate.get("calibration") or {}
    return {"mode": gate.get("mode"), "signal": gate.get("signal"), "threshold": gate.get("threshold"),
            "calibration": {k: calibration.get(k) for k in CALIBRATION_FIGURES}}


def run_evaluate(ws: Workspace, *, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate every cluster's latest specialist on its held-out split, apply the risk-coverage gate,
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
                    unfit = unfit_reason(ws, cluster.id) if cluster.routine else None
                    entry.update(
                        status="no specialist",
                        reason=(f"routine, but no specialist kind fits its task ({unfit}): stays with the teacher"
                                if unfit else "routine, but no specialist trained yet: run 'aad train'"
                                if cluster.routine else "not routine: stays with the teacher"),
                    )
                    results.append(entry)
                    progress.advance(task)
                    continue
                entry = evaluate_specialist(ws, state, cluster, spec, store, runtimes)
                if entry["status"] == "evaluated":
                    before = (registry.manifest(spec).get("hyperparameters") or {}).get("candidates_before") or []
                    entry["candidates"] = [*before, candidate_summary(entry)]
                registry.set_promoted(spec.name, spec.version, entry["promoted"], entry["reason"],
                                      gate=served_gate(entry.get("gate")) if entry["status"] == "evaluated" else None)
                results.append(entry)
                progress.advance(task)
    finally:
        store.close()

    evaluated = [r for r in results if r["status"] == "evaluated"]
    report = EvalReport(
        seed=cfg.seed,
        parity=cfg.eval.parity,
        gate={"target_agreement": cfg.eval.target_agreement, "min_coverage": cfg.eval.min_coverage,
              "alpha": cfg.eval.gate_alpha, "test_fraction": cfg.eval.test_fraction},
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
