"""`aad ingest`, `aad traces stats/export`: formats, all-or-nothing, --skip-invalid, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from aad_core.cli import app
from aad_core.capture.ingest import read_jsonl

runner = CliRunner()


def chat_line(i: int, **extra) -> str:
    req = {
        "model": "gpt-teacher",
        "temperature": 0.2,
        "messages": [{"role": "system", "content": "Classify intent."}, {"role": "user", "content": f"query {i}"}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    }
    resp = {
        "model": "gpt-teacher-2026",
        "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": i})}}]},
            "logprobs": {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": "x", "logprob": -0.1}, {"token": "y", "logprob": -2.5}]}]}}],
        "usage": {"prompt_tokens": 10 + i, "completion_tokens": 5, "total_tokens": 15 + i},
    }
    return json.dumps({"request": req, "response": resp, "task": "intent", **extra})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(*args: str):
    return runner.invoke(app, list(args))


def test_openai_chat_line_becomes_a_full_trace(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [chat_line(1, latency_ms=812.5, cost=0.002)])
    [trace] = read_jsonl(f, "openai-chat").traces
    assert trace.model == "gpt-teacher-2026"
    assert trace.request.params == {"model": "gpt-teacher", "temperature": 0.2}
    assert trace.request.tool_names() == ["lookup"]
    assert trace.response.tool_calls[0].function.parsed_arguments() == {"q": 1}
    assert trace.usage.total_tokens == 16
    assert trace.teacher_logprobs[0].top_logprobs[1].token == "y"
    assert (trace.task, trace.latency_ms, trace.cost) == ("intent", 812.5, 0.002)
    # the id is derived from the content: the same line gives the same id
    assert read_jsonl(f, "openai-chat").traces[0].id == trace.id


def test_broken_fourth_line_stores_nothing_then_skip_invalid_stores_three(workspace, tmp_path: Path) -> None:
    f = write(tmp_path / "calls.jsonl", [chat_line(1), chat_line(2), chat_line(3), '{"request": {"messages": [}'])
    ws = ["-w", str(workspace.root)]

    result = run("ingest", str(f), "--no-redact", *ws)
    assert result.exit_code == 1
    assert f"{f}:4" in result.output and "not valid JSON" in result.output
    assert "Nothing was imported" in result.output
    assert workspace.store().count() == 0

    result = run("ingest", str(f), "--skip-invalid", "--no-redact", *ws)
    assert result.exit_code == 1
    assert "stored 3 new trace(s)" in result.output and "1 rejected" in result.output
    assert f"{f}:4" in result.output
    assert workspace.store().count() == 3

    result = run("ingest", str(f), "--skip-invalid", "--no-redact", *ws)
    assert "stored 0 new trace(s), 3 already present" in result.output
    assert workspace.store().count() == 3


def test_a_line_of_bad_bytes_or_deep_nesting_is_rejected_by_line_and_the_valid_lines_kept(workspace,
                                                                                         tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + chat_line(1).encode() + b"\n"  # a byte-order mark on line 1
                  + chat_line(2).replace("query 2", "caf\u00e9").encode("latin-1") + b"\n"  # not UTF-8
                  + b'{"request": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"  # too deep for json
                  + chat_line(4).encode() + b"\n")
    result = read_jsonl(f, "openai-chat")
    assert [t.request.last_user_message() for t in result.traces] == ["query 1", "query 4"] and result.lines == 4
    utf8, deep = result.errors
    assert utf8.location == f"{f}:2" and "not valid UTF-8: byte 0xe9" in utf8.message
    assert deep.location == f"{f}:3" and "nested too deep" in deep.message
    res = run("ingest", str(f), "--skip-invalid", "--no-redact", "-w", str(workspace.root))
    assert "stored 2 new trace(s)" in res.output and f"{f}:2" in res.output and "Traceback" not in res.output


def test_schema_error_names_line_and_field(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [chat_line(1), json.dumps({"request": {"messages": [{"role": "wizard", "content": "x"}]},
                                                             "response": {"choices": [{"message": {"role": "assistant", "content": "y"}}]}})])
    result = read_jsonl(f, "openai-chat")
    assert len(result.traces) == 1
    [err] = result.errors
    assert err.location == f"{f}:2"
    assert "request.messages.0.role" in err.message and "wizard" in err.message


def test_openai_ft_and_aad_exports_round_trip(workspace, tmp_path: Path) -> None:
    ws = ["-w", str(workspace.root)]
    ft = write(tmp_path / "ft.jsonl", [json.dumps({"messages": [
        {"role": "system", "content": "Answer with the intent."},
        {"role": "user", "content": f"my card is lost {i}"},
        {"role": "assistant", "content": "lost_or_stolen_card"}]}) for i in range(5)])
    assert run("ingest", str(ft), "--format", "openai-ft", "--no-redact", *ws).exit_code == 0
    assert run("ingest", str(tmp_path / "missing.jsonl"), *ws).exit_code == 1

    out_aad, out_ft = tmp_path / "out.aad.jsonl", tmp_path / "out.ft.jsonl"
    assert run("traces", "export", str(out_aad), "--format", "aad", *ws).exit_code == 0
    assert run("traces", "export", str(out_ft), "--format", "openai-ft", *ws).exit_code == 0
    original = {t.id: t for t in workspace.store().iter_traces()}

    # aad format: identical traces; re-import into the same workspace adds nothing.
    assert [t.id for t in read_jsonl(out_aad, "aad").traces] == list(original)
    assert all(original[t.id] == t for t in read_jsonl(out_aad, "aad").traces)
    assert "stored 0 new" in run("ingest", str(out_aad), "--format", "aad", "--no-redact", *ws).output
    # openai-ft export is the same messages again.
    again = read_jsonl(out_ft, "openai-ft").traces
    assert [t.request.messages for t in again] == [t.request.messages for t in original.values()]
    assert [t.answer_text() for t in again] == ["lost_or_stolen_card"] * 5


def test_traces_stats_json(workspace, tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [chat_line(i) for i in range(3)])
    ws = ["-w", str(workspace.root)]
    run("ingest", str(f), "--no-redact", *ws)
    result = run("traces", "stats", "--json", *ws)
    assert result.exit_code == 0
    stats = json.loads(result.stdout)
    assert stats["traces"] == 3
    assert stats["by_task"] == {"intent": 3}
    assert stats["by_model"] == {"gpt-teacher-2026": 3}
    assert stats["tokens"]["prompt"] == 10 + 11 + 12


def test_unknown_format_and_missing_workspace_are_clear(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AAD_WORKSPACE", raising=False)
    result = run("traces", "stats")
    assert result.exit_code == 1
    assert "No aad workspace" in result.output and "aad init" in result.output
    result = run("ingest", "x.jsonl", "--format", "csv")
    assert result.exit_code == 1 and "must be one of openai-chat, openai-ft, aad" in result.output
