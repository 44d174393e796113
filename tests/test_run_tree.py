"""The run tree (issue 15): first-class session and user ids (captured, ingested, redacted, filtered on by
both stores) and ``aad traces show ID --tree``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from typer.testing import CliRunner

from aad_core.capture.convert import identity_from
from aad_core.capture.ingest import read_jsonl
from aad_core.cli import app
from aad_core.schema import MAX_IDENTITY_CHARS, ROOT_RUN_METADATA_KEY, RUN_PATH_METADATA_KEY, Trace
from aad_core.store.base import TraceFilter
from aad_core.traces import build_run_tree
from aad_core.workspace import Workspace
from conftest import make_trace

runner = CliRunner()
EMAIL = "alice@example.com"


def dot_aad_bytes(ws: Workspace) -> bytes:
    return b"".join(p.read_bytes() for p in ws.data_dir.rglob("*") if p.is_file())


# -- the Trace fields ----------------------------------------------------------------------------

def test_session_and_user_ids_are_validated() -> None:
    t = Trace.model_validate({"request": {"messages": []}, "session_id": " s-1 ", "user_id": 42})
    assert (t.session_id, t.user_id) == ("s-1", "42")
    assert Trace.model_validate({"request": {"messages": []}, "session_id": "  "}).session_id is None
    with pytest.raises(ValueError, match="user_id must not contain control characters"):
        Trace.model_validate({"request": {"messages": []}, "user_id": "bob\x00"})
    with pytest.raises(ValueError, match=f"session_id must be at most {MAX_IDENTITY_CHARS} characters"):
        Trace.model_validate({"request": {"messages": []}, "session_id": "x" * (MAX_IDENTITY_CHARS + 1)})
    with pytest.raises(ValueError, match="user_id must be a string"):
        Trace.model_validate({"request": {"messages": []}, "user_id": {"id": 1}})
    # Capture never fails on a bad id in metadata: it is skipped, the next key (or source) is used.
    assert identity_from({"session_id": "a\x07b", "thread_id": "t-1"}, {"user_id": "u-2"}) == ("t-1", "u-2")
    assert identity_from(None, {"conversation_id": 7}) == ("7", None)


# -- LangChain -------------------------------------------------------------------------------------

lc = pytest.importorskip("langchain_core")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402

from aad_langchain import AADCallbackHandler  # noqa: E402


def two_call_pipeline() -> Any:
    model = GenericFakeChatModel(messages=iter([AIMessage("Your card ships today."), AIMessage("It ships today.")]))
    ask = ChatPromptTemplate.from_messages([("human", "{q}")])
    follow = ChatPromptTemplate.from_messages([("human", "Shorten: {text}")])
    return ask | model | StrOutputParser() | RunnableLambda(lambda text: {"text": text}) | follow | model


def test_a_pipeline_records_session_user_and_root_and_prints_its_tree(workspace: Workspace) -> None:
    handler = AADCallbackHandler(workspace=workspace)  # redaction on (the default)
    two_call_pipeline().invoke({"q": "When does my card arrive?"}, config={
        "callbacks": [handler], "metadata": {"session_id": "s-1", "user_id": EMAIL}})
    assert handler.flush(60) and handler.stats()["handler_errors"] == 0
    traces = sorted(handler.writer.store.iter_traces(), key=lambda t: t.created_at)
    handler.close()
    assert len(traces) == 2
    assert [t.session_id for t in traces] == ["s-1", "s-1"]
    assert all(t.user_id and t.user_id.startswith("<EMAIL_ADDRESS") for t in traces)  # stored redacted
    roots = {t.metadata[ROOT_RUN_METADATA_KEY] for t in traces}
    assert len(roots) == 1
    (root,) = roots
    assert all(t.metadata[RUN_PATH_METADATA_KEY][0]["run_id"] == root for t in traces)
    assert EMAIL.encode() not in dot_aad_bytes(workspace)  # not in the store file, its WAL, or anywhere else

    result = runner.invoke(app, ["traces", "show", traces[1].id, "--tree", "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"root {root}: 2 recorded call(s), session s-1")
    assert lines[1] == f"RunnableSequence  {root}"  # the root run, not indented
    calls = [line for line in lines if "call " in line]
    assert len(calls) == 2 and all(line.startswith("  ") for line in calls)  # both calls under the root
    assert [t.id for t in traces] == [line.split("call ")[1].split()[0] for line in calls]
    assert all("session=s-1" in line and "user=<EMAIL_ADDRESS" in line and " ok " in line and " ms" in line
               for line in calls)
    assert calls[1].endswith("<- this trace") and EMAIL not in result.output

    as_json = json.loads(runner.invoke(app, ["traces", "show", traces[0].id, "--tree", "--json", "-w",
                                             str(workspace.root)]).output)
    assert as_json["root_run_id"] == root and as_json["calls"] == 2
    assert [c["trace"]["id"] for c in as_json["tree"]["children"]] == [t.id for t in traces]

    listed = runner.invoke(app, ["traces", "list", "--session", "s-1", "-w", str(workspace.root)])
    assert listed.exit_code == 0 and "2 trace(s)" in listed.output and "s-1" in listed.output
    assert "0 trace(s)" in runner.invoke(app, ["traces", "list", "--session", "s-2", "-w", str(workspace.root)]).output
    shown = runner.invoke(app, ["traces", "show", traces[0].id, "-w", str(workspace.root)])
    assert shown.exit_code == 0 and "session: s-1" in shown.output and f"root run: {root}" in shown.output
    missing = runner.invoke(app, ["traces", "show", "nope", "--tree", "-w", str(workspace.root)])
    assert missing.exit_code == 1 and "No recorded trace has the id 'nope'" in missing.output


def test_ids_come_from_the_nearest_run_that_names_them(workspace: Workspace) -> None:
    """A call's own metadata wins; else an enclosing chain run's (the handler keeps open runs' metadata)."""
    handler = AADCallbackHandler(workspace=workspace, redact=False)
    chain, call = uuid4(), uuid4()
    handler.on_chain_start({"name": "agent"}, {}, run_id=chain, metadata={"thread_id": "t-9", "user_id": "u-1"})
    handler.on_chat_model_start({}, [[]], run_id=call, parent_run_id=chain, metadata={"user_id": "u-2"},
                                invocation_params={"model": "m"})
    from langchain_core.outputs import ChatGeneration, LLMResult

    handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=AIMessage("ok"))]]), run_id=call)
    handler.on_chain_end({}, run_id=chain)
    # a lone call: its session from conversation_id, no user
    GenericFakeChatModel(messages=iter([AIMessage("hi")])).invoke(
        "hello", config={"callbacks": [handler], "metadata": {"conversation_id": "c-3"}})
    assert handler.flush(10)
    first, second = sorted(handler.writer.store.iter_traces(), key=lambda t: t.created_at)
    handler.close()
    assert (first.session_id, first.user_id) == ("t-9", "u-2")
    assert (second.session_id, second.user_id) == ("c-3", None)
    assert handler._parents == {} and handler._run_metadata == {}


