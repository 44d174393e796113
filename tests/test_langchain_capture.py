"""LangChain capture: a tool-calling agent loop driven by a fake chat model is recorded exactly."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import threading
import time
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.outputs import ChatGenerationChunk  # noqa: E402
from langchain_core.runnables import RunnableConfig, RunnableLambda  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402

from aad_core.config import AADSettings  # noqa: E402
from aad_langchain import AADCallbackHandler  # noqa: E402

LOGPROBS = {"content": [{"token": "Done", "logprob": -0.1, "top_logprobs": [{"token": "Done", "logprob": -0.1},
                                                                            {"token": "OK", "logprob": -2.5}]}]}


class ToolFakeChatModel(GenericFakeChatModel):
    """GenericFakeChatModel with bind_tools, and streaming that also streams tool calls, usage and
    response metadata (the stock fake drops them)."""

    model_name: str = "fake-teacher-1"
    temperature: float = 0.2

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Any:
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
        msg = self._generate(messages, stop=stop, **kwargs).generations[0].message
        for tok in re.split(r"(\s)", msg.content) if msg.content else []:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=tok, id=msg.id))
            if run_manager:
                run_manager.on_llm_new_token(tok, chunk=chunk)
            yield chunk
        last = ChatGenerationChunk(message=AIMessageChunk(
            content="", id=msg.id, chunk_position="last",
            tool_call_chunks=[{"name": tc["name"], "args": json.dumps(tc["args"]), "id": tc["id"], "index": i}
                              for i, tc in enumerate(msg.tool_calls)],
            usage_metadata=msg.usage_metadata, response_metadata=msg.response_metadata,
        ))
        if run_manager:
            run_manager.on_llm_new_token("", chunk=last)
        yield last


@tool
def get_balance(account: str) -> str:
    """Return the balance of an account."""
    return f"The balance of {account} is 42.00 EUR."


def usage(i: int, o: int) -> dict[str, int]:
    return {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}


def agent_answers() -> list[AIMessage]:
    return [
        AIMessage(content="", tool_calls=[{"name": "get_balance", "args": {"account": "ACC-7"}, "id": "call_1"}],
                  usage_metadata=usage(31, 9)),
        AIMessage(content="Your balance is 42.00 EUR.", usage_metadata=usage(52, 8), response_metadata={"logprobs": LOGPROBS}),
    ]


def run_agent(model: Any, question: str, config: RunnableConfig) -> list[Any]:
    """A minimal tool-calling agent loop: call the model, run requested tools, repeat."""
    tools = {"get_balance": get_balance}
    bound = model.bind_tools(list(tools.values()))
    messages: list[Any] = [SystemMessage("You are a bank assistant."), HumanMessage(question)]
    for _ in range(5):
        ai = bound.invoke(messages, config=config)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            messages.append(ToolMessage(tools[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    return messages


@pytest.fixture
def handler(workspace):
    h = AADCallbackHandler(workspace=workspace, redact=False)
    yield h
    h.close()


def test_agent_loop_traces_match_what_the_model_saw(workspace, handler):
    model = ToolFakeChatModel(messages=iter(agent_answers()))
    agent = RunnableLambda(lambda q, config: run_agent(model, q, config))
    transcript = agent.invoke("What is my balance on ACC-7?",
                              config={"callbacks": [handler], "metadata": {"aad_task": "balance"}, "tags": ["bank"]})
    assert handler.flush(10)
    store = handler.writer.store
    traces = list(store.iter_traces())
    assert len(traces) == 2 and handler.stats()["handler_errors"] == 0
    first, second = sorted(traces, key=lambda t: len(t.request.messages))

    # What the model saw: every role, in the OpenAI format.
    assert [m.role for m in first.request.messages] == ["system", "user"]
    assert [m.role for m in second.request.messages] == ["system", "user", "assistant", "tool"]
    assert second.request.messages[2].tool_calls[0].function.name == "get_balance"
    assert json.loads(second.request.messages[2].tool_calls[0].function.arguments) == {"account": "ACC-7"}
    assert second.request.messages[3].tool_call_id == "call_1"
    assert second.request.messages[3].content == transcript[3].content
    # Bound tools, params, model.
    assert first.request.tool_names() == ["get_balance"]
    assert first.request.tools[0]["function"]["parameters"]["properties"]["account"]["type"] == "string"
    assert first.model == "fake-teacher-1" and first.request.params.get("temperature") == 0.2
    # What it returned.
    assert first.response.tool_calls[0].id == "call_1"
    assert first.response.tool_calls[0].function.parsed_arguments() == {"account": "ACC-7"}
    assert second.answer_text() == "Your balance is 42.00 EUR."
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (31, 9, 40)
    assert second.usage.total_tokens == 60
    assert [t.token for t in second.teacher_logprobs] == ["Done"]
    assert second.teacher_logprobs[0].top_logprobs[1].logprob == -2.5
    # Bookkeeping.
    for t in traces:
        assert t.source == "langchain" and t.status == "ok" and t.task == "balance"
        assert t.id == t.run_id and t.parent_run_id is not None and "bank" in t.tags
        assert t.latency_ms is not None and t.latency_ms >= 0
    assert first.parent_run_id == second.parent_run_id  # both under the agent's run


def test_streamed_output_is_assembled_from_chunks(handler):
    answer = AIMessage(content="Checking the account now.", usage_metadata=usage(20, 6),
                       tool_calls=[{"name": "get_balance", "args": {"account": "ACC-9"}, "id": "call_9"}],
                       response_metadata={"logprobs": LOGPROBS})
    model = ToolFakeChatModel(messages=iter([answer])).bind_tools([get_balance])
    streamed = list(model.stream("balance of ACC-9?", config={"callbacks": [handler]}))
    assert len(streamed) > 3
    assert handler.flush(10)
    (t,) = list(handler.writer.store.iter_traces())
    assert t.answer_text() == "Checking the account now."
    assert t.response.tool_calls[0].function.name == "get_balance"
    assert t.response.tool_calls[0].function.parsed_arguments() == {"account": "ACC-9"}
    assert t.usage.total_tokens == 26 and t.teacher_logprobs[0].token == "Done"


def test_a_role_openai_does_not_have_is_captured_as_the_user_s(handler):
    from langchain_core.messages import ChatMessage

    model = ToolFakeChatModel(messages=iter([AIMessage(content="ok")]))
    model.invoke([ChatMessage(role="critic", content="be terse"), ChatMessage(role="chatbot", content="earlier"),
                  HumanMessage("hi")], config={"callbacks": [handler]})
    assert handler.flush(10) and handler.stats()["handler_errors"] == 0
    (t,) = list(handler.writer.store.iter_traces())
    assert [(m.role, m.content) for m in t.request.messages] == [
        ("user", "be terse"), ("assistant", "earlier"), ("user", "hi")]


def test_task_from_handler_and_llm_error_is_recorded(workspace):
    class Broken(ToolFakeChatModel):
        def _generate(self, *a: Any, **k: Any) -> Any:
            raise TimeoutError("teacher timed out")

    h = AADCallbackHandler(workspace=workspace, redact=False, task="triage")
    with pytest.raises(TimeoutError):  # the model's own error reaches the user, unchanged
        Broken(messages=iter([])).invoke("hi", config={"callbacks": [h]})
    ToolFakeChatModel(messages=iter(["fine"])).invoke("hi", config={"callbacks": [h]})
    h.close()
    traces = {t.status: t for t in h.writer.store.iter_traces()}
    assert traces["error"].error == "TimeoutError: teacher timed out"
    assert traces["error"].request.messages[0].content == "hi" and traces["error"].response is None
    assert traces["ok"].answer_text() == "fine" and traces["ok"].task == "triage"


def test_handler_failure_never_reaches_the_call(handler, monkeypatch):
    def boom(trace: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(handler.writer, "submit", boom)
    out = ToolFakeChatModel(messages=iter(["still works"])).invoke("hi", config={"callbacks": [handler]})
    assert out.content == "still works"
    assert handler.stats()["handler_errors"] == 1


def test_global_handler_via_callback_manager_and_async(handler):
    """A handler passed at construction time (global for this model) records sync and async calls."""
    import asyncio

    model = ToolFakeChatModel(messages=iter(["a", "b"]), callbacks=[handler])
    model.invoke("one")
    asyncio.run(model.ainvoke("two"))
    assert handler.flush(10)
    answers = sorted(t.answer_text() for t in handler.writer.store.iter_traces())
    assert answers == ["a", "b"]


def test_activate_records_calls_without_passing_callbacks(handler):
    model = ToolFakeChatModel(messages=iter(["inside", "outside"]))
    with handler.activate():
        model.invoke("one")
    model.invoke("two")
    assert handler.flush(10)
    assert [t.answer_text() for t in handler.writer.store.iter_traces()] == ["inside"]


def test_eight_threads_500_calls_exactly_4000_traces(workspace, handler):
    counter = itertools.count()

    class Echo(ToolFakeChatModel):
        def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
            from langchain_core.outputs import ChatGeneration, ChatResult

            text = messages[-1].content
            next(counter)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(f"echo {text}", usage_metadata=usage(3, 2)))])

    model = Echo(messages=iter([]))
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(500):
                out = model.invoke(f"t{k}-{i}", config={"callbacks": [handler]})
                assert out.content == f"echo t{k}-{i}"
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert handler.flush(60)
    store = handler.writer.store
    ids = store.ids()
    assert store.count() == 4000 and len(set(ids)) == 4000 and next(counter) == 4000
    for t in store.iter_traces():  # no answer got mixed up with another thread's request
        assert t.answer_text() == "echo " + t.request.messages[0].content
    s = handler.stats()
    assert s["captured"] == 4000 and s["written"] == 4000 and s["in_flight"] == 0 and s["handler_errors"] == 0


def _lock(db_path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=5)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_unwritable_store_spools_and_recovers(workspace):
    cfg = AADSettings(capture={"write_timeout_s": 0.05, "retry_interval_s": 0.2, "redact": False})
    h = AADCallbackHandler(workspace=workspace, config=cfg, redact=False)
    model = ToolFakeChatModel(messages=iter([f"answer {i}" for i in range(60)]))
    lock = _lock(workspace.db_path)
    try:
        for i in range(40):
            t0 = time.perf_counter()
            assert model.invoke(f"q{i}", config={"callbacks": [h]}).content == f"answer {i}"
            assert time.perf_counter() - t0 < 1.0
        assert h.flush(10)
        s = h.stats()
        assert s["written"] == 0 and s["spooled"] == 40 and s["spool_files"] >= 1
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    # The store is back: the next flush loads the spool into it.
    for i in range(40, 45):
        model.invoke(f"q{i}", config={"callbacks": [h]})
    assert h.flush(10)
    assert h.writer.store.count() == 45 and h.stats()["spool_files"] == 0
    h.close()


def test_spool_is_loaded_on_next_start(workspace):
    cfg = AADSettings(capture={"write_timeout_s": 0.05, "retry_interval_s": 30, "redact": False})
    h = AADCallbackHandler(workspace=workspace, config=cfg, redact=False)
    lock = _lock(workspace.db_path)
    model = ToolFakeChatModel(messages=iter([f"a{i}" for i in range(10)]))
    for i in range(10):
        model.invoke(f"q{i}", config={"callbacks": [h]})
    h.close(timeout=10)  # still locked: everything ends up in the spool
    assert h.stats()["spooled"] == 10
    lock.execute("ROLLBACK")
    lock.close()
    h2 = AADCallbackHandler(workspace=workspace, config=cfg, redact=False)
    assert h2.flush(10)
    assert h2.writer.store.count() == 10 and h2.stats()["reloaded"] == 10
    h2.close()


def test_calls_of_one_pipeline_share_a_root_and_every_parent_resolves(workspace, handler):
    """The run tree (issue 15): the calls of one chain invocation carry its root run id; each call's parent run
    is recorded (with its name) in metadata["aad_run_path"]; LangChain's internal tags (seq:step:N) are dropped;
    a second invocation gets another root."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from aad_langchain.callback import ROOT_RUN_METADATA_KEY, RUN_PATH_METADATA_KEY

    model = ToolFakeChatModel(messages=iter([AIMessage(f"answer {i}") for i in range(4)]))
    ask = ChatPromptTemplate.from_messages([("human", "{q}")])
    follow = ChatPromptTemplate.from_messages([("human", "Rephrase: {text}")])
    pipeline = ask | model | StrOutputParser() | (lambda text: {"text": text}) | follow | model | StrOutputParser()
    pipeline.invoke({"q": "first"}, config={"callbacks": [handler], "tags": ["bank"]})
    pipeline.invoke({"q": "second"}, config={"callbacks": [handler]})
    assert handler.flush(10) and handler.stats()["handler_errors"] == 0
    traces = sorted(handler.writer.store.iter_traces(), key=lambda t: t.response.content)
    assert len(traces) == 4
    roots = [t.metadata[ROOT_RUN_METADATA_KEY] for t in traces]
    assert roots[0] == roots[1] != roots[2] == roots[3]  # one root per invocation
    for t in traces:
        path = t.metadata[RUN_PATH_METADATA_KEY]
        assert path[0]["run_id"] == t.metadata[ROOT_RUN_METADATA_KEY] and path[0]["name"] == "RunnableSequence"
        assert path[-1]["run_id"] == t.parent_run_id  # the parent resolves to a recorded run
        assert not any(tag.startswith("seq:step:") for tag in t.tags)
    assert "bank" in traces[0].tags
    assert handler._parents == {}  # finished runs are forgotten


def test_a_lone_call_is_its_own_root(handler):
    ToolFakeChatModel(messages=iter([AIMessage("hi")])).invoke("hello", config={"callbacks": [handler]})
    assert handler.flush(10)
    (trace,) = handler.writer.store.iter_traces()
    assert trace.metadata["aad_root_run_id"] == trace.run_id and trace.metadata["aad_run_path"] == []
