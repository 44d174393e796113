"""Shadow evaluation, live agreement, automatic demotion and the specialists' promote / demote /
rollback commands. Fast: the keyword router and scripted specialists of test_router, teacher stubs."""

from __future__ import annotations

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from aad_core.cli import app
from aad_core.schema import ChatRequest, Message
from aad_core.serving.shadow import (
    SHADOW_LOG, ShadowEvaluator, demotion_verdict, estimate_tokens, live_agreement, read_jsonl, reason_kind,
    shadow_fraction,
)
from aad_core.specialists import SpecialistRegistry
from aad_core.workspace import Workspace

from test_router import TEACHER_ANSWER, Scripted, engine_for

runner = CliRunner()


def card(i: int) -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=f"my card number {i} has not arrived")])


def register_cards(ws: Workspace, versions: int = 1) -> list:
    """Specialist 'cards' (cluster 0) in the registry, each version promoted."""
    registry = SpecialistRegistry(ws)
    out = []
    for v in range(versions):
        folder = ws.root / f"cards-{v}"
        folder.mkdir()
        (folder / "classifier.npz").write_bytes(b"x")
        spec = registry.save(cluster_id=0, label="cards", adapter_dir=folder, base_model="-", name="cards",
                             kind="classifier", trainer="classifier")
        out.append(registry.set_promoted("cards", spec.version, True, "test"))
    return out


def shadowed(ws: Workspace, *, rate: float = 1.0, score=None, teacher=None, **kwargs):  # noqa: ANN001, ANN003
    eng = engine_for(ws, Scripted('{"intent": "card_arrival"}'))
    if teacher is not None:
        eng.teacher_call = teacher
    eng.shadow = ShadowEvaluator(eng, rate=rate, score=score, **kwargs)
    return eng


def shadow_traces(ws: Workspace) -> list:
    store = ws.store()
    try:
        return list(store.iter_traces(source="shadow"))
    finally:
        store.close()


# -- helpers ----------------------------------------------------------------------------------------
def test_the_shadow_choice_is_fixed_per_request_and_near_the_rate() -> None:
    assert shadow_fraction(card(1)) == shadow_fraction(card(1))
    share = sum(shadow_fraction(card(i)) < 0.05 for i in range(4000)) / 4000
    assert 0.04 < share < 0.06
    assert reason_kind("validator json: invalid JSON") == "validator json" and reason_kind("timeout") == "timeout"
    assert estimate_tokens(card(1), "abcd") >= 8


def test_demotion_needs_enough_pairs_and_a_low_bound(workspace: Workspace) -> None:
    cfg = workspace.config  # target 0.95, alpha 0.05, shadow_min_pairs 60
    assert demotion_verdict(0, 30, cfg) is None  # too few pairs to judge
    assert demotion_verdict(60, 60, cfg) is None  # 60/60: bound 0.951 >= 0.95
    verdict = demotion_verdict(50, 60, cfg)
    assert verdict and "50/60" in verdict and "lower bound" in verdict
    live = live_agreement([{"agree": True}] * 9 + [{"agree": False}], window=5)
    assert (live["k"], live["n"]) == (4, 5) and 0 < live["lower_bound"] < 0.8


# -- shadow evaluation --------------------------------------------------------------------------------
def test_a_shadowed_answer_is_logged_with_the_teachers_answer_and_the_agreement(workspace: Workspace) -> None:
    register_cards(workspace)
    eng = shadowed(workspace)
    answer = eng.answer(card(1))
    assert answer.decision.target == "specialist"
    eng.shadow.wait(5)
    eng.flush()
    (row,) = read_jsonl(workspace.state_dir / SHADOW_LOG)
    assert row["specialist"] == "cards" and row["version"] == 1 and row["cluster_id"] == 0
    assert row["evaluator"] == "json" and row["agree"] is False  # {"intent": "card_arrival"} vs the teacher's
    assert row["cost_usd"] > 0 and "request" not in row  # the log holds no texts
    (trace,) = shadow_traces(workspace)
    assert trace.id == row["trace_id"] and trace.response.content == TEACHER_ANSWER and "shadow" in trace.tags
    assert trace.metadata["aad_shadow"]["specialist_output"] == '{"intent": "card_arrival"}'
    counts = read_jsonl(workspace.state_dir / "serving.jsonl")
    assert sum(r["specialist"] for r in counts) == 1 and sum(r["shadowed"] for r in counts) == 1
    eng.close()


