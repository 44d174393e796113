"""`aad distill`: stage resumption by input hash, --force, profiles.

The orchestration tests swap the stage functions for small recorders (the stages themselves are
tested in their own files); they write the same artifacts the real stages write, so the
fingerprinting is exercised for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aad_core.artifacts import ClusterSelection, ClusterState, EvalReport, RouterState, Selection
from aad_core.pipeline.distill import QUICK, STAGES, apply_profile, load_distill_state, run_distill
from aad_core.schema import Cluster
from aad_core.workspace import Workspace
from tests.conftest import make_trace


def _clusters(size: int, *, routine: bool = True, criterion: str = "") -> ClusterState:
    cluster = Cluster(id=0, label="c0", size=size, variance=0.1, mean_similarity=0.9, routine=routine, share_calls=1.0)
    return ClusterState(clusters=[cluster], assignments={}, split={}, dropped={}, criterion=criterion)


def _recording_runners(calls: list[str]):
    def cluster(ws: Workspace, profile, progress) -> str:
        calls.append("cluster")
        with ws.store() as store:
            n = store.count()
        _clusters(n, criterion=f"k={ws.config.cluster.k}").save(ws)
        return "1 cluster"

    def select(ws, profile, progress):
        calls.append("select")
        size = ClusterState.load(ws).clusters[0].size
        Selection(clusters={0: ClusterSelection(selected=[], label=f"size {size}")},
                  fraction=ws.config.select.fraction).save(ws)
        return "selected"

    def train(ws, profile, progress):
        calls.append("train")
        folder = ws.specialists_dir / "cluster-0" / "1"
        folder.mkdir(parents=True, exist_ok=True)
        lora_r = ws.config.component_table("trainer", "qlora")["lora_r"]
        (folder / "adapter_config.json").write_text(json.dumps({"r": lora_r}))
        (folder / "adapter_model.safetensors").write_bytes(b"w" * lora_r)
        return "trained"

    def evaluate(ws, profile, progress):
        calls.append("evaluate")
        adapter = (ws.specialists_dir / "cluster-0" / "1" / "adapter_config.json").read_text()
        EvalReport(clusters=[{"cluster_id": 0, "promoted": True, "adapter": adapter}],
                   summary={"n": ws.config.eval.max_heldout}).save(ws)
        return "evaluated"

    def route(ws, profile, progress):
        calls.append("route")
        RouterState(clusters={0: {"threshold": 0.5, "eval_n": EvalReport.load(ws).summary["n"]}},
                    threshold_quantile=ws.config.route.threshold_quantile).save(ws)
        return "routed"

    return {"cluster": cluster, "select": select, "train": train, "evaluate": evaluate, "route": route}


@pytest.fixture
def ws(workspace: Workspace) -> Workspace:
    with workspace.store() as store:
        store.add([make_trace(f"question {i}", f"answer {i}") for i in range(3)])
    return workspace


def _run(ws: Workspace, calls: list[str], **kw):
    fresh = Workspace(ws.root)  # a new process would re-read aad.toml
    return run_distill(fresh, runners=_recording_runners(calls), report=False, show_progress=False, **kw)


def test_second_run_skips_every_up_to_date_stage(ws):
    calls: list[str] = []
    first = _run(ws, calls)
    assert [r.status for r in first] == ["ran"] * 5 and calls == list(STAGES)
    calls.clear()
    second = _run(ws, calls)
    assert calls == [] and [r.status for r in second] == ["skipped"] * 5
    assert set(load_distill_state(ws).stages) == set(STAGES)


def test_config_change_redoes_that_stage_and_the_ones_after_it(ws):
    calls: list[str] = []
    _run(ws, calls)
    calls.clear()
    text = ws.config_path.read_text().replace("lora_r = 16", "lora_r = 8")
    assert text != ws.config_path.read_text()
    ws.config_path.write_text(text)
    _run(ws, calls)
    assert calls == ["train", "evaluate", "route"]


@pytest.mark.parametrize(("old", "new", "redone"), [
    ('fast_path = "int8"', 'fast_path = "int4"', ["train", "evaluate", "route"]),  # the answers the gate judges
    ("target_agreement = 0.95", "target_agreement = 0.97", ["train", "evaluate", "route"]),  # the auditions' gate
    ("teacher_price_per_mtok = 10.0", "teacher_price_per_mtok = 3.0", ["evaluate", "route"]),  # no training decision
])
def test_a_change_to_what_the_gate_judges_redoes_the_stages_that_ran_the_gate(ws, old, new, redone):
    calls: list[str] = []
    _run(ws, calls)
    calls.clear()
    text = ws.config_path.read_text().replace(old, new)
    assert text != ws.config_path.read_text()
    ws.config_path.write_text(text)
    _run(ws, calls)
    assert calls == redone


def test_new_traces_redo_everything_and_force_redoes_everything(ws):
    calls: list[str] = []
    _run(ws, calls)
    calls.clear()
    with ws.store() as store:
        store.add([make_trace("a new question", "a new answer")])
    _run(ws, calls)
    assert calls == list(STAGES)
    calls.clear()
    _run(ws, calls, force=True)
    assert calls == list(STAGES)


def test_a_changed_or_missing_artifact_is_rebuilt(ws):
    calls: list[str] = []
    _run(ws, calls)
    calls.clear()
    EvalReport.path(ws).unlink()
    _run(ws, calls)
    assert calls == ["evaluate"]  # rebuilt identically, so the router stays up to date
    calls.clear()
    Selection(clusters={}, fraction=0.9).save(ws)  # e.g. 'aad select' run by hand with other settings
    _run(ws, calls)
    assert calls[0] == "select" and "cluster" not in calls


def test_interrupted_run_resumes_after_the_last_finished_stage(ws):
    calls: list[str] = []
    runners = _recording_runners(calls)

    def boom(ws, profile, progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(Workspace(ws.root), runners={**runners, "train": boom}, report=False, show_progress=False)
    assert calls == ["cluster", "select"]
    calls.clear()
    _run(ws, calls)
    assert calls == ["train", "evaluate", "route"]


def test_quick_profile_shrinks_but_never_grows_the_run(ws):
    ws.config.eval.max_heldout = 4
    apply_profile(ws, QUICK)
    assert ws.config.component_table("trainer", "qlora")["max_steps"] == 8 and ws.config.eval.max_heldout == 4
    calls: list[str] = []
    _run(ws, calls)
    calls.clear()
    _run(ws, calls, profile="quick")  # shorter max_length (scoring + training), fewer steps: clusters stay
    assert calls == ["select", "train", "evaluate", "route"]


def test_without_a_routine_cluster_later_stages_are_skipped_with_the_reason(ws):
    calls: list[str] = []
    runners = _recording_runners(calls)

    def cluster(ws, profile, progress):
        calls.append("cluster")
        _clusters(3, routine=False).save(ws)
        return "1 cluster, 0 routine"

    results = run_distill(Workspace(ws.root), runners={**runners, "cluster": cluster}, report=False, show_progress=False)
    assert calls == ["cluster"]
    assert [r.status for r in results] == ["ran"] + ["skipped"] * 4
    assert "stays with the teacher" in results[-1].detail


def test_unknown_profile_is_a_clear_error(ws):
    with pytest.raises(ValueError, match="'profile' parameter of run_distill must be one of"):
        run_distill(ws, profile="fast", report=False)


def test_distill_end_to_end_on_a_small_demo_workspace(tmp_path, shared_dir, monkeypatch):
    """The real stages (MiniLM clustering, tiny random student for scoring/training/evaluation),
    then a second run that skips everything, then --force on one stage's input."""
    from aad_core.demo import create_demo_workspace
    from tests.tiny_models import make_tiny_student

    monkeypatch.setenv("AAD_DATA_DIR", str(shared_dir / "data"))
    student = make_tiny_student(tmp_path / "student")
    sizes = {"intent": 30, "extract": 30, "tool_call": 6, "no_tool": 4, "sql": 6, "plan": 8}
    config = {("train", "student"): str(student), ("cluster", "min_size"): 10, ("trainer.qlora", "max_steps"): 2,
              ("eval", "max_heldout"): 3, ("eval", "max_new_tokens"): 6, ("train", "max_length"): 400}
    ws = create_demo_workspace(tmp_path / "demo", sizes=sizes, config=config, redact=False)
    first = run_distill(Workspace(ws.root), show_progress=False)
    assert [r.stage for r in first] == [*STAGES, "report"]
    assert all(r.status == "ran" for r in first)
    for artifact in ("clusters.json", "selection.json", "eval.json", "router.json"):
        assert ws.state_path(artifact).exists(), artifact
    assert ws.report_path.exists()
    evaluation = json.loads(ws.state_path("eval.json").read_text())
    assert any(c["status"] == "evaluated" for c in evaluation["clusters"])
    kinds = {c["specialist"]["kind"] for c in evaluation["clusters"] if c["status"] == "evaluated"}
    assert "lora" in kinds  # the JSON extraction task trains a LoRA adapter (its calls fit max_length)
    second = run_distill(Workspace(ws.root), show_progress=False)
    assert [r.status for r in second[:-1]] == ["skipped"] * len(STAGES)


