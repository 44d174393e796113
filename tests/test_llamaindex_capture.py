"""LlamaIndex capture: CustomLLM calls in chat and completion mode are recorded exactly once."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, ToolCallBlock  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.dispatcher import instrument_tags  # noqa: E402
from llama_index.core.llms import CustomLLM, LLMMetadata  # noqa: E402
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from aad_llamaindex import AADEventHandler, attach, detach  # noqa: E402

LOGPROBS = {"content": [{"token": "42", "logprob": -0.05, "top_logprobs": [{"token": "42", "logprob": -0.05}]}]}


class EchoLLM(CustomLLM):
    """A completion-mode CustomLLM: chat() goes through complete() (LlamaIndex's adapter)."""

    model_name: str = "echo-teacher"
    temperature: float = 0.1
    fail: bool = False

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.model_name)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if self.fail:
            raise ConnectionError("teacher unreachable")
        words = prompt.split()
        return CompletionResponse(text=f"echo {words[-1]}",
                                  raw={"usage": {"prompt_tokens": len(words), "completion_tokens": 2}})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        def gen() -> Any:
            text = ""
            for piece in ["The ", "answer ", "is ", "42."]:
                text += piece
                yield CompletionResponse(text=text, delta=piece)
        return gen()


def get_balance(account: str) -> str:
    """Return the balance of an account."""
    return f"{account}: 42.00 EUR"


class ToolChatLLM(EchoLLM):
    """A chat-mode LLM that first calls a tool, then answers (raw OpenAI-style usage and log-probs)."""

    @llm_chat_callback()
    def chat(self, messages: Any, **kwargs: Any) -> ChatResponse:
        if not any(m.role.value == "tool" for m in messages):
            msg = ChatMessage(role="assistant", blocks=[
                ToolCallBlock(tool_call_id="call_1", tool_name="get_balance", tool_kwargs={"account": "ACC-7"})])
            return ChatResponse(message=msg, raw={"usage": {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}})
        return ChatResponse(
            message=ChatMessage(role="assistant", content="Your balance is 42.00 EUR."),
            raw={"usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59},
                 "choices": [{"logprobs": LOGPROBS}]},
        )


@pytest.fixture
def handler(workspace):
    h = attach(workspace=workspace, redact=False)
    yield h
    detach(h)


def traces_of(h: AADEventHandler) -> list[Any]:
    assert h.flush(10)
    return list(h.writer.store.iter_traces())


def test_completion_mode(handler):
    out = EchoLLM().complete("Say the magic word please")
    (t,) = traces_of(handler)
    assert out.text == "echo please"
    assert t.source == "llamaindex" and t.status == "ok" and t.model == "echo-teacher"
    assert [(m.role, m.content) for m in t.request.messages] == [("user", "Say the magic word please")]
    assert t.answer_text() == "echo please"
    assert (t.usage.prompt_tokens, t.usage.completion_tokens, t.usage.total_tokens) == (5, 2, 7)
    assert t.request.params["model_name"] == "echo-teacher" and t.latency_ms >= 0 and t.run_id.startswith("EchoLLM.complete")


def test_chat_mode_on_a_completion_llm_is_recorded_once(handler):
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="ping")]
    out = EchoLLM().chat(messages)
    (t,) = traces_of(handler)  # the inner complete() is not a second trace
    assert [(m.role, m.content) for m in t.request.messages] == [("system", "Be brief."), ("user", "ping")]
    assert t.answer_text() == out.message.content and t.response.role == "assistant"
    assert t.run_id.startswith("EchoLLM.chat")


def test_streaming_chat_and_completion_are_assembled(handler):
    llm = EchoLLM()
    assert "".join(r.delta for r in llm.stream_complete("q")) == "The answer is 42."
    list(llm.stream_chat([ChatMessage(role="user", content="q")]))
    traces = traces_of(handler)
    assert len(traces) == 2
    assert {t.answer_text() for t in traces} == {"The answer is 42."}


