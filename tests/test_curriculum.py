"""Progressive distillation (``[trainer.qlora] curriculum = "easy-to-hard"``): phases of growing
difficulty, the same total steps, seeded, and ``"none"`` exactly as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_trace
from tiny_models import tiny_student  # noqa: F401  (session fixture)

from aad_core.schema import FunctionCall, Message, ToolCall
from aad_plugins.qlora import QLoRATrainer
from aad_plugins.qlora.curriculum import Curriculum, difficulty, format_items, percentile_ranks
from aad_plugins.qlora.data import BatchSchedule, StepPlan, epoch_batches


def _trainer(student: Path, **kw: Any) -> QLoRATrainer:
    params: dict[str, Any] = dict(student=str(student), batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
                                  max_length=64, quantization="none", seed=0, device="cpu", early_stopping_patience=0)
    params.update(kw)
    return QLoRATrainer(**params)


def _graded_traces() -> list:
    """12 calls in three grades of difficulty, interleaved: short label, longer text, JSON with keys."""
    out = []
    for i in range(4):
        out.append(make_trace(f"easy {i}", "yes"))
        out.append(make_trace(f"a medium question number {i} about my card", "card arrival pending transfer"))
        out.append(make_trace(f"a hard question number {i} about the weather in Paris and my card",
                              json.dumps({"city": "Paris", "intent": {"name": "card_arrival", "urgent": True}})))
    return out


def test_format_items_counts_json_keys_and_tool_call_arguments() -> None:
    assert format_items(make_trace("q", "card_arrival")) == 0
    assert format_items(make_trace("q", '{"a": 1, "b": {"c": 2}}')) == 3
    assert format_items(make_trace("q", "{not json")) == 0
    call = make_trace("q", "x")
    call.response = Message(role="assistant", tool_calls=[
        ToolCall(function=FunctionCall(name="get_weather", arguments='{"city": "Paris", "unit": "C"}')),
        ToolCall(function=FunctionCall(name="now", arguments="")),
    ])
    assert format_items(call) == (1 + 2) + (1 + 0)


def test_difficulty_ranks_and_phases_nest_easiest_first() -> None:
    assert percentile_ranks([3, 1, 2, 2]) == [1.0, 0.0, 0.5, 0.5]
    assert percentile_ranks([5, 5, 5]) == [0.5, 0.5, 0.5]
    d = difficulty([(2, 0, 10), (8, 5, 30), (4, 1, 20)])  # (answer tokens, format items, prompt tokens)
    assert d[0] < d[2] < d[1] and d[0] == 0.0 and d[1] == 1.0
    cur = Curriculum.easy_to_hard([0.9, 0.1, 0.5, 0.3, 0.7, 0.2], total_steps=10)
    assert cur.pools == ((1, 5), (1, 5, 3, 2), (1, 5, 3, 2, 4, 0))
    assert cur.starts == (0, 3, 6) and cur.phase_steps() == [3, 3, 4]
    assert [cur.phase(s) for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert Curriculum.easy_to_hard([0.1, 0.2], total_steps=1).phase(0) == 2  # too short for phases: all rows


def test_measures_see_the_whole_prompt_when_it_is_cut(tiny_student: Path) -> None:
    from transformers import AutoTokenizer

    from aad_plugins.qlora.data import encode

    tok = AutoTokenizer.from_pretrained(tiny_student)
    system = "You are a helpful assistant. Classify the banking query into its intent. " * 3
    traces = [make_trace("card " * n, "card_arrival", system=system) for n in (2, 12, 6)]
    data = encode(tok, traces, [], max_length=32, max_eval_samples=0, measure=True)
    assert {len(e["input_ids"]) for e in data.train} == {32}  # every prompt cut to the same length
    prompts = [m[2] for m in data.measures]
    assert prompts[0] < prompts[2] < prompts[1] and len({m[0] for m in data.measures}) == 1
    d = difficulty(data.measures)
    assert d[0] < d[2] < d[1]
    assert encode(tok, traces, [], max_length=32, max_eval_samples=0).measures == ()  # only when asked


def test_batch_schedule_follows_the_phases_and_keeps_none_unchanged() -> None:
    lengths = [10 + (7 * i) % 13 for i in range(30)]
    plan = StepPlan.for_rows(30, batch_size=4, accum=2, epochs=1.0, min_steps=12, max_steps=None, eval_every=None)
    scores = [((11 * i) % 30) / 30 for i in range(30)]
    cur = Curriculum.easy_to_hard(scores, plan.total_steps)
    sched = BatchSchedule(lengths, plan, 3, group_by_length=True, curriculum=cur)
    steps = [sched.micro_batches(s) for s in range(plan.total_steps)]
    assert all(len(step) <= plan.accum and all(len(mb) <= plan.micro for mb in step) for step in steps)
    for s, step in enumerate(steps):
        pool = set(cur.pools[cur.phase(s)])
        assert {i for mb in step for i in mb} <= pool
    easiest = {i for s in range(cur.starts[1]) for mb in steps[s] for i in mb}
    assert easiest == set(cur.pools[0])  # the first phase goes through its pool, and holds nothing else
    assert max(scores[i] for i in easiest) < min(scores[i] for i in range(30) if i not in easiest)
    again = BatchSchedule(lengths, plan, 3, group_by_length=True, curriculum=cur)
    assert [again.micro_batches(s) for s in range(plan.total_steps)] == steps  # seeded
    other = BatchSchedule(lengths, plan, 4, group_by_length=True, curriculum=cur)
    assert [other.micro_batches(s) for s in range(plan.total_steps)] != steps
    # No curriculum: the shuffled epochs exactly as before.
    plain = BatchSchedule(lengths, plan, 3, group_by_length=True)
    for s in range(plan.total_steps):
        epoch, within = divmod(s, plan.steps_per_epoch)
        expected = epoch_batches(lengths, plan.micro, 3, epoch, group_by_length=True)[within * 2 : (within + 1) * 2]
        assert plain.micro_batches(s) == expected


def _recorded_run(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                  **kw: Any) -> tuple[dict[str, Any], list[list[str]]]:
    """Train on the graded traces; return the metrics and each micro-batch's answers, in order."""
    import aad_core.models.chat_format as chat_format
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    real = chat_format.pad_batch
    seen: list[list[str]] = []

    def spy(features: list[dict[str, list[int]]], pad_id: int, **kwargs: Any) -> Any:
        seen.append([tok.decode([t for t, lab in zip(f["input_ids"], f["labels"]) if lab != -100]) for f in features])
        return real(features, pad_id, **kwargs)

    monkeypatch.setattr(chat_format, "pad_batch", spy)
    metrics = _trainer(student, **kw).train(_graded_traces(), [], tmp_path / name, show_progress=False)
    monkeypatch.setattr(chat_format, "pad_batch", real)
    return metrics, seen


