"""Trainer ``qlora``: one LoRA adapter per cluster, QLoRA (4-bit NF4) on CUDA, LoRA with float32
weights on CPU (its passes in bfloat16 autocast where the CPU has native bfloat16: ``precision``).

QLoRA paper defaults (r=16, alpha=32, dropout 0.05, all linear layers) with the rate, schedule and batch
measured for the 135M default student (lr 1e-3, cosine, 16 x 1); the steps and the effective batch
follow the task's samples (never a batch larger than the selection, at least ``min_steps``). The loss is
cross-entropy on the answer tokens; when the teacher's distributions are known (a local white-box
teacher, or recorded top-k log-probs that align with the student's tokens) it is
``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``.

Every run checks that the adapter received non-zero gradients after its first step: a 4-bit base
on CPU can silently train nothing (see FIELD-NOTES), and a run that learns nothing must not be
saved as a specialist.

Files: :mod:`.trainer` (parameters, ``train()``), :mod:`.data` (encoding, batches), :mod:`.loop`
(optimizer, loss, steps, evals), :mod:`.curriculum` (easy-to-hard phases), :mod:`.checkpoints`
(resume, best adapter, early stopping), :mod:`.answer_bank` (hints and the candidate vote weight),
:mod:`.console` (messages, progress bar).
"""

from __future__ import annotations

from typing import Any

from aad_core.plugins import hookimpl
from aad_plugins.qlora.loop import assert_adapter_grads, lr_multiplier
from aad_plugins.qlora.trainer import QLoRATrainer

__all__ = ["QLoRATrainer", "aad_register_trainers", "assert_adapter_grads", "lr_multiplier"]


@hookimpl
def aad_register_trainers(register: Any) -> None:
    register(
        "qlora",
        QLoRATrainer,
        description="LoRA r16/a32 per cluster; 4-bit NF4 QLoRA + paged AdamW 8-bit on CUDA, float32 "
        "LoRA on CPU (bf16 autocast passes where the CPU has native bf16); answer-only CE, + soft-target "
        "KL when teacher distributions exist",
    )
