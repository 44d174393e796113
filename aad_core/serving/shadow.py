"""Shadow evaluation, serving statistics and automatic demotion.

For a share of the requests a specialist answered (``[route] shadow_rate``, chosen by a hash of the
request, so a request is always shadowed or never), the teacher also answers — in a background
thread, after the user has the specialist's answer, at most ``[route] shadow_max_concurrency`` at a
time (a request arriving while all are busy is simply not shadowed) and within
``[route] shadow_budget_usd_per_day`` (estimated from the tokens at ``[eval] teacher_price_per_mtok``).

Each pair is scored by the task's evaluator (the one ``aad eval`` used, from ``eval.json``) and:

- the teacher's answer becomes a trace with source ``shadow`` through the capture writer (so it is
  redacted), the specialist's answer and the agreement in its ``metadata["aad_shadow"]``;
- a line goes to ``.aad/state/shadow.jsonl`` (ids, agreement, tokens, cost; no texts).

Live agreement per specialist version is measured over its most recent ``[route] shadow_window``
pairs since its promotion; when there are at least ``[route] shadow_min_pairs`` (never fewer than
the bound needs to reach the target when all agree) and the one-sided Clopper-Pearson lower bound
(level ``[eval] gate_alpha``) falls below ``[eval] target_agreement`` — the rule that promoted it —
the specialist is demoted (``SpecialistRegistry.set_promoted(..., False, reason)``, logged, a line
in ``shadow.jsonl``) and the engine stops serving it at once. ``aad specialists promote NAME``
reverses it.

Every routed request also updates per-task counters (specialist served, teacher chosen, below the
similarity threshold, escalations by reason, shadow pairs, skipped shadows, the tokens the teacher
would have been paid for), appended to ``.aad/state/serving.jsonl`` every few seconds and on
:meth:`ShadowEvaluator.flush`. ``aad monitor`` reads both files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.schema import ChatRequest, RoutingDecision, Trace

if TYPE_CHECKING:
    from aad_core.serving.engine import RoutingEngine
    from aad_core.serving.cascade import TierOutcome
    from aad_core.serving.routed_call import RoutedCall, SpecialistOutcome

log = logging.getLogger(__name__)

SHADOW_LOG = "shadow.jsonl"
SERVING_LOG = "serving.jsonl"
#: Seconds between two appends of the serving counters.
STATS_FLUSH_S = 10.0
#: Characters per token of the estimates (prompt and answer sizes when no usage is reported).
CHARS_PER_TOKEN = 4


def shadow_fraction(request: ChatRequest) -> float:
    """A number in [0, 1) fixed by the request's messages and tools: shadowed when below the rate."""
    payload = {"messages": [m.model_dump(mode="json", exclude_none=True) for m in request.messages],
               "tools": request.tools or []}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def estimate_tokens(request: ChatRequest, answer: str = "") -> int:
    """A rough token count of a call (characters / 4): the budget's estimate before a teacher call."""
    chars = sum(len(m.text()) for m in request.messages) + (len(json.dumps(request.tools)) if request.tools else 0)
    return max(1, (chars + len(answer)) // CHARS_PER_TOKEN)


def reason_kind(reason: str) -> str:
    """The kind of an escalation reason: the text before its first colon ("timeout",
    "validator json", "low confidence", "exception")."""
    return (reason or "unknown").split(":", 1)[0].strip() or "unknown"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _empty_counts() -> dict[str, Any]:
    return {"requests": 0, "specialist": 0, "teacher": 0, "below_threshold": 0, "no_specialist": 0,
            "demoted": 0, "escalations": {}, "shadowed": 0, "shadow_skipped": {}, "served_tokens": 0,
            "specialist_ms": 0.0, "similarity_sum": 0.0, "similarity_n": 0}


class ShadowEvaluator:
    """The engine's shadow evaluation and serving counters (one per :class:`RoutingEngine`).

    Parameters
    ----------
    engine : RoutingEngine
        Its ``teacher_call`` answers the shadow calls (no teacher, no shadowing); its capture
        writer records them.
    rate, budget_usd_per_day, max_concurrency :
        Default: ``[route] shadow_rate``, ``shadow_budget_usd_per_day``, ``shadow_max_concurrency``.
    score : callable or None
        ``score(cluster_id, specialist_text, teacher_text) -> float in [0, 1]``; default: the
        cluster's evaluator (``eval.json``, else ``[eval]`` and the cluster's output kind).
    """

    def __init__(self, engine: RoutingEngine, *, rate: float | None = None,
                 budget_usd_per_day: float | None | str = "config", max_concurrency: int | None = None,
                 score: Any = None) -> None:
        cfg = engine.ws.config
        self.engine = engine
        self.rate = cfg.route.shadow_rate if rate is None else float(rate)
        self.budget = cfg.route.shadow_budget_usd_per_day if budget_usd_per_day == "config" else budget_usd_per_day
        self.max_concurrency = max_concurrency or cfg.route.shadow_max_concurrency
        self.price_per_mtok = cfg.eval.teacher_price_per_mtok
        self._score = score
        self._evaluators: dict[int | None, tuple[str, Any]] = {}
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency,
                                                               thread_name_prefix="aad-shadow")
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future] = set()
        self._spent: dict[str, float] = {}
        self._reserved = 0.0
        self._pairs: dict[tuple[str, int | None], collections.deque] = {}
        self._versions: dict[str, int] | None = None
        self._counts: dict[tuple[str, Any], dict[str, Any]] = {}
        self._last_flush = time.monotonic()
        self._closed = False

    # -- paths ----------------------------------------------------------------------------------
    @property
    def shadow_path(self) -> Path:
        return self.engine.ws.state_dir / SHADOW_LOG

    @property
    def serving_path(self) -> Path:
        return self.engine.ws.state_dir / SERVING_LOG

    # -- the hot path ----------------------------------------------------------------------------
    def observe(self, call: RoutedCall, teacher_call: Any = None) -> concurrent.futures.Future | None:
        """Count a routed call and, when it is a specialist answer picked for shadowing, start
        ``teacher_call`` (default: the engine's) in the background. Returns the shadow job (None when
        not shadowed). Never raises, never waits."""
        try:
            return self._observe(call, teacher_call)
        except Exception:
            log.exception("shadow evaluation: could not observe a routed call")
            return None

    def _observe(self, call: RoutedCall, teacher_call: Any = None) -> concurrent.futures.Future | None:
        d, outcome = call.decision, call.outcome
        day = _now().date().isoformat()
        served = call.specialist_answer is not None
        tier_outcomes = getattr(call, "tier_outcomes", None) or []
        tier = call.tier_outcome if tier_outcomes else None
        with self._lock:
            c = self._counts.setdefault((day, d.cluster_id), _empty_counts())
            c["requests"] += 1
            if d.similarity is not None:
                c["similarity_sum"] += float(d.similarity)
                c["similarity_n"] += 1
            if served:
                c["specialist"] += 1
                c["specialist_ms"] += float(outcome.latency_ms if outcome else 0.0)
                completion = (outcome.usage.completion_tokens if outcome and outcome.usage else 0) or \
                    len(outcome.text if outcome else "") // CHARS_PER_TOKEN
                c["served_tokens"] += estimate_tokens(call.request) + int(completion)
            else:
                if tier is not None:  # a middle tier of the cascade answered
                    c["tier"] = c.get("tier", 0) + 1
                else:
                    c["teacher"] += 1
                if tier_outcomes:  # per middle tier: tried, answered, rejected
                    for o in tier_outcomes:
                        for key in ("tier_tried", "tier_answered" if o.ok else "tier_rejected"):
                            per_tier = c.setdefault(key, {})
                            per_tier[o.tier] = per_tier.get(o.tier, 0) + 1
                if outcome is not None:
                    kind = reason_kind(outcome.reason)
                    c["escalations"][kind] = c["escalations"].get(kind, 0) + 1
                elif d.reason.startswith("demoted"):
                    c["demoted"] += 1
                elif d.specialist is None:
                    c["no_specialist"] += 1
                elif d.similarity is not None and d.threshold is not None and d.similarity < d.threshold:
                    c["below_threshold"] += 1
                else:
                    c["other"] = c.get("other", 0) + 1
        future = self._maybe_shadow(call, day, teacher_call) if served or tier is not None else None
        if time.monotonic() - self._last_flush > STATS_FLUSH_S:
            self.flush_stats()
        return future

    def _skip(self, day: str, cluster_id: int | None, why: str) -> None:
        with self._lock:
            skipped = self._counts.setdefault((day, cluster_id), _empty_counts())["shadow_skipped"]
            skipped[why] = skipped.get(why, 0) + 1

    def _maybe_shadow(self, call: RoutedCall, day: str, teacher_call: Any = None) -> concurrent.futures.Future | None:
        if self.rate <= 0 or self._closed or shadow_fraction(call.request) >= self.rate:
            return None
        teacher_call = teacher_call or self.engine.teacher_call
        d = call.decision
        if teacher_call is None:
            self._skip(day, d.cluster_id, "no teacher_call")
            return None
        tier = call.tier_outcome if call.specialist_answer is None else None
        answer_text = tier.text if tier is not None else (call.outcome.text if call.outcome else "")
        estimate = self._cost(estimate_tokens(call.request, answer_text))
        with self._lock:
            spent = self._spent_today(day)
            if self.budget is not None and spent + self._reserved + estimate > self.budget:
                over = True
            else:
                over = False
                self._reserved += estimate
        if over:
            self._skip(day, d.cluster_id, "budget")
            return None
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self._reserved -= estimate
            self._skip(day, d.cluster_id, "busy")
            return None
        try:
            future = self._executor.submit(self._run, teacher_call, call.request, d, call.outcome, estimate, tier)
        except RuntimeError:  # shut down meanwhile
            self._slots.release()
            with self._lock:
                self._reserved -= estimate
            return None
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def _cost(self, tokens: int) -> float:
        return tokens * self.price_per_mtok / 1e6

    def _spent_today(self, day: str) -> float:
        """USD spent on shadow calls on ``day`` (read once from the log, then counted). Call under the lock."""
        if day not in self._spent:
            self._spent = {day: sum(float(r.get("cost_usd") or 0) for r in read_jsonl(self.shadow_path)
                                    if r.get("day") == day and r.get("event", "pair") == "pair")}
        return self._spent[day]

    # -- the background job ----------------------------------------------------------------------
    def _run(self, teacher_call: Any, request: ChatRequest, decision: RoutingDecision,
             outcome: SpecialistOutcome | None, estimate: float, tier: TierOutcome | None = None
             ) -> dict[str, Any] | None:
        """The shadow teacher call of a served answer: the specialist's, or a middle tier's (``tier``: its
        pair is logged with ``"tier"`` and no specialist, and never counts towards a demotion)."""
        from aad_core.formats.answers import answer_string
        from aad_core.serving.routed_call import teacher_result

        cost = 0.0
        try:
            started = time.perf_counter()
            message, usage, model = teacher_result(teacher_call(request))
            latency_ms = (time.perf_counter() - started) * 1000
            spec_text = tier.text if tier is not None else outcome.text if outcome is not None else ""
            teacher_text = answer_string(Trace(request=request, response=message))
            tokens = int(usage.total_tokens) if usage is not None and usage.total_tokens else \
                estimate_tokens(request, teacher_text)
            cost = self._cost(tokens)
            evaluator, agreement = self.score(decision.cluster_id, spec_text, teacher_text)
            name = "" if tier is not None else decision.specialist or ""
            version = None if tier is not None else self.version_of(name)
            teacher_model = self.engine._model_name(model)
            spec_name = None if tier is not None else name  # a middle tier's pair names no specialist
            info = {"cluster_id": decision.cluster_id, "specialist": spec_name, "version": version,
                    "specialist_output": spec_text, "agreement": agreement, "evaluator": evaluator,
                    "similarity": decision.similarity}
            if tier is not None:
                info["tier"] = tier.tier
            trace = Trace(source="shadow", model=teacher_model, request=request, response=message, usage=usage,
                          latency_ms=latency_ms, tags=["shadow"], metadata={"aad_shadow": info})
            self.engine._record(lambda: trace, "the shadow teacher answer")
            now = _now()
            row = {"event": "pair", "time": now.isoformat(), "day": now.date().isoformat(), "trace_id": trace.id,
                   "cluster_id": decision.cluster_id, "specialist": spec_name, "version": version,
                   "evaluator": evaluator, "agreement": agreement, "agree": agreement >= 0.5,
                   "teacher_model": teacher_model, "tokens": tokens, "cost_usd": cost,
                   "teacher_latency_ms": round(latency_ms, 3)}
            if tier is not None:
                row["tier"] = tier.tier
            with self._lock:
                _append_jsonl(self.shadow_path, [row])
                c = self._counts.setdefault((row["day"], decision.cluster_id), _empty_counts())
                c["shadowed"] += 1
            if tier is None:  # a middle tier's pair is its own agreement, not the specialist's
                self._check(name, version, row)
            return row
        except Exception as err:  # a background call: logged, never raised
            log.warning("shadow evaluation: the teacher call or its scoring failed: %s: %s", type(err).__name__, err)
            return None
        finally:
            with self._lock:
                self._reserved -= estimate
                day = _now().date().isoformat()
                if day in self._spent:
                    self._spent[day] += cost
                else:  # a new day: read from the log, this pair included
                    self._spent_today(day)
            self._slots.release()

    def score(self, cluster_id: int | None, specialist_text: str, teacher_text: str) -> tuple[str, float]:
        """(evaluator name, agreement in [0, 1]) of the pair, by the cluster's evaluator."""
        if self._score is not None:
            return "custom", float(self._score(cluster_id, specialist_text, teacher_text))
        name, evaluator = self._evaluator(cluster_id)
        out = evaluator.evaluate([specialist_text], [teacher_text])
        per_item = out.get("per_item") or [out.get("score", 0.0)]
        return name, float(per_item[0])

    def _evaluator(self, cluster_id: int | None) -> tuple[str, Any]:
        with self._lock:
            if cluster_id in self._evaluators:
                return self._evaluators[cluster_id]
        ws = self.engine.ws
        name = self.evaluator_name(cluster_id)
        from aad_core.models.embedding import get_embedder
        from aad_core.plugins.params import Lazy, build_component

        evaluator = build_component("evaluator", name, ws.config, workspace=ws,
                                    embedder=Lazy(lambda: get_embedder(ws.config)))
        with self._lock:
            self._evaluators[cluster_id] = (name, evaluator)
        return name, evaluator

    def evaluator_name(self, cluster_id: int | None) -> str:
        """The evaluator ``aad eval`` used for the cluster; else ``[eval]`` overrides, else the one for
        the cluster's output kind (``router.json``)."""
        from aad_core.artifacts import EvalReport
        from aad_core.pipeline.evaluate.choose import EVALUATOR_FOR_KIND

        report = EvalReport.load_optional(self.engine.ws)
        for entry in report.clusters if report else []:
            if entry.get("cluster_id") == cluster_id and entry.get("evaluator"):
                return str(entry["evaluator"])
        cfg = self.engine.ws.config.eval
        if cluster_id is not None and str(cluster_id) in cfg.cluster_evaluators:
            return cfg.cluster_evaluators[str(cluster_id)]
        if cfg.evaluator != "auto":
            return cfg.evaluator
        kind = self.engine.cluster_info(cluster_id).get("output_kind", "text")
        return EVALUATOR_FOR_KIND.get(kind, "semantic")

    def version_of(self, name: str) -> int | None:
        """The promoted version of specialist ``name`` (None when the registry does not know it)."""
        with self._lock:
            if self._versions is None or name not in self._versions:
                from aad_core.specialists import SpecialistRegistry

                self._versions = {s.name: s.version for s in SpecialistRegistry(self.engine.ws).promoted().values()}
            return self._versions.get(name)

    # -- live agreement and demotion -------------------------------------------------------------
    def _check(self, name: str, version: int | None, row: dict[str, Any]) -> None:
        key = (name, version)
        with self._lock:
            pairs = self._pairs.get(key)
            if pairs is None:
                pairs = self._pairs[key] = collections.deque(
                    (bool(r["agree"]) for r in self._history(name, version) if r["trace_id"] != row["trace_id"]),
                    maxlen=self.engine.ws.config.route.shadow_window)
            pairs.append(bool(row["agree"]))
            k, n = sum(pairs), len(pairs)
        verdict = demotion_verdict(k, n, self.engine.ws.config)
        if verdict is None or version is None or not self.engine.ws.config.route.shadow_demote:
            return
        self.demote(name, version, verdict, k=k, n=n)

    def _history(self, name: str, version: int | None) -> list[dict[str, Any]]:
        """The logged pairs of this specialist version since it was last promoted."""
        since = None
        if version is not None:
            from aad_core.specialists import SpecialistRegistry

            try:
                manifest = SpecialistRegistry(self.engine.ws).manifest(
                    SpecialistRegistry(self.engine.ws).get(name, version))
                since = manifest.get("promoted_at")
            except Exception:
                since = None
        return [r for r in read_jsonl(self.shadow_path)
                if r.get("event", "pair") == "pair" and r.get("specialist") == name and r.get("version") == version
                and (since is None or str(r.get("time", "")) >= since)]

    def demote(self, name: str, version: int, reason: str, *, k: int | None = None, n: int | None = None) -> None:
        """Demote the specialist version (registry, log, this engine stops serving it now)."""
        from aad_core.specialists import SpecialistRegistry

        try:
            SpecialistRegistry(self.engine.ws).set_promoted(name, version, False, reason)
        except Exception:
            log.exception("shadow evaluation: could not demote %s v%s", name, version)
            return
        log.warning("specialist %s v%s %s", name, version, reason)
        now = _now()
        with self._lock:
            _append_jsonl(self.shadow_path, [{"event": "demoted", "time": now.isoformat(),
                                              "day": now.date().isoformat(), "specialist": name, "version": version,
                                              "reason": reason, "k": k, "n": n}])
            self._pairs.pop((name, version), None)
            self._versions = None
        try:  # an earlier promoted version serves now: router.json takes its own threshold
            from aad_core.pipeline.calibrate import refresh_served_gates

            refresh_served_gates(self.engine.ws)
        except Exception:
            log.exception("shadow evaluation: could not refresh router.json after demoting %s v%s", name, version)
        # The reload keeps this demotion unless an earlier version of the specialist is still promoted (it
        # serves now, with its own threshold).
        self.engine.demoted[name] = reason
        self.engine.reload()

    # -- lifecycle -------------------------------------------------------------------------------
    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for the shadow calls in flight (tests, shutdown)."""
        with self._lock:
            pending = list(self._futures)
        concurrent.futures.wait(pending, timeout=timeout_s)

    def flush_stats(self) -> None:
        """Append the serving counters gathered since the last flush to ``serving.jsonl``."""
        with self._lock:
            counts, self._counts = self._counts, {}
            self._last_flush = time.monotonic()
            rows = [{"day": day, "cluster_id": cid, **c} for (day, cid), c in counts.items()]
            try:
                _append_jsonl(self.serving_path, rows)
            except Exception:
                log.exception("could not write the serving counters")

    def close(self, wait_s: float = 2.0) -> None:
        """Stop shadowing; wait up to ``wait_s`` for the calls in flight (their traces are recorded)."""
        self._closed = True
        if wait_s:
            self.wait(wait_s)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.flush_stats()


def demotion_verdict(k: int, n: int, config: Any) -> str | None:
    """Why a specialist with ``k`` agreeing of ``n`` live pairs is demoted, or None: at least
    ``[route] shadow_min_pairs`` pairs (and at least the number whose all-agreeing bound reaches the
    target) and a one-sided Clopper-Pearson lower bound below ``[eval] target_agreement``."""
    from aad_core.pipeline.evaluate.risk_coverage import clopper_pearson_lower, min_calls_for

    target, alpha = config.eval.target_agreement, config.eval.gate_alpha
    need = max(config.route.shadow_min_pairs, min_calls_for(target, alpha))
    if n < need or n == 0:
        return None
    bound = clopper_pearson_lower(k, n, alpha)
    if bound >= target:
        return None
    return (f"demoted by shadow evaluation: live agreement with the teacher {k}/{n} = {100 * k / n:.1f} %, "
            f"lower bound {100 * bound:.1f} % < target {100 * target:.1f} % ([eval] target_agreement)")


def live_agreement(rows: list[dict[str, Any]], window: int | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """{k, n, agreement, lower_bound} of the last ``window`` shadow pairs in ``rows``."""
    from aad_core.pipeline.evaluate.risk_coverage import clopper_pearson_lower

    pairs = [bool(r.get("agree")) for r in rows if r.get("event", "pair") == "pair"]
    if window:
        pairs = pairs[-window:]
    k, n = sum(pairs), len(pairs)
    return {"k": k, "n": n, "agreement": k / n if n else None,
            "lower_bound": clopper_pearson_lower(k, n, alpha) if n else None}


__all__ = ["SERVING_LOG", "SHADOW_LOG", "ShadowEvaluator", "demotion_verdict", "estimate_tokens", "live_agreement",
           "read_jsonl", "reason_kind", "shadow_fraction"]