def test_easy_to_hard_training_starts_with_the_easiest_samples(tiny_student: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, seen = _recorded_run(tiny_student, tmp_path, monkeypatch, "cur", max_steps=9, curriculum="easy-to-hard")
    assert metrics["steps"] == metrics["step_plan"]["steps"] == 9 and len(seen) == 9
    phases = metrics["curriculum"]["phases"]
    assert [p["samples"] for p in phases] == [4, 8, 12] and [p["steps"] for p in phases] == [3, 3, 3]
    assert all("yes" in a for mb in seen[:3] for a in mb)  # phase 1: the short labels only
    assert not any("{" in a for mb in seen[3:6] for a in mb)  # phase 2: no JSON answer yet
    assert any("{" in a for mb in seen[6:] for a in mb)
    again, seen_again = _recorded_run(tiny_student, tmp_path, monkeypatch, "cur2", max_steps=9,
                                      curriculum="easy-to-hard")
    assert seen_again == seen and again["train_loss_last"] == metrics["train_loss_last"]  # deterministic

    plain, seen_plain = _recorded_run(tiny_student, tmp_path, monkeypatch, "plain", max_steps=9)
    assert plain["curriculum"] == {"kind": "none"} and plain["steps"] == 9
    assert any("{" in a for mb in seen_plain[:3] for a in mb)  # shuffled: a hard sample early


def test_bad_curriculum_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        _trainer(Path("unused"), curriculum="hard-first").train([make_trace("q", "a")], [], Path("unused"),
                                                                show_progress=False)
    assert str(err.value) == ("The 'curriculum' parameter of QLoRATrainer must be one of 'none', 'easy-to-hard'. "
                              "Got 'hard-first' instead.")


def test_curriculum_reaches_the_trainer_from_its_aad_toml_table(tmp_path: Path) -> None:
    from aad_core.config import load_config
    from aad_core.errors import ConfigError
    from aad_core.plugins.params import build_component, configurable

    params = {p.name: p for p in configurable("trainer", QLoRATrainer)}
    assert params["curriculum"].default == "none" and "easy-to-hard" in params["curriculum"].help
    path = tmp_path / "aad.toml"
    path.write_text("[trainer.qlora]\ncurriculum = 'easy-to-hard'\n", encoding="utf-8")
    assert build_component("trainer", "qlora", load_config(path)).curriculum == "easy-to-hard"
    path.write_text("[trainer.qlora]\ncurriculum = 'hard-first'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'curriculum' parameter of the trainer 'qlora'"):
        build_component("trainer", "qlora", load_config(path))
