"""The centroid router and the escalation loop.

Fast tests drive the real CentroidRouter and RoutingEngine with a keyword embedder and scripted
specialist backends (one that raises, one that hangs, one that writes invalid JSON, ...). The
``real_model`` test builds a workspace end to end: real MiniLM clustering, two trained tiny
specialists, calibration, and routing of new requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aad_core import hookimpl
from aad_core.plugins import Router, get_plugin_manager
from aad_core.serving.engine import RoutingEngine
from aad_core.schema import ChatRequest, Message, RoutingDecision
from aad_core.workspace import Workspace
from aad_plugins.centroid_router import CentroidRouter

from conftest import SHARED, make_trace
from tiny_models import make_tiny_student

TEACHER_ANSWER = '{"intent": "card_arrival", "by": "teacher"}'
SLOW_TEACHER_S = 0.05  # a teacher this slow, behind a specialist slower still, shows whose time is recorded
SLOW_SPECIALIST_S = 0.3
INTENT_SYSTEM = "Classify the customer's banking query. Answer with the intent label only."
JSON_SYSTEM = 'Extract the city and day of a restaurant booking. Answer with JSON only: {"city": ..., "day": ...}'
CITIES = ["Paris", "Rome", "Berlin", "Oslo", "Vienna", "Prague", "Dublin", "Athens", "Warsaw", "Zurich"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
BOOKING = ["Book a table in {c} on {d}", "Reserve dinner for two in {c} on {d}, please",
           "Can I get a table in {c} this {d}?", "I need a restaurant booking in {c} for {d}"]
COMPLEX = [
    "Write a haiku about the sea at night", "Explain how a transformer neural network works",
    "Plan a three day hiking trip in the Alps", "What were the causes of the French revolution?",
    "Draft a polite email declining a job offer", "Summarise the plot of Hamlet in five sentences",
    "How do I fix a leaking kitchen tap?", "Compare Python and Rust for systems programming",
    "Give me a recipe for vegan lasagne", "What is the difference between weather and climate?",
    "Suggest names for a bakery in a small town", "Explain the rules of cricket to an American",
    "Write a limerick about a forgetful cat", "How does compound interest work over decades?",
    "Describe the life cycle of a star", "What should I pack for a winter trip to Iceland?",
    "Translate 'good morning, how are you' into French and German", "Why is the sky blue?",
    "Outline a business plan for a bicycle repair shop", "What is the meaning of stoicism in daily life?",
]


def keyword_embed(requests: list[ChatRequest]) -> np.ndarray:
    """Cluster 0 = card questions, cluster 1 = SQL questions, anything else in between."""
    rows = []
    for r in requests:
        text = r.last_user_message().lower()
        rows.append([1.0, 0.0] if "card" in text else [0.0, 1.0] if "sql" in text else [0.6, 0.6])
    out = np.asarray(rows, dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_router(ws: Workspace, specialists: dict[int, str] | None = None) -> CentroidRouter:
    return CentroidRouter(workspace=ws).fit(
        np.eye(2, dtype=np.float32), [0, 1], {0: 0.9, 1: 0.9},
        {0: "cards", 1: "sql"} if specialists is None else specialists, keyword_embed,
    )


@dataclass
class Gen:
    text: str
    mean_logprob: float = -0.05
    n_tokens: int = 5
    latency_ms: float = 1.0


class Scripted:
    """A specialist backend that answers, raises or hangs as told."""

    def __init__(self, text: str = '{"intent": "card_arrival"}', *, raises: bool = False, sleep_s: float = 0.0,
                 logprob: float = -0.05) -> None:
        self.text, self.raises, self.sleep_s, self.logprob = text, raises, sleep_s, logprob
        self.calls: list[str] = []

    def generate(self, name, requests, *, max_new_tokens):  # noqa: ANN001, ANN201
        self.calls.append(name)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.raises:
            raise RuntimeError("CUDA out of memory (simulated)")
        return [Gen(self.text, self.logprob) for _ in requests]


def teacher(_request: ChatRequest) -> Message:
    return Message(role="assistant", content=TEACHER_ANSWER)


def card_request(**params) -> ChatRequest:  # noqa: ANN003
    return ChatRequest(messages=[Message(role="user", content="my card has not arrived")], params=params)


#: What router.json holds for a specialist whose eval gate chose a threshold of -1.0 on its mean token log-prob.
GATED = {"confidence_threshold": -1.0, "confidence_signal": "mean_logprob", "confidence_label": "mean token log-prob",
         "confidence_calibration": {"coverage": 0.71, "agreement": 0.978, "lower_bound": 0.951, "n_served": 128,
                                    "n": 180}}


def engine_for(ws: Workspace, backend: Scripted, *, output_kind: str = "json", timeout_s: float = 5.0,
               confidence: dict | None = None) -> RoutingEngine:
    # Fast tests skip PII redaction of escalation traces (loading presidio costs seconds); the
    # real-model test keeps it on.
    ws.config_path.write_text(ws.config_path.read_text(encoding="utf-8").replace("redact = true", "redact = false"),
                              encoding="utf-8")
    ws.__dict__.pop("config", None)
    eng = RoutingEngine(ws, teacher, router=make_router(ws), specialists=backend, timeout_s=timeout_s)
    eng._cluster_info = {0: {"output_kind": output_kind, **(confidence or {})}, 1: {"output_kind": "sql"}}
    return eng


def escalations(ws: Workspace) -> list:
    store = ws.store()
    try:
        return [t for t in store.iter_traces(source="router")]
    finally:
        store.close()


# -- the router --------------------------------------------------------------------------------
def test_router_decisions_explain_themselves_and_reach_observers(workspace: Workspace) -> None:
    seen = []

    class Observer:
        @hookimpl
        def aad_request_routed(self, decisions):  # noqa: ANN001, ANN202
            seen.extend(decisions)

    get_plugin_manager().add_plugin(Observer(), name="observer")
    router = make_router(workspace, specialists={0: "cards"})
    engine = RoutingEngine(workspace, router=router, record=False)
    card, sql, other = engine.decide([card_request(),
                                      ChatRequest(messages=[Message(role="user", content="write sql for sales")]),
                                      ChatRequest(messages=[Message(role="user", content="plan my trip")])])
    engine.close()
    assert card.target == "specialist" and card.specialist == "cards" and card.cluster_id == 0
    assert card.similarity == pytest.approx(1.0) and card.threshold == pytest.approx(0.9)
    assert "clears its threshold" in card.reason
    assert sql.target == "teacher" and "no promoted specialist" in sql.reason  # cluster 1 has none
    assert other.target == "teacher" and "below its threshold" in other.reason
    assert [d.target for d in seen] == ["specialist", "teacher", "teacher"]  # fired once, by the engine
    router.route([card_request()])
    assert len(seen) == 3  # the router itself fires nothing


class KeywordRouter(Router):
    """A router other than the centroid one: card questions to the 'cards' specialist, the rest to the teacher."""

    def __init__(self, workspace: Any = None) -> None:
        self.workspace = workspace

    def route(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]:
        return [RoutingDecision(target="specialist", specialist="cards", cluster_id=0, reason="keyword: card")
                if "card" in r.last_user_message() else RoutingDecision(target="teacher", reason="keyword: other")
                for r in requests]


class RoutedObserver:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    @hookimpl
    def aad_request_routed(self, decisions: list[RoutingDecision]) -> None:
        self.batches.append([d.reason for d in decisions])


class KeywordRouterPlugin:
    @hookimpl
    def aad_register_routers(self, register: Any) -> None:
        register("keyword", KeywordRouter)


def test_the_engine_fires_request_routed_for_any_router(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    observer = RoutedObserver()
    get_plugin_manager().add_plugin(observer, name="observer")
    get_plugin_manager().add_plugin(KeywordRouterPlugin(), name="keyword-router")
    monkeypatch.setenv("AAD_ROUTE__ROUTER", "keyword")
    ws = Workspace(workspace.root)  # reads the configuration (and the override) afresh
    eng = RoutingEngine(ws, teacher, specialists=Scripted("card_arrival"), record=False)
    assert isinstance(eng.router, KeywordRouter)  # built from [route] router through the registry
    answer = eng.answer(card_request())
    assert answer.decision.target == "specialist" and answer.message.content == "card_arrival"
    eng.decide([card_request(), ChatRequest(messages=[Message(role="user", content="plan my trip")])])
    eng.close()
    assert observer.batches == [["keyword: card"], ["keyword: card", "keyword: other"]]

    given = RoutingEngine(workspace, teacher, router=KeywordRouter(), specialists=Scripted(), record=False)
    assert given.answer(ChatRequest(messages=[Message(role="user", content="plan my trip")])).decision.target == "teacher"
    given.close()
    assert observer.batches[-1] == ["keyword: other"]
    assert given.decide([]) == [] and len(observer.batches) == 3  # an empty batch is not announced


def test_a_teacher_only_agent_node_is_not_embedded(workspace: Workspace) -> None:
    from aad_core.schema import node_key

    planner = ChatRequest(messages=[Message(role="system", content="You plan multi-step tasks."),
                                    Message(role="user", content="my card has not arrived")])
    embedded: list[str] = []

    def spy(requests):  # noqa: ANN001, ANN202
        embedded.extend(r.last_user_message() for r in requests)
        return keyword_embed(requests)

    router = CentroidRouter(workspace=workspace).fit(np.eye(2, dtype=np.float32), [0, 1], {0: 0.9, 1: 0.9},
                                                     {0: "cards"}, spy, teacher_nodes={node_key(planner): 40})
    plan, card = router.route([planner, card_request()])
    # The planner's message would match the card specialist, but its node never reached one in calibration.
    assert plan.target == "teacher" and plan.cluster_id is None and "40 calibration calls" in plan.reason
    assert card.target == "specialist" and card.specialist == "cards"
    assert embedded == ["my card has not arrived"]  # only the card request was embedded


def test_teacher_only_nodes_come_from_the_training_split(workspace: Workspace) -> None:
    from types import SimpleNamespace

    from aad_core.schema import node_key
    from aad_core.pipeline.calibrate import teacher_only_nodes

    traces = ([make_trace(f"plan step {i}", "ok", system="You plan.", id=f"p{i}") for i in range(25)]
              + [make_trace(f"card {i}", "card_arrival", system="Classify.", id=f"c{i}") for i in range(25)]
              + [make_trace(f"rare {i}", "x", system="Rare node.", id=f"r{i}") for i in range(3)]
              + [make_trace(f"plan held out {i}", "ok", system="You plan.", id=f"h{i}") for i in range(5)]
              + [make_trace(f"no system {i}", "ok", system="", id=f"n{i}") for i in range(25)])
    store = workspace.store()
    store.add(traces)
    store.close()
    # The planner's held-out calls sit in the served cluster 1: only the training split counts.
    assignments = {t.id: (1 if t.id[0] in "ch" else 0) for t in traces}
    split = {t.id: "heldout" if t.id.startswith("h") else "train" for t in traces}
    state = SimpleNamespace(assignments=assignments, split=split)
    nodes = teacher_only_nodes(workspace, state, {1}, min_calls=20)
    # The card node reaches cluster 1; the rare node has too few calls; calls without a system
    # prompt are no agent node.
    assert nodes == {node_key(traces[0]): {"calls": 25, "clusters": [0]}}
    assert teacher_only_nodes(workspace, state, {1}, min_calls=0) == {}


def test_router_is_registered_as_a_plugin_component(workspace: Workspace) -> None:
    from aad_core.plugins import create_component

    router = create_component("router", "centroid", workspace=workspace)
    assert isinstance(router, CentroidRouter) and router.workspace is workspace
    assert router.get_params() == {"workspace": workspace, "default_threshold": None}


# -- the escalation loop -------------------------------------------------------------------------
def test_a_valid_specialist_answer_is_returned(workspace: Workspace) -> None:
    backend = Scripted('{"intent": "card_arrival"}')
    answer = engine_for(workspace, backend).answer(card_request())
    assert answer.decision.target == "specialist" and not answer.decision.escalated
    assert json.loads(answer.message.content) == {"intent": "card_arrival"}
    assert answer.model == "cards" and backend.calls == ["cards"]
    assert escalations(workspace) == []


def test_a_hung_specialist_never_starves_the_others_and_its_requests_stop_waiting(workspace: Workspace) -> None:
    import threading

    from aad_core.serving.engine import MAX_STUCK_CALLS, SPECIALIST_WORKERS

    release = threading.Event()

    class HungCards(Scripted):
        def generate(self, name, requests, *, max_new_tokens):  # noqa: ANN001, ANN201
            self.calls.append(name)
            if name == "cards":
                release.wait(30)  # a wedged device or an endpoint without a read timeout
            return [Gen("SELECT id FROM users" if name == "sql" else '{"intent": "card_arrival"}') for _ in requests]

    backend = HungCards()
    timeout_s = 1.0
    engine = engine_for(workspace, backend, timeout_s=timeout_s)
    sql = ChatRequest(messages=[Message(role="user", content="write sql for all users")])
    try:
        burst = [threading.Thread(target=engine.answer, args=(card_request(),)) for _ in range(SPECIALIST_WORKERS)]
        for t in burst:  # a burst arrives before any call has timed out: every one of its workers hangs
            t.start()
        for t in burst:
            t.join(10)
        healthy = engine.answer(sql)  # its own workers: served, not starved
        assert healthy.decision.target == "specialist" and healthy.model == "sql"
        started = time.perf_counter()
        reason = engine.answer(card_request()).decision.reason
        assert "specialist busy" in reason and time.perf_counter() - started < timeout_s  # no timeout waited out
        assert backend.calls.count("cards") == SPECIALIST_WORKERS and engine._stuck["cards"] >= MAX_STUCK_CALLS
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while engine._stuck and time.monotonic() < deadline:  # the hung calls return: cards is tried again
        time.sleep(0.01)
    assert engine.answer(card_request()).decision.target == "specialist"
    engine.close()
    after = engine.answer(card_request())  # a closed engine starts no new workers: the teacher answers
    assert after.decision.target == "teacher" and "the routing engine is closed" in after.decision.reason


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "max_new_tokens"])
def test_the_specialist_answers_within_the_token_budget_the_request_asks_for(workspace: Workspace, key: str) -> None:
    budgets = []

    class Budgeted(Scripted):
        def generate(self, name, requests, *, max_new_tokens):  # noqa: ANN001, ANN201
            budgets.append(max_new_tokens)
            return super().generate(name, requests, max_new_tokens=max_new_tokens)

    engine = engine_for(workspace, Budgeted())
    engine.answer(card_request(**{key: 7}))
    engine.answer(card_request())
    assert budgets == [7, workspace.config.route.max_new_tokens]


@pytest.mark.parametrize(
    ("backend", "kwargs", "reason"),
    [
        (Scripted(raises=True), {}, "exception: RuntimeError: CUDA out of memory"),
        (Scripted(sleep_s=1.5), {"timeout_s": 0.2}, "timeout"),
        (Scripted('{"intent": card_arrival'), {}, "validator json: invalid JSON"),
        (Scripted('{"intent": "card_arrival"}', logprob=-3.0), {"confidence": GATED}, "low confidence"),
    ],
    ids=["raises", "times-out", "invalid-json", "low-confidence"],
)
def test_a_failed_specialist_is_never_what_the_user_gets(workspace: Workspace, backend: Scripted, kwargs: dict,
                                                         reason: str) -> None:
    eng = engine_for(workspace, backend, **kwargs)
    started = time.perf_counter()
    answer = eng.answer(card_request())
    assert time.perf_counter() - started < 1.4  # a hanging specialist does not hold the caller
    assert answer.message.content == TEACHER_ANSWER
    assert answer.decision.target == "teacher" and answer.decision.escalated
    assert answer.decision.reason.startswith("escalated: " + reason.split(":")[0])
    eng.flush()
    (trace,) = escalations(workspace)
    assert trace.response.content == TEACHER_ANSWER and "escalation" in trace.tags
    meta = trace.metadata["aad_escalation"]
    assert reason in meta["reason"] and meta["cluster_id"] == 0 and meta["specialist"] == "cards"
    eng.close()


def test_an_answer_below_the_gate_threshold_escalates_with_the_served_share(workspace: Workspace) -> None:
    eng = engine_for(workspace, Scripted(logprob=-1.41), confidence=GATED)
    answer = eng.answer(card_request())
    assert answer.message.content == TEACHER_ANSWER and answer.decision.escalated
    assert answer.decision.reason == ("escalated: low confidence: mean token log-prob -1.41 < threshold -1.00 (served "
                                      "share at -1.00: 71 %, agreement 97.8 % on 180 calibration calls)")
    eng.close()

    eng = engine_for(workspace, Scripted(logprob=-0.41), confidence=GATED)  # clears the threshold: served
    assert eng.answer(card_request()).decision.target == "specialist"
    eng.close()


def test_min_confidence_overrides_the_gate_threshold(workspace: Workspace) -> None:
    eng = engine_for(workspace, Scripted(logprob=-0.41), confidence=GATED)
    workspace.config.route.min_confidence = -0.2
    answer = eng.answer(card_request())
    assert answer.decision.reason == ("escalated: low confidence: mean token log-prob -0.41 < threshold -0.20 "
                                      "([route] min_confidence)")
    eng.close()


def test_a_specialist_confidence_is_the_signal_when_the_gate_chose_it(workspace: Workspace) -> None:
    @dataclass
    class Sure(Gen):
        confidence: float = 0.41

    class Classifier(Scripted):
        def generate(self, name, requests, *, max_new_tokens):  # noqa: ANN001, ANN201
            return [Sure(self.text) for _ in requests]

    gate = {**GATED, "confidence_threshold": 0.63, "confidence_signal": "confidence", "confidence_label": "confidence"}
    eng = engine_for(workspace, Classifier(), confidence=gate)
    answer = eng.answer(card_request())
    assert answer.decision.reason.startswith("escalated: low confidence: confidence 0.41 < threshold 0.63 (served "
                                             "share at 0.63: 71 %")
    eng.close()


def test_json_schema_and_unbound_tools_escalate(workspace: Workspace) -> None:
    schema = {"type": "object", "required": ["intent", "confidence"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    eng = engine_for(workspace, Scripted('{"intent": "card_arrival"}'), output_kind="text")
    answer = eng.answer(card_request(response_format=fmt))
    assert answer.decision.escalated and "'confidence' is a required property" in answer.decision.reason

    tools = [{"type": "function", "function": {"name": "lookup_card", "parameters": {"type": "object"}}}]
    bad_tool = Scripted('<tool_call>{"name": "wire_money", "arguments": {"amount": 100}}</tool_call>')
    eng = engine_for(workspace, bad_tool, output_kind="tool_calls")
    request = ChatRequest(messages=card_request().messages, tools=tools)
    answer = eng.answer(request)
    assert answer.decision.escalated and "'wire_money' is not bound" in answer.decision.reason
    assert answer.message.content == TEACHER_ANSWER

    good_tool = Scripted('<tool_call>{"name": "lookup_card", "arguments": {"id": 7}}</tool_call>')
    answer = engine_for(workspace, good_tool, output_kind="tool_calls").answer(request)
    assert answer.decision.target == "specialist"
    assert answer.message.tool_calls[0].function.name == "lookup_card" and answer.message.content is None


def test_the_escalation_trace_carries_the_teachers_latency_usage_and_model(workspace: Workspace) -> None:
    def slow_teacher(_request: ChatRequest) -> dict:
        time.sleep(SLOW_TEACHER_S)
        return {"model": "big-teacher", "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
                "choices": [{"message": {"role": "assistant", "content": TEACHER_ANSWER}}]}

    eng = engine_for(workspace, Scripted("{broken", sleep_s=SLOW_SPECIALIST_S))
    answer = eng.answer(card_request(), slow_teacher)
    eng.flush()
    (trace,) = escalations(workspace)
    # The teacher's own time: not the specialist's attempt before it.
    assert SLOW_TEACHER_S * 1000 <= trace.latency_ms < SLOW_SPECIALIST_S * 1000
    assert trace.latency_ms == pytest.approx(answer.teacher_latency_ms)
    assert answer.latency_ms >= (SLOW_TEACHER_S + SLOW_SPECIALIST_S) * 1000
    assert trace.model == answer.model == "big-teacher" and trace.usage.total_tokens == 12
    eng.close()


def test_a_routed_call_takes_one_teacher_answer(workspace: Workspace) -> None:
    from aad_core.errors import AADError

    eng = engine_for(workspace, Scripted("{broken"))
    call = eng.route_call(card_request())
    assert call.needs_teacher and call.escalated and call.specialist_answer is None
    call.start_teacher()
    done = call.finish_teacher(Message(role="assistant", content=TEACHER_ANSWER))
    assert done.model == "teacher" and done.teacher_latency_ms is not None
    with pytest.raises(AADError, match="already called"):
        call.finish_teacher(Message(role="assistant", content="again"))
    eng.flush()
    assert len(escalations(workspace)) == 1  # recorded exactly once

    served = engine_for(workspace, Scripted('{"intent": "card_arrival"}')).route_call(card_request())
    assert not served.needs_teacher and served.specialist_answer.model == "cards"
    with pytest.raises(AADError, match="answered by the specialist"):
        served.finish_teacher(Message(role="assistant", content="x"))


async def test_the_async_routed_call(workspace: Workspace) -> None:
    eng = engine_for(workspace, Scripted("{broken"))
    call = await eng.aroute_call(card_request())
    call.start_teacher()
    await asyncio.sleep(SLOW_TEACHER_S)
    done = await call.afinish_teacher(Message(role="assistant", content=TEACHER_ANSWER), model="async-teacher")
    eng.flush()
    (trace,) = escalations(workspace)
    assert trace.model == "async-teacher" and trace.latency_ms == pytest.approx(done.teacher_latency_ms)
    assert trace.latency_ms >= SLOW_TEACHER_S * 1000
    eng.close()


def test_no_escalation_trace_when_recording_is_off(workspace: Workspace) -> None:
    eng = RoutingEngine(workspace, teacher, router=make_router(workspace), specialists=Scripted(raises=True),
                        record=False)
    assert eng.answer(card_request()).decision.escalated
    eng.flush()
    assert escalations(workspace) == []


# -- real models ---------------------------------------------------------------------------------
@pytest.mark.real_model
def test_a_node_whose_cluster_gained_a_specialist_is_embedded_again(routed_workspace: tuple[Workspace, dict]) -> None:
    ws, info = routed_workspace
    saved = ws.read_state("router.json")
    stale = dict(saved, teacher_nodes={
        "a" * 64: {"calls": 30, "clusters": [info["intent_cluster"]]},  # promoted after this calibration
        "b" * 64: {"calls": 30, "clusters": [max(int(c) for c in saved["clusters"]) + 1]},  # still unserved
    })
    ws.write_state("router.json", stale)
    try:
        router = CentroidRouter(workspace=ws).load()
    finally:
        ws.write_state("router.json", saved)
    assert router.teacher_nodes_ == {"b" * 64: 30}


@pytest.mark.real_model
def test_real_minilm_routes_to_two_trained_specialists(routed_workspace: tuple[Workspace, dict]) -> None:
    ws, info = routed_workspace
    evaluation = ws.read_state("router_eval.json")
    assert evaluation["labels"] == ["routine", "complex"] and evaluation["targets"] == ["specialist", "teacher"]
    assert evaluation["n"] == sum(map(sum, evaluation["matrix"])) > 0
    assert evaluation["accuracy"] >= 0.9
    state = ws.read_state("router.json")
    served = {c["specialist"] for c in state["clusters"].values() if c["specialist"]}
    assert served == {info["intent_specialist"], info["json_specialist"]}
    assert state["clusters"][str(info["json_cluster"])]["output_kind"] == "json"
    for c in state["clusters"].values():  # the threshold's parts, saved for `aad route` to show
        if c["margin_threshold"] is not None:  # foreign requests all below the quantile: cut mid-margin
            assert c["closest_foreign"] < c["margin_threshold"] < c["quantile_threshold"]
        else:
            assert c["closest_foreign"] is None or c["closest_foreign"] >= c["quantile_threshold"]
        low = c["margin_threshold"] if c["margin_threshold"] is not None else c["quantile_threshold"]
        assert c["threshold"] == pytest.approx(max(low, c["separation_threshold"] or low), abs=1e-4)

    eng = RoutingEngine(ws, teacher)
    intent = eng.answer(ChatRequest(messages=[Message(role="system", content=info["intent_system"]),
                                              Message(role="user", content="I still have not received my new card")]))
    assert intent.decision.target == "specialist", intent.decision.reason
    assert intent.decision.specialist == info["intent_specialist"]
    extract = eng.answer(ChatRequest(messages=[Message(role="system", content=info["json_system"]),
                                               Message(role="user", content="Book a table in Lisbon on Friday")]))
    assert extract.decision.cluster_id == info["json_cluster"]
    if extract.decision.target == "specialist":
        assert isinstance(json.loads(extract.message.content), dict)  # validated JSON from the specialist
    else:  # the tiny specialist wrote broken JSON: the user got the teacher's answer instead
        assert extract.decision.reason.startswith("escalated: validator json") and extract.message.content == TEACHER_ANSWER
    poem = eng.answer(ChatRequest(messages=[Message(role="user", content="Write a sonnet about autumn rain")]))
    assert poem.decision.target == "teacher" and not poem.decision.escalated
    # A response_format its task never used: the teacher answers at once (request shape), the specialist never runs.
    fmt = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "object", "required": ["guests"]}}}
    booking = [ChatRequest(messages=[Message(role="system", content=JSON_SYSTEM),
                                     Message(role="user", content=BOOKING[i % 4].format(c=CITIES[i % 10], d=DAYS[i % 7]))])
               for i in range(12)]
    routed = next(r for r, d in zip(booking, eng.decide(booking)) if d.target == "specialist")
    strict = eng.answer(routed.model_copy(update={"params": {"response_format": fmt}}))
    assert strict.decision.target == "teacher" and not strict.decision.escalated
    assert "response_format json_schema:b" in strict.decision.reason and strict.message.content == TEACHER_ANSWER
    eng.flush()
    if extract.decision.escalated:  # an escalation is recorded as such
        assert any(t.metadata["aad_escalation"]["reason"].startswith("validator json") for t in escalations(ws))
    eng.close()

    from typer.testing import CliRunner

    from aad_core.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["route", "Write a sonnet about autumn rain", "--json", "-w", str(ws.root)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["target"] == "teacher"
    shown = runner.invoke(app, ["route", "--show", "-w", str(ws.root)])
    assert shown.exit_code == 0 and "Router thresholds" in shown.stdout and "Held-out routing accuracy" in shown.stdout
    assert "[route] teacher_node_min_calls" in " ".join(shown.stdout.split())
    saved = json.loads(runner.invoke(app, ["route", "--show", "--json", "-w", str(ws.root)]).stdout)
    assert saved["clusters"][str(info["json_cluster"])]["specialist"] == info["json_specialist"]


# -- the real workspace (session fixture, shared with the integration tests) -----------------------
def _banking_texts(n: int) -> list[str]:
    import csv

    path = SHARED / "data" / "banking77" / "train.csv"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    with path.open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("card_arrival", "card_delivery_estimate")]
    return [(r["text"], r["category"]) for r in rows[:n]]


def _train_specialist(ws: Workspace, student: Path, cluster_id: int, ids: list[str], label: str, tmp: Path):
    from aad_core.specialists import SpecialistRegistry
    from aad_plugins.qlora import QLoRATrainer

    store = ws.store()
    try:
        traces = list(store.iter_traces(ids=ids))
    finally:
        store.close()
    out = tmp / f"adapter-{cluster_id}"
    trainer = QLoRATrainer(student=str(student), batch_size=8, gradient_accumulation=1, learning_rate=1e-2,
                           max_length=64, quantization="none", seed=0, device="cpu", max_steps=40, eval_every=40, lora_r=16,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                           early_stopping_patience=0)
    metrics = trainer.train(traces, traces[:4], out, show_progress=False)
    registry = SpecialistRegistry(ws)
    spec = registry.save(cluster_id=cluster_id, label=label, adapter_dir=out, base_model=str(student), metrics=metrics)
    return registry.set_promoted(spec.name, spec.version, True, "test fixture")


_ROUTED: dict[str, tuple[Workspace, dict]] = {}


@pytest.fixture(scope="session")
def routed_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    """Traces of two routine tasks (banking intents, booking -> JSON) and varied one-off requests;
    real MiniLM clustering; two tiny specialists trained with the qlora trainer and promoted; the
    router calibrated."""
    pytest.importorskip("aad_core.pipeline.cluster")
    if "built" in _ROUTED:  # imported by the integration test modules too: build once per session
        return _ROUTED["built"]
    from aad_core.pipeline.cluster import load_clusters, run_cluster
    from aad_core.pipeline.calibrate import calibrate_router

    tmp = tmp_path_factory.mktemp("routed")
    ws = Workspace.init(tmp / "ws")
    text = ws.config_path.read_text(encoding="utf-8")
    for old, new in (("min_size = 30", "min_size = 12"), ("k_max = 16", "k_max = 6"),
                     ("max_new_tokens = 256", "max_new_tokens = 24")):
        text = text.replace(old, new)
    ws.config_path.write_text(text, encoding="utf-8")
    ws = Workspace(ws.root)

    # Fixed ids: the held-out split is a seeded hash of the id, so the test sees the same split every run.
    intent = [make_trace(t, c, system=INTENT_SYSTEM, task="intent", id=f"intent-{i}")
              for i, (t, c) in enumerate(_banking_texts(40))]
    booking = [make_trace(BOOKING[i % 4].format(c=CITIES[i % 10], d=DAYS[i % 7]),
                          json.dumps({"city": CITIES[i % 10], "day": DAYS[i % 7]}), system=JSON_SYSTEM, task="booking",
                          id=f"booking-{i}")
               for i in range(40)]
    systems = ["You are a helpful assistant.", "You are a knowledgeable and friendly expert."]
    complex_ = [make_trace(q, f"A long, careful answer about: {q.lower()}.", system=systems[i % 2], id=f"complex-{i}")
                for i, q in enumerate(COMPLEX * 2)]
    store = ws.store()
    store.add(intent + booking + complex_)
    store.close()

    run_cluster(ws, show_progress=False)
    state = load_clusters(ws)
    ids = {"intent": {t.id for t in intent}, "booking": {t.id for t in booking}}
    cluster_of = {}
    for task, members in ids.items():
        counts: dict[int, int] = {}
        for tid in members & state.assignments.keys():  # curation drops near-duplicates
            counts[state.assignments[tid]] = counts.get(state.assignments[tid], 0) + 1
        cluster_of[task] = max(counts, key=counts.get)
    student = make_tiny_student(tmp / "student")
    specs = {}
    for task, cid in cluster_of.items():
        train_ids = [t for t, c in state.assignments.items() if c == cid and state.split.get(t) == "train"]
        specs[task] = _train_specialist(ws, student, cid, train_ids, task, tmp)
    calibrate_router(ws, show_progress=False)
    info = {"intent_cluster": cluster_of["intent"], "json_cluster": cluster_of["booking"],
            "intent_specialist": specs["intent"].name, "json_specialist": specs["booking"].name,
            "intent_system": INTENT_SYSTEM, "json_system": JSON_SYSTEM}
    _ROUTED["built"] = (ws, info)
    return ws, info


class _OddPredictor(Scripted):
    """A third-party predictor whose Generation carries an unreadable confidence."""

    def generate(self, name, requests, *, max_new_tokens):  # noqa: ANN001, ANN201
        from types import SimpleNamespace

        return [SimpleNamespace(text="card_arrival", mean_logprob=None, confidence="very sure", n_tokens=None)
                for _ in requests]


def test_an_unreadable_specialist_answer_escalates_instead_of_raising(workspace: Workspace) -> None:
    engine = engine_for(workspace, _OddPredictor(), output_kind="text")
    decision, outcome = engine.attempt(card_request())
    assert decision.target == "teacher" and decision.escalated
    assert outcome is not None and "unreadable answer" in outcome.reason
    assert engine.answer(card_request()).message.content == TEACHER_ANSWER
    engine.close()


def test_min_confidence_is_a_log_prob_cut_off_and_leaves_probability_thresholds_alone() -> None:
    from aad_core.serving.engine import _low_confidence
    from aad_core.serving.routed_call import SpecialistOutcome

    answer = SpecialistOutcome(True, text="x", mean_logprob=-0.9, confidence=0.41)
    lora = {"confidence_signal": "mean_logprob", "confidence_threshold": -2.0}
    classifier = {"confidence_signal": "confidence", "confidence_threshold": 0.63}
    assert _low_confidence(answer, lora, None) == ""
    assert "([route] min_confidence)" in _low_confidence(answer, lora, -0.5)
    # -0.5 is a log-prob: it must not replace the classifier's probability threshold
    assert _low_confidence(answer, classifier, -0.5).startswith("low confidence: confidence 0.41 < threshold 0.63")
