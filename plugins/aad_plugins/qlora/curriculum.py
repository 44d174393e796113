"""Progressive distillation (``[trainer.qlora] curriculum = "easy-to-hard"``): the run's steps go
through phases of growing difficulty instead of shuffled epochs over every sample.

Difficulty is computed before training, without a model pass, from the tokenised calls: per
training row, the mean of its percentile ranks (0 = easiest, 1 = hardest; ties share a rank) in

* answer tokens (the answer as the chat template renders it, end-of-turn marker included),
* format items: JSON keys at any depth of a JSON answer, or one per tool call plus the keys of its
  arguments (0 for plain text),
* prompt tokens (the whole prompt, before any cut to ``max_length``).

The rows are sorted by it (ties in their training order) and the planned steps split evenly into
:data:`N_PHASES` phases: phase 1 draws its batches from the easiest third, phase 2 from the easiest
two thirds, phase 3 from every row. Inside a phase, the pool is gone through in epochs shuffled
with the run's seed (length-grouped as usual), so the total steps, the batch and the learning-rate
schedule are the same as without a curriculum.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aad_core.schema import Trace

#: The values of ``[trainer.qlora] curriculum``.
CURRICULA: tuple[str, ...] = ("none", "easy-to-hard")
#: Phases of an easy-to-hard run: the easiest 1/3, 2/3, then all rows.
N_PHASES = 3


def format_items(trace: Trace) -> int:
    """The answer's format complexity: one per tool call plus its arguments' JSON keys, or the keys of
    a JSON answer; 0 for plain text (or no answer)."""
    response = trace.response
    if response is None:
        return 0
    if response.tool_calls:
        total = 0
        for call in response.tool_calls:
            try:
                args: Any = call.function.parsed_arguments()
            except ValueError:  # arguments that are not JSON count as one opaque item
                args = None
            total += 1 + _json_keys(args)
        return total
    text = response.text().strip()
    if not text.startswith(("{", "[")):
        return 0
    try:
        return _json_keys(json.loads(text))
    except ValueError:
        return 0


def _json_keys(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_json_keys(v) for v in value.values())
    if isinstance(value, list):
        return sum(_json_keys(v) for v in value)
    return 0


def percentile_ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank among ``values`` scaled to [0, 1], ties sharing their mean rank (all 0.5
    when every value is the same)."""
    n = len(values)
    if n <= 1:
        return [0.5] * n
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 / (n - 1)
        start = end + 1
    return ranks


def difficulty(measures: Sequence[Sequence[float]]) -> list[float]:
    """Per training row, in [0, 1]: the mean percentile rank of its measures (answer tokens, format
    items, prompt tokens: :attr:`TrainingData.measures <aad_plugins.qlora.data.TrainingData.measures>`)."""
    if not measures:
        return []
    parts = [percentile_ranks(column) for column in zip(*measures)]
    return [sum(p[i] for p in parts) / len(parts) for i in range(len(measures))]


def steps_per_pass(n_rows: int, micro: int, accum: int) -> int:
    """Optimizer steps of one pass over ``n_rows`` (as :class:`~aad_plugins.qlora.data.StepPlan` counts them)."""
    return max(1, math.ceil(math.ceil(max(1, n_rows) / micro) / accum))


@dataclass(frozen=True)
class Curriculum:
    """The phases of an easy-to-hard run: each phase's rows (nested, easiest first) and first step."""

    pools: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]  # the first optimizer step of each phase; the last phase runs to the end
    total_steps: int
    difficulty: tuple[float, ...]

    @classmethod
    def easy_to_hard(cls, scores: Sequence[float], total_steps: int, n_phases: int = N_PHASES) -> Curriculum:
        n = len(scores)
        order = sorted(range(n), key=lambda i: (scores[i], i))
        pools = tuple(tuple(order[: max(1, math.ceil(n * (p + 1) / n_phases))]) for p in range(n_phases))
        starts = tuple(p * total_steps // n_phases for p in range(n_phases))
        return cls(pools, starts, total_steps, tuple(scores))

    def phase(self, step: int) -> int:
        """The phase of optimizer step ``step`` (0-based): the last one that has started (a phase of
        zero steps, in a run shorter than the phases, is skipped)."""
        return max(p for p, s in enumerate(self.starts) if s <= step)

    def phase_steps(self) -> list[int]:
        ends = [*self.starts[1:], self.total_steps]
        return [max(0, e - s) for s, e in zip(self.starts, ends)]

    def describe(self) -> str:
        """One line for the log: the phases' samples and steps."""
        return (f"{len(self.pools)} phases of " + " / ".join(str(len(p)) for p in self.pools) + " easiest samples over "
                + " / ".join(str(s) for s in self.phase_steps()) + " steps")

    def as_metrics(self) -> dict[str, Any]:
        return {"kind": "easy-to-hard", "phases": [
            {"samples": len(pool), "steps": steps, "first_step": start,
             "max_difficulty": round(max(self.difficulty[i] for i in pool), 4) if pool else None}
            for pool, steps, start in zip(self.pools, self.phase_steps(), self.starts)]}
