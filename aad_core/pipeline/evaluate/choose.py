"""Which evaluator fits a cluster: chosen from its traces, or set in ``[eval]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aad_core.formats.kinds import OutputKind, output_kind_of

if TYPE_CHECKING:
    from aad_core.config import AADSettings
    from aad_core.schema import Cluster, Trace

#: The evaluator that scores each output kind (the rule is :mod:`aad_core.formats.kinds`, which
#: the router's calibration and validators use too).
EVALUATOR_FOR_KIND: dict[OutputKind, str] = {
    "tool_calls": "tool-calls",
    "json": "json",
    "sql": "sql",
    "label": "classification",
    "structured": "exact",
    "text": "semantic",
}


def choose_evaluator(traces: Sequence[Trace]) -> str:
    """The evaluator name that fits these traces' answers: the one for their output kind.

    tool calls in at least 30 % of answers -> ``tool-calls``; >= 80 % JSON objects/arrays ->
    ``json``; >= 80 % SQL statements that sqlglot parses -> ``sql``; >= 90 % short one-line
    answers (<= 5 words) drawn from a small label set (distinct labels <= 60 % of the answers)
    -> ``classification``; >= 90 % of such structured answers mixed (labels, JSON, SQL) ->
    ``exact``; otherwise ``semantic``. See :mod:`aad_core.formats.kinds`.
    """
    return EVALUATOR_FOR_KIND[output_kind_of(traces)]


def evaluator_name_for(config: AADSettings, cluster: Cluster, traces: Sequence[Trace]) -> tuple[str, str]:
    """(evaluator name, why): ``[eval] cluster_evaluators`` by cluster id or task tag, then
    ``[eval] evaluator`` unless it is 'auto', then the evaluator for the task's output kind as the
    cluster stage found it on its training split (``cluster.answer_kind``), else :func:`choose_evaluator`
    on ``traces``. The training split decides when it can: a label task with many labels looks like
    free text on a few held-out calls (77 Banking77 intents over 88 calls are 68 % distinct)."""
    overrides = config.eval.cluster_evaluators
    for key in (str(cluster.id), cluster.task, cluster.label):
        if key is not None and key in overrides:
            return overrides[key], f"config [eval] cluster_evaluators[{key!r}]"
    if config.eval.evaluator != "auto":
        return config.eval.evaluator, "config [eval] evaluator"
    kind = getattr(cluster, "answer_kind", None)
    if kind in EVALUATOR_FOR_KIND:
        return EVALUATOR_FOR_KIND[kind], f"chosen automatically: the task's answers are of kind {kind!r}"
    return choose_evaluator(traces), "chosen automatically from the answers"
