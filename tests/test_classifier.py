"""Specialist kinds: the ``classifier`` kind (train, save/load without pickle, which tasks it fits),
the train stage choosing a kind per task, a third-party kind, and serving through the engine."""

from __future__ import annotations

import json
import math
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fake_embedder import register_fake_embedder
from conftest import make_trace
from tiny_models import tiny_student  # noqa: F401  (session fixture)

from aad_core import hookimpl
from aad_core.artifacts import ClusterSelection, Selection
from aad_core.models.runtime import Generation
from aad_core.plugins import Predictor, Router, Trainer, get_plugin_manager
from aad_core.schema import ChatRequest, Message, RoutingDecision, Trace
from aad_core.workspace import Workspace
from aad_plugins.classifier import FILE, ClassifierPredictor, ClassifierTrainer

INTENTS = {
    "card_arrival": "where is my new card it has not arrived",
    "exchange_rate": "what exchange rate do you use for euro dollars",
    "pin_blocked": "my pin got blocked after wrong tries",
}
FILLER = "please today now quickly again thanks hello sir madam kindly".split()


def _label_traces(n_per: int, offset: int = 0) -> list[Trace]:
    return [make_trace(f"{text} {FILLER[(i + offset) % len(FILLER)]} {i + offset}", label)
            for i in range(n_per) for label, text in INTENTS.items()]


def _json_traces(n: int) -> list[Trace]:
    return [make_trace(f"extract the order {i} for customer {i * 7}", json.dumps({"order": i, "customer": i * 7}))
            for i in range(n)]


@pytest.fixture
def ws(workspace: Workspace) -> Workspace:
    """A workspace that embeds with the fake bag-of-words embedder, the last user message only."""
    register_fake_embedder()
    workspace.config.embed.embedder = "fake"
    workspace.config.embed.view = ["last_user"]
    return workspace


def _trained(ws: Workspace, out: Path, **params: Any) -> tuple[ClassifierTrainer, dict[str, Any]]:
    trainer = ClassifierTrainer(workspace=ws, **params)
    metrics = trainer.train(_label_traces(12), _label_traces(3, offset=100), out, show_progress=False)
    return trainer, metrics


def test_the_classifier_learns_a_label_task_with_calibrated_looking_probabilities(ws: Workspace,
                                                                                  tmp_path: Path) -> None:
    trainer, metrics = _trained(ws, tmp_path / "spec", fit_calibration_part=False)
    assert metrics["n_classes"] == 3 and metrics["n_train"] == 36 and metrics["n_eval"] == 9
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_unseen_answers"] == 0
    predictor = trainer.load_predictor(tmp_path / "spec")
    clear = [ChatRequest(messages=[Message(role="user", content=f"{text} hello")]) for text in INTENTS.values()]
    mixed = ChatRequest(messages=[Message(role="user", content="card arrived exchange rate pin blocked")])
    gens = predictor.generate([*clear, mixed], max_new_tokens=8)
    assert [g.text for g in gens[:3]] == list(INTENTS)
    probs = predictor.predict_proba([*clear, mixed])
    assert np.allclose(probs.sum(axis=1), 1.0) and (probs >= 0).all()
    for g in gens:
        assert isinstance(g, Generation) and g.n_tokens == 0 and g.latency_ms >= 0
        assert 1 / 3 < g.confidence <= 1.0 and g.mean_logprob == pytest.approx(math.log(g.confidence))
    # sure of the clear requests, less sure of one that mixes every intent
    assert min(g.confidence for g in gens[:3]) > 0.9 > gens[3].confidence
    # the logistic regression alone is unsure of it (the nearest-neighbour vote sharpens it)
    lr_only = ClassifierTrainer(workspace=ws, knn_weight=0.0)
    lr_only.train(_label_traces(12), [], tmp_path / "lr", show_progress=False)
    assert lr_only.load_predictor(tmp_path / "lr").generate([mixed], max_new_tokens=8)[0].confidence < 0.6


