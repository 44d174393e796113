"""Prompt variants for the teacher: the recorded request as is, with an instruction to answer in the
recorded format, with few-shot examples drawn from the task's training calls, or both.

A variant only shapes the request the teacher is asked; the traces ``aad augment`` stores keep the
agent's own request (the specialist is trained on what the agent sends).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from aad_core.artifacts import PromptVariant
from aad_core.formats.answers import answer_string
from aad_core.schema import ChatRequest, Message, Trace

#: Appended to the system prompt by the ``format`` variants (``{examples}``: recorded answers of the task).
FORMAT_INSTRUCTION = (
    "Answer in exactly the format of the recorded answers to these requests: the answer only, with no "
    "explanation, preamble or extra words, and the same spelling, casing and punctuation.{examples}"
)
#: At most this many recorded answers quoted as format examples, each at most this long.
_FORMAT_EXAMPLES, _FORMAT_EXAMPLE_CHARS = 3, 300
RECORDED = PromptVariant(name="recorded")


def format_instruction(examples: Sequence[str]) -> str:
    """:data:`FORMAT_INSTRUCTION` with up to three short distinct recorded answers quoted."""
    picked: list[str] = []
    for text in examples:
        text = text.strip()
        if text and len(text) <= _FORMAT_EXAMPLE_CHARS and "\n" not in text and text not in picked:
            picked.append(text)
        if len(picked) == _FORMAT_EXAMPLES:
            break
    quoted = f" Examples of recorded answers: {' | '.join(picked)}" if picked else ""
    return FORMAT_INSTRUCTION.format(examples=quoted)


def pick_shots(candidates: Sequence[Trace], k: int, seed: int) -> list[Trace]:
    """``k`` training calls as few-shot examples: seeded, distinct answers first (a label task then shows
    k different labels rather than the most frequent one k times)."""
    pool = sorted(candidates, key=lambda t: t.id)
    random.Random(seed).shuffle(pool)
    picked: list[Trace] = []
    seen: set[str] = set()
    for t in pool:  # one of each answer first
        if len(picked) < k and answer_string(t) not in seen:
            picked.append(t)
            seen.add(answer_string(t))
    ids = {t.id for t in picked}
    picked += [t for t in pool if t.id not in ids][: k - len(picked)]
    return picked


def variants(answers: Sequence[str], shots: Sequence[Trace]) -> list[PromptVariant]:
    """The variants tried, simplest first (a tie goes to the earlier one): ``recorded``, ``format``, and
    with ``shots``: ``few-shot-K`` and ``format+few-shot-K``."""
    instruction = format_instruction(answers)
    out = [RECORDED, PromptVariant(name="format", instruction=instruction)]
    if shots:
        ids = [t.id for t in shots]
        out += [PromptVariant(name=f"few-shot-{len(ids)}", shot_ids=ids),
                PromptVariant(name=f"format+few-shot-{len(ids)}", instruction=instruction, shot_ids=ids)]
    return out


def apply_variant(request: ChatRequest, variant: PromptVariant, shots: Sequence[Trace]) -> ChatRequest:
    """The request the teacher is asked: ``variant``'s instruction appended to the system prompt (a system
    message is added when there is none) and ``shots`` (the variant's examples, fetched; any that is the
    request's own call must be left out by the caller) as user/assistant turns after it."""
    messages = list(request.messages)
    n_head = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
    if variant.instruction:
        if n_head:
            head = messages[n_head - 1]
            messages[n_head - 1] = head.model_copy(update={"content": f"{head.text()}\n\n{variant.instruction}"})
        else:
            messages.insert(0, Message(role="system", content=variant.instruction))
            n_head = 1
    turns: list[Message] = []
    for shot in shots:
        turns += [Message(role="user", content=shot.request.last_user_message()),
                  Message(role="assistant", content=answer_string(shot))]
    messages[n_head:n_head] = turns
    return request.model_copy(update={"messages": messages})


def shots_for(variant: PromptVariant, shots: Sequence[Trace], own_id: str) -> list[Trace]:
    """The examples of ``variant`` among ``shots``, in its order, without the call ``own_id`` itself (its
    own answer must not be shown to the teacher)."""
    by_id = {t.id: t for t in shots}
    return [by_id[i] for i in variant.shot_ids if i in by_id and i != own_id]
