"""The training data as the loop sees it: token ids with answer-only labels, the teacher's top-k
soft targets where they align with the student's tokens, and how rows form micro-batches and steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aad_core.schema import Trace

Encoded = dict[str, list[int]]  # input_ids, labels (-100 outside the answer), attention_mask


@dataclass(frozen=True)
class TrainingData:
    train: list[Encoded]
    soft: list[Any]  # per training row: a top-k teacher signal, or None
    eval: list[Encoded]

    @property
    def soft_targets(self) -> int:
        return sum(1 for s in self.soft if s is not None)


def encode(tokenizer: Any, train: Sequence[Trace], eval: Sequence[Trace], *, max_length: int,
           max_eval_samples: int) -> TrainingData:
    from aad_core.models.chat_format import encode_trace
    from aad_core.models.teacher_signal import from_logprobs

    train_enc = [encode_trace(tokenizer, t, max_length) for t in train]
    soft = []
    for t, e in zip(train, train_enc):
        answer_ids = [i for i, lab in zip(e["input_ids"], e["labels"]) if lab != -100]
        sig = from_logprobs(tokenizer, answer_ids, t.teacher_logprobs) if t.teacher_logprobs else None
        soft.append(sig if sig is not None and sig.kind == "top-k" else None)
    eval_enc = [encode_trace(tokenizer, t, max_length) for t in list(eval)[:max_eval_samples]]
    return TrainingData(train_enc, soft, eval_enc)


@dataclass(frozen=True)
class StepPlan:
    """Micro-batch size, accumulation, and optimizer steps per epoch / in all / between evals."""

    micro: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int

    @classmethod
    def for_rows(cls, n_rows: int, *, batch_size: int, accum: int, epochs: float, max_steps: int | None,
                 eval_every: int | None) -> StepPlan:
        micro = min(batch_size, n_rows)
        steps_per_epoch = max(1, math.ceil(math.ceil(n_rows / micro) / accum))
        total_steps = max_steps or max(1, math.ceil(steps_per_epoch * epochs))
        return cls(micro, accum, steps_per_epoch, total_steps, eval_every or steps_per_epoch)


def epoch_batches(lengths: Sequence[int], micro: int, seed: int, epoch: int, *, group_by_length: bool) -> list[list[int]]:
    """The micro-batches (row indices) of one epoch, shuffled with ``seed + epoch``."""
    import numpy as np

    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return [order[i : i + micro] for i in range(0, len(order), micro)]
    # As transformers' group_by_length: sort shuffled mega-batches by length so that a
    # micro-batch pads little, then shuffle the micro-batches.
    mega = micro * 50
    order = [i for m in range(0, len(order), mega) for i in sorted(order[m : m + mega], key=lambda j: -lengths[j])]
    batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    return [batches[k] for k in rng.permutation(len(batches))]
