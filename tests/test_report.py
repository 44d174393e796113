"""The HTML report: self-contained, every section present, partial state rendered with hints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aad_core.workspace import Workspace
from tests.conftest import make_trace


def _eval_entry(cid: int, spec: float, base: float, promoted: bool, metric: str = "accuracy") -> dict[str, Any]:
    lat = {"p50_ms": 120.0, "p95_ms": 300.0, "mean_ms": 150.0, "n": 10}
    return {
        "cluster_id": cid, "label": f"cluster <{cid}>", "task": "intent", "size": 100, "routine": True,
        "share_calls": 0.3, "status": "evaluated", "evaluator": "classification", "metric": metric,
        "weakest_metric": metric == "semantic_agreement", "n_heldout": 10,
        "specialist": {"name": f"c{cid}", "version": 1, "score": spec, "n": 10},
        "base": {"score": base, "n": 10}, "teacher": {"score": 1.0, "source": "by definition"},
        "latency": {"specialist": lat, "base": lat, "teacher": {**lat, "p50_ms": 900.0, "p95_ms": 2000.0}},
        "cost": {"teacher_per_mtok": 10.0, "specialist_per_mtok": 0.05},
        "parity_target": 0.95, "promoted": promoted,
        "parity": {"target": 0.95, "reached": spec >= 0.95, "reason": "..."},
        "gate": {"signal": "mean_logprob", "threshold": -0.2, "target_agreement": 0.95, "min_coverage": 0.2,
                 "alpha": 0.05,
                 "calibration": {"threshold": -0.2, "coverage": 0.71, "agreement": 0.984, "lower_bound": 0.952,
                                 "n_served": 128, "n": 180},
                 "test": {"threshold": -0.2, "coverage": 0.7 if promoted else 0.1, "agreement": 0.976,
                          "lower_bound": 0.94, "n_served": 126 if promoted else 18, "n": 180}},
        "risk_coverage": {"signal": "mean_logprob", "calibration": [],
                          "test": [{"threshold": -0.1, "coverage": 0.5, "agreement": 1.0, "n_served": 90},
                                   {"threshold": -0.2, "coverage": 0.7, "agreement": 0.976, "n_served": 126},
                                   {"threshold": -2.0, "coverage": 1.0, "agreement": spec, "n_served": 180}]},
        "reason": "promoted: ..." if promoted else "not promoted: below parity <script>alert(1)</script>",
        "examples": [{"request": "where is my <b>card</b>?", "teacher": "card_arrival", "base": "I think...",
                      "specialist": "card_arrival", "specialist_correct": True}],
    }


def populate(ws: Workspace, *, evaluation: bool = True, extras: bool = True) -> None:
    """Write the artifacts every stage leaves, as the stages would (values are made up)."""
    clusters = [
        {"id": 0, "label": "card arrival", "size": 120, "variance": 0.3, "mean_similarity": 0.7, "routine": True,
         "share_calls": 0.4, "share_tokens": 0.3, "share_cost": 0.3, "task": "intent"},
        {"id": 1, "label": "sql report", "size": 80, "variance": 0.35, "mean_similarity": 0.6, "routine": True,
         "share_calls": 0.3, "share_tokens": 0.3, "share_cost": 0.3, "task": "sql"},
        {"id": 2, "label": "multi-step travel", "size": 40, "variance": 0.9, "mean_similarity": 0.2, "routine": False,
         "share_calls": 0.3, "share_tokens": 0.4, "share_cost": 0.4, "task": "travel"},
    ]
    ws.write_state("clusters.json", {"clusters": clusters, "assignments": {}, "split": {}, "dropped": [],
                                     "replaceability": {"calls": 0.7, "tokens": 0.6, "cost": 0.6,
                                                        "routine_clusters": [0, 1]}})
    if evaluation:
        no_spec = {"cluster_id": 2, "label": "multi-step travel", "size": 40, "routine": False, "status": "no specialist",
                   "promoted": False, "reason": "not routine: stays with the teacher"}
        ws.write_state("eval.json", {
            "seed": 0, "parity": 0.95, "teacher_price_per_mtok": 10.0, "hardware_price_per_hour": 0.1,
            "teacher_score_note": "The teacher scores 1.0 on itself by definition.",
            "clusters": [_eval_entry(0, 0.97, 0.1, True), _eval_entry(1, 0.6, 0.2, False, "sql_execution"), no_spec],
            "summary": {"n_clusters": 3, "evaluated": 2, "promoted": 1, "promoted_clusters": [0]},
        })
    if extras:
        ws.write_state("selection_curve.json", {"budgets": [50, 100, 200, 400], "kl_uncertainty": [0.5, 0.7, 0.8, 0.85],
                                                "random": [0.3, 0.5, 0.6, 0.75], "ratio_at": 100, "base_accuracy": 0.1,
                                                "dataset": "banking77 (PolyAI, CC-BY-4.0)"})
        ws.write_state("router_eval.json", {"labels": ["routine", "complex"], "targets": ["specialist", "teacher"],
                                            "matrix": [[30, 5], [2, 40]], "accuracy": 0.9, "routine_recall": 0.86,
                                            "complex_recall": 0.95, "n": 77})


def _check_self_contained(text: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//|file:)""", text, re.IGNORECASE)
    assert "<script" not in text.lower()  # also proves escaping: the made-up reason holds a <script> tag
    assert "<link" not in text.lower()


