"""One routed call: the specialist's attempt, then either its answer or the teacher's, with the
escalation recorded exactly once.

:meth:`RoutingEngine.answer` and the LangChain / LlamaIndex integrations all go through a
:class:`RoutedCall`, so the teacher's latency, usage and model name reach the escalation trace the
same way on every path (sync, async, streaming). The caller calls the teacher itself (its own
framework, callbacks and streaming) and only converts the answer to aad's schema.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Message, RoutingDecision, Usage

if TYPE_CHECKING:
    from aad_core.serving.cascade import TierOutcome
    from aad_core.serving.engine import RoutingEngine


@dataclass
class SpecialistOutcome:
    """The specialist's attempt at a request: ``ok`` with the checked ``message``, or why not."""

    ok: bool
    reason: str = ""
    message: Message | None = None
    text: str = ""
    mean_logprob: float | None = None
    #: The specialist's own confidence, when its generation reports one (e.g. a classifier's probability).
    confidence: float | None = None
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
    #: How long the teacher took (None when a specialist answered).
    teacher_latency_ms: float | None = None


def escalation_info(decision: RoutingDecision, outcome: SpecialistOutcome) -> dict[str, Any]:
    """Why a specialist's answer was rejected, with that answer: ``metadata["aad_escalation"]`` of the
    trace that stores the teacher's answer instead."""
    return {"reason": outcome.reason, "cluster_id": decision.cluster_id, "specialist": decision.specialist,
            "specialist_output": outcome.text, "similarity": decision.similarity,
            "mean_logprob": outcome.mean_logprob, "confidence": outcome.confidence}


def teacher_result(result: Any) -> tuple[Message, Usage | None, str | None]:
    """(message, usage, model) of a teacher call's result: a Message, an OpenAI chat-completion
    dict, a string, or (Message, Usage)."""
    if isinstance(result, tuple):
        msg, usage = result[0], result[1] if len(result) > 1 else None
        return teacher_result(msg)[0], usage, None
    if isinstance(result, Message):
        return result, None, None
    if isinstance(result, dict) and "choices" in result:
        msg = Message.model_validate({k: v for k, v in result["choices"][0]["message"].items() if v is not None})
        return msg, _usage(result.get("usage")), result.get("model")
    if isinstance(result, str):
        return Message(role="assistant", content=result), None, None
    raise TypeError(f"A teacher call must return a Message, an OpenAI chat completion dict or a string. Got {type(result).__name__}.")


def _usage(raw: Any) -> Usage | None:
    """The three token counts of a chat completion's ``usage``: OpenAI adds ``*_tokens_details``, vLLM
    sends them as null, and a count the teacher got wrong never costs the user the answer."""
    from aad_core.capture.convert import usage_from

    try:
        return usage_from(raw)
    except (TypeError, ValueError):
        return None


