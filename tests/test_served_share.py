"""benchmarks/served_share.py on a tiny workspace: the keyword router and scripted specialist of
test_router.py serve the card questions, the teacher stub answers the rest."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from aad_core.artifacts import ClusterState, EvalReport
from aad_core.schema import Cluster
from aad_core.serving.engine import RoutingEngine
from aad_core.workspace import Workspace

from conftest import make_trace
from test_router import INTENT_SYSTEM, Scripted, make_router

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "served_share.py"
HEADLINE = re.compile(r"^served share \d\.\d\d of calls at agreement \d\.\d{3}; "
                      r"promoted \d+ of 5 routine nodes; plan served \d\.\d{3}$")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("served_share", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the teacher stub's annotations through it
    spec.loader.exec_module(module)
    return module


def _cluster(cid: int, task: str, size: int, routine: bool) -> Cluster:
    return Cluster(id=cid, label=task, size=size, variance=0.1, mean_similarity=0.9, routine=routine, task=task)


@pytest.fixture
def tiny(workspace: Workspace) -> Workspace:
    """Two card questions (cluster 0, intent: the specialist answers card_arrival, right once) and
    one plan request (cluster 1: the teacher), all held out; a training call that must not count."""
    traces = [
        make_trace("my card has not arrived", '{"intent": "card_arrival"}', system=INTENT_SYSTEM, task="intent",
                   id="intent-a"),
        make_trace("my card was swallowed by the machine", '{"intent": "card_swallowed"}', system=INTENT_SYSTEM,
                   task="intent", id="intent-b"),
        make_trace("where is my card", '{"intent": "card_arrival"}', system=INTENT_SYSTEM, task="intent",
                   id="intent-train"),
        make_trace("Plan a three day hiking trip in the Alps", "Day 1: ...", task="plan", id="plan-a"),
    ]
    store = workspace.store()
    store.add(traces)
    store.close()
    ClusterState(clusters=[_cluster(0, "intent", 3, True), _cluster(1, "plan", 1, False)],
                 assignments={"intent-a": 0, "intent-b": 0, "intent-train": 0, "plan-a": 1},
                 split={"intent-a": "heldout", "intent-b": "heldout", "intent-train": "train", "plan-a": "heldout"},
                 dropped={}).save(workspace)
    EvalReport(clusters=[{"cluster_id": 0, "status": "evaluated", "evaluator": "json", "promoted": True},
                         {"cluster_id": 1, "status": "no specialist", "promoted": False}]).save(workspace)
    return workspace


def test_served_share_routes_every_heldout_call(tiny: Workspace, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    backend = Scripted('{"intent": "card_arrival"}')
    engine = RoutingEngine(tiny, router=make_router(tiny, {0: "cards"}), specialists=backend, record=False)
    engine._cluster_info = {0: {"output_kind": "json"}}
    out = tmp_path / "figures.json"

    fig = _script().main(["--workspace", str(tiny.root), "--json", str(out)], engine=engine)

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == ("served share 0.67 of calls at agreement 0.500; promoted 1 of 5 routine nodes; "
                         "plan served 0.000")
    assert HEADLINE.match(lines[-1])
    assert any(line.split()[:4] == ["intent", "2", "1.000", "0.500"] for line in lines)
    assert any(line.split()[:5] == ["plan", "1", "0.000", "-", "-"] for line in lines)
    assert backend.calls == ["cards", "cards"]  # the training call is not routed
    assert fig["calls"] == 3 and fig["served"] == 2 and fig["routine_nodes_served"] == ["intent"]
    assert fig["teacher_calls"] == fig["teacher_answers_as_recorded"] == 1  # the stub answered as recorded
    assert json.loads(out.read_text(encoding="utf-8"))["headline"] == lines[-1]
    store = tiny.store()
    try:
        assert store.count() == 4  # nothing recorded into the workspace
    finally:
        store.close()


def test_the_teacher_stub_answers_tool_calls_as_recorded() -> None:
    from aad_core.schema import FunctionCall, Message, ToolCall

    module = _script()
    trace = make_trace("What is 2 + 3?", "", task="tool_call")
    trace.response = Message(role="assistant", content=None, tool_calls=[
        ToolCall(id="c1", function=FunctionCall(name="add", arguments='{"a": 2, "b": 3}'))])
    teacher = module.RecordedTeacher()
    teacher.add(module.lc_messages(trace), module.recorded_answer(trace))
    reply = teacher.invoke(module.lc_messages(trace))
    assert reply.tool_calls[0]["name"] == "add" and reply.tool_calls[0]["args"] == {"a": 2, "b": 3}
    from aad_core.formats.answers import answer_string

    assert module.answer_text(reply) == answer_string(trace)
    with pytest.raises(KeyError):
        teacher.invoke("an unrecorded request")


def test_calls_a_promoted_specialist_trained_on_are_left_out_and_their_node_keeps_its_weight(
        tiny: Workspace, tmp_path: Path) -> None:
    from aad_core.specialists import SpecialistRegistry

    folder = tmp_path / "fitted"
    folder.mkdir()
    (folder / "classifier.npz").write_bytes(b"-")  # never loaded: the engine's specialists are scripted
    registry = SpecialistRegistry(tiny)
    spec = registry.save(cluster_id=0, label="intent", adapter_dir=folder, base_model="-", kind="classifier",
                         trainer="classifier", metrics={"heldout_trained_on": ["intent-b"]})
    registry.set_promoted(spec.name, spec.version, True, "test")
    backend = Scripted('{"intent": "card_arrival"}')
    engine = RoutingEngine(tiny, router=make_router(tiny, {0: "cards"}), specialists=backend, record=False)
    engine._cluster_info = {0: {"output_kind": "json"}}

    fig = _script().main(["--workspace", str(tiny.root)], engine=engine)

    assert backend.calls == ["cards"] and fig["calls"] == 2 and fig["left_out"] == 1
    # intent keeps its 2 of 3 held-out calls' weight: 2/3 x served 1.0 + 1/3 x plan 0.0
    assert fig["served_share"] == pytest.approx(2 / 3) and fig["agreement"] == pytest.approx(1.0)
    assert fig["per_node"]["intent"]["calls"] == 1 and fig["per_node"]["intent"]["heldout_calls"] == 2


def test_a_node_whose_every_heldout_call_was_trained_on_is_named(tiny: Workspace, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from aad_core.specialists import SpecialistRegistry

    folder = tmp_path / "fitted"
    folder.mkdir()
    (folder / "classifier.npz").write_bytes(b"-")  # never loaded: the engine's specialists are scripted
    registry = SpecialistRegistry(tiny)
    spec = registry.save(cluster_id=0, label="intent", adapter_dir=folder, base_model="-", kind="classifier",
                         trainer="classifier", metrics={"heldout_trained_on": ["intent-a", "intent-b"]})
    registry.set_promoted(spec.name, spec.version, True, "test")
    engine = RoutingEngine(tiny, router=make_router(tiny, {0: "cards"}), specialists=Scripted("x"), record=False)

    fig = _script().main(["--workspace", str(tiny.root)], engine=engine)

    assert fig["calls"] == 1 and fig["left_out"] == 2 and fig["unmeasured_nodes"] == ["intent"]
    assert "every held-out call of intent was left out" in capsys.readouterr().out
