"""Cascade tiers: specialist -> middle tier(s) -> teacher, each tier escalating to the next.

Fast: the keyword router and scripted specialists of test_router, LangChain fake chat models as middle
tiers and teachers, and a tiny OpenAI-compatible stub on 127.0.0.1 for the ``[[route.tiers]]`` endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models.fake_chat_models import FakeListChatModel  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _chat_stub import chat_stub, completion  # noqa: E402
from aad_core.artifacts import ClusterState  # noqa: E402
from aad_core.cli import app  # noqa: E402
from aad_core.config import load_config  # noqa: E402
from aad_core.errors import ConfigError  # noqa: E402
from aad_core.schema import ChatRequest, Cluster, Message, Trace, is_specialist_answer  # noqa: E402
from aad_core.serving.cascade import FunctionTier, OpenAITier, TierReply  # noqa: E402
from aad_core.serving.monitor import monitor_summary  # noqa: E402
from aad_core.serving.shadow import SERVING_LOG, SHADOW_LOG, ShadowEvaluator, read_jsonl  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402
from aad_langchain import AADCallbackHandler, LangChainTier, RoutedChatModel  # noqa: E402

from test_router import GATED, Scripted, card_request, engine_for, escalations  # noqa: E402
from test_shadow import register_cards  # noqa: E402

MID_ANSWER = '{"intent": "card_arrival", "by": "mid"}'
CONFIDENT, UNSURE = -0.05, -5.0  # mean token log-probs around GATED's threshold of -1.0

runner = CliRunner()


class Counting(FakeListChatModel):
    """A fake chat model that counts its calls."""

    calls: int = 0

    def _call(self, *args: Any, **kwargs: Any) -> str:
        Counting.calls += 1
        return super()._call(*args, **kwargs)


def unsure_engine(ws: Workspace, output_kind: str = "json") -> Any:
    """The specialist 'cards' answers valid JSON below its gate threshold: it refuses every card request."""
    return engine_for(ws, Scripted('{"intent": "card_arrival"}', logprob=UNSURE), output_kind=output_kind,
                      confidence=GATED)


def routed(ws: Workspace, tiers: list[Any], *, output_kind: str = "json", teacher: Any = None) -> RoutedChatModel:
    teacher = teacher or FakeListChatModel(responses=["teacher says hi"])
    return RoutedChatModel(teacher=teacher, routing_engine=unsure_engine(ws, output_kind), tiers=tiers)


def all_traces(ws: Workspace) -> list[Trace]:
    with ws.store() as store:
        return list(store.iter_traces())


# -- the three tiers ---------------------------------------------------------------------------------
def test_a_refusing_specialist_goes_to_the_middle_tier_which_answers(workspace: Workspace) -> None:
    Counting.calls = 0
    teacher = Counting(responses=["teacher says hi"])
    llm = routed(workspace, [LangChainTier(FakeListChatModel(responses=[MID_ANSWER]), name="mid")], teacher=teacher)
    msg = llm.invoke([HumanMessage("my card has not arrived")])
    assert json.loads(msg.content) == json.loads(MID_ANSWER) and Counting.calls == 0  # the teacher never ran
    route = msg.response_metadata["aad_route"]
    assert route["target"] == "tier" and route["tier"] == "mid" and route["escalated"]
    assert route["reason"].startswith("tier mid answered") and "low confidence" in route["reason"]
    llm.routing_engine.flush()
    # a middle tier's answer is recorded nowhere as a trace: never training data
    assert all_traces(workspace) == []
    (row,) = read_jsonl(workspace.state_dir / SERVING_LOG)
    assert row["tier"] == 1 and row["teacher"] == 0 and row["specialist"] == 0
    assert row["tier_tried"] == {"mid": 1} and row["tier_answered"] == {"mid": 1}
    assert row["escalations"] == {"low confidence": 1}  # why the specialist passed the request on


def test_the_specialist_answers_first_and_the_tier_is_not_asked(workspace: Workspace) -> None:
    Counting.calls = 0
    eng = engine_for(workspace, Scripted('{"intent": "card_arrival"}', logprob=CONFIDENT), confidence=GATED)
    llm = RoutedChatModel(teacher=FakeListChatModel(responses=["t"]), routing_engine=eng,
                          tiers=[LangChainTier(Counting(responses=[MID_ANSWER]), name="mid")])
    route = llm.invoke("my card has not arrived").response_metadata["aad_route"]
    assert route["target"] == "specialist" and route["tier"] == "specialist" and Counting.calls == 0


@pytest.mark.parametrize("output_kind,bad,check", [
    ("json", "{broken json", "validator json"),
    ("label", "I believe this customer is asking about the arrival of a new card, probably.", "validator label"),
])
def test_an_invalid_middle_tier_answer_goes_to_the_teacher(workspace: Workspace, output_kind: str, bad: str,
                                                           check: str) -> None:
    llm = routed(workspace, [LangChainTier(FakeListChatModel(responses=[bad]), name="mid")], output_kind=output_kind)
    msg = llm.invoke("my card has not arrived")
    assert msg.content == "teacher says hi"  # never the tier's invalid answer
    route = msg.response_metadata["aad_route"]
    assert route["target"] == "teacher" and route["tier"] == "teacher" and f"tier mid: {check}" in route["reason"]
    llm.routing_engine.flush()
    (trace,) = escalations(workspace)  # the teacher's answer, with every tier's rejected answer
    assert trace.response.content == "teacher says hi" and not is_specialist_answer(trace)
    (tier,) = trace.metadata["aad_escalation"]["tiers"]
    assert tier["tier"] == "mid" and not tier["ok"] and tier["output"] == bad and tier["reason"].startswith(check)
    (row,) = read_jsonl(workspace.state_dir / SERVING_LOG)
    assert row["teacher"] == 1 and row["tier_rejected"] == {"mid": 1} and "tier_answered" not in row


def test_a_tier_restricted_to_other_tasks_is_skipped(workspace: Workspace) -> None:
    ClusterState(clusters=[Cluster(id=0, label="cards", size=30, variance=0.1, mean_similarity=0.9, routine=True,
                                   task="intent"),
                           Cluster(id=1, label="sql", size=30, variance=0.1, mean_similarity=0.9, routine=True,
                                   task="sql")],
                 assignments={}, split={}, dropped={}).save(workspace)
    Counting.calls = 0
    sql_only = LangChainTier(Counting(responses=["SELECT 1"]), name="sql-tier", tasks=["sql"])
    intent = LangChainTier(FakeListChatModel(responses=[MID_ANSWER]), name="intent-tier", tasks=["intent"])
    llm = routed(workspace, [sql_only])
    msg = llm.invoke("my card has not arrived")
    assert msg.content == "teacher says hi" and Counting.calls == 0  # never asked
    assert msg.response_metadata["aad_route"]["tier"] == "teacher"
    # matched by task tag (and so by cluster label or id): the next tier in order answers
    llm = routed(workspace, [sql_only, intent])
    msg = llm.invoke("my card has not arrived")
    assert msg.response_metadata["aad_route"]["tier"] == "intent-tier" and Counting.calls == 0
    by_id = routed(workspace, [FunctionTier("by-id", lambda r: MID_ANSWER, tasks=[0])])
    assert by_id.invoke("my card has not arrived").response_metadata["aad_route"]["tier"] == "by-id"


def test_tiers_in_order_a_raising_tier_escalates_and_async_streaming_work(workspace: Workspace) -> None:
    def broken(_request: ChatRequest) -> str:
        raise RuntimeError("connection refused (simulated)")

    llm = routed(workspace, [FunctionTier("down", broken), LangChainTier(FakeListChatModel(responses=[MID_ANSWER]),
                                                                         name="mid")])
    msg = llm.invoke("my card has not arrived")
    route = msg.response_metadata["aad_route"]
    assert route["tier"] == "mid" and "tier down: exception: RuntimeError" in route["reason"]
    chunks = list(llm.stream("my card has not arrived"))
    assert json.loads("".join(str(c.content) for c in chunks)) == json.loads(MID_ANSWER)


async def test_async_invoke_reaches_the_middle_tier(workspace: Workspace) -> None:
    llm = routed(workspace, [LangChainTier(FakeListChatModel(responses=[MID_ANSWER]), name="mid")])
    msg = await llm.ainvoke("my card has not arrived")
    assert msg.response_metadata["aad_route"]["tier"] == "mid"


def test_a_slow_tier_times_out_to_the_teacher(workspace: Workspace) -> None:
    import time

    def slow(_request: ChatRequest) -> str:
        time.sleep(0.5)
        return MID_ANSWER

    eng = unsure_engine(workspace)
    eng.tiers = [FunctionTier("slow", slow, timeout_s=0.05)]
    answer = eng.answer(card_request())
    assert answer.decision.tier == "teacher" and "tier slow: timeout" in answer.decision.reason


def test_the_confidence_gate_of_a_tier(workspace: Workspace) -> None:
    def sure(_request: ChatRequest) -> TierReply:
        return TierReply(Message(role="assistant", content=MID_ANSWER), mean_logprob=-0.1)

    def hesitant(_request: ChatRequest) -> TierReply:
        return TierReply(Message(role="assistant", content=MID_ANSWER), mean_logprob=-2.0)

    eng = unsure_engine(workspace)
    eng.tiers = [FunctionTier("hesitant", hesitant, min_mean_logprob=-0.5), FunctionTier("plain", lambda r: MID_ANSWER,
                                                                                         min_mean_logprob=-0.5),
                 FunctionTier("sure", sure, min_mean_logprob=-0.5)]
    answer = eng.answer(card_request())
    assert answer.decision.tier == "sure" and answer.message.content == MID_ANSWER
    assert "tier hesitant: low confidence: mean token log-prob -2.000 < the tier's min_mean_logprob -0.5" in \
        answer.decision.reason
    assert "tier plain: low confidence: the tier reported no mean token log-prob" in answer.decision.reason


def test_the_callback_handler_never_records_a_middle_tier(workspace: Workspace) -> None:
    handler = AADCallbackHandler(workspace=workspace, redact=False)
    tier = LangChainTier(FakeListChatModel(responses=[MID_ANSWER, "direct"]), name="mid")
    with handler.activate():
        tier.generate(card_request())  # the tier's run: skipped
        tier.model.invoke("a direct call of the same model")  # recorded as usual
    handler.writer.flush()
    (trace,) = all_traces(workspace)
    assert trace.response.content == "direct"
    tier_trace = Trace(source="serve", request=card_request(), response=Message(role="assistant", content="x"),
                       metadata={"aad_route": {"target": "tier", "tier": "mid"}})
    assert is_specialist_answer(tier_trace)  # a stray tier answer is never training data either


# -- traffic and agreement per tier ------------------------------------------------------------------
def test_traffic_and_agreement_per_tier_in_monitor_and_report(workspace: Workspace) -> None:
    register_cards(workspace)
    eng = engine_for(workspace, Scripted('{"intent": "card_arrival"}', logprob=CONFIDENT), confidence=GATED)
    eng.teacher_call = lambda _r: Message(role="assistant", content=MID_ANSWER)
    eng.shadow = ShadowEvaluator(eng, rate=1.0, score=lambda _cid, a, b: float(a == b))
    # 'mid' answers the card task (cluster 0) when its specialist does not
    eng.tiers = [FunctionTier("mid", lambda r: MID_ANSWER, tasks=["0"])]
    for _ in range(3):
        assert eng.answer(card_request()).decision.tier == "specialist"
        eng.shadow.wait(5)  # one shadow call at a time: none is skipped as busy
    eng.specialists.logprob = UNSURE  # the specialist now refuses: the middle tier answers
    for i in range(2):
        assert eng.answer(ChatRequest(messages=[Message(role="user", content=f"my card {i} is late")])
                          ).decision.tier == "mid"
        eng.shadow.wait(5)
    eng.tiers = []
    assert eng.answer(card_request()).decision.tier == "teacher"
    eng.shadow.wait(5)
    eng.flush()
    pairs = [r for r in read_jsonl(workspace.state_dir / SHADOW_LOG) if r.get("event") == "pair"]
    assert sorted(str(r.get("tier")) for r in pairs) == ["None", "None", "None", "mid", "mid"]
    assert all(r["specialist"] is None for r in pairs if r.get("tier"))  # never the specialist's pairs
    summary = monitor_summary(workspace, days=None)
    cascade = summary["cascade"]
    assert cascade["tiers"] == ["specialist", "mid", "teacher"]
    assert cascade["answered"] == {"specialist": 3, "mid": 2, "teacher": 1}
    assert cascade["agreement"]["mid"]["n"] == 2 and cascade["agreement"]["mid"]["agreement"] == 1.0
    assert cascade["agreement"]["specialist"]["n"] == 3
    (task,) = [t for t in summary["tasks"] if t["cluster_id"] == 0]
    assert task["shadow_pairs"] == 3 and task["tiers"] == {"specialist": 3, "mid": 2, "teacher": 1}
    out = runner.invoke(app, ["monitor", "--workspace", str(workspace.root), "--days", "0"])
    assert out.exit_code == 0, out.output
    assert "Cascade tiers" in out.output and "mid" in out.output
    from aad_core.report.html import _monitor_section

    html = _monitor_section(workspace)
    assert "<h3>Cascade tiers</h3>" in html and "<td>mid</td>" in html


# -- [[route.tiers]] in aad.toml ---------------------------------------------------------------------
TIERS_TOML = """
[[route.tiers]]
name = "mid"
base_url = "{url}"
model = "qwen-7b"
api_key_env = "AAD_TEST_MID_KEY"
tasks = ["intent"]
min_mean_logprob = -0.5

