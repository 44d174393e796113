"""Readers for the public data the demo is assembled from (files inside PyPI wheels, and the
project's shared data folder for banking77). Nothing is downloaded at run time."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from aad_core.errors import AADError

DATA_ENV = "AAD_DEMO_DATA"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AADError(f"The '{name}' package is not installed.", hint=f"Run 'bash scripts/setup' or '{install}'.")
    return Path(list(spec.submodule_search_locations)[0])


def shared_data_dir() -> Path:
    """``$AAD_DEMO_DATA`` or the ``shared/data`` folder beside the repository checkout."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def banking77_rows(split: str = "train") -> list[tuple[str, str]]:
    """(text, intent) pairs of banking77 (PolyAI, CC-BY-4.0)."""
    try:
        from aad_core.datasets import load_banking77  # the project's shared loader, when present
    except ImportError:
        load_banking77 = None
    if load_banking77 is not None:
        rows = load_banking77(split)
        return [_pair(r) for r in rows]
    path = shared_data_dir() / "banking77" / f"{split}.csv"
    if not path.exists():
        raise AADError(f"banking77 not found at {path}.", hint=f"Set {DATA_ENV} to the folder that holds banking77/.")
    with path.open(encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def _pair(row: Any) -> tuple[str, str]:
    if isinstance(row, dict):
        return str(row["text"]), str(row.get("category", row.get("label")))
    if isinstance(row, (tuple, list)):
        return str(row[0]), str(row[1])
    return str(getattr(row, "text")), str(getattr(row, "category", getattr(row, "label", "")))


def bfcl_items(file: str) -> list[dict[str, Any]]:
    """Items of one BFCL v4 file (Apache-2.0), with ``ground_truth`` merged in when it has answers."""
    root = _package_dir("bfcl_eval", "pip install --no-deps bfcl-eval==2026.3.23") / "data"
    items = [json.loads(line) for line in (root / file).read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = root / "possible_answer" / file
    if answers.exists():
        gold = {a["id"]: a["ground_truth"] for a in map(json.loads, answers.read_text(encoding="utf-8").splitlines()) if a}
        for item in items:
            item["ground_truth"] = gold.get(item["id"])
    return items


def defog_questions() -> list[dict[str, str]]:
    """defog sql-eval questions with gold SQLite SQL (Apache-2.0)."""
    path = shared_data_dir() / "defog-sql-eval" / "questions_gen_sqlite.csv"
    if not path.exists():
        raise AADError(f"defog sql-eval questions not found at {path}.", hint=f"Set {DATA_ENV} to the folder that holds defog-sql-eval/.")
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def defog_databases() -> list[str]:
    """Names of the databases the installed ``defog-data`` ships."""
    root = _package_dir("defog_data", "pip install defog-data")
    return sorted(p.name for p in root.iterdir() if (p / f"{p.name}.json").exists())


def defog_schema_text(db_name: str) -> str:
    """A compact ``table(column type, ...)`` schema of one defog-data database (Apache-2.0)."""
    root = _package_dir("defog_data", "pip install defog-data")
    meta = json.loads((root / db_name / f"{db_name}.json").read_text(encoding="utf-8"))["table_metadata"]
    return "\n".join(
        f"{table}({', '.join(c['column_name'] + ' ' + c['data_type'] for c in cols)})" for table, cols in meta.items()
    )
