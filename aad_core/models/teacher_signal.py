"""The teacher's per-token distributions over the student's answer tokens, and KL to the student.

Three sources, best first:

* ``exact``: a local white-box Hugging Face teacher that shares the student's tokenizer; full
  distributions (and soft targets for training).
* ``top-k``: recorded top-k log-probs (OpenAI ``logprobs``); KL over the top-k tokens plus one tail
  bucket holding the remaining mass, on both sides.
* ``one-hot``: text only (an API teacher): the teacher puts all mass on its own answer token, so
  KL(P_T || P_S) is the student's negative log-likelihood of the answer.

All functions take natural-log probabilities, shape ``(T, V)`` for the student (T answer tokens,
V vocabulary) and return one KL value per token, shape ``(T,)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from aad_core.schema import TokenLogprob

log = logging.getLogger(__name__)
EPS = 1e-12
SignalKind = Literal["one-hot", "top-k", "exact"]


def kl_one_hot(student_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(one-hot(y) || P_S) = -log P_S(y) per token."""
    return -student_logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def kl_topk_tail(student_logprobs: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL over the teacher's top-k tokens plus one tail bucket, per token.

    ``teacher_ids`` (T, k) are student-vocabulary ids (-1 = a teacher token the student vocabulary
    cannot represent; its mass goes to the tail); ``teacher_logprobs`` (T, k) are the teacher's
    log-probs. Teacher tail = 1 - sum(top-k probs); student tail = 1 - sum of the student's probs
    on the same (mapped, de-duplicated) tokens.
    """
    import torch

    T, V = student_logprobs.shape
    p_top = teacher_logprobs.exp()
    mapped = teacher_ids >= 0
    p_dense = torch.zeros(T, V, dtype=student_logprobs.dtype, device=student_logprobs.device)
    p_dense.scatter_add_(1, teacher_ids.clamp(min=0).long(), torch.where(mapped, p_top, torch.zeros_like(p_top)).to(p_dense.dtype))
    in_set = p_dense > 0
    q = student_logprobs.exp()
    kl_top = torch.where(in_set, p_dense * (p_dense.clamp(min=EPS).log() - student_logprobs), torch.zeros_like(q)).sum(-1)
    p_tail = (1.0 - p_dense.sum(-1)).clamp(min=0.0)
    q_tail = (1.0 - torch.where(in_set, q, torch.zeros_like(q)).sum(-1)).clamp(min=EPS)
    kl_tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=EPS).log() - q_tail.log()), torch.zeros_like(p_tail))
    return kl_top + kl_tail


def kl_exact(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(P_T || P_S) per token over the shared vocabulary."""
    p = teacher_logprobs.exp()
    return (p * (teacher_logprobs - student_logprobs)).sum(-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) per token."""
    return -(logprobs.exp() * logprobs).sum(-1)


def soft_target_kl(teacher_logprobs_T: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) per token (Hinton et al.); teacher already at temperature T."""
    import torch

    s = torch.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * kl_exact(teacher_logprobs_T, s)


# -- the signal of one trace ------------------------------------------------------------------


@dataclass
class TeacherSignal:
    """What the teacher tells us about one trace's answer tokens."""

    kind: SignalKind
    #: one-hot: answer token ids (T,); top-k: ids (T, k); exact: unused
    ids: Any = None
    #: top-k: teacher log-probs (T, k); exact: (T, V)
    logprobs: Any = None
    #: Why a better signal was not used (reported once per run by the scorer).
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def kl(self, student_logprobs: torch.Tensor) -> torch.Tensor:
        if self.kind == "exact":
            return kl_exact(self.logprobs, student_logprobs)
        if self.kind == "top-k":
            return kl_topk_tail(student_logprobs, self.ids, self.logprobs)
        return kl_one_hot(student_logprobs, self.ids)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else -1


def from_logprobs(
    tokenizer: PreTrainedTokenizerBase, answer_ids: list[int], recorded: list[TokenLogprob] | None
) -> TeacherSignal:
    """The best signal for a text answer with optional recorded top-k log-probs.

    Recorded log-probs are usable only when the teacher's tokens line up one-to-one with the
    student's answer tokens (same tokenisation); otherwise the signal falls back to one-hot and
    says why.
    """
    import torch

    targets = torch.tensor(answer_ids, dtype=torch.long)
    if not recorded:
        return TeacherSignal("one-hot", ids=targets)
    student_tokens = [tokenizer.decode([i]) for i in answer_ids]
    n = min(len(recorded), len(student_tokens))
    # The answer may end with template tokens (end-of-turn) the teacher never produced.
    aligned = n > 0 and all(recorded[i].token == student_tokens[i] for i in range(n)) and len(recorded) <= len(student_tokens)
    if not aligned:
        return TeacherSignal(
            "one-hot", ids=targets,
            fallback_reason="recorded teacher tokens do not match the student's tokenisation of the answer; using one-hot",
        )
    k = max(1, max(len(r.top_logprobs) for r in recorded))
    ids = torch.full((len(answer_ids), k), -1, dtype=torch.long)
    lps = torch.full((len(answer_ids), k), float("-inf"))
    for t, rec in enumerate(recorded):
        tops = rec.top_logprobs or []
        if not tops:
            tops_pairs = [(rec.token, rec.logprob)]
        else:
            tops_pairs = [(tp.token, tp.logprob) for tp in tops]
        for j, (tok, lp) in enumerate(tops_pairs[:k]):
            ids[t, j] = _token_id(tokenizer, tok)
            lps[t, j] = lp
    # Positions after the teacher's last token (template end markers): one-hot on the target.
    for t in range(len(recorded), len(answer_ids)):
        ids[t, 0] = answer_ids[t]
        lps[t, 0] = 0.0
    return TeacherSignal("top-k", ids=ids, logprobs=lps)


def vocab_mismatch(teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase) -> str | None:
    """None when both tokenizers map the same strings to the same ids; else a short description."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv == sv:
        return None
    differing = sum(1 for k, v in sv.items() if tv.get(k) != v)
    return f"teacher vocabulary has {len(tv)} entries, student {len(sv)}; {differing} student tokens differ"


class LocalTeacher:
    """A white-box Hugging Face teacher on this machine. Exact KL needs the student's tokenizer;
    with another vocabulary the scorer falls back (to recorded top-k, else one-hot) and says so."""

    def __init__(self, model: str, *, device: str | None = None) -> None:
        self.model = model
        self.device = device

    def load(self, student_tokenizer: PreTrainedTokenizerBase) -> LocalTeacher:
        from aad_core.models.students import load_student

        self.model_, self.tokenizer_ = load_student(self.model, device=self.device)
        self.mismatch_ = vocab_mismatch(self.tokenizer_, student_tokenizer)
        if self.mismatch_:
            log.warning("Local teacher %s: %s. Falling back to recorded top-k log-probs, else one-hot.", self.model, self.mismatch_)
        return self

    def answer_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Teacher log-probs (B, L, V) predicting each next token, at ``temperature``."""
        import torch

        # Soft targets in float32 even when the student's passes run under bfloat16 autocast.
        with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
            logits = self.model_(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return torch.log_softmax(logits / temperature, dim=-1)
