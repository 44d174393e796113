"""What ``aad monitor`` shows: per task, from the routing engine's logs (``.aad/state/serving.jsonl``
and ``shadow.jsonl``, written by :class:`~aad_core.serving.shadow.ShadowEvaluator`).

- **served share**: requests the specialist answered / requests routed to the task's cluster;
- **live agreement**: agreeing shadow pairs / pairs of the served specialist version (its last
  ``[route] shadow_window`` pairs), with the one-sided Clopper-Pearson lower bound at ``[eval] gate_alpha``;
- **escalations by reason**: the kind of each rejected specialist answer (timeout, exception,
  validator ..., low confidence);
- **drift**: the share of the task's requests below its similarity threshold, against the share of
  the task's own training calls below it when the router was calibrated (``router.json``:
  ``own_rejected / n_own``); flagged when the recent share is at least twice that and 10 points
  above it, over at least ``MIN_DRIFT_REQUESTS`` requests. A changed teacher model name in the
  shadow pairs is flagged too (a new teacher calls for re-distillation);
- **new labels** (label tasks only: the cluster's answer kind, else the router's output kind, is
  ``label``): the teacher's answers in the task's shadow pairs and escalation traces (source
  ``router``) of the period that are not among the answers the served specialist was trained on
  (its manifest's training ids; labels compared without case and surrounding spaces); flagged when
  more than ``NEW_LABEL_SHARE`` (5 %) of at least ``MIN_DRIFT_REQUESTS`` answers are new: the
  teacher now answers with labels the specialist cannot give;
- **embedding shift**: the mean routing similarity (cosine to the task's centroid) of the recent
  requests whose nearest centroid is the task's, against the mean similarity of the task's own
  training calls at calibration (``router.json``: ``mean_own_similarity``); flagged when it dropped
  by more than ``EMBEDDING_SHIFT_MARGIN`` (0.05) over at least ``MIN_DRIFT_REQUESTS`` requests
  (a router calibrated before this figure existed shows none: run ``aad route --calibrate``);
- **cost saved vs teacher-only**: the tokens of the specialist-served requests (prompt estimated at
  4 characters per token, plus the answer) at ``[eval] teacher_price_per_mtok``, minus the
  specialist's time at ``[eval] hardware_price_per_hour``;
- **cascade tiers** (``[route] tiers``, :mod:`aad_core.serving.cascade`): the requests each tier answered
  (specialist, each middle tier, teacher), each middle tier's tries and rejections, and its live
  agreement with the teacher (its own shadow pairs, ``"tier"`` in ``shadow.jsonl``), per task and in all.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from aad_core.serving.shadow import SERVING_LOG, SHADOW_LOG, live_agreement, read_jsonl

if TYPE_CHECKING:
    from aad_core.workspace import Workspace

#: Fewest requests (or teacher answers, for new labels) of a task before a drift statistic is judged.
MIN_DRIFT_REQUESTS = 20
#: New labels: flagged when more than this share of the teacher's answers are not in the training answers.
NEW_LABEL_SHARE = 0.05
#: Embedding shift: flagged when the recent mean similarity is more than this below the training calls' mean.
EMBEDDING_SHIFT_MARGIN = 0.05
#: New labels listed per task (most frequent first).
SHOW_NEW_LABELS = 5


def _merge(total: dict[str, Any], row: dict[str, Any]) -> None:
    for key, value in row.items():
        if key in ("day", "cluster_id"):
            continue
        if isinstance(value, dict):
            sub = total.setdefault(key, {})
            for k, v in value.items():
                sub[k] = sub.get(k, 0) + v
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value


def monitor_summary(ws: Workspace, days: int | None = 7, *, since: str | None = None) -> dict[str, Any]:
    """Per task (cluster) figures over the last ``days`` UTC days (None = everything logged), or from
    ``since`` on (an ISO date or time; the serving counters are per day, so they count from its day)."""
    from aad_core.artifacts import ClusterState, RouterState
    from aad_core.specialists import SpecialistRegistry

    cfg = ws.config
    if since is None and days is not None:
        since = (date.today() - timedelta(days=max(0, days - 1))).isoformat()
    day0 = None if since is None else since[:10]
    serving = [r for r in read_jsonl(ws.state_dir / SERVING_LOG) if day0 is None or str(r.get("day")) >= day0]
    shadow = [r for r in read_jsonl(ws.state_dir / SHADOW_LOG)
              if since is None or str(r.get("time") or r.get("day")) >= since]
    state = ClusterState.load_optional(ws)
    labels = {c.id: (c.task or c.label) for c in state.clusters} if state else {}
    router = RouterState.load_optional(ws)
    calibrated = dict(router.clusters) if router else {}
    registry = SpecialistRegistry(ws)
    promoted = registry.promoted()
    specs = registry.list()

    totals: dict[Any, dict[str, Any]] = {}
    for row in serving:
        _merge(totals.setdefault(row.get("cluster_id"), {}), row)
    cluster_ids = sorted({*totals, *(r.get("cluster_id") for r in shadow)}, key=lambda c: (c is None, c if c is not None else 0))
    price, hw = cfg.eval.teacher_price_per_mtok, cfg.eval.hardware_price_per_hour
    tasks: list[dict[str, Any]] = []
    label_jobs: list[tuple[dict[str, Any], str, int | None, list[dict[str, Any]]]] = []
    for cid in cluster_ids:
        t = totals.get(cid, {})
        n = int(t.get("requests", 0))
        served = int(t.get("specialist", 0))
        spec = promoted.get(cid) if cid is not None else None
        own = [r for r in shadow if r.get("cluster_id") == cid and r.get("event", "pair") == "pair" and not r.get("tier")]
        if spec is None and own:  # the version the pairs were about (e.g. demoted since)
            last = own[-1]
            spec_name, spec_version = last.get("specialist"), last.get("version")
        else:
            spec_name, spec_version = (spec.name, spec.version) if spec else (None, None)
        pairs = [r for r in own if r.get("specialist") == spec_name and r.get("version") == spec_version]
        live = live_agreement(pairs, cfg.route.shadow_window, cfg.eval.gate_alpha)
        demotions = [r for r in shadow if r.get("event") == "demoted" and r.get("specialist") == spec_name]
        saved = int(t.get("served_tokens", 0)) * price / 1e6 - float(t.get("specialist_ms", 0.0)) / 3.6e6 * hw
        below = int(t.get("below_threshold", 0))
        cal = calibrated.get(cid, {}) if cid is not None else {}
        expected = (cal["own_rejected"] / cal["n_own"]) if cal.get("n_own") else None
        share_below = below / n if n else None
        drift = (share_below is not None and n >= MIN_DRIFT_REQUESTS and expected is not None
                 and share_below >= 2 * expected and share_below >= expected + 0.10)
        models = list(dict.fromkeys(str(r.get("teacher_model")) for r in own if r.get("teacher_model")))
        version_state = None
        if spec_name is not None:
            match = [s for s in specs if s.name == spec_name and s.version == spec_version]
            version_state = "promoted" if match and match[0].promoted else "demoted" if match else None
        tasks.append({
            "cluster_id": cid,
            "task": labels.get(cid, "-" if cid is None else f"cluster {cid}"),
            "specialist": spec_name, "version": spec_version, "state": version_state,
            "requests": n, "served": served, "served_share": served / n if n else None,
            "teacher": int(t.get("teacher", 0)),
            "escalations": dict(sorted((t.get("escalations") or {}).items(), key=lambda kv: -kv[1])),
            "live_agreement": live["agreement"], "lower_bound": live["lower_bound"],
            "agreeing_pairs": live["k"], "shadow_pairs": len(own), "window_pairs": live["n"],
            "shadow_skipped": t.get("shadow_skipped") or {},
            "demotions": [{"time": r.get("time"), "version": r.get("version"), "reason": r.get("reason")}
                          for r in demotions],
            "below_threshold_share": share_below, "calibration_below_share": expected, "drift": bool(drift),
            "mean_similarity": (t["similarity_sum"] / t["similarity_n"]) if t.get("similarity_n") else None,
            "threshold": cal.get("threshold"),
            "teacher_models": models, "teacher_model_changed": len(models) > 1,
            "new_labels": None, "embedding_shift": embedding_shift(t, cal),
            "saved_usd": saved,
            **_task_tiers(t, [r for r in shadow if r.get("cluster_id") == cid and r.get("tier")],
                          cfg.route.shadow_window, cfg.eval.gate_alpha),
        })
        if cid is not None and spec_name is not None and label_task(cid, state, cal):
            label_jobs.append((tasks[-1], spec_name, spec_version, own))
    if label_jobs:
        _fill_new_labels(ws, label_jobs, since, specs)
    for task in tasks:
        task["drift_flags"] = drift_flags(task)
    n_all = sum(t["requests"] for t in tasks)
    served_all = sum(t["served"] for t in tasks)
    return {
        "since": since, "days": days, "target_agreement": cfg.eval.target_agreement, "alpha": cfg.eval.gate_alpha,
        "teacher_price_per_mtok": price, "tasks": tasks,
        "cascade": cascade_summary(tasks, shadow, cfg.route.shadow_window, cfg.eval.gate_alpha),
        "total": {"requests": n_all, "served": served_all, "served_share": served_all / n_all if n_all else None,
                  "shadow_pairs": sum(t["shadow_pairs"] for t in tasks),
                  "saved_usd": sum(t["saved_usd"] for t in tasks)},
    }


def _task_tiers(counts: dict[str, Any], tier_pairs: list[dict[str, Any]], window: int,
                alpha: float) -> dict[str, Any]:
    """A task's cascade figures: ``tiers`` {tier: requests answered} (specialist, middle tiers in the order
    tried, teacher), ``tier_tried`` / ``tier_rejected`` per middle tier, ``tier_agreement`` per middle tier
    (its shadow pairs: {k, n, agreement, lower_bound})."""
    answered = dict(counts.get("tier_answered") or {})
    order = list(dict.fromkeys([*(counts.get("tier_tried") or {}), *answered]))
    tiers = {"specialist": int(counts.get("specialist", 0)), **{n: int(answered.get(n, 0)) for n in order},
             "teacher": int(counts.get("teacher", 0))}
    agreement = {name: live_agreement([r for r in tier_pairs if r.get("tier") == name], window, alpha)
                 for name in dict.fromkeys(r.get("tier") for r in tier_pairs)}
    return {"tier": int(counts.get("tier", 0)), "tiers": tiers, "tier_tried": dict(counts.get("tier_tried") or {}),
            "tier_rejected": dict(counts.get("tier_rejected") or {}), "tier_agreement": agreement}


def cascade_summary(tasks: list[dict[str, Any]], shadow: list[dict[str, Any]], window: int,
                    alpha: float) -> dict[str, Any] | None:
    """Traffic and agreement per tier over every task (None when no middle tier was ever tried):
    ``{"tiers": [...], "answered": {tier: n}, "share": {tier: share}, "tried", "rejected",
    "agreement": {tier: {k, n, agreement, lower_bound}}}``; the specialist's agreement is over every
    specialist shadow pair, the teacher's is None (it is the reference)."""
    if not any(t.get("tier_tried") for t in tasks) and not any(r.get("tier") for r in shadow):
        return None
    answered: dict[str, int] = {}
    tried: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for t in tasks:
        for name, n in (t.get("tiers") or {}).items():
            answered[name] = answered.get(name, 0) + int(n)
        for name, n in (t.get("tier_tried") or {}).items():
            tried[name] = tried.get(name, 0) + int(n)
        for name, n in (t.get("tier_rejected") or {}).items():
            rejected[name] = rejected.get(name, 0) + int(n)
    middle = [n for n in dict.fromkeys([*tried, *answered]) if n not in ("specialist", "teacher")]
    order = ["specialist", *middle, "teacher"]
    total = sum(answered.get(n, 0) for n in order)
    pairs = [r for r in shadow if r.get("event", "pair") == "pair"]
    agreement: dict[str, Any] = {"specialist": live_agreement([r for r in pairs if not r.get("tier")], None, alpha)}
    agreement.update({n: live_agreement([r for r in pairs if r.get("tier") == n], window, alpha) for n in middle})
    agreement["teacher"] = None
    return {"tiers": order, "answered": {n: answered.get(n, 0) for n in order},
            "share": {n: (answered.get(n, 0) / total if total else None) for n in order},
            "tried": {n: tried.get(n, 0) for n in middle}, "rejected": {n: rejected.get(n, 0) for n in middle},
            "agreement": agreement, "requests": total}


