"""Selectors, the kl-uncertainty scorer, and the select -> train stages on a tiny student."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_trace
from tiny_models import tiny_student  # noqa: F401  (session fixture)

from aad_plugins.selectors import DiverseSelector, RandomSelector, TopSelector, n_selected


def test_top_picks_highest_scores() -> None:
    ids = [f"t{i}" for i in range(10)]
    scores = [0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.0, 0.4, 0.5, 0.6]
    assert TopSelector().select(ids, scores, 0.3) == ["t1", "t3", "t5"]
    assert n_selected(10, 0.3) == 3 and n_selected(1, 0.3) == 1 and n_selected(0, 0.3) == 0
    with pytest.raises(ValueError, match="'fraction' parameter"):
        TopSelector().select(ids, scores, 1.5)


def test_random_is_seeded_and_differs_across_seeds() -> None:
    ids = [f"t{i}" for i in range(50)]
    a = RandomSelector().select(ids, [0.0] * 50, 0.2, seed=1)
    assert a == RandomSelector().select(ids, [0.0] * 50, 0.2, seed=1)
    assert a != RandomSelector().select(ids, [0.0] * 50, 0.2, seed=2)
    assert len(a) == 10 and len(set(a)) == 10


def test_diverse_covers_groups_instead_of_near_copies() -> None:
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8)
    emb = np.vstack([centers[g] + 0.01 * rng.standard_normal(8) for g in (0, 0, 0, 0, 0, 0, 1, 1, 2, 2)])
    ids = [f"t{i}" for i in range(10)]
    scores = [9, 9, 9, 9, 9, 9, 1, 1, 1, 1]  # the top scores are all near-copies from group 0
    top = TopSelector().select(ids, scores, 0.3)
    diverse = DiverseSelector(score_weight=0.1).select(ids, scores, 0.3, embeddings=emb)
    group = lambda i: 0 if int(i[1:]) < 6 else (1 if int(i[1:]) < 8 else 2)  # noqa: E731
    assert {group(i) for i in top} == {0}
    assert {group(i) for i in diverse} == {0, 1, 2}
    # Without embeddings it is the top selector.
    assert DiverseSelector().select(ids, scores, 0.3) == top


def _populate(workspace, n_per_cluster: int = 10) -> dict:
    traces = []
    assignments, split = {}, {}
    for cid, (q, a) in enumerate([("where is my card", "card_arrival"), ("what is the exchange rate", "exchange_rate")]):
        for i in range(n_per_cluster):
            # Half the answers are long odd strings the student finds unlikely: high NLL -> high score.
            answer = a if i % 2 == 0 else f"{a} ; SELECT name FROM users WHERE age > {i} ORDER BY 2 DESC"
            t = make_trace(f"{q} #{i}", answer)
            traces.append(t)
            assignments[t.id] = cid
            split[t.id] = "heldout" if i >= n_per_cluster - 2 else "train"
    with workspace.store() as store:
        store.add(traces)
    clusters = [
        {"id": 0, "label": "card arrival", "size": n_per_cluster, "variance": 0.2, "mean_similarity": 0.8,
         "routine": True, "centroid": [1.0, 0.0]},
        {"id": 1, "label": "exchange rate", "size": n_per_cluster, "variance": 0.2, "mean_similarity": 0.8,
         "routine": True, "centroid": [0.0, 1.0]},
        {"id": 2, "label": "misc", "size": 3, "variance": 0.9, "mean_similarity": 0.1, "routine": False, "centroid": [0.5, 0.5]},
    ]
    workspace.write_state("clusters.json", {"clusters": clusters, "assignments": assignments, "split": split, "dropped": []})
    return {t.id: t for t in traces}


def test_scorer_components(tiny_student: Path) -> None:
    from aad_plugins.kl_uncertainty import KLUncertaintyScorer

    traces = [make_trace("where is my card", "card_arrival"),
              make_trace("where is my card", "card_arrival SELECT name FROM users WHERE age > 3 ORDER BY 2 DESC")]
    scorer = KLUncertaintyScorer(student=str(tiny_student), uncertainty_weight=0.5, batch_size=2, max_length=64, device="cpu")
    out = scorer.score(traces)
    for r in out:
        assert set(r) == {"score", "kl", "entropy", "nll", "answer_tokens"}
        assert r["score"] == pytest.approx(r["kl"] + 0.5 * r["entropy"])
        assert r["kl"] == pytest.approx(r["nll"])  # text-only teacher: one-hot KL is the NLL
    assert out[1]["answer_tokens"] > out[0]["answer_tokens"]
    # Batched with padding == one at a time.
    alone = scorer.score(traces[1:])
    assert alone[0]["score"] == pytest.approx(out[1]["score"], rel=1e-4)
    assert scorer.signal_kinds_ == {"one-hot": 1}
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        KLUncertaintyScorer(student=str(tiny_student), batch_size=0).score(traces)


def test_select_then_train_pipeline(workspace, tiny_student: Path) -> None:
    from aad_core.pipeline.select import run_select
    from aad_core.pipeline.train import run_train
    from aad_core.specialists import SpecialistRegistry

    _populate(workspace)
    cfg = workspace.config
    cfg.train.student = str(tiny_student)
    cfg.train.max_length = 160  # the tiny tokenizer spells the prompt out: a LoRA adapter fits only above its length
    cfg.set_component_param("trainer", "qlora", "batch_size", 2)
    cfg.set_component_param("trainer", "qlora", "gradient_accumulation", 1)
    cfg.set_component_param("scorer", "kl-uncertainty", "batch_size", 4)
    artifact = run_select(workspace, fraction=0.5, selector="top", show_progress=False)
    saved = workspace.read_state("selection.json")
    assert saved["selector"] == "top" and saved["fraction"] == 0.5 and saved["aad_version"]
    assert set(artifact["clusters"]) == {"0", "1"}  # the non-routine cluster is not scored
    for entry in artifact["clusters"].values():
        scores = {i: s["score"] for i, s in entry["scores"].items()}
        assert entry["n_train"] == 8 and len(entry["selected"]) == 4
        assert sorted(scores, key=lambda i: -scores[i])[:4] == entry["selected"] or \
            min(scores[i] for i in entry["selected"]) >= max(s for i, s in scores.items() if i not in entry["selected"])

    specs = run_train(workspace, cluster_id=1, max_steps=2, show_progress=False)
    assert [s.name for s in specs] == ["c1-exchange-rate"]
    spec = specs[0]
    assert (Path(spec.path) / "adapter_model.safetensors").exists()
    manifest = SpecialistRegistry(workspace).manifest(spec)
    assert manifest["selection"] == artifact["clusters"]["1"]["selected"]
    assert manifest["centroid"] == [0.0, 1.0] and manifest["hyperparameters"]["lora_r"] == 16
    # training sees only the calibration part of the held-out split (the gate's test part stays unseen)
    from aad_core.artifacts import ClusterState
    from aad_core.pipeline.evaluate.risk_coverage import calibration_test_split

    calibration, _ = calibration_test_split(sorted(ClusterState.load(workspace).heldout_ids(1)), cfg.seed,
                                            cfg.eval.test_fraction)
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["n_eval"] == len(calibration)
    with pytest.raises(Exception, match="no selection"):
        run_train(workspace, cluster_id=2, max_steps=1, show_progress=False)


def test_cli_select_and_train(workspace, tiny_student: Path, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from aad_core.cli import app

    _populate(workspace, n_per_cluster=6)
    monkeypatch.setenv("AAD_TRAIN__STUDENT", str(tiny_student))
    monkeypatch.setenv("AAD_TRAIN__MAX_LENGTH", "160")
    runner = CliRunner()
    res = runner.invoke(app, ["select", "--selector", "random", "--fraction", "0.5", "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["clusters"]
    assert [r["selected"] for r in rows] == [2, 2]
    res = runner.invoke(app, ["train", "--cluster", "0", "--max-steps", "1", "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["name"] == "c0-card-arrival"
    res = runner.invoke(app, ["train", "--cluster", "7", "-w", str(workspace.root)])
    assert res.exit_code == 1 and "no selection" in res.output


def test_diverse_keeps_every_label_when_scores_follow_the_label() -> None:
    # The base student's surprise depends on the label only: plain top keeps the two "hard" labels.
    import numpy as np

    rng = np.random.default_rng(0)
    labels = [i % 4 for i in range(40)]
    centers = np.eye(8)[:4]
    emb = np.stack([centers[g] + 0.05 * rng.standard_normal(8) for g in labels])
    scores = [float(g >= 2) * 3 + 0.01 * i for i, g in enumerate(labels)]
    ids = [f"t{i}" for i in range(40)]
    top = TopSelector().select(ids, scores, 0.3)
    assert {labels[int(i[1:])] for i in top} == {2, 3}
    diverse = DiverseSelector().select(ids, scores, 0.3, embeddings=emb)
    assert {labels[int(i[1:])] for i in diverse} == {0, 1, 2, 3}
    # score_weight=1 is plain top; out-of-range weights are refused
    assert set(DiverseSelector(score_weight=1.0).select(ids, scores, 0.3, embeddings=emb)) == set(top)
    with pytest.raises(ValueError, match="'score_weight' parameter of DiverseSelector must be a float in \\[0, 1\\]"):
        DiverseSelector(score_weight=2.0).select(ids, scores, 0.3, embeddings=emb)


# -- the answer-aware selector ---------------------------------------------------------------------

def _label_case(n: int = 40, n_labels: int = 4):
    """Scores that follow the label (labels 2 and 3 are "hard"), embeddings clustered by label."""
    rng = np.random.default_rng(0)
    labels = [i % n_labels for i in range(n)]
    emb = np.stack([np.eye(8)[g] + 0.05 * rng.standard_normal(8) for g in labels])
    scores = [float(g >= 2) * 3 + 0.01 * i for i, g in enumerate(labels)]
    ids = [f"t{i}" for i in range(n)]
    answers = [f"intent_{g}" for g in labels]
    return ids, scores, emb, answers, labels


def test_stratified_keeps_every_label_where_top_keeps_one() -> None:
    from aad_plugins.selectors import StratifiedSelector

    ids = [f"t{i}" for i in range(30)]
    answers = ["card_arrival"] * 10 + ["exchange_rate"] * 10 + ["lost_card"] * 10
    scores = [5.0 + 0.01 * i for i in range(10)] + [0.1] * 10 + [0.2] * 10  # one label is "hard" everywhere
    top = TopSelector().select(ids, scores, 0.3)
    assert {answers[int(i[1:])] for i in top} == {"card_arrival"}
    for emb in (None, np.eye(30)):
        chosen = StratifiedSelector().select(ids, scores, 0.3, embeddings=emb, answers=answers, seed=0)
        kept = [answers[int(i[1:])] for i in chosen]
        assert sorted(kept) == ["card_arrival"] * 3 + ["exchange_rate"] * 3 + ["lost_card"] * 3
    # inside a group the score still counts: without embeddings the group's highest score comes first
    assert "t9" in StratifiedSelector().select(ids, scores, 0.3, answers=answers)


def test_stratified_covers_groups_respects_budget_and_is_deterministic() -> None:
    from aad_plugins.selectors import StratifiedSelector

    ids, scores, emb, answers, labels = _label_case()
    sel = StratifiedSelector()
    for fraction in (0.1, 0.3, 0.55, 1.0):
        chosen = sel.select(ids, scores, fraction, embeddings=emb, answers=answers, seed=3)
        assert len(chosen) == n_selected(len(ids), fraction) == len(set(chosen))
        assert set(chosen) <= set(ids)
        assert {labels[int(i[1:])] for i in chosen} == {0, 1, 2, 3}  # every answer group
        assert chosen == sel.select(ids, scores, fraction, embeddings=emb, answers=answers, seed=3)
    # proportional (ideal shares 8, 1.75, 0.25 of 10), and a group of one still gets one
    answers = ["big"] * 32 + ["mid"] * 7 + ["one"]
    chosen = sel.select(ids, scores, 0.25, embeddings=emb, answers=answers)
    assert Counter(answers[int(i[1:])] for i in chosen) == {"big": 8, "mid": 1, "one": 1}
    # fewer picks than groups: the larger groups first, ties in a seeded order; never more than asked
    answers = [f"a{i}" for i in range(40)]
    assert len(sel.select(ids, scores, 0.1, answers=answers, seed=0)) == 4
    assert sel.select(ids, scores, 0.1, answers=answers, seed=0) == sel.select(ids, scores, 0.1, answers=answers, seed=0)
    assert sel.select(ids, scores, 0.1, answers=answers, seed=0) != sel.select(ids, scores, 0.1, answers=answers, seed=1)
    # without answers it is one group: the diverse selector's choice
    assert set(sel.select(ids, scores, 0.3, embeddings=emb)) == set(DiverseSelector().select(ids, scores, 0.3, embeddings=emb))
    with pytest.raises(ValueError, match="'answers' parameter"):
        sel.select(ids, scores, 0.3, answers=answers[:3])
    with pytest.raises(ValueError, match="'score_weight' parameter"):
        StratifiedSelector(score_weight=-1).select(ids, scores, 0.3, answers=answers)


def test_answer_keys_per_output_kind() -> None:
    import json

    from aad_plugins.selectors import NO_TOOL, allocate, answer_keys

    assert answer_keys(["Card_Arrival ", "card_arrival", "lost_card"]) == ["label:card_arrival"] * 2 + ["label:lost_card"]
    call = lambda name: json.dumps([{"name": name, "arguments": {"q": 1}}])  # noqa: E731  (answer_string's form)
    assert answer_keys([call("search"), call("search"), call("book"), "No tool fits this request, sorry."]) == \
        ["tools:search", "tools:search", "tools:book", NO_TOOL]
    assert answer_keys(['{"a": 1, "b": 2}', '{"b": 5, "a": 0}', '{"a": 1}']) == ["json:{a,b}", "json:{a,b}", "json:{a}"]
    sql = answer_keys(["SELECT name FROM users WHERE age > 3", "select name from users where age > 40",
                       "SELECT COUNT(*) FROM orders GROUP BY day"])
    assert sql[0] == sql[1] != sql[2]
    assert len(set(answer_keys(["A long free-text answer, one of many words.", "Another free-text answer here."]))) == 1
    assert allocate([10, 10, 10, 10], 12) == [3, 3, 3, 3]
    assert allocate([50, 5, 5], 10) == [8, 1, 1] and allocate([1, 1, 100], 5) == [1, 1, 3]
    assert allocate([3, 3], 6) == [3, 3] and sum(allocate([50, 5, 5], 2)) == 2


def test_select_stage_gives_answers_to_answer_aware_selectors(workspace, tiny_student: Path, monkeypatch) -> None:
    from aad_core.pipeline.select import run_select
    from aad_plugins.selectors import StratifiedSelector

    traces = _populate(workspace)
    cfg = workspace.config
    cfg.train.student = str(tiny_student)
    cfg.train.max_length = 160
    cfg.set_component_param("scorer", "kl-uncertainty", "batch_size", 4)
    seen: list[tuple[list[str], list[str] | None, bool]] = []
    select = StratifiedSelector.select

    def spy(self, ids, scores, fraction, *, embeddings=None, seed=0, answers=None):
        seen.append((list(ids), None if answers is None else list(answers), embeddings is not None))
        return select(self, ids, scores, fraction, embeddings=embeddings, seed=seed, answers=answers)

    monkeypatch.setattr(StratifiedSelector, "select", spy)
    artifact = run_select(workspace, fraction=0.5, selector="stratified", show_progress=False)
    assert workspace.read_state("selection.json")["selector"] == "stratified"
    assert len(seen) == 2
    for ids, answers, with_embeddings in seen:
        assert answers == [traces[i].answer_text() for i in ids] and with_embeddings
    for entry in artifact["clusters"].values():
        assert len(entry["selected"]) == 4 and set(entry["selected"]) <= set(traces)


def test_a_fraction_of_one_keeps_every_trace_without_scoring(workspace, monkeypatch) -> None:
    """Scoring is a forward pass of the student per trace: wasted when the selection keeps them all."""
    from aad_core.pipeline.select import run_select
    from aad_plugins.kl_uncertainty import KLUncertaintyScorer

    _populate(workspace)
    workspace.config.train.trainer = "qlora"  # a kind that uses the selection

    def refuse(self, traces, show_progress=False):  # noqa: ANN001, ANN202
        raise AssertionError("scored although fraction 1 keeps every trace")

    monkeypatch.setattr(KLUncertaintyScorer, "score", refuse)
    artifact = run_select(workspace, fraction=1.0, show_progress=False)
    for entry in artifact["clusters"].values():
        assert len(entry["selected"]) == entry["n_train"] == 8 and entry["scores"] == {}


def test_a_selector_that_reads_no_score_is_not_given_any(workspace, monkeypatch) -> None:
    """'random' declares needs_scores = False: the scorer never runs, and the selection is still seeded."""
    from aad_core.pipeline.select import run_select
    from aad_plugins.kl_uncertainty import KLUncertaintyScorer
    from aad_plugins.selectors import RandomSelector, TopSelector

    assert RandomSelector.needs_scores is False and TopSelector.needs_scores is True
    _populate(workspace)
    workspace.config.train.trainer = "qlora"

    def refuse(self, traces, show_progress=False):  # noqa: ANN001, ANN202
        raise AssertionError("scored for a selector that reads no score")

    monkeypatch.setattr(KLUncertaintyScorer, "score", refuse)
    first = run_select(workspace, fraction=0.5, selector="random", show_progress=False)
    again = run_select(workspace, fraction=0.5, selector="random", show_progress=False)
    for cid, entry in first["clusters"].items():
        assert len(entry["selected"]) == 4 and entry["scores"] == {}
        assert entry["selected"] == again["clusters"][cid]["selected"]
