"""``aad ingest --format otlp-json``: OpenTelemetry spans (OpenInference and GenAI conventions) -> traces."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aad_core.capture.otel import read_otlp_json
from aad_core.cli import app
from aad_core.workspace import Workspace

FIXTURE = Path(__file__).parent / "data" / "otlp_openinference.json"
runner = CliRunner()


def test_llm_spans_become_traces_with_tools_usage_and_latency() -> None:
    result = read_otlp_json(FIXTURE)
    assert result.errors == [] and result.lines == 4  # 4 spans, one of them a chain
    first, failed, genai = result.traces
    assert first.model == "gpt-4o-2024-08-06" and first.source == "otel" and first.task == "support"
    assert [m.role for m in first.request.messages] == ["system", "user"]
    assert first.request.last_user_message() == "Where is my card? It was sent a week ago."
    call = first.response.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_abc", "track_card", {"days": 7})
    assert first.request.tool_names() == ["track_card"] and first.request.params["temperature"] == 0.0
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (42, 9, 51)
    assert abs(first.latency_ms - 850.0) < 1e-6
    assert first.created_at.isoformat() == "2026-05-01T12:00:00.100000+00:00"
    assert first.run_id == "5fb397be34d26b51" and first.parent_run_id == "051581bf3cb55c13"
    assert first.metadata["otel_trace_id"] == "5b8aa5a2d2c872e8321cf37308d69df2"
    assert first.metadata["tenant"] == "acme" and first.metadata["session.id"] == "s-1"
    assert failed.status == "error" and failed.error == "RateLimitError: 429" and failed.response is None
    assert failed.request.messages[0].text() == "Summarise: card shipped."
    assert failed.request.messages[1].tool_call_id == "call_abc"
    assert genai.model == "gpt-4o-mini-2024-07-18" and genai.answer_text() == "lost_or_stolen_card"
    assert (genai.usage.prompt_tokens, genai.usage.completion_tokens, genai.usage.total_tokens) == (12, 3, 15)


def test_cli_ingest_otel_is_idempotent_and_reports_bad_spans(workspace: Workspace, tmp_path: Path) -> None:
    w = ["-w", str(workspace.root)]
    res = runner.invoke(app, ["ingest", str(FIXTURE), "--format", "otlp-json", "--no-redact", *w])
    assert res.exit_code == 0, res.output
    assert "Read 4 span(s) from 1 file(s): stored 3 new trace(s)" in res.stdout
    res = runner.invoke(app, ["ingest", str(FIXTURE), "--format", "otel", "--no-redact", *w])
    assert "stored 0 new trace(s), 3 already present" in res.stdout
    res = runner.invoke(app, ["traces", "list", "--json", "--source", "otel", "--where", "tenant=acme", *w])
    assert [t["model"] for t in json.loads(res.stdout)] == ["gpt-4o-2024-08-06"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "t", "spanId": "s1", "attributes": [{"key": "openinference.span.kind", "value": {"stringValue": "LLM"}}]}]}]}]}))
    res = runner.invoke(app, ["ingest", str(bad), "--format", "otlp-json", *w])
    assert res.exit_code == 1 and "span s1" in res.output and "without input messages" in res.output


def test_odd_spans_are_read_or_rejected_by_name_never_a_traceback(tmp_path: Path) -> None:
    llm = [{"key": "openinference.span.kind", "value": {"stringValue": "LLM"}},
           {"key": "llm.input_messages.0.message.role", "value": {"stringValue": "user"}},
           {"key": "llm.input_messages.0.message.content", "value": {"stringValue": "hi"}}]
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "status": "ERROR",
         "attributes": llm},  # the status code alone, as some exporters write it
        "not a span"]}]}]}
    f = tmp_path / "odd.json"
    f.write_text(json.dumps(doc), encoding="utf-8")
    result = read_otlp_json(f)
    [trace] = result.traces
    assert trace.status == "error" and result.lines == 2
    [err] = result.errors
    assert "a span must be a JSON object" in err.message
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(doc).encode().replace(b'"hi"', b'"caf\xe9"'))
    with pytest.raises(Exception, match="not valid UTF-8: byte 0xe9 at line 1"):
        read_otlp_json(latin)


# -- the real OpenInference LangChain instrumentation, exported by the OTel SDK ----------------------

def _instrumentation() -> tuple[Any, Any]:
    """(LangChainInstrumentor, opentelemetry.sdk.trace); skipped outside CI when not installed."""
    try:
        from openinference.instrumentation.langchain import LangChainInstrumentor
        from opentelemetry.sdk import trace as sdk_trace
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("openinference-instrumentation-langchain / opentelemetry-sdk are not installed (pip install 'aad[test]')")
    return LangChainInstrumentor, sdk_trace


def _fake_teacher() -> Any:
    """A LangChain chat model that answers a tool call first, then text, with usage metadata (as a
    provider integration reports it) and a measurable latency."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.utils.function_calling import convert_to_openai_tool

    class FakeTeacher(BaseChatModel):
        calls: int = 0

        @property
        def _llm_type(self) -> str:
            return "fake-teacher"

        def _generate(self, messages: list[Any], stop: list[str] | None = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:
            time.sleep(0.03)
            self.calls += 1
            usage = {"input_tokens": 40 + self.calls, "output_tokens": 9, "total_tokens": 49 + self.calls}
            if self.calls == 1:
                msg = AIMessage(content="", tool_calls=[{"id": "call_1", "name": "track_card", "args": {"days": 7}}],
                                usage_metadata=usage, response_metadata={"model_name": "gpt-4o-fake"})
            else:
                msg = AIMessage(content="card_arrival", usage_metadata=usage,
                                response_metadata={"model_name": "gpt-4o-fake"})
            return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model_name": "gpt-4o-fake"})

        def bind_tools(self, tools: list[Any], **kwargs: Any) -> Any:
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    return FakeTeacher()


def _record_instrumented_calls(tmp_path: Path) -> tuple[list[Any], Path, Path]:
    """Two LLM calls inside a chain, traced by the real LangChainInstrumentor. Returns the finished
    spans and two files: OTLP JSON written with the SDK's own OTLP encoder (protobuf's JSON mapping),
    and what the SDK's ConsoleSpanExporter writes to a file."""
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    instrumentor_cls, sdk_trace = _instrumentation()

    @tool
    def track_card(days: int) -> str:
        """Track a card that was sent some days ago."""
        return "in transit"

    console_file = tmp_path / "console_spans.json"
    memory = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with console_file.open("w", encoding="utf-8") as fh:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=fh)))
        instrumentor = instrumentor_cls()
        instrumentor.instrument(tracer_provider=provider)
        try:
            model = _fake_teacher()
            agent = RunnableLambda(lambda q: model.bind_tools([track_card]).invoke(
                [("system", "You are a bank's support agent."), ("human", q)]))
            agent.invoke("Where is my card? It was sent a week ago.", config={"metadata": {"aad_task": "support"}})
            model.invoke([("system", "Classify banking intents."), ("human", "my card has not arrived")],
                         config={"metadata": {"aad_task": "intent"}})
        finally:
            instrumentor.uninstrument()
            provider.shutdown()
    spans = list(memory.get_finished_spans())

    from google.protobuf.json_format import MessageToJson
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    otlp_file = tmp_path / "otlp_spans.json"
    otlp_file.write_text(MessageToJson(encode_spans(spans)), encoding="utf-8")
    return spans, otlp_file, console_file


