"""``aad distill --if-needed``: the plan per task (new traces, drift, shadow disagreements), nothing loaded
when nothing needs retraining, and a new version promoted only when it does at least as well as the served
one on the same test calls. Fast: a last-word lookup trainer registered as a plugin (no model), and the
cluster / select / route stages replaced by small writers of the same artifacts (no embedder)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from aad_core.artifacts import ClusterSelection, ClusterState, RouterState, Selection
from aad_core.cli import app
from aad_core.models.runtime import Generation
from aad_core.pipeline.curate import split_clusters
from aad_core.pipeline.retrain import RETRAIN_STATE, plan_retraining, run_if_needed
from aad_core.plugins import Predictor, Trainer, get_plugin_manager, hookimpl
from aad_core.schema import ChatRequest, Cluster, Trace, is_specialist_answer
from aad_core.specialists import SpecialistRegistry
from aad_core.workspace import Workspace
from tests.conftest import make_trace

LABELS = ("card_arrival", "exchange_rate", "pin_blocked")
runner = CliRunner()


class _Lookup(Predictor):
    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int) -> list[Generation]:
        return [Generation(text=self.table.get(r.last_user_message().split()[-1], "unknown"), mean_logprob=0.0,
                           n_tokens=1, latency_ms=0.01, confidence=1.0) for r in requests]


class LookupTrainer(Trainer):
    """The answer seen with the request's last word. ``sabotage``: that word's answer is learnt wrong."""

    kind = "lookup"
    sabotage: ClassVar[str | None] = None

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        table = {t.request.last_user_message().split()[-1]: t.answer_text() for t in train}
        if LookupTrainer.sabotage in table:
            table[LookupTrainer.sabotage] = "wrong"
        Path(output_dir, "table.json").write_text(json.dumps(table))
        return {"n_train": len(train)}

    def load_predictor(self, specialist_dir: Path) -> Predictor:
        return _Lookup(json.loads(Path(specialist_dir, "table.json").read_text()))


class _Kinds:
    @hookimpl
    def aad_register_trainers(self, register: Any) -> None:
        register("lookup", LookupTrainer, description="a last-word lookup (tests only)")
        register("lookup-b", LookupTrainer, description="the same, listed second: makes the train stage audition")


def _calls(n: int, labels: Sequence[str] = LABELS, start: int = 0, source: str = "test", **kwargs: Any) -> list[Trace]:
    return [make_trace(f"question {start + i} about {labels[i % len(labels)]}", labels[i % len(labels)],
                       **kwargs).model_copy(update={"source": source}) for i in range(n)]


def _stages(calls: list[str]) -> dict[str, Any]:
    """cluster / select / route without models: every teacher trace in one routine task, its held-out split
    seeded per id as the real stage does, the whole training split selected."""

    def cluster(ws: Workspace, profile: Any, progress: bool) -> str:
        calls.append("cluster")
        with ws.store() as store:
            ids = [t.id for t in store.iter_traces() if not is_specialist_answer(t)]
        assignments = {tid: 0 for tid in ids}
        split = split_clusters(assignments, heldout_fraction=0.3, seed=ws.config.seed)
        ClusterState(clusters=[Cluster(id=0, label="intents", size=len(ids), variance=0.1, mean_similarity=0.9,
                                       routine=True, share_calls=1.0, centroid=[1.0, 0.0], answer_kind="label")],
                     assignments=assignments, split=split, dropped={}, seed=ws.config.seed).save(ws)
        return f"{len(ids)} calls in 1 task"

    def select(ws: Workspace, profile: Any, progress: bool) -> str:
        calls.append("select")
        train = ClusterState.load(ws).train_ids(0)
        Selection(clusters={0: ClusterSelection(selected=train, label="intents", n_train=len(train))},
                  fraction=1.0, selector="top", scorer="none").save(ws)
        return "selected"

    def route(ws: Workspace, profile: Any, progress: bool) -> str:
        calls.append("route")
        RouterState(clusters={0: {"threshold": 0.5, "n_own": 100, "own_rejected": 2, "output_kind": "label",
                                  "mean_own_similarity": 0.8}}).save(ws)
        return "routed"

    return {"cluster": cluster, "select": select, "route": route}


@pytest.fixture
def served(workspace: Workspace) -> Workspace:
    """A workspace whose one task is served by v1 of a lookup specialist, trained by 'aad distill'."""
    from aad_core.pipeline.distill import run_distill

    get_plugin_manager().add_plugin(_Kinds(), name="retrain-kinds")
    LookupTrainer.sabotage = None
    workspace.config.train.trainer = ["lookup"]
    workspace.config.eval.target_agreement = 0.3  # a gate a 2-in-3 specialist passes: the comparison decides
    workspace.config.route.retrain_min_new_traces = 30
    with workspace.store() as store:
        store.add(_calls(120))
    run_distill(workspace, runners=_stages([]), report=False, show_progress=False)
    (spec,) = SpecialistRegistry(workspace).list()
    assert spec.promoted and spec.version == 1
    return workspace


def test_nothing_to_retrain_exits_without_running_a_stage_or_loading_a_model(served: Workspace,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import aad_core.pipeline.distill as distill

    monkeypatch.setattr(distill, "run_distill", lambda *a, **k: pytest.fail("no stage may run"))
    result = run_if_needed(served, report=False, show_progress=False)
    (plan,) = result.plan
    assert not plan.retrain and plan.new_traces == 0 and "up to date" in plan.why
    assert result.stages == [] and result.outcomes == []
    assert json.loads(served.state_path(RETRAIN_STATE).read_text())["plan"][0]["retrain"] is False

    out = runner.invoke(app, ["distill", "--if-needed", "-w", str(served.root)])
    assert out.exit_code == 0, out.output
    assert "Nothing needs retraining" in out.output and "up to date" in out.output

    # a fresh process: planning imports no model library
    code = ("import sys; from aad_core.workspace import Workspace; from aad_core.pipeline.retrain import run_if_needed; "
            f"r = run_if_needed(Workspace({str(served.root)!r}), report=False, show_progress=False); "
            "assert not r.retrained; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'sentence_transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_specialist_answers_are_no_new_traces(served: Workspace) -> None:
    with served.store() as store:
        store.add(_calls(29, start=1000))
        store.add(_calls(5, start=2000, source="specialist"))
        store.add(_calls(5, start=3000, metadata={"aad_route": {"target": "specialist", "cluster_id": 0}}))
    (plan,) = plan_retraining(served)
    assert plan.new_traces == 29 and not plan.retrain
    with served.store() as store:
        store.add(_calls(1, start=4000, source="router", metadata={"aad_escalation": {"cluster_id": 0}}))
    (plan,) = plan_retraining(served)
    assert plan.new_traces == 30 and plan.retrain and "retrain_min_new_traces" in plan.why


def test_a_task_with_enough_new_traces_retrains_and_the_new_version_is_promoted(served: Workspace) -> None:
    with served.store() as store:  # the teacher now also answers a fourth label
        store.add(_calls(40, labels=("refund_status",), start=1000))
    calls: list[str] = []
    result = run_if_needed(served, runners=_stages(calls), report=False, show_progress=False)
    assert [p.retrain for p in result.plan] == [True]
    assert calls == ["cluster", "select", "route"]
    assert [r.stage for r in result.stages if r.status == "ran"] == ["cluster", "select", "train", "evaluate", "route"]
    (outcome,) = result.outcomes
    assert outcome["promoted"] and outcome["version"] == 2 and outcome["served_before"] == 1
    comparison = outcome["comparison"]
    assert comparison["n"] > 0 and comparison["new"] == 1.0 and comparison["served"] < 1.0  # v1 never saw the label
    registry = SpecialistRegistry(served)
    assert registry.promoted()[0].version == 2
    assert registry.get(registry.list()[0].name, 1).promoted  # kept promoted: 'aad specialists rollback' returns to it
    # trained: v2 learnt from the new traces; nothing left to do
    (plan,) = plan_retraining(served)
    assert not plan.retrain and plan.new_traces == 0


@pytest.mark.parametrize("kinds", [["lookup"], ["lookup", "lookup-b"]])
def test_a_worse_new_version_keeps_the_served_one(served: Workspace, kinds: list[str]) -> None:
    """Also when the train stage's audition (a later kind fits too) promoted the new version on the gate alone."""
    served.config.train.trainer = kinds
    served.config.eval.target_agreement = 0.15  # the gate passes a sabotaged version on any split: the comparison decides
    with served.store() as store:
        store.add(_calls(40, start=1000))
    LookupTrainer.sabotage = "pin_blocked"  # v2 learns a third of the answers wrong
    try:
        result = run_if_needed(served, runners=_stages([]), report=False, show_progress=False)
    finally:
        LookupTrainer.sabotage = None
    (outcome,) = result.outcomes
    assert not outcome["promoted"] and outcome["version"] == 2
    assert outcome["gate"].startswith("promoted")  # the gate alone would have taken it
    comparison = outcome["comparison"]
    assert comparison["served"] == 1.0 and comparison["new"] < 1.0  # which calls are wrong depends on the split
    assert "worse than the served version" in outcome["reason"] and "v1 stays promoted" in outcome["reason"]
    registry = SpecialistRegistry(served)
    name = registry.list()[0].name
    assert registry.promoted()[0].version == 1
    assert registry.manifest(registry.get(name, 2))["promotion_reason"] == outcome["reason"]
    retrain = json.loads(served.state_path(RETRAIN_STATE).read_text())
    assert retrain["outcomes"][0]["promoted"] is False
    # the refused attempt counts as the last training: the same traces do not retrain it again
    (plan,) = plan_retraining(served)
    assert not plan.retrain and plan.new_traces == 0


