"""The escalation loop: decide -> specialist -> checks -> (teacher on any failure) -> answer.

A specialist's answer reaches the user only when it arrived within ``[route] timeout_s``, parsed
(tool calls included), passed the output validators and cleared the confidence threshold that the
risk-coverage gate of ``aad eval`` chose for that specialist (``router.json``). Anything
else — an exception, a timeout, invalid JSON or SQL, an unbound tool, low confidence — sends the
request to the teacher, the teacher's answer is returned, and the case is stored as a trace
(source ``router``, ``metadata["aad_escalation"]``) for the next training round.

:meth:`RoutingEngine.route_call` is the one routed-call helper: :meth:`RoutingEngine.answer`, the
server and the LangChain / LlamaIndex integrations all take their answers through the
:class:`~aad_core.serving.routed_call.RoutedCall` it returns. :meth:`RoutingEngine.decide` fires
``aad_request_routed`` for every router.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aad_core.capture.convert import request_identity
from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Message, RoutingDecision, Trace, Usage
from aad_core.serving.routed_call import (RoutedAnswer, RoutedCall, SpecialistOutcome, escalation_info,
                                         teacher_result)
from aad_core.serving.openai_backend import specialist_backend
from aad_core.serving.specialists import GenerationLike, SpecialistBackend, SpecialistPool, SpecialistUnavailable

__all__ = ["GenerationLike", "RoutedAnswer", "RoutedCall", "RoutingEngine", "SpecialistBackend", "SpecialistOutcome",
           "SpecialistPool", "TeacherCall", "shared_engine"]

if TYPE_CHECKING:
    from aad_core.plugins.components import Router
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)


TeacherCall = Callable[[ChatRequest], Any]
#: Worker threads of each specialist's own pool: one LoRA micro-batch (the runtime's batch_size).
SPECIALIST_WORKERS = 8
#: Timed-out calls of one specialist still running (a thread cannot be stopped) after which its requests go
#: to the teacher at once, without waiting out the timeout, until one returns.
MAX_STUCK_CALLS = 2
#: A routing fault of one kind is logged (with its traceback) at most this often; DEBUG in between.
FAULT_LOG_INTERVAL_S = 60.0


class RoutingEngine:
    """Routes requests between the workspace's promoted specialists and a teacher.

    Parameters
    ----------
    ws : Workspace
        The workspace (clusters, specialists, calibrated router, trace store).
    teacher_call : callable or None
        ``teacher_call(request) -> Message | OpenAI completion dict | str``; used by :meth:`answer`.
    router : Router or None
        Default: ``[route] router`` built from the plugin registry with ``workspace=ws``.
    specialists : SpecialistBackend or None
        Default: the promoted specialists, loaded on first use, in the backend ``[route] specialist_backend``
        names (:func:`~aad_core.serving.openai_backend.specialist_backend`).
    """

    def __init__(self, ws: Workspace, teacher_call: TeacherCall | None = None, *, router: Router | None = None,
                 specialists: SpecialistBackend | None = None, record: bool | None = None,
                 timeout_s: float | None = None, teacher_model: str | None = None,
                 capture_teacher: bool = False) -> None:
        self.ws = ws
        #: Store every answer the router sent to the teacher as a trace (source ``serve``): on for
        #: ``aad serve``, which is the only place that sees those calls; off for the integrations, whose
        #: capture handlers record them already.
        self.capture_teacher = capture_teacher
        self.teacher_call = teacher_call
        self.teacher_model = teacher_model
        self._router = self._given_router = router
        self._specialists = self._given_specialists = specialists
        self.record = ws.config.route.record_escalations if record is None else record
        self.timeout_s = ws.config.route.timeout_s if timeout_s is None else timeout_s
        # One pool per specialist, each with enough workers to fill one micro-batch of the LoRA runtime (its
        # batch_size, 8): a specialist that hangs holds only its own workers, never another specialist's.
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        #: Per specialist, its calls that timed out and still hold a worker (a call cannot be stopped).
        self._stuck: dict[str, int] = {}
        self._stuck_lock = threading.Lock()
        self._closed = False
        self._writer: Any = None
        self._lock = threading.Lock()
        self._cluster_info: dict[int, dict[str, Any]] | None = None
        #: Specialists demoted while this engine runs (name -> reason): sent to the teacher at once.
        self.demoted: dict[str, str] = {}
        self._shadow: Any = None
        self._cascade: Any = None
        self._tiers: list[Any] | None = None
        #: Routing faults by (where, exception type): how many, and when last logged (:meth:`_log_fault`).
        self._faults: dict[tuple[str, str], int] = {}
        self._fault_logged: dict[tuple[str, str], float] = {}
        self._fault_lock = threading.Lock()

    # -- lazily built parts -------------------------------------------------------------------
    @property
    def router(self) -> Router:
        with self._lock:
            if self._router is None:
                from aad_core.plugins.params import build_component

                self._router = build_component("router", self.ws.config.route.router, self.ws.config, workspace=self.ws)
            return self._router

    @property
    def specialists(self) -> SpecialistBackend:
        with self._lock:
            if self._specialists is None:
                from aad_core.specialists import SpecialistRegistry

                # [route] specialist_backend: aad's runtime in-process, or an OpenAI-compatible endpoint (vLLM)
                self._specialists = specialist_backend(self.ws, list(SpecialistRegistry(self.ws).promoted().values()))
            return self._specialists

    def cluster_info(self, cluster_id: int | None) -> dict[str, Any]:
        if self._cluster_info is None:
            from aad_core.artifacts import RouterState

            saved = RouterState.load_optional(self.ws)
            self._cluster_info = dict(saved.clusters) if saved else {}
        return self._cluster_info.get(cluster_id, {}) if cluster_id is not None else {}

    def reload(self) -> None:
        """Forget the loaded router state, specialists and thresholds (after re-calibration or
        a new promotion); they load again on the next request. A specialist demoted while this engine
        runs stays demoted until the registry promotes it again."""
        with self._lock:
            self._router = self._given_router
            self._specialists = self._given_specialists
            self._cluster_info = None
            self.demoted = self._still_demoted()
            if self._cascade is not None:
                self._cascade.reload()

    def _still_demoted(self) -> dict[str, str]:
        if not self.demoted:
            return {}
        from aad_core.specialists import SpecialistRegistry

        try:
            promoted = {spec.name for spec in SpecialistRegistry(self.ws).promoted().values()}
        except Exception:  # an unreadable registry promotes nothing back
            return dict(self.demoted)
        return {name: why for name, why in self.demoted.items() if name not in promoted}

    @property
    def shadow(self) -> Any:
        """The :class:`~aad_core.serving.shadow.ShadowEvaluator`: shadow evaluation of the
        specialists' answers (``[route] shadow_rate``) and the serving counters of ``aad monitor``."""
        with self._lock:
            if self._shadow is None:
                from aad_core.serving.shadow import ShadowEvaluator

                self._shadow = ShadowEvaluator(self)
            return self._shadow

    @shadow.setter
    def shadow(self, value: Any) -> None:
        self._shadow = value

    @property
    def cascade(self) -> Any:
        """The :class:`~aad_core.serving.cascade.Cascade` that tries the middle tiers."""
        with self._lock:
            if self._cascade is None:
                from aad_core.serving.cascade import Cascade

                self._cascade = Cascade(self)
            return self._cascade

    @property
    def tiers(self) -> list[Any]:
        """The middle tiers tried between the specialist and the teacher (default: ``[route] tiers``)."""
        if self._tiers is None:
            from aad_core.serving.cascade import tiers_from_config

            self._tiers = tiers_from_config(self.ws.config.route)
        return self._tiers

    @tiers.setter
    def tiers(self, value: Sequence[Any]) -> None:
        from aad_core.serving.cascade import normalise_tiers

        self._tiers = normalise_tiers(value)

    # -- the loop -----------------------------------------------------------------------------
    def decide(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]:
        """The router's decisions; observers get them through ``aad_request_routed`` whatever the router.
        A request whose shape (turns, tool results, bound tools) exceeds what its specialist was trained
        on goes to the teacher (:mod:`aad_core.serving.request_shape`)."""
        requests = list(requests)
        decisions = [self._shape_checked(r, d) for r, d in zip(requests, self.router.route(requests))]
        if decisions:
            from aad_core.plugins import get_plugin_manager

            get_plugin_manager().hooks.request_routed(decisions)
        return decisions

    def _shape_checked(self, request: ChatRequest, decision: RoutingDecision) -> RoutingDecision:
        """``decision``, sent to the teacher when the request's shape is one its specialist never saw."""
        if decision.target != "specialist":
            return decision
        from aad_core.serving.request_shape import shape_mismatch

        why = shape_mismatch(request, self.cluster_info(decision.cluster_id).get("request_shape"))
        return decision.model_copy(update={"target": "teacher", "reason": why}) if why else decision

    def try_specialist(self, request: ChatRequest, decision: RoutingDecision, *,
                       timeout_s: float | None = None) -> SpecialistOutcome:
        """Generate with the decision's specialist and run every check. Never raises."""
        from aad_core.formats.tool_calls import ToolCallParseError, parse_tool_calls
        from aad_core.formats.validators import validate_output
        from aad_core.serving.request_checks import max_new_tokens

        start = time.perf_counter()
        name = decision.specialist or ""
        max_new = max_new_tokens(request.params, self.ws.config.route.max_new_tokens)
        too_long = self._too_long(name, request)
        if too_long:  # to the teacher at once: it would hold the specialist long, on a prompt it never saw
            return SpecialistOutcome(False, too_long, latency_ms=(time.perf_counter() - start) * 1000)
        with self._stuck_lock:
            stuck = self._stuck.get(name, 0)
            executor = None if self._closed else self._executors.get(name)
            if executor is None and not self._closed:
                executor = self._executors[name] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=SPECIALIST_WORKERS, thread_name_prefix=f"aad-specialist-{name[:24]}")
        if executor is None:
            return SpecialistOutcome(False, "the routing engine is closed",
                                     latency_ms=(time.perf_counter() - start) * 1000)
        if stuck >= MAX_STUCK_CALLS:  # hung: each new call would wait out its timeout, then hold a thread too
            return SpecialistOutcome(False, f"specialist busy: {stuck} of its calls timed out and are still running",
                                     latency_ms=(time.perf_counter() - start) * 1000)
        try:
            future = executor.submit(self.specialists.generate, name, [request], max_new_tokens=max_new)
        except RuntimeError as err:  # shut down by close() meanwhile
            return SpecialistOutcome(False, f"exception: {err}", latency_ms=(time.perf_counter() - start) * 1000)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            gen = future.result(timeout=timeout)[0]
        except concurrent.futures.TimeoutError:
            if not future.cancel():  # running: it holds its worker until it returns
                with self._stuck_lock:
                    self._stuck[name] = self._stuck.get(name, 0) + 1
                future.add_done_callback(lambda _f: self._unstuck(name))
            return SpecialistOutcome(False, f"timeout: the specialist took longer than {timeout:g} s",
                                     latency_ms=(time.perf_counter() - start) * 1000)
        except SpecialistUnavailable as err:  # its circuit breaker is open (logged when it opened)
            return SpecialistOutcome(False, str(err), latency_ms=(time.perf_counter() - start) * 1000)
        except Exception as err:  # the specialist must never break the user's call
            log.warning("specialist %s raised: %s", name, err)
            return SpecialistOutcome(False, f"exception: {type(err).__name__}: {err}",
                                     latency_ms=(time.perf_counter() - start) * 1000)
        latency = (time.perf_counter() - start) * 1000
        try:  # a third-party predictor's Generation may be odd: that is an escalation, never an error
            text = str(gen.text)
            logprob, confidence = getattr(gen, "mean_logprob", None), getattr(gen, "confidence", None)
            n_tokens = int(getattr(gen, "n_tokens", 0) or 0)
            out = SpecialistOutcome(False, text=text, mean_logprob=None if logprob is None else float(logprob),
                                    latency_ms=latency, confidence=None if confidence is None else float(confidence),
                                    usage=Usage(prompt_tokens=0, completion_tokens=n_tokens, total_tokens=n_tokens))
        except Exception as err:
            log.warning("specialist %s returned an unreadable answer: %s", name, err)
            return SpecialistOutcome(False, f"exception: unreadable answer: {type(err).__name__}: {err}",
                                     latency_ms=latency)
        stop = request.params.get("stop")
        for s in [stop] if isinstance(stop, str) else (stop or []):
            if s and s in text:
                text = text[: text.index(s)]
        try:
            content, calls = parse_tool_calls(text) if request.tools else (text, [])
        except ToolCallParseError as err:
            out.reason = f"validator tool_calls: {err}"
            return out
        info = self.cluster_info(decision.cluster_id)
        check = validate_output(request, content, calls, output_kind=info.get("output_kind", "text"))
        if not check.ok:
            out.reason = f"validator {check.check}: {check.reason}"
            return out
        low = _low_confidence(out, info, self.ws.config.route.min_confidence)
        if low:
            out.reason = low
            return out
        out.ok = True
        out.message = Message(role="assistant", content=content if (content or not calls) else None,
                              tool_calls=calls or None)
        return out

    def _unstuck(self, name: str) -> None:
        with self._stuck_lock:
            left = self._stuck.get(name, 0) - 1
            if left > 0:
                self._stuck[name] = left
            else:
                self._stuck.pop(name, None)

    def _too_long(self, name: str, request: ChatRequest) -> str:
        """Why the request's prompt is longer than the specialist was trained on ("" when it fits, or when
        the backend cannot tell: ``prompt_too_long`` is optional)."""
        check = getattr(self.specialists, "prompt_too_long", None)
        if not callable(check):
            return ""
        try:
            return str(check(name, request) or "")
        except Exception as err:  # the length check must never break the call: the specialist still tries
            log.warning("could not measure the prompt for specialist %s: %s", name, err)
            return ""

    def preload(self) -> None:
        """Load the router (one dummy routing, which loads its embedder) and every promoted specialist now,
        warmed up, so that the first user request is not the cold one (``aad serve``,
        ``RoutedChatModel(preload=True)``)."""
        try:
            self.router.route([ChatRequest(messages=[Message(role="user", content="warm-up")])])
        except Exception as err:  # e.g. no router state yet: the first request reports it
            log.warning("preload: the router could not route a warm-up request: %s", err)
        preload = getattr(self.specialists, "preload", None)
        if callable(preload):
            preload()

    def attempt(self, request: ChatRequest, *, timeout_s: float | None = None
                ) -> tuple[RoutingDecision, SpecialistOutcome | None]:
        """Decide and, for a specialist decision, try it. Returns (decision, outcome): ``outcome`` is
        None when the router chose the teacher; on a failed check the decision is marked escalated."""
        decision = self.decide([request])[0]
        if decision.target == "specialist" and decision.specialist in self.demoted:
            decision = decision.model_copy(update={
                "target": "teacher", "reason": f"demoted: {decision.specialist}: {self.demoted[decision.specialist]}"})
        if decision.target != "specialist":
            return decision, None
        outcome = self.try_specialist(request, decision, timeout_s=timeout_s)
        if outcome.ok:
            return decision, outcome
        return self.escalated_decision(decision, outcome), outcome

    def route_call(self, request: ChatRequest, *, timeout_s: float | None = None,
                   teacher_call: TeacherCall | None = None, tiers: Sequence[Any] | None = None) -> RoutedCall:
        """Decide and try the specialist, then the middle tiers (``tiers``, default :attr:`tiers`); the
        returned :class:`RoutedCall` holds the answer of the tier that passed its gate, or takes the
        teacher's (:meth:`RoutedCall.finish_teacher` times and records it). ``teacher_call`` (default:
        the engine's) answers the shadow call when a served answer is picked for shadow evaluation (in
        the background, never delaying this call)."""
        from aad_core.serving.cascade import decided

        started = time.perf_counter()
        try:
            decision, outcome = self.attempt(request, timeout_s=timeout_s)
            tier_outcomes: list[Any] = []
            if outcome is None or not outcome.ok:
                chosen = self.tiers if tiers is None else tiers
                if chosen:
                    tier_outcomes = self.cascade.run(request, decision, chosen)
            decision = decided(decision, outcome, tier_outcomes)
            call = RoutedCall(self, request, decision, outcome, started=started, tier_outcomes=tier_outcomes)
        except Exception as err:  # a broken router artifact, a bug in a plugin: the teacher answers instead
            call = self.fault_call(request, err, started=started)
        try:
            self.shadow.observe(call, teacher_call)  # counters; a background shadow teacher call (never waits)
        except Exception as err:
            self._log_fault("shadow", err)
        return call

    def fault_call(self, request: ChatRequest, err: BaseException, *, started: float | None = None) -> RoutedCall:
        """The call for a request whose routing failed (``err``): the teacher answers it as an escalation
        would, and finishing records its answer like any teacher answer (nothing of the router or the
        specialists is needed). The decision's reason names the fault's type only (it reaches clients in
        ``aad_route``); the cause is logged (:meth:`_log_fault`)."""
        self._log_fault("routing", err)
        decision = RoutingDecision(target="teacher", tier="teacher",
                                   reason=f"routing fault ({type(err).__name__}): sent to the teacher")
        return RoutedCall(self, request, decision, None,
                          started=time.perf_counter() if started is None else started)

    def _log_fault(self, what: str, err: BaseException) -> None:
        """Log a routing fault with its traceback the first time, then at most once every
        :data:`FAULT_LOG_INTERVAL_S` per kind of fault with the count so far (DEBUG in between): a broken
        router fails every request, and the log must not hold one traceback per request."""
        key = (what, type(err).__name__)
        now = time.monotonic()
        with self._fault_lock:
            n = self._faults[key] = self._faults.get(key, 0) + 1
            due = now - self._fault_logged.get(key, -FAULT_LOG_INTERVAL_S) >= FAULT_LOG_INTERVAL_S
            if due:
                self._fault_logged[key] = now
        if due:
            log.error("aad routing: %s failed (%d time(s) so far), the teacher answers instead: %s: %s", what, n,
                      type(err).__name__, err, exc_info=(type(err), err, err.__traceback__))
        else:
            log.debug("aad routing: %s failed again (%d): %s: %s", what, n, type(err).__name__, err)

    async def aroute_call(self, request: ChatRequest, *, timeout_s: float | None = None,
                          tiers: Sequence[Any] | None = None) -> RoutedCall:
        """:meth:`route_call` for async callers (routing and generation run in a worker thread)."""
        return await asyncio.to_thread(self.route_call, request, timeout_s=timeout_s, tiers=tiers)

    def escalated_decision(self, decision: RoutingDecision, outcome: SpecialistOutcome) -> RoutingDecision:
        return decision.model_copy(update={"target": "teacher", "escalated": True,
                                           "reason": f"escalated: {outcome.reason}"})

    def record_escalation(self, request: ChatRequest, teacher_message: Message, decision: RoutingDecision,
                          outcome: SpecialistOutcome, *, usage: Usage | None = None, model: str | None = None,
                          latency_ms: float | None = None, info: dict[str, Any] | None = None) -> Trace | None:
        """Store the teacher's answer with the reason the specialist's was rejected (``info``: the
        ``aad_escalation`` metadata, default :func:`escalation_info`)."""
        if not self.record:
            return None

        def trace() -> Trace:
            session_id, user_id = request_identity(request.params)
            return Trace(
                source="router", model=self._model_name(model), request=request, response=teacher_message,
                usage=usage, latency_ms=latency_ms, tags=["escalation"], session_id=session_id, user_id=user_id,
                metadata={"aad_escalation": info or escalation_info(decision, outcome)},
            )
        return self._record(trace, "the escalation trace")

    def record_teacher_answer(self, request: ChatRequest, teacher_message: Message, decision: RoutingDecision, *,
                              usage: Usage | None = None, model: str | None = None,
                              latency_ms: float | None = None) -> Trace | None:
        """Store a teacher answer the router chose (no specialist was tried): training data like any
        captured call, redacted by the capture writer. Never raises."""
        def trace() -> Trace:
            session_id, user_id = request_identity(request.params)
            return Trace(source="serve", model=self._model_name(model), request=request, response=teacher_message,
                         usage=usage, latency_ms=latency_ms, session_id=session_id, user_id=user_id,
                         metadata={"aad_route": {
                             "reason": decision.reason, "cluster_id": decision.cluster_id,
                             "similarity": decision.similarity}})
        return self._record(trace, "the teacher's answer")

    def _model_name(self, model: Any) -> str | None:
        """The teacher's model name as the trace stores it (a teacher may report it as a number)."""
        return self.teacher_model if model is None or model == "" else str(model)

    def _record(self, build: Callable[[], Trace], what: str) -> Trace | None:
        """Build the trace and hand it to the capture writer; None when either failed (logged:
        recording must never break the user's call, whose answer is already there)."""
        try:
            trace = build()
            self._write(trace)
        except Exception:
            log.exception("could not record %s", what)
            return None
        return trace

    def _write(self, trace: Trace) -> None:
        with self._lock:
            if self._writer is None:
                from aad_core.capture.writer import CaptureWriter

                self._writer = CaptureWriter(workspace=self.ws)
        self._writer.submit(trace)

    def flush(self) -> None:
        if self._shadow is not None:
            self._shadow.flush_stats()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._shadow is not None:
            self._shadow.close()
        if self._cascade is not None:
            self._cascade.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with self._stuck_lock:
            self._closed = True
            executors, self._executors = list(self._executors.values()), {}
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)

    def answer(self, request: ChatRequest, teacher_call: TeacherCall | None = None) -> RoutedAnswer:
        """Route one request end to end and return the answer the user should get."""
        call = self.route_call(request, teacher_call=teacher_call)
        if call.served_answer is not None:
            return call.served_answer
        teacher_call = teacher_call or self.teacher_call
        if teacher_call is None:
            raise AADError("This request needs the teacher, but the routing engine has no teacher_call.",
                           hint="Pass teacher_call= to RoutingEngine (or --teacher-url to 'aad serve').")
        call.start_teacher()
        raw = teacher_call(request)
        message, usage, model = teacher_result(raw)
        return call.finish_teacher(message, usage, model, raw)


