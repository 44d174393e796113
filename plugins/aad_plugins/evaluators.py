"""The built-in evaluators: exact, json, sql, classification, tool-calls, semantic.

Every evaluator compares predictions (a student's answers) with references (the teacher's
recorded answers) and returns ``{"score": float in [0, 1], "n": int, "metric": str, ...}``.
Answers are strings; tool calls are serialised as a JSON list ``[{"name": ..., "arguments":
{...}}]`` (see :func:`aad_core.formats.answers.answer_string`).

How an answer is read (tool calls, JSON, SQL, code fences) comes from :mod:`aad_core.formats`, the
same helpers the router's validators use, so an evaluator scores what the router would serve.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aad_core import hookimpl
from aad_core.errors import AADError, param_error
from aad_core.formats.fences import fenced_body
from aad_core.formats.json_answers import canonical_json, parse_json_answer
from aad_core.formats.sql import canonical_sql, sql_text
from aad_core.formats.tool_calls import ToolCallParseError, parse_tool_calls
from aad_core.plugins.components import Evaluator


def _check_lengths(owner: str, predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{owner}.evaluate needs one prediction per reference. Got {len(predictions)} predictions "
            f"and {len(references)} references instead."
        )


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, single spaces, no surrounding quotes or final full stop."""
    text = unicodedata.normalize("NFKC", text or "").strip().lower()
    text = re.sub(r"\s+", " ", text)
    for _ in range(2):  # '"label".' and '"label."' alike
        text = text.rstrip(".").strip().strip("\"'`").strip()
    return text


def _exact_key(text: str) -> str:
    """JSON objects/arrays compare canonically (key order, spacing); other text after normalize_text."""
    body = fenced_body(text)
    if body[:1] in "{[":
        try:
            return "json:" + canonical_json(json.loads(body))
        except (json.JSONDecodeError, ValueError):
            pass
    return normalize_text(text)


class ExactMatchEvaluator(Evaluator):
    """Share of predictions equal to their reference after normalisation (case, spaces, quotes;
    JSON objects/arrays canonically)."""

    metric = "exact_match"

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        _check_lengths("ExactMatchEvaluator", predictions, references)
        hits = [_exact_key(p) == _exact_key(r) for p, r in zip(predictions, references)]
        score = sum(hits) / len(hits) if hits else 0.0
        return {"score": score, "n": len(hits), "metric": self.metric, "per_item": [float(h) for h in hits]}


class JSONEvaluator(Evaluator):
    """JSON answers: share that parse, share canonically equal to the reference (the score), and
    share valid against ``schema`` (a JSON Schema dict or a path to one) when given.

    Parameters
    ----------
    schema : dict, str or None
        JSON Schema file (relative to the workspace) or object; the 'json' evaluator then also reports
        schema validity.
    """

    metric = "json_equal"

    def __init__(self, schema: dict[str, Any] | str | Path | None = None) -> None:
        self.schema = schema

    def _validator(self) -> Any:
        if self.schema is None:
            return None
        schema = self.schema
        if isinstance(schema, str):
            path = Path(schema)
            if not path.exists():
                raise AADError(
                    f"The JSON schema file {path} of the 'json' evaluator does not exist.",
                    hint="Fix [evaluator.json] schema in aad.toml.",
                )
            schema = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(schema, dict):
            raise param_error("schema", "JSONEvaluator", "a JSON Schema object, a path or None", self.schema)
        import jsonschema

        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        _check_lengths("JSONEvaluator", predictions, references)
        validator = self._validator()
        parsed = equal = valid = 0
        per_item = []
        for pred, ref in zip(predictions, references):
            ok, value = parse_json_answer(pred)
            ref_ok, ref_value = parse_json_answer(ref)
            hit = ok and ref_ok and canonical_json(value) == canonical_json(ref_value)
            parsed += ok
            equal += hit
            if validator is not None and ok:
                valid += validator.is_valid(value)
            per_item.append(float(hit))
        n = len(per_item)
        out: dict[str, Any] = {
            "score": equal / n if n else 0.0,
            "n": n,
            "metric": self.metric,
            "parse_rate": parsed / n if n else 0.0,
            "per_item": per_item,
        }
        if validator is not None:
            out["schema_valid_rate"] = valid / n if n else 0.0
        return out


