"""A broken specialist artifact disables that specialist only (issue 15): an unreadable manifest leaves
that version out of the registry, and a specialist that cannot load is disabled by its circuit breaker
(its requests go to the teacher at once, without loading it again) until a retry after a cool-down."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest

from aad_core.schema import ChatRequest, Message
from aad_core.serving.engine import RoutingEngine
from aad_core.specialists import MANIFEST, SpecialistRegistry
from aad_core.workspace import Workspace
from aad_plugins.classifier import FILE

from test_classifier import ToSpecialist, _two_tasks, ws  # noqa: F401  (the fixture)

REQUEST = ChatRequest(messages=[Message(role="user", content="my pin got blocked again")])


def teacher(_request: ChatRequest) -> Message:
    return Message(role="assistant", content="from the teacher")


def _promoted_classifier(ws: Workspace):  # noqa: ANN202, F811
    from aad_core.pipeline.train import run_train

    _two_tasks(ws)
    spec = run_train(ws, cluster_id=0, show_progress=False)[0]
    return SpecialistRegistry(ws).set_promoted(spec.name, spec.version, True, "test")


def test_an_unreadable_manifest_leaves_out_that_version_only(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    spec = _promoted_classifier(ws)
    broken = ws.specialists_dir / "c9-broken" / "1"
    broken.mkdir(parents=True)
    (broken / MANIFEST).write_text("{broken", encoding="utf-8")
    invalid = ws.specialists_dir / "c8-invalid" / "1"
    invalid.mkdir(parents=True)
    (invalid / MANIFEST).write_text('{"name": 5}', encoding="utf-8")
    not_an_object = ws.specialists_dir / "c7-list" / "1"
    not_an_object.mkdir(parents=True)
    (not_an_object / MANIFEST).write_text("[]", encoding="utf-8")

    with caplog.at_level(logging.DEBUG, logger="aad_core.specialists"):
        registry = SpecialistRegistry(ws)
        assert [s.name for s in registry.list()] == [spec.name]
        assert registry.promoted() == {0: registry.get(spec.name)}
        registry.list()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3, "each unreadable manifest is logged once"
    assert any("c9-broken" in r.getMessage() and "aad train" in r.getMessage() for r in errors)

    engine = RoutingEngine(ws, teacher, router=ToSpecialist(spec.name), record=False)
    answers = [engine.answer(REQUEST) for _ in range(3)]
    assert all(a.decision.target == "specialist" and a.message.content == "pin_blocked" for a in answers)
    engine.close()


def test_a_specialist_that_cannot_load_is_disabled_then_retried_after_its_cool_down(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    import aad_core.specialists as registry_module

    spec = _promoted_classifier(ws)
    weights = Path(spec.path) / FILE
    shutil.move(weights, weights.with_suffix(".bak"))
    loads: list[str] = []
    real_load = registry_module.load_predictor

    def counted(s, w):  # noqa: ANN001, ANN202
        loads.append(s.name)
        return real_load(s, w)

    monkeypatch.setattr(registry_module, "load_predictor", counted)
    engine = RoutingEngine(ws, teacher, router=ToSpecialist(spec.name), record=False)
    engine.specialists.retry_after_s = 0.3

    with caplog.at_level(logging.WARNING):
        answers = [engine.answer(REQUEST) for _ in range(6)]
    assert [a.message.content for a in answers] == ["from the teacher"] * 6, "the teacher answers every request"
    assert loads == [spec.name], "the broken artifact is loaded once, not on every request"
    assert all("specialist disabled after a load error" in a.decision.reason for a in answers[1:])
    assert sum("disabled for" in r.getMessage() for r in caplog.records) == 1

    shutil.move(weights.with_suffix(".bak"), weights)  # repaired: after the cool-down one request tries again
    time.sleep(0.35)
    answer = engine.answer(REQUEST)
    assert answer.decision.target == "specialist" and answer.message.content == "pin_blocked"
    assert loads == [spec.name, spec.name]
    assert engine.answer(REQUEST).decision.target == "specialist"
    engine.close()


def test_generation_errors_open_the_breaker_after_three_in_a_row(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from aad_plugins.classifier import ClassifierPredictor

    spec = _promoted_classifier(ws)
    calls: list[int] = []

    def failing(self, requests, *, max_new_tokens=128):  # noqa: ANN001, ANN202
        calls.append(1)
        raise RuntimeError("a bug in the predictor")

    monkeypatch.setattr(ClassifierPredictor, "generate", failing)
    engine = RoutingEngine(ws, teacher, router=ToSpecialist(spec.name), record=False)
    answers = [engine.answer(REQUEST) for _ in range(6)]
    assert all(a.message.content == "from the teacher" for a in answers)
    assert len(calls) == 3, "three errors in a row open the breaker; later requests never reach the predictor"
    assert "specialist disabled after 3 errors (RuntimeError)" in answers[-1].decision.reason
    engine.close()


def test_preload_with_a_broken_specialist_starts_and_sends_its_requests_to_the_teacher(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    import aad_core.specialists as registry_module

    spec = _promoted_classifier(ws)
    (Path(spec.path) / FILE).unlink()
    loads: list[str] = []
    real_load = registry_module.load_predictor
    monkeypatch.setattr(registry_module, "load_predictor", lambda s, w: loads.append(s.name) or real_load(s, w))
    engine = RoutingEngine(ws, teacher, router=ToSpecialist(spec.name), record=False)
    with caplog.at_level(logging.ERROR, logger="aad_core.serving.specialists"):
        engine.specialists.preload()  # what 'aad serve' does before it accepts requests: must not raise
        answers = [engine.answer(REQUEST) for _ in range(3)]
    assert [a.message.content for a in answers] == ["from the teacher"] * 3
    assert loads == [spec.name] and sum("disabled for" in r.getMessage() for r in caplog.records) == 1
    engine.close()
