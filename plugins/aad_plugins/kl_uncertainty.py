"""Scorer ``kl-uncertainty`` (the seed paper's Eq. 2): Score(x) = KL(P_T || P_S) + lambda * H_S(x).

KL and the student's entropy H_S are token means over the answer tokens only. The teacher
distribution is the best one available per trace (see :mod:`aad_core.models.teacher_signal`): a local
white-box teacher sharing the tokenizer (exact), recorded top-k log-probs (top-k + tail), or the
teacher's text (one-hot, where KL equals the student's NLL).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import param_error
from aad_core.plugins import Scorer, hookimpl

if TYPE_CHECKING:
    from aad_core.schema import Trace

log = logging.getLogger(__name__)


class KLUncertaintyScorer(Scorer):
    """Divergence + uncertainty scorer over a student causal LM (set in ``[scorer.kl-uncertainty]``).

    Parameters
    ----------
    student : str or Path
        The student: a known name, a hub id or a local path (``[train] student``).
    uncertainty_weight : float
        lambda in score = KL + lambda * student entropy.
    batch_size : int
        Samples per scoring forward pass.
    max_length : int
        Prompt + answer tokens per sample (``[train] max_length``).
    teacher : str or None
        A local Hugging Face teacher sharing the student's tokenizer, for exact KL; None = the best
        recorded signal per trace.
    device : str or None
        Torch device; None = CUDA when available, else CPU.
    """

    def __init__(
        self,
        student: str | Path = "smollm2-135m",
        uncertainty_weight: float = 1.0,
        batch_size: int = 8,
        max_length: int = 384,
        teacher: str | None = None,
        device: str | None = None,
    ) -> None:
        self.student = student
        self.uncertainty_weight = uncertainty_weight
        self.batch_size = batch_size
        self.max_length = max_length
        self.teacher = teacher
        self.device = device

    def _validate(self) -> None:
        if not (isinstance(self.uncertainty_weight, (int, float)) and self.uncertainty_weight >= 0):
            raise param_error("uncertainty_weight", type(self).__name__, "a float >= 0", self.uncertainty_weight)
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise param_error("batch_size", type(self).__name__, "an int >= 1", self.batch_size)
        if not (isinstance(self.max_length, int) and self.max_length >= 8):
            raise param_error("max_length", type(self).__name__, "an int >= 8", self.max_length)

    def load(self, model: Any = None, tokenizer: Any = None) -> KLUncertaintyScorer:
        """Load the student (or adopt an already loaded ``model``/``tokenizer``) and the teacher."""
        import torch

        from aad_core.models.students import load_student
        from aad_core.models.teacher_signal import LocalTeacher

        self._validate()
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            model, tokenizer = load_student(self.student, device=device)
        self.model_, self.tokenizer_, self.device_ = model, tokenizer, device
        self.teacher_ = None
        if self.teacher:
            teacher = LocalTeacher(self.teacher, device=device).load(tokenizer)
            self.teacher_ = None if teacher.mismatch_ else teacher
        return self

    def score(self, traces: Sequence[Trace], *, show_progress: bool = False) -> list[dict[str, float]]:
        import torch

        from aad_core.models.chat_format import answer_logits, encode_trace, pad_batch
        from aad_core.models.teacher_signal import entropy, from_logprobs, kl_exact

        if not hasattr(self, "model_"):
            self.load()
        tok, model = self.tokenizer_, self.model_
        encoded = [encode_trace(tok, t, self.max_length) for t in traces]
        # Similar lengths together: less padding per batch. Results go back in input order.
        order = sorted(range(len(traces)), key=lambda i: len(encoded[i]["input_ids"]))
        results: list[dict[str, float] | None] = [None] * len(traces)
        kinds: dict[str, int] = {}
        fallbacks: set[str] = set()
        progress = _progress(show_progress)
        with progress:
            task = progress.add_task("Scoring (KL + uncertainty)", total=len(traces))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = pad_batch([encoded[i] for i in idx], tok.pad_token_id or 0)
                batch = {k: v.to(self.device_) for k, v in batch.items()}
                with torch.no_grad():
                    logits, labels, s0 = answer_logits(model, batch)
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                teacher_lp = None
                if self.teacher_ is not None:
                    teacher_lp = self.teacher_.answer_logprobs(batch["input_ids"], batch["attention_mask"])[:, s0:-1]
                for row, i in enumerate(idx):
                    mask = labels[row] != -100
                    slp = logprobs[row][mask]
                    targets = labels[row][mask]
                    if slp.shape[0] == 0:
                        results[i] = {"score": 0.0, "kl": 0.0, "entropy": 0.0, "nll": 0.0, "answer_tokens": 0.0}
                        continue
                    if teacher_lp is not None:
                        kind = "exact"
                        kl = kl_exact(teacher_lp[row][mask], slp)
                    else:
                        signal = from_logprobs(tok, targets.tolist(), traces[i].teacher_logprobs)
                        kind = signal.kind
                        if signal.fallback_reason:
                            fallbacks.add(signal.fallback_reason)
                        kl = signal.kl(slp)
                    kinds[kind] = kinds.get(kind, 0) + 1
                    ent = entropy(slp).mean().item()
                    nll = -slp.gather(-1, targets.unsqueeze(-1)).mean().item()
                    kl_mean = kl.mean().item()
                    results[i] = {
                        "score": kl_mean + self.uncertainty_weight * ent,
                        "kl": kl_mean,
                        "entropy": ent,
                        "nll": nll,
                        "answer_tokens": float(slp.shape[0]),
                    }
                progress.advance(task, len(idx))
        for reason in sorted(fallbacks):
            log.warning("kl-uncertainty: %s", reason)
        self.signal_kinds_ = kinds
        out = [r for r in results if r is not None]
        assert len(out) == len(traces)
        for r in out:
            if not math.isfinite(r["score"]):
                r["score"] = float("inf")
        return out


def _progress(enabled: bool):  # -> rich.progress.Progress
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


@hookimpl
def aad_register_scorers(register: Any) -> None:
    register(
        "kl-uncertainty",
        KLUncertaintyScorer,
        description="KL(teacher || student) + lambda * student entropy over the answer tokens (seed paper Eq. 2)",
    )
