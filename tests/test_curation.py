"""Curation: errors out, exact and near-duplicates out, a leak-free, seeded, stable split."""

from __future__ import annotations

import numpy as np

from aad_core.pipeline.curate import curate, split_clusters
from conftest import make_trace


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_errors_and_exact_duplicates_are_dropped() -> None:
    a = make_trace("how do I block my card", "card_blocked")
    dup = make_trace("how do I block my card", "a different answer")  # same request = duplicate
    err = make_trace("what is my balance", "", status="error", error="timeout")
    other_ctx = make_trace("how do I block my card", "x", system="You are a SQL assistant.")
    res = curate([a, dup, err, other_ctx], None, near_duplicate_threshold=0.98)
    assert res.kept == [a.id, other_ctx.id]
    assert res.dropped == {dup.id: f"duplicate of {a.id}", err.id: "error"}
    assert res.representative == {dup.id: a.id}


def test_near_duplicates_only_within_the_same_context() -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=16))
    close = _unit(base + 0.05 * rng.normal(size=16))
    assert 0.98 < float(base @ close) < 0.999
    far = _unit(rng.normal(size=16))
    t = [make_trace("q1", "a"), make_trace("q1 again", "a"), make_trace("q3", "a"),
         make_trace("q1 elsewhere", "a", system="Another agent node.")]
    vecs = np.stack([base, close, far, base])
    res = curate(t, vecs, near_duplicate_threshold=0.98)
    assert res.kept == [t[0].id, t[2].id, t[3].id]
    assert res.dropped[t[1].id].startswith(f"near-duplicate of {t[0].id} (cos 0.9")
    assert t[1].id not in res.representative.values()
    # A lower bar catches nothing more here; a bar above the similarity keeps everything.
    assert curate(t, vecs, near_duplicate_threshold=0.99999).dropped == {}


def test_split_is_per_cluster_seeded_and_stable_when_clusters_grow() -> None:
    assign = {f"t{i}": i % 3 for i in range(300)}
    split = split_clusters(assign, heldout_fraction=0.2, seed=0)
    for cid in range(3):
        ids = [t for t, c in assign.items() if c == cid]
        assert 10 <= sum(split[t] == "heldout" for t in ids) <= 30  # 20 expected
    assert split == split_clusters(assign, heldout_fraction=0.2, seed=0)
    assert split != split_clusters(assign, heldout_fraction=0.2, seed=1)
    grown = split_clusters({**assign, **{f"n{i}": i % 3 for i in range(30)}}, heldout_fraction=0.2, seed=0)
    assert all(grown[t] == split[t] for t in assign)  # nobody changes side
    assert split_clusters({"only": 7}, heldout_fraction=0.2, seed=0) == {"only": "train"}
    pair = split_clusters({"a": 1, "b": 1}, heldout_fraction=0.01, seed=0)
    assert sorted(pair.values()) == ["heldout", "train"]


def test_no_near_duplicate_group_straddles_the_split() -> None:
    rng = np.random.default_rng(1)
    centers = _unit(rng.normal(size=(30, 32)))
    # Each of 30 prompts comes in 4 near-identical variants (e.g. retries with tiny edits).
    vecs = _unit(np.repeat(centers, 4, axis=0) + 0.003 * rng.normal(size=(120, 32)))
    # fixed ids: the split is a seeded hash of the id, so random ids made the held-out count random (flaky)
    traces = [make_trace(f"prompt {i // 4} variant {i % 4}", "a", id=f"t{i:03d}") for i in range(120)]
    res = curate(traces, vecs, near_duplicate_threshold=0.98)
    assert len(res.kept) == 30 and len(res.dropped) == 90
    split = split_clusters({t: 0 for t in res.kept}, heldout_fraction=0.3, seed=0)
    idx = {t.id: i for i, t in enumerate(traces)}
    train = vecs[[idx[t] for t, s in split.items() if s == "train"]]
    held = vecs[[idx[t] for t, s in split.items() if s == "heldout"]]
    assert 3 <= len(held) <= 15
    assert float((held @ train.T).max()) < 0.98
    # Every dropped variant points to a kept trace of its own group.
    for dropped, rep in res.representative.items():
        assert idx[dropped] // 4 == idx[rep] // 4 and rep in res.kept