def test_drift_or_disagreement_retrains_only_with_new_data(served: Workspace) -> None:
    from datetime import datetime, timezone

    from aad_core.serving.shadow import SHADOW_LOG

    name = SpecialistRegistry(served).list()[0].name
    now = datetime.now(timezone.utc)
    rows = [{"event": "pair", "time": now.isoformat(), "day": now.date().isoformat(), "trace_id": f"s{i}",
             "cluster_id": 0, "specialist": name, "version": 1, "agree": i % 2 == 0} for i in range(10)]
    served.state_path(SHADOW_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (plan,) = plan_retraining(served)
    assert plan.shadow and "5 shadow disagreement" in plan.shadow  # 5/10: lower bound 0.22 < 0.3
    assert not plan.retrain and "no new trace" in plan.why
    with served.store() as store:
        store.add(_calls(1, start=5000, source="shadow", metadata={"aad_shadow": {"cluster_id": 0}}))
    (plan,) = plan_retraining(served)
    assert plan.retrain and plan.new_traces == 1 and "shadow disagreement" in plan.why


def test_clustering_leaves_specialist_answers_out_and_calibration_keeps_the_mean_similarity(
        workspace: Workspace) -> None:
    """The real cluster stage (a bag-of-words embedder) never trains on a specialist's answers, and the
    router calibration stores the training calls' mean similarity that the embedding-shift statistic needs."""
    from _fake_embedder import register_fake_embedder

    from aad_core.pipeline.calibrate import calibrate_router
    from aad_core.pipeline.cluster import run_cluster

    register_fake_embedder()
    workspace.config_path.write_text(workspace.config_path.read_text().replace('embedder = "minilm"',
                                                                               'embedder = "fake"'))
    ws = Workspace(workspace.root)
    teacher = _calls(40)
    mine = _calls(6, start=500, source="specialist") + _calls(
        6, start=600, metadata={"aad_route": {"target": "specialist", "cluster_id": 0}})
    with ws.store() as store:
        store.add(teacher + mine)
    state = run_cluster(ws, k=1, show_progress=False)
    known = set(state.assignments) | set(state.dropped)
    assert {t.id for t in mine}.isdisjoint(known) and known <= {t.id for t in teacher}
    calibrate_router(ws, show_progress=False, confidence=False)
    entry = RouterState.load(ws).clusters[state.clusters[0].id]
    assert 0 < entry["mean_own_similarity"] <= 1


def test_the_cli_says_per_task_why_and_what_became_of_the_new_version(served: Workspace,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import aad_core.pipeline.retrain as retrain

    real = retrain.run_if_needed
    monkeypatch.setattr(retrain, "run_if_needed", lambda ws, **kw: real(ws, **{**kw, "runners": _stages([]),
                                                                              "report": False}))
    with served.store() as store:
        store.add(_calls(40, start=1000))
    # a fresh Workspace reads aad.toml: the fixture's in-memory settings go there
    text = served.config_path.read_text()
    for key, value in (("retrain_min_new_traces", "30"), ("target_agreement", "0.3"), ("trainer", '["lookup"]')):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert n == 1, key
    served.config_path.write_text(text)
    out = runner.invoke(app, ["distill", "--if-needed", "-w", str(served.root)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "40 new traces" in out.output and "[route] retrain_min_new_traces = 30" in out.output
    assert "v2: promoted" in out.output and "at least as well" in out.output
    bad = runner.invoke(app, ["distill", "--if-needed", "--force", "-w", str(served.root)])
    assert bad.exit_code != 0 and "exclude each other" in bad.output
