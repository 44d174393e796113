"""Which evaluator fits a cluster: chosen from its traces, or set in ``[eval]``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aad_core.formats.answers import answer_string

if TYPE_CHECKING:
    from aad_core.config import AADSettings
    from aad_core.schema import Cluster, Trace

#: Share of answers that must look like JSON / SQL for that evaluator to be chosen.
_MAJORITY = 0.8
_SQL_START = re.compile(r"^\s*(?:```\w*\s*)?(select|with|insert|update|delete|create)\b", re.IGNORECASE)


def _is_json(text: str) -> bool:
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").partition("\n")[2]
    try:
        return isinstance(json.loads(body), (dict, list))
    except (json.JSONDecodeError, ValueError):
        return False


def _is_sql(text: str) -> bool:
    if not _SQL_START.match(text):
        return False
    try:
        import sqlglot
        from sqlglot.errors import SqlglotError
    except ImportError:  # without the eval extra, SQL-looking text still counts
        return True
    body = text.strip().strip("`").removeprefix("sql").strip().rstrip(";")
    try:
        return len([e for e in sqlglot.parse(body, read="sqlite") if e is not None]) == 1
    except SqlglotError:
        return False


def _is_label(text: str) -> bool:
    text = text.strip()
    if text[:1] in "{[" or _SQL_START.match(text):
        return False
    return bool(text) and "\n" not in text and len(text) <= 64 and len(text.split()) <= 5


def choose_evaluator(traces: Sequence[Trace]) -> str:
    """The evaluator name that fits these traces' answers.

    tool calls in at least 30 % of answers -> ``tool-calls``; >= 80 % JSON objects/arrays ->
    ``json``; >= 80 % SQL statements that sqlglot parses -> ``sql``; >= 90 % short one-line
    answers (<= 5 words) drawn from a small label set (distinct labels <= 60 % of the answers)
    -> ``classification``; >= 90 % of such structured answers mixed (labels, JSON, SQL) ->
    ``exact``; otherwise ``semantic``.
    """
    traces = [t for t in traces if t.response is not None]
    if not traces:
        return "semantic"
    n = len(traces)
    with_calls = sum(bool(t.response and t.response.tool_calls) for t in traces)
    if with_calls / n >= 0.3:
        return "tool-calls"
    answers = [answer_string(t) for t in traces]
    if sum(map(_is_json, answers)) / n >= _MAJORITY:
        return "json"
    if sum(map(_is_sql, answers)) / n >= _MAJORITY:
        return "sql"
    labels = [a.strip().lower() for a in answers if _is_label(a)]
    if len(labels) / n >= 0.9 and len(set(labels)) <= max(2, 0.6 * n):
        return "classification"
    structured = sum(_is_json(a) or _is_label(a) or _is_sql(a) for a in answers)
    if structured / n >= 0.9:  # a mix of labels, JSON and SQL: exact match still means something
        return "exact"
    return "semantic"


def evaluator_name_for(config: AADSettings, cluster: Cluster, traces: Sequence[Trace]) -> tuple[str, str]:
    """(evaluator name, why): ``[eval] cluster_evaluators`` by cluster id or task tag, then
    ``[eval] evaluator`` unless it is 'auto', then :func:`choose_evaluator`."""
    overrides = config.eval.cluster_evaluators
    for key in (str(cluster.id), cluster.task, cluster.label):
        if key is not None and key in overrides:
            return overrides[key], f"config [eval] cluster_evaluators[{key!r}]"
    if config.eval.evaluator != "auto":
        return config.eval.evaluator, "config [eval] evaluator"
    return choose_evaluator(traces), "chosen automatically from the answers"


def evaluator_params(name: str, config: AADSettings, root: Any = None) -> dict[str, Any]:
    """Constructor parameters of the built-in evaluators from ``[eval]``; paths relative to ``root``."""
    from pathlib import Path

    def path(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or root is None else Path(root) / q)

    if name == "sql":
        db = config.eval.sql_database
        return {"database": path(db) if db else None, "timeout_s": config.eval.sql_timeout_s}
    if name == "json" and config.eval.json_schema:
        return {"schema": path(config.eval.json_schema)}
    if name == "semantic":
        return {"embedder": config.embed.embedder, "threshold": config.eval.semantic_threshold}
    return {}