[[route.tiers]]
name = "big"
base_url = "http://127.0.0.1:9/v1"
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aad.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_route_tiers_in_aad_toml_build_openai_tiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AAD_TEST_MID_KEY", "sk-test")
    cfg = load_config(_config(tmp_path, TIERS_TOML.format(url="http://127.0.0.1:8001/v1")))
    mid, big = cfg.route.tiers
    assert (mid.name, mid.model, mid.tasks, mid.min_mean_logprob, big.tasks) == ("mid", "qwen-7b", ["intent"], -0.5,
                                                                                 None)
    from aad_core.serving.cascade import tiers_from_config

    tier, _ = tiers_from_config(cfg.route)
    assert isinstance(tier, OpenAITier) and tier.api_key == "sk-test" and tier.tasks == ("intent",)


@pytest.mark.parametrize("entry,message", [
    ('name = "mid"\nbase_url = "localhost:8001"',
     "The 'base_url' parameter of [[route.tiers]] 'mid' must be an http:// or https:// URL"),
    ('name = "mid"\nbase_url = "http://127.0.0.1:8001/v1"\ntasks = "intent"',
     "The 'tasks' parameter of [[route.tiers]] 'mid' must be a non-empty list"),
    ('name = "teacher"\nbase_url = "http://127.0.0.1:8001/v1"',
     "The 'name' parameter of [[route.tiers]] 'teacher' must be other than"),
    ('name = "mid"\nbase_url = "http://127.0.0.1:8001/v1"\nmin_mean_logprob = 0.5',
     "The 'min_mean_logprob' parameter of [[route.tiers]] 'mid' must be a number <= 0 (a mean token log-prob). "
     "Got 0.5 instead."),
    ('name = "mid"\nbse_url = "http://127.0.0.1:8001/v1"',
     "The parameters of [[route.tiers]] 'mid' must be among name, base_url, model, api_key_env, tasks, "
     "min_mean_logprob, timeout_s. Got 'bse_url' instead (did you mean 'base_url'?)."),
])
def test_a_bad_tier_entry_is_a_clear_error(tmp_path: Path, entry: str, message: str) -> None:
    path = _config(tmp_path, "[route]\nshadow_rate = 0.1\n\n[[route.tiers]]\n" + entry + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and f"{path}:4" in str(err.value)  # the entry's [[route.tiers]] line
    assert "Got " in str(err.value)


def test_tier_names_are_unique(tmp_path: Path) -> None:
    text = '[[route.tiers]]\nname = "mid"\nbase_url = "http://a:1/v1"\n[[route.tiers]]\nname = "mid"\nbase_url = "http://b:1/v1"\n'
    with pytest.raises(ConfigError, match="must be unique. Got 'mid' twice instead"):
        load_config(_config(tmp_path, text))


def test_a_fresh_config_leaves_room_for_route_tiers(workspace: Workspace) -> None:
    text = workspace.config_path.read_text(encoding="utf-8") + TIERS_TOML.format(url="http://127.0.0.1:8001/v1")
    assert [t.name for t in load_config(_config(workspace.root, text)).route.tiers] == ["mid", "big"]


# -- an OpenAI-compatible endpoint as the middle tier -------------------------------------------------
@pytest.fixture
def stub_endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A chat-completions stub on 127.0.0.1: answers MID_ANSWER, with log-probs as the request's last user
    message asks ("sure" -> -0.1 per token, else -3.0)."""
    seen: list[dict[str, Any]] = []

    def reply(body: dict[str, Any], request: Any) -> dict[str, Any]:
        seen.append({"path": request.path, "auth": request.headers.get("Authorization"), "body": body})
        sure = "sure" in body["messages"][-1]["content"]
        logprobs = {"content": [{"token": "x", "logprob": -0.1 if sure else -3.0}] * 4} if body.get("logprobs") else None
        return completion(MID_ANSWER, body["model"], logprobs=logprobs)

    with chat_stub(reply) as url:
        yield url, seen


def test_an_openai_compatible_tier_from_aad_toml(workspace: Workspace, stub_endpoint: tuple[str, list],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, seen = stub_endpoint
    monkeypatch.setenv("AAD_TEST_MID_KEY", "sk-test")
    ClusterState(clusters=[Cluster(id=0, label="cards", size=30, variance=0.1, mean_similarity=0.9, routine=True,
                                   task="intent")], assignments={}, split={}, dropped={}).save(workspace)
    text = workspace.config_path.read_text(encoding="utf-8") + TIERS_TOML.format(url=url)
    workspace.config_path.write_text(text, encoding="utf-8")
    eng = unsure_engine(workspace)  # reads the config again
    sure = eng.answer(ChatRequest(messages=[Message(role="user", content="my card has not arrived, sure")]))
    assert sure.decision.tier == "mid" and sure.message.content == MID_ANSWER and sure.model == "qwen-7b"
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sk-test"
    assert seen[0]["body"]["model"] == "qwen-7b" and seen[0]["body"]["logprobs"] is True
    # below the tier's min_mean_logprob: on to 'big' (nothing listens on port 9), then the teacher
    unsure = eng.answer(card_request())
    assert unsure.decision.tier == "teacher" and "tier mid: low confidence: mean token log-prob -3.000" in \
        unsure.decision.reason and "tier big: exception" in unsure.decision.reason
    eng.close()
