"""Output validators, the tool-call parser and threshold maths of the router."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aad_core.formats.answers import answer_pairs
from aad_core.formats.fences import fenced_body, strip_fence
from aad_core.formats.json_answers import is_json
from aad_core.formats.kinds import output_kind_of
from aad_core.formats.labels import is_label
from aad_core.formats.sql import is_sql
from aad_core.formats.tool_calls import ToolCallParseError, parse_tool_calls, render_tool_calls
from aad_core.formats.validators import (infer_output_kind, validate_json, validate_output, validate_sql,
                                         validate_tool_calls)
from aad_core.models.chat_format import tool_call_text
from aad_core.pipeline.calibrate import routing_confusion, separation_threshold
from aad_core.pipeline.evaluate.choose import EVALUATOR_FOR_KIND, choose_evaluator
from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Trace
from aad_core.workspace import Workspace
from tests.conftest import make_trace

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}


def _call(name: str, args: dict | str) -> ToolCall:
    return ToolCall(id="c1", function=FunctionCall(name=name, arguments=args if isinstance(args, str) else json.dumps(args)))


def test_json_must_parse_and_fit_its_schema() -> None:
    schema = {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]}
    assert validate_json('{"intent": "card_arrival"}', schema).ok
    assert validate_json('```json\n{"intent": "x"}\n```', schema).ok
    bad = validate_json('{"intent": "x"', schema)
    assert not bad.ok and "invalid JSON" in bad.reason
    wrong = validate_json('{"label": "x"}', schema)
    assert not wrong.ok and "'intent' is a required property" in wrong.reason


def test_sql_must_parse() -> None:
    assert validate_sql("SELECT name FROM users WHERE age > 30 ORDER BY name;").ok
    assert validate_sql("```sql\nselect count(*) from t\n```").ok
    assert not validate_sql("SELECT name FROM users WHERE").ok
    assert not validate_sql("The answer is 42.").ok
    assert not validate_sql("").ok


def test_tool_calls_must_name_a_bound_tool_with_fitting_arguments() -> None:
    assert validate_tool_calls([_call("get_weather", {"city": "Paris", "days": 2})], [WEATHER]).ok
    unbound = validate_tool_calls([_call("send_money", {"to": "x"})], [WEATHER])
    assert not unbound.ok and "not bound" in unbound.reason and "get_weather" in unbound.reason
    missing = validate_tool_calls([_call("get_weather", {"days": 2})], [WEATHER])
    assert not missing.ok and "city" in missing.reason
    wrong_type = validate_tool_calls([_call("get_weather", {"city": "Paris", "days": "two"})], [WEATHER])
    assert not wrong_type.ok
    assert not validate_tool_calls([_call("get_weather", "{not json")], [WEATHER]).ok


def test_parser_reads_what_the_chat_template_renders() -> None:
    msg = Message(role="assistant", content=None, tool_calls=[_call("get_weather", {"city": "Oslo"})])
    content, calls = parse_tool_calls(tool_call_text(msg))
    assert content == "" and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].function.parsed_arguments() == {"city": "Oslo"}
    # Round trip through our own renderer, a bare JSON call, and plain text.
    assert parse_tool_calls(render_tool_calls(calls))[1][0].function.parsed_arguments() == {"city": "Oslo"}
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Rome"}}')[1][0].function.name == "get_weather"
    assert parse_tool_calls("It is sunny.") == ("It is sunny.", [])
    assert parse_tool_calls('{"city": "Rome"}') == ('{"city": "Rome"}', [])
    with pytest.raises(ToolCallParseError):
        parse_tool_calls("<tool_call>{broken</tool_call>")


def test_parser_reads_fenced_and_openai_shaped_bare_calls() -> None:
    fenced = '```json\n[{"name": "get_weather", "arguments": {"city": "Oslo"}}]\n```'
    assert parse_tool_calls(fenced)[0] == "" and parse_tool_calls(fenced)[1][0].function.name == "get_weather"
    openai = json.dumps({"tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]})
    assert parse_tool_calls(openai)[1][0].function.parsed_arguments() == {"city": "Rome"}
    prose = 'Sure: {"name": "get_weather", "arguments": {}}'  # a call inside prose is text, not a call
    assert parse_tool_calls(prose) == (prose, [])
    with pytest.raises(ToolCallParseError):
        parse_tool_calls('{"name": "get_weather", "arguments": "city=Oslo"}')


def test_validate_output_picks_checks_from_request_and_cluster_kind() -> None:
    plain = ChatRequest(messages=[Message(role="user", content="hi")])
    assert validate_output(plain, "hello", []).ok
    assert not validate_output(plain, "   ", []).ok
    as_json = ChatRequest(messages=plain.messages, params={"response_format": {"type": "json_object"}})
    assert not validate_output(as_json, "not json", []).ok
    assert not validate_output(plain, "not json", [], output_kind="json").ok
    assert not validate_output(plain, "SELECT FROM WHERE", [], output_kind="sql").ok
    tools = ChatRequest(messages=plain.messages, tools=[WEATHER], params={"tool_choice": "required"})
    assert not validate_output(tools, "I think it is sunny", [], output_kind="tool_calls").ok
    assert validate_output(tools, "", [_call("get_weather", {"city": "Oslo"})], output_kind="tool_calls").ok


def test_output_kind_is_inferred_from_the_teacher_answers() -> None:
    assert infer_output_kind([('{"a": 1}', False)] * 10) == "json"
    assert infer_output_kind([("SELECT a FROM b", False)] * 10) == "sql"
    assert infer_output_kind([("", True)] * 10) == "tool_calls"
    assert infer_output_kind([("card_arrival", False)] * 10) == "label"  # "text" under the old 90 % rule
    assert infer_output_kind([('{"a": 1}', False)] * 5 + [("hello", False)] * 5) == "structured"  # "text" before
    assert infer_output_kind([]) == "text"


# -- one rule: the parity gate's evaluator and the router's output kind ---------------------------

def _answers(*, calls: int = 0, json_: int = 0, sql: int = 0, labels: int = 0, short: int = 0, prose: int = 0
             ) -> list[Trace]:
    """Teacher traces with these numbers of answers of each form."""
    texts = ([json.dumps({"id": i, "ok": True}) for i in range(json_)]
             + [f"SELECT name FROM users WHERE id = {i};" for i in range(sql)]
             + [("card_arrival", "card_linking", "exchange_rate")[i % 3] for i in range(labels)]
             + [f"answer {i}" for i in range(short)]
             + [f"Thanks for writing. Ticket {i} went to the billing team, who reply within two days."
                for i in range(prose)])
    out = [make_trace(f"q{i}", text) for i, text in enumerate(texts)]
    for i in range(calls):
        msg = Message(role="assistant", tool_calls=[_call("get_weather", {"city": f"c{i}"})])
        out.append(Trace(request=ChatRequest(messages=[Message(role="user", content=f"w{i}")], tools=[WEATHER]),
                         response=msg))
    return out


@pytest.mark.parametrize(
    ("counts", "kind", "evaluator"),
    [
        ({"calls": 5, "prose": 5}, "tool_calls", "tool-calls"),  # 50 % calls: the router said "text" before
        ({"calls": 3, "prose": 7}, "tool_calls", "tool-calls"),  # 30 %: the threshold itself
        ({"calls": 2, "prose": 8}, "text", "semantic"),
        ({"json_": 17, "prose": 3}, "json", "json"),  # 85 % JSON: the router said "text" before
        ({"json_": 15, "prose": 5}, "text", "semantic"),  # 75 %
        ({"sql": 17, "prose": 3}, "sql", "sql"),  # 85 % SQL: the router said "text" before
        ({"labels": 12}, "label", "classification"),  # the router said "text" before
        ({"labels": 19, "prose": 1}, "label", "classification"),
        ({"labels": 5, "json_": 5}, "structured", "exact"),
        ({"short": 10}, "structured", "exact"),  # short answers that never repeat: not a label set
        ({"prose": 6}, "text", "semantic"),
        ({}, "text", "semantic"),
    ],
)
def test_the_gate_and_the_router_read_the_same_kind(counts: dict[str, int], kind: str, evaluator: str) -> None:
    traces = _answers(**counts)
    assert choose_evaluator(traces) == evaluator
    assert output_kind_of(traces) == kind
    assert infer_output_kind(answer_pairs(traces)) == kind  # the router's name for the same rule
    assert EVALUATOR_FOR_KIND[kind] == evaluator


def test_calibration_stores_the_kind_the_evaluator_is_chosen_by(workspace: Workspace) -> None:
    from _fake_embedder import register_fake_embedder
    from aad_core.pipeline.calibrate import calibrate_router
    from aad_core.pipeline.cluster import load_clusters, run_cluster

    register_fake_embedder()
    config = workspace.config_path.read_text().replace('embedder = "minilm"', 'embedder = "fake"')
    workspace.config_path.write_text(config)
    ws = Workspace(workspace.root)
    topics = {"calls": ("You run the weather tools.", "rain sunny forecast tomorrow wind snow".split()),
              "json": ("You extract orders as JSON.", "order parcel invoice shipped refund item".split()),
              "label": ("You classify bank messages.", "card pin transfer balance atm fee".split())}
    shapes = {"calls": {"calls": 20, "prose": 20}, "json": {"json_": 34, "prose": 6}, "label": {"labels": 40}}
    traces = []
    for topic, (system, words) in topics.items():
        for i, t in enumerate(_answers(**shapes[topic])):
            t.task = topic
            user = " ".join(words[j % 6] for j in range(i, i + 3)) + f" {i}"
            t.request.messages[:] = [Message(role="system", content=system), Message(role="user", content=user)]
            traces.append(t)
    with ws.store() as store:
        store.add(traces)
    run_cluster(ws, k=3, show_progress=False)
    state = load_clusters(ws)
    router = calibrate_router(ws, show_progress=False, confidence=False)
    by_id = {t.id: t for t in traces}
    kinds = set()
    for cluster in state.clusters:
        sample = [by_id[t] for t, c in state.assignments.items() if c == cluster.id and state.split.get(t) == "train"]
        kind = router["clusters"][str(cluster.id)]["output_kind"]
        assert EVALUATOR_FOR_KIND[kind] == choose_evaluator(sample)
        kinds.add(kind)
    assert kinds == {"tool_calls", "json", "label"}  # the old router rule said "text" for all three


def test_a_label_cluster_gets_a_label() -> None:
    plain = ChatRequest(messages=[Message(role="user", content="hi")])
    assert validate_output(plain, "card_arrival", [], output_kind="label").ok
    long = validate_output(plain, "I think the customer asks when the new card will arrive.", [], output_kind="label")
    assert not long.ok and long.check == "label" and "not a label" in long.reason
    assert not validate_output(plain, '{"intent": "card_arrival"}', [], output_kind="label").ok
    assert not validate_output(plain, "SELECT 1", [], output_kind="label").ok
    assert validate_output(plain, "A sentence of free text, any length.", [], output_kind="structured").ok


def test_fences_are_read_by_one_pattern() -> None:
    assert strip_fence("```json\n{\"a\": 1}\n```") == '{"a": 1}'
    assert strip_fence("```sql SELECT 1```") == "SELECT 1"
    assert strip_fence("```SELECT 1```") == "SELECT 1"
    assert strip_fence("Here: ```\nSELECT 1\n```") == "Here: ```\nSELECT 1\n```"  # not the whole answer
    assert fenced_body("Here: ```sql\nSELECT 1\n``` done") == "SELECT 1"
    assert is_json("```json\n[1, 2]\n```") and not is_json("42")
    assert is_sql("```sql\nSELECT a FROM b;\n```") and not is_sql("SELECT 1; SELECT 2") and not is_sql("Select one.")
    assert is_label("card_arrival") and not is_label("```sql\nSELECT 1\n```") and not is_label("[1]")


def test_each_format_rule_is_written_once() -> None:
    root = Path(__file__).resolve().parents[1]
    sources = [p for folder in ("aad_core", "plugins", "integrations") for p in (root / folder).rglob("*.py")]

    def defined_in(pattern: str) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in sources
                      if re.search(pattern, p.read_text(encoding="utf-8"), re.MULTILINE))

    assert defined_in(r"^def parse_tool_calls\b") == ["aad_core/formats/tool_calls.py"]
    assert defined_in(r"re\.compile\(.*```") == ["aad_core/formats/fences.py"]
    assert defined_in(r"re\.compile\(.*select\|with") == ["aad_core/formats/sql.py"]
    assert defined_in(r"^def (output_kind|is_json|is_sql|is_label)\b") == [
        "aad_core/formats/json_answers.py", "aad_core/formats/kinds.py", "aad_core/formats/labels.py",
        "aad_core/formats/sql.py"]


def test_separation_threshold_keeps_intruders_out() -> None:
    own = [0.80, 0.85, 0.90, 0.95]
    t = separation_threshold(own, [0.30, 0.50])
    assert 0.5 < t <= 0.8
    t2 = separation_threshold([0.6, *own], [0.3, 0.5, 0.75])  # one intruder above the weakest member
    assert sum(s < t2 for s in [0.6, *own]) + sum(s >= t2 for s in [0.3, 0.5, 0.75]) == 1
    assert separation_threshold(own, []) is None


def test_routing_confusion_counts_wrong_specialists_as_errors() -> None:
    import numpy as np

    cents = np.eye(3, dtype=np.float32)
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.2, 0.95]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    truth = [0, 1, 1, 2, 2]  # the second request belongs to cluster 1 but sits next to cluster 0
    out = routing_confusion(emb, truth, cents, [0, 1, 2], {0: 0.9, 1: 0.9, 2: 0.9}, {0: "a", 1: "b"})
    assert out["matrix"] == [[3, 0], [0, 2]]
    assert out["wrong_specialist"] == 1
    assert out["accuracy"] == pytest.approx(4 / 5)