def test_distill_runs_every_stage_on_a_demo_workspace_stored_in_postgresql(tmp_path, shared_dir, monkeypatch,
                                                                          postgres_url):
    """The issue's acceptance: the demo distils from PostgreSQL (a fresh schema on the session's real
    server), every stage reads the traces through the store, the report counts them, and nothing is
    written to the workspace's SQLite file."""
    import sqlite3

    from aad_core.demo import create_demo_workspace
    from tests.tiny_models import make_tiny_student

    monkeypatch.setenv("AAD_DATA_DIR", str(shared_dir / "data"))
    monkeypatch.delenv("AAD_STORE__URL", raising=False)
    student = make_tiny_student(tmp_path / "student")
    sizes = {"intent": 30, "extract": 30, "tool_call": 6, "no_tool": 4, "sql": 6, "plan": 8}
    config = {("train", "student"): str(student), ("cluster", "min_size"): 10, ("trainer.qlora", "max_steps"): 2,
              ("eval", "max_heldout"): 3, ("eval", "max_new_tokens"): 6, ("train", "max_length"): 400,
              ("store", "url"): postgres_url}
    ws = create_demo_workspace(tmp_path / "demo", sizes=sizes, config=config, redact=False)
    ws = Workspace(ws.root)
    assert ws.store_url == postgres_url  # from aad.toml, not the environment
    with ws.store() as store:
        assert type(store).__name__ == "PostgresTraceStore"
        n_traces = store.count()
    assert n_traces >= sum(sizes.values())

    results = run_distill(ws, profile="quick", show_progress=False)
    assert [r.stage for r in results] == [*STAGES, "report"]
    assert [r.status for r in results] == ["ran"] * (len(STAGES) + 1), [(r.stage, r.status, r.detail) for r in results]
    for artifact in ("clusters.json", "selection.json", "eval.json", "router.json"):
        assert ws.state_path(artifact).exists(), artifact
    state = ClusterState.load(ws)
    with ws.store() as store:
        stored = set(store.ids())
    assert set(state.assignments) <= stored and state.routine_clusters()
    evaluation = json.loads(ws.state_path("eval.json").read_text())
    assert any(c["status"] == "evaluated" for c in evaluation["clusters"])

    html = ws.report_path.read_text(encoding="utf-8")
    assert f'<div class="card">traces<b>{n_traces}</b></div>' in html  # the store's count, not "n/a"
    assert "banking77" in html.lower()  # the data attributions come from the traces in PostgreSQL

    if ws.db_path.exists():  # the traces live in PostgreSQL: the workspace's SQLite file holds none
        conn = sqlite3.connect(ws.db_path)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "traces" not in tables or conn.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 0
        finally:
            conn.close()

    second = run_distill(Workspace(ws.root), profile="quick", show_progress=False)
    assert [r.status for r in second[:-1]] == ["skipped"] * len(STAGES)
