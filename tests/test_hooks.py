"""Every hook, dispatched by pluggy through aad's PluginManager.

* Each hookspec in aad_core/plugins/hookspecs.py is implemented by tests/plugins/aad_hook_tester.py and
  exercised by a ``test_hook_<name>`` test here through aad's own code path (the meta-test below fails
  when a new hookspec lacks either, in the spirit of datasette's ``test_plugin_hooks_have_tests``).
* ``tryfirst``, ``trylast``, ``wrapper=True`` and ``hookwrapper=True`` observers run in the order pluggy
  documents; an observer that raises is logged with its plugin's name and the others still run.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest
from conftest import make_trace

from aad_core import hookimpl
from aad_core.plugins import PluginManager, Router, get_plugin_manager, hookspecs
from aad_core.schema import ChatRequest, Message, RoutingDecision

sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))
import aad_hook_tester as tester  # noqa: E402

NAME = tester.NAME


def hookspec_names() -> list[str]:
    return sorted(n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("aad_"))


@pytest.fixture
def pm() -> PluginManager:
    """The process-wide manager (so aad's code paths see it) with the test plugin added."""
    for seen in tester.SEEN.values():
        seen.clear()
    manager = get_plugin_manager()
    manager.add_plugin(tester, name="hook_tester", distribution="aad-hook-tester", version="0.0.1")
    return manager


@pytest.fixture
def ws(workspace, monkeypatch):  # noqa: ANN001, ANN201
    """A workspace whose pipeline uses the hook-tester components, tuned for a few dozen traces."""
    for key, value in {"EMBED__EMBEDDER": NAME, "EMBED__VIEW": '["last_user"]', "CLUSTER__CLUSTERER": NAME, "CLUSTER__UNIT": "topic",
                       "CLUSTER__MIN_SIZE": "4", "CLUSTER__VARIANCE_THRESHOLD": "0.9",
                       "SELECT__SCORER": NAME, "SELECT__SELECTOR": NAME, "TRAIN__TRAINER": NAME,
                       "ROUTE__ROUTER": NAME, "CAPTURE__REDACT": "false"}.items():
        monkeypatch.setenv(f"AAD_{key}", value)
    workspace.__dict__.pop("config", None)
    return workspace


TASKS = (("where is my card", "card_arrival"), ("what is the exchange rate today", "exchange_rate"))
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def _clustered(ws: Any) -> Any:
    from aad_core.pipeline.cluster import run_cluster

    traces = [make_trace(f"{q} {w}", f"{a} " + "because " * (i % 4)) for q, a in TASKS for i, w in enumerate(WORDS)]
    with ws.store() as store:
        store.add(traces)
    return run_cluster(ws, show_progress=False)


# -- the meta-test ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_is_implemented_by_the_test_plugin_and_tested(hook: str) -> None:
    impl = getattr(tester, hook, None)
    assert impl is not None and hasattr(impl, f"{hookspecs.PROJECT_NAME}_impl"), \
        f"tests/plugins/aad_hook_tester.py does not implement {hook}"
    assert callable(globals().get(f"test_hook_{hook}")), f"tests/test_hooks.py has no test_hook_{hook}"


def test_the_test_plugin_registers_one_component_per_kind(pm: PluginManager) -> None:
    info = pm.plugins["hook_tester"]
    assert info.status == "loaded" and info.error is None
    assert info.hooks == hookspec_names()
    assert sorted(c["kind"] for c in info.components) == sorted(hookspecs_kinds())
    for c in pm.registry.items():
        if c.name == NAME:
            assert (c.plugin, c.distribution, c.version) == ("hook_tester", "aad-hook-tester", "0.0.1")


def hookspecs_kinds() -> list[str]:
    return [n[len("aad_register_"):-1] for n in hookspec_names() if n.startswith("aad_register_")]


# -- registration hooks, each through the stage that uses the component ------------------------------
def test_hook_aad_register_redactors(pm: PluginManager, ws: Any) -> None:
    from aad_core.capture import CaptureWriter
    from aad_core.config import AADSettings

    w = CaptureWriter(workspace=ws, config=AADSettings(capture={"redact": True, "redactor": NAME}))
    trace = make_trace("my secret is 42", "ok")
    w.submit(trace)
    assert w.flush(10)
    stored = w.store.get(trace.id)
    w.close()
    assert stored.redacted and stored.request.last_user_message() == "my <SECRET_1> is 42"


def test_hook_aad_register_embedders(pm: PluginManager, ws: Any) -> None:
    state = _clustered(ws)
    assert state.embedder == NAME and state.model_id == f"hook-tester-bow-{tester.DIM}"
    assert len(state.clusters[0].centroid) == tester.DIM


def test_hook_aad_register_clusterers(pm: PluginManager, ws: Any) -> None:
    state = _clustered(ws)
    assert len(state.clusters) == 2 and all(c.routine for c in state.clusters)
    by_cluster: dict[int, set[str]] = {}
    with ws.store() as store:
        for t in store.iter_traces(ids=list(state.assignments)):
            by_cluster.setdefault(state.assignments[t.id], set()).add(t.answer_text().split()[0])
    assert sorted(map(sorted, by_cluster.values())) == [["card_arrival"], ["exchange_rate"]]


def test_hook_aad_register_scorers(pm: PluginManager, ws: Any) -> None:
    from aad_core.pipeline.select import run_select

    _clustered(ws)
    artifact = run_select(ws, fraction=0.3, show_progress=False)
    assert artifact["scorer"] == NAME
    with ws.store() as store:
        words = {t.id: len(t.answer_text().split()) for t in store.iter_traces()}
    for entry in artifact["clusters"].values():
        assert entry["scores"] and all(s == {"score": float(words[tid])} for tid, s in entry["scores"].items())


def test_hook_aad_register_selectors(pm: PluginManager, ws: Any) -> None:
    from aad_core.pipeline.select import run_select

    _clustered(ws)
    artifact = run_select(ws, fraction=0.3, show_progress=False)
    assert artifact["selector"] == NAME
    for entry in artifact["clusters"].values():
        scores = {tid: s["score"] for tid, s in entry["scores"].items()}
        cut = sorted(scores.values(), reverse=True)[len(entry["selected"]) - 1]
        assert entry["selected"] and all(scores[tid] >= cut for tid in entry["selected"])


def test_hook_aad_register_trainers(pm: PluginManager, ws: Any) -> None:
    from aad_core.pipeline.select import run_select
    from aad_core.pipeline.train import run_train

    _clustered(ws)
    run_select(ws, fraction=0.5, show_progress=False)
    specs = run_train(ws, show_progress=False)
    assert len(specs) == 2
    assert all(s.metrics["n_train"] >= 1 for s in specs)
    assert [s.name for s in tester.SEEN["aad_specialist_trained"]] == [s.name for s in specs]


def test_hook_aad_register_evaluators(pm: PluginManager) -> None:
    from aad_core.plugins import create_component

    evaluator = create_component("evaluator", NAME)
    assert isinstance(evaluator, tester.TinyEvaluator)
    assert evaluator.evaluate(["a", "b"], ["a", "c"]) == {"score": 0.5, "n": 2, "metric": "exact"}


def test_hook_aad_register_routers(pm: PluginManager, ws: Any) -> None:
    from aad_core.serving.engine import RoutingEngine

    engine = RoutingEngine(ws)  # builds [route] router from the registry
    decisions = engine.decide([ChatRequest(messages=[Message(role="user", content="hi")])])
    assert isinstance(engine.router, tester.TinyRouter) and engine.router.workspace is ws
    assert [d.target for d in decisions] == ["teacher"]


# -- observer hooks, each fired by the code that owns the event --------------------------------------
def test_hook_aad_trace_captured(pm: PluginManager, ws: Any) -> None:
    from aad_core.capture import CaptureWriter
    from aad_core.config import AADSettings

    w = CaptureWriter(workspace=ws, config=AADSettings(capture={"redact": False, "batch_size": 2}))
    traces = [make_trace(f"q{i}", "a") for i in range(5)]
    for t in traces:
        w.submit(t)
    assert w.flush(10)
    w.close()
    assert [t.id for batch in tester.SEEN["aad_trace_captured"] for t in batch] == [t.id for t in traces]


def test_hook_aad_specialist_trained(pm: PluginManager, ws: Any, tmp_path: Path) -> None:
    from aad_core.specialists import SpecialistRegistry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    spec = SpecialistRegistry(ws).save(cluster_id=3, label="intents", adapter_dir=adapter, base_model="tiny")
    assert tester.SEEN["aad_specialist_trained"] == [spec]


class EchoRouter(Router):
    """A router built only from the public base class: every request to the teacher."""

    def route(self, requests):  # type: ignore[no-untyped-def]
        return [RoutingDecision(target="teacher", reason="echo") for _ in requests]


def test_hook_aad_request_routed(pm: PluginManager, ws: Any) -> None:
    from aad_core.serving.engine import RoutingEngine

    engine = RoutingEngine(ws, router=EchoRouter())
    requests = [ChatRequest(messages=[Message(role="user", content=f"q{i}")]) for i in range(3)]
    decisions = engine.decide(requests)
    assert tester.SEEN["aad_request_routed"] == [decisions]


# -- dispatch order: as pluggy documents -------------------------------------------------------------
def _ordering_plugins(calls: list[str]) -> list[tuple[str, object]]:
    class TryFirst:
        @hookimpl(tryfirst=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append("tryfirst")

    class Plain:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        @hookimpl
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append(self.tag)

    class TryLast:
        @hookimpl(trylast=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append("trylast")

    class Wrapper:
        @hookimpl(wrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append("wrapper:before")
            result = yield
            calls.append(f"wrapper:after {result!r}")
            return result

    class OldWrapper:
        @hookimpl(hookwrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append("hookwrapper:before")
            outcome = yield
            calls.append(f"hookwrapper:after {outcome.get_result()!r}")

    # tryfirst and wrappers registered first, trylast in the middle: order must come from the markers.
    return [("old_wrapper", OldWrapper()), ("tryfirst", TryFirst()), ("plain_a", Plain("plain_a")),
            ("trylast", TryLast()), ("wrapper", Wrapper()), ("plain_b", Plain("plain_b"))]


EXPECTED_ORDER = ["wrapper:before", "hookwrapper:before", "tryfirst", "plain_b", "plain_a", "trylast",
                  "hookwrapper:after []", "wrapper:after []"]


def test_observers_run_in_the_order_pluggy_documents() -> None:
    calls: list[str] = []
    pm = PluginManager(load_entry_points=False)
    for name, plugin in _ordering_plugins(calls):
        pm.add_plugin(plugin, name=name)
    pm.hooks.request_routed([RoutingDecision(target="teacher", reason="test")])
    assert calls == EXPECTED_ORDER

    # The same plugins on a bare pluggy manager with aad's hookspecs: the same order.
    bare_calls: list[str] = []
    bare = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    bare.add_hookspecs(hookspecs)
    for name, plugin in _ordering_plugins(bare_calls):
        bare.register(plugin, name=name)
    bare.hook.aad_request_routed(decisions=[RoutingDecision(target="teacher", reason="test")])
    assert bare_calls == calls


def test_wrapper_sees_every_observer_of_every_observer_hook() -> None:
    seen: list[tuple[str, str]] = []

    class Wrapping:
        @hookimpl(wrapper=True)
        def aad_trace_captured(self, traces):  # type: ignore[no-untyped-def]
            seen.append(("aad_trace_captured", "before"))
            result = yield
            seen.append(("aad_trace_captured", "after"))
            return result

        @hookimpl(wrapper=True)
        def aad_specialist_trained(self, specialist):  # type: ignore[no-untyped-def]
            seen.append(("aad_specialist_trained", "before"))
            result = yield
            seen.append(("aad_specialist_trained", "after"))
            return result

        @hookimpl(wrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            seen.append(("aad_request_routed", "before"))
            result = yield
            seen.append(("aad_request_routed", "after"))
            return result

    class Observer:
        @hookimpl
        def aad_trace_captured(self, traces):  # type: ignore[no-untyped-def]
            seen.append(("aad_trace_captured", "observer"))

        @hookimpl
        def aad_specialist_trained(self, specialist):  # type: ignore[no-untyped-def]
            seen.append(("aad_specialist_trained", "observer"))

        @hookimpl
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            seen.append(("aad_request_routed", "observer"))

    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(Wrapping(), name="wrapping")  # registered first, still outermost
    pm.add_plugin(Observer(), name="observer")
    pm.hooks.trace_captured([make_trace("q", "a")])
    pm.hooks.specialist_trained(None)  # type: ignore[arg-type]
    pm.hooks.request_routed([])
    assert seen == [(h, step) for h in ("aad_trace_captured", "aad_specialist_trained", "aad_request_routed")
                    for step in ("before", "observer", "after")]


# -- a raising observer is logged; the others still run ----------------------------------------------
def _raising_plugins(calls: list[str]) -> list[tuple[str, object]]:
    class RaisesFirst:
        @hookimpl(tryfirst=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            raise RuntimeError("tryfirst observer bug")

    class RaisesPlain:
        @hookimpl
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            raise KeyError("plain observer bug")

    class WrapperRaisesBefore:
        @hookimpl(wrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            raise ValueError("wrapper bug before yield")
            yield  # pragma: no cover

    class WrapperRaisesAfter:
        @hookimpl(wrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            yield
            raise ValueError("wrapper bug after yield")

    class OldWrapperRaisesAfter:
        @hookimpl(hookwrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            yield
            raise ValueError("hookwrapper bug after yield")

    class Recorder:
        @hookimpl
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append("recorder")

    class GoodWrapper:
        @hookimpl(wrapper=True)
        def aad_request_routed(self, decisions):  # type: ignore[no-untyped-def]
            calls.append("good wrapper:before")
            result = yield
            calls.append("good wrapper:after")
            return result

    return [("good_wrapper", GoodWrapper()), ("recorder", Recorder()), ("raises_first", RaisesFirst()),
            ("raises_plain", RaisesPlain()), ("wrapper_before", WrapperRaisesBefore()),
            ("wrapper_after", WrapperRaisesAfter()), ("old_wrapper_after", OldWrapperRaisesAfter())]


def test_raising_observers_are_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    pm = PluginManager(load_entry_points=False)
    for name, plugin in _raising_plugins(calls):
        pm.add_plugin(plugin, name=name, distribution=f"dist-{name}" if name == "raises_plain" else None,
                      version="1.2" if name == "raises_plain" else None)
    with caplog.at_level(logging.ERROR, logger="aad_core.plugins.observers"):
        pm.hooks.request_routed([RoutingDecision(target="teacher", reason="test")])
        pm.hooks.request_routed([RoutingDecision(target="teacher", reason="again")])
    assert calls == ["good wrapper:before", "recorder", "good wrapper:after"] * 2
    text = caplog.text
    for plugin, message in (("raises_first", "tryfirst observer bug"), ("raises_plain", "plain observer bug"),
                            ("wrapper_before", "wrapper bug before yield"),
                            ("wrapper_after", "wrapper bug after yield"),
                            ("old_wrapper_after", "hookwrapper bug after yield")):
        assert f"aad observer aad_request_routed of plugin {plugin!r}" in text
        assert message in text
    assert "plugin 'raises_plain' (dist-raises_plain 1.2)" in text
    assert sum("raised" in r.getMessage() for r in caplog.records) == 10


def test_a_plugin_added_later_registers_its_components_and_is_credited_exactly() -> None:
    class One:
        @hookimpl
        def aad_register_scorers(self, register):  # type: ignore[no-untyped-def]
            register("one", tester.TinyScorer)

    class Two:
        @hookimpl(tryfirst=True)
        def aad_register_scorers(self, register):  # type: ignore[no-untyped-def]
            register("two", tester.TinyScorer)

    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(One(), name="one", distribution="dist-one", version="1")
    pm.add_plugin(Two(), name="two")
    assert (pm.registry.get("scorer", "one").plugin, pm.registry.get("scorer", "one").distribution) == ("one", "dist-one")
    assert pm.registry.get("scorer", "two").plugin == "two"
    assert pm.plugins["one"].components == [{"kind": "scorer", "name": "one"}]
    assert pm.plugins["two"].components == [{"kind": "scorer", "name": "two"}]