def test_full_report_has_every_section_and_is_self_contained(workspace: Workspace) -> None:
    from aad_core.report import write_report

    populate(workspace)
    workspace.store().add([make_trace("card?", "card_arrival", metadata={"gold_source": "banking77/train.csv"})])
    path = write_report(workspace)
    assert path == workspace.report_path
    text = path.read_text(encoding="utf-8")
    _check_self_contained(text)
    for heading in ("Task clusters", "Per-cluster results", "Risk-coverage gate", "Data selection", "Router",
                    "Latency and cost",
                    "Replaceability estimate", "Reproducibility", "Data attribution"):
        assert f"<h2>{heading}" in text, heading
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 7  # clusters, scores, risk-coverage, curves, confusion, latency/cost, replaceability
    assert "risk-coverage curves" in text and "0.952" in text  # the gate's figures per cluster
    assert "Not run yet" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "cluster &lt;0&gt;" in text
    assert "CC-BY-4.0" in text and "banking77" in text
    # ratio: KL reaches 0.7 at 100; random reaches 0.7 at 200 + (0.1 / 0.15) * 200 = 333.3 -> 3.3x
    assert "3.3" in text
    assert "not routine: stays with the teacher" in text


def test_partial_state_says_what_to_run(workspace: Workspace) -> None:
    from aad_core.report import render_report

    empty = render_report(workspace)
    _check_self_contained(empty)
    assert "Not run yet" in empty and "aad cluster" in empty and "aad eval" in empty
    assert "Data attribution" not in empty  # no banking77 in an empty workspace

    populate(workspace, evaluation=False, extras=False)
    partial = render_report(workspace)
    assert "data:image/png;base64," in partial  # the cluster plot
    assert "aad eval" in partial and "selection_vs_random.py" in partial


def test_cli_report_prints_the_path(workspace: Workspace) -> None:
    from aad_core.cli import app

    populate(workspace)
    result = CliRunner().invoke(app, ["report", "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == workspace.report_path
    assert workspace.report_path.stat().st_size > 10_000


def test_cli_eval_without_clusters_says_what_to_run(workspace: Workspace) -> None:
    from aad_core.cli import app

    result = CliRunner().invoke(app, ["eval", "-w", str(workspace.root)])
    assert result.exit_code == 1
    assert "aad cluster" in result.output



def test_the_report_draws_the_cluster_map_the_cluster_stage_projected(workspace: Workspace) -> None:
    from aad_core.artifacts import ClusterMap, png_path
    from aad_core.report import render_report

    populate(workspace, evaluation=False, extras=False)
    assert 'alt="cluster map"' not in render_report(workspace)  # no projection: nothing to draw
    ClusterMap(points=[(0.0, 0.0), (1.0, 1.0), (2.0, 0.5)], cluster_ids=[0, 1, 2],
               centroids={0: (0.0, 0.0), 1: (1.0, 1.0), 2: (2.0, 0.5)}).save(workspace)
    assert 'alt="cluster map"' in render_report(workspace)
    assert png_path(workspace).read_bytes()[:4] == b"\x89PNG"  # where 'aad cluster' leaves it


def test_an_unreadable_artifact_is_named_with_the_command_that_rewrites_it(workspace: Workspace) -> None:
    from aad_core.report import render_report

    populate(workspace)
    workspace.state_path("eval.json").write_text("{broken", encoding="utf-8")
    text = render_report(workspace)
    _check_self_contained(text)
    assert "eval.json cannot be read" in text and "Run &#x27;aad eval&#x27; again" in text
    assert "<h2>Task clusters" in text and "Not run yet: evaluation of the specialists" in text