def _figures(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers at the fewest decimals (2 to 6) that tell them apart."""
    for digits in range(2, 7):
        a, b = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if a != b:
            break
    return a, b


def _low_confidence(out: SpecialistOutcome, info: dict[str, Any], override: float | None) -> str:
    """Why the answer's confidence is too low to serve ("" when it clears the threshold): the eval
    gate's threshold for this specialist (``router.json``), or ``[route] min_confidence``."""
    signal = str(info.get("confidence_signal") or "mean_logprob")
    if signal != "mean_logprob":  # [route] min_confidence is a mean token log-prob cut-off
        override = None
    threshold = override if override is not None else info.get("confidence_threshold")
    value = out.confidence if signal == "confidence" else out.mean_logprob
    label = str(info.get("confidence_label") or ("confidence" if signal == "confidence" else "mean token log-prob"))
    if threshold is not None and value is None:
        return f"low confidence: the specialist reported no {label} to compare with the threshold {float(threshold):g}"
    if threshold is None or value is None or float(value) >= float(threshold):
        return ""
    shown, cut = _figures(float(value), float(threshold))
    if override is not None:
        return f"low confidence: {label} {shown} < threshold {cut} ([route] min_confidence)"
    cal = info.get("confidence_calibration") or {}
    if cal.get("coverage") is None or cal.get("agreement") is None:
        return f"low confidence: {label} {shown} < threshold {cut}"
    return (f"low confidence: {label} {shown} < threshold {cut} (served share at {cut}: {100 * cal['coverage']:.0f} %, "
            f"agreement {100 * cal['agreement']:.1f} % on {cal.get('n')} calibration calls)")


_engines: dict[str, RoutingEngine] = {}
_engines_lock = threading.Lock()


def shared_engine(ws: Workspace) -> RoutingEngine:
    """One engine per workspace and process, so several routed model objects share the loaded
    embedder and specialists instead of loading them again."""
    key = str(ws.root)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = RoutingEngine(ws)
        return engine
