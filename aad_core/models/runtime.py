"""Serving specialists: one base student in memory, several LoRA adapters on top of it.

:class:`SpecialistRuntime` loads the base once, adds adapters with PEFT's multi-adapter API
(``load_adapter`` / ``set_adapter``; adapters disabled = the plain base student), and generates
greedily in left-padded batches. A lock serialises access: adapter switching mutates the model.

What makes it fast on CPU (docs/routing.md, "Serving speed"):

- **Prefix reuse.** Requests of one agent node share a long prefix (system prompt and tools, rendered
  by the chat template exactly as in training). The key/value cache of that token prefix is kept per
  adapter in a small LRU (``prefix_cache`` entries); a request whose prompt token ids start with a
  cached prefix encodes only the rest (``generate(cache=copy.deepcopy(prefix))``, transformers'
  "re-use a cache" pattern). The token sequence the model sees is the same as without the cache.
- **Micro-batching.** Concurrent :meth:`SpecialistRuntime.generate` calls that arrive within
  ``batch_window_ms`` of each other are answered by one batched forward pass per adapter instead of
  one after another, by a background batch worker. **Continuous batching**: a call that arrives while
  an adapter's fast copy is decoding a batch joins it at its next pass (its prompt encoded on its own,
  its key/value rows added to the batch's cache), and every row leaves the batch, and its caller gets
  its answer, as soon as it is complete: a long answer never holds a short one, and nobody waits for
  a running batch to drain.
- **A fast copy per adapter** (``fast_path``, CPU only). An adapter's answers come from a private copy of
  the base with only that adapter merged into its weights (``merge_and_unload``: no LoRA detour per
  layer), whose Linear layers hold int8 weights (``"int8"``: weight-only, per output channel, bfloat16
  inputs to the matmul, so a row's answer does not depend on the batch it is in), also int4 codes for
  narrow products (``"int4"``: groups of ``INT4_GROUP`` inputs, half the bytes read per token), or stay
  float32 (``"merged"``).
  Built at the adapter's first generation (or :meth:`SpecialistRuntime.load`); the base student,
  :meth:`SpecialistRuntime.answer_logprobs`, candidate scoring and adapters with answer hints keep the
  shared, unmerged model.
- **Prompt lookup** (``prompt_lookup``): a row decoded freely drafts the tokens that followed the
  last n-gram's most recent earlier occurrence in prompt + answer, checks them in one forward pass and
  keeps those the model's argmax agrees with (n-gram speculative decoding: the answer stays the model's
  own, and specialists mostly copy spans of the request). A micro-batch of up to ``LOOKUP_BATCH_ROWS``
  rows does the same for every row in one pass over a shared key/value cache, rejected drafts left in it
  as masked holes; a larger one decodes plainly (its passes are compute-bound already).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError, param_error
from aad_core.models.lean_llama import lean_forward
from aad_core.models.weight_only import weight_only_product
from aad_core.plugins.components import Predictor

if TYPE_CHECKING:
    from aad_core.schema import ChatRequest, Specialist

#: What :class:`SpecialistRuntime` ``fast_path`` accepts.
FAST_PATHS = ("int8", "int4", "merged", "none")
#: ``fast_path="int4"``: inputs per int4 group (one scale and zero point each, per output channel).
INT4_GROUP = 32
#: Most tokens drafted per pass by prompt-lookup decoding (``prompt_lookup``; ``[route] prompt_lookup_tokens``).
DEFAULT_PROMPT_LOOKUP = 10
#: Tokens drafted in the first pass of an answer (then adapted, up to ``prompt_lookup``).
LOOKUP_START = 4
#: Longest n-gram whose earlier occurrence prompt lookup drafts from.
LOOKUP_NGRAM = 3
#: ``bf16_from_rows``: matmuls of at least this many rows use the fast copy's bfloat16 weights (see Int8Linear).
BF16_FROM_ROWS = 16
#: A batch worker with no work for this long ends (the next call starts another, whose first passes are slower).
WORKER_IDLE_S = 300.0
#: Micro-batches of up to this many rows decode with prompt lookup; larger ones without drafts.
#: On 2 CPU cores (demo extract specialist, 48 requests at concurrency 8, lean forward): 8 rows drafting took
#: 90 passes and 5.1-5.3 requests/s, 4 (8 rows decoding plainly) 174 passes and 4.3-4.6 requests/s. (With
#: transformers' forward, whose passes cost more outside the matrix products, 4 had been the better limit.)
LOOKUP_BATCH_ROWS = 8


@dataclass
class Generation:
    text: str
    #: Mean log-prob of the generated tokens under the model that generated them (confidence).
    mean_logprob: float
    n_tokens: int
    latency_ms: float
    #: The specialist's own confidence in [0, 1] where its kind has one (a classifier's top probability).
    confidence: float | None = None


@dataclass
class _Prefix:
    """The key/value cache of a shared token prefix under one adapter."""

    adapter: str | None
    ids: tuple[int, ...]
    cache: Any


@dataclass
class _Pending:
    """One caller's :meth:`SpecialistRuntime.generate` waiting for a micro-batch (its rows may be answered one
    by one, as each finishes)."""

    requests: list[ChatRequest]
    adapter: str | None
    max_new_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    answers: list[Generation | None] = field(default_factory=list)
    next_batch: bool = False  # found unable to join a running batch: it waits for the next one

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.requests)


@dataclass
class _Row:
    """One prompt being decoded in a micro-batch by :meth:`SpecialistRuntime._lookup_decode_batch`."""

    feed: list[int]  # its tokens not in the key/value cache yet
    position: int  # the position of feed[0]
    seq: list[int]  # what its drafts are copied from (see _lookup_decode)
    regions: tuple[int, int]  # the ends of the previous answer and of the prompt in seq (see _lookup_draft)
    span: int  # its current draft length
    limit: int  # max new tokens
    key: Any = None  # who asked for it (given back to ``deliver``)
    started: float = 0.0
    share: int = 1  # rows its latency is amortised over (those it started with)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generation: Generation | None = None  # its answer, once delivered


class SpecialistRuntime:
    """A base student plus named adapters. ``generate(..., adapter=None)`` uses the base student.

    ``prefix_cache``: shared-prefix key/value caches kept (LRU; 0 = off); a prefix shorter than
    ``min_prefix_tokens`` is not cached. ``batch_window_ms``: how long a ``generate()`` call waits for
    concurrent calls to join its batch (0 = no micro-batching). ``fast_path`` (CPU only): how an
    adapter's answers are computed: ``"int8"`` (a private copy of the base with the adapter merged and
    int8 weights; ``int8_lm_head`` also for the output layer; a Llama student's copy decodes through
    :class:`~aad_core.models.lean_llama.LeanLlamaForward`, the same logits with fewer operations), ``"int4"``
    (the same, plus int4 codes for the products narrower than ``bf16_from_rows`` rows, all of them with 0;
    where this torch has no int4 kernel, int8), ``"merged"`` (the merged copy in float32:
    the same answers as unmerged, without the LoRA detour) or ``"none"`` (the shared PEFT model).
    ``bf16_from_rows`` (``fast_path`` ``"int8"`` or ``"int4"``): matmuls of at least this many rows (a prompt's
    encoding, wide batches) use a bfloat16 copy of the weights kept beside the int8 one (+2 bytes per parameter
    per adapter; 0 = never). ``prompt_lookup``: the most tokens drafted per row and pass by prompt-lookup speculative decoding when
    rows are generated freely (0 = off; closed answer sets decode plainly). ``parallel_batches``: micro-batches of
    an adapter's fast copy that decode at once, outside the model lock, the cores split between them (1 = one at a
    time; see :meth:`_decode_batch`).
    """

    def __init__(self, base_model: str | Path, *, device: str | None = None, batch_size: int = 8,
                 warmup: bool = True, prefix_cache: int = 8, min_prefix_tokens: int = 16,
                 batch_window_ms: float = 5.0, fast_path: str = "int8", int8_lm_head: bool = True,
                 prompt_lookup: int = DEFAULT_PROMPT_LOOKUP, parallel_batches: int = 1,
                 bf16_from_rows: int = BF16_FROM_ROWS) -> None:
        if fast_path not in FAST_PATHS:
            raise AADError(f"Unknown fast_path {fast_path!r}.", hint="Use one of: " + ", ".join(FAST_PATHS) + ".")
        if isinstance(prompt_lookup, bool) or not isinstance(prompt_lookup, int) or prompt_lookup < 0:
            raise param_error("prompt_lookup", "SpecialistRuntime", "an int >= 0", prompt_lookup)
        if isinstance(parallel_batches, bool) or not isinstance(parallel_batches, int) or parallel_batches < 1:
            raise param_error("parallel_batches", "SpecialistRuntime", "an int >= 1", parallel_batches)
        if isinstance(bf16_from_rows, bool) or not isinstance(bf16_from_rows, int) or bf16_from_rows < 0:
            raise param_error("bf16_from_rows", "SpecialistRuntime", "an int >= 0", bf16_from_rows)
        self.base_model = base_model
        self.device = device
        self.batch_size = batch_size
        self.warmup = warmup
        self.prefix_cache = prefix_cache
        self.min_prefix_tokens = min_prefix_tokens
        self.batch_window_ms = batch_window_ms
        self.fast_path = fast_path
        self.int8_lm_head = int8_lm_head
        self.prompt_lookup = prompt_lookup
        self.parallel_batches = parallel_batches
        self.bf16_from_rows = bf16_from_rows
        # Micro-batches decoding at once (fast copies on CPU only; see _decode_batch) and the cores they share.
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._cores: int | None = None
        self._decode_lock = threading.Lock()  # the tokenizer's decode() from parallel batches
        self._last_answer: dict[str | None, list[int]] = {}  # adapter -> its latest answer's tokens (drafts)
        self._fast: dict[str, Any] = {}  # adapter name -> its private merged (int8) copy of the base
        self._lock = threading.RLock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._adapters: dict[str, str] = {}
        self._hints: dict[str, Any] = {}  # adapter name -> AnswerHints saved beside it
        self._merged: str | None = None
        self._prefixes: OrderedDict[tuple[str | None, tuple[int, ...]], _Prefix] = OrderedDict()
        # Calls waiting for a micro-batch, and the batch workers that answer them (started on demand, at most
        # parallel_batches, each gone after WORKER_IDLE_S without work); _work guards all three.
        self._pending: list[_Pending] = []
        self._work = threading.Condition()
        self._workers = 0
        self._idle_workers = 0
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._count_tokenizer: Any = None
        self._count_lock = threading.Lock()
        self._stats_lock = threading.Lock()  # decoding threads outside the model lock count too
        #: Counters: prompt tokens taken from a cached prefix, and prompt tokens encoded.
        self.stats = {"prefix_hits": 0, "prefix_builds": 0, "reused_tokens": 0, "prompt_tokens": 0, "batches": 0,
                      "fast_builds": 0, "lookup_passes": 0, "lookup_tokens": 0,
                      # the same for micro-batches decoded by _lookup_decode_batch (lookup_* counts single rows)
                      "lookup_batches": 0, "lookup_batch_passes": 0, "lookup_batch_tokens": 0,
                      # continuous batching: rows that joined a running batch, and cache compactions
                      "joined_rows": 0, "compactions": 0}

    @property
    def loaded(self) -> bool:
        """Whether the base student is in memory (and warmed up, when ``warmup``)."""
        return self._model is not None

    def load(self) -> None:
        """Load (and warm up) the base student now, and build (and warm up) the fast copy of every
        adapter loaded so far, so that the first request is not the cold one."""
        with self._lock:
            self._ensure_loaded()
            warmed = [name for name in self._adapters if self._fast_model(name) is not None and self.warmup]
            for name in warmed:
                self._warm(name)
        if warmed and self.batch_window_ms > 0:
            # Requests are decoded by a batch worker thread, whose first forward passes are slow again (its own
            # OpenMP team and kernel caches): one dummy request through it. (Outside the model lock: the worker
            # takes it.)
            from aad_core.schema import ChatRequest, Message

            self._generate_batched([ChatRequest(messages=[Message(role="user", content="Hi")])], warmed[0], 2)

    def _warm(self, adapter: str | None) -> None:
        """One dummy generation (the first ``generate()`` of a model is slow); with ``prompt_lookup``, also
        one of two rows (a single row decodes through :meth:`_lookup_decode`, a batch through
        :meth:`_lookup_decode_batch`)."""
        from aad_core.schema import ChatRequest, Message

        request = ChatRequest(messages=[Message(role="user", content="Hi")])
        self._generate_locked([request], adapter, 2)
        if self.prompt_lookup > 0:
            self._generate_locked([request, request], adapter, 2)

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
            self._warm(None)

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
            self._drop_prefixes(name)
            self._fast.pop(name, None)  # built from the old weights
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
            self._drop_prefixes(None, every=True)
            self._fast.clear()

    def _drop_prefixes(self, adapter: str | None, *, every: bool = False) -> None:
        """Forget the cached prefixes of ``adapter`` (all of them with ``every``): its weights changed."""
        for key in [k for k in self._prefixes if every or k[0] == adapter]:
            del self._prefixes[key]

    @property
    def fast_active(self) -> bool:
        """Whether adapters are served by their fast copies (``fast_path`` other than "none", on CPU)."""
        return self.fast_path != "none" and str(getattr(self, "device_", self.device or "cpu")).startswith("cpu")

    def _fast_model(self, adapter: str | None) -> Any:
        """The private fast copy that generates for ``adapter`` (built now if need be), or None when the
        shared model does: the base student, adapters with answer hints, ``fast_path="none"``, a GPU,
        and ``"merged"`` once :meth:`merge` has merged that adapter into the shared model."""
        if adapter is None or not self.fast_active or adapter in self._hints:
            return None
        if self._merged is not None and self.fast_path == "merged":
            return None
        model = self._fast.get(adapter)
        if model is None:
            model = self._fast[adapter] = self._build_fast(adapter)
            self._drop_prefixes(adapter)  # encoded by the shared model
            self._bump(fast_builds=1)
        return model

    def _build_fast(self, adapter: str) -> Any:
        """A copy of the base weights with only ``adapter`` merged into them (the shared PEFT model is not
        touched), int8 for ``fast_path="int8"``, int8 plus int4 codes for ``"int4"``."""
        from peft import PeftModel

        from aad_core.models.quiet import quiet_loading

        self._check_adapter(adapter)
        if self._merged is not None:  # the shared model is that adapter merged already
            model = copy.deepcopy(self._model)
        else:  # a copy of the base weights (every LoRA layer removed), then this adapter alone, merged
            model = copy.deepcopy(self._model)
            if isinstance(model, PeftModel):
                model = model.unload()
            with quiet_loading():
                model = PeftModel.from_pretrained(model, self._adapters[adapter], adapter_name=adapter)
            model = model.merge_and_unload()
        model.eval()
        if self.fast_path in ("int8", "int4"):
            group = INT4_GROUP if self.fast_path == "int4" and _int4_supported() else 0
            _int8_linears(model, lm_head=self.int8_lm_head, bf16_from_rows=self.bf16_from_rows, int4_group=group)
            # The same function with fewer operations per pass (Llama students; bit-identical logits).
            lean = lean_forward(model)
            if lean is not None:
                model.forward = lean
        return model

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
        if self.batch_window_ms > 0 and not allowed_answers and self._hints.get(adapter) is None and requests:
            return self._generate_batched(list(requests), adapter, max_new_tokens)
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
            return self._generate_locked(list(requests), adapter, max_new_tokens, trie)

    def _generate_batched(self, requests: list[ChatRequest], adapter: str | None, max_new_tokens: int) -> list[Generation]:
        """Queue the call for a batch worker (started if none is free) and wait for its answers."""
        item = _Pending(requests, adapter, max_new_tokens)
        with self._work:
            closing = self._closing
            if not closing:
                self._pending.append(item)
                if self._idle_workers == 0 and self._workers < self.parallel_batches:
                    try:
                        self._start_worker_locked()
                    except BaseException:
                        self._pending.remove(item)
                        raise
                self._work.notify()
        if closing:  # the interpreter is exiting (an exit hook of the app): answered here, not by a worker
            return self._decode_batch(requests, adapter, max_new_tokens)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return [a for a in item.answers if a is not None]

    def _start_worker_locked(self) -> None:
        """Start one more batch worker (``self._work`` held)."""
        worker = threading.Thread(target=self._batch_worker, name="aad-specialist-batches", daemon=True)
        worker.start()  # "can't start new thread": nothing counted, the caller's call fails
        self._workers += 1
        _LIVE_RUNTIMES.add(self)
        self._threads = [t for t in self._threads if t.is_alive()] + [worker]

    def _batch_worker(self) -> None:
        """Answer queued calls until none has come for ``WORKER_IDLE_S`` (see :meth:`_serve_batches`); a worker
        that dies of an unexpected error hands its queue to a new one, so that no call waits forever."""
        try:
            self._serve_batches()
        except BaseException:
            with self._work:
                self._workers -= 1
                if self._pending and not self._closing:
                    self._start_worker_locked()
            raise

    def _serve_batches(self) -> None:
        """Wait ``batch_window_ms`` for concurrent calls, take the oldest call's (adapter, max_new_tokens)
        group, and decode it as one batch, which later calls to the same adapter may join; until idle."""
        while True:
            with self._work:
                self._idle_workers += 1
                has_work = self._work.wait_for(lambda: bool(self._pending) or self._closing, timeout=WORKER_IDLE_S)
                self._idle_workers -= 1
                if not has_work or not self._pending:  # idle, or closing with nothing queued (queued calls are served)
                    self._workers -= 1  # decided and counted under the lock: a new call starts another worker
                    return
            time.sleep(self.batch_window_ms / 1000)
            with self._work:  # the oldest call's (adapter, max_new_tokens) group; the rest stays queued
                if not self._pending:
                    continue
                group = (self._pending[0].adapter, self._pending[0].max_new_tokens)
                members = [p for p in self._pending if (p.adapter, p.max_new_tokens) == group]
                self._pending = [p for p in self._pending if (p.adapter, p.max_new_tokens) != group]
                for p in self._pending:  # a new batch: each may try to join it
                    p.next_batch = False
            name, max_new = group
            joined: list[_Pending] = []
            try:
                owners = [(p, i) for p in members for i in range(len(p.requests))]
                gens = self._decode_batch([r for p in members for r in p.requests], name, max_new,
                                            owners=owners, join=functools.partial(self._admit, name, joined))
                self._bump(batches=1)
                for owner, gen in zip(owners, gens):
                    self._deliver(owner, gen)
            except BaseException as err:  # every caller of the failed batch gets the error
                for p in members + joined:
                    if not p.done.is_set():
                        p.error = err
                        p.done.set()

    def _stop_workers(self, timeout: float = 5.0) -> None:
        """End the batch workers (at interpreter exit: a daemon thread still alive when the interpreter
        finalises aborts the process with "terminate called without an active exception")."""
        with self._work:
            self._closing = True
            self._work.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t.ident is not None:
                t.join(timeout)

    def _deliver(self, owner: tuple[_Pending, int], gen: Generation) -> None:
        """Answer row ``owner[1]`` of a queued call; the call returns once all its rows are answered."""
        item, i = owner
        with self._work:
            if item.done.is_set() or item.answers[i] is not None:
                return
            item.answers[i] = gen
            if all(a is not None for a in item.answers):
                item.done.set()

    def _admit(self, adapter: str | None, joined: list[_Pending], room: int, prefix: _Prefix | None, model: Any
               ) -> list[tuple[list[int], int, tuple[_Pending, int]]]:
        """Queued calls to ``adapter`` that can join a running batch of its fast copy ``model`` (continuous
        batching), in the order they came: at most ``room`` rows, whose prompts start with the batch's cached
        ``prefix`` (or, for a batch without one, would not use one). Returns per row its prompt ids, max new
        tokens and owner. A call that cannot join (another adapter or agent node, more rows than the room
        left) stays queued, and while one waits nobody joins: the batch drains, so that no call is starved by
        a batch that keeps taking calls in. Nobody joins either once the adapter was loaded again (its calls
        get the new weights in the next batch) or the runtime is closing. Never waits for the model lock: a
        busy lock means no one joins now."""
        from aad_core.models.chat_format import prompt_text

        if not self._lock.acquire(blocking=False):
            return []
        rows: list[tuple[list[int], int, tuple[_Pending, int]]] = []
        back: list[_Pending] = []
        try:
            with self._work:
                if self._closing or self._fast.get(adapter) is not model or any(
                        p.adapter != adapter or p.next_batch for p in self._pending):
                    return []
                picked = []
                for p in self._pending:
                    if len(p.requests) > room:  # first come, first served: it starts the next batch
                        p.next_batch = True
                        break
                    picked.append(p)
                    room -= len(p.requests)
                if not picked:
                    return []
                self._pending = [p for p in self._pending if p not in picked]
            joined[:] = [p for p in joined if not p.done.is_set()]  # kept only to be failed with the batch
            tok = self._tokenizer
            for p in picked:
                try:
                    ids = [list(x) for x in tok([prompt_text(tok, r) for r in p.requests],
                                                add_special_tokens=False)["input_ids"]]
                    if prefix is not None:
                        fits = all(len(row) > len(prefix.ids) and tuple(row[: len(prefix.ids)]) == prefix.ids
                                   for row in ids)
                    else:
                        fits = self.prefix_cache <= 0 or all(
                            self._context_length(r, row) < self.min_prefix_tokens for r, row in zip(p.requests, ids))
                except Exception as err:  # this call's own fault (its prompt): it fails alone, the batch goes on
                    p.error = err
                    p.done.set()
                    continue
                if fits:
                    joined.append(p)
                    rows.extend((row, p.max_new_tokens, (p, i)) for i, row in enumerate(ids))
                else:
                    back.append(p)
        finally:
            self._lock.release()
        if back:
            with self._work:
                for p in back:
                    p.next_batch = True
                self._pending[:0] = back
                self._work.notify()
        return rows

    def _decode_batch(self, requests: list[ChatRequest], adapter: str | None, max_new_tokens: int, *,
                        owners: list[Any] | None = None, join: Any = None) -> list[Generation]:
        """One micro-batch, by a batch worker. With an adapter's fast copy (CPU), only the preparation
        (loading, tokenising, the prefix cache) holds the model lock: the decoding runs on the private copy,
        later calls join it (``join``, see :meth:`_admit`) and each row is answered as soon as it is complete
        (``owners``, see :meth:`_deliver`); with ``parallel_batches`` > 1 beside other workers' batches, the
        cores split between them (a 135M model gains little from two threads per pass, much from two passes
        at once: 2 streams of 1 thread answered 2.5-2.7 requests/s where 1 stream of 2 threads answered 1.6).
        The shared PEFT model (no fast copy: a GPU, ``fast_path="none"``, hints) switches adapters in place:
        its batches take turns under the lock, and nobody joins them."""
        with self._lock:
            self._ensure_loaded()
            self._check_adapter(adapter)
            fast = self._fast_model(adapter)
            if fast is None:
                return self._generate_locked(requests, adapter, max_new_tokens)
            plan = self._plan(requests, adapter)
        # The model picked under the lock: an adapter replaced or merged meanwhile does not touch this batch.
        cores = self._shared_cores() if self.parallel_batches > 1 else contextlib.nullcontext()
        with cores:
            return self._decode_plan(plan, requests, adapter, max_new_tokens, None,
                                     runner=(fast, contextlib.nullcontext()), owners=owners, join=join)

    @contextlib.contextmanager
    def _shared_cores(self) -> Any:
        """Run this thread's torch ops on its share of the cores while other batches decode (torch's thread
        count is per calling thread: other threads keep theirs)."""
        import torch

        with self._busy_lock:
            if self._cores is None:  # the cores this process may use (not torch's count, which batches change)
                self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            self._busy += 1
            share = max(1, self._cores // self._busy)
        before = torch.get_num_threads()
        torch.set_num_threads(share)
        try:
            yield
        finally:
            torch.set_num_threads(before)
            with self._busy_lock:
                self._busy -= 1

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

    def _runner(self, adapter: str | None) -> tuple[Any, Any]:
        """The model that generates for ``adapter`` (its fast copy, else the shared model) and the context
        to run it in."""
        import contextlib

        fast = self._fast_model(adapter)
        if fast is not None:
            return fast, contextlib.nullcontext()
        return self._model, self._adapter_context(adapter)

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
        """Greedy answers, ``batch_size`` at a time; requests that share a cached prefix batch together."""
        return self._decode_plan(self._plan(requests, adapter), requests, adapter, max_new_tokens, trie)

    def _plan(self, requests: list[ChatRequest], adapter: str | None
              ) -> tuple[list[list[int]], list[_Prefix | None], dict[int, list[int]]]:
        """Under the model lock: the prompts' token ids, their cached prefixes (built now if need be) and the
        rows grouped by prefix."""
        from aad_core.models.chat_format import prompt_text

        tok = self._tokenizer
        self._fast_model(adapter)  # built before any prefix is: a new copy drops the adapter's prefixes
        ids = [list(x) for x in tok([prompt_text(tok, r) for r in requests], add_special_tokens=False)["input_ids"]]
        prefixes = [self._prefix_for(r, row, adapter) for r, row in zip(requests, ids)]
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prefixes):
            groups.setdefault(id(p) if p is not None else 0, []).append(i)
        return ids, prefixes, groups

    def _decode_plan(self, plan: tuple[list[list[int]], list[_Prefix | None], dict[int, list[int]]],
                     requests: list[ChatRequest], adapter: str | None, max_new_tokens: int,
                     trie: _AnswerTrie | None, *, runner: tuple[Any, Any] | None = None,
                     owners: list[Any] | None = None, join: Any = None) -> list[Generation]:
        ids, prefixes, groups = plan
        out: list[Generation | None] = [None] * len(requests)
        chunks = [rows[i : i + self.batch_size] for rows in groups.values() for i in range(0, len(rows), self.batch_size)]
        for n, chunk in enumerate(chunks):
            keys = [owners[j] for j in chunk] if owners is not None else None
            # Only the last chunk takes later calls in: one that never drained would starve the chunks after it.
            for row, gen in zip(chunk, self._generate_ids([ids[j] for j in chunk], prefixes[chunk[0]], adapter,
                                                          max_new_tokens, trie, runner=runner, keys=keys,
                                                          join=join if n == len(chunks) - 1 else None)):
                out[row] = gen
        return [g for g in out if g is not None]

    def _prefix_for(self, request: ChatRequest, ids: list[int], adapter: str | None) -> _Prefix | None:
        """The cached prefix ``ids`` start with (the longest), else one built now from the request's
        context (system messages and tools); None when prefix reuse is off or the prefix is too short."""
        if self.prefix_cache <= 0:
            return None
        best: _Prefix | None = None
        for p in self._prefixes.values():
            n = len(p.ids)
            if p.adapter == adapter and n < len(ids) and (best is None or n > len(best.ids)) and tuple(ids[:n]) == p.ids:
                best = p
        if best is not None:
            self._prefixes.move_to_end((adapter, best.ids))
            self._bump(prefix_hits=1)
            return best
        n = self._context_length(request, ids)
        if n < self.min_prefix_tokens:
            return None
        prefix = _Prefix(adapter, tuple(ids[:n]), self._encode_prefix(ids[:n], adapter))
        self._prefixes[(adapter, prefix.ids)] = prefix
        while len(self._prefixes) > self.prefix_cache:
            self._prefixes.popitem(last=False)
        self._bump(prefix_builds=1)
        return prefix

    def _context_length(self, request: ChatRequest, ids: list[int]) -> int:
        """How many of ``ids`` (the request's prompt) belong to its shared context: the longest common
        token prefix with the rendering of its leading system messages and tools alone (at least one
        prompt token is always left to encode)."""
        from aad_core.models.chat_format import prompt_text
        from aad_core.schema import ChatRequest as Request

        context = []
        for m in request.messages:
            if m.role not in ("system", "developer"):
                break
            context.append(m)
        if not context and not request.tools:
            return 0
        rendered = prompt_text(self._tokenizer, Request(messages=context, tools=request.tools))
        ctx = self._tokenizer(rendered, add_special_tokens=False)["input_ids"]
        n = 0
        for a, b in zip(ids[:-1], ctx):
            if a != b:
                break
            n += 1
        return n

    def _encode_prefix(self, ids: list[int], adapter: str | None) -> Any:
        """The key/value cache of ``ids`` under ``adapter``: one forward pass."""
        import torch

        model, context = self._runner(adapter)
        with context, torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=self.device_), use_cache=True)
        return next(v for k, v in out.items() if k in ("cache", "past_key_values"))

    def _generate_ids(self, ids: list[list[int]], prefix: _Prefix | None, adapter: str | None, max_new_tokens: int,
                      trie: _AnswerTrie | None, *, runner: tuple[Any, Any] | None = None, keys: list[Any] | None = None,
                      join: Any = None) -> list[Generation]:
        """Greedy answers for prompts given as token ids. With ``prefix``, every prompt starts with its
        ids: the rows are ``prefix | left-padded rest`` and only the rest is encoded. Rows decoded freely go
        through :meth:`_lookup_decode` (one row) or :meth:`_lookup_decode_batch` when ``prompt_lookup`` is on;
        with ``keys`` (a batch worker's batch) always the latter, which answers each row as soon as it is
        complete (through :meth:`_deliver`) and, given ``join`` (see :meth:`_admit`), takes later calls in."""
        import torch

        model, context = runner if runner is not None else self._runner(adapter)
        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        skip = len(prefix.ids) if prefix is not None else 0
        rest = [row[skip:] for row in ids]
        if prefix is not None:
            self._bump(reused_tokens=skip * len(ids))
        self._bump(prompt_tokens=sum(len(r) for r in rest))
        continuous = keys is not None  # a batch worker's batch: answered row by row, later calls may join
        if (trie is None and (continuous or (self.prompt_lookup > 0 and len(ids) <= LOOKUP_BATCH_ROWS))
                and _plain_greedy(model)):
            started = time.perf_counter()
            with context, torch.no_grad():
                if continuous:
                    return self._lookup_decode_batch(model, ids, prefix, adapter, max_new_tokens, keys=keys, join=join)
                if len(ids) == 1:
                    answers = [self._lookup_decode(model, ids[0], prefix, adapter, max_new_tokens)]
                else:
                    answers = self._lookup_decode_batch(model, ids, prefix, adapter, max_new_tokens)
            latency = (time.perf_counter() - started) * 1000 / len(ids)
            return [self._generation(tokens, torch.tensor(logprobs), latency) for tokens, logprobs in answers]
        width = max(len(r) for r in rest)
        input_ids = torch.tensor([list(prefix.ids if prefix else ()) + [pad] * (width - len(r)) + r for r in rest],
                                 device=self.device_)
        mask = torch.tensor([[1] * skip + [0] * (width - len(r)) + [1] * len(r) for r in rest], device=self.device_)
        extra: dict[str, Any] = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix.cache)  # generate() extends the cache it is given
            if len(ids) > 1:
                cache.batch_repeat_interleave(len(ids))
            extra[_cache_kwarg()] = cache
        started = time.perf_counter()
        prompt_len = input_ids.shape[1]
        if trie is not None:
            extra["prefix_allowed_tokens_fn"] = lambda _row, seq: trie.allowed(seq[prompt_len:].tolist())
            max_new_tokens = trie.max_len  # room for the longest answer, so that none is cut off
        with context, torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_logits=True,
                return_dict_in_generate=True, **extra,
            )
        latency = (time.perf_counter() - started) * 1000 / max(len(ids), 1)
        new = out.sequences[:, prompt_len:]
        # Log-prob of each chosen token under the model (raw logits: before any constraint).
        step_lp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)
        chosen = step_lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return [self._generation(new[row].tolist(), chosen[row], latency) for row in range(new.shape[0])]

    def _generation(self, tokens: list[int], logprobs: Any, latency: float) -> Generation:
        """The answer of one row: its new tokens up to end-of-sequence, and the mean of their log-probs
        (``logprobs``, a tensor aligned with ``tokens``; the end-of-sequence token's when it came first)."""
        tok = self._tokenizer
        n = tokens.index(tok.eos_token_id) if tok.eos_token_id in tokens else len(tokens)
        with self._decode_lock:
            text = tok.decode(tokens[:n], skip_special_tokens=True).strip()
        return Generation(
            text=text,
            mean_logprob=float(logprobs[:n].mean()) if n else float(logprobs[0]),
            n_tokens=n,
            latency_ms=latency,
        )

    def _lookup_decode(self, model: Any, ids: list[int], prefix: _Prefix | None, adapter: str | None,
                       max_new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy decoding of one prompt with prompt-lookup drafts: each forward pass feeds the tokens not
        yet in the cache plus up to ``prompt_lookup`` drafted ones (:func:`_lookup_draft` over the adapter's
        previous answer, the prompt and the answer so far), keeps the drafts the model's own argmax agrees
        with, adds its next token after them, and crops the rejected drafts from the key/value cache. The
        answer and the raw log-prob of each chosen token are those of plain greedy ``generate()`` (up to
        float rounding of the wider matmuls). Returns the new tokens (up to end-of-sequence included) and
        their log-probs.

        transformers' own ``generate(prompt_lookup_num_tokens=...)`` is not used: in transformers 5.24 its
        first pass re-encodes the whole prompt on top of a given prefix cache (wrong answers)."""
        import torch

        eos = self._tokenizer.eos_token_id
        cache = copy.deepcopy(prefix.cache) if prefix is not None else None
        feed = list(ids[len(prefix.ids):]) if prefix is not None else list(ids)
        # Drafts come from the prompt, the answer so far, and the adapter's previous answer (its fixed parts,
        # e.g. the JSON keys); only where they are drafted from depends on it, never what is kept.
        previous = self._last_answer.get(adapter, [])
        seq = previous + list(ids)
        regions = (len(previous), len(seq))
        tokens: list[int] = []
        logprobs: list[float] = []
        passes = 0
        # Draft length: each drafted token widens the pass (about 15 % of a one-token pass on CPU), so it
        # grows by 2 while every draft is kept and shrinks by 1 when one is rejected (transformers' heuristic).
        span = min(LOOKUP_START, self.prompt_lookup)
        while len(tokens) < max_new_tokens:
            draft = _lookup_draft(seq, span, regions=regions)[: max_new_tokens - len(tokens) - 1]
            kwargs: dict[str, Any] = {} if cache is None else {_cache_kwarg(): cache}
            out = model(input_ids=torch.tensor([feed + draft], device=self.device_), use_cache=True,
                        logits_to_keep=len(draft) + 1, **kwargs)
            passes += 1
            cache = next(v for k, v in out.items() if k in ("cache", "past_key_values"))
            logits = out.logits[0, -(len(draft) + 1):].float()
            step_lp = torch.log_softmax(logits, dim=-1)
            best = logits.argmax(dim=-1).tolist()
            n = 0
            while n < len(draft) and best[n] == draft[n]:
                n += 1
            if draft:
                span = min(self.prompt_lookup, span + 2) if n == len(draft) else max(1, span - 1)
            for j, t in enumerate(best[: n + 1]):  # the accepted drafts, then the model's next token
                tokens.append(t)
                logprobs.append(float(step_lp[j, t]))
                if t == eos:
                    break
            if tokens[-1] == eos:
                break
            seq.extend(best[: n + 1])
            if len(draft) > n:  # negative: remove that many tokens (transformers 5; 4.x read it alike)
                cache.crop(-(len(draft) - n))
            feed = [best[n]]  # not in the cache yet
        self._bump(lookup_passes=passes, lookup_tokens=len(tokens))
        self._last_answer[adapter] = tokens
        return tokens, logprobs

    def _lookup_decode_batch(self, model: Any, ids_rows: list[list[int]], prefix: _Prefix | None,
                             adapter: str | None, max_new_tokens: int, *, keys: list[Any] | None = None,
                             join: Any = None) -> Any:
        """:meth:`_lookup_decode` for several prompts at once: each answer and the raw log-prob of each of its
        tokens are those of plain greedy decoding of that prompt alone (up to float rounding).

        The rows share one key/value cache (the prefix's, repeated per row). Each pass feeds every row its
        tokens not yet in the cache (the left-padded rest of the prompt, then its pending token) plus its
        drafts, right-padded to the widest row. A 2D attention mask over cache + new columns keeps, per
        row, only that row's own tokens: padding and rejected drafts stay in the cache as holes (cropping
        would cut every row's columns), and explicit position ids count only the row's tokens, so every
        row sees the sequence it would see alone. Trailing columns that are holes in every
        row are cropped, and finished rows (end-of-sequence or ``max_new_tokens``) leave the batch.

        Draft length: each row keeps its own span, adapted as in :meth:`_lookup_decode` (rows of one batch
        copy from their requests at different rates). The widest row sets the pass width and the others
        fill the rest of it with more of the same copied span: those columns are computed anyway. A batch of
        more than ``LOOKUP_BATCH_ROWS`` rows drafts nothing (its passes are compute-bound already).

        Continuous batching (``keys`` and ``join``, from a batch worker): before each pass, ``join(room,
        prefix)`` hands over later calls (:meth:`_admit`); each is encoded on its own on top of the prefix
        (:meth:`_join_row`) and its key/value rows are added to the batch's cache, holes between. Every row is
        answered as soon as it is complete (:meth:`_deliver` with its key), and the initial rows' answers are
        returned as :class:`Generation`. Without ``keys``, returns per row its new tokens (up to
        end-of-sequence included) and their log-probs."""
        import torch

        tok = self._tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        device = self.device_
        n_rows = len(ids_rows)
        skip = len(prefix.ids) if prefix is not None else 0
        started = time.perf_counter()
        cache: Any = None
        if prefix is not None:
            cache = copy.deepcopy(prefix.cache)
            if n_rows > 1:
                cache.batch_repeat_interleave(n_rows)
        # Which cache columns each batch row may attend to (rows in the order of ``active``).
        valid = torch.ones(n_rows, skip, dtype=torch.bool, device=device)
        last = self._last_answer.get(adapter, [])
        rows = [_Row(feed=list(row[skip:]), position=skip, seq=last + list(row), regions=(len(last), len(last) + len(row)),
                     span=min(LOOKUP_START, self.prompt_lookup), limit=max_new_tokens,
                     key=None if keys is None else keys[i], started=started, share=n_rows)
                for i, row in enumerate(ids_rows)]
        active = list(rows) if max_new_tokens > 0 else []
        passes = 0
        longest = [0]

        def finish(row: _Row) -> None:
            self._bump(lookup_batch_tokens=len(row.tokens))
            if row.tokens and len(row.tokens) >= longest[0]:  # the batch's longest answer: the most of the node's
                longest[0] = len(row.tokens)                   # fixed answer parts to draft from
                self._last_answer[adapter] = row.tokens
            if row.key is not None:
                row.generation = self._row_generation(row)
                self._deliver(row.key, row.generation)

        if not active:
            for row in rows:
                finish(row)
        while active:
            if join is not None and cache is not None and len(active) < self.batch_size and _joinable(cache):
                for ids, limit, key in join(self.batch_size - len(active), prefix, model):
                    previous = self._last_answer.get(adapter, [])
                    row = _Row(feed=[], position=0, seq=previous + list(ids),
                               regions=(len(previous), len(previous) + len(ids)),
                               span=min(LOOKUP_START, self.prompt_lookup), limit=limit, key=key,
                               started=time.perf_counter())
                    if limit > 0:
                        valid = self._join_row(model, ids, prefix, row, cache, valid)
                    if row.feed:
                        active.append(row)
                    else:  # done in its own pass
                        finish(row)
            drafting = self.prompt_lookup > 0 and len(active) <= LOOKUP_BATCH_ROWS
            caps = [r.limit - len(r.tokens) - 1 for r in active]
            own = [_lookup_draft(r.seq, r.span, regions=r.regions)[: max(cap, 0)] if drafting else []
                   for r, cap in zip(active, caps)]
            n_draft = max(len(d) for d in own)
            drafts = [_lookup_draft(r.seq, n_draft, regions=r.regions)[: max(cap, 0)] if len(d) < n_draft else d
                      for r, d, cap in zip(active, own, caps)]
            n_feed = max(len(r.feed) for r in active)
            # Row layout: [left pad | feed | drafts | right pad]; every row's last feed token is at column
            # n_feed - 1, so the logits to check are the last n_draft + 1 columns for all rows.
            inputs: list[list[int]] = []
            new_valid: list[list[bool]] = []
            pos: list[list[int]] = []
            for r, d in zip(active, drafts):
                lead, tail, mine = n_feed - len(r.feed), n_draft - len(d), len(r.feed) + len(d)
                inputs.append([pad] * lead + r.feed + d + [pad] * tail)
                new_valid.append([False] * lead + [True] * mine + [False] * tail)
                pos.append([0] * lead + list(range(r.position, r.position + mine)) + [0] * tail)
            new = torch.tensor(new_valid, dtype=torch.bool, device=device)
            kwargs: dict[str, Any] = {} if cache is None else {_cache_kwarg(): cache}
            if len(active) > 1 or not bool(valid.all()):
                kwargs.update(attention_mask=torch.cat([valid, new], dim=1).long(),
                              position_ids=torch.tensor(pos, device=device))
            # else one row without holes: no mask, the positions follow the cache (as in _lookup_decode)
            out = model(input_ids=torch.tensor(inputs, device=device), use_cache=True, logits_to_keep=n_draft + 1,
                        **kwargs)
            passes += 1
            cache = next(v for k, v in out.items() if k in ("cache", "past_key_values"))
            logits = out.logits[:, -(n_draft + 1):].float()
            step_lp = torch.log_softmax(logits, dim=-1)
            best = logits.argmax(dim=-1).tolist()
            keep: list[int] = []
            for b, (r, d) in enumerate(zip(active, drafts)):
                n = 0
                while n < len(d) and best[b][n] == d[n]:
                    n += 1
                if own[b]:  # adapted on the row's own span only: the filled columns were free
                    r.span = min(self.prompt_lookup, r.span + 2) if n >= len(own[b]) else max(1, r.span - 1)
                for j, t in enumerate(best[b][: n + 1]):  # the accepted drafts, then the model's next token
                    r.tokens.append(t)
                    r.logprobs.append(float(step_lp[b, j, t]))
                    if t == eos:
                        break
                new[b, n_feed + n : n_feed + len(d)] = False  # rejected drafts: holes from now on
                if r.tokens[-1] == eos or len(r.tokens) >= r.limit:
                    finish(r)
                    continue
                keep.append(b)
                r.seq.extend(best[b][: n + 1])
                r.position += len(r.feed) + n
                r.feed = [best[b][n]]
            valid = torch.cat([valid, new], dim=1)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                valid = valid[index]
                active = [active[b] for b in keep]
            alive = valid.any(dim=0)
            used = alive.nonzero()
            width = int(used[-1]) + 1 if len(used) else 0
            if width < valid.shape[1]:  # holes in every row at the end: gone (negative = tokens to remove)
                cache.crop(-(valid.shape[1] - width))
                valid, alive = valid[:, :width], alive[:width]
            if join is not None and len(used) < 0.75 * width and _joinable(cache):
                # A batch that takes later calls in never drains: the columns of rows gone and of rejected
                # drafts would pile up; a column that is a hole in every row is dropped (positions are explicit).
                index = used.squeeze(1)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
                valid = valid[:, index]
                self._bump(compactions=1)
        self._bump(lookup_batches=1, lookup_batch_passes=passes)
        if keys is not None:
            return [r.generation or self._row_generation(r) for r in rows]
        return [(r.tokens, r.logprobs) for r in rows]

    def _row_generation(self, row: _Row) -> Generation:
        """A decoded row's answer; its latency is its own time in the batch, amortised over the rows it started
        with."""
        import torch

        latency = (time.perf_counter() - row.started) * 1000 / max(row.share, 1)
        return self._generation(row.tokens, torch.tensor(row.logprobs or [0.0]), latency)

    def _join_row(self, model: Any, ids: list[int], prefix: _Prefix | None, row: _Row, cache: Any, valid: Any) -> Any:
        """Continuous batching: encode a later call's prompt on its own (on top of the batch's ``prefix``), take
        its first token, and add its key/value rows to the batch's ``cache`` (in place): the prefix columns,
        then its own tokens in the last columns, holes between (columns of holes are inserted after the prefix
        for every row when its prompt is longer than the batch's cache). Returns the attention-mask rows of
        the batch with its row added. ``row.feed`` stays empty when its first token already ends it."""
        import torch

        skip = len(prefix.ids) if prefix is not None else 0
        rest = list(ids[skip:])
        kwargs: dict[str, Any] = {} if prefix is None else {_cache_kwarg(): copy.deepcopy(prefix.cache)}
        out = self._forward_rest(model, rest, kwargs)
        mine = next(v for k, v in out.items() if k in ("cache", "past_key_values"))
        logits = out.logits[0, -1].float()
        t = int(logits.argmax())
        row.tokens.append(t)
        row.logprobs.append(float(torch.log_softmax(logits, dim=-1)[t]))
        self._bump(prompt_tokens=len(rest), reused_tokens=skip, joined_rows=1)
        if t == self._tokenizer.eos_token_id or len(row.tokens) >= row.limit:
            return valid
        gap = len(rest) - (valid.shape[1] - skip)
        if gap > 0:  # room for its tokens: hole columns right after the prefix, in every row
            for layer in cache.layers:
                for name in ("keys", "values"):
                    t_ = getattr(layer, name)
                    holes = t_.new_zeros((*t_.shape[:2], gap, t_.shape[3]))
                    setattr(layer, name, torch.cat([t_[:, :, :skip], holes, t_[:, :, skip:]], dim=2))
            valid = torch.cat([valid[:, :skip], valid.new_zeros((valid.shape[0], gap)), valid[:, skip:]], dim=1)
        width = valid.shape[1]
        for layer, own in zip(cache.layers, mine.layers):
            for name in ("keys", "values"):
                batch_t, own_t = getattr(layer, name), getattr(own, name)
                added = batch_t.new_zeros((1, *batch_t.shape[1:]))
                added[:, :, :skip] = own_t[:, :, :skip]
                added[:, :, width - len(rest):] = own_t[:, :, skip:]
                setattr(layer, name, torch.cat([batch_t, added], dim=0))
        mask = valid.new_zeros((1, width))
        mask[0, :skip] = True
        mask[0, width - len(rest):] = True
        row.seq.append(t)
        row.position = len(ids)
        row.feed = [t]
        return torch.cat([valid, mask], dim=0)

    def _forward_rest(self, model: Any, rest: list[int], kwargs: dict[str, Any]) -> Any:
        """One forward pass of a joining row's own prompt tokens (a seam for tests)."""
        import torch

        return model(input_ids=torch.tensor([rest], device=self.device_), use_cache=True, logits_to_keep=1, **kwargs)

    def _bump(self, **counts: int) -> None:
        """Adds ``counts`` to :attr:`stats`."""
        with self._stats_lock:
            for key, n in counts.items():
                self.stats[key] += n

    def prompt_tokens(self, request: ChatRequest) -> int:
        """Tokens of ``request`` rendered as the specialists see it (chat template, generation prompt).
        Uses a copy of the tokenizer, so that it never waits for a running generation."""
        from aad_core.models.chat_format import prompt_text

        with self._count_lock:
            if self._count_tokenizer is None:
                self._count_tokenizer = copy.deepcopy(self.tokenizer)
            tok = self._count_tokenizer
            return len(tok(prompt_text(tok, request), add_special_tokens=False)["input_ids"])


class AdapterPredictor(Predictor):
    """One adapter of a :class:`SpecialistRuntime` as a :class:`~aad_core.plugins.components.Predictor`
    (a kind "lora" specialist served on its own; the pool shares one runtime among adapters instead)."""

    def __init__(self, runtime: SpecialistRuntime, adapter: str) -> None:
        self.runtime = runtime
        self.adapter = adapter

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 128) -> list[Generation]:
        return self.runtime.generate(requests, adapter=self.adapter, max_new_tokens=max_new_tokens)


@functools.lru_cache(maxsize=1)
def _cache_kwarg() -> str:
    """The name models take a key/value cache by: ``cache`` (newer transformers 5), else ``past_key_values``."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _lookup_draft(seq: list[int], k: int, max_ngram: int = LOOKUP_NGRAM, regions: tuple[int, int] = (0, 0)) -> list[int]:
    """Up to ``k`` tokens that followed an earlier occurrence of the last n tokens of ``seq`` (the longest
    n <= ``max_ngram`` that occurs), or none.

    ``regions`` = (end of the previous answer, end of the prompt): ``seq`` is the adapter's previous answer,
    the prompt, then the answer so far. Among occurrences of the same n-gram, one in the answer so far comes
    first, then one in the previous answer (the fixed parts of a node's answers: JSON keys, punctuation, the
    end), then one in the prompt; the latest first within each. A draft from the previous answer stops at
    its end. The default (0, 0) takes the most recent occurrence anywhere."""
    end = len(seq)
    if end < 2:
        return []
    answer_end, prompt_end = regions
    last = seq[-1]
    ends = [i for i in range(end - 2, -1, -1) if seq[i] == last]  # earlier occurrences of the last token
    ranked = ([i for i in ends if i >= prompt_end] + [i for i in ends if i < answer_end]
              + [i for i in ends if answer_end <= i < prompt_end])
    for n in range(min(max_ngram, end - 1), 0, -1):
        tail = seq[end - n:]
        for i in ranked:
            stop = answer_end if i < answer_end else end
            if i >= n - 1 and i + 1 < stop and seq[i - n + 1 : i + 1] == tail:  # (nothing after it: try the next)
                return seq[i + 1 : min(i + 1 + k, stop)]
    return []


#: Runtimes whose batch workers were started: their workers end at interpreter exit.
_LIVE_RUNTIMES: weakref.WeakSet[SpecialistRuntime] = weakref.WeakSet()


@atexit.register
def _stop_batch_workers() -> None:
    for runtime in list(_LIVE_RUNTIMES):
        with contextlib.suppress(Exception):
            runtime._stop_workers()


def _joinable(cache: Any) -> bool:
    """Whether rows can be added to ``cache`` (continuous batching): a dynamic cache of plain key/value layers."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
                                and layer.keys.dim() == 4 for layer in layers)


def _plain_greedy(model: Any) -> bool:
    """Whether greedy ``generate()`` of ``model`` picks the raw argmax: its generation config adds no
    logits processor (a repetition penalty, banned words, ...), so that :meth:`SpecialistRuntime._lookup_decode`
    answers as it does."""
    cfg = getattr(model, "generation_config", None)
    neutral = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "min_length": 0, "min_new_tokens": 0, "bad_words_ids": None, "sequence_bias": None,
               "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
               "forced_eos_token_id": None, "exponential_decay_length_penalty": None}
    return cfg is None or all(getattr(cfg, k, None) in (None, v) for k, v in neutral.items())


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


def _int8_linears(model: Any, *, lm_head: bool = True, bf16_from_rows: int = 0, int4_group: int = 0) -> Any:
    """Store every ``nn.Linear`` of ``model`` (in place; the output layer too with ``lm_head``) as int8
    weights with one scale per output channel, multiplied by bfloat16 activations and returned as
    float32 (``torch.ops.aten._weight_int8pack_mm``; the residual stream, norms and attention stay
    float32). A tied output layer gets its own int8 copy and the input embeddings stay float32. Weight-only:
    a row's result does not depend on the other rows of its batch (unless ``bf16_from_rows`` > 0 sends wide
    matmuls to a bfloat16 copy of the weights: then it depends on how wide its pass is), whereas per-tensor dynamic activation
    quantization (``torch.ao.quantization.quantize_dynamic``) does, and changed 9 of 12 held-out answers of
    a demo specialist on SmolLM2-135M (this: 12 of 12 identical). With ``int4_group`` > 0, each layer but the
    output layer whose
    inputs divide into such groups also keeps int4 codes of its weights (asymmetric, one scale and zero point
    per group of ``int4_group`` inputs of an output channel, from the float32 weights), which answer the products
    narrower than ``bf16_from_rows`` rows, every product with 0 (``torch.ops.aten._weight_int4pack_mm_for_cpu``;
    also row by row).
    Where the int8 kernel is missing, the layers stay float32 (the "merged" path)."""
    import torch

    if not _int8_supported():
        return model
    linear = _int8_linear_class()
    output = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (lm_head or child is not output):
                # the output layer stays int8: its int4 codes changed 2 of 48 extraction answers, int8 none
                setattr(parent, name, linear(child, bf16_from_rows, 0 if child is output else int4_group))
    return model


@functools.lru_cache(maxsize=1)
def _int8_supported() -> bool:
    """Whether this torch build has the CPU int8 weight-only matmul kernel."""
    import torch

    try:
        a = torch.ones(2, 32, dtype=torch.bfloat16)
        w = torch.ones(8, 32, dtype=torch.int8)
        return bool(torch.ops.aten._weight_int8pack_mm(a, w, torch.ones(8, dtype=torch.bfloat16)).shape == (2, 8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=1)
def _int4_supported() -> bool:
    """Whether this torch build has the CPU int4 weight-only matmul kernels (``fast_path="int4"``; else int8)."""
    import torch

    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 2)
        scales = torch.ones(64 // INT4_GROUP, 16, 2, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(2, 64, dtype=torch.bfloat16), packed, INT4_GROUP, scales)
        return bool(out.shape == (2, 16))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _int4_codes(w: Any, group: int) -> tuple[Any, Any]:
    """Packed int4 codes of float weights ``w`` (out, in) and their (in / group, out, 2) bfloat16 scales and
    zero points, as ``_weight_int4pack_mm_for_cpu`` reads them (a code q stands for (q - 8) * scale + zero)."""
    import torch

    n, k = w.shape
    grouped = w.float().reshape(n, k // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = torch.clamp(torch.round((grouped - low) / scale), 0, 15).to(torch.int32).reshape(n, k)
    scales = torch.stack([scale.squeeze(-1), (low + 8 * scale).squeeze(-1)], dim=-1).transpose(0, 1)
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2),
            scales.contiguous().to(torch.bfloat16))


@functools.lru_cache(maxsize=1)
def _int8_linear_class() -> type:
    """``Int8Linear`` (defined on first use: ``import aad_core`` does not import torch)."""
    import torch

    class Int8Linear(torch.nn.Module):
        """A Linear layer with int8 weights (symmetric, per output channel) and float activations; optionally
        int4 codes for narrow products and a bfloat16 copy for wide ones (see :func:`_int8_linears`)."""

        def __init__(self, linear: torch.nn.Linear, bf16_from_rows: int = 0, int4_group: int = 0) -> None:
            super().__init__()
            w = linear.weight.detach().float()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
                                 .contiguous())
            self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
            # Wide matmuls (a prompt's encoding, wide batches): the int8 kernel reads every weight again for each
            # row, oneDNN's bfloat16 kernel reuses it across rows (34 rows x 1536 x 576: 440 vs 239 us on 2 cores).
            self.bf16_from_rows = bf16_from_rows
            self.register_buffer("weight_bf16", w.to(torch.bfloat16).contiguous() if bf16_from_rows > 0 else None)
            # (the kernel packs output channels in blocks of 16; the inputs in groups)
            fits = int4_group > 0 and self.in_features % int4_group == 0 and self.out_features % 16 == 0
            self.int4_group = int4_group if fits else 0
            packed, scales = _int4_codes(w, self.int4_group) if self.int4_group else (None, None)
            self.register_buffer("weight_int4", packed)
            self.register_buffer("int4_scales", scales)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = weight_only_product(self, flat).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"
                    + (f", int4 codes (groups of {self.int4_group})" if self.int4_group else ""))

    return Int8Linear
