"""Loaders for the real public data sets used by the demo workload, tests and benchmarks.

Nothing is downloaded. Banking77 and the defog questions ship with aad in ``aad_core/demo/data/``
(1.2 MB, each folder with its LICENSE and a README naming its source and commit). Sources and
licenses (keep the attribution wherever the data or anything derived from it is shown):

* **Banking77** — PolyAI, "Efficient Intent Detection with Dual Sentence Encoders" (Casanueva et
  al., 2020), CC-BY-4.0. 13,083 online-banking queries, 77 intents. Read from
  ``<data>/banking77/{train,test}.csv``.
* **defog sql-eval** — defog-ai/sql-eval, Apache-2.0. 236 questions with gold SQL (SQLite dialect)
  over seven databases, read from ``<data>/defog-sql-eval/questions_gen_sqlite.csv``; the
  database schemas come from the PyPI package ``defog-data`` (Apache-2.0).
* **BFCL v4** — Berkeley Function Calling Leaderboard (gorilla-llm), Apache-2.0, from the PyPI
  package ``bfcl-eval`` (install with ``--no-deps``): function-calling questions with the functions
  offered and the gold calls.

``<data>`` is ``$AAD_DATA_DIR`` (a folder holding ``banking77/`` and ``defog-sql-eval/``) or the
packaged ``aad_core/demo/data``. Only the standard library is used.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError

if TYPE_CHECKING:
    from aad_core.schema import Trace, Usage

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


#: The data that ships with aad (Banking77, CC-BY-4.0; defog sql-eval questions, Apache-2.0).
PACKAGED_DATA = Path(__file__).resolve().parent / "data"


def data_dir() -> Path:
    """The folder with ``banking77/`` and ``defog-sql-eval/``: ``$AAD_DATA_DIR``, else the packaged copy."""
    env = os.environ.get(DATA_DIR_ENV)
    folder = Path(env) if env else PACKAGED_DATA
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


# -- a mixed workload (benchmarks, demo, tests) ------------------------------------------------
INTENT_SYSTEM = (
    "You are the intent classifier of an online bank's support assistant. Read the customer's "
    "message and answer with exactly one intent label from the Banking77 taxonomy (e.g. card_arrival, "
    "lost_or_stolen_card, exchange_rate). Answer with the label only."
)
SQL_SYSTEM = (
    "You translate questions into a single SQLite query over the database below. Answer with SQL only.\n\n"
)
TOOLS_SYSTEM = (
    "You are a function-calling assistant. Use the provided functions to answer the user's request; "
    "call the right function with correct arguments, or answer in text when no function applies."
)


def _usage(prompt: str, answer: str) -> Usage:
    from aad_core.schema import Usage

    p, c = len(prompt) // 4 + 8, max(1, len(answer) // 4)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def mixed_workload(n: int, seed: int = 0) -> list[Trace]:
    """A mixed agent workload of ``n`` traces from the three data sets, each family an agent node
    with its own system prompt (``task`` = "intent" | "sql" | "tools"; cost at $10 per 1M tokens).

    Proportions: ~6 % SQL (all 210 defog questions, repeated when n is large), ~30 % tool
    calls, the rest intent queries."""
    from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Trace

    rng = random.Random(seed)
    sql_q = load_defog_questions()
    n_sql = min(max(len(sql_q), round(0.06 * n)), n // 3) if n >= 30 else n // 3
    n_tools = min(round(0.30 * n), 3625)
    n_intent = n - n_sql - n_tools
    intents = load_banking77("train") + load_banking77("test")
    rng.shuffle(intents)
    schemas = {db: defog_schema(db) for db in DEFOG_DATABASES}
    price = 10.0 / 1e6  # USD per token, for the cost share

    traces: list[Trace] = []
    for i, ex in enumerate(intents[:n_intent]):
        msgs = [Message(role="system", content=INTENT_SYSTEM), Message(role="user", content=ex.text)]
        u = _usage(INTENT_SYSTEM + ex.text, ex.label)
        traces.append(Trace(id=f"intent-{i}", source="benchmark", task="intent", request=ChatRequest(messages=msgs),
                            response=Message(role="assistant", content=ex.label), usage=u,
                            cost=u.total_tokens * price))
    for i in range(n_sql):
        q = sql_q[i % len(sql_q)]
        system = SQL_SYSTEM + schemas[q.db_name]
        msgs = [Message(role="system", content=system), Message(role="user", content=q.question)]
        answer = q.gold_queries()[0] if q.gold_queries() else q.query
        u = _usage(system + q.question, answer)
        traces.append(Trace(id=f"sql-{i}", source="benchmark", task="sql", request=ChatRequest(messages=msgs),
                            response=Message(role="assistant", content=answer), usage=u, cost=u.total_tokens * price,
                            metadata={"db": q.db_name}))
    for i, item in enumerate(load_bfcl(limit=n_tools, seed=seed)):
        msgs = [Message(role="system", content=TOOLS_SYSTEM)] + [Message(**m) for m in item.messages]
        calls = [ToolCall(id=f"call_{j}", function=FunctionCall(
            name=g["name"], arguments=json.dumps({k: (v[0] if isinstance(v, list) and v else v)
                                                  for k, v in g["arguments"].items()})))
                 for j, g in enumerate(item.ground_truth or [])]
        response = Message(role="assistant", content=None if calls else "None of the functions applies.",
                           tool_calls=calls or None)
        u = _usage(TOOLS_SYSTEM + json.dumps(item.messages) + json.dumps(item.tools), json.dumps(item.ground_truth))
        traces.append(Trace(id=f"tools-{i}", source="benchmark", task="tools",
                            request=ChatRequest(messages=msgs, tools=item.tools), response=response, usage=u,
                            cost=u.total_tokens * price, metadata={"bfcl_id": item.id}))
    return traces
