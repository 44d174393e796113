"""Output validators, the tool-call parser and threshold maths of the router."""

from __future__ import annotations

import json

import pytest

from aad_core.models.chat_format import tool_call_text
from aad_core.pipeline.calibrate import routing_confusion, separation_threshold
from aad_core.formats.tool_calls import ToolCallParseError, parse_tool_calls, render_tool_calls
from aad_core.formats.validators import (infer_output_kind, validate_json, validate_output, validate_sql,
                                         validate_tool_calls)
from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall

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
    assert infer_output_kind([("card_arrival", False)] * 10) == "text"
    assert infer_output_kind([('{"a": 1}', False)] * 5 + [("hello", False)] * 5) == "text"


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
