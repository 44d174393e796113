"""``aad monitor``: served share, live agreement, escalations by reason, drift and cost saved, from the
routing engine's logs. Fast: the keyword router and scripted specialists of test_router."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from aad_core.artifacts import RouterState
from aad_core.cli import app
from aad_core.schema import ChatRequest, Message
from aad_core.serving.monitor import monitor_summary
from aad_core.serving.shadow import ShadowEvaluator
from aad_core.workspace import Workspace

from test_router import TEACHER_ANSWER, Scripted, engine_for
from test_shadow import card, register_cards

runner = CliRunner()


def other(i: int) -> ChatRequest:
    """Between the two clusters: nearest is cluster 0 at cosine 0.71, below its threshold 0.9."""
    return ChatRequest(messages=[Message(role="user", content=f"tell me something new, number {i}")])


def teacher_named(model: str):  # noqa: ANN201
    def call(_request: ChatRequest) -> dict:
        return {"model": model, "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
                "choices": [{"message": {"role": "assistant", "content": TEACHER_ANSWER}}]}
    return call


def serve_some_traffic(ws: Workspace) -> None:
    register_cards(ws)
    eng = engine_for(ws, Scripted('{"intent": "card_arrival"}'))
    eng.shadow = ShadowEvaluator(eng, rate=1.0, score=lambda *_: 1.0)
    for i in range(4):
        eng.teacher_call = teacher_named("teacher-a" if i < 2 else "teacher-b")
        eng.answer(card(i))
        eng.shadow.wait(5)
    for i in range(25):
        assert eng.answer(other(i)).decision.target == "teacher"
    eng.close()
    broken = engine_for(ws, Scripted("{broken"))
    broken.shadow = ShadowEvaluator(broken, rate=1.0)
    for i in range(2):
        assert broken.answer(card(10 + i)).decision.escalated
    broken.close()
    RouterState(clusters={0: {"threshold": 0.9, "n_own": 100, "own_rejected": 2, "output_kind": "json"},
                          1: {"threshold": 0.9, "n_own": 50, "own_rejected": 1, "output_kind": "sql"}}).save(ws)


def test_the_summary_per_task(workspace: Workspace) -> None:
    serve_some_traffic(workspace)
    summary = monitor_summary(workspace)
    (task,) = summary["tasks"]
    assert task["cluster_id"] == 0 and task["specialist"] == "cards" and task["version"] == 1
    assert task["requests"] == 31 and task["served"] == 4 and abs(task["served_share"] - 4 / 31) < 1e-9
    assert task["escalations"] == {"validator json": 2}
    assert (task["agreeing_pairs"], task["window_pairs"], task["shadow_pairs"]) == (4, 4, 4)
    assert task["live_agreement"] == 1.0 and 0.4 < task["lower_bound"] < 0.5  # 4 of 4: 0.05 ** (1/4) = 0.473
    assert abs(task["below_threshold_share"] - 25 / 31) < 1e-9 and task["calibration_below_share"] == 0.02
    assert task["drift"] is True
    assert task["teacher_models"] == ["teacher-a", "teacher-b"] and task["teacher_model_changed"]
    assert task["saved_usd"] > 0 and summary["total"]["served"] == 4


def test_the_cli_table_and_json(workspace: Workspace) -> None:
    ws = str(workspace.root)
    empty = runner.invoke(app, ["monitor", "-w", ws])
    assert empty.exit_code == 0 and "Nothing routed yet" in empty.output
    serve_some_traffic(workspace)
    result = runner.invoke(app, ["monitor", "-w", ws])
    assert result.exit_code == 0, result.output
    assert "cards v1" in result.output and "validator json 2" in result.output
    assert "drift" in result.output and "teacher changed: teacher-a -> teacher-b" in result.output
    data = json.loads(runner.invoke(app, ["monitor", "--json", "--days", "0", "-w", ws]).output)
    assert data["days"] is None and data["tasks"][0]["served"] == 4
