"""Selectors: which of a cluster's scored training samples the specialist trains on.

* ``top``: the highest scores (the seed paper's top 30 %).
* ``random``: a seeded uniform sample, the baseline every selection should beat.
* ``diverse``: greedy facility location over embeddings plus a score bonus (DELIFT-style), so the
  chosen samples cover the cluster instead of being near-copies of its hardest example.
* ``stratified``: answer-aware. Groups the samples by the teacher's answer (a label, the tools
  called, a JSON answer's keys, a SQL statement's skeleton), gives every group a share of the budget
  in proportion to its size (at least one each while the budget allows), and inside each group
  takes ``diverse``'s mix of high scores and coverage. The student's surprise often depends on the
  answer alone (a rare label is "hard" everywhere), so ``top`` keeps a few answers and drops the
  rest; this selector keeps the answer distribution and spends the score inside each answer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aad_core.errors import param_error
from aad_core.formats.json_answers import parse_json_answer
from aad_core.formats.kinds import output_kind
from aad_core.formats.labels import is_label, label_key
from aad_core.formats.sql import is_sql, sql_text
from aad_core.plugins import Selector, hookimpl

if TYPE_CHECKING:
    import numpy as np


def n_selected(n: int, fraction: float) -> int:
    """``ceil(fraction * n)``, at least one (zero for an empty cluster)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise param_error("fraction", "Selector.select", "a float in (0, 1]", fraction)
    return 0 if n == 0 else max(1, math.ceil(fraction * n - 1e-9))


def _check(ids: Sequence[str], scores: Sequence[float], owner: str) -> None:
    if len(ids) != len(scores):
        raise param_error("scores", owner, f"a sequence as long as ids ({len(ids)})", f"{len(scores)} scores")


class TopSelector(Selector):
    """Keep the top ``fraction`` by score; ties are broken by id for reproducibility."""

    needs_embeddings = False

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        _check(ids, scores, type(self).__name__)
        k = n_selected(len(ids), fraction)
        ranked = sorted(zip(ids, scores), key=lambda p: (-float(p[1]), p[0]))
        return [i for i, _ in ranked[:k]]


class RandomSelector(Selector):
    """A seeded uniform sample of ``fraction`` (the baseline). It reads no score, so the select stage
    does not run the scorer for it."""

    needs_scores = False
    needs_embeddings = False

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        import numpy as np

        _check(ids, scores, type(self).__name__)
        k = n_selected(len(ids), fraction)
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(ids), size=k, replace=False) if k else []
        return [ids[int(i)] for i in picked]


class DiverseSelector(Selector):
    """Greedy facility location traded off against the divergence score (DELIFT-style).

    Each step picks the sample maximising ``(1 - score_weight) * coverage_gain + score_weight * score``,
    both min-max normalised over the candidates left: ``coverage_gain`` is the facility-location
    gain ``sum_i max(sim(i, j) - covered_i, 0)`` of cosine similarities shifted to [0, 1]. Because
    the coverage gain is renormalised at every step, ``score_weight`` stays a real trade-off all
    the way through: 0 = pure coverage, 1 = ``top``. This keeps every kind of answer in the
    selection even when the student's surprise is a function of the answer alone (e.g. a label):
    plain ``top`` then keeps a few labels and drops the rest. Without embeddings it falls back to ``top``.

    Parameters
    ----------
    score_weight : float
        Weight of the divergence score against coverage, in [0, 1]: 0 = pure coverage, 1 = ``top``.
    """

    needs_embeddings = True

    def __init__(self, score_weight: float = 0.5) -> None:
        self.score_weight = score_weight

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        import numpy as np

        _check(ids, scores, type(self).__name__)
        w = self.score_weight
        if not (isinstance(w, (int, float)) and 0 <= w <= 1):
            raise param_error("score_weight", type(self).__name__, "a float in [0, 1]", w)
        k = n_selected(len(ids), fraction)
        if embeddings is None:
            return TopSelector().select(ids, scores, fraction)
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.shape[0] != len(ids):
            raise param_error("embeddings", type(self).__name__, f"an array with {len(ids)} rows", emb.shape)
        chosen = _facility_location(_unit_rows(emb), _finite(scores), k, w)
        return [ids[i] for i in chosen]


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    import numpy as np

    return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)