# -- LlamaIndex ------------------------------------------------------------------------------------

def test_llamaindex_takes_ids_from_instrument_tags(workspace: Workspace) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.instrumentation.dispatcher import instrument_tags
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    from aad_llamaindex import attach, detach

    class Teacher(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="teacher")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            return CompletionResponse(text="42")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            yield CompletionResponse(text="42", delta="42")

    handler = attach(workspace=workspace, redact=False)
    try:
        with instrument_tags({"session_id": "s-li", "user_id": "u-li"}):
            Teacher().complete("The answer?")
        Teacher().complete("Again?")
        assert handler.flush(10)
        tagged, plain = sorted(handler.writer.store.iter_traces(), key=lambda t: t.created_at)
    finally:
        detach(handler)
    assert (tagged.session_id, tagged.user_id) == ("s-li", "u-li")
    assert (plain.session_id, plain.user_id) == (None, None)


# -- ingest ----------------------------------------------------------------------------------------

def chat_record(**extra: Any) -> dict[str, Any]:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], **extra.pop("req", {})}
    return {"request": request, "response": {"choices": [{"message": {"role": "assistant", "content": "Hello!"}}]},
            **extra}


def test_ingest_reads_session_id_and_openai_user(workspace: Workspace, tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    lines = [chat_record(session_id="s-7", req={"user": EMAIL}),
             chat_record(session_id="s-8", user_id="u-8", req={"user": "ignored", "temperature": 0}),
             {"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}],
              "session_id": "s-9", "user_id": 9}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    parsed = read_jsonl(path, "openai-chat")
    assert not parsed.errors
    (t,) = [t for t in parsed.traces if t.session_id == "s-7"]
    assert t.user_id == EMAIL and t.request.params["user"] == EMAIL  # the parameter stays a parameter
    assert [(t.session_id, t.user_id) for t in parsed.traces][1] == ("s-8", "u-8")  # an explicit user_id wins
    ft = tmp_path / "ft.jsonl"
    ft.write_text(json.dumps(lines[2]) + "\n")
    (ft_trace,) = read_jsonl(ft, "openai-ft").traces
    assert (ft_trace.session_id, ft_trace.user_id) == ("s-9", "9")

    result = runner.invoke(app, ["ingest", str(path), "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    with workspace.store() as store:
        (stored,) = list(store.iter_traces(session_id="s-7"))
    assert stored.user_id.startswith("<EMAIL_ADDRESS") and EMAIL.encode() not in dot_aad_bytes(workspace)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_record(session_id="a\x01b")) + "\n")
    (err,) = read_jsonl(bad, "openai-chat").errors
    assert f"{bad}:1" in str(err) and "session_id" in str(err) and "control characters" in str(err)


def test_otel_spans_give_openinference_session_ids() -> None:
    from aad_core.capture.otel import read_otlp_json

    first = read_otlp_json(Path(__file__).parent / "data" / "otlp_openinference.json").traces[0]
    assert first.session_id == "s-1" and first.metadata["session.id"] == "s-1"


# -- the stores' filters -----------------------------------------------------------------------------

def test_stores_filter_on_session_user_and_root(store: Any) -> None:
    traces = [make_trace(f"q{i}", f"a{i}", task="intent" if i % 2 else "sql", session_id=f"s-{i % 3}",
                         user_id="bob" if i < 4 else None, metadata={ROOT_RUN_METADATA_KEY: f"r-{i // 2}"})
              for i in range(8)]
    store.add(traces)

    def ids(**kw: Any) -> list[str]:
        return [t.id for t in store.iter_traces(**kw)]

    assert ids(session_id="s-1") == [traces[i].id for i in (1, 4, 7)]
    assert ids(user_id="bob") == [t.id for t in traces[:4]]
    assert ids(session_id="s-1", user_id="bob") == [traces[1].id]
    assert ids(session_id="s-0", task="sql", limit=1) == [traces[0].id]
    assert ids(root_run_id="r-2") == [traces[4].id, traces[5].id]
    assert ids(session_id="s-1", where={"model": "teacher-model"}) == ids(session_id="s-1")
    assert ids(session_id="'; DROP TABLE traces; --") == []
    assert store.get(traces[0].id).session_id == "s-0"
    flt = TraceFilter.of(session_id="s-1", user_id="bob")
    assert [t.id for t in traces if flt.matches(t)] == [traces[1].id]  # spool files: the same rule
    with pytest.raises(ValueError, match="'user_id' filter must be a non-empty string"):
        ids(user_id="")


def test_tree_of_calls_without_a_recorded_root_and_of_nested_chains() -> None:
    lone = make_trace("q", "a", run_id="run-1")
    tree = build_run_tree("run-1", [lone])
    assert tree.root.trace is lone and tree.root.children == []
    path = [{"run_id": "root", "name": "Agent"}, {"run_id": "tool", "name": "lookup"}]
    a = make_trace("q1", "a1", run_id="c1", metadata={ROOT_RUN_METADATA_KEY: "root", RUN_PATH_METADATA_KEY: path[:1]})
    b = make_trace("q2", "a2", run_id="c2", metadata={ROOT_RUN_METADATA_KEY: "root", RUN_PATH_METADATA_KEY: path})
    tree = build_run_tree("root", [b, a])
    assert tree.root.name == "Agent" and [t.id for t in tree.traces] == [a.id, b.id]
    first, tool = tree.root.children
    assert first.trace is a and tool.name == "lookup" and tool.children[0].trace is b
