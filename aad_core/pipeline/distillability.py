"""A cheap distillability estimate per task, computed before any training.

The cluster stage orders candidate tasks by it and leaves tasks below ``[cluster] min_estimate`` to
the teacher without training anything; the risk-coverage gate of ``aad eval`` decides for the rest.
Every figure reads the task's recorded calls only (their embeddings and teacher answers):

``nn_agreement``
    Leave-one-out: how often a call's nearest neighbour (cosine, the routing embedding) got the same
    normalised teacher answer. High for closed answer sets (intent labels, a fixed refusal), where
    a lookup already answers, so a classifier will.
``structure_agreement``
    The same, on the answer's *shape* instead of its text: the label; a JSON answer's key set; a
    tool-call answer's number of calls and the positions of the chosen tools among those offered;
    an SQL answer's clauses; a text answer's first word. High when the task's answers follow one
    template.
``copy_rate``
    The share of the answer's words that appear in the request (messages and tool schemas):
    extraction and argument filling copy, open-ended generation invents.
``answer_tokens``
    The mean answer length in tokens (4 characters each): longer answers have more places to go wrong.

``estimate = max(nn_agreement, structure_agreement * copy_rate / (1 + answer_tokens / 100))``.
Measured on the demo workload (benchmarks/served_share.py data): intent labels 0.97, a fixed
"no tool fits" answer 1.00, JSON extraction 0.89, single function calls ~0.6, text-to-SQL over
seven schemas ~0.1, multi-step plans ~0.05.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aad_core.formats.answers import answer_string
from aad_core.formats.json_answers import parse_json_answer
from aad_core.formats.kinds import OutputKind
from aad_core.formats.labels import label_key

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import Trace

__all__ = ["Distillability", "answer_shape", "estimate_distillability"]

#: At most this many calls per task are compared (a seeded sample above it): the figures are shares.
MAX_CALLS = 600
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@\-]{2,}")
_SQL_CLAUSES = ("JOIN", "WHERE", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "DISTINCT", "UNION", "COUNT(", "SUM(",
                "AVG(", "MAX(", "MIN(", "CASE", "SELECT (", "IN (SELECT", "WITH ")
_SQL_WORDS = frozenset("select from where join inner left right outer group order having limit distinct union count sum "
                       "avg max min case when then else end with as and not null desc asc like between".split())


@dataclass(frozen=True)
class Distillability:
    """The estimate and the figures it is made of (see the module's docstring)."""

    estimate: float
    nn_agreement: float
    structure_agreement: float
    copy_rate: float
    answer_tokens: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _normalised(kind: OutputKind, text: str) -> str:
    if kind == "label":
        return label_key(text)
    ok, value = parse_json_answer(text) if kind in ("json", "tool_calls") else (False, None)
    if ok:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return " ".join(text.lower().split())


def answer_shape(kind: OutputKind, trace: Trace) -> str:
    """The shape of ``trace``'s answer for a task of output ``kind`` (see ``structure_agreement``)."""
    text = answer_string(trace)
    if kind == "label":
        return label_key(text)
    if trace.response is not None and trace.response.tool_calls:
        offered = trace.request.tool_names()
        picks = [offered.index(c.function.name) if c.function.name in offered else -1
                 for c in trace.response.tool_calls]
        return "calls:" + ",".join(map(str, sorted(picks)))
    if kind == "tool_calls":
        return "no call"
    if kind in ("json", "structured"):
        ok, value = parse_json_answer(text)
        if ok:
            return "json:" + (",".join(sorted(map(str, value))) if isinstance(value, dict) else type(value).__name__)
    if kind in ("sql", "structured"):
        upper = " ".join(text.upper().split())
        if "SELECT" in upper:
            return "sql:" + ",".join(c for c in _SQL_CLAUSES if c in upper)
    words = text.lower().split()
    return "text:" + (words[0] if words else "")


def _request_text(trace: Trace) -> str:
    parts = [m.text() for m in trace.request.messages]
    if trace.request.tools:
        parts.append(json.dumps(trace.request.tools, ensure_ascii=False))
    return " ".join(parts).lower()


def _copy_rate(trace: Trace) -> float | None:
    words = [w.lower() for w in _WORD.findall(answer_string(trace)) if w.lower() not in _SQL_WORDS]
    if not words:
        return None
    request = _request_text(trace)
    return sum(w in request for w in words) / len(words)


def _loo_agreement(X: np.ndarray, keys: Sequence[str]) -> float:
    """Share of rows whose nearest other row (cosine on unit rows) has the same key."""
    import numpy as np

    if len(keys) < 2:
        return 0.0
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    nearest = np.argmax(S, axis=1)
    return float(np.mean([keys[i] == keys[j] for i, j in enumerate(nearest)]))


def estimate_distillability(traces: Sequence[Trace], X: np.ndarray, kind: OutputKind, *,
                            seed: int = 0) -> Distillability:
    """The estimate for one task: its calls (with answers) and their unit embeddings ``X`` (same order)."""
    import numpy as np

    rows = [i for i, t in enumerate(traces) if t.response is not None]
    if len(rows) > MAX_CALLS:
        rows = sorted(np.random.default_rng(seed).choice(rows, MAX_CALLS, replace=False).tolist())
    if len(rows) < 2:
        return Distillability(0.0, 0.0, 0.0, 0.0, 0.0, len(rows))
    sub = [traces[i] for i in rows]
    Xs = np.asarray(X[rows], dtype=np.float32)
    texts = [answer_string(t) for t in sub]
    nn = _loo_agreement(Xs, [_normalised(kind, s) for s in texts])
    structure = _loo_agreement(Xs, [answer_shape(kind, t) for t in sub])
    copies = [c for c in (_copy_rate(t) for t in sub) if c is not None]
    copy = float(np.mean(copies)) if copies else 1.0  # no words to copy (numbers, punctuation): no penalty
    tokens = float(np.mean([len(s) / 4 for s in texts]))
    estimate = max(nn, structure * copy / (1 + tokens / 100))
    return Distillability(float(estimate), nn, structure, copy, tokens, len(rows))
