"""Serving specialists: one base student in memory, several LoRA adapters on top of it.

:class:`SpecialistRuntime` loads the base once, adds adapters with PEFT's multi-adapter API
(``load_adapter`` / ``set_adapter``; adapters disabled = the plain base student), and generates
greedily in left-padded batches. A lock serialises access: adapter switching mutates the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.plugins.components import Predictor

if TYPE_CHECKING:
    from aad_core.schema import ChatRequest, Specialist


@dataclass
class Generation:
    text: str
    #: Mean log-prob of the generated tokens under the model that generated them (confidence).
    mean_logprob: float
    n_tokens: int
    latency_ms: float
    #: The specialist's own confidence in [0, 1] where its kind has one (a classifier's top probability).
    confidence: float | None = None


class SpecialistRuntime:
    """A base student plus named adapters. ``generate(..., adapter=None)`` uses the base student."""

    def __init__(self, base_model: str | Path, *, device: str | None = None, batch_size: int = 8,
                 warmup: bool = True) -> None:
        self.base_model = base_model
        self.device = device
        self.batch_size = batch_size
        self.warmup = warmup
        self._lock = threading.RLock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._adapters: dict[str, str] = {}
        self._hints: dict[str, Any] = {}  # adapter name -> AnswerHints saved beside it
        self._merged: str | None = None

    # -- loading -----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        import torch

        from aad_core.models.students import load_student

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model, self._tokenizer = load_student(self.base_model, device=device)
        self._tokenizer.padding_side = "left"
        self.device_ = device
        if self.warmup:  # the first generate() of a process is slow
            from aad_core.schema import ChatRequest, Message

            self._generate_locked([ChatRequest(messages=[Message(role="user", content="Hi")])], None, 2)

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            self._ensure_loaded()
            return self._tokenizer

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT adapter folder under ``name`` (replacing an adapter of that name)."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise AADError(f"{path} is not a PEFT adapter folder (no adapter_config.json).",
                           hint="Pass a specialist version folder, e.g. .aad/specialists/<name>/<version>.")
        with self._lock:
            self._ensure_loaded()
            if self._merged is not None:
                raise AADError(f"Adapter {self._merged!r} is merged into the base; no more adapters can be added.",
                               hint="Create another SpecialistRuntime for more adapters.")
            from aad_core.models.quiet import quiet_loading

            with quiet_loading():  # peft asks transformers a deprecated question (a FutureWarning in the user's agent)
                if isinstance(self._model, PeftModel):
                    if name in self._model.peft_config:
                        self._model.delete_adapter(name)
                    self._model.load_adapter(str(path), adapter_name=name)
                else:
                    self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=name)
            self._model.eval()
            self._adapters[name] = str(path)
            from aad_core.models.answer_bank import AnswerHints

            bank = AnswerHints.load(path)
            if bank is None:
                self._hints.pop(name, None)
            else:
                self._hints[name] = bank

    def add_specialist(self, spec: Specialist) -> None:
        """Load a registered specialist's adapter under ``spec.name``."""
        self.add_adapter(spec.name, spec.path)

    def merge(self, adapter: str) -> None:
        """Merge one adapter into the base weights (faster; afterwards only that adapter serves)."""
        with self._lock:
            self._check_adapter(adapter)
            self._model.set_adapter(adapter)
            self._model = self._model.merge_and_unload()
            self._merged = adapter

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self._adapters:
            raise AADError(f"No adapter named {adapter!r} is loaded; loaded: {sorted(self._adapters) or 'none'}.",
                           hint="Call add_specialist(spec) or add_adapter(name, path) first.")

    # -- generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[ChatRequest], *, adapter: str | None = None,
                 max_new_tokens: int = 128, allowed_answers: Sequence[str] | None = None) -> list[Generation]:
        """Greedy answers for ``requests`` with ``adapter`` (None = the base student).

        An adapter trained with answer hints (:mod:`aad_core.models.answer_bank`) gets them added to
        each request, as in training; one whose bank chooses among candidates answers with the
        best-scoring candidate label instead of decoding freely (``max_new_tokens`` and
        ``allowed_answers`` then do not apply).

        ``allowed_answers`` (a closed label set, e.g. a classification cluster's answers) restricts
        decoding to exactly one of those strings; ``mean_logprob`` stays the model's own, unconstrained
        log-prob of the tokens it chose, so a confidence gate still sees how unsure it was.
        """
        with self._lock:
            self._ensure_loaded()
            self._check_adapter(adapter)
            trie = _AnswerTrie(self._tokenizer, allowed_answers) if allowed_answers else None
            bank = self._hints.get(adapter) if adapter is not None else None
            if bank is not None:
                vecs = bank.embed(requests)
                requests = bank.apply(list(requests), vecs)
                if bank.candidates:
                    return self._choose_locked(requests, adapter, bank, vecs)
            out: list[Generation] = []
            for i in range(0, len(requests), self.batch_size):
                out.extend(self._generate_locked(list(requests[i : i + self.batch_size]), adapter, max_new_tokens, trie))
            return out

    def _adapter_context(self, adapter: str | None) -> Any:
        """A context in which the model runs as ``adapter`` (None = the base student)."""
        import contextlib

        from peft import PeftModel

        model = self._model
        if self._merged is not None:
            if adapter not in (None, self._merged):
                raise AADError(f"Only the merged adapter {self._merged!r} is available.")
            if adapter is None:
                raise AADError("The base student is not available after merge().", hint="Use a separate runtime for the base.")
            return contextlib.nullcontext()
        if isinstance(model, PeftModel):
            if adapter is None:
                return model.disable_adapter()
            model.set_adapter(adapter)
        return contextlib.nullcontext()

    def answer_logprobs(self, pairs: Sequence[tuple[ChatRequest, str]], *, adapter: str | None = None
                        ) -> list[tuple[float, int]]:
        """``(summed log-prob, tokens)`` of each answer after its request, end-of-turn included."""
        import torch

        from aad_core.models.chat_format import answer_logits, encode_trace, pad_batch
        from aad_core.schema import Message, Trace

        with self._lock:
            self._ensure_loaded()
            self._check_adapter(adapter)
            tok = self._tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            enc = [encode_trace(tok, Trace(source="score", request=r, response=Message(role="assistant", content=a)),
                                max_length=1 << 16) for r, a in pairs]
            out: list[tuple[float, int]] = []
            step = max(self.batch_size, 16)
            with self._adapter_context(adapter), torch.no_grad():
                for i in range(0, len(enc), step):
                    batch = {k: v.to(self.device_) for k, v in pad_batch(enc[i : i + step], pad_id).items()}
                    logits, labels, _ = answer_logits(self._model, batch)
                    mask = labels != -100
                    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    out.extend(zip((lp * mask).sum(1).tolist(), mask.sum(1).tolist()))
            return out

    def candidate_scores(self, requests: Sequence[ChatRequest], *, adapter: str) -> list[dict[str, tuple[float, int, float]]]:
        """For an adapter whose answer bank chooses among candidates: per request, each candidate
        label's ``(log-prob, tokens, vote)`` (prompt hints added as in training)."""
        with self._lock:
            self._ensure_loaded()
            self._check_adapter(adapter)
            bank = self._hints.get(adapter)
            if bank is None or not bank.candidates:
                raise AADError(f"Adapter {adapter!r} has no answer bank with candidates.",
                               hint="Train it with [trainer.qlora] answer_candidates > 0 on a cluster with a closed label set.")
            vecs = bank.embed(requests)
            return self._candidate_scores_locked(bank.apply(list(requests), vecs), adapter, bank, vecs)

    def _candidate_scores_locked(self, requests: list[ChatRequest], adapter: str, bank: Any, vecs: Any
                                 ) -> list[dict[str, tuple[float, int, float]]]:
        votes = bank.candidate_votes(vecs)
        pairs = [(r, label) for r, v in zip(requests, votes) for label in v]
        scores = iter(self.answer_logprobs(pairs, adapter=adapter))
        return [{label: (*next(scores), vote) for label, vote in v.items()} for v in votes]

    def _choose_locked(self, requests: list[ChatRequest], adapter: str, bank: Any, vecs: Any) -> list[Generation]:
        """Answer with the best-scoring candidate label (see :mod:`aad_core.models.answer_bank`)."""
        from aad_core.models.answer_bank import choose

        started = time.perf_counter()
        scored = self._candidate_scores_locked(requests, adapter, bank, vecs)
        weight = 1.0 if bank.vote_weight is None else float(bank.vote_weight)
        latency = (time.perf_counter() - started) * 1000 / max(len(requests), 1)
        out = []
        for s in scored:
            label = choose(s, weight)
            lp, n, _ = s[label]
            out.append(Generation(text=label, mean_logprob=lp / max(n, 1), n_tokens=n, latency_ms=latency))
        return out

    def _generate_locked(self, requests: list[ChatRequest], adapter: str | None, max_new_tokens: int,
                         trie: _AnswerTrie | None = None) -> list[Generation]:
        import torch

        from aad_core.models.chat_format import prompt_text

        model, tok = self._model, self._tokenizer
        ctx = self._adapter_context(adapter)
        prompts = [prompt_text(tok, r) for r in requests]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device_)
        eos_ids = {tok.eos_token_id}
        started = time.perf_counter()
        prompt_len = enc["input_ids"].shape[1]
        constraint = {}
        if trie is not None:
            constraint["prefix_allowed_tokens_fn"] = lambda _row, ids: trie.allowed(ids[prompt_len:].tolist())
            max_new_tokens = trie.max_len  # room for the longest answer, so that none is cut off
        with ctx, torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True, **constraint,
            )
        latency = (time.perf_counter() - started) * 1000 / max(len(requests), 1)
        new = out.sequences[:, prompt_len:]
        # Log-prob of each chosen token under the model (raw logits: before any constraint).
        step_lp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)
        chosen = step_lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            n = len(ids)
            for j, t in enumerate(ids):
                if t in eos_ids:
                    n = j
                    break
            lp = chosen[row, : max(n, 1)]
            results.append(Generation(
                text=tok.decode(ids[:n], skip_special_tokens=True).strip(),
                mean_logprob=float(lp.mean()) if n else float(chosen[row, 0]),
                n_tokens=n,
                latency_ms=latency,
            ))
        return results


