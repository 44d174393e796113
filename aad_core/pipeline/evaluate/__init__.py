"""Evaluation: evaluator choice, per-cluster held-out evaluation, the risk-coverage gate (and the
parity figures), learning curves."""

from __future__ import annotations

from aad_core.formats.answers import answer_string, teacher_quality
from aad_core.pipeline.evaluate.choose import choose_evaluator, evaluator_name_for
from aad_core.pipeline.evaluate.curves import sample_ratio, samples_to_reach
from aad_core.pipeline.evaluate.gate import CoverageGate, GateResult, coverage_gate, parity_gate
from aad_core.pipeline.evaluate.runner import EVAL_STATE, evaluate_cluster, run_evaluate

__all__ = [
    "EVAL_STATE", "CoverageGate", "GateResult", "answer_string", "coverage_gate", "choose_evaluator", "evaluate_cluster", "evaluator_name_for",
    "parity_gate", "run_evaluate", "sample_ratio", "samples_to_reach", "teacher_quality",
]