def test_tool_calling_loop(handler):
    llm = ToolChatLLM()
    tool = FunctionTool.from_defaults(get_balance)
    messages = [ChatMessage(role="system", content="You are a bank bot."), ChatMessage(role="user", content="Balance of ACC-7?")]
    with instrument_tags({"aad_task": "balance"}):
        first = llm.chat(messages, tools=[tool])
        call = first.message.blocks[0]
        messages += [first.message, ChatMessage(role="tool", content=tool.call(**call.tool_kwargs).content,
                                                additional_kwargs={"tool_call_id": call.tool_call_id})]
        llm.chat(messages, tools=[tool])
    t1, t2 = sorted(traces_of(handler), key=lambda t: len(t.request.messages))
    assert t1.request.tool_names() == ["get_balance"]
    assert t1.request.tools[0]["function"]["parameters"]["properties"]["account"]["type"] == "string"
    assert t1.response.tool_calls[0].id == "call_1"
    assert json.loads(t1.response.tool_calls[0].function.arguments) == {"account": "ACC-7"}
    assert t1.usage.total_tokens == 37 and t2.usage.total_tokens == 59
    assert [m.role for m in t2.request.messages] == ["system", "user", "assistant", "tool"]
    assert t2.request.messages[2].tool_calls[0].function.name == "get_balance"
    assert t2.request.messages[3].tool_call_id == "call_1" and t2.request.messages[3].content == "ACC-7: 42.00 EUR"
    assert t2.answer_text() == "Your balance is 42.00 EUR." and t2.teacher_logprobs[0].token == "42"
    assert t1.task == t2.task == "balance"


def test_predict_is_recorded_through_its_llm_call(workspace):
    h = attach(workspace=workspace, redact=False, task="greeting")
    try:
        out = EchoLLM().predict(PromptTemplate("Greet {name}"), name="Ada")
    finally:
        detach(h)
    (t,) = list(h.writer.store.iter_traces())
    assert out == "echo Ada" and t.task == "greeting" and t.request.messages[-1].content == "Greet Ada"


def test_failed_call_is_recorded_and_raised_unchanged(handler):
    with pytest.raises(ConnectionError):
        EchoLLM(fail=True).complete("hello")
    (t,) = traces_of(handler)
    assert t.status == "error" and t.error == "ConnectionError: teacher unreachable" and t.response is None


def test_detach_stops_recording(workspace):
    h = attach(workspace=workspace, redact=False)
    EchoLLM().complete("one")
    detach(h)
    EchoLLM().complete("two")
    assert h.writer.store.count() == 1
    assert h not in get_dispatcher().event_handlers and h.span_handler not in get_dispatcher().span_handlers


async def test_async_calls_are_recorded(handler):
    llm = EchoLLM()
    out = await llm.acomplete("async question")
    chat = await llm.achat([ChatMessage(role="user", content="async chat")])
    traces = traces_of(handler)
    assert out.text == "echo question" and len(traces) == 2
    assert sorted(t.answer_text() for t in traces) == sorted(["echo question", chat.message.content])


