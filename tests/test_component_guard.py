"""A component that raises or returns the wrong shape from its main method gives a PluginError naming
the plugin, its distribution and version, the hook that registered it, the method, expected vs got."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_trace

from aad_core import hookimpl
from aad_core.errors import AADError, PluginError
from aad_core.plugins import (Clusterer, Embedder, Evaluator, PluginManager, Redactor, Router, Scorer, Selector,
                              Trainer, get_plugin_manager, reset_plugin_manager)
from aad_core.plugins.checks import CONTRACTS
from aad_core.schema import ChatRequest, Message, RoutingDecision

TRACE = make_trace("q", "a")
REQUEST = ChatRequest(messages=[Message(role="user", content="hi")])


class BadRedactor(Redactor):
    def redact(self, traces):  # type: ignore[no-untyped-def]
        return []


class BadEmbedder(Embedder):
    model_id = "bad"

    def embed(self, texts, *, show_progress=False):  # type: ignore[no-untyped-def]
        return np.zeros(3)


class BadClusterer(Clusterer):
    def fit(self, embeddings):  # type: ignore[no-untyped-def]
        self.labels_ = np.zeros(len(embeddings), dtype=np.int64)
        return self


class FloatScorer(Scorer):
    """The measured example: plain floats instead of dicts."""

    def __init__(self, **_params: Any) -> None:
        pass

    def score(self, traces, *, show_progress=False):  # type: ignore[no-untyped-def]
        return [0.5 for _ in traces]


class BadSelector(Selector):
    def select(self, ids, scores, fraction, *, embeddings=None, seed=0):  # type: ignore[no-untyped-def]
        return ["not-an-input-id"]


class BadTrainer(Trainer):
    def train(self, train, eval, output_dir, *, show_progress=True):  # type: ignore[no-untyped-def]
        return None


class BadEvaluator(Evaluator):
    def evaluate(self, predictions, references, **context):  # type: ignore[no-untyped-def]
        return {"score": 1.5}


class BadRouter(Router):
    def route(self, requests):  # type: ignore[no-untyped-def]
        return [RoutingDecision(target="teacher", reason="only one")]


#: kind -> (wrong-shape class, call of the main method, expected text, got text)
CASES: dict[str, tuple[type, Any, str, str]] = {
    "redactor": (BadRedactor, lambda c: c.redact([TRACE]), "a list of 1 Trace objects", "a list of 0 items"),
    "embedder": (BadEmbedder, lambda c: c.embed(["a", "b"]), "an array of shape (2, dim)", "ndarray of shape (3,)"),
    "clusterer": (BadClusterer, lambda c: c.fit(np.eye(3, 4)),
                  "fit() to set labels_ of shape (3,) and centroids_ of shape (k, 4)", "no centroids_"),
    "scorer": (FloatScorer, lambda c: c.score([TRACE, TRACE]), "a list of 2 dicts, each with a float 'score'",
               "float 0.5 at index 0"),
    "selector": (BadSelector, lambda c: c.select(["a", "b"], [1.0, 2.0], 0.5), "a list of ids taken from the input ids",
                 "'not-an-input-id' at index 0, which is not one of the input ids"),
    "trainer": (BadTrainer, lambda c: c.train([TRACE], [], Path("unused")), "a dict of metrics", "NoneType None"),
    "evaluator": (BadEvaluator, lambda c: c.evaluate(["a"], ["a"]), "a dict with a float 'score' in [0, 1]",
                  "'score' = 1.5"),
    "router": (BadRouter, lambda c: c.route([REQUEST, REQUEST]), "a list of 2 RoutingDecision objects",
               "a list of 1 items"),
}


def test_every_kind_has_a_contract_and_a_case() -> None:
    from aad_core.plugins.registry import KINDS

    assert set(CONTRACTS) == set(KINDS) == set(CASES)


def _manager_with(kind: str, factory: Any) -> PluginManager:
    class Plugin:
        pass

    def impl(self, register):  # type: ignore[no-untyped-def]
        register("bad", factory)

    setattr(Plugin, f"aad_register_{kind}s", hookimpl(impl))
    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(Plugin(), name="bad_plugin", distribution="aad-bad-plugin", version="0.3.0")
    return pm


def _assert_names_everything(err: PluginError, kind: str, method: str) -> None:
    text = str(err)
    assert f"The {kind} 'bad' of plugin 'bad_plugin'" in text
    assert "distribution aad-bad-plugin 0.3.0" in text and f"registered by aad_register_{kind}s" in text
    assert f"{method}()" in text and "AAD_DISABLE_PLUGINS=bad_plugin" in text
    assert (err.plugin, err.distribution, err.version, err.kind, err.name, err.method, err.hook) == (
        "bad_plugin", "aad-bad-plugin", "0.3.0", kind, "bad", method, f"aad_register_{kind}s")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_wrong_shape_names_plugin_distribution_hook_and_expected_vs_got(kind: str) -> None:
    cls, call, expected, got = CASES[kind]
    component = _manager_with(kind, cls).registry.create(kind, "bad")
    assert type(component) is cls  # the object itself, not a proxy
    with pytest.raises(PluginError) as info:
        call(component)
    _assert_names_everything(info.value, kind, CONTRACTS[kind].method)
    assert f"returned the wrong shape from {CONTRACTS[kind].method}()" in str(info.value)
    assert f"Expected {expected}" in str(info.value) and f"Got {got} instead." in str(info.value)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_an_exception_is_wrapped_and_keeps_its_type(kind: str) -> None:
    cls, call, _, _ = CASES[kind]
    method = CONTRACTS[kind].method

    def kaput(*_args: Any, **_kwargs: Any) -> Any:
        raise LookupError("kaput")

    raising = type(f"Raising{cls.__name__}", (cls,), {method: kaput})
    component = _manager_with(kind, raising).registry.create(kind, "bad")
    with pytest.raises(PluginError) as info:
        call(component)
    err = info.value
    _assert_names_everything(err, kind, method)
    assert isinstance(err, LookupError) and isinstance(err, AADError)  # `except LookupError` still works
    assert isinstance(err.__cause__, LookupError) and str(err.__cause__) == "kaput"
    assert f"raised in {method}(). Expected {method}() to return a result. Got LookupError: kaput instead." in str(err)
    assert isinstance(pickle.loads(pickle.dumps(err)), PluginError)


def test_aad_errors_pass_through_unchanged() -> None:
    deliberate = AADError("The trainer needs CUDA.", hint="run on a GPU")

    class Deliberate(BadTrainer):
        def train(self, train, eval, output_dir, *, show_progress=True):  # type: ignore[no-untyped-def]
            raise deliberate

    trainer = _manager_with("trainer", Deliberate).registry.create("trainer", "bad")
    with pytest.raises(AADError) as info:
        trainer.train([TRACE], [], Path("unused"))
    assert info.value is deliberate


def test_a_good_component_is_untouched_and_guarded_once() -> None:
    class Good(Scorer):
        def score(self, traces, *, show_progress=False):  # type: ignore[no-untyped-def]
            return [{"score": 1, "kl": 0.5} for _ in traces]

    single = Good()
    pm = _manager_with("scorer", lambda: single)
    first, second = pm.registry.create("scorer", "bad"), pm.registry.create("scorer", "bad")
    assert first is second is single and isinstance(first, Scorer)
    assert first.score([TRACE]) == [{"score": 1, "kl": 0.5}]
    assert first.score.__wrapped__.__func__ is Good.score  # one guard around the original method


def _populate_clusters(ws: Any) -> None:
    traces = [make_trace(f"where is my card {i}", "card_arrival") for i in range(6)]
    with ws.store() as store:
        store.add(traces)
    ws.write_state("clusters.json", {
        "clusters": [{"id": 0, "label": "card", "size": 6, "variance": 0.1, "mean_similarity": 0.9, "routine": True,
                      "centroid": [1.0, 0.0]}],
        "assignments": {t.id: 0 for t in traces}, "split": {t.id: "train" for t in traces}, "dropped": []})


def test_the_measured_example_through_select_names_the_plugin(workspace: Any, tmp_path: Path, monkeypatch) -> None:
    """Before: TypeError: 'float' object is not subscriptable at pipeline/select.py. Now: the plugin's fault,
    with the distribution read from the installed metadata."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "aad_float_scorer.py").write_text(
        "from aad_core import hookimpl\n"
        "from aad_core.plugins import Scorer\n\n"
        "class FloatScorer(Scorer):\n"
        "    def __init__(self, **params):\n        pass\n\n"
        "    def score(self, traces, *, show_progress=False):\n        return [0.5 for _ in traces]\n\n"
        "@hookimpl\ndef aad_register_scorers(register):\n    register('floaty', FloatScorer)\n")
    info = site / "aad_float_scorer-0.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aad-float-scorer\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text("[aad]\nfloat_scorer = aad_float_scorer\n")
    monkeypatch.syspath_prepend(str(site))
    reset_plugin_manager()  # load the entry points again, with the new folder on sys.path
    monkeypatch.setenv("AAD_SELECT__SCORER", "floaty")
    monkeypatch.setenv("AAD_SELECT__SELECTOR", "top")  # a selector that reads scores (the default 'random' does not)
    monkeypatch.setenv("AAD_TRAIN__TRAINER", "qlora")  # a LoRA task is scored (a classifier task is not)
    workspace.__dict__.pop("config", None)
    _populate_clusters(workspace)
    assert get_plugin_manager().plugins["float_scorer"].distribution == "aad-float-scorer"

    from aad_core.pipeline.select import run_select

    with pytest.raises(PluginError) as err:
        run_select(workspace, fraction=0.5, show_progress=False)
    text = str(err.value)
    assert "The scorer 'floaty' of plugin 'float_scorer' (distribution aad-float-scorer 0.2.0, " \
           "registered by aad_register_scorers) returned the wrong shape from score()." in text
    assert "Expected a list of 6 dicts, each with a float 'score'. Got float 0.5 at index 0 instead." in text
