"""The CUDA path of the qlora trainer: 4-bit NF4 base (double quantisation), paged AdamW 8-bit,
adapter gradients that flow, a loss that falls, and an adapter that plain peft reloads.

Skipped without a CUDA GPU and bitsandbytes (CI has neither); run on a GPU machine with
``pytest -m cuda``. See docs/specialists.md for the figures measured on an H100.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_trace
from tiny_models import tiny_student  # noqa: F401  (session fixture)

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _traces(n: int) -> list:
    answers = ["card_arrival", "exchange_rate", "transfer_fee"]
    return [make_trace(f"query number {i} about my card", answers[i % 3]) for i in range(n)]


def _params(student: Path, **kw) -> dict:
    params = dict(student=str(student), batch_size=4, gradient_accumulation=2, learning_rate=5e-3,
                  max_length=48, quantization="auto", seed=0, early_stopping_patience=0)
    params.update(kw)
    return params


def _trainer(student: Path, **kw):
    from aad_plugins.qlora import QLoRATrainer

    return QLoRATrainer(**_params(student, **kw))


def test_auto_quantization_on_cuda_trains_a_4bit_nf4_base(tiny_student: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    seen: dict[str, object] = {}

    from aad_plugins.qlora import QLoRATrainer

    class Spy(QLoRATrainer):
        def _prepare_model(self, base):
            model = super()._prepare_model(base)
            seen["linear4bit"] = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            return model

    out = tmp_path / "adapter"
    trainer = Spy(**_params(tiny_student, max_steps=16))
    metrics = trainer.train(_traces(16), _traces(4), out, show_progress=False)

    assert metrics["device"] == "cuda" and metrics["quantization"] == "4bit-nf4"
    layers = seen["linear4bit"]
    assert layers, "the base's linear layers were not replaced by bitsandbytes Linear4bit"
    qs = layers[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested  # nested = double quantisation of the absmax constants
    assert metrics["first_step_grad_norm"] > 0
    assert metrics["train_loss_last"] < 0.9 * metrics["train_loss_first"]
    assert (out / "adapter_model.safetensors").exists()

    # Plain peft reloads it onto the same 4-bit base and gives identical logits twice.
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 17, 33]], device="cuda")
    logits = []
    for _ in range(2):
        base = AutoModelForCausalLM.from_pretrained(tiny_student, quantization_config=bnb_config, device_map={"": "cuda"})
        model = PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            logits.append(model(ids).logits.float())
    torch.testing.assert_close(logits[0], logits[1])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_student, quantization_config=bnb_config,
                                                     device_map={"": "cuda"})(ids).logits.float()
    assert not torch.allclose(plain, logits[0], atol=1e-3)  # the adapter changed the model


def test_a_no_grad_forward_before_training_keeps_cuda_4bit_gradients(tiny_student: Path, tmp_path: Path) -> None:
    """On CPU a no-grad forward through 4-bit weights before training silently stops LoRA
    gradients (FIELD-NOTES). On CUDA it must not: generate first, then train."""
    pytest.importorskip("bitsandbytes")

    from aad_plugins.qlora import QLoRATrainer

    class GenerateFirst(QLoRATrainer):
        def _prepare_model(self, base):
            model = super()._prepare_model(base)
            with torch.no_grad():
                model.generate(input_ids=torch.tensor([[1, 5, 9]], device="cuda"), max_new_tokens=3, do_sample=False)
            return model

    metrics = GenerateFirst(**_params(tiny_student, max_steps=8)).train(
        _traces(8), [], tmp_path / "gen-first", show_progress=False)
    assert metrics["quantization"] == "4bit-nf4" and metrics["first_step_grad_norm"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]


def test_fp32_lora_on_cuda_when_quantization_is_none(tiny_student: Path, tmp_path: Path) -> None:
    metrics = _trainer(tiny_student, max_steps=4, quantization="none").train(
        _traces(8), [], tmp_path / "fp32", show_progress=False)
    assert metrics["device"] == "cuda" and metrics["quantization"] == "none"
    assert metrics["first_step_grad_norm"] > 0