def label_task(cluster_id: int, state: Any, calibration: dict[str, Any]) -> bool:
    """The task answers with labels: its cluster's answer kind, else the router's output kind, is "label"."""
    cluster = next((c for c in state.clusters if c.id == cluster_id), None) if state else None
    kind = getattr(cluster, "answer_kind", None) or calibration.get("output_kind")
    return kind == "label"


def embedding_shift(counts: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any] | None:
    """{recent, training, drop, n, drift} of a task's mean routing similarity (None when the router
    calibration has no training mean or no request was embedded)."""
    n = int(counts.get("similarity_n") or 0)
    training = calibration.get("mean_own_similarity")
    if not n or training is None:
        return None
    recent = float(counts.get("similarity_sum", 0.0)) / n
    drop = float(training) - recent
    return {"recent": recent, "training": float(training), "drop": drop, "n": n,
            "drift": n >= MIN_DRIFT_REQUESTS and drop > EMBEDDING_SHIFT_MARGIN}


def _fill_new_labels(ws: Workspace, jobs: list[tuple[dict[str, Any], str, int | None, list[dict[str, Any]]]],
                     since: str | None, specs: list[Any]) -> None:
    """Set each job's task ``new_labels``: the teacher's answers (shadow pairs, escalations) of the
    period against the answers its specialist version was trained on."""
    from aad_core.formats.answers import answer_string
    from aad_core.formats.labels import label_key
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(ws)
    by_key = {(s.name, s.version): s for s in specs}
    with ws.store() as store:
        escalations: dict[Any, list[str]] = {}
        for trace in store.iter_traces(source="router", since=since):
            info = trace.metadata.get("aad_escalation") or {}
            if trace.response is not None:
                escalations.setdefault(info.get("cluster_id"), []).append(answer_string(trace))
        for task, name, version, rows in jobs:
            spec = by_key.get((name, version))
            if spec is None:
                continue
            trained_ids = registry.manifest(spec).get("selection") or []
            known = {label_key(answer_string(t)) for t in store.iter_traces(ids=trained_ids) if t.response is not None}
            ids = [str(r["trace_id"]) for r in rows if r.get("trace_id")]
            answers = [answer_string(t) for t in store.iter_traces(ids=ids) if t.response is not None] if ids else []
            answers += escalations.get(task["cluster_id"], [])
            new: dict[str, int] = {}
            for answer in answers:
                if label_key(answer) not in known:
                    new[answer.strip()] = new.get(answer.strip(), 0) + 1
            n, n_new = len(answers), sum(new.values())
            share = n_new / n if n else None
            task["new_labels"] = {
                "n": n, "new": n_new, "share": share, "n_training_labels": len(known),
                "labels": dict(sorted(new.items(), key=lambda kv: (-kv[1], kv[0]))[:SHOW_NEW_LABELS]),
                "drift": share is not None and n >= MIN_DRIFT_REQUESTS and share > NEW_LABEL_SHARE,
            }