class StreamUsageLLM(EchoLLM):
    """An LLM with settings that describe the object (context window, system prompt, retries) and a stream
    whose provider reports usage on one chunk before the last (as OpenAI's include_usage chunk can be)."""

    context_window: int = 4096
    system_prompt: str | None = "You are terse."
    max_retries: int = 3
    max_tokens: int = 64

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        def gen() -> Any:
            yield CompletionResponse(text="The ", delta="The ")
            yield CompletionResponse(text="The answer", delta="answer",
                                     raw={"usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}})
            yield CompletionResponse(text="The answer.", delta=".", raw={"choices": []})
        return gen()


def test_params_are_the_calls_parameters_and_streamed_usage_is_kept(handler):
    """Issue 15: ``params`` hold the call's parameters (temperature, max_tokens, ...), not the LLM's metadata;
    a streamed call carries the usage its provider reported."""
    llm = StreamUsageLLM()
    assert "".join(r.delta for r in llm.stream_complete("q", top_p=0.9)) == "The answer."
    (t,) = traces_of(handler)
    params = t.request.params
    assert params["temperature"] == 0.1 and params["max_tokens"] == 64 and params["top_p"] == 0.9
    assert params["model_name"] == "echo-teacher"
    for meta in ("context_window", "system_prompt", "max_retries", "is_chat_model", "output_parser",
                 "pydantic_program_mode", "query_wrapper_prompt", "completion_to_prompt", "messages_to_prompt"):
        assert meta not in params, meta
    assert t.answer_text() == "The answer."
    assert (t.usage.prompt_tokens, t.usage.completion_tokens, t.usage.total_tokens) == (4, 2, 6)


_PIPELINES = get_dispatcher("aad_tests.pipeline")


@_PIPELINES.span
def answer_pipeline(llm: Any, question: str) -> str:
    """Two LLM calls in one instrumented span (a query engine or an agent step does the same)."""
    first = llm.complete(question)
    return llm.chat([ChatMessage(role="user", content=first.text)]).message.content  # chat -> complete inside


def test_parent_ids_resolve_to_stored_runs_and_one_pipeline_shares_a_root(handler):
    """Issue 15: a stored parent id is the run id of a stored call or None (LlamaIndex's enclosing spans
    are not stored); the enclosing spans are the call's ``aad_run_path`` and its ``aad_root_run_id`` is
    shared by every call of one pipeline."""
    llm = EchoLLM()
    answer_pipeline(llm, "one question")
    answer_pipeline(llm, "another question")
    llm.complete("alone")
    traces = traces_of(handler)
    assert len(traces) == 5  # the complete() inside chat() is not a call of its own
    stored = {t.run_id for t in traces} | {t.id for t in traces}
    assert all(t.parent_run_id is None or t.parent_run_id in stored for t in traces), [t.parent_run_id for t in traces]
    roots: dict[str, list[Any]] = {}
    for t in traces:
        roots.setdefault(t.metadata["aad_root_run_id"], []).append(t)
    alone = [t for t in traces if t.request.messages[-1].content == "alone"]
    assert alone[0].metadata["aad_root_run_id"] == alone[0].run_id and alone[0].metadata["aad_run_path"] == []
    pipelines = [group for root, group in roots.items() if root != alone[0].run_id]
    assert sorted(len(g) for g in pipelines) == [2, 2]
    for group in pipelines:
        (path,) = {json.dumps(t.metadata["aad_run_path"]) for t in group}
        (step,) = json.loads(path)
        assert step["run_id"] == group[0].metadata["aad_root_run_id"] and step["name"] == "answer_pipeline"


class StreamChatUsageLLM(StreamUsageLLM):
    """Chat-mode streaming whose provider reports usage on one chunk (and a stream that ends early)."""

    @llm_chat_callback()
    def stream_chat(self, messages: Any, **kwargs: Any) -> Any:
        def gen() -> Any:
            yield ChatResponse(message=ChatMessage(role="assistant", content="Hi"), delta="Hi")
            yield ChatResponse(message=ChatMessage(role="assistant", content="Hi there"), delta=" there",
                               raw={"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Any, **kwargs: Any) -> Any:
        async def gen() -> Any:
            yield ChatResponse(message=ChatMessage(role="assistant", content="Hi"), delta="Hi",
                               raw={"usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
            yield ChatResponse(message=ChatMessage(role="assistant", content="Hi there"), delta=" there")
        return gen()


async def test_streamed_chat_calls_carry_usage_and_the_calls_parameters(handler):
    llm = StreamChatUsageLLM()
    tool = FunctionTool.from_defaults(get_balance)
    assert "".join(r.delta for r in llm.stream_chat([ChatMessage(role="user", content="hi")], seed=7)) == "Hi there"
    chunks = await llm.astream_chat([ChatMessage(role="user", content="hi again")], tools=[tool])
    assert "".join([r.delta async for r in chunks]) == "Hi there"
    sync, async_ = sorted(traces_of(handler), key=lambda t: t.request.messages[-1].content)
    assert (sync.usage.prompt_tokens, sync.usage.completion_tokens, sync.usage.total_tokens) == (3, 2, 5)
    assert (async_.usage.prompt_tokens, async_.usage.completion_tokens, async_.usage.total_tokens) == (3, 1, 4)
    assert sync.answer_text() == async_.answer_text() == "Hi there"
    assert sync.request.params["seed"] == 7 and sync.request.params["temperature"] == 0.1
    assert sync.request.params["max_tokens"] == 64 and "context_window" not in sync.request.params
    assert async_.request.tool_names() == ["get_balance"] and "tools" not in async_.request.params
    assert sync.parent_run_id is None and async_.parent_run_id is None
