"""The demo's view of the project's real-data loaders (:mod:`aad_core.demo.datasets`): banking77 pairs,
BFCL items by file, defog questions, and a compact schema that fits the student's token budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from aad_core.errors import AADError


def banking77_rows(split: str = "train") -> list[tuple[str, str]]:
    """(text, intent) pairs of banking77 (PolyAI, CC-BY-4.0)."""
    from aad_core.demo.datasets import load_banking77

    return [(ex.text, ex.label) for ex in load_banking77(split)]


def bfcl_items(category: str) -> list[Any]:
    """BFCL v4 items of one category (Apache-2.0) in file order (the demo samples them itself)."""
    from aad_core.demo.datasets import load_bfcl

    items = load_bfcl(None, 0, (category,))
    return sorted(items, key=lambda it: _natural(it.id))


def _natural(item_id: str) -> tuple[Any, ...]:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", item_id))


def defog_questions() -> list[Any]:
    """defog sql-eval questions over the databases ``defog-data`` ships (Apache-2.0)."""
    from aad_core.demo.datasets import load_defog_questions

    return load_defog_questions()


def defog_schema_text(db_name: str) -> str:
    """A compact ``table(column type, ...)`` schema of one defog-data database: the full
    ``CREATE TABLE`` text of :func:`aad_core.demo.datasets.defog_schema` is several times longer than
    the student's context budget in the demo."""
    spec = importlib.util.find_spec("defog_data")
    if spec is None or not spec.submodule_search_locations:
        raise AADError("The 'defog-data' package is not installed.", hint="Run 'bash scripts/setup' or 'pip install defog-data'.")
    root = Path(list(spec.submodule_search_locations)[0])
    meta = json.loads((root / db_name / f"{db_name}.json").read_text(encoding="utf-8"))["table_metadata"]
    return "\n".join(
        f"{table}({', '.join(c['column_name'] + ' ' + c['data_type'] for c in cols)})" for table, cols in meta.items()
    )
