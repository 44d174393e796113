"""``aad prompt-search TASK``: ask the teacher a sample of the task's training requests under each prompt
variant (:mod:`aad_core.pipeline.augment.prompts`), score each by the share of its answers that agree
with the recorded ones, and save the best to ``prompt_search.json`` (``aad augment`` then uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import PromptChoice, PromptSearch
from aad_core.errors import AADError
from aad_core.formats.answers import answer_string
from aad_core.pipeline.augment.prompts import apply_variant, pick_shots, shots_for, variants
from aad_core.pipeline.augment.task import Agreement, load_task
from aad_core.pipeline.augment.teacher import failure_text, resolve_teacher, with_model
from aad_core.schema import Trace

if TYPE_CHECKING:
    from aad_core.workspace import Workspace


@dataclass
class SearchResult:
    """What :func:`run_prompt_search` found and where it saved it."""

    cluster_id: int
    choice: PromptChoice
    path: Path
    evaluator: str


def run_prompt_search(ws: Workspace, task: str | int, *, teacher: Any = None, n: int = 20, shots: int = 3,
                      seed: int | None = None) -> SearchResult:
    """Score every prompt variant on ``n`` training calls of ``task`` (seeded) and save the best.

    ``shots``: few-shot examples of the few-shot variants (0 = none; tasks answered with tool calls get
    none either), drawn from the training calls outside the sample when there are enough. A variant's
    agreement is its agreeing answers over the calls asked (a failed call counts as not agreeing); a tie
    goes to the simpler variant (the order of :func:`~aad_core.pipeline.augment.prompts.variants`).
    """
    if n < 1 or shots < 0:
        raise ValueError(f"n must be >= 1 and shots >= 0. Got n={n!r}, shots={shots!r} instead.")
    seed = ws.config.seed if seed is None else seed
    calls = load_task(ws, task)
    asker = resolve_teacher(ws.config, teacher, command="aad prompt-search")
    agreement = Agreement(ws, calls)
    sample = calls.sample(n, seed)
    in_sample = {t.id for t in sample}
    others = [t for t in calls.train if t.id not in in_sample] or calls.train
    tool_answers = any(t.response is not None and t.response.tool_calls for t in calls.train)
    examples = [] if tool_answers or shots == 0 else pick_shots(others, shots, seed)
    tried = variants([answer_string(t) for t in pick_shots(others, 3, seed + 1)], examples)

    requests = [with_model(apply_variant(t.request, v, shots_for(v, examples, t.id)), t.model)
                for v in tried for t in sample]
    replies = asker.ask_all(requests)
    failures = [r for r in replies if isinstance(r, Exception)]
    if len(failures) == len(replies):
        raise AADError(f"Every teacher call of the prompt search failed ({len(replies)} of {len(replies)}); the "
                       f"first: {failure_text(failures[0])}",
                       hint="Check [teacher] (base_url, model, API key) and that the teacher runs.")
    scores = []
    for i, v in enumerate(tried):
        chunk = replies[i * len(sample):(i + 1) * len(sample)]
        answered = [(r, t) for r, t in zip(chunk, sample) if not isinstance(r, Exception)]
        agreed = agreement.agree([answer_string(Trace(request=t.request, response=r.message)) for r, t in answered],
                                 [answer_string(t) for _, t in answered])
        scores.append({**v.to_json(), "asked": len(sample), "answered": len(answered), "agreed": sum(agreed),
                       "failed": len(sample) - len(answered), "agreement": round(sum(agreed) / len(sample), 6)})
    best = max(range(len(tried)), key=lambda i: (scores[i]["agreement"], -i))
    from aad_core import __version__

    choice = PromptChoice(best=tried[best], scores=scores, seed=seed, n=len(sample),
                          searched_at=datetime.now(timezone.utc).isoformat(), aad_version=__version__,
                          teacher=asker.name)
    state = PromptSearch.load_optional(ws) or PromptSearch()
    state.tasks[calls.cluster.id] = choice
    return SearchResult(cluster_id=calls.cluster.id, choice=choice, path=state.save(ws), evaluator=agreement.name)
