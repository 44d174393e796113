"""Answer hints: the specialist of a classification cluster sees the labels of similar requests.

A small student that must recall one of many labels from ~10 examples each confuses neighbouring
labels. The embedder that routes requests already knows which training requests are closest, so
for a cluster whose teacher answers form a closed label set (the ``classification`` evaluator's
rule), the trainer appends to each prompt the distinct answers of its ``k`` nearest *other*
training requests, nearest first, and the student learns when to trust them. The bank of
training embeddings and answers is saved beside the adapter (``answer_hints.npz``) and the
runtime adds the same hint to every request it sends to that adapter.

The same bank can also pick the answer (``candidates``): the specialist scores the distinct labels
of the nearest training requests by its log-prob of each, plus ``vote_weight`` times their
similarity-weighted vote among the ``vote_neighbours`` nearest requests (a nearest-neighbour /
language-model interpolation, as kNN-LM does for next tokens). ``vote_weight`` is fitted on the
cluster's held-out split after training (:func:`fit_vote_weight`).

Measured on Banking77 (1,000 training queries, 77 labels, SmolLM2-135M): see docs/specialists.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aad_core.models.embedding import embedder_named, unit_vectors
from aad_core.errors import param_error

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import ChatRequest, Trace

HINTS_FILE = "answer_hints.npz"
HINT_PREFIX = "Answers to similar requests, nearest first: "


def query_text(request: ChatRequest) -> str:
    """What is compared between requests: the last user message (the system prompt is shared)."""
    return request.last_user_message().strip() or request.system_prompt().strip()


def with_hint(request: ChatRequest, answers: Sequence[str]) -> ChatRequest:
    """``request`` with one line listing ``answers`` appended to its system message (added if none)."""
    from aad_core.schema import Message

    if not answers:
        return request
    line = HINT_PREFIX + "; ".join(answers)
    messages = list(request.messages)
    if messages and messages[0].role == "system":
        first = messages[0]
        messages[0] = first.model_copy(update={"content": f"{first.text().rstrip()}\n{line}"})
    else:
        messages.insert(0, Message(role="system", content=line))
    return request.model_copy(update={"messages": messages})


class AnswerHints:
    """The nearest training requests' answers for new requests (a bank fitted on training traces).

    Parameters
    ----------
    k : int
        Distinct answers in a prompt hint (0 = no hint in the prompt).
    embedder : str
        Registered embedder name; its vectors of the requests' :func:`query_text` are compared by cosine.
    candidates : int
        Distinct answers the runtime chooses among by score (0 = greedy decoding, no choice).
    vote_neighbours : int
        Nearest training requests whose similarities add up to each candidate's vote.
    vote_weight : float or None
        Weight of the vote against the log-prob; None until :func:`fit_vote_weight` (then 1.0 is used).
    """

    def __init__(self, k: int = 4, embedder: str = "minilm", *, candidates: int = 0, vote_neighbours: int = 10,
                 vote_weight: float | None = None) -> None:
        self.k = k
        self.embedder = embedder
        self.candidates = candidates
        self.vote_neighbours = vote_neighbours
        self.vote_weight = vote_weight

    def fit(self, traces: Sequence[Trace]) -> AnswerHints:
        """Embed the answered ``traces`` and keep their answers."""
        import numpy as np

        from aad_core.formats.answers import answer_string

        owner = type(self).__name__
        for name in ("k", "candidates"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise param_error(name, owner, "an int >= 0", getattr(self, name))
        if self.k == 0 and self.candidates == 0:
            raise param_error("k", owner, "an int >= 1 when candidates is 0 (the bank would do nothing)", self.k)
        if not (isinstance(self.vote_neighbours, int) and self.vote_neighbours >= 1):
            raise param_error("vote_neighbours", owner, "an int >= 1", self.vote_neighbours)
        answered = [t for t in traces if t.response is not None]
        if not answered:
            raise param_error("traces", f"{owner}.fit", "at least one answered trace", "none")
        self.embeddings_ = unit_vectors(np.asarray(self.embed([t.request for t in answered]), dtype=np.float32))
        self.answers_ = [answer_string(t).strip() for t in answered]
        self.model_id_ = embedder_named(self.embedder).model_id
        return self

    def _similarities(self, embeddings: np.ndarray, exclude: Sequence[int] | None = None) -> np.ndarray:
        import numpy as np

        sims = unit_vectors(np.asarray(embeddings, dtype=np.float32)) @ self.embeddings_.T
        if exclude is not None:
            sims[np.arange(len(sims)), np.asarray(exclude)] = -np.inf
        return sims

    def _nearest_answers(self, sims: np.ndarray, k: int) -> list[list[str]]:
        import numpy as np

        out = []
        for row in np.argsort(-sims, axis=1, kind="stable"):
            seen: dict[str, None] = {}
            for j in row:
                seen.setdefault(self.answers_[j], None)
                if len(seen) == k:
                    break
            out.append(list(seen))
        return out

    def hints(self, embeddings: np.ndarray, *, exclude: Sequence[int] | None = None) -> list[list[str]]:
        """For each row of ``embeddings``, the ``k`` distinct answers of its nearest bank entries.

        ``exclude[i]`` is a bank row that row ``i`` must not see (its own entry, when the bank's
        own training requests get hints: the student must not learn to copy a hint that at
        serving time is only right as often as the nearest neighbour is).
        """
        return self._nearest_answers(self._similarities(embeddings, exclude), self.k)

    def candidate_votes(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """For each row: the ``candidates`` nearest distinct answers, nearest first, each with its
        vote, the summed similarity of the ``vote_neighbours`` nearest requests that gave it."""
        import numpy as np

        sims = self._similarities(embeddings)
        top = np.argsort(-sims, axis=1, kind="stable")[:, : self.vote_neighbours]
        out = []
        for row, labels in enumerate(self._nearest_answers(sims, self.candidates)):
            votes = dict.fromkeys(labels, 0.0)
            for j in top[row]:
                if self.answers_[j] in votes:
                    votes[self.answers_[j]] += float(sims[row, j])
            out.append(votes)
        return out

    def embed(self, requests: Sequence[ChatRequest]) -> np.ndarray:
        """The bank embedder's vectors of the requests' :func:`query_text`."""
        return embedder_named(self.embedder).embed([query_text(r) for r in requests])

    def hints_for_texts(self, texts: Sequence[str]) -> list[list[str]]:
        """:meth:`hints` for query texts (embedded with the bank's embedder)."""
        if not texts:
            return []
        return self.hints(embedder_named(self.embedder).embed(list(texts)))

    def apply(self, requests: Sequence[ChatRequest], embeddings: np.ndarray | None = None) -> list[ChatRequest]:
        """``requests`` with their hints added (as the specialist was trained); unchanged when ``k`` is 0."""
        if not self.k or not requests:
            return list(requests)
        vecs = self.embed(requests) if embeddings is None else embeddings
        return [with_hint(r, h) for r, h in zip(requests, self.hints(vecs))]

    def apply_to_training(self, traces: Sequence[Trace]) -> list[Trace]:
        """The bank's own traces (the ones given to :meth:`fit`, in order) with leave-one-out hints."""
        answered = [t for t in traces if t.response is not None]
        if not self.k:
            return answered
        hints = self.hints(self.embeddings_, exclude=list(range(len(answered))))
        return [t.model_copy(update={"request": with_hint(t.request, h)}) for t, h in zip(answered, hints)]

    # -- persistence -----------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        import numpy as np

        path = Path(folder) / HINTS_FILE
        meta = {"k": self.k, "embedder": self.embedder, "model_id": self.model_id_, "candidates": self.candidates,
                "vote_neighbours": self.vote_neighbours, "vote_weight": self.vote_weight}
        with path.open("wb") as f:
            np.savez_compressed(f, embeddings=self.embeddings_.astype(np.float16),
                                answers=np.array(json.dumps(self.answers_)), meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, folder: Path) -> AnswerHints | None:
        """The bank saved in ``folder``, or None when the adapter there has none."""
        import numpy as np

        path = Path(folder) / HINTS_FILE
        if not path.exists():
            return None
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            bank = cls(k=int(meta["k"]), embedder=str(meta["embedder"]), candidates=int(meta.get("candidates", 0)),
                       vote_neighbours=int(meta.get("vote_neighbours", 10)), vote_weight=meta.get("vote_weight"))
            bank.embeddings_ = data["embeddings"].astype(np.float32)
            bank.answers_ = list(json.loads(str(data["answers"])))
        bank.model_id_ = meta.get("model_id")
        return bank


def hints_apply(traces: Sequence[Trace]) -> tuple[bool, str]:
    """Whether answer hints suit these training traces: (yes/no, why). They do when the answers'
    output kind is ``label`` (:mod:`aad_core.formats.kinds`), the kind the ``classification``
    evaluator scores."""
    from aad_core.formats.kinds import output_kind_of

    kind = output_kind_of(traces)
    if kind != "label":
        return False, f"answers are of kind '{kind}', not a closed label set"
    return True, "answers form a closed label set"


#: Vote weights tried by :func:`fit_vote_weight` (0 = the specialist's log-prob alone).
VOTE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def choose(scored: dict[str, tuple[float, int, float]], weight: float) -> str:
    """The candidate with the highest ``log-prob + weight * vote`` (``scored[label] = (logprob, n_tokens, vote)``)."""
    return max(scored, key=lambda label: scored[label][0] + weight * scored[label][2])


def fit_vote_weight(scored: Sequence[dict[str, tuple[float, int, float]]], gold: Sequence[str]) -> tuple[float, float]:
    """The weight in :data:`VOTE_WEIGHTS` with the best ``classification`` evaluator score (the
    one the parity gate uses) on held-out requests, and that score.

    Ties go to the weight nearest 1 (log-prob and vote counted alike) so that a small, flat
    held-out split does not push the choice to an extreme.
    """
    from aad_core.plugins import create_component

    if not scored:
        return 1.0, float("nan")
    evaluator = create_component("evaluator", "classification")
    acc = {w: float(evaluator.evaluate([choose(s, w) for s in scored], list(gold))["score"]) for w in VOTE_WEIGHTS}
    best = max(VOTE_WEIGHTS, key=lambda w: (acc[w], -abs(w - 1.0)))
    return best, acc[best]