def test_shadow_calls_never_delay_the_users_answer(workspace: Workspace) -> None:
    release = threading.Event()

    def slow_teacher(_request: ChatRequest) -> Message:
        release.wait(10)
        return Message(role="assistant", content=TEACHER_ANSWER)

    eng = shadowed(workspace, teacher=slow_teacher, score=lambda *_: 1.0)
    started = time.perf_counter()
    answers = [eng.answer(card(i)) for i in range(5)]
    elapsed = time.perf_counter() - started
    assert all(a.decision.target == "specialist" for a in answers)
    assert elapsed < 1.0  # the teacher is still blocked: nothing waited for it
    release.set()
    eng.shadow.wait(5)
    eng.flush()
    counts = read_jsonl(workspace.state_dir / "serving.jsonl")
    # Two shadow calls at a time (the default concurrency): the rest were skipped, not queued.
    assert sum(r["shadowed"] for r in counts) == 2
    assert sum(r["shadow_skipped"].get("busy", 0) for r in counts) == 3
    eng.close()


def test_no_shadow_call_at_rate_zero_or_without_a_teacher(workspace: Workspace) -> None:
    eng = shadowed(workspace, rate=0.0)
    eng.answer(card(1))
    assert eng.shadow.wait(1) is None and not (workspace.state_dir / SHADOW_LOG).exists()
    eng.close()
    eng = shadowed(workspace)
    call = eng.route_call(card(2))  # route_call with no teacher_call: an integration that calls its own teacher
    eng.teacher_call = None
    assert eng.shadow.observe(call) is None
    eng.close()


def test_the_teacher_of_the_call_answers_its_shadow(workspace: Workspace) -> None:
    """'aad serve' passes its upstream teacher per request (RoutingEngine.answer(request, teacher_call))."""
    eng = shadowed(workspace, score=lambda *_: 1.0)
    eng.teacher_call = None
    seen = []

    def upstream(request: ChatRequest) -> Message:
        seen.append(request)
        return Message(role="assistant", content=TEACHER_ANSWER)

    assert eng.answer(card(1), upstream).decision.target == "specialist"
    eng.shadow.wait(5)
    assert len(seen) == 1 and len(read_jsonl(workspace.state_dir / SHADOW_LOG)) == 1
    eng.close()


def test_the_daily_budget_caps_shadow_calls(workspace: Workspace) -> None:
    # 10 USD / 1M tokens: a ~10-token call costs ~1e-4 USD; a budget of 2.5e-4 allows two.
    eng = shadowed(workspace, score=lambda *_: 1.0, budget_usd_per_day=2.5e-4, max_concurrency=1)
    for i in range(6):
        eng.answer(card(i))
        eng.shadow.wait(5)
    eng.flush()
    rows = read_jsonl(workspace.state_dir / SHADOW_LOG)
    assert 1 <= len(rows) <= 3 and sum(r["cost_usd"] for r in rows) <= 2.5e-4
    counts = read_jsonl(workspace.state_dir / "serving.jsonl")
    assert sum(r["shadow_skipped"].get("budget", 0) for r in counts) == 6 - len(rows)
    # A new engine reads what today's calls spent from the log.
    again = shadowed(workspace, score=lambda *_: 1.0, budget_usd_per_day=2.5e-4)
    assert again.shadow.observe(again.route_call(card(99))) is None
    eng.close()
    again.close()