class RoutedCall:
    """One request after the routing decision, the specialist's attempt and the middle tiers' (made by
    :meth:`RoutingEngine.route_call`).

    Either :attr:`served_answer` is the checked answer the user gets (:attr:`specialist_answer`, or
    :attr:`tier_answer` of a middle tier of the cascade), or the caller calls the teacher —
    :meth:`start_teacher` right before, :meth:`finish_teacher` (or :meth:`afinish_teacher`) with its
    answer once it is complete, streams included. Finishing times
    the teacher and, when a specialist's answer was rejected, records the escalation trace.
    """

    def __init__(self, engine: RoutingEngine, request: ChatRequest, decision: RoutingDecision,
                 outcome: SpecialistOutcome | None, *, started: float,
                 tier_outcomes: list[TierOutcome] | None = None) -> None:
        self.engine = engine
        self.request = request
        self.decision = decision
        #: The specialist's attempt (None when the router chose the teacher).
        self.outcome = outcome
        self.started = started
        ready = time.perf_counter()
        self._teacher_started = ready
        self._teacher_answer: RoutedAnswer | None = None
        self.specialist_answer: RoutedAnswer | None = None
        #: Set by an integration whose capture handler records the teacher call itself (with
        #: :meth:`escalation_info` in its metadata): finishing then stores no second trace of it.
        self.captured_by_caller = False
        if outcome is not None and outcome.ok and outcome.message is not None:
            self.specialist_answer = RoutedAnswer(outcome.message, decision, outcome.usage or Usage(),
                                                  model=decision.specialist or "", latency_ms=(ready - started) * 1000)
        #: The middle tiers' attempts, in order (the last one ``ok`` when a middle tier answered).
        self.tier_outcomes: list[TierOutcome] = list(tier_outcomes or [])
        #: A middle tier's checked answer (None when the specialist or the teacher answers).
        self.tier_answer: RoutedAnswer | None = None
        last = self.tier_outcomes[-1] if self.tier_outcomes else None
        if self.specialist_answer is None and last is not None and last.ok and last.message is not None:
            self.tier_answer = RoutedAnswer(last.message, decision, last.usage or Usage(), model=last.model or last.tier,
                                            latency_ms=(ready - started) * 1000)

    @property
    def served_answer(self) -> RoutedAnswer | None:
        """The answer the user gets without the teacher: the specialist's or a middle tier's."""
        return self.specialist_answer if self.specialist_answer is not None else self.tier_answer

    @property
    def tier_outcome(self) -> TierOutcome | None:
        """The attempt of the middle tier that answered (None: none did)."""
        return self.tier_outcomes[-1] if self.tier_answer is not None else None

    @property
    def answered_by(self) -> str:
        """``"specialist"``, the name of the middle tier that answered, or ``"teacher"``."""
        if self.specialist_answer is not None:
            return "specialist"
        outcome = self.tier_outcome
        return outcome.tier if outcome is not None else "teacher"

    @property
    def needs_teacher(self) -> bool:
        return self.served_answer is None

    @property
    def escalated(self) -> bool:
        """A specialist was tried and its answer rejected."""
        return self.outcome is not None and self.specialist_answer is None

    def escalation_info(self) -> dict[str, Any] | None:
        """What an escalation trace's ``metadata["aad_escalation"]`` holds (None: no escalation), with the
        middle tiers' rejected answers under ``"tiers"`` when any was tried."""
        if self.outcome is None or self.served_answer is not None:
            return None
        info = escalation_info(self.decision, self.outcome)
        if self.tier_outcomes:
            info["tiers"] = [o.to_json() for o in self.tier_outcomes]
        return info

    def start_teacher(self) -> None:
        """Mark the start of the teacher call (default: the end of the specialist's attempt)."""
        self._teacher_started = time.perf_counter()

    def finish_teacher(self, message: Message, usage: Usage | None = None, model: str | None = None,
                       raw: Any = None) -> RoutedAnswer:
        """The teacher's answer, timed from :meth:`start_teacher`; records the escalation if any."""
        return self._finish(message, usage, model, raw, ended=time.perf_counter())

    async def afinish_teacher(self, message: Message, usage: Usage | None = None, model: str | None = None,
                              raw: Any = None) -> RoutedAnswer:
        """:meth:`finish_teacher` for async callers (recording runs in a worker thread)."""
        ended = time.perf_counter()
        return await asyncio.to_thread(self._finish, message, usage, model, raw, ended=ended)

    def _finish(self, message: Message, usage: Usage | None, model: str | None, raw: Any, *,
                ended: float) -> RoutedAnswer:
        if self.served_answer is not None:
            who = (f"the specialist {self.decision.specialist!r}" if self.specialist_answer is not None
                   else f"the middle tier {self.answered_by!r}")
            raise AADError(f"This request was answered by {who}; it has no teacher answer to finish.",
                           hint="Call finish_teacher only when RoutedCall.needs_teacher is true.")
        if self._teacher_answer is not None:
            raise AADError("finish_teacher was already called for this routed call.",
                           hint="Open a new call with RoutingEngine.route_call for each request.")
        teacher_ms = (ended - self._teacher_started) * 1000
        self._teacher_answer = RoutedAnswer(message, self.decision, usage or Usage(),
                                            model=model or self.engine.teacher_model or "teacher",
                                            latency_ms=(ended - self.started) * 1000, teacher_raw=raw,
                                            teacher_latency_ms=teacher_ms)
        if self.captured_by_caller:
            pass  # the caller's capture handler stores this teacher call, once
        elif self.outcome is not None:
            self.engine.record_escalation(self.request, message, self.decision, self.outcome, usage=usage,
                                          model=model, latency_ms=teacher_ms, info=self.escalation_info())
        elif self.engine.capture_teacher:
            self.engine.record_teacher_answer(self.request, message, self.decision, usage=usage, model=model,
                                              latency_ms=teacher_ms)
        return self._teacher_answer
