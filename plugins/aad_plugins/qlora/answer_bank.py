"""The trainer's side of the answer bank (:mod:`aad_core.models.answer_bank`): fit it on the
training answers, put its hints into the training and eval prompts, save it beside the adapter and
fit the candidate vote weight on held-out requests with the saved adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_plugins.qlora.console import announce

if TYPE_CHECKING:
    from aad_core.schema import Trace

#: Held-out requests scored to fit the answer bank's vote weight (each costs one forward pass per candidate).
MAX_VOTE_FIT_SAMPLES = 200


def fit_bank(train: Sequence[Trace], *, hints: int, candidates: int, embedder: str, show: bool) -> tuple[Any, str]:
    """The fitted answer bank when hints or candidates are on and the answers form a label set."""
    if not (hints or candidates):
        return None, "off"
    from aad_core.models.answer_bank import AnswerHints, hints_apply

    ok, why = hints_apply(train)
    if not ok:
        announce(f"Answer hints off for this cluster: {why}.", show)
        return None, why
    bank = AnswerHints(k=hints, embedder=embedder, candidates=candidates).fit(train)
    uses = ([f"each prompt lists the {bank.k} labels of its nearest training requests"] if bank.k else []) + (
        [f"answers are chosen among the {bank.candidates} nearest labels"] if bank.candidates else [])
    announce(f"Answer bank: {'; '.join(uses)} ({len(bank.answers_)} requests, "
             f"{len(set(bank.answers_))} labels, embedder {bank.embedder}).", show)
    return bank, why


def with_hints(bank: Any, train: Sequence[Trace], eval: Sequence[Trace],
               max_eval_samples: int) -> tuple[Sequence[Trace], list[Trace]]:
    """The training traces and the first ``max_eval_samples`` eval traces with the bank's hints in their prompts."""
    train = bank.apply_to_training(train)
    kept = list(eval)[:max_eval_samples]
    return train, [t.model_copy(update={"request": r}) for t, r in zip(kept, bank.apply([t.request for t in kept]))]


def save_bank(bank: Any, source: str, output_dir: Path, heldout: Sequence[Trace], *, device: str, batch_size: int,
              show: bool) -> dict[str, Any]:
    """Save the bank beside the adapter; with candidates on, fit its vote weight first and return the fit's metrics."""
    bank.save(output_dir)
    if not bank.candidates:
        return {}
    vote = fit_vote(bank, source, output_dir, heldout, device=device, batch_size=batch_size, show=show)
    bank.save(output_dir)
    return vote


def fit_vote(bank: Any, source: str, output_dir: Path, heldout: Sequence[Trace], *, device: str, batch_size: int,
             show: bool) -> dict[str, Any]:
    """Fit the bank's vote weight on held-out requests with the saved (best) adapter."""
    from aad_core.formats.answers import answer_string
    from aad_core.models.answer_bank import fit_vote_weight
    from aad_core.models.runtime import SpecialistRuntime

    sample = [t for t in heldout if t.response is not None][:MAX_VOTE_FIT_SAMPLES]
    if not sample:
        bank.vote_weight = 1.0
        return {"vote_weight": 1.0, "vote_fit": "no held-out requests: weight 1.0"}
    # A fresh runtime rather than the training model: it scores the best adapter (not the last
    # step's) on the full-precision base exactly as serving will load it, hints and all.
    runtime = SpecialistRuntime(source, device=device, batch_size=batch_size, warmup=False)
    runtime.add_adapter("fit", output_dir)
    scored = runtime.candidate_scores([t.request for t in sample], adapter="fit")
    bank.vote_weight, acc = fit_vote_weight(scored, [answer_string(t) for t in sample])
    announce(f"Vote weight {bank.vote_weight:g}: {acc:.1%} exact on {len(sample)} held-out requests.", show)
    return {"vote_weight": bank.vote_weight, "vote_fit_accuracy": acc, "vote_fit_samples": len(sample)}