def _finite(scores: Sequence[float]) -> np.ndarray:
    """Scores as floats; an infinite or NaN score becomes the largest finite one (0 when none is)."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(s), s, np.nanmax(np.where(np.isfinite(s), s, np.nan)) if np.isfinite(s).any() else 0.0)


def _facility_location(emb: np.ndarray, scores: np.ndarray, k: int, w: float) -> list[int]:
    """Greedy picks (row indices, in order) maximising ``(1 - w) * coverage gain + w * score``, each
    min-max normalised over the rows left (see :class:`DiverseSelector`); ``emb`` has unit rows."""
    import numpy as np

    n = emb.shape[0]
    sim = (emb @ emb.T + 1.0) / 2.0
    s_norm = _minmax(scores)
    covered = np.zeros(n)
    chosen: list[int] = []
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        gain = np.maximum(sim - covered[None, :], 0.0).sum(axis=1)
        gain_norm = np.zeros_like(gain)
        gain_norm[available] = _minmax(gain[available], constant=1.0)
        total = (1.0 - w) * gain_norm + w * s_norm
        total[~available] = -np.inf
        best = int(np.argmax(total))
        chosen.append(best)
        available[best] = False
        covered = np.maximum(covered, sim[best])
    return chosen


# -- answer-aware selection ----------------------------------------------------------------------

#: The key of answers that do not fit the task's output kind (free text in a JSON task, ...).
OTHER = "(other)"
#: The key of a tool-calling task's answers that call no tool.
NO_TOOL = "(no tool call)"

_SQL_TABLE = re.compile(r"\b(?:from|join|into|update)\s+([`\"\[]?[\w.]+)", re.IGNORECASE)
_SQL_CLAUSES = ("join", "where", "group by", "having", "order by", "limit", "union", "distinct",
                "count(", "sum(", "avg(", "min(", "max(")


def tool_names(answer: str) -> list[str] | None:
    """The tools an answer calls, in order, when it is a tool-call list as
    :func:`aad_core.formats.answers.answer_string` writes it (``[{"name": ..., "arguments": ...}]``);
    None for any other answer."""
    text = answer.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if not (isinstance(value, list) and value and all(isinstance(c, dict) and set(c) == {"name", "arguments"}
                                                      and isinstance(c["name"], str) for c in value)):
        return None
    return [c["name"] for c in value]


def json_shape(value: Any) -> str:
    """A JSON value's shape: an object's sorted keys (one level), an array's element shapes."""
    if isinstance(value, dict):
        return "{" + ",".join(sorted(map(str, value))) + "}"
    if isinstance(value, list):
        return "[" + "|".join(sorted({json_shape(v) for v in value})) + "]"
    return type(value).__name__


def sql_skeleton(answer: str) -> str:
    """A SQL statement's skeleton: its verb, the tables it reads or writes and the clauses it uses
    (``select orders,users join where order by``); literals, columns and conditions are left out."""
    sql = " ".join(sql_text(answer).lower().split())
    verb = sql.split(" ", 1)[0] if sql else ""
    tables = sorted({t.strip('`"[]') for t in _SQL_TABLE.findall(sql)})
    clauses = [c.rstrip("(") for c in _SQL_CLAUSES if c in sql.replace(" (", "(")]
    return " ".join([verb, ",".join(tables), *clauses]).strip()


def answer_keys(answers: Sequence[str]) -> list[str]:
    """One stratum key per answer: what "the same answer" means for the task's output kind
    (:func:`aad_core.formats.kinds.output_kind`, computed over all ``answers``).

    ``label``: the label (case and spaces ignored); ``tool_calls``: the tools called (an answer
    without a call is :data:`NO_TOOL`); ``json``: the keys of the object (or the arrays' element
    keys); ``sql``: :func:`sql_skeleton`; ``structured``: whichever of these fits each answer;
    ``text``: one group for all (free text has no answer classes). Answers that do not fit the
    kind share :data:`OTHER`. Answers are strings as ``answer_string`` writes them.
    """
    tools = [tool_names(a) for a in answers]
    kind = output_kind([(a, t is not None) for a, t in zip(answers, tools)])
    if kind == "text":
        return [""] * len(answers)

    def key(answer: str, called: list[str] | None) -> str:
        if called is not None:
            return "tools:" + "+".join(called)
        if kind == "tool_calls":
            return NO_TOOL
        if kind in ("json", "structured"):
            ok, value = parse_json_answer(answer)
            if ok and isinstance(value, (dict, list)):
                return "json:" + json_shape(value)
        if kind in ("sql", "structured") and is_sql(answer):
            return "sql:" + sql_skeleton(answer)
        if kind in ("label", "structured") and is_label(answer):
            return "label:" + label_key(answer)
        return OTHER

    return [key(a, t) for a, t in zip(answers, tools)]