class _Timeout(Exception):
    pass


class SQLEvaluator(Evaluator):
    """SQL answers: sqlglot-canonical exact match, and execution accuracy (same result rows as the
    reference query) on a SQLite ``database`` when one is given. The database is opened read-only
    (``file:...?mode=ro``) and every query is stopped after ``timeout_s`` seconds.

    ``score`` is execution accuracy when a database is configured, canonical exact match otherwise.
    ``evaluate(..., databases=[path or None, ...])`` gives each item its own database (items
    without one fall back to canonical exact match).

    Parameters
    ----------
    database : str, Path or None
        SQLite file for SQL execution accuracy (opened read-only; relative to the workspace).
    timeout_s : float
        Each SQL query is stopped after this many seconds.
    dialect : str
        sqlglot dialect of the canonical comparison.
    max_rows : int
        Result rows compared per query; a query that returns more does not count as correct.
    """

    metric = "sql"

    def __init__(self, database: str | Path | None = None, timeout_s: float = 5.0, dialect: str = "sqlite",
                 max_rows: int = 10_000) -> None:
        self.database = database
        self.timeout_s = timeout_s
        self.dialect = dialect
        self.max_rows = max_rows

    def _connect(self, database: str | Path) -> sqlite3.Connection:
        path = Path(str(database)).expanduser().resolve()
        if not path.exists():
            raise AADError(
                f"The SQLite database {path} of the 'sql' evaluator does not exist.",
                hint="Fix [evaluator.sql] database in aad.toml, or unset it to score canonical exact match only.",
            )
        return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)

    def _run(self, conn: sqlite3.Connection, sql: str) -> tuple[bool, Any]:
        """(ok, rows as a multiset-comparable value or the error text)."""
        deadline = time.monotonic() + self.timeout_s

        def progress() -> int:
            return 1 if time.monotonic() > deadline else 0

        conn.set_progress_handler(progress, 1000)
        try:
            cur = conn.execute(sql_text(sql))
            rows = cur.fetchmany(self.max_rows + 1)
        except sqlite3.Error as err:
            timed_out = "interrupted" in str(err).lower()
            return False, "timeout" if timed_out else f"{type(err).__name__}: {err}"
        except (ValueError, sqlite3.Warning) as err:  # e.g. "You can only execute one statement at a time."
            return False, str(err)
        finally:
            conn.set_progress_handler(None, 0)
        if len(rows) > self.max_rows:
            return False, f"more than {self.max_rows} rows"
        return True, rows

    @staticmethod
    def _same_result(pred_rows: list[tuple], ref_rows: list[tuple], ordered: bool) -> bool:
        def norm(row: tuple) -> tuple:
            return tuple(round(v, 6) if isinstance(v, float) else v for v in row)

        p, r = [norm(x) for x in pred_rows], [norm(x) for x in ref_rows]
        return p == r if ordered else Counter(p) == Counter(r)

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        _check_lengths("SQLEvaluator", predictions, references)
        if self.timeout_s <= 0:
            raise param_error("timeout_s", "SQLEvaluator", "a positive number of seconds", self.timeout_s)
        n = len(predictions)
        exact, parsed, per_exact = 0, 0, []
        for pred, ref in zip(predictions, references):
            cp, cr = canonical_sql(pred, self.dialect), canonical_sql(ref, self.dialect)
            parsed += cp is not None
            hit = cp is not None and cp == cr
            exact += hit
            per_exact.append(float(hit))
        out: dict[str, Any] = {
            "n": n,
            "metric": "sql_exact",
            "exact_match": exact / n if n else 0.0,
            "parse_rate": parsed / n if n else 0.0,
        }
        databases = context.get("databases")
        if databases is not None and len(databases) != n:
            raise ValueError(f"SQLEvaluator.evaluate needs one database per item. Got {len(databases)} for {n} items instead.")
        per_db = [(databases[i] if databases is not None and databases[i] else self.database) for i in range(n)]
        if all(db is None for db in per_db):
            out.update(score=out["exact_match"], per_item=per_exact)
            return out
        conns: dict[str, sqlite3.Connection] = {}
        executed = correct = ref_failed = timeouts = 0
        per_exec: list[float] = []
        try:
            for pred, ref, db in zip(predictions, references, per_db):
                if db is None:  # no database for this item: fall back to canonical exact match
                    hit = bool(per_exact[len(per_exec)])
                    correct += hit
                    per_exec.append(float(hit))
                    continue
                if str(db) not in conns:
                    conns[str(db)] = self._connect(db)
                conn = conns[str(db)]
                ref_ok, ref_rows = self._run(conn, ref)
                if not ref_ok:
                    ref_failed += 1
                    per_exec.append(0.0)
                    continue
                ok, rows = self._run(conn, pred)
                executed += ok
                timeouts += (not ok) and rows == "timeout"
                hit = ok and self._same_result(rows, ref_rows, ordered=" order by " in f" {ref.lower()} ")
                correct += hit
                per_exec.append(float(hit))
        finally:
            for conn in conns.values():
                conn.close()
        out.update(
            metric="sql_execution",
            score=correct / n if n else 0.0,
            execution_accuracy=correct / n if n else 0.0,
            executable_rate=executed / n if n else 0.0,
            reference_failures=ref_failed,
            timeouts=timeouts,
            per_item=per_exec,
        )
        return out


