"""``aad augment TASK``: teacher-generated training data for a task.

For a seeded sample of the task's *training* calls (never a held-out one): the teacher writes
paraphrases of the last user message (:mod:`~aad_core.pipeline.augment.paraphrase`), then answers each
paraphrase in the call's own context (system prompt, tools, earlier turns; shaped by the saved prompt
search's best variant, when there is one). A paraphrase is kept when that answer agrees, by the task's
evaluator, with the call's recorded answer (``check="recorded"``) or with a second teacher answer to
the same paraphrase (``check="second-sample"``). Kept ones are stored as traces with source
``augmented`` and ``metadata["aad_augmented"]["original_id"]`` naming the call, redacted as
``aad ingest`` redacts. Their ids come from the call and the paraphrase, so a rerun stores nothing twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aad_core.artifacts import PromptSearch, PromptVariant
from aad_core.errors import AADError
from aad_core.formats.answers import answer_string
from aad_core.pipeline.augment.paraphrase import paraphrasable, paraphrase_request, parse_paraphrases, with_last_user
from aad_core.pipeline.augment.prompts import RECORDED, apply_variant, shots_for
from aad_core.pipeline.augment.task import Agreement, TaskCalls, load_task
from aad_core.pipeline.augment.teacher import Teacher, failure_text, resolve_teacher, with_model
from aad_core.schema import AUGMENT_METADATA_KEY, AUGMENTED_SOURCE, Trace

if TYPE_CHECKING:
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

Check = Literal["recorded", "second-sample"]
CHECKS: tuple[str, ...] = ("recorded", "second-sample")
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-7d0b-4c55-9a3e-0a4ad0000a06")


@dataclass
class AugmentResult:
    """The counts of one ``aad augment`` run, and the ids of the traces it stored."""

    cluster_id: int
    task: str
    evaluator: str
    check: str
    prompt: str
    prompt_source: str
    sampled: int = 0
    #: Sampled calls not paraphrased, by reason (e.g. a multi-line user message).
    skipped: dict[str, int] = field(default_factory=dict)
    #: Paraphrases asked for (sampled calls paraphrased x paraphrases each).
    asked: int = 0
    paraphrase_calls_failed: int = 0
    #: Paraphrases read from the teacher's answers (after dropping duplicates and repeats of the original).
    paraphrases: int = 0
    dropped: int = 0
    answered: int = 0
    failed: int = 0
    agreed: int = 0
    stored: int = 0
    already_stored: int = 0
    #: Ids of the augmented traces kept (stored now or by an earlier run).
    ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def augmented_id(original_id: str, paraphrase: str) -> str:
    """The id of the trace of ``paraphrase`` of the call ``original_id`` (the same on every run)."""
    return str(uuid.uuid5(_ID_NAMESPACE, json.dumps([original_id, paraphrase], ensure_ascii=False)))


def saved_prompt(ws: Workspace, calls: TaskCalls) -> tuple[PromptVariant, list[Trace], str] | None:
    """(variant, its examples, how it is described) of the task's saved prompt search; None without one.
    Examples are taken from the task's current training calls only (one no longer there is left out)."""
    state = PromptSearch.load_optional(ws)
    choice = state.tasks.get(calls.cluster.id) if state else None
    if choice is None:
        return None
    by_id = {t.id: t for t in calls.train}
    shots = [by_id[i] for i in choice.best.shot_ids if i in by_id]
    if len(shots) < len(choice.best.shot_ids):
        log.warning("prompt search of task %s: %d of its %d examples are no longer training calls; left out",
                    calls.cluster.id, len(choice.best.shot_ids) - len(shots), len(choice.best.shot_ids))
    score = next((s.get("agreement") for s in choice.scores if s.get("name") == choice.best.name), None)
    scored = f"{100 * score:.0f} % agreement, " if isinstance(score, (int, float)) else ""
    return choice.best, shots, f"saved prompt search ({scored}{choice.searched_at[:19]})"