def allocate(sizes: Sequence[int], k: int, order: Sequence[int] | None = None) -> list[int]:
    """How many of ``k`` picks each group of ``sizes`` gets: in proportion to its size (largest
    remainders first), at least one per group while ``k`` allows, never more than the group holds.

    When ``k`` is smaller than the number of groups, the first ``k`` groups of ``order`` (default:
    the largest first) get one each.
    """
    n_groups = len(sizes)
    order = list(order) if order is not None else sorted(range(n_groups), key=lambda g: -sizes[g])
    k = min(k, sum(sizes))
    if k <= n_groups:
        alloc = [0] * n_groups
        for g in [g for g in order if sizes[g] > 0][:k]:
            alloc[g] = 1
        return alloc
    rank = {g: r for r, g in enumerate(order)}
    total = sum(sizes)
    ideal = [k * size / total for size in sizes]
    alloc = [min(size, max(1, math.floor(i))) if size else 0 for i, size in zip(ideal, sizes)]
    while sum(alloc) > k:  # the minimum of one can overshoot: take back from the most over-served
        g = max((g for g in range(n_groups) if alloc[g] > 1), key=lambda g: (alloc[g] - ideal[g], rank[g]))
        alloc[g] -= 1
    while sum(alloc) < k:  # largest remainders first
        g = max((g for g in range(n_groups) if alloc[g] < sizes[g]), key=lambda g: (ideal[g] - alloc[g], -rank[g]))
        alloc[g] += 1
    return alloc


class StratifiedSelector(Selector):
    """Answer-aware selection: the budget is shared across the teacher's answers, then spent on
    informative and diverse samples inside each.

    1. Group the samples by :func:`answer_keys` (label, tools called, JSON keys, SQL skeleton).
    2. Share ``ceil(fraction * n)`` picks across the groups in proportion to their sizes, at least
       one per group while the budget allows (:func:`allocate`; when there are more groups than
       picks, the larger groups first, ties in a seeded order).
    3. Inside each group, :class:`DiverseSelector`'s greedy trade-off between the score and the
       facility-location coverage of the group's embeddings (``score_weight``); without embeddings,
       picks spread evenly over the group's score ranking starting at its highest score.

    Without ``answers`` (a caller that does not pass them) every sample is one group. Deterministic
    for a given ``seed``.

    Parameters
    ----------
    score_weight : float
        Inside each answer group, the weight of the score against coverage, in [0, 1]: 0 = pure
        coverage, 1 = the group's top scores.
    """

    needs_embeddings = True
    needs_answers = True

    def __init__(self, score_weight: float = 0.5) -> None:
        self.score_weight = score_weight

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0,
               answers: Sequence[str] | None = None) -> list[str]:
        import numpy as np

        name = type(self).__name__
        _check(ids, scores, name)
        w = self.score_weight
        if not (isinstance(w, (int, float)) and 0 <= w <= 1):
            raise param_error("score_weight", name, "a float in [0, 1]", w)
        if answers is not None and len(answers) != len(ids):
            raise param_error("answers", name, f"a sequence as long as ids ({len(ids)})", f"{len(answers)} answers")
        k = n_selected(len(ids), fraction)
        if not k:
            return []
        emb = None
        if embeddings is not None:
            emb = np.asarray(embeddings, dtype=np.float64)
            if emb.shape[0] != len(ids):
                raise param_error("embeddings", name, f"an array with {len(ids)} rows", emb.shape)
            emb = _unit_rows(emb)
        s = _finite(scores)
        keys = answer_keys([str(a) for a in answers]) if answers is not None else [""] * len(ids)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        names = sorted(groups)
        sizes = [len(groups[g]) for g in names]
        tie = np.random.default_rng(seed).permutation(len(names))
        order = sorted(range(len(names)), key=lambda g: (-sizes[g], int(tie[g])))
        alloc = allocate(sizes, k, order)
        picked: list[int] = []
        for g in order:  # larger groups first, so the output reads group by group
            members, m = groups[names[g]], alloc[g]
            if not m:
                continue
            if emb is not None:
                local = _facility_location(emb[members], s[members], m, w)
            else:
                ranked = sorted(range(len(members)), key=lambda j: (-s[members[j]], ids[members[j]]))
                local = [ranked[(j * len(members)) // m] for j in range(m)]
            picked.extend(members[j] for j in local)
        return [ids[i] for i in picked]


def _minmax(values: np.ndarray, constant: float = 0.0) -> np.ndarray:
    """Min-max scale to [0, 1]; all-equal values map to ``constant``."""
    import numpy as np

    span = float(values.max() - values.min()) if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.full_like(values, constant, dtype=np.float64)


@hookimpl
def aad_register_selectors(register: Any) -> None:
    register("top", TopSelector, description="Top fraction by score per cluster (seed paper: 30 %)")
    register("random", RandomSelector, description="Seeded random fraction per cluster (baseline)")
    register("diverse", DiverseSelector, description="Facility location over embeddings + score (DELIFT-style)")
    register("stratified", StratifiedSelector,
             description="Answer-aware: budget shared across teacher answers, score + coverage inside each")