class ClassificationEvaluator(Evaluator):
    """Label answers: accuracy (the score) and macro-F1 over the labels seen in either list,
    after normalisation (case, spaces, quotes)."""

    metric = "accuracy"

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        _check_lengths("ClassificationEvaluator", predictions, references)
        preds = [normalize_text(p) for p in predictions]
        refs = [normalize_text(r) for r in references]
        n = len(refs)
        hits = [p == r for p, r in zip(preds, refs)]
        f1s = []
        for label in sorted(set(preds) | set(refs)):
            tp = sum(p == label and r == label for p, r in zip(preds, refs))
            fp = sum(p == label and r != label for p, r in zip(preds, refs))
            fn = sum(p != label and r == label for p, r in zip(preds, refs))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {
            "score": sum(hits) / n if n else 0.0,
            "n": n,
            "metric": self.metric,
            "accuracy": sum(hits) / n if n else 0.0,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "n_labels": len(set(refs)),
            "per_item": [float(h) for h in hits],
        }


def _read_calls(text: str) -> list[tuple[str, str]] | None:
    """(name, canonical arguments) of each call :func:`parse_tool_calls` reads in ``text`` (``[]``
    for a plain-text answer), or None when the answer announces calls it cannot read."""
    try:
        _, calls = parse_tool_calls(text or "")
    except ToolCallParseError:
        return None
    return [(c.function.name, canonical_json(c.function.parsed_arguments())) for c in calls]


