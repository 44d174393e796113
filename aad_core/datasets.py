"""Loaders for the real public data sets used by the demo workload, tests and benchmarks.

Nothing is downloaded; nothing is copied into the repository. Sources and licenses (keep the
attribution wherever the data or anything derived from it is shown):

* **Banking77** — PolyAI, "Efficient Intent Detection with Dual Sentence Encoders" (Casanueva et
  al., 2020), CC-BY-4.0. 13,083 online-banking queries, 77 intents. Read from
  ``<shared>/data/banking77/{train,test}.csv``.
* **defog sql-eval** — defog-ai/sql-eval, Apache-2.0. 236 questions with gold SQL (SQLite dialect)
  over seven databases, read from ``<shared>/data/defog-sql-eval/questions_gen_sqlite.csv``; the
  database schemas come from the PyPI package ``defog-data`` (Apache-2.0).
* **BFCL v4** — Berkeley Function Calling Leaderboard (gorilla-llm), Apache-2.0, from the PyPI
  package ``bfcl-eval`` (install with ``--no-deps``): function-calling questions with the functions
  offered and the gold calls.

``<shared>`` is ``$AAD_DATA_DIR`` (the folder holding ``banking77/``...) or, in a source
checkout, ``../shared/data`` beside the repository. Only the standard library is used.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aad_core.errors import AADError

DATA_DIR_ENV = "AAD_DATA_DIR"
DEFOG_DATABASES = ("academic", "advising", "atis", "geography", "restaurants", "scholar", "yelp")
#: BFCL categories with one user turn (multi-turn, memory and web-search items are left out).
BFCL_CATEGORIES = (
    "simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance", "live_irrelevance",
)


@dataclass(frozen=True)
class IntentExample:
    text: str
    label: str


@dataclass(frozen=True)
class SQLQuestion:
    db_name: str
    question: str
    #: Gold SQL; several acceptable queries are separated by ';' in the source.
    query: str
    category: str
    instructions: str = ""

    def gold_queries(self) -> list[str]:
        return [q.strip() for q in self.query.split(";") if q.strip()]


@dataclass(frozen=True)
class FunctionCallItem:
    id: str
    category: str
    #: The user turn(s) as OpenAI chat messages.
    messages: list[dict[str, Any]]
    #: The functions offered, converted to the OpenAI ``tools`` schema.
    tools: list[dict[str, Any]]
    #: Gold calls ``[{"name": ..., "arguments": {param: [acceptable values]}}]``; [] for irrelevance items,
    #: None when the package has no answer file for the item.
    ground_truth: list[dict[str, Any]] | None = field(default=None)


def data_dir() -> Path:
    """The folder with ``banking77/`` and ``defog-sql-eval/``."""
    env = os.environ.get(DATA_DIR_ENV)
    folder = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not folder.is_dir():
        raise AADError(f"The real-data folder {folder} does not exist.",
                       hint=f"Set {DATA_DIR_ENV} to the folder that holds banking77/ and defog-sql-eval/.")
    return folder


def load_banking77(split: str = "train") -> list[IntentExample]:
    """Banking77 queries with their intent label (CC-BY-4.0, PolyAI)."""
    if split not in ("train", "test"):
        raise ValueError(f"The 'split' parameter of load_banking77 must be 'train' or 'test'. Got {split!r} instead.")
    path = data_dir() / "banking77" / f"{split}.csv"
    with path.open(encoding="utf-8", newline="") as f:
        return [IntentExample(row["text"].strip(), row["category"].strip()) for row in csv.DictReader(f)]


def banking77_labels() -> list[str]:
    """The 77 intent labels."""
    return list(json.loads((data_dir() / "banking77" / "categories.json").read_text(encoding="utf-8")))


def load_defog_questions(*, with_schema_only: bool = True) -> list[SQLQuestion]:
    """defog sql-eval questions, SQLite dialect (Apache-2.0).

    By default only questions over the seven databases whose schema ``defog-data`` ships
    (:data:`DEFOG_DATABASES`); a few questions of the source file use other databases.
    """
    path = data_dir() / "defog-sql-eval" / "questions_gen_sqlite.csv"
    with path.open(encoding="utf-8", newline="") as f:
        questions = [
            SQLQuestion(row["db_name"], row["question"].strip(), row["query"].strip(), row["query_category"],
                        (row.get("instructions") or "").strip())
            for row in csv.DictReader(f)
        ]
    return [q for q in questions if q.db_name in DEFOG_DATABASES] if with_schema_only else questions


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the folder without importing it (defog_data.metadata prints on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AADError(f"The package {pip_name!r} is not installed.", hint=f"pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def defog_schema(db_name: str) -> str:
    """The schema of a defog database as ``CREATE TABLE`` statements with column comments."""
    if db_name not in DEFOG_DATABASES:
        raise ValueError(f"The 'db_name' parameter of defog_schema must be one of {DEFOG_DATABASES}. "
                         f"Got {db_name!r} instead.")
    meta = json.loads((_package_dir("defog_data", "defog-data") / db_name / f"{db_name}.json").read_text("utf-8"))
    lines: list[str] = []
    for table, columns in meta["table_metadata"].items():
        cols = []
        for c in columns:
            desc = (c.get("column_description") or "").strip()
            cols.append(f"  {c['column_name']} {c['data_type']}" + (f" -- {desc}" if desc else ""))
        lines.append(f"CREATE TABLE {table} (\n" + ",\n".join(cols) + "\n);")
    glossary = (meta.get("glossary") or "").strip()
    if glossary:
        lines.append("-- Notes: " + glossary)
    return "\n".join(lines)


def _fix_schema(obj: Any) -> Any:
    """BFCL writes JSON-schema type "dict" (and python type names); OpenAI tools need "object"."""
    if isinstance(obj, dict):
        out = {k: _fix_schema(v) for k, v in obj.items()}
        if out.get("type") == "dict":
            out["type"] = "object"
        elif out.get("type") == "float":
            out["type"] = "number"
        elif out.get("type") == "tuple":
            out["type"] = "array"
        return out
    if isinstance(obj, list):
        return [_fix_schema(v) for v in obj]
    return obj


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_bfcl(limit: int | None = None, seed: int = 0, categories: tuple[str, ...] = BFCL_CATEGORIES) -> list[FunctionCallItem]:
    """Single-turn BFCL v4 items (Apache-2.0), shuffled with ``seed``, at most ``limit`` of them."""
    root = _package_dir("bfcl_eval", "bfcl-eval") / "data"
    items: list[FunctionCallItem] = []
    for cat in categories:
        path = root / f"BFCL_v4_{cat}.json"
        if not path.exists():
            raise ValueError(f"Unknown BFCL category {cat!r}: {path} does not exist.")
        answers_path = root / "possible_answer" / path.name
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answers_path)} if answers_path.exists() else {}
        for rec in _read_jsonl(path):
            turns = rec.get("question") or []
            messages = [dict(m) for m in (turns[0] if turns else [])]
            if not messages:
                continue
            tools = [{"type": "function", "function": _fix_schema(fn)} for fn in rec.get("function", [])]
            gold: list[dict[str, Any]] | None
            if "irrelevance" in cat:
                gold = []
            elif rec["id"] in answers:
                gold = [{"name": name, "arguments": args} for call in answers[rec["id"]] for name, args in call.items()]
            else:
                gold = None
            items.append(FunctionCallItem(rec["id"], cat, messages, tools, gold))
    random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]
