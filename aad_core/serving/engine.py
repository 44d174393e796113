"""The escalation loop: decide -> specialist -> checks -> (teacher on any failure) -> answer.

A specialist's answer reaches the user only when it arrived within ``[route] timeout_s``, parsed
(tool calls included), passed the output validators and cleared the confidence cut-off. Anything
else — an exception, a timeout, invalid JSON or SQL, an unbound tool, low confidence — sends the
request to the teacher, the teacher's answer is returned, and the case is stored as a trace
(source ``router``, ``metadata["aad_escalation"]``) for the next training round.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Message, RoutingDecision, Specialist, Trace, Usage

if TYPE_CHECKING:
    from aad_core.plugins.components import Router
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)


class GenerationLike(Protocol):
    text: str
    mean_logprob: float
    n_tokens: int
    latency_ms: float


class SpecialistBackend(Protocol):
    """What the engine needs from the specialists: batched generation by adapter name."""

    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]: ...


class SpecialistPool:
    """Promoted specialists on shared base models: one :class:`~aad_core.models.runtime.SpecialistRuntime`
    per base model, every adapter of that base loaded into it (PEFT multi-adapter)."""

    def __init__(self, ws: Workspace | None, specialists: Sequence[Specialist], *, merge_hot: str | None = None) -> None:
        self.ws = ws
        self.specialists = {s.name: s for s in specialists}
        self.merge_hot = merge_hot
        self._runtimes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _runtime(self, name: str) -> Any:
        spec = self.specialists.get(name)
        if spec is None:
            raise AADError(f"No promoted specialist named {name!r}.", hint="Run 'aad specialists' to list them.")
        with self._lock:
            rt = self._runtimes.get(spec.base_model)
            if rt is None:
                from aad_core.models.runtime import SpecialistRuntime

                rt = SpecialistRuntime(spec.base_model)
                for s in self.specialists.values():
                    if s.base_model == spec.base_model:
                        rt.add_specialist(s)
                self._runtimes[spec.base_model] = rt
            return rt

    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]:
        return self._runtime(name).generate(requests, adapter=name, max_new_tokens=max_new_tokens)


@dataclass
class SpecialistOutcome:
    ok: bool
    reason: str = ""
    message: Message | None = None
    text: str = ""
    mean_logprob: float | None = None
    usage: Usage | None = None
    latency_ms: float = 0.0


@dataclass
class RoutedAnswer:
    """What a routed call returns: the assistant message, who answered, and why."""

    message: Message
    decision: RoutingDecision
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    latency_ms: float = 0.0
    #: The raw teacher result (e.g. the LangChain AIMessage or the upstream JSON) when the teacher answered.
    teacher_raw: Any = None


TeacherCall = Callable[[ChatRequest], Any]


def _teacher_result(result: Any) -> tuple[Message, Usage | None, str | None]:
    """Accept a Message, an OpenAI chat-completion dict, or (Message, Usage)."""
    if isinstance(result, tuple):
        msg, usage = result[0], result[1] if len(result) > 1 else None
        return _teacher_result(msg)[0], usage, None
    if isinstance(result, Message):
        return result, None, None
    if isinstance(result, dict) and "choices" in result:
        msg = Message.model_validate({k: v for k, v in result["choices"][0]["message"].items() if v is not None})
        usage = Usage.model_validate(result["usage"]) if isinstance(result.get("usage"), dict) else None
        return msg, usage, result.get("model")
    if isinstance(result, str):
        return Message(role="assistant", content=result), None, None
    raise TypeError(f"A teacher call must return a Message, an OpenAI chat completion dict or a string. Got {type(result).__name__}.")


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
        Default: a :class:`SpecialistPool` of the promoted specialists (loaded on first use).
    """

    def __init__(self, ws: Workspace, teacher_call: TeacherCall | None = None, *, router: Router | None = None,
                 specialists: SpecialistBackend | None = None, record: bool | None = None,
                 timeout_s: float | None = None, teacher_model: str | None = None) -> None:
        self.ws = ws
        self.teacher_call = teacher_call
        self.teacher_model = teacher_model
        self._router = self._given_router = router
        self._specialists = self._given_specialists = specialists
        self.record = ws.config.route.record_escalations if record is None else record
        self.timeout_s = ws.config.route.timeout_s if timeout_s is None else timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="aad-specialist")
        self._writer: Any = None
        self._lock = threading.Lock()
        self._cluster_info: dict[int, dict[str, Any]] | None = None

    # -- lazily built parts -------------------------------------------------------------------
    @property
    def router(self) -> Router:
        with self._lock:
            if self._router is None:
                from aad_core.plugins import create_component

                self._router = create_component("router", self.ws.config.route.router, workspace=self.ws)
            return self._router

    @property
    def specialists(self) -> SpecialistBackend:
        with self._lock:
            if self._specialists is None:
                from aad_core.pipeline.calibrate import promoted_specialist_records

                self._specialists = SpecialistPool(self.ws, list(promoted_specialist_records(self.ws).values()))
            return self._specialists

    def cluster_info(self, cluster_id: int | None) -> dict[str, Any]:
        if self._cluster_info is None:
            from aad_core.pipeline.calibrate import load_router_state

            saved = load_router_state(self.ws) or {}
            self._cluster_info = {int(k): v for k, v in saved.get("clusters", {}).items()}
        return self._cluster_info.get(cluster_id, {}) if cluster_id is not None else {}

    def reload(self) -> None:
        """Forget the loaded router state, specialists and thresholds (after re-calibration or
        a new promotion); they load again on the next request."""
        with self._lock:
            self._router = self._given_router
            self._specialists = self._given_specialists
            self._cluster_info = None

    # -- the loop -----------------------------------------------------------------------------
    def decide(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]:
        return self.router.route(list(requests))

    def try_specialist(self, request: ChatRequest, decision: RoutingDecision, *,
                       timeout_s: float | None = None) -> SpecialistOutcome:
        """Generate with the decision's specialist and run every check. Never raises."""
        from aad_core.formats.tool_calls import ToolCallParseError, parse_tool_calls
        from aad_core.formats.validators import validate_output

        start = time.perf_counter()
        name = decision.specialist or ""
        max_new = int(request.params.get("max_tokens") or request.params.get("max_new_tokens")
                      or self.ws.config.route.max_new_tokens)
        future = self._executor.submit(self.specialists.generate, name, [request], max_new_tokens=max_new)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            gen = future.result(timeout=timeout)[0]
        except concurrent.futures.TimeoutError:
            future.cancel()
            return SpecialistOutcome(False, f"timeout: the specialist took longer than {timeout:g} s",
                                     latency_ms=(time.perf_counter() - start) * 1000)
        except Exception as err:  # the specialist must never break the user's call
            log.warning("specialist %s raised: %s", name, err)
            return SpecialistOutcome(False, f"exception: {type(err).__name__}: {err}",
                                     latency_ms=(time.perf_counter() - start) * 1000)
        latency = (time.perf_counter() - start) * 1000
        text = gen.text
        out = SpecialistOutcome(False, text=text, mean_logprob=float(gen.mean_logprob), latency_ms=latency,
                                usage=Usage(prompt_tokens=0, completion_tokens=int(gen.n_tokens), total_tokens=int(gen.n_tokens)))
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
        cut = self.ws.config.route.min_confidence
        if cut is None:
            cut = info.get("min_logprob")
        if cut is not None and out.mean_logprob is not None and out.mean_logprob < float(cut):
            out.reason = f"low confidence: mean token log-prob {out.mean_logprob:.3f} < cut-off {float(cut):.3f}"
            return out
        out.ok = True
        out.message = Message(role="assistant", content=content if (content or not calls) else None,
                              tool_calls=calls or None)
        return out

    def attempt(self, request: ChatRequest, *, timeout_s: float | None = None
                ) -> tuple[RoutingDecision, SpecialistOutcome | None]:
        """Decide and, for a specialist decision, try it. Returns (decision, outcome): ``outcome`` is
        None when the router chose the teacher; on a failed check the decision is marked escalated."""
        decision = self.decide([request])[0]
        if decision.target != "specialist":
            return decision, None
        outcome = self.try_specialist(request, decision, timeout_s=timeout_s)
        if outcome.ok:
            return decision, outcome
        return self.escalated_decision(decision, outcome), outcome

    def escalated_decision(self, decision: RoutingDecision, outcome: SpecialistOutcome) -> RoutingDecision:
        return decision.model_copy(update={"target": "teacher", "escalated": True,
                                           "reason": f"escalated: {outcome.reason}"})

    def record_escalation(self, request: ChatRequest, teacher_message: Message, decision: RoutingDecision,
                          outcome: SpecialistOutcome, *, usage: Usage | None = None, model: str | None = None,
                          latency_ms: float | None = None) -> Trace | None:
        """Store the teacher's answer with the reason the specialist's was rejected."""
        if not self.record:
            return None
        trace = Trace(
            source="router", model=model or self.teacher_model, request=request, response=teacher_message,
            usage=usage, latency_ms=latency_ms, tags=["escalation"],
            metadata={"aad_escalation": {
                "reason": outcome.reason, "cluster_id": decision.cluster_id, "specialist": decision.specialist,
                "specialist_output": outcome.text, "similarity": decision.similarity,
                "mean_logprob": outcome.mean_logprob,
            }},
        )
        try:
            self._write(trace)
        except Exception:  # recording must never break the user's call
            log.exception("could not record the escalation trace")
            return None
        return trace

    def _write(self, trace: Trace) -> None:
        with self._lock:
            if self._writer is None:
                from aad_core.capture.writer import CaptureWriter

                self._writer = CaptureWriter(workspace=self.ws)
        self._writer.submit(trace)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def answer(self, request: ChatRequest, teacher_call: TeacherCall | None = None) -> RoutedAnswer:
        """Route one request end to end and return the answer the user should get."""
        teacher_call = teacher_call or self.teacher_call
        start = time.perf_counter()
        decision, outcome = self.attempt(request)
        if outcome is not None and outcome.ok and outcome.message is not None:
            return RoutedAnswer(outcome.message, decision, outcome.usage or Usage(), model=decision.specialist or "",
                                latency_ms=(time.perf_counter() - start) * 1000)
        if teacher_call is None:
            raise AADError("This request needs the teacher, but the routing engine has no teacher_call.",
                           hint="Pass teacher_call= to RoutingEngine (or --teacher-url to 'aad serve').")
        t0 = time.perf_counter()
        raw = teacher_call(request)
        message, usage, model = _teacher_result(raw)
        teacher_ms = (time.perf_counter() - t0) * 1000
        if outcome is not None:
            self.record_escalation(request, message, decision, outcome, usage=usage, model=model, latency_ms=teacher_ms)
        return RoutedAnswer(message, decision, usage or Usage(), model=model or self.teacher_model or "teacher",
                            latency_ms=(time.perf_counter() - start) * 1000, teacher_raw=raw)


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