class ToolCallEvaluator(Evaluator):
    """Tool calls: tool-name accuracy (same multiset of called tools) and name+arguments accuracy
    (the score: same calls with canonically equal arguments, order-insensitive). A reference
    without calls (no tool fits) is matched by a prediction without calls."""

    metric = "tool_call_accuracy"

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        _check_lengths("ToolCallEvaluator", predictions, references)
        n = len(references)
        names_ok = full_ok = parsed = 0
        per_item = []
        for pred, ref in zip(predictions, references):
            ref_calls = _read_calls(ref) or []
            pred_calls = _read_calls(pred)
            if pred_calls is None:
                per_item.append(0.0)
                continue
            parsed += 1
            name_hit = Counter(name for name, _ in pred_calls) == Counter(name for name, _ in ref_calls)
            full_hit = name_hit and Counter(pred_calls) == Counter(ref_calls)
            names_ok += name_hit
            full_ok += full_hit
            per_item.append(float(full_hit))
        return {
            "score": full_ok / n if n else 0.0,
            "n": n,
            "metric": self.metric,
            "name_accuracy": names_ok / n if n else 0.0,
            "name_args_accuracy": full_ok / n if n else 0.0,
            "parse_rate": parsed / n if n else 0.0,
            "per_item": per_item,
        }


class SemanticEvaluator(Evaluator):
    """Free text: cosine similarity of sentence embeddings (the weakest metric: it rewards topical
    similarity, not correctness). ``score`` is the share of pairs with cosine >= ``threshold``;
    ``mean_cosine`` is reported too. ``embedder`` is a component name or an Embedder instance.

    Parameters
    ----------
    embedder : str or Embedder
        The embedder (in a workspace: its configured one).
    threshold : float
        Cosine at or above which two answers count as agreeing.
    """

    metric = "semantic_agreement"

    def __init__(self, embedder: Any = "minilm", threshold: float = 0.8) -> None:
        self.embedder = embedder
        self.threshold = threshold

    def _embedder(self) -> Any:
        if isinstance(self.embedder, str):
            from aad_core.plugins import create_component

            self.embedder_ = create_component("embedder", self.embedder)
        else:
            self.embedder_ = self.embedder
        return self.embedder_

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        _check_lengths("SemanticEvaluator", predictions, references)
        if not 0 < self.threshold <= 1:
            raise param_error("threshold", "SemanticEvaluator", "a float in (0, 1]", self.threshold)
        n = len(references)
        base = {"n": n, "metric": self.metric, "weakest_metric": True,
                "note": "embedding similarity: topical agreement, not verified correctness"}
        if n == 0:
            return {**base, "score": 0.0, "mean_cosine": 0.0, "per_item": []}
        import numpy as np

        embedder = getattr(self, "embedder_", None) or self._embedder()
        vectors = np.asarray(embedder.embed([*(p or " " for p in predictions), *(r or " " for r in references)]))
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        cos = np.clip((vectors[:n] * vectors[n:]).sum(axis=1), -1.0, 1.0)
        hits = cos >= self.threshold - 1e-9
        return {
            **base,
            "score": float(hits.mean()),
            "mean_cosine": float(max(0.0, cos.mean())),
            "threshold": self.threshold,
            "per_item": [float(h) for h in hits],
        }


EVALUATORS: dict[str, tuple[type[Evaluator], str]] = {
    "exact": (ExactMatchEvaluator, "Exact match after normalising case, spaces and quotes."),
    "json": (JSONEvaluator, "JSON: parses, canonical equality, JSON Schema validity."),
    "sql": (SQLEvaluator, "SQL: sqlglot-canonical match; execution accuracy on a read-only SQLite DB."),
    "classification": (ClassificationEvaluator, "Labels: accuracy and macro-F1."),
    "tool-calls": (ToolCallEvaluator, "Tool calls: name accuracy and name+arguments accuracy."),
    "semantic": (SemanticEvaluator, "Free text by embedding cosine (the weakest metric)."),
}


@hookimpl
def aad_register_evaluators(register: Any) -> None:
    for name, (cls, description) in EVALUATORS.items():
        register(name, cls, description=description, metric=cls.metric)


__all__ = [
    "ClassificationEvaluator", "ExactMatchEvaluator", "JSONEvaluator", "SQLEvaluator", "SemanticEvaluator",
    "ToolCallEvaluator", "canonical_json", "canonical_sql", "normalize_text", "parse_json_answer",
    "parse_tool_calls",
]