# -- automatic demotion -------------------------------------------------------------------------------
def test_a_specialist_that_disagrees_live_is_demoted_and_stops_serving(workspace: Workspace) -> None:
    register_cards(workspace)
    eng = shadowed(workspace, score=lambda _c, spec, _t: 0.0)
    workspace.config.eval.target_agreement = 0.8  # a bound of 0.8 needs 14 agreeing pairs
    workspace.config.route.shadow_min_pairs = 10
    served = 0
    for i in range(40):
        answer = eng.answer(card(i))
        eng.shadow.wait(5)
        if answer.decision.target != "specialist":
            break
        served += 1
    assert served == 14  # demoted at the first moment the rule can judge: min_calls_for(0.8) = 14 pairs
    assert answer.decision.reason.startswith("demoted: cards: demoted by shadow evaluation")
    spec = SpecialistRegistry(workspace).get("cards")
    manifest = SpecialistRegistry(workspace).manifest(spec)
    assert not spec.promoted and "0/14" in manifest["promotion_reason"]
    events = [r for r in read_jsonl(workspace.state_dir / SHADOW_LOG) if r.get("event") == "demoted"]
    assert len(events) == 1 and events[0]["n"] == 14
    eng.close()

    # Reversible: promoted again by hand, it serves and its live agreement starts afresh.
    result = runner.invoke(app, ["specialists", "promote", "cards", "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert SpecialistRegistry(workspace).get("cards").promoted
    listed = runner.invoke(app, ["specialists", "--json", "-w", str(workspace.root)])
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["promoted"] is True


def test_a_second_demotion_keeps_the_first_until_the_registry_promotes_it_again(workspace: Workspace) -> None:
    register_cards(workspace)
    registry = SpecialistRegistry(workspace)
    folder = workspace.root / "sql-adapter"
    folder.mkdir()
    (folder / "classifier.npz").write_bytes(b"x")
    sql = registry.save(cluster_id=1, label="sql", adapter_dir=folder, base_model="-", name="sql",
                        kind="classifier", trainer="classifier")
    registry.set_promoted("sql", sql.version, True, "test")
    eng = shadowed(workspace, rate=0.0)
    eng.shadow.demote("cards", 1, "demoted by shadow evaluation (test)")
    eng.shadow.demote("sql", sql.version, "demoted by shadow evaluation (test)")
    assert set(eng.demoted) == {"cards", "sql"}
    assert eng.answer(card(0)).decision.reason.startswith("demoted: cards")
    registry.set_promoted("cards", 1, True, "promoted again by hand")
    eng.reload()
    assert set(eng.demoted) == {"sql"} and eng.answer(card(1)).decision.target == "specialist"
    eng.close()


def test_a_demoted_version_hands_its_task_to_the_earlier_promoted_version_at_once(workspace: Workspace) -> None:
    register_cards(workspace, versions=2)
    eng = shadowed(workspace, rate=0.0)
    eng.shadow.demote("cards", 2, "demoted by shadow evaluation (test)")
    assert "cards" not in eng.demoted and SpecialistRegistry(workspace).promoted()[0].version == 1
    assert eng.answer(card(0)).decision.target == "specialist"  # v1 serves, not the teacher until a reload
    eng.shadow.demote("cards", 1, "demoted by shadow evaluation (test)")
    assert "cards" in eng.demoted and eng.answer(card(1)).decision.target == "teacher"
    eng.close()


def test_agreeing_pairs_keep_the_specialist(workspace: Workspace) -> None:
    register_cards(workspace)
    eng = shadowed(workspace, score=lambda *_: 1.0)
    workspace.config.eval.target_agreement = 0.8
    for i in range(20):
        assert eng.answer(card(i)).decision.target == "specialist"
        eng.shadow.wait(5)
    assert SpecialistRegistry(workspace).get("cards").promoted
    eng.close()


# -- promote / demote / rollback --------------------------------------------------------------------
def test_rollback_returns_the_task_to_its_previous_version(workspace: Workspace) -> None:
    register_cards(workspace, versions=2)
    ws = str(workspace.root)
    registry = SpecialistRegistry(workspace)
    assert registry.promoted()[0].version == 2
    result = runner.invoke(app, ["specialists", "rollback", "0", "-w", ws])
    assert result.exit_code == 0, result.output
    assert registry.promoted()[0].version == 1 and "served by cards v1" in result.output
    # Nothing earlier to return to: refused, with the way out.
    result = runner.invoke(app, ["specialists", "rollback", "cards", "-w", ws])
    assert result.exit_code == 1 and "no earlier promoted version" in result.output
    result = runner.invoke(app, ["specialists", "demote", "cards", "-w", ws])
    assert result.exit_code == 0 and 0 not in registry.promoted()
    result = runner.invoke(app, ["specialists", "promote", "cards", "--version", "2", "-w", ws, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["served"]["version"] == 2


def test_a_rollback_serves_the_earlier_version_with_the_threshold_its_own_gate_chose(workspace: Workspace) -> None:
    from aad_core.artifacts import RouterState
    from aad_core.pipeline.evaluate.runner import served_gate

    register_cards(workspace, versions=2)
    registry = SpecialistRegistry(workspace)
    calibration = {"coverage": 0.7, "agreement": 0.97, "lower_bound": 0.951, "n_served": 400, "n": 571}
    for version, threshold in ((1, 0.61), (2, 0.8)):
        registry.set_promoted("cards", version, True, "test", gate=served_gate(
            {"mode": "risk-coverage", "signal": "confidence", "threshold": threshold, "calibration": calibration}))
    RouterState(clusters={0: {"threshold": 0.5, "specialist": "cards", "confidence_threshold": 0.8,
                              "confidence_signal": "confidence"}}).save(workspace)
    ws = str(workspace.root)
    assert runner.invoke(app, ["specialists", "rollback", "0", "-w", ws]).exit_code == 0
    entry = RouterState.load(workspace).clusters[0]
    assert entry["specialist"] == "cards" and entry["confidence_threshold"] == 0.61 and entry["threshold"] == 0.5
    assert runner.invoke(app, ["specialists", "demote", "cards", "-w", ws]).exit_code == 0
    entry = RouterState.load(workspace).clusters[0]
    assert entry["specialist"] is None and entry["confidence_threshold"] is None
    assert runner.invoke(app, ["specialists", "promote", "cards", "--version", "2", "-w", ws]).exit_code == 0
    assert RouterState.load(workspace).clusters[0]["confidence_threshold"] == 0.8


def test_unknown_task_is_a_clear_error(workspace: Workspace) -> None:
    result = runner.invoke(app, ["specialists", "rollback", "nope", "-w", str(workspace.root)])
    assert result.exit_code == 1 and "No task 'nope'" in result.output