def test_save_and_load_round_trip_without_pickle(ws: Workspace, tmp_path: Path) -> None:
    trainer, _ = _trained(ws, tmp_path / "spec")
    path = tmp_path / "spec" / FILE
    with zipfile.ZipFile(path) as z:
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(path, allow_pickle=False) as saved:  # raises on any object array
        assert sorted(saved["classes"].tolist()) == sorted(INTENTS)
        assert saved["coef"].shape == (3, 64) and saved["intercept"].shape == (3,)
        assert str(saved["embedder"]) == "fake-bow-64" and saved["view"].tolist() == ["last_user"]
        assert all(saved[k].dtype != object for k in saved.files)
    assert json.loads((tmp_path / "spec" / "metrics.json").read_text())["n_classes"] == 3
    requests = [t.request for t in _label_traces(2, offset=50)]
    first = trainer.load_predictor(tmp_path / "spec").generate(requests, max_new_tokens=4)
    again = ClassifierTrainer(workspace=ws).load_predictor(tmp_path / "spec").generate(requests, max_new_tokens=4)
    assert [(g.text, round(g.confidence, 6)) for g in first] == [(g.text, round(g.confidence, 6)) for g in again]


def test_a_binary_task_and_out_of_scope_answers_are_classes(ws: Workspace, tmp_path: Path) -> None:
    traces = [make_trace(f"where is my new card {w}", "card_arrival") for w in FILLER]
    traces += [make_trace(f"tell me a joke about cats {w}", "out_of_scope") for w in FILLER]
    ClassifierTrainer(workspace=ws).train(traces, [], tmp_path / "bin", show_progress=False)
    predictor = ClassifierTrainer(workspace=ws).load_predictor(tmp_path / "bin")
    gens = predictor.generate([ChatRequest(messages=[Message(role="user", content="a joke about cats please")])],
                              max_new_tokens=4)
    assert gens[0].text == "out_of_scope" and gens[0].confidence > 0.5


def test_applies_to_closed_answer_sets_only() -> None:
    trainer = ClassifierTrainer()
    fits, why = trainer.applies_to(_label_traces(5))
    assert fits and "output kind 'label'" in why
    fits, why = trainer.applies_to(_json_traces(20))
    assert not fits and "free-form" in why and "'json'" in why
    prose = [make_trace(f"plan a trip {i}", f"Day 1: visit museum {i}, then a long walk by the river.")
             for i in range(10)]
    assert not trainer.applies_to(prose)[0]
    # JSON answers from a small fixed set fit
    fixed = [make_trace(f"route ticket {i}", json.dumps({"queue": ["billing", "tech"][i % 2]})) for i in range(20)]
    fits, why = trainer.applies_to(fixed)
    assert fits and "small fixed set" in why
    assert not trainer.applies_to(_label_traces(1)[:1])[0]


# -- the train stage chooses a kind per task -------------------------------------------------------
def _two_tasks(ws: Workspace) -> dict[int, list[str]]:
    """Cluster 0: a label task (18 traces, 14 in the training split); cluster 1: JSON extraction
    (16 traces). Every other training trace is selected."""
    labels, jsons = _label_traces(6), _json_traces(16)
    with ws.store() as store:
        store.add(labels + jsons)
    assignments, split, selected = {}, {}, {0: [], 1: []}
    for cid, traces in ((0, labels), (1, jsons)):
        for i, t in enumerate(traces):
            assignments[t.id] = cid
            split[t.id] = "heldout" if i % 4 == 3 else "train"
            if split[t.id] == "train" and i % 2 == 0:
                selected[cid].append(t.id)
    clusters = [{"id": cid, "label": label, "size": 18, "variance": 0.2, "mean_similarity": 0.8, "routine": True,
                 "centroid": [1.0, 0.0] if cid == 0 else [0.0, 1.0]} for cid, label in ((0, "intents"), (1, "orders"))]
    ws.write_state("clusters.json", {"clusters": clusters, "assignments": assignments, "split": split, "dropped": []})
    Selection(clusters={cid: ClusterSelection(selected=ids, label=str(cid)) for cid, ids in selected.items()},
              fraction=1.0, selector="top", scorer="none").save(ws)
    return selected


