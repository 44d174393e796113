"""aad_core.artifacts: every state file round-trips through its class, and a missing or corrupt
file fails with an AADError that names the file and the command that writes it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aad_core import artifacts
from aad_core.artifacts import (
    Artifact, ClusterMap, ClusterSelection, ClusterState, DistillState, EvalReport, RouterEval, RouterState, Selection,
    SelectionCurve, still_teacher_only,
)
from aad_core.errors import AADError
from aad_core.schema import Cluster
from aad_core.workspace import Workspace


def _cluster(cid: int, routine: bool = True) -> Cluster:
    return Cluster(id=cid, label=f"c{cid}", size=10, variance=0.2, mean_similarity=0.8, routine=routine,
                   share_calls=0.5, centroid=[1.0, 0.0] if cid == 0 else [0.0, 1.0])


EXAMPLES: list[Artifact] = [
    ClusterState(clusters=[_cluster(0), _cluster(1, routine=False)], assignments={"a": 0, "b": 1, "c": 0},
                 split={"a": "train", "b": "train", "c": "heldout"}, dropped={"d": "error"}, seed=3, embedder="fake",
                 model_id="m", view=["system", "user"], k=2, criterion="given",
                 replaceability={"calls": 0.5, "tokens": 0.4, "cost": None, "routine_clusters": 1}),
    ClusterMap(points=[(0.5, -1.25), (2.0, 0.0)], cluster_ids=[0, 1], centroids={0: (0.5, -1.25), 1: (2.0, 0.0)}, seed=1),
    Selection(clusters={0: ClusterSelection(selected=["a"], scores={"a": {"score": 1.5, "kl": 1.0}}, label="c0",
                                            n_train=2)},
              fraction=0.5, selector="top", scorer="kl-uncertainty", student="tiny", uncertainty_weight=0.5, seed=0),
    EvalReport(clusters=[{"cluster_id": 0, "status": "evaluated", "promoted": True, "reason": "promoted: ..."},
                         {"cluster_id": 1, "status": "no specialist", "promoted": False}],
               summary={"n_clusters": 2, "evaluated": 1, "promoted": 1, "promoted_clusters": [0]}, seed=0, parity=0.95,
               teacher_price_per_mtok=10.0, hardware_price_per_hour=0.5, teacher_score_note="note",
               gate={"target_agreement": 0.95, "min_coverage": 0.2, "alpha": 0.05, "test_fraction": 0.5}),
    RouterState(clusters={0: {"threshold": 0.7, "specialist": "c0-x"}, 1: {"threshold": 0.6, "specialist": None}},
                teacher_nodes={"n" * 64: {"calls": 30, "clusters": [1]}}, router="centroid", seed=0, embedder="minilm",
                embed_model=None, view=["system", "user"], threshold_quantile=0.05),
    RouterEval(matrix=[[3, 1], [0, 5]], wrong_specialist=1, accuracy=0.8, routine_recall=0.5, complex_recall=1.0, n=9,
               if_all_routine_served={"matrix": [[3, 1], [0, 5]], "accuracy": 0.8, "n": 9}, served_clusters=[0],
               routine_clusters=[0]),
    DistillState(stages={"cluster": {"input_hash": "abc", "output": "def"}}, seed=0),
    SelectionCurve(budgets=[50, 100], kl_uncertainty=[0.5, 0.7], random=[0.3, 0.5], base_accuracy=0.1, ratio=2.5,
                   ratio_at=100, dataset="banking77", extra={"seed": 0, "fractions": [0.1, 0.3]}),
]


@pytest.mark.parametrize("artifact", EXAMPLES, ids=lambda a: type(a).__name__)
def test_every_artifact_round_trips(workspace: Workspace, artifact: Artifact) -> None:
    path = artifact.save(workspace)
    assert path == workspace.state_path(artifact.FILE) and type(artifact).exists(workspace)
    loaded = type(artifact).load(workspace)
    assert loaded == artifact
    assert loaded.to_json() == artifact.to_json()
    assert set(loaded.stamp) == {"aad_version", "written_at"}  # write_state's stamp, kept apart from the content
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert {k: v for k, v in on_disk.items() if k not in artifacts.STAMP_KEYS} == json.loads(json.dumps(artifact.to_json()))


@pytest.mark.parametrize("kind", [type(a) for a in EXAMPLES], ids=lambda k: k.__name__)
def test_a_missing_file_names_itself_and_the_command_that_writes_it(workspace: Workspace, kind: type[Artifact]) -> None:
    assert kind.load_optional(workspace) is None
    with pytest.raises(AADError) as err:
        kind.load(workspace)
    assert str(kind.path(workspace)) in err.value.message and "does not exist yet" in err.value.message
    assert artifacts.MAKERS[kind.FILE] in (err.value.hint or "")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "{}", '{"clusters": "x", "stages": 3, "matrix": 1, '
                                     '"points": 1, "budgets": {}}'])
@pytest.mark.parametrize("kind", [type(a) for a in EXAMPLES if not isinstance(a, SelectionCurve)],
                         ids=lambda k: k.__name__)
def test_a_corrupt_file_names_itself_and_the_command_that_writes_it(workspace: Workspace, kind: type[Artifact],
                                                                    content: str) -> None:
    kind.path(workspace).parent.mkdir(parents=True, exist_ok=True)
    kind.path(workspace).write_text(content, encoding="utf-8")
    for load in (kind.load, kind.load_optional):  # an unreadable file is an error even where a missing one is not
        with pytest.raises(AADError) as err:
            load(workspace)
        assert str(kind.path(workspace)) in err.value.message and "cannot be read" in err.value.message
        assert f"Run '{artifacts.MAKERS[kind.FILE]}' again" in (err.value.hint or "")


def test_the_selection_curve_tolerates_a_partial_experiment(workspace: Workspace) -> None:
    """The report draws what a benchmark run recorded; unknown keys survive a round trip."""
    workspace.write_state(artifacts.SELECTION_CURVE, {"budgets": [1, 2], "random": [0.1, 0.2], "epochs": 3})
    curve = SelectionCurve.load(workspace)
    assert curve.curves() == {"random": [0.1, 0.2]} and curve.extra == {"epochs": 3}
    workspace.state_path(artifacts.SELECTION_CURVE).write_text('{"budgets": ["many"]}', encoding="utf-8")
    with pytest.raises(AADError, match="cannot be read"):
        SelectionCurve.load(workspace)


def test_cluster_state_lookups() -> None:
    state = EXAMPLES[0]
    assert isinstance(state, ClusterState)
    assert state.member_ids(0) == ["a", "c"] and state.train_ids(0) == ["a"] and state.heldout_ids(0) == ["c"]
    assert [c.id for c in state.routine_clusters()] == [0] and state.cluster(1).label == "c1"
    assert state.centroids().shape == (2, 2)
    with pytest.raises(KeyError, match="No cluster 9"):
        state.cluster(9)


def test_a_new_cluster_map_removes_the_drawing_of_the_old_one(workspace: Workspace) -> None:
    png = artifacts.png_path(workspace)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(b"\x89PNG old")
    EXAMPLES[1].save(workspace)
    assert not png.exists()


def test_router_state_thresholds_and_the_teacher_only_rule() -> None:
    state = EXAMPLES[4]
    assert isinstance(state, RouterState)
    assert state.thresholds() == {0: 0.7, 1: 0.6}
    assert state.teacher_only({0}, min_calls=20) == {"n" * 64: 30}
    assert state.teacher_only({1: "c1"}, min_calls=20) == {}  # its cluster gained a specialist
    assert state.teacher_only(set(), min_calls=0) == {}  # the setting turned off
    nodes: dict[str, Any] = {"a": {"calls": 5, "clusters": [0]}, "b": "not a node"}
    assert still_teacher_only(nodes, set(), min_calls=5) == {"a": 5}


def test_fingerprint_ignores_the_time_stamp_only(workspace: Workspace) -> None:
    assert artifacts.fingerprint(workspace, artifacts.EVAL) is None
    report = EXAMPLES[3]
    report.save(workspace)
    first = artifacts.fingerprint(workspace, artifacts.EVAL)
    report.save(workspace)
    assert artifacts.fingerprint(workspace, artifacts.EVAL) == first
    EvalReport(clusters=[], parity=0.9).save(workspace)
    assert artifacts.fingerprint(workspace, artifacts.EVAL) != first


def test_the_centroid_router_loads_clusters_thresholds_and_promoted_specialists(workspace: Workspace, tmp_path) -> None:
    from aad_core.specialists import SpecialistRegistry
    from aad_plugins.centroid_router import CentroidRouter

    EXAMPLES[0].save(workspace)
    router = CentroidRouter(workspace=workspace, default_threshold=0.5).load()
    assert router.cluster_ids_ == [0, 1] and router.thresholds_ == {0: 0.5, 1: 0.5}
    assert not router.calibrated_ and router.specialists_ == {} and router.teacher_nodes_ == {}

    registry = SpecialistRegistry(workspace)
    for version in (1, 2):
        adapter = tmp_path / f"adapter{version}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
        spec = registry.save(cluster_id=1, label="c1", adapter_dir=adapter, base_model="tiny")
    registry.set_promoted(spec.name, 1, True, "promoted: test")
    assert {cid: s.version for cid, s in registry.promoted().items()} == {1: 1}  # version 2 is not promoted
    EXAMPLES[4].save(workspace)
    router = CentroidRouter(workspace=workspace).load()
    assert router.calibrated_ and router.thresholds_ == {0: 0.7, 1: 0.6}
    assert router.specialists_ == {1: spec.name}
    assert router.teacher_nodes_ == {}  # the node's only cluster (1) now has a specialist
