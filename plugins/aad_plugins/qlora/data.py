"""The training data as the loop sees it: token ids with answer-only labels, the teacher's top-k
soft targets where they align with the student's tokens, and how rows form micro-batches and steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aad_core.schema import Trace
    from aad_plugins.qlora.curriculum import Curriculum

Encoded = dict[str, list[int]]  # input_ids, labels (-100 outside the answer), attention_mask


@dataclass(frozen=True)
class TrainingData:
    train: list[Encoded]
    soft: list[Any]  # per training row: a top-k teacher signal, or None
    eval: list[Encoded]
    too_long: int = 0  # training traces left out: longer than max_length (see encode)
    #: Per training row, before any cut (``encode(measure=True)``, for the curriculum): answer tokens,
    #: the answer's format items (JSON keys / tool calls and arguments), prompt tokens.
    measures: tuple[tuple[int, int, int], ...] = ()

    @property
    def soft_targets(self) -> int:
        return sum(1 for s in self.soft if s is not None)


def encode(tokenizer: Any, train: Sequence[Trace], eval: Sequence[Trace], *, max_length: int,
           max_eval_samples: int, measure: bool = False) -> TrainingData:
    from aad_core.models.chat_format import encode_trace
    from aad_core.models.teacher_signal import from_logprobs

    # A call longer than max_length would be learnt cut (the prompt from the left, or the answer from the
    # right), and a prompt that long is never served: the router sends it to the teacher. Such calls are
    # left out while at least half the task remains (applies_to declines a task that is mostly longer).
    whole = [_fits(tokenizer, t, max_length) for t in train]
    too_long = 0
    if sum(whole) >= len(train) / 2:
        too_long = len(train) - sum(whole)
        train = [t for t, ok in zip(train, whole) if ok]
    train_enc = [encode_trace(tokenizer, t, max_length) for t in train]
    soft = []
    for t, e in zip(train, train_enc):
        answer_ids = [i for i, lab in zip(e["input_ids"], e["labels"]) if lab != -100]
        sig = from_logprobs(tokenizer, answer_ids, t.teacher_logprobs) if t.teacher_logprobs else None
        soft.append(sig if sig is not None and sig.kind == "top-k" else None)
    eval_enc = [encode_trace(tokenizer, t, max_length) for t in list(eval)[:max_eval_samples]]
    measures = tuple(_measures(tokenizer, t) for t in train) if measure else ()
    return TrainingData(train_enc, soft, eval_enc, too_long, measures)


def _measures(tokenizer: Any, trace: Trace) -> tuple[int, int, int]:
    """Answer tokens, format items and prompt tokens of ``trace``, uncut (a prompt cut to ``max_length``
    from the left would make every long prompt look alike)."""
    from aad_core.models.chat_format import answer_text, prompt_text
    from aad_plugins.qlora.curriculum import format_items

    if trace.response is None:
        return 0, 0, 0
    n_prompt = len(tokenizer(prompt_text(tokenizer, trace.request), add_special_tokens=False)["input_ids"])
    answer = answer_text(tokenizer, trace.request, trace.response)
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"]), format_items(trace), n_prompt


def _fits(tokenizer: Any, trace: Trace, max_length: int) -> bool:
    from aad_core.models.chat_format import answer_text, prompt_text

    if trace.response is None:
        return True  # encode_trace says why it cannot be used
    text = prompt_text(tokenizer, trace.request) + answer_text(tokenizer, trace.request, trace.response)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_length


#: With ``eval_every = None`` a run evaluates once per epoch, but at most this many times (a small
#: task's ``min_steps`` can take dozens of one-step epochs).
MAX_DEFAULT_EVALS = 10


@dataclass(frozen=True)
class StepPlan:
    """How a task's selected samples become optimizer steps: the micro-batch and accumulation (their
    product, the effective batch, never exceeds the samples), and the steps per epoch, in all, and
    between held-out evaluations."""

    samples: int
    micro: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    min_steps: int
    reason: str  # why the plan differs from the configured batch and epochs ("" when it does not)

    @property
    def effective_batch(self) -> int:
        return self.micro * self.accum

    @property
    def epochs(self) -> float:
        """Passes over the samples that the planned steps make."""
        return round(self.total_steps / self.steps_per_epoch, 2)

    @classmethod
    def for_rows(cls, n_rows: int, *, batch_size: int, accum: int, epochs: float, min_steps: int = 1,
                 max_steps: int | None, eval_every: int | None) -> StepPlan:
        n = max(1, n_rows)
        why = []
        # The effective batch fits the samples: fewer micro-batches per step first, then smaller ones.
        fit_accum = max(1, min(accum, n // batch_size))
        micro = min(batch_size, n)
        if (micro, fit_accum) != (batch_size, accum):
            why.append(f"effective batch {micro} x {fit_accum} instead of {batch_size} x {accum} to fit {n} samples")
        steps_per_epoch = max(1, math.ceil(math.ceil(n / micro) / fit_accum))
        if max_steps:
            total_steps = max_steps
            why.append(f"max_steps {max_steps}")
        else:
            total_steps = max(1, math.ceil(steps_per_epoch * epochs))
            if total_steps < min_steps:
                why.append(f"{min_steps / steps_per_epoch:g} epochs instead of {epochs:g} to reach min_steps {min_steps}")
                total_steps = min_steps
        if eval_every is None:
            eval_every = max(steps_per_epoch, math.ceil(total_steps / MAX_DEFAULT_EVALS))
        return cls(n_rows, micro, fit_accum, steps_per_epoch, total_steps, eval_every, min_steps, "; ".join(why))

    def describe(self) -> str:
        """One line for the log: samples, effective batch, steps, epochs, and why they differ from the config."""
        line = (f"{self.samples} samples, effective batch {self.effective_batch} ({self.micro} x {self.accum}), "
                f"{self.total_steps} steps = {self.epochs:g} epochs")
        return f"{line} ({self.reason})" if self.reason else line

    def as_metrics(self) -> dict[str, Any]:
        return {"samples": self.samples, "micro_batch": self.micro, "gradient_accumulation": self.accum,
                "effective_batch": self.effective_batch, "steps_per_epoch": self.steps_per_epoch,
                "steps": self.total_steps, "epochs": self.epochs, "eval_every": self.eval_every,
                "min_steps": self.min_steps, "reason": self.reason}


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


class BatchSchedule:
    """The micro-batches (row indices) of every optimizer step: shuffled epochs over all rows, or,
    with a :class:`~aad_plugins.qlora.curriculum.Curriculum`, epochs over each phase's pool (its own
    seed per phase). Deterministic in ``seed``; each epoch is computed once, when first asked for."""

    def __init__(self, lengths: Sequence[int], plan: StepPlan, seed: int, *, group_by_length: bool,
                 curriculum: Curriculum | None = None) -> None:
        self.lengths = list(lengths)
        self.plan = plan
        self.seed = seed
        self.group_by_length = group_by_length
        self.curriculum = curriculum
        self._cached: tuple[tuple[int, int], list[list[int]]] | None = None

    def micro_batches(self, step: int) -> list[list[int]]:
        """The ``accum`` micro-batches of optimizer step ``step`` (0-based)."""
        accum = self.plan.accum
        if self.curriculum is None:
            phase, local, per_epoch = -1, step, self.plan.steps_per_epoch
        else:
            from aad_plugins.qlora.curriculum import steps_per_pass

            phase = self.curriculum.phase(step)
            local = step - self.curriculum.starts[phase]
            per_epoch = steps_per_pass(len(self.curriculum.pools[phase]), self.plan.micro, accum)
        epoch, within = divmod(local, per_epoch)
        return self._epoch(phase, epoch)[within * accum : (within + 1) * accum]

    def _epoch(self, phase: int, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != (phase, epoch):
            if phase < 0 or self.curriculum is None:  # no curriculum: exactly the shuffled epochs of before
                batches = epoch_batches(self.lengths, self.plan.micro, self.seed, epoch,
                                        group_by_length=self.group_by_length)
            else:
                pool = self.curriculum.pools[phase]
                local = epoch_batches([self.lengths[i] for i in pool], self.plan.micro,
                                      self.seed + 1000 * (phase + 1), epoch, group_by_length=self.group_by_length)
                batches = [[pool[i] for i in mb] for mb in local]
            self._cached = ((phase, epoch), batches)
        return self._cached[1]
