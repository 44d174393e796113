"""``aad ingest --format otlp-json``: OpenTelemetry spans (OpenInference and GenAI conventions) -> traces."""

from __future__ import annotations

import json
from pathlib import Path

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