class AdapterPredictor(Predictor):
    """One adapter of a :class:`SpecialistRuntime` as a :class:`~aad_core.plugins.components.Predictor`
    (a kind "lora" specialist served on its own; the pool shares one runtime among adapters instead)."""

    def __init__(self, runtime: SpecialistRuntime, adapter: str) -> None:
        self.runtime = runtime
        self.adapter = adapter

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 128) -> list[Generation]:
        return self.runtime.generate(requests, adapter=self.adapter, max_new_tokens=max_new_tokens)


class _AnswerTrie:
    """Token-id prefix tree over a closed set of answers, each followed by end-of-sequence."""

    def __init__(self, tokenizer: Any, answers: Sequence[str]) -> None:
        eos = tokenizer.eos_token_id
        self.root: dict[int, dict] = {}
        self.max_len = 1
        for answer in dict.fromkeys(a.strip() for a in answers if a.strip()):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
            self.max_len = max(self.max_len, len(ids))
            node = self.root
            for t in ids:
                node = node.setdefault(t, {})
        self.eos = eos

    def allowed(self, prefix: list[int]) -> list[int]:
        node = self.root
        for t in prefix:
            if t not in node:  # finished (eos, then padding) or off the tree: only eos/pad follows
                return [self.eos]
            node = node[t]
        return list(node) or [self.eos]