def test_the_train_stage_picks_classifier_for_labels_and_lora_for_json(
        ws: Workspace, tiny_student: Path) -> None:  # noqa: F811
    from aad_core.pipeline.train import run_train
    from aad_core.specialists import SpecialistRegistry

    selected = _two_tasks(ws)
    cfg = ws.config
    assert cfg.train.trainer == "auto"
    cfg.train.student = str(tiny_student)
    cfg.train.max_length = 160
    cfg.set_component_param("trainer", "qlora", "batch_size", 2)
    specs = {s.cluster_id: s for s in run_train(ws, max_steps=1, show_progress=False)}
    assert (specs[0].kind, specs[0].trainer) == ("classifier", "classifier")
    assert (specs[1].kind, specs[1].trainer) == ("lora", "qlora")
    assert (Path(specs[0].path) / FILE).exists() and not (Path(specs[0].path) / "adapter_config.json").exists()
    assert (Path(specs[1].path) / "adapter_config.json").exists()
    manifest = SpecialistRegistry(ws).manifest(specs[1])
    assert manifest["kind"] == "lora" and manifest["hyperparameters"]["kind"] == "lora"
    considered = manifest["hyperparameters"]["kinds_considered"]
    assert [(c["trainer"], c["fits"]) for c in considered] == [("classifier", False), ("qlora", True)]
    assert SpecialistRegistry(ws).manifest(specs[0])["hyperparameters"]["next_kinds"] == ["qlora"]
    # the classifier trained on the whole training split, the LoRA adapter on the selection
    # (and on its task's held-out calibration part, which its gate then leaves out)
    fitted = specs[0].metrics["heldout_trained_on"]
    assert specs[0].metrics["n_train"] == 14 + len(fitted) and specs[1].metrics["n_train"] == len(selected[1])
    assert "heldout_trained_on" not in specs[1].metrics


def test_an_old_manifest_without_a_kind_is_lora(ws: Workspace, tmp_path: Path) -> None:
    from aad_core.specialists import SpecialistRegistry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    spec = SpecialistRegistry(ws).save(cluster_id=0, label="old", adapter_dir=adapter, base_model="tiny")
    manifest_path = Path(spec.path) / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["kind"], data["trainer"]
    manifest_path.write_text(json.dumps(data))
    assert SpecialistRegistry(ws).get(spec.name).kind == "lora"


# -- a third-party specialist kind -----------------------------------------------------------------
class MajorityPredictor(Predictor):
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int) -> list[Generation]:
        return [Generation(text=self.answer, mean_logprob=0.0, n_tokens=1, latency_ms=0.01, confidence=1.0)
                for _ in requests]


class MajorityTrainer(Trainer):
    """Always the most common teacher answer (a kind a third party might add)."""

    kind = "majority"

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        answer = Counter(t.answer_text() for t in train).most_common(1)[0][0]
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "answer.txt").write_text(answer, encoding="utf-8")
        return {"n_train": len(train)}

    def load_predictor(self, specialist_dir: Path) -> Predictor:
        return MajorityPredictor((Path(specialist_dir) / "answer.txt").read_text(encoding="utf-8"))


class _MajorityPlugin:
    @hookimpl
    def aad_register_trainers(self, register: Any) -> None:
        register("majority", MajorityTrainer, description="the most common answer (tests only)")


def test_a_third_party_kind_listed_first_is_chosen_and_served(ws: Workspace) -> None:
    from aad_core.pipeline.train import run_train
    from aad_core.serving.specialists import SpecialistPool

    get_plugin_manager().add_plugin(_MajorityPlugin(), name="majority-kind")
    _two_tasks(ws)
    ws.config.train.trainer = ["majority", "auto"]
    spec = run_train(ws, cluster_id=0, show_progress=False)[0]
    assert (spec.kind, spec.trainer) == ("majority", "majority")
    gens = SpecialistPool(ws, [spec]).generate(spec.name, [_label_traces(1)[0].request], max_new_tokens=4)
    assert gens[0].text in INTENTS and gens[0].confidence == 1.0