def run_augment(ws: Workspace, task: str | int, *, teacher: Any = None, n: int = 50, paraphrases: int = 3,
                check: Check = "recorded", seed: int | None = None, use_saved_prompt: bool = True) -> AugmentResult:
    """Paraphrase ``n`` training calls of ``task`` (seeded), keep the agreeing answers, store them (see the
    module). ``teacher``: a function of a request, a Tier or None (``[teacher]``)."""
    if check not in CHECKS:
        raise ValueError(f"The 'check' parameter must be one of {', '.join(CHECKS)}. Got {check!r} instead.")
    if n < 1 or paraphrases < 1:
        raise ValueError(f"n and paraphrases must be >= 1. Got n={n!r}, paraphrases={paraphrases!r} instead.")
    seed = ws.config.seed if seed is None else seed
    calls = load_task(ws, task)
    asker = resolve_teacher(ws.config, teacher)
    agreement = Agreement(ws, calls)
    saved = saved_prompt(ws, calls) if use_saved_prompt else None
    variant, shots, source = saved or (RECORDED, [], "the recorded request")
    result = AugmentResult(cluster_id=calls.cluster.id, task=calls.cluster.task or calls.cluster.label,
                           evaluator=agreement.name, check=check, prompt=variant.name, prompt_source=source)

    sample = calls.sample(n, seed)
    result.sampled = len(sample)
    skipped: Counter[str] = Counter()
    originals = []
    for t in sample:
        why = paraphrasable(t.request)
        if why:
            skipped[why] += 1
        else:
            originals.append(t)
    result.skipped = dict(skipped)
    result.asked = len(originals) * paraphrases
    pairs = _paraphrases(asker, originals, paraphrases, result)
    kept = _agreeing(asker, agreement, pairs, variant, shots, check, result)
    traces = [_trace(t, text, reply, calls, variant.name, check, asker.name, agreement.name) for t, text, reply in kept]
    _store(ws, traces, result)
    return result


def _paraphrases(asker: Teacher, originals: Sequence[Trace], k: int, result: AugmentResult) -> list[tuple[Trace, str]]:
    """(call, paraphrase) pairs read from the teacher's paraphrase answers."""
    replies = asker.ask_all([paraphrase_request(t.request.last_user_message().strip(), k, model=t.model)
                             for t in originals])
    failures = [r for r in replies if isinstance(r, Exception)]
    if failures and len(failures) == len(replies):
        raise AADError(f"Every paraphrase request to the teacher failed ({len(replies)} of {len(replies)}); the "
                       f"first: {failure_text(failures[0])}",
                       hint="Check [teacher] (base_url, model, API key) and that the teacher runs.")
    result.paraphrase_calls_failed = len(failures)
    pairs: list[tuple[Trace, str]] = []
    for t, reply in zip(originals, replies):
        if isinstance(reply, Exception):
            continue
        texts, dropped = parse_paraphrases(reply.message.text(), t.request.last_user_message(), k)
        result.dropped += dropped
        pairs += [(t, text) for text in texts]
    result.paraphrases = len(pairs)
    return pairs


def _agreeing(asker: Teacher, agreement: Agreement, pairs: Sequence[tuple[Trace, str]], variant: PromptVariant,
              shots: Sequence[Trace], check: str, result: AugmentResult) -> list[tuple[Trace, str, Any]]:
    """The pairs whose teacher answer agrees with the reference, with that answer."""
    requests = [with_model(apply_variant(with_last_user(t.request, text), variant, shots_for(variant, shots, t.id)),
                           t.model) for t, text in pairs]
    replies = asker.ask_all(requests * 2 if check == "second-sample" else requests)
    first, second = replies[:len(pairs)], replies[len(pairs):]
    done, predictions, references = [], [], []
    for i, ((t, text), reply) in enumerate(zip(pairs, first)):
        other = second[i] if second else None
        if isinstance(reply, Exception) or isinstance(other, Exception):
            result.failed += 1
            continue
        done.append((t, text, reply))
        predictions.append(answer_string(Trace(request=t.request, response=reply.message)))
        references.append(answer_string(t) if other is None else
                          answer_string(Trace(request=t.request, response=other.message)))
    result.answered = len(done)
    kept = [item for item, ok in zip(done, agreement.agree(predictions, references)) if ok]
    result.agreed = len(kept)
    return kept


def _trace(original: Trace, text: str, reply: Any, calls: TaskCalls, prompt: str, check: str, teacher: str,
           evaluator: str) -> Trace:
    """The augmented trace: the call's own request with the paraphrase, and the teacher's answer."""
    link = {"original_id": original.id, "cluster_id": calls.cluster.id, "check": check, "prompt": prompt,
            "teacher": teacher, "evaluator": evaluator}
    return Trace(id=augmented_id(original.id, text), source=AUGMENTED_SOURCE, task=original.task,
                 model=reply.model or original.model, request=with_last_user(original.request, text),
                 response=reply.message, usage=reply.usage, tags=[AUGMENTED_SOURCE],
                 metadata={AUGMENT_METADATA_KEY: link})


def _store(ws: Workspace, traces: list[Trace], result: AugmentResult) -> None:
    """Redact (as ``aad ingest`` does, ``[capture] redact``) and store ``traces``."""
    if not traces:
        return
    if ws.config.capture.redact:
        from aad_core.capture.redaction import redact_traces

        traces = redact_traces(traces, ws.config, ws)
    with ws.store() as store:
        result.stored = store.add(traces)
    result.already_stored = len(traces) - result.stored
    result.ids = [t.id for t in traces]
