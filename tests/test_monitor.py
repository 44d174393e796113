"""``aad monitor``: served share, live agreement, escalations by reason, drift and cost saved, from the
routing engine's logs. Fast: the keyword router and scripted specialists of test_router."""

from __future__ import annotations

import json
from datetime import date

import pytest
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


# -- drift statistics on synthetic logs ------------------------------------------------------------
def _label_task(ws: Workspace, *, mean_own: float | None = 0.8) -> str:
    """Cluster 0 answers with labels; its specialist was trained on calls answering a, b or c."""
    from aad_core.artifacts import ClusterState
    from aad_core.schema import Cluster
    from aad_core.specialists import SpecialistRegistry
    from tests.conftest import make_trace

    train = [make_trace(f"q{i}", "abc"[i % 3]) for i in range(30)]
    with ws.store() as store:
        store.add(train)
    ClusterState(clusters=[Cluster(id=0, label="intents", size=30, variance=0.1, mean_similarity=0.9, routine=True,
                                   answer_kind="label")],
                 assignments={t.id: 0 for t in train}, split={t.id: "train" for t in train}, dropped={}).save(ws)
    cal = {"threshold": 0.5, "n_own": 30, "own_rejected": 0, "output_kind": "label"}
    RouterState(clusters={0: {**cal, "mean_own_similarity": mean_own} if mean_own is not None else cal}).save(ws)
    folder = ws.root / "spec"
    folder.mkdir()
    (folder / "classifier.npz").write_bytes(b"x")
    registry = SpecialistRegistry(ws)
    spec = registry.save(cluster_id=0, label="intents", adapter_dir=folder, base_model="-", name="intents",
                         kind="classifier", trainer="classifier", selection=[t.id for t in train])
    registry.set_promoted("intents", spec.version, True, "test")
    return spec.name


def _logs(ws: Workspace, *, answers: list[str], escalated: tuple[str, ...] | list[str] = (), similarity: float = 0.8,
          requests: int = 30) -> None:
    """Shadow pairs whose teacher answers are ``answers``, escalations answered ``escalated``, and the
    serving counters of ``requests`` requests at mean similarity ``similarity``."""
    from datetime import datetime, timezone

    from aad_core.serving.shadow import SERVING_LOG, SHADOW_LOG
    from tests.conftest import make_trace

    now = datetime.now(timezone.utc)
    day = date.today().isoformat()
    shadow = [make_trace(f"s{i}", a).model_copy(update={"source": "shadow"}) for i, a in enumerate(answers)]
    esc = [make_trace(f"e{i}", a).model_copy(update={"source": "router", "metadata": {"aad_escalation": {
        "cluster_id": 0}}}) for i, a in enumerate(escalated)]
    with ws.store() as store:
        store.add(shadow + esc)
    ws.state_path(SHADOW_LOG).write_text("".join(json.dumps({
        "event": "pair", "time": now.isoformat(), "day": day, "trace_id": t.id, "cluster_id": 0,
        "specialist": "intents", "version": 1, "agree": True, "teacher_model": "t"}) + "\n" for t in shadow))
    ws.state_path(SERVING_LOG).write_text(json.dumps({
        "day": day, "cluster_id": 0, "requests": requests, "specialist": requests, "teacher": 0,
        "below_threshold": 0, "escalations": {}, "similarity_sum": similarity * requests,
        "similarity_n": requests}) + "\n")


def test_new_labels_in_the_teachers_answers_are_flagged(workspace: Workspace) -> None:
    _label_task(workspace)
    # 19 shadow pairs + 1 escalation = 20 teacher answers; 2 new ("D" in a pair, "e" in an escalation): 10 % > 5 %
    _logs(workspace, answers=["a", "B "] * 9 + ["d"], escalated=["e"])
    (task,) = monitor_summary(workspace)["tasks"]
    stat = task["new_labels"]
    assert (stat["n"], stat["new"], stat["n_training_labels"]) == (20, 2, 3) and stat["share"] == 0.1
    assert stat["labels"] == {"d": 1, "e": 1} and stat["drift"] is True
    assert task["drift_flags"] == ["new labels"]
    result = runner.invoke(app, ["monitor", "-w", str(workspace.root)])
    assert "drift: new labels" in result.output and "2/20" in result.output and "'d' x1" in result.output


@pytest.mark.parametrize("answers,escalated", [(["a"] * 19, ["z"]),  # 1 of 20 = 5 %: not above 5 %
                                               (["a"] * 5 + ["z"] * 5, [])])  # half new, but only 10 answers
def test_new_labels_need_a_share_above_5_percent_of_at_least_20_answers(workspace: Workspace, answers: list[str],
                                                                        escalated: list[str]) -> None:
    _label_task(workspace)
    _logs(workspace, answers=answers, escalated=escalated)
    (task,) = monitor_summary(workspace)["tasks"]
    assert task["new_labels"]["new"] > 0 and task["new_labels"]["drift"] is False and task["drift_flags"] == []


@pytest.mark.parametrize("similarity,requests,flagged", [(0.74, 30, True), (0.76, 30, False), (0.5, 19, False)])
def test_embedding_shift_against_the_training_calls(workspace: Workspace, similarity: float, requests: int,
                                                    flagged: bool) -> None:
    _label_task(workspace)  # training calls: mean similarity 0.8 (router.json)
    _logs(workspace, answers=["a"], similarity=similarity, requests=requests)
    (task,) = monitor_summary(workspace)["tasks"]
    shift = task["embedding_shift"]
    assert shift["training"] == 0.8 and shift["n"] == requests and abs(shift["drop"] - (0.8 - similarity)) < 1e-9
    assert shift["drift"] is flagged and ("embedding shift" in task["drift_flags"]) is flagged


def test_no_embedding_shift_without_the_calibrated_mean(workspace: Workspace) -> None:
    _label_task(workspace, mean_own=None)  # a router.json written before the figure existed
    _logs(workspace, answers=["a"], similarity=0.1)
    (task,) = monitor_summary(workspace)["tasks"]
    assert task["embedding_shift"] is None and task["drift_flags"] == []
