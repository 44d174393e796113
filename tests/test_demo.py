"""The demo workload builder: nodes, OpenAI format, valid tool calls, determinism, attribution."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from aad_core.config import load_config
from aad_core.demo import ATTRIBUTION, build_traces, create_demo_workspace, demo_config_toml
from aad_core.demo.agentdojo_tasks import load_tasks, load_tool_schemas
from aad_core.demo.generated import generate_tickets
from aad_core.capture.ingest import parse_openai_chat

SMALL = {"intent": 12, "extract": 10, "tool_call": 8, "no_tool": 6, "sql": 7, "plan": 9}


@pytest.fixture(autouse=True)
def _shared_data(shared_dir, monkeypatch):
    monkeypatch.setenv("AAD_DATA_DIR", str(shared_dir / "data"))


def test_every_node_has_its_requested_size_and_parses_as_openai_chat():
    records = build_traces(seed=0, sizes=SMALL)
    assert Counter(r["task"] for r in records) == Counter(SMALL)
    for rec in records:
        trace = parse_openai_chat(rec)
        assert trace.source == "demo" and trace.task in SMALL
        assert trace.request.messages[0].role == "system" and trace.request.messages[1].role == "user"
        assert trace.usage is not None and trace.usage.total_tokens == trace.usage.prompt_tokens + trace.usage.completion_tokens
        assert trace.latency_ms > 0 and trace.cost > 0
        assert rec["metadata"]["attribution"] == ATTRIBUTION[trace.task]


def test_tool_calls_are_valid_json_and_name_a_bound_tool():
    records = build_traces(seed=1, sizes=SMALL)
    with_calls = [r for r in records if r["task"] in ("tool_call", "plan")]
    assert with_calls
    for rec in with_calls:
        message = rec["response"]["choices"][0]["message"]
        bound = {t["function"]["name"] for t in rec["request"]["tools"]}
        assert message["tool_calls"], rec["task"]
        for call in message["tool_calls"]:
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
            assert call["function"]["name"] in bound
            assert re.fullmatch(r"[a-zA-Z0-9_-]+", call["function"]["name"])
        for tool in rec["request"]["tools"]:
            assert tool["type"] == "function" and tool["function"]["parameters"]["type"] == "object"
    # irrelevance items: tools are bound but the teacher calls none of them
    for rec in (r for r in records if r["task"] == "no_tool"):
        assert rec["request"]["tools"] and "tool_calls" not in rec["response"]["choices"][0]["message"]


def test_plan_tasks_are_multi_step_agentdojo_solutions():
    tasks = load_tasks()
    assert len(tasks) >= 80 and {t.suite for t in tasks} == {"banking", "slack", "travel", "workspace"}
    assert sum(len(t.calls) >= 2 for t in tasks) >= 40
    schemas = load_tool_schemas()
    assert all(name in schemas for t in tasks for name, _ in t.calls)
    first = next(t for t in tasks if t.task_id == "banking/UserTask0")
    assert [n for n, _ in first.calls] == ["read_file", "send_money"]
    assert first.calls[1][1]["recipient"] == "UK12345678901234567890"


def test_same_seed_same_workload_other_seed_differs():
    a, b, c = build_traces(3, SMALL), build_traces(3, SMALL), build_traces(4, SMALL)
    assert a == b
    assert a != c
    assert generate_tickets(5, 0)[0].answer == generate_tickets(5, 0)[0].answer


def test_demo_config_is_valid_and_carries_the_demo_values(tmp_path):
    path = tmp_path / "aad.toml"
    path.write_text(demo_config_toml({("trainer.qlora", "max_steps"): 3}), encoding="utf-8")
    cfg = load_config(path)
    trainer = cfg.component_table("trainer", "qlora")
    assert trainer["max_steps"] == 3 and cfg.eval.max_heldout == 24 and cfg.train.max_length == 160
    # Training itself follows the trainer's defaults: besides the length cap, the demo sets no batch, steps or rate.
    marked = {line.split(" =")[0] for line in path.read_text(encoding="utf-8").splitlines() if line.endswith("# demo")}
    assert marked == {"fraction", "max_length", "max_steps", "max_new_tokens", "max_heldout"}  # max_steps: this test's
    assert trainer["batch_size"] == 16 and trainer["learning_rate"] == 1e-3  # the defaults


def test_demo_workspace_is_ingested_idempotently_with_attribution(tmp_path):
    ws = create_demo_workspace(tmp_path / "demo", sizes=SMALL, redact=False)
    with ws.store() as store:
        stats = store.stats()
    assert stats["traces"] == sum(SMALL.values())
    assert stats["by_task"] == SMALL
    readme = (ws.root / "README.md").read_text(encoding="utf-8")
    for needle in ("CC-BY-4.0", "banking77", "Apache-2.0", "AgentDojo", "MIT", "generated"):
        assert needle in readme
    create_demo_workspace(tmp_path / "demo", sizes=SMALL, redact=False)  # again: nothing added
    with ws.store() as store:
        assert store.count() == sum(SMALL.values())


def test_refuses_a_folder_that_is_not_a_workspace(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    from aad_core.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="not an aad workspace"):
        create_demo_workspace(tmp_path, sizes=SMALL, redact=False)


def test_the_data_ships_with_aad_and_aad_data_dir_overrides_it(monkeypatch, tmp_path) -> None:
    """A clone with nothing beside it (no ../shared) has the demo's data: it is package data."""
    from pathlib import Path

    import aad_core
    from aad_core.demo.datasets import DATA_DIR_ENV, data_dir, load_banking77, load_defog_questions
    from aad_core.errors import AADError

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    packaged = Path(aad_core.__file__).parent / "demo" / "data"
    assert data_dir() == packaged
    for folder in ("banking77", "defog-sql-eval"):
        assert (packaged / folder / "LICENSE").is_file() and (packaged / folder / "README.md").is_file()
    assert len(load_banking77("train")) == 10_003 and len(load_banking77("test")) == 3_080
    assert len(load_defog_questions(with_schema_only=False)) > 200  # 236 rows, some without a usable query
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(AADError, match="nowhere"):
        data_dir()