def monitor_daily(ws: Workspace) -> dict[str, Any]:
    """The logs per UTC day, for plots over time (everything logged): ``{"days": [...], "tasks": {task name:
    {"requests", "served", "pairs", "agreeing"} each a list per day}, "escalations": {reason kind: list per
    day}}`` (the report's "Live monitoring" section). A task is named as :func:`monitor_summary` names it."""
    from aad_core.artifacts import ClusterState

    serving = read_jsonl(ws.state_dir / SERVING_LOG)
    pairs = [r for r in read_jsonl(ws.state_dir / SHADOW_LOG) if r.get("event", "pair") == "pair" and not r.get("tier")]
    days = sorted({str(r.get("day")) for r in serving if r.get("day")} | {str(r.get("day")) for r in pairs if r.get("day")})
    state = ClusterState.load_optional(ws)
    labels = {c.id: (c.task or c.label) for c in state.clusters} if state else {}

    def name(cid: Any) -> str:
        return str(labels.get(cid, "-" if cid is None else f"cluster {cid}"))

    index = {day: i for i, day in enumerate(days)}
    tasks: dict[str, dict[str, list[int]]] = {}
    escalations: dict[str, list[int]] = {}

    def series(cid: Any) -> dict[str, list[int]]:
        return tasks.setdefault(name(cid), {k: [0] * len(days) for k in ("requests", "served", "pairs", "agreeing")})

    for row in serving:
        if str(row.get("day")) not in index:
            continue
        i, s = index[str(row.get("day"))], series(row.get("cluster_id"))
        s["requests"][i] += int(row.get("requests") or 0)
        s["served"][i] += int(row.get("specialist") or 0)
        for kind, n in (row.get("escalations") or {}).items():
            escalations.setdefault(str(kind), [0] * len(days))[i] += int(n)
    for row in pairs:
        if str(row.get("day")) not in index:
            continue
        i, s = index[str(row.get("day"))], series(row.get("cluster_id"))
        s["pairs"][i] += 1
        s["agreeing"][i] += bool(row.get("agree"))
    return {"days": days, "tasks": dict(sorted(tasks.items())), "escalations": dict(sorted(escalations.items()))}


def drift_flags(task: dict[str, Any]) -> list[str]:
    """The names of the drift statistics flagged for a task of :func:`monitor_summary`."""
    flags = []
    if task.get("drift"):
        flags.append("below threshold")
    if (task.get("new_labels") or {}).get("drift"):
        flags.append("new labels")
    if (task.get("embedding_shift") or {}).get("drift"):
        flags.append("embedding shift")
    if task.get("teacher_model_changed"):
        flags.append("teacher changed")
    return flags


__all__ = ["EMBEDDING_SHIFT_MARGIN", "MIN_DRIFT_REQUESTS", "NEW_LABEL_SHARE", "cascade_summary", "drift_flags",
           "embedding_shift", "label_task", "monitor_daily", "monitor_summary"]
