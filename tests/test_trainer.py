"""The qlora trainer on a tiny random student: it learns, saves a plain PEFT adapter, resumes, and
refuses to call a run that got no gradients a success."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_trace
from tiny_models import tiny_student  # noqa: F401  (session fixture)

from aad_core.errors import AADError
from aad_plugins.qlora import QLoRATrainer, assert_adapter_grads


def _traces(n: int) -> list:
    answers = ["card_arrival", "exchange_rate", "transfer_fee"]
    return [make_trace(f"query number {i} about my card", answers[i % 3]) for i in range(n)]


def _trainer(student: Path, **kw) -> QLoRATrainer:
    params = dict(student=str(student), batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
                  max_length=48, quantization="none", precision="fp32", seed=0, device="cpu")
    params.update(kw)
    return QLoRATrainer(**params)


def test_adapter_trains_saves_and_reloads_with_plain_peft(tiny_student: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    metrics = _trainer(tiny_student, max_steps=12, early_stopping_patience=0).train(
        _traces(12), _traces(4), out, show_progress=False)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert metrics["steps"] == 12 and metrics["first_step_grad_norm"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert not (out / ".checkpoint").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_student)

    ids = torch.tensor([[1, 5, 9, 17, 33]])
    base = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student), out).eval()
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student), out).eval()
    with torch.no_grad():
        a, b = reloaded(ids).logits, again(ids).logits
    assert torch.allclose(a, b)
    assert not torch.allclose(a, base_logits, atol=1e-4)  # the adapter changed the model


class _FrozenTrainer(QLoRATrainer):
    def _prepare_model(self, base):
        model = super()._prepare_model(base)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # lora_B starts at zero: with it frozen, lora_A gets no gradient either
                p.requires_grad_(False)
        return model


def test_gradient_assertion_fires_on_a_frozen_adapter(tiny_student: Path, tmp_path: Path) -> None:
    trainer = _FrozenTrainer(student=str(tiny_student), batch_size=4, gradient_accumulation=1, max_length=48,
                             quantization="none", max_steps=2, device="cpu")
    with pytest.raises(AADError, match="no gradient"):
        trainer.train(_traces(8), [], tmp_path / "frozen", show_progress=False)
    assert not (tmp_path / "frozen" / "adapter_model.safetensors").exists()


def test_assert_adapter_grads_on_model_without_lora() -> None:
    import torch

    with pytest.raises(AADError):
        assert_adapter_grads(torch.nn.Linear(2, 2))


def test_resume_continues_from_checkpoint(tiny_student: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    first = _trainer(tiny_student, max_steps=2, eval_every=1, keep_checkpoint=True,
                     early_stopping_patience=0).train(_traces(8), _traces(4), out, show_progress=False)
    assert first["steps"] == 2 and (out / ".checkpoint" / "trainer_state.json").exists()
    second = _trainer(tiny_student, max_steps=4, eval_every=1, early_stopping_patience=0).train(
        _traces(8), _traces(4), out, show_progress=False)
    assert second["resumed_from_step"] == 2
    assert second["steps"] == 4
    assert [e["step"] for e in second["eval_history"]] == [1, 2, 3, 4]


def test_a_resumed_run_keeps_the_precision_its_checkpoint_was_trained_in(tiny_student: Path, tmp_path: Path) -> None:
    # "auto" resolves per machine: a checkpoint resumed on a CPU of another kind must not switch precision
    out = tmp_path / "resume-bf16"
    first = _trainer(tiny_student, max_steps=2, eval_every=1, keep_checkpoint=True, early_stopping_patience=0,
                     precision="bf16").train(_traces(8), _traces(4), out, show_progress=False)
    assert first["precision"] == "bf16-autocast"
    assert json.loads((out / ".checkpoint" / "trainer_state.json").read_text())["autocast_bf16"] is True
    second = _trainer(tiny_student, max_steps=4, eval_every=1, early_stopping_patience=0, precision="fp32").train(
        _traces(8), _traces(4), out, show_progress=False)
    assert second["resumed_from_step"] == 2 and second["precision"] == "bf16-autocast"
    # a checkpoint of another kind of device (here: said to be CUDA) gives no precision to keep
    other = tmp_path / "resume-elsewhere"
    _trainer(tiny_student, max_steps=2, eval_every=1, keep_checkpoint=True, early_stopping_patience=0,
             precision="bf16").train(_traces(8), _traces(4), other, show_progress=False)
    state_file = other / ".checkpoint" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "device": "cuda"}))
    third = _trainer(tiny_student, max_steps=4, eval_every=1, early_stopping_patience=0, precision="fp32").train(
        _traces(8), _traces(4), other, show_progress=False)
    assert third["resumed_from_step"] == 2 and third["precision"] == "fp32"
    fresh = _trainer(tiny_student, max_steps=1, precision="fp32").train(_traces(8), [], tmp_path / "fresh",
                                                                         show_progress=False)
    assert fresh["precision"] == "fp32"


def test_four_bit_on_cpu_is_refused(tiny_student: Path, tmp_path: Path) -> None:
    with pytest.raises(AADError, match="CUDA"):
        _trainer(tiny_student, quantization="4bit", max_steps=1).train(_traces(4), [], tmp_path / "x", show_progress=False)


def test_soft_targets_from_recorded_top_k(tiny_student: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from aad_core.schema import TokenLogprob, TopLogprob

    tok = AutoTokenizer.from_pretrained(tiny_student)
    traces = _traces(6)
    for t in traces:  # teacher tokens = the student's own tokens of the answer
        pieces = [tok.decode([i]) for i in tok(t.answer_text(), add_special_tokens=False)["input_ids"]]
        t.teacher_logprobs = [TokenLogprob(token=p, logprob=-0.1, top_logprobs=[TopLogprob(token=p, logprob=-0.1)])
                              for p in pieces]
    metrics = _trainer(tiny_student, max_steps=2, distill_alpha=0.5).train(traces, [], tmp_path / "soft", show_progress=False)
    assert metrics["soft_target_samples"] == 6
    assert metrics["steps"] == 2


def test_registry_versions_and_runtime_serves_adapters(tiny_student: Path, tmp_path: Path, workspace) -> None:
    from aad_core.models.runtime import Generation, SpecialistRuntime
    from aad_core.specialists import SpecialistRegistry
    from aad_core.schema import ChatRequest, Message

    trained = []
    metrics = _trainer(tiny_student, max_steps=10, early_stopping_patience=0).train(
        _traces(12), [], tmp_path / "a1", show_progress=False)
    seen = []

    class Observer:
        from aad_core import hookimpl

        @hookimpl
        def aad_specialist_trained(self, specialist):
            seen.append(specialist.name)

    from aad_core.plugins import get_plugin_manager

    get_plugin_manager().add_plugin(Observer(), name="observer")
    reg = SpecialistRegistry(workspace)
    s1 = reg.save(cluster_id=3, label="Card arrival!", adapter_dir=tmp_path / "a1", base_model=str(tiny_student),
                  centroid=[0.1, 0.2], selection=["t1"], hyperparameters={"lora_r": 16}, metrics=metrics, seed=7)
    _trainer(tiny_student, max_steps=1).train(_traces(4), [], tmp_path / "a2", show_progress=False)
    s2 = reg.save(cluster_id=3, label="Card arrival!", adapter_dir=tmp_path / "a2", base_model=str(tiny_student))
    assert (s1.name, s1.version, s2.version) == ("c3-card-arrival", 1, 2)
    assert seen == ["c3-card-arrival", "c3-card-arrival"]
    assert reg.latest(3).version == 2 and reg.latest(4) is None
    assert [s.version for s in reg.list()] == [1, 2]
    manifest = reg.manifest(reg.get("c3-card-arrival", 1))
    assert manifest["seed"] == 7 and manifest["selection"] == ["t1"] and manifest["versions"]["peft"]
    # a classifier's head and encoder come from these: stamped too
    assert all(manifest["versions"][lib] for lib in ("scikit-learn", "numpy", "sentence-transformers", "safetensors"))
    promoted = reg.set_promoted("c3-card-arrival", 1, True, "reached 97% of teacher")
    assert promoted.promoted and reg.manifest(promoted)["promotion_reason"] == "reached 97% of teacher"
    trained.append(s1)

    runtime = SpecialistRuntime(tiny_student, device="cpu")
    runtime.add_specialist(s1)
    runtime.add_specialist(s2)
    req = [ChatRequest(messages=[Message(role="user", content=f"query number {i} about my card")]) for i in range(3)]
    base = runtime.generate(req, adapter=None, max_new_tokens=6)
    spec = runtime.generate(req, adapter=s1.name, max_new_tokens=6)
    assert len(spec) == 3 and all(isinstance(g, Generation) for g in spec)
    assert all(g.n_tokens <= 6 and g.mean_logprob <= 0 for g in spec + base)
    # The adapter is active for its name and off for adapter=None.
    assert [g.mean_logprob for g in spec] != pytest.approx([g.mean_logprob for g in base], abs=1e-6)
    assert runtime.generate(req, adapter=None, max_new_tokens=6)[0].text == base[0].text
    with pytest.raises(AADError, match="No adapter"):
        runtime.generate(req, adapter="nope", max_new_tokens=2)
    runtime.merge(s1.name)  # one hot adapter folded into the base weights: same answers
    merged = runtime.generate(req, adapter=s1.name, max_new_tokens=6)
    assert [g.text for g in merged] == [g.text for g in spec]


def test_unknown_student_fails_with_hint(tmp_path: Path) -> None:
    from aad_core.models.students import load_student

    with pytest.raises(AADError) as err:
        load_student("no-such-org/no-such-model-xyz")
    assert "aad models list" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AADError, match="no config.json"):
        load_student(tmp_path / "empty")


def test_answer_window_loss_equals_the_full_sequence_loss(tiny_student: Path) -> None:
    """Training and scoring compute logits only from the first answer position on; the loss must
    be exactly what the full-width logits give."""
    import torch
    from transformers import AutoModelForCausalLM

    from aad_core.models.chat_format import answer_logits, answer_window_start, pad_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    rows = [{"input_ids": list(range(3, 15)), "labels": [-100] * 9 + [12, 13, 14], "attention_mask": [1] * 12},
            {"input_ids": list(range(5, 12)), "labels": [-100] * 4 + [9, 10, 11], "attention_mask": [1] * 7}]
    batch = pad_batch(rows, 0)
    s0 = answer_window_start(batch["labels"])
    assert s0 == 3  # row 2's first answer token is at position 4; its logits come from position 3
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        window, labels_win, start = answer_logits(model, batch)
    assert start == s0 and window.shape[1] == labels_win.shape[1] < full.shape[1]
    torch.testing.assert_close(window, full[:, s0:])
    labels_full = batch["labels"][:, 1:]
    loss_full = torch.nn.functional.cross_entropy(full[labels_full != -100], labels_full[labels_full != -100])
    loss_win = torch.nn.functional.cross_entropy(window[labels_win != -100], labels_win[labels_win != -100])
    torch.testing.assert_close(loss_win, loss_full)
    assert answer_window_start(torch.full((2, 5), -100)) == 0


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero() -> None:
    from aad_plugins.qlora import lr_multiplier

    const, lin, cos = (lr_multiplier(k, total_steps=10, warmup_steps=2) for k in ("constant", "linear", "cosine"))
    assert [const(s) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lin(1) == lin(2) == 1.0 and lin(6) == pytest.approx(0.5) and lin(9) == pytest.approx(0.125)
    assert cos(2) == 1.0 and cos(6) == pytest.approx(0.5) and 0 < cos(9) < 0.05
    assert all(cos(s) > cos(s + 1) > 0 for s in range(2, 9))  # every step, the last too, still learns
    short = lr_multiplier("cosine", total_steps=2, warmup_steps=1)  # a small cluster: 2 steps
    assert short(0) == 1.0 and short(1) == 1.0
    with pytest.raises(ValueError, match="lr_scheduler"):
        _trainer(Path("unused"), lr_scheduler="step").train(_traces(2), [], Path("unused"), show_progress=False)


def test_length_grouped_batches_pad_less_and_still_train(tiny_student: Path, tmp_path: Path) -> None:
    traces = [make_trace("q " * (1 + (i * 7) % 23), ["a", "b"][i % 2]) for i in range(32)]
    grouped = _trainer(tiny_student, max_steps=8, early_stopping_patience=0).train(traces, [], tmp_path / "g",
                                                                                   show_progress=False)
    plain = _trainer(tiny_student, max_steps=8, early_stopping_patience=0, group_by_length=False).train(
        traces, [], tmp_path / "p", show_progress=False)
    assert grouped["steps"] == plain["steps"] == 8 and grouped["first_step_grad_norm"] > 0
    assert grouped["padded_tokens"] < plain["padded_tokens"]


def test_decoding_restricted_to_a_closed_answer_set(tiny_student: Path) -> None:
    from aad_core.models.runtime import SpecialistRuntime
    from aad_core.schema import ChatRequest, Message

    runtime = SpecialistRuntime(tiny_student, device="cpu", warmup=False)
    reqs = [ChatRequest(messages=[Message(role="user", content=f"query number {i} about my card")]) for i in range(4)]
    labels = ["card_arrival", "exchange_rate", "transfer_fee"]
    free = runtime.generate(reqs, max_new_tokens=8)
    closed = runtime.generate(reqs, max_new_tokens=8, allowed_answers=labels)
    assert all(g.text in labels for g in closed)  # the random tiny model could never manage that on its own
    assert not all(g.text in labels for g in free)
    # The confidence is the model's own log-prob of its choice, not renormalised over the allowed tokens.
    assert all(g.mean_logprob < -0.5 for g in closed)


def test_a_tiny_task_with_defaults_trains_min_steps_within_its_samples(tiny_student: Path, tmp_path: Path,
                                                                      caplog) -> None:
    """9 selected samples at the defaults (16 x 1, min_steps 30): never one step, never a batch of 16."""
    import logging

    trainer = QLoRATrainer(student=str(tiny_student), max_length=48, quantization="none", device="cpu")
    assert (trainer.learning_rate, trainer.lr_scheduler, trainer.min_steps) == (1e-3, "cosine", 30)
    with caplog.at_level(logging.INFO, logger="aad_plugins.qlora"):
        metrics = trainer.train(_traces(9), _traces(3), tmp_path / "tiny", show_progress=False)
    plan = metrics["step_plan"]
    assert metrics["steps"] >= trainer.min_steps and plan["steps"] == 30
    assert metrics["effective_batch"] == plan["effective_batch"] <= 9 and plan["samples"] == 9
    assert plan["epochs"] == 30 and "min_steps 30" in plan["reason"] and "fit 9 samples" in plan["reason"]
    assert len(metrics["eval_history"]) <= 10  # one-step epochs do not mean an eval every step
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert "Step plan: 9 samples, effective batch 9 (9 x 1), 30 steps = 30 epochs" in caplog.text


def test_step_plan_follows_the_data() -> None:
    from aad_plugins.qlora.data import StepPlan

    def plan(n: int, batch: int = 16, accum: int = 1, **kw) -> StepPlan:
        return StepPlan.for_rows(n, batch_size=batch, accum=accum, epochs=kw.pop("epochs", 1.0),
                                 min_steps=kw.pop("min_steps", 30), max_steps=kw.pop("max_steps", None), eval_every=None)

    big = plan(1000)  # the configured batch, one epoch (more than min_steps already)
    assert (big.micro, big.accum, big.steps_per_epoch, big.total_steps, big.epochs, big.reason) == (16, 1, 63, 63, 1.0, "")
    paper = plan(1000, accum=4)
    assert (paper.micro, paper.accum, paper.total_steps) == (16, 4, 30) and "min_steps" in paper.reason
    mid = plan(37, accum=4)  # accumulation shrinks first: 16 x 2 = 32 <= 37
    assert (mid.micro, mid.accum, mid.steps_per_epoch, mid.total_steps, mid.epochs) == (16, 2, 2, 30, 15.0)
    small = plan(9, accum=4)  # then the micro-batch
    assert (small.micro, small.accum, small.effective_batch, small.total_steps) == (9, 1, 9, 30)
    assert plan(9, max_steps=5).total_steps == 5 and "max_steps 5" in plan(9, max_steps=5).reason  # max_steps caps
    assert plan(1000, max_steps=5).total_steps == 5
    assert plan(9, min_steps=1, epochs=2.0).total_steps == 2
    for n in (1, 2, 9, 15, 16, 17, 37, 63, 64, 65, 200):
        for batch, accum in ((16, 4), (16, 1), (8, 3), (1, 1)):
            p = plan(n, batch, accum)
            assert 1 <= p.effective_batch <= n and p.total_steps >= 30 and p.eval_every >= p.steps_per_epoch


def test_max_steps_caps_the_minimum(tiny_student: Path, tmp_path: Path) -> None:
    metrics = _trainer(tiny_student, max_steps=3, batch_size=16, gradient_accumulation=4).train(
        _traces(9), [], tmp_path / "capped", show_progress=False)
    assert metrics["steps"] == metrics["step_plan"]["steps"] == 3
    assert metrics["step_plan"]["effective_batch"] == 9 and metrics["step_plan"]["min_steps"] == 30


def test_min_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="min_steps"):
        _trainer(Path("unused"), min_steps=0).train(_traces(2), [], Path("unused"), show_progress=False)


def test_a_task_whose_calls_are_mostly_longer_than_max_length_does_not_fit_a_lora_adapter(tiny_student: Path) -> None:
    """Training would cut the prompts from the left (the system prompt and tools lost) while serving sees
    them whole: the kind declines the task and says which max_length would fit it."""
    long = [make_trace("a long request " + "about the weather in many cities " * 12, f"answer {i}") for i in range(9)]
    short = [make_trace("short", "yes")]
    fits, why = QLoRATrainer(student=str(tiny_student), max_length=48).applies_to(long + short)
    assert not fits
    assert "longer than max_length 48 tokens" in why and "raise [train] max_length" in why
    fits, why = QLoRATrainer(student=str(tiny_student), max_length=1024).applies_to(long + short)
    assert fits and "<= max_length 1024" in why


def test_training_leaves_out_the_few_calls_longer_than_max_length(tiny_student: Path, tmp_path: Path) -> None:
    """A call longer than max_length would be learnt cut, and its prompt is never served (the router
    sends it to the teacher): while most of the task fits, such calls are left out of training."""
    long = [make_trace("a long request " + "about the weather in many cities " * 12, f"answer {i}") for i in range(2)]
    metrics = _trainer(tiny_student, max_steps=1, max_length=64).train(
        _traces(6) + long, [], tmp_path / "fit", show_progress=False)
    assert metrics["n_train"] == 6 and metrics["n_too_long"] == 2
    # mostly too long: kept (cut), as before; applies_to declines such a task in the pipeline
    metrics = _trainer(tiny_student, max_steps=1, max_length=64).train(
        _traces(1) + long, [], tmp_path / "mostly", show_progress=False)
    assert metrics["n_train"] == 3 and metrics["n_too_long"] == 0


def test_bf16_autocast_trains_float32_weights_and_differs_from_fp32(tiny_student: Path, tmp_path: Path) -> None:
    """precision='bf16' computes the passes in bfloat16 (a different loss curve from 'fp32') while the
    saved adapter stays float32 and still learns."""
    from safetensors.torch import load_file

    runs = {}
    for precision in ("bf16", "fp32"):
        out = tmp_path / precision
        runs[precision] = _trainer(tiny_student, max_steps=8, early_stopping_patience=0, precision=precision).train(
            _traces(12), _traces(4), out, show_progress=False)
        weights = load_file(out / "adapter_model.safetensors")
        assert weights and {str(w.dtype) for w in weights.values()} == {"torch.float32"}
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert (bf16["precision"], fp32["precision"]) == ("bf16-autocast", "fp32")
    assert bf16["train_loss_last"] < bf16["train_loss_first"]
    assert bf16["train_loss_first"] != fp32["train_loss_first"]  # autocast really changed the arithmetic
    assert abs(bf16["train_loss_first"] - fp32["train_loss_first"]) < 0.05 * fp32["train_loss_first"]


def test_precision_auto_follows_the_cpu_and_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from aad_plugins.qlora import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: False)
    assert QLoRATrainer()._bf16("cpu", four_bit=False) is False
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)
    assert QLoRATrainer()._bf16("cpu", four_bit=False) is True
    assert QLoRATrainer()._bf16("cuda", four_bit=False) is False  # auto leaves CUDA's fp32 LoRA alone
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert QLoRATrainer(precision="bf16")._bf16("cuda", four_bit=False) is False  # no such GPU here: not applied
    assert QLoRATrainer(precision="bf16")._bf16("cuda", four_bit=True) is False  # 4-bit computes in bf16 already
    assert QLoRATrainer(precision="fp32")._bf16("cpu", four_bit=False) is False
    with pytest.raises(ValueError, match="precision"):
        _trainer(Path("unused"), precision="half").train(_traces(2), [], Path("unused"), show_progress=False)


def test_native_bf16_detection_survives_torch_builds_without_the_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from aad_plugins.qlora.trainer import cpu_has_native_bf16

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert cpu_has_native_bf16() is False

    def broken() -> bool:
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_has_native_bf16() is True
