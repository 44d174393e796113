"""Output validators: a specialist answer that fails one is never returned; the teacher answers.

- JSON must parse, and match the JSON schema when one is known (``response_format``).
- SQL must parse (sqlglot).
- Tool calls must name a tool the request bound, with arguments that fit its JSON schema.
- A label must be a label (one short line, not JSON or SQL).

Which checks apply comes from the request (``response_format``, bound tools) and from the
cluster's calibrated ``output_kind``, the kind :func:`aad_core.formats.kinds.output_kind` gives its
teacher answers (the same kind that picked the parity gate's evaluator).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aad_core.formats import kinds
from aad_core.formats.fences import strip_fence
from aad_core.formats.kinds import OUTPUT_KINDS, OutputKind
from aad_core.formats.labels import is_label
from aad_core.formats.sql import SQL_START, parse_sql
from aad_core.schema import ChatRequest, ToolCall

__all__ = [
    "OUTPUT_KINDS", "ValidationResult", "infer_output_kind", "response_schema", "strip_fence", "validate_json",
    "validate_label", "validate_output", "validate_sql", "validate_tool_calls",
]


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    #: Which check ran ("json", "sql", "tool_calls", "label", "text", "none") and, on failure, why.
    check: str = "none"
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _schema_errors(instance: Any, schema: dict[str, Any]) -> str | None:
    import jsonschema

    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"at {where}: {err.message}"
    except jsonschema.SchemaError:  # a broken schema is the caller's problem, not the answer's
        return None
    return None


def validate_json(text: str, schema: dict[str, Any] | None = None) -> ValidationResult:
    """``text`` parses as JSON (inside a code fence is fine) and fits ``schema`` when given."""
    try:
        value = json.loads(strip_fence(text))
    except (json.JSONDecodeError, TypeError) as err:
        return ValidationResult(False, "json", f"invalid JSON: {err}")
    if schema:
        problem = _schema_errors(value, schema)
        if problem:
            return ValidationResult(False, "json", f"JSON does not match the schema {problem}")
    return ValidationResult(True, "json")


def validate_sql(text: str, dialect: str | None = None) -> ValidationResult:
    """``text`` is one or more SQL statements that sqlglot parses."""
    from sqlglot.errors import SqlglotError

    body = strip_fence(text).strip()
    if not body:
        return ValidationResult(False, "sql", "empty SQL")
    if not SQL_START.match(body):
        return ValidationResult(False, "sql", f"not a SQL statement: {body[:40]!r}")
    try:
        statements = parse_sql(body, dialect)
    except SqlglotError as err:
        return ValidationResult(False, "sql", f"SQL does not parse: {str(err).splitlines()[0]}")
    if not statements:
        return ValidationResult(False, "sql", "no SQL statement")
    return ValidationResult(True, "sql")


def validate_label(text: str) -> ValidationResult:
    """``text`` is a label: one line of a few words, neither JSON nor SQL (:func:`aad_core.formats.labels.is_label`)."""
    if is_label(text):
        return ValidationResult(True, "label")
    return ValidationResult(False, "label", f"not a label (one short line, not JSON or SQL): {text.strip()[:40]!r}")


def _tool_schemas(tools: Sequence[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and fn.get("name"):
            out[str(fn["name"])] = fn.get("parameters") or {"type": "object"}
    return out


def validate_tool_calls(calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]] | None) -> ValidationResult:
    """Every call names a bound tool and its arguments fit that tool's JSON schema."""
    schemas = _tool_schemas(tools)
    for call in calls:
        name = call.function.name
        if name not in schemas:
            bound = ", ".join(sorted(schemas)) or "none"
            return ValidationResult(False, "tool_calls", f"tool {name!r} is not bound (bound: {bound})")
        try:
            args = call.function.parsed_arguments()
        except json.JSONDecodeError as err:
            return ValidationResult(False, "tool_calls", f"arguments of {name!r} are not JSON: {err}")
        problem = _schema_errors(args, schemas[name])
        if problem:
            return ValidationResult(False, "tool_calls", f"arguments of {name!r} do not match its schema {problem}")
    return ValidationResult(True, "tool_calls")


def response_schema(request: ChatRequest) -> tuple[bool, dict[str, Any] | None]:
    """(JSON expected, its schema) from the request's OpenAI ``response_format``."""
    fmt = request.params.get("response_format")
    if not isinstance(fmt, dict):
        return False, None
    if fmt.get("type") == "json_object":
        return True, None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        return True, spec.get("schema") if isinstance(spec, dict) else None
    return False, None


def validate_output(
    request: ChatRequest, content: str, tool_calls: Sequence[ToolCall], *, output_kind: str = "text"
) -> ValidationResult:
    """Run every check that applies to this answer: the calls' (when there are any), then the
    request's ``response_format``, then the cluster's ``output_kind`` ("tool_calls" with
    ``tool_choice="required"`` needs a call; "json", "sql", "label" their check; "structured" and
    "text" a non-empty answer)."""
    if tool_calls:
        return validate_tool_calls(tool_calls, request.tools)
    if output_kind == "tool_calls" and request.tools and request.params.get("tool_choice") == "required":
        return ValidationResult(False, "tool_calls", "the request requires a tool call and the answer has none")
    wants_json, schema = response_schema(request)
    if wants_json or output_kind == "json":
        return validate_json(content, schema)
    if output_kind == "sql":
        return validate_sql(content)
    if output_kind == "label":
        return validate_label(content)
    if not content.strip():
        return ValidationResult(False, "text", "empty answer")
    return ValidationResult(True, "none")


def infer_output_kind(answers: Sequence[tuple[str, bool]]) -> OutputKind:
    """The kind of a cluster's teacher answers, (answer string, had tool calls) pairs: one of
    :data:`OUTPUT_KINDS`, by the one rule :func:`aad_core.formats.kinds.output_kind`."""
    return kinds.output_kind(answers)
