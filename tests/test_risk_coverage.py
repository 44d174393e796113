"""The risk-coverage gate: the exact binomial lower bound, the threshold choice, the calibration /
test split, the gate's verdict, and the gate inside the per-cluster evaluation."""

from __future__ import annotations

import random

import pytest

from aad_core.pipeline.evaluate import evaluate_cluster
from aad_core.pipeline.evaluate.gate import coverage_gate
from aad_core.pipeline.evaluate.risk_coverage import (best_lower_bound, calibration_test_split, choose_threshold,
                                                      clopper_pearson_lower, min_calls_for, risk_coverage_curve,
                                                      served_at)
from aad_core.schema import Cluster, Specialist
from aad_core.workspace import Workspace
from tests.conftest import make_trace

# -- Clopper-Pearson -----------------------------------------------------------------------------


def test_clopper_pearson_known_values() -> None:
    assert clopper_pearson_lower(59, 59) == pytest.approx(0.9505, abs=1e-4)
    assert clopper_pearson_lower(59, 59) == pytest.approx(0.05 ** (1 / 59), rel=1e-9)
    assert clopper_pearson_lower(0, 10) == 0.0
    assert clopper_pearson_lower(1, 1) == pytest.approx(0.05)
    assert clopper_pearson_lower(58, 58) < 0.95 <= clopper_pearson_lower(59, 59)
    assert min_calls_for(0.95, 0.05) == 59
    # more calls at the same rate: a tighter bound
    assert clopper_pearson_lower(45, 50) < clopper_pearson_lower(450, 500) < 0.9


