"""The one rule for the kind of output a task produces.

The parity gate picks its evaluator from this kind (``aad_core.pipeline.evaluate.choose``), the
router's calibration stores it per cluster and the validators enforce it on every served answer
(``aad_core.formats.validators``), and answer hints apply only to ``label`` clusters
(``aad_core.models.answer_bank``). Each answer is a pair (answer string, had tool calls), the
string as :func:`aad_core.formats.answers.answer_string` writes it (tool calls as a JSON list).

The first rule that holds wins:

=============== ============================================================= ====================
kind            when                                                          evaluator
=============== ============================================================= ====================
``tool_calls``  >= :data:`TOOL_CALL_SHARE` (30 %) of the answers call tools   ``tool-calls``
``json``        >= :data:`JSON_SHARE` (80 %) are JSON objects/arrays          ``json``
``sql``         >= :data:`SQL_SHARE` (80 %) are one SQL statement each        ``sql``
``label``       >= :data:`LABEL_SHARE` (90 %) are labels, and the distinct    ``classification``
                labels are at most :data:`LABEL_SET_SHARE` (60 %) of the
                answers (or 2): a closed label set
``structured``  >= :data:`STRUCTURED_SHARE` (90 %) are labels, JSON or SQL,   ``exact``
                mixed, or labels that do not repeat
``text``        otherwise (free text, or no answers)                          ``semantic``
=============== ============================================================= ====================

Tool calls need only 30 % because a tool-using task often answers in text when no tool fits (the
tool-call evaluator scores "no call" against "no call"); the other kinds need most answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from aad_core.formats.answers import answer_pairs
from aad_core.formats.json_answers import is_json
from aad_core.formats.labels import is_label, label_key
from aad_core.formats.sql import is_sql

if TYPE_CHECKING:
    from aad_core.schema import Trace

OutputKind = Literal["tool_calls", "json", "sql", "label", "structured", "text"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("text", "json", "sql", "tool_calls", "label", "structured")

TOOL_CALL_SHARE = 0.3
JSON_SHARE = 0.8
SQL_SHARE = 0.8
LABEL_SHARE = 0.9
LABEL_SET_SHARE = 0.6
STRUCTURED_SHARE = 0.9


def output_kind(answers: Sequence[tuple[str, bool]]) -> OutputKind:
    """The kind of these answers, (answer string, had tool calls) pairs: see the module's table."""
    n = len(answers)
    if not n:
        return "text"
    if sum(calls for _, calls in answers) / n >= TOOL_CALL_SHARE:
        return "tool_calls"
    texts = [text for text, _ in answers]
    json_flags = [is_json(t) for t in texts]
    if sum(json_flags) / n >= JSON_SHARE:
        return "json"
    sql_flags = [is_sql(t) for t in texts]
    if sum(sql_flags) / n >= SQL_SHARE:
        return "sql"
    label_flags = [is_label(t) for t in texts]
    labels = [label_key(t) for t, is_one in zip(texts, label_flags) if is_one]
    if len(labels) / n >= LABEL_SHARE and len(set(labels)) <= max(2, LABEL_SET_SHARE * n):
        return "label"
    if sum(map(any, zip(json_flags, sql_flags, label_flags))) / n >= STRUCTURED_SHARE:
        return "structured"
    return "text"


def output_kind_of(traces: Sequence[Trace]) -> OutputKind:
    """:func:`output_kind` of the recorded answers of ``traces`` (traces without one are left out)."""
    return output_kind(answer_pairs(traces))
