"""S3: the K-Means clusterer, run_cluster's artifact, stable ids, routine flags, the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from _fake_embedder import register_fake_embedder
from aad_core.artifacts import ClusterMap, png_path
from aad_core.errors import StageError
from aad_core.pipeline.cluster import load_clusters, run_cluster
from aad_core.report import draw_cluster_map
from aad_core.schema import Usage
from conftest import make_trace

GROUPS = {
    "intent": ("You classify the intent of bank customers. Answer with one label.",
               "card lost stolen blocked pin transfer balance refund account fee atm".split()),
    "sql": ("You write SQLite queries for the academic database. Answer with SQL only.",
            "authors papers citations journal conference year count list published domain".split()),
    "weather": ("You answer weather questions for travellers.",
                "rain sunny forecast tomorrow temperature wind snow paris berlin umbrella".split()),
}


def _traces(group: str, n: int, seed: int = 0, cost: float = 0.01) -> list:
    system, words = GROUPS[group]
    rng = random.Random(f"{group}-{seed}")
    out = []
    for i in range(n):
        user = " ".join(rng.sample(words, 4)) + f" case {seed}-{i}"
        t = make_trace(user, f"{group} answer {i}", system=system, task=group, cost=cost)
        t.usage = Usage(prompt_tokens=10, completion_tokens=10, total_tokens=20)
        out.append(t)
    return out


def _use_fake(ws) -> None:
    register_fake_embedder()
    text = ws.config_path.read_text().replace('embedder = "minilm"', 'embedder = "fake"')
    ws.config_path.write_text(text)
    ws.__dict__.pop("config", None)


def _add(ws, traces) -> None:
    with ws.store() as store:
        store.add(traces)


# -- the clusterer ----------------------------------------------------------------------------
def _blobs(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, 24))
    y = np.repeat(np.arange(k), n)
    X = centers[y] + 0.05 * rng.normal(size=(k * n, 24))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def test_kmeans_chooses_k_by_silhouette_and_honours_a_given_k() -> None:
    from aad_plugins.kmeans import KMeansClusterer

    X, y = _blobs(5, 40)
    auto = KMeansClusterer(k_min=2, k_max=9, seed=0).fit(X)
    assert auto.k_ == 5 and auto.criterion_ == "silhouette" and set(auto.scores_) == set(range(2, 10))
    assert max(auto.scores_, key=auto.scores_.get) == 5
    assert auto.centroids_.shape == (5, 24)
    # Each true group lands in exactly one cluster.
    assert all(len(set(auto.labels_[y == g].tolist())) == 1 for g in range(5))
    given = KMeansClusterer(k=3, seed=0).fit(X)
    assert given.k_ == 3 and given.criterion_ == "given" and given.scores_ == {}
    mini = KMeansClusterer(k=5, seed=0, minibatch_threshold=100).fit(X)  # MiniBatchKMeans path
    assert all(len(set(mini.labels_[y == g].tolist())) == 1 for g in range(5))
    a, b = KMeansClusterer(k=4, seed=3).fit(X), KMeansClusterer(k=4, seed=3).fit(X)
    assert np.array_equal(a.labels_, b.labels_)


def test_kmeans_rejects_bad_parameters() -> None:
    from aad_plugins.kmeans import KMeansClusterer

    X, _ = _blobs(2, 5)
    with pytest.raises(ValueError, match="The 'k_max' parameter of KMeansClusterer must be"):
        KMeansClusterer(k_min=5, k_max=3).fit(X)
    with pytest.raises(ValueError, match="The 'k' parameter"):
        KMeansClusterer(k=0).fit(X)
    with pytest.raises(ValueError, match="2-D array"):
        KMeansClusterer().fit(X[0])


def test_registered_components() -> None:
    from aad_core.plugins import get_registry

    reg = get_registry()
    assert "kmeans" in reg.names("clusterer") and "minilm" in reg.names("embedder")


# -- run_cluster ------------------------------------------------------------------------------
def test_run_cluster_writes_the_artifact_and_flags_routine_clusters(workspace) -> None:
    _use_fake(workspace)
    workspace.config.cluster.variance_threshold = 10.0  # every cluster passes on variance ...
    workspace.config.cluster.min_size = 30  # ... so size alone decides here
    err = make_trace("broken call", "", status="error", error="teacher timeout")
    traces = _traces("intent", 60) + _traces("sql", 45) + _traces("weather", 12, cost=0.0)
    _add(workspace, traces + [err])
    state = run_cluster(workspace, k=3, show_progress=False)

    data = json.loads(workspace.state_path("clusters.json").read_text())
    assert set(data) - {"aad_version", "written_at"} == {
        "seed", "embedder", "model_id", "view", "k", "criterion", "clusters", "assignments", "split", "dropped",
        "replaceability"}
    assert data["embedder"] == "fake" and data["k"] == 3 and data["criterion"] == "given"
    # The stage saves the 2-D projection; 'aad cluster' and the report draw it (report/ owns matplotlib).
    cluster_map = ClusterMap.load(workspace)
    assert len(cluster_map.points) == len(cluster_map.cluster_ids) == len(state.assignments)
    assert set(cluster_map.centroids) == {c.id for c in state.clusters}
    assert not png_path(workspace).exists()
    assert draw_cluster_map(workspace).read_bytes()[:4] == b"\x89PNG"

    by_task = {c.task: c for c in state.clusters}
    assert set(by_task) == {"intent", "sql", "weather"}
    assert [by_task[t].size for t in ("intent", "sql", "weather")] == [60, 45, 12]
    assert by_task["intent"].routine and by_task["sql"].routine and not by_task["weather"].routine
    for c in state.clusters:  # one task per cluster, labels from c-TF-IDF keywords
        assert {traces_by_id.task for traces_by_id in traces if state.assignments.get(traces_by_id.id) == c.id} == {c.task}
        assert c.keywords and c.label.startswith(c.keywords[0])
        assert 0 < c.variance < 2 and 0 < c.mean_similarity <= 1 and len(c.centroid) == 64
    assert state.dropped == {err.id: "error"}
    assert err.id not in state.assignments
    # Shares: 118 calls recorded, 105 in routine clusters; cost only in intent + sql.
    assert state.replaceability["calls"] == pytest.approx(105 / 118, abs=1e-5)
    assert state.replaceability["cost"] == pytest.approx(1.0)
    assert state.replaceability["routine_clusters"] == 2
    total_tokens = 117 * 20 + err.usage.total_tokens  # the failed call's tokens count in the total
    assert by_task["intent"].share_tokens == pytest.approx(60 * 20 / total_tokens, abs=1e-5)

    loaded = load_clusters(workspace)
    assert loaded.assignments == state.assignments and loaded.split == state.split
    assert np.allclose(loaded.centroids(), state.centroids())
    cid = by_task["intent"].id
    n_held = len(loaded.heldout_ids(cid))
    assert 4 <= n_held <= 20 and n_held + len(loaded.train_ids(cid)) == 60
    assert {c.id for c in loaded.routine_clusters()} == {by_task["intent"].id, by_task["sql"].id}


def test_run_cluster_chooses_k_and_drops_near_duplicates(workspace) -> None:
    _use_fake(workspace)
    base = _traces("intent", 40) + _traces("sql", 40)
    copy = make_trace(base[0].request.last_user_message() + " ", "x", system=GROUPS["intent"][0])
    _add(workspace, base + [copy])
    workspace.config.cluster.unit = "topic"
    state = run_cluster(workspace, show_progress=False)
    assert state.criterion == "silhouette" and state.k == 2
    assert state.dropped[copy.id].startswith(f"near-duplicate of {base[0].id}")


def test_cluster_ids_are_stable_across_reruns(workspace) -> None:
    _use_fake(workspace)
    _add(workspace, _traces("intent", 40) + _traces("sql", 40))
    first = run_cluster(workspace, k=2, show_progress=False)
    # Renumber the saved clusters (as if earlier runs had used other ids).
    data = json.loads(workspace.state_path("clusters.json").read_text())
    remap = {c["id"]: c["id"] + 7 for c in data["clusters"]}
    for c in data["clusters"]:
        c["id"] = remap[c["id"]]
    data["assignments"] = {t: remap[c] for t, c in data["assignments"].items()}
    workspace.state_path("clusters.json").write_text(json.dumps(data))
    task_ids = {c.task: remap[c.id] for c in first.clusters}

    _add(workspace, _traces("intent", 20, seed=1) + _traces("sql", 20, seed=1) + _traces("weather", 40))
    second = run_cluster(workspace, k=3, show_progress=False)
    got = {c.task: c.id for c in second.clusters}
    assert got["intent"] == task_ids["intent"] and got["sql"] == task_ids["sql"]
    assert got["weather"] == max(task_ids.values()) + 1  # a new meaning gets a fresh id
    # Old traces keep their side of the split.
    assert all(second.split[t] == s for t, s in first.split.items())


def test_missing_stage_and_empty_store_errors(workspace) -> None:
    with pytest.raises(StageError) as err:
        load_clusters(workspace)
    assert "aad cluster" in (err.value.hint or "")
    _use_fake(workspace)
    with pytest.raises(StageError, match="no traces"):
        run_cluster(workspace, show_progress=False)


def test_cli_cluster_table_and_json(workspace) -> None:
    from typer.testing import CliRunner

    from aad_core.cli import app

    _use_fake(workspace)
    _add(workspace, _traces("intent", 40) + _traces("weather", 35))
    runner = CliRunner()
    res = runner.invoke(app, ["cluster", "--k", "2", "--json", "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["k"] == 2 and len(data["clusters"]) == 2 and data["map"].endswith("cluster_map.png")
    assert "centroid" not in data["clusters"][0]
    res = runner.invoke(app, ["cluster", "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    assert "Replaceability" in res.stdout and "cluster_map.png" in res.stdout and "variance" in res.stdout
    res = runner.invoke(app, ["cluster", "--k", "0", "-w", str(workspace.root)])
    assert res.exit_code != 0


@pytest.mark.real_model
def test_real_minilm_finds_known_groups(workspace) -> None:
    from aad_core.models.embedding import clear_caches

    clear_caches()
    rng = random.Random(0)
    intents = ["I lost my card", "my card was stolen yesterday", "how do I top up my account",
               "why was I charged a fee", "the ATM kept my card", "I want a refund for this payment",
               "how long does a transfer take", "can I change my PIN", "what is the exchange rate for dollars",
               "my top-up failed", "where is my new card", "cancel my transfer please"]
    sql = ["list all authors", "how many papers were published in 2015", "which journal has the most papers",
           "authors with more than 10 citations", "papers by conference and year", "top cited paper in databases",
           "count of organizations", "average citations per paper", "keywords used in 2020 papers",
           "authors from Stanford", "conferences held in 2019", "papers without citations"]
    weather = ["will it rain in Paris tomorrow", "temperature in Berlin this weekend", "is it windy in Chicago",
               "snow forecast for Denver", "do I need an umbrella in London today", "UV index in Madrid",
               "how hot will it be in Cairo", "storm warning for Miami", "weather in Tokyo next week",
               "is it foggy in San Francisco", "humidity in Singapore", "frost tonight in Oslo"]
    traces = []
    for task, system, users in (("intent", GROUPS["intent"][0], intents), ("sql", GROUPS["sql"][0], sql),
                                ("weather", GROUPS["weather"][0], weather)):
        traces += [make_trace(u, "ok", system=system, task=task) for u in users]
    rng.shuffle(traces)
    _add(workspace, traces)
    workspace.config.cluster.min_size = 5
    state = run_cluster(workspace, show_progress=False)
    assert state.model_id == "sentence-transformers/all-MiniLM-L6-v2" and state.k == 3
    for c in state.clusters:
        members = [t for t in traces if state.assignments.get(t.id) == c.id]
        assert len({t.task for t in members}) == 1 and len(members) == 12
        assert c.routine, c  # one agent node, 12 related requests: narrow
    # The embedding cache makes a re-run embed nothing new and keep every id.
    again = run_cluster(workspace, show_progress=False)
    assert again.assignments == state.assignments
    clear_caches()


@pytest.mark.real_model
def test_real_minilm_on_a_small_mixed_real_workload(workspace, shared_dir, monkeypatch) -> None:
    """Banking77 intents, defog SQL questions and BFCL tool calls: each family its own clusters."""
    from collections import Counter

    from aad_core.demo.datasets import mixed_workload
    from aad_core.models.embedding import clear_caches

    monkeypatch.setenv("AAD_DATA_DIR", str(shared_dir / "data"))
    clear_caches()
    traces = mixed_workload(150, seed=0)
    assert Counter(t.task for t in traces) == {"intent": 55, "sql": 50, "tools": 45}
    _add(workspace, traces)
    state = run_cluster(workspace, show_progress=False)
    family = {t.id: t.task for t in traces}
    for c in state.clusters:
        fams = Counter(family[t] for t in state.member_ids(c.id))
        assert fams.most_common(1)[0][1] / c.size >= 0.98, (c.label, fams)
    intent = next(c for c in state.clusters if c.task == "intent")
    assert intent.variance < workspace.config.cluster.variance_threshold and intent.routine
    assert state.replaceability["calls"] > 0
    clear_caches()


# -- splitting clusters that mix agent nodes --------------------------------------------------
def test_split_mixed_nodes_splits_only_broad_clusters_with_two_sizeable_nodes() -> None:
    from aad_core.pipeline.cluster import split_mixed_nodes

    rng = np.random.default_rng(0)
    a, b = np.eye(8)[0], np.eye(8)[1]

    def around(center: np.ndarray, n: int, noise: float) -> np.ndarray:
        X = center + noise * rng.normal(size=(n, 8))
        return X / np.linalg.norm(X, axis=1, keepdims=True)

    # Cluster 0: nodes A (40) and B (35) far apart, plus 3 calls of node C close to B -> split in two.
    # Cluster 1: nodes D (40) and E (12): E is too small to stand alone -> whole.
    X = np.vstack([around(a, 40, 0.1), around(b, 35, 0.1), around(b, 3, 0.1), around(a, 52, 0.1)])
    nodes = ["A"] * 40 + ["B"] * 35 + ["C"] * 3 + ["D"] * 40 + ["E"] * 12
    labels = np.array([0] * 78 + [1] * 52)
    new, n_split = split_mixed_nodes(labels, nodes, X, min_calls=30, variance_threshold=0.35)
    assert n_split == 1 and len(set(new.tolist())) == 3
    assert len(set(new[:40].tolist())) == 1 and len(set(new[40:78].tolist())) == 1  # C joined B's part
    assert new[0] != new[40] and len(set(new[78:].tolist())) == 1

    # The same two nodes in a narrow cluster (variance < tau) stay together: one task, two prompts.
    near = np.vstack([around(a, 40, 0.05), around(a, 35, 0.05)])
    new, n_split = split_mixed_nodes(np.zeros(75, dtype=int), ["A"] * 40 + ["B"] * 35, near, min_calls=30,
                                     variance_threshold=0.35)
    assert n_split == 0 and set(new.tolist()) == {0}


def test_stray_calls_move_to_the_cluster_of_their_own_node() -> None:
    from aad_core.pipeline.cluster import rehome_stray_calls

    rng = np.random.default_rng(1)
    X = rng.normal(size=(57, 8))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    # Cluster 0: 30 of A, 5 of B, 2 of C; cluster 1: 20 of B.
    nodes = np.array(["A"] * 30 + ["B"] * 5 + ["C"] * 2 + ["B"] * 20)
    labels = np.array([0] * 37 + [1] * 20)
    new = rehome_stray_calls(labels, nodes, X, max_calls=10)
    assert set(new[:30].tolist()) == {0}  # A stays
    assert set(new[30:35].tolist()) == {1}  # B's strays joined B's cluster
    assert set(new[35:37].tolist()) == {0}  # C is no cluster's majority: it stays where it was
    assert set(new[37:].tolist()) == {1}
    # A group as large as a node of its own (more than max_calls) stays where clustering put it.
    assert (rehome_stray_calls(labels, nodes, X, max_calls=4) == labels).all()


def test_run_cluster_splits_a_given_k_that_merges_two_nodes(workspace) -> None:
    _use_fake(workspace)
    _add(workspace, _traces("intent", 40) + _traces("sql", 40) + _traces("weather", 40))
    state = run_cluster(workspace, k=1, show_progress=False)
    assert len(state.clusters) == 3 and "split by agent node" in state.criterion
    tasks = {c.task for c in state.clusters}
    assert tasks == {"intent", "sql", "weather"}


# -- tasks, not topics ----------------------------------------------------------------------------
def _labelled(system: str, answers: list[str], *, prefix: str, tools: list | None = None) -> list:
    out = []
    for i, answer in enumerate(answers):
        t = make_trace(f"{prefix} request number {i} about {answer}", answer, system=system)
        if tools:
            t.request.tools = tools
        out.append(t)
    return out


def test_one_node_with_one_answer_space_is_one_task_however_many_topics(workspace) -> None:
    """150 intents under one system prompt are one task (the old topic clustering made 16 clusters)."""
    _use_fake(workspace)
    labels = [f"intent_{i % 25}" for i in range(100)]
    _add(workspace, _labelled("Classify the banking query. Answer with one label.", labels, prefix="q"))
    state = run_cluster(workspace, show_progress=False)
    assert len(state.clusters) == 1 and state.clusters[0].routine
    c = state.clusters[0]
    assert c.answer_kind == "label" and c.estimate is not None and 0 <= c.estimate["estimate"] <= 1
    assert state.criterion.startswith("tasks: 1 agent node")


def test_small_nodes_pool_by_answer_space_and_big_nodes_split_only_by_answer_space(workspace) -> None:
    from aad_core.pipeline.cluster import group_tasks
    from aad_core.schema import node_key

    sql = [t for db in range(4) for t in _labelled(f"Write SQLite for database {db}.",
                                                 [f"SELECT name FROM t{db} WHERE id = {i}" for i in range(12)],
                                                 prefix=f"db{db}")]
    mixed = (_labelled("Support agent.", ['{"order": %d}' % i for i in range(40)], prefix="json")
             + _labelled("Support agent.", [f"SELECT * FROM orders WHERE id = {i}" for i in range(40)], prefix="sql"))
    labels, what = group_tasks(sql + mixed, [node_key(t) for t in sql + mixed], min_calls=30)
    assert len(set(labels[:48].tolist())) == 1  # four 12-call SQL nodes: one pooled task
    assert len(set(labels[48:88].tolist())) == 1 and len(set(labels[88:].tolist())) == 1
    assert labels[48] != labels[88] and labels[0] not in (labels[48], labels[88])  # one node, two answer spaces
    assert "1 split by answer space" in what and "1 pool(s)" in what


def test_tool_nodes_keep_their_text_answers_in_the_tool_call_task(workspace) -> None:
    from aad_core.pipeline.cluster import group_tasks
    from aad_core.schema import ToolCall, node_key

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    traces = _labelled("Weather agent.", ["no tool fits"] * 40, prefix="w", tools=tools)
    for t in traces[:25]:
        t.response.content = None
        t.response.tool_calls = [ToolCall.model_validate(
            {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}})]
    labels, _ = group_tasks(traces, [node_key(t) for t in traces], min_calls=10)
    assert len(set(labels.tolist())) == 1


def test_a_task_below_min_estimate_stays_with_the_teacher(workspace) -> None:
    _use_fake(workspace)
    rng = random.Random(0)
    free = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(60)) for _ in range(60)]
    traces = [make_trace(f"essay number {i}", answer, system="Write a long essay.") for i, answer in enumerate(free)]
    _add(workspace, traces)
    workspace.config.cluster.min_estimate = 0.5
    state = run_cluster(workspace, show_progress=False)
    assert len(state.clusters) == 1 and not state.clusters[0].routine
    assert state.clusters[0].estimate["estimate"] < 0.5


def test_distillability_estimate_ranks_closed_answers_above_free_text() -> None:
    from aad_core.pipeline.distillability import estimate_distillability

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    y = np.repeat(np.arange(5), 12)
    X = centers[y] + 0.05 * rng.normal(size=(60, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    closed = [make_trace(f"q {i}", f"label_{y[i]}") for i in range(60)]
    essays = [make_trace(f"q {i}", " ".join(f"w{rng.integers(1000)}" for _ in range(80))) for i in range(60)]
    a = estimate_distillability(closed, X, "label")
    b = estimate_distillability(essays, X, "text")
    assert a.nn_agreement == 1.0 and a.estimate == 1.0
    assert b.estimate < 0.1 and b.copy_rate < 0.2 and b.answer_tokens > 50