def test_real_openinference_langchain_spans_round_trip_tool_calls_usage_and_latency(tmp_path: Path) -> None:
    spans, otlp_file, console_file = _record_instrumented_calls(tmp_path)
    llm_spans = sorted((s for s in spans if s.attributes.get("openinference.span.kind") == "LLM"),
                       key=lambda s: s.start_time)
    assert len(llm_spans) == 2 and len(spans) > 2  # the chain is a span of its own
    for path in (otlp_file, console_file):
        ws = Workspace.init(tmp_path / f"ws-{path.stem}")
        res = runner.invoke(app, ["ingest", str(path), "--format", "otel", "--no-redact", "-w", str(ws.root)])
        assert res.exit_code == 0, res.output
        assert f"Read {len(spans)} span(s) from 1 file(s): stored 2 new trace(s)" in res.stdout, res.stdout
        with ws.store() as store:
            traces = sorted(store.iter_traces(), key=lambda t: t.created_at)
        tool_trace, text_trace = traces
        for trace, span in zip(traces, llm_spans):
            assert trace.run_id == format(span.context.span_id, "016x"), path.name
            assert trace.metadata["otel_trace_id"] == format(span.context.trace_id, "032x")
            want_ms = (span.end_time - span.start_time) / 1e6
            assert want_ms >= 30 and abs(trace.latency_ms - want_ms) < 0.01, (trace.latency_ms, want_ms)
            assert trace.model == "gpt-4o-fake" and trace.status == "ok" and trace.source == "otel"
        # the first call ran inside the chain: its parent span is the chain's
        assert tool_trace.parent_run_id == format(llm_spans[0].parent.span_id, "016x")
        assert tool_trace.task == "support" and text_trace.task == "intent"
        assert [m.role for m in tool_trace.request.messages] == ["system", "user"]
        assert tool_trace.request.last_user_message() == "Where is my card? It was sent a week ago."
        assert tool_trace.request.tool_names() == ["track_card"]
        call = tool_trace.response.tool_calls[0]
        assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_1", "track_card", {"days": 7})
        assert "_type" not in (tool_trace.request.params or {})
        assert (tool_trace.usage.prompt_tokens, tool_trace.usage.completion_tokens,
                tool_trace.usage.total_tokens) == (41, 9, 50)
        assert text_trace.answer_text() == "card_arrival" and not text_trace.response.tool_calls
        assert (text_trace.usage.prompt_tokens, text_trace.usage.total_tokens) == (42, 51)
        res = runner.invoke(app, ["ingest", str(path), "--format", "otel", "--no-redact", "-w", str(ws.root)])
        assert "stored 0 new trace(s), 2 already present" in res.stdout  # same ids from either file form


def test_otel_ids_in_hex_base64_and_0x_forms_are_one_id() -> None:
    from aad_core.capture.otel import otel_id

    span_hex, trace_hex = "5fb397be34d26b51", "5b8aa5a2d2c872e8321cf37308d69df2"
    assert otel_id(span_hex, 8) == otel_id("0x" + span_hex.upper(), 8) == span_hex
    assert otel_id(base64.b64encode(bytes.fromhex(span_hex)).decode(), 8) == span_hex
    assert otel_id(base64.b64encode(bytes.fromhex(trace_hex)).decode(), 16) == trace_hex
    assert otel_id(int(trace_hex, 16), 16) == trace_hex
    assert otel_id(None, 8) == "" and otel_id("s1", 8) == "s1"