def test_no_fitting_kind_for_a_named_cluster_is_an_error(ws: Workspace) -> None:
    from aad_core.errors import AADError
    from aad_core.pipeline.train import run_train

    _two_tasks(ws)
    ws.config.train.trainer = ["classifier"]
    with pytest.raises(AADError, match="no configured specialist kind fits.*free-form"):
        run_train(ws, cluster_id=1, show_progress=False)
    assert run_train(ws, show_progress=False)[0].kind == "classifier"  # cluster 1 is skipped, not an error


# -- serving ---------------------------------------------------------------------------------------
class ToSpecialist(Router):
    def __init__(self, name: str) -> None:
        self.name = name

    def route(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]:
        return [RoutingDecision(target="specialist", cluster_id=0, specialist=self.name, reason="test")
                for _ in requests]


def test_the_engine_serves_a_classifier_through_its_predictor(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from aad_core.models.runtime import SpecialistRuntime
    from aad_core.pipeline.train import run_train
    from aad_core.serving.engine import RoutingEngine
    from aad_core.specialists import SpecialistRegistry

    _two_tasks(ws)
    spec = run_train(ws, cluster_id=0, show_progress=False)[0]
    spec = SpecialistRegistry(ws).set_promoted(spec.name, spec.version, True, "test")
    monkeypatch.setattr(SpecialistRuntime, "_ensure_loaded",
                        lambda self: pytest.fail("a classifier needs no base student"))
    engine = RoutingEngine(ws, router=ToSpecialist(spec.name), record=False)
    request = ChatRequest(messages=[Message(role="user", content="my pin got blocked again")])
    decision, outcome = engine.attempt(request)
    assert decision.target == "specialist" and outcome is not None and outcome.ok
    assert outcome.text == "pin_blocked" and 0.5 < outcome.confidence <= 1.0
    answer = engine.answer(request)
    assert answer.message.content == "pin_blocked" and answer.decision.target == "specialist"
    engine.close()


@pytest.mark.real_model
def test_real_minilm_classifier_on_banking77(workspace: Workspace, tmp_path: Path) -> None:
    from aad_core.demo.datasets import load_banking77

    intents = ["card_arrival", "exchange_rate", "pin_blocked", "lost_or_stolen_card", "top_up_failed"]
    rows: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        for example in load_banking77(split):
            if example.label in intents:
                rows.setdefault(split, {}).setdefault(example.label, []).append(example.text)
    system = "Classify the banking customer's intent. Answer with the label only."
    train = [make_trace(q, c, system=system) for c in intents for q in rows["train"][c][:12]]
    test = [make_trace(q, c, system=system) for c in intents for q in rows["test"][c][:8]]
    trainer = ClassifierTrainer(workspace=workspace, fit_calibration_part=False)  # the test calls stay held out
    metrics = trainer.train(train, test, tmp_path / "b77", show_progress=False)
    assert metrics["eval_accuracy"] >= 0.8, metrics
    # the default tunes MiniLM's top layers, saved beside the heads
    assert metrics["encoder"] == "tuned" and metrics["tuning"]["tuned"], metrics
    assert (tmp_path / "b77" / "encoder.safetensors").exists() and len(metrics["calibration"]["confidence"]) == 60
    predictor = trainer.load_predictor(tmp_path / "b77")
    assert isinstance(predictor, ClassifierPredictor)
    gens = predictor.generate([t.request for t in test], max_new_tokens=8)
    right = [g.confidence for g, t in zip(gens, test) if g.text == t.answer_text()]
    wrong = [g.confidence for g, t in zip(gens, test) if g.text != t.answer_text()]
    assert len(right) >= 0.8 * len(test)
    if wrong:
        assert np.mean(right) > np.mean(wrong)


def test_out_of_fold_calibration_covers_every_training_call_and_feeds_the_gate(ws: Workspace, tmp_path: Path) -> None:
    from aad_core.pipeline.evaluate.runner import evaluate_cluster
    from aad_core.schema import Cluster, Specialist

    trainer, metrics = _trained(ws, tmp_path / "spec", C=10.0, fit_calibration_part=False)
    cal = metrics["calibration"]
    assert cal["signal"] == "confidence" and "5-fold out-of-fold" in cal["source"]
    assert len(cal["confidence"]) == len(cal["agreement"]) == metrics["n_train"] == 36
    assert all(1 / 3 < c <= 1 for c in cal["confidence"]) and sum(cal["agreement"]) >= 30
    assert trainer.calibration_folds == 5
    no_folds = _trained(ws, tmp_path / "none", calibration_folds=0)[1]
    # no out-of-fold pairs: the gate calibrates on the held-out calibration part, so it is not trained on
    assert "calibration" not in no_folds and no_folds["heldout_trained_on"] == [] and no_folds["n_eval"] == 9

    # 36 pairs cannot show 0.95 with 95 % confidence (that needs 59): parity decides, and says so
    heldout = _label_traces(4, offset=200)
    cluster = Cluster(id=0, label="intents", size=48, variance=0.2, mean_similarity=0.8, routine=True)

    def evaluate(out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
        spec = Specialist(name="c0-intents", cluster_id=0, version=1, base_model="-", path=str(out),
                          kind="classifier", metrics=metrics)
        return evaluate_cluster(ws, cluster, heldout, None, spec, predictor=trainer.load_predictor(out))

    entry = evaluate(tmp_path / "spec", metrics)
    assert entry["gate"]["mode"] == "parity-fallback" and entry["gate"]["calibration"]["n"] == 36
    assert entry["gate"]["calibration_source"].startswith("5-fold out-of-fold")
    # 75 training calls: the threshold is chosen on their out-of-fold answers, every held-out call tests it
    trainer = ClassifierTrainer(workspace=ws, C=10.0)
    metrics = trainer.train(_label_traces(25), [], tmp_path / "big", show_progress=False)
    entry = evaluate(tmp_path / "big", metrics)
    assert entry["gate"]["mode"] == "risk-coverage" and entry["gate"]["calibration"]["n"] == 75
    assert entry["gate"]["test"]["n"] == len(heldout) == 12
    assert entry["promoted"] is True and entry["gate"]["threshold"] is not None


def test_the_select_stage_does_not_score_a_task_the_classifier_takes(ws: Workspace) -> None:
    from aad_core.pipeline.select import run_select

    _two_tasks(ws)
    scored: list[int] = []

    class CountingScorer:
        def __init__(self, **_: Any) -> None: ...

        def score(self, traces, *, show_progress=False):  # noqa: ANN001, ANN201
            scored.append(len(traces))
            return [{"score": float(i)} for i in range(len(traces))]

    class _Plugin:
        @hookimpl
        def aad_register_scorers(self, register):  # noqa: ANN001, ANN201
            register("counting", CountingScorer)

    get_plugin_manager().add_plugin(_Plugin(), name="counting-scorer")
    ws.config.select.scorer = "counting"
    ws.config.select.selector = "top"  # a selector that reads scores ('random', the default, reads none)
    artifact = run_select(ws, fraction=0.5, show_progress=False)
    labels, orders = artifact["clusters"]["0"], artifact["clusters"]["1"]
    assert scored == [12]  # only the JSON task (12 training traces) was scored
    assert labels["scores"] == {} and len(labels["selected"]) == labels["n_train"] == 14
    assert len(orders["scores"]) == 12 and len(orders["selected"]) == 6


def test_the_calibration_part_is_training_data_and_the_gate_never_scores_it(ws: Workspace, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from aad_core.pipeline.evaluate.runner import evaluate_specialist
    from aad_core.schema import Cluster, Specialist

    train, calibration, test = _label_traces(25), _label_traces(3, offset=100), _label_traces(4, offset=200)
    metrics = ClassifierTrainer(workspace=ws, C=10.0).train(train, calibration, tmp_path / "spec", show_progress=False)
    assert metrics["n_train"] == 75 + 9 and metrics["n_eval"] == 0
    assert sorted(metrics["heldout_trained_on"]) == sorted(t.id for t in calibration)
    # a calibration call whose teacher answer feedback marks wrong is never fitted
    marked = [t.model_copy(update={"feedback": {"correct": False}}) if i == 0 else t for i, t in enumerate(calibration)]
    again = ClassifierTrainer(workspace=ws, C=10.0).train(train, marked, tmp_path / "marked", show_progress=False)
    assert sorted(again["heldout_trained_on"]) == sorted(t.id for t in calibration[1:])
    assert len(metrics["calibration"]["confidence"]) == 84  # out-of-fold answers of every call it fitted
    spec = Specialist(name="c0-intents", cluster_id=0, version=1, base_model="-", path=str(tmp_path / "spec"),
                      kind="classifier", trainer="classifier", metrics=metrics)
    heldout = {t.id: t for t in calibration + test}
    state = SimpleNamespace(heldout_ids=lambda cid: list(heldout))
    store = SimpleNamespace(iter_traces=lambda ids: [heldout[i] for i in ids])
    cluster = Cluster(id=0, label="intents", size=96, variance=0.2, mean_similarity=0.8, routine=True)
    entry = evaluate_specialist(ws, state, cluster, spec, store, {})
    assert entry["n_heldout"] == len(test) == 12 and entry["gate"]["test"]["n"] == 12


def test_a_one_answer_task_is_calibrated_on_its_out_of_fold_answers_and_gated_by_its_bound(
        ws: Workspace, tmp_path: Path) -> None:
    """A node that always answered the same (the demo's no_tool refusal): each fold's head answers that,
    sure of it, so every training call is a calibration pair; the bound, not the parity rule, decides."""
    from aad_core.pipeline.evaluate.runner import evaluate_cluster
    from aad_core.schema import Cluster, Specialist

    same = [make_trace(f"what is the weather in city {i}", "NO_TOOL") for i in range(12)]
    calibration = [make_trace(f"weather in town {i}", "NO_TOOL") for i in range(3)]
    metrics = ClassifierTrainer(workspace=ws).train(same, calibration, tmp_path / "one", show_progress=False)
    assert metrics["n_train"] == 15 and metrics["heldout_trained_on"] == [t.id for t in calibration]
    cal = metrics["calibration"]
    assert cal["confidence"] == [1.0] * 15 and all(cal["agreement"])

    cluster = Cluster(id=0, label="no tool", size=80, variance=0.1, mean_similarity=0.9, routine=True)
    heldout = [make_trace(f"weather near village {i}", "NO_TOOL") for i in range(6)]

    def evaluate(n: int) -> dict[str, Any]:
        out = tmp_path / f"one-{n}"
        trainer = ClassifierTrainer(workspace=ws)
        trained = trainer.train([make_trace(f"is it raining in place {i}", "NO_TOOL") for i in range(n)], [], out,
                                show_progress=False)
        spec = Specialist(name="c0-no-tool", cluster_id=0, version=1, base_model="-", path=str(out),
                          kind="classifier", metrics=trained)
        return evaluate_cluster(ws, cluster, heldout, None, spec, predictor=trainer.load_predictor(out))

    few, enough = evaluate(20), evaluate(64)
    assert few["gate"]["mode"] == "parity-fallback"  # 20 pairs cannot show 0.95 (that needs 59)
    assert enough["gate"]["mode"] == "risk-coverage" and enough["promoted"]  # 64 of 64: lower bound 0.954
    assert enough["gate"]["calibration"]["n"] == 64 and enough["gate"]["test"]["coverage"] == 1.0