@pytest.mark.parametrize(("k", "n", "alpha"), [(45, 50, 0.05), (7, 10, 0.1), (180, 200, 0.05), (3, 400, 0.01)])
def test_clopper_pearson_matches_the_beta_quantile(k: int, n: int, alpha: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(stats.beta.ppf(alpha, k, n - k + 1), abs=1e-9)


def test_clopper_pearson_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'alpha' parameter of clopper_pearson_lower"):
        clopper_pearson_lower(3, 5, alpha=1.5)
    with pytest.raises(ValueError, match="'k' parameter of clopper_pearson_lower"):
        clopper_pearson_lower(6, 5)


# -- choosing the threshold ----------------------------------------------------------------------


def _ranked(n: int = 100, right_top: int = 70, seed: int = 0) -> tuple[list[float], list[bool]]:
    """confidence = rank; the top ``right_top`` are right, the rest right by a coin toss."""
    rng = random.Random(seed)
    conf = [float(i) for i in range(n)]
    correct = [i >= n - right_top or rng.random() < 0.5 for i in range(n)]
    return conf, correct


def test_the_threshold_serves_about_the_confident_top() -> None:
    conf, correct = _ranked()
    choice = choose_threshold(conf, correct, target=0.95)
    assert choice is not None
    assert 0.70 <= choice.coverage <= 0.75 and choice.threshold <= 30.0
    assert choice.lower_bound >= 0.95 and choice.agreement >= 0.95
    assert choice.n_served == round(choice.coverage * 100) and choice.n == 100
    # the largest such share: one more call served drops the bound below the target
    wider = served_at(conf, correct, choice.threshold - 1)
    assert wider.lower_bound < 0.95


def test_no_threshold_qualifies_on_too_few_calls() -> None:
    assert choose_threshold([0.9] * 20, [True] * 20, target=0.95) is None  # 20 of 20: lower bound 0.86
    closest = best_lower_bound([0.9] * 20, [True] * 20)
    assert closest is not None and closest.coverage == 1.0 and closest.lower_bound == pytest.approx(0.05 ** (1 / 20))


def test_tied_confidences_are_served_together() -> None:
    conf = [1.0] * 70 + [0.5] * 30
    correct = [True] * 60 + [False] * 10 + [True] * 30  # the 1.0 tie is 60/70: never served apart
    assert choose_threshold(conf, correct, target=0.8) is not None
    assert choose_threshold(conf, correct, target=0.95) is None


def test_missing_confidence_is_never_served() -> None:
    conf = [None, float("nan")] + [0.9] * 80
    curve = risk_coverage_curve(conf, [True] * 82)
    assert curve[-1]["coverage"] == pytest.approx(80 / 82)


def test_risk_coverage_curve() -> None:
    curve = risk_coverage_curve([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1])
    assert [p["coverage"] for p in curve] == [0.25, 0.5, 0.75, 1.0]
    assert [p["agreement"] for p in curve] == pytest.approx([1.0, 1.0, 2 / 3, 0.75])
    assert [p["threshold"] for p in curve] == [0.9, 0.8, 0.7, 0.6]


# -- the calibration / test split ----------------------------------------------------------------


def test_split_is_seeded_disjoint_and_per_id() -> None:
    ids = [f"t{i}" for i in range(400)]
    cal, test = calibration_test_split(ids, seed=3, test_fraction=0.5)
    assert set(cal) | set(test) == set(ids) and not set(cal) & set(test)
    assert 160 < len(test) < 240
    assert calibration_test_split(ids, seed=3) == (cal, test)
    assert calibration_test_split(ids, seed=4) != (cal, test)
    # an id's side does not depend on the other ids (training sees the calibration part of the full list)
    sub_cal, sub_test = calibration_test_split(ids[:50], seed=3)
    assert set(sub_cal) <= set(cal) and set(sub_test) <= set(test)


# -- the gate's verdict ----------------------------------------------------------------------------


def _task(n: int, right_share: float, seed: int, *, informative: bool = True) -> tuple[list[float], list[bool]]:
    """A specialist right on ``right_share`` of a task; when ``informative`` it is sure when right."""
    rng = random.Random(seed)
    correct = [rng.random() < right_share for _ in range(n)]
    conf = [(rng.uniform(0.6, 1.0) if ok else rng.uniform(0.0, 0.5)) if informative else rng.random() for ok in correct]
    return conf, correct


def test_a_specialist_right_on_80_percent_takes_its_confident_share() -> None:
    verdict = coverage_gate(_task(200, 0.8, 1), _task(200, 0.8, 2), signal="confidence")
    assert verdict.promoted, verdict.reason
    assert 0.7 <= verdict.gate["test"]["coverage"] <= 0.9 and verdict.gate["test"]["agreement"] == 1.0
    assert verdict.reason.startswith("promoted: serves ") and "threshold 0." in verdict.reason
    assert "on confidence; calibration: " in verdict.reason and "on 200 calls" in verdict.reason


def test_the_gate_refuses_when_no_threshold_qualifies() -> None:
    verdict = coverage_gate(_task(200, 0.8, 1, informative=False), _task(200, 0.8, 2), signal="mean_logprob")
    assert not verdict.promoted and verdict.gate["threshold"] is None
    assert verdict.reason.startswith("not promoted: no threshold on mean token log-prob reaches agreement 0.95")
    assert "needs at least 59 agreeing calls" in verdict.reason


def test_the_gate_refuses_a_threshold_that_serves_too_little_of_the_test_part() -> None:
    calibration = _task(200, 0.8, 1)
    test = ([0.1] * 100, [True] * 100)  # nobody clears the calibrated threshold
    verdict = coverage_gate(calibration, test, signal="confidence", min_coverage=0.2)
    assert not verdict.promoted and "coverage below min_coverage 20 %" in verdict.reason
    assert verdict.gate["threshold"] is not None and verdict.gate["test"]["n_served"] == 0


def test_the_gate_refuses_when_the_test_part_disagrees() -> None:
    calibration = _task(200, 0.8, 1)
    test = ([0.9] * 100, [True] * 80 + [False] * 20)
    verdict = coverage_gate(calibration, test, signal="confidence")
    assert not verdict.promoted and "agreement significantly below target_agreement 0.95" in verdict.reason
    assert verdict.gate["test"]["p_below_target"] < 1e-6


def test_a_small_test_part_a_little_below_the_target_does_not_refuse_by_chance() -> None:
    """36 of 38 (0.947) is what a specialist right on 97 % of a task often shows on 38 calls: the test
    part refuses only when its agreement is significantly below the target (binomial, alpha 0.05)."""
    calibration = ([0.8] * 197, [True] * 195 + [False] * 2)
    verdict = coverage_gate(calibration, ([0.9] * 38, [True] * 36 + [False] * 2), signal="confidence")
    assert verdict.promoted, verdict.reason
    assert "but not significantly: p = 0.57" in verdict.reason
    refused = coverage_gate(calibration, ([0.9] * 38, [True] * 32 + [False] * 6), signal="confidence")
    assert not refused.promoted and "significantly below" in refused.reason


# -- inside the per-cluster evaluation -----------------------------------------------------------


class _Confident:
    """A specialist right on 80 % of the calls, sure of itself exactly there (mean log-prob)."""

    def __init__(self, answers: dict[str, str], wrong: set[str]) -> None:
        self.answers, self.wrong = answers, wrong

    def generate(self, requests, *, adapter=None, max_new_tokens=128):  # noqa: ANN001, ANN201
        from aad_core.models.runtime import Generation

        out = []
        for r in requests:
            q = r.last_user_message()
            bad = adapter is None or q in self.wrong
            out.append(Generation(text="other" if bad else self.answers[q], mean_logprob=-2.0 if bad else -0.05,
                                  n_tokens=2, latency_ms=5.0))
        return out


def test_evaluate_cluster_promotes_a_specialist_for_its_confident_share(workspace: Workspace) -> None:
    labels = ["card_arrival", "card_linking", "exchange_rate", "top_up"]
    heldout = [make_trace(f"q{i}", labels[i % 4], id=f"h{i}") for i in range(240)]
    wrong = {f"q{i}" for i in range(240) if i % 5 == 0}  # right on 80 %
    runtime = _Confident({f"q{i}": labels[i % 4] for i in range(240)}, wrong)
    cluster = Cluster(id=0, label="intents", size=1000, variance=0.2, mean_similarity=0.8, routine=True)
    spec = Specialist(name="c0-intents", cluster_id=0, version=1, base_model="tiny", path="/nowhere")
    workspace.config.eval.latency_samples = 0

    entry = evaluate_cluster(workspace, cluster, heldout, runtime, spec)

    assert entry["specialist"]["score"] == pytest.approx(0.8) and entry["parity"]["reached"] is False
    gate = entry["gate"]
    assert entry["promoted"] is True, entry["reason"]
    assert gate["signal"] == "mean_logprob" and gate["threshold"] == pytest.approx(-0.05)
    assert gate["test"]["coverage"] == pytest.approx(0.8, abs=0.08) and gate["test"]["agreement"] == 1.0
    assert gate["calibration"]["n"] + gate["test"]["n"] == 240
    assert entry["reason"].startswith("promoted: serves ") and "on mean token log-prob" in entry["reason"]
    assert entry["risk_coverage"]["test"][-1]["coverage"] == 1.0
    # the calibration part is the one training saw: the split of the trace ids
    cal, _ = calibration_test_split([t.id for t in heldout], workspace.config.seed, workspace.config.eval.test_fraction)
    assert gate["calibration"]["n"] == len(cal)


def test_evaluate_cluster_prefers_a_generation_confidence(workspace: Workspace) -> None:
    from dataclasses import dataclass

    from aad_core.models.runtime import Generation

    @dataclass
    class Scored(Generation):
        confidence: float | None = None

    class Runtime:
        def generate(self, requests, *, adapter=None, max_new_tokens=128):  # noqa: ANN001, ANN201
            return [Scored(text="yes", mean_logprob=-0.1, n_tokens=1, latency_ms=1.0, confidence=0.9) for _ in requests]

    heldout = [make_trace(f"q{i}", "yes", id=f"y{i}") for i in range(10)]
    cluster = Cluster(id=0, label="yn", size=50, variance=0.2, mean_similarity=0.8, routine=True)
    spec = Specialist(name="s", cluster_id=0, version=1, base_model="tiny", path="/nowhere")
    workspace.config.eval.latency_samples = 0
    entry = evaluate_cluster(workspace, cluster, heldout, Runtime(), spec)
    assert entry["gate"]["signal"] == "confidence" and entry["promoted"] is False  # 10 calls are too few


def test_an_older_aad_toml_with_the_retired_quantile_keys_still_loads(tmp_path, caplog) -> None:  # noqa: ANN001
    from aad_core.config import default_config_toml, load_config

    path = tmp_path / "aad.toml"
    path.write_text(default_config_toml().replace("[route]\n", "[route]\nconfidence_quantile = 0.05\n"
                                                  "confidence_samples = 24\n", 1), encoding="utf-8")
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
    assert not hasattr(cfg.route, "confidence_quantile")
    assert "[route] confidence_quantile is no longer used" in caplog.text and "[eval] target_agreement" in caplog.text
    assert cfg.eval.target_agreement == 0.95 and cfg.eval.min_coverage == 0.2 and cfg.eval.test_fraction == 0.5


def test_the_router_takes_the_threshold_the_gate_chose_for_that_version(workspace: Workspace) -> None:
    from aad_core.artifacts import EvalReport
    from aad_core.pipeline.calibrate import _confidence_thresholds

    calibration = {"threshold": -0.2, "coverage": 0.71, "agreement": 0.984, "lower_bound": 0.952, "n_served": 128,
                   "n": 180}
    gate = {"signal": "mean_logprob", "threshold": -0.2, "calibration": calibration, "test": {}}
    EvalReport(clusters=[
        {"cluster_id": 0, "status": "evaluated", "promoted": True, "specialist": {"name": "c0", "version": 2}, "gate": gate},
        {"cluster_id": 1, "status": "evaluated", "promoted": True, "specialist": {"name": "c1", "version": 1}, "gate": gate},
    ]).save(workspace)
    out = {"0": {"confidence_threshold": None, "specialist": "c0"}, "1": {"confidence_threshold": None, "specialist": "c1"}}
    specs = {0: Specialist(name="c0", cluster_id=0, version=2, base_model="tiny", path="/x"),
             1: Specialist(name="c1", cluster_id=1, version=3, base_model="tiny", path="/x")}  # retrained since
    _confidence_thresholds(workspace, specs, out)
    assert out["0"]["confidence_threshold"] == -0.2 and out["0"]["confidence_signal"] == "mean_logprob"
    assert out["0"]["confidence_label"] == "mean token log-prob"
    assert out["0"]["confidence_calibration"] == {k: calibration[k] for k in ("coverage", "agreement", "lower_bound",
                                                                              "n_served", "n")}
    # another version was evaluated and this one has no verdict of its own (promoted by hand): no threshold, said so
    assert out["1"]["confidence_threshold"] is None and "no gate verdict of its own" in out["1"]["confidence_note"]


def test_an_older_version_still_promoted_serves_with_its_own_threshold_after_a_refused_retrain(
        workspace: Workspace) -> None:
    """eval.json holds the newest version's verdict only: v2 refused, v1 (still promoted) must keep the
    threshold its own gate chose, not serve every request without one."""
    from aad_core.artifacts import EvalReport
    from aad_core.pipeline.calibrate import _confidence_thresholds
    from aad_core.pipeline.evaluate.runner import served_gate
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(workspace)
    versions = []
    for v in (1, 2):
        folder = workspace.root / f"cards-{v}"
        folder.mkdir()
        (folder / "classifier.npz").write_bytes(b"x")
        versions.append(registry.save(cluster_id=0, label="cards", adapter_dir=folder, base_model="-", name="cards",
                                      kind="classifier", trainer="classifier"))
    v1_gate = {"mode": "risk-coverage", "signal": "confidence", "threshold": 0.61,
               "calibration": {"coverage": 0.7, "agreement": 0.97, "lower_bound": 0.951, "n_served": 400, "n": 571}}
    registry.set_promoted("cards", 1, True, "promoted: v1", gate=served_gate(v1_gate))
    registry.set_promoted("cards", 2, False, "not promoted: v2", gate=served_gate({**v1_gate, "threshold": 0.8}))
    EvalReport(clusters=[{"cluster_id": 0, "status": "evaluated", "promoted": False,
                          "specialist": {"name": "cards", "version": 2}, "gate": {**v1_gate, "threshold": 0.8}}]
               ).save(workspace)
    served = registry.promoted()
    assert served[0].version == 1
    out = {"0": {"confidence_threshold": None, "specialist": "cards"}}
    _confidence_thresholds(workspace, served, out)
    assert out["0"]["specialist"] == "cards" and out["0"]["confidence_threshold"] == 0.61
    assert out["0"]["confidence_signal"] == "confidence" and out["0"]["confidence_calibration"]["n"] == 571


def test_the_eval_table_shows_a_parity_fallback_verdict() -> None:
    """A task with too few calibration calls is decided by parity: its gate has no served share, and
    'aad eval' printed a KeyError instead of its table."""
    from rich.console import Console

    from aad_core.cli.eval_cmds import eval_table

    result = {"clusters": [
        {"cluster_id": 1, "label": "tools", "routine": True, "status": "evaluated", "metric": "tool_calls",
         "n_heldout": 18, "gate": {"mode": "parity-fallback", "test": {"n": 12, "agreement": 0.167}}},
        {"cluster_id": 0, "label": "intent", "routine": True, "status": "evaluated", "metric": "accuracy",
         "n_heldout": 38, "gate": {"test": {"coverage": 1.0, "agreement": 0.947, "n_served": 38, "n": 38}}},
    ]}
    console = Console(width=200, record=True)
    console.print(eval_table(result))
    text = console.export_text()
    assert "all" in text and "0.167" in text and "100%" in text and "0.947" in text
