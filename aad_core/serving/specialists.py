"""The specialists the engine serves: what it needs from them (:class:`SpecialistBackend`) and the
default backend, a :class:`SpecialistPool` of the workspace's promoted specialists."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Specialist

if TYPE_CHECKING:
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

#: Seconds a specialist stays disabled after its circuit breaker opened (then one request tries it again).
RETRY_AFTER_S = 60.0
#: Consecutive generation errors that open a specialist's breaker (a load error opens it at once).
ERRORS_TO_OPEN = 3


class SpecialistUnavailable(AADError):
    """The specialist is disabled for a while (its circuit breaker is open): the request goes to the teacher."""


class _Breaker:
    """One specialist's circuit breaker: closed (serving), open (every request goes to the teacher at once,
    without touching the broken artifact) until ``retry_after_s`` passed, then half-open (one request
    tries it: success closes it, a failure opens it again). A load error opens it at once; generation
    errors after :data:`ERRORS_TO_OPEN` in a row. Each opening is logged once, with the cause."""

    def __init__(self, name: str, retry_after_s: float) -> None:
        self.name = name
        self.retry_after_s = retry_after_s
        self.errors = 0
        self.open_until = 0.0
        self.cause = ""
        self.openings = 0
        self.trying = False  # half-open: one request is trying the specialist

    def blocked(self) -> str:
        """Why the specialist must not be tried now ("" = it may be); changes nothing."""
        if not self.open_until:
            return ""
        left = self.open_until - time.monotonic()
        if left > 0:
            return f"specialist disabled after {self.cause} (retry in {left:.0f} s)"
        return f"specialist disabled after {self.cause} (a retry is under way)" if self.trying else ""

    def check(self) -> str:
        """:meth:`blocked`, and when the cool-down is over, this caller is the one request that retries."""
        why = self.blocked()
        if not why and self.open_until:
            self.trying = True
        return why

    def success(self) -> None:
        if self.open_until:
            log.warning("specialist %s answers again: circuit breaker closed", self.name)
        self.errors, self.open_until, self.trying = 0, 0.0, False

    def failure(self, err: BaseException, *, loading: bool) -> None:
        self.errors += 1
        self.trying = False
        if not (loading or self.errors >= ERRORS_TO_OPEN or self.open_until):
            return
        self.cause = f"{'a load error' if loading else f'{self.errors} errors'} ({type(err).__name__})"
        self.open_until = time.monotonic() + self.retry_after_s
        self.openings += 1
        log.error("specialist %s disabled for %.0f s (its requests go to the teacher), after %s: %s",
                  self.name, self.retry_after_s, self.cause, err, exc_info=self.openings == 1)


class GenerationLike(Protocol):
    text: str
    mean_logprob: float
    n_tokens: int
    latency_ms: float


class SpecialistBackend(Protocol):
    """What the engine needs from the specialists: batched generation by adapter name."""

    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]: ...


# Optional, looked up with getattr (a backend without them still works):
#   prompt_too_long(name, request) -> str: why the request is too long for the specialist ("" = it fits);
#   preload() -> None: load and warm every specialist now;
#   prompt_tokens(name, request) -> int | None: the prompt's tokens for that specialist (``aad serve``'s usage).


def trained_max_length(spec: Specialist) -> int | None:
    """The prompt + answer tokens ``spec`` was trained on (``[train] max_length`` when it was trained, from its
    manifest's hyperparameters); None when the manifest does not say."""
    value: Any = None
    try:
        manifest = json.loads((Path(spec.path) / "manifest.json").read_text(encoding="utf-8"))
        value = (manifest.get("hyperparameters") or {}).get("max_length")
    except (OSError, ValueError):
        pass
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


class SpecialistPool:
    """Promoted specialists, each served by its kind. Kind "lora": one
    :class:`~aad_core.models.runtime.SpecialistRuntime` per base model, every adapter of that base
    loaded into it (PEFT multi-adapter), with prefix reuse, micro-batching, each adapter's fast copy and
    prompt-lookup decoding and parallel micro-batches as ``[route] prefix_cache``, ``[route] batch_window_ms``,
    ``[route] fast_path``, ``[route] prompt_lookup_tokens``, ``[route] parallel_batches`` and ``[route] bf16_from_rows`` say. Any other kind: the predictor its trainer component loads
    (``Trainer.load_predictor``, see :func:`aad_core.specialists.load_predictor`).

    ``retry_after_s``: how long a specialist whose artifact does not load (or that fails
    :data:`ERRORS_TO_OPEN` times in a row) stays disabled before one request tries it again; meanwhile its
    requests go to the teacher at once (:class:`SpecialistUnavailable`), and the other specialists serve on.
    """

    def __init__(self, ws: Workspace | None, specialists: Sequence[Specialist], *, merge_hot: str | None = None,
                 runtime_options: dict[str, Any] | None = None, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.ws = ws
        self.retry_after_s = retry_after_s
        self._breakers: dict[str, _Breaker] = {}
        self.specialists = {s.name: s for s in specialists}
        self.merge_hot = merge_hot
        if runtime_options is None and ws is not None:
            route = ws.config.route
            runtime_options = {"prefix_cache": route.prefix_cache, "batch_window_ms": route.batch_window_ms,
                               "fast_path": route.fast_path, "prompt_lookup": route.prompt_lookup_tokens,
                               "parallel_batches": route.parallel_batches, "bf16_from_rows": route.bf16_from_rows}
        #: Keyword arguments of every :class:`~aad_core.models.runtime.SpecialistRuntime` the pool builds.
        self.runtime_options = dict(runtime_options or {})
        self._runtimes: dict[str, Any] = {}
        self._predictors: dict[str, Any] = {}
        self._max_lengths: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def _spec(self, name: str) -> Specialist:
        spec = self.specialists.get(name)
        if spec is None:
            raise AADError(f"No promoted specialist named {name!r}.", hint="Run 'aad specialists' to list them.")
        return spec

    def _runtime(self, name: str) -> Any:
        spec = self._spec(name)
        with self._lock:
            rt = self._runtimes.get(spec.base_model)
            if rt is None:
                from aad_core.models.runtime import SpecialistRuntime

                rt = SpecialistRuntime(spec.base_model, **self.runtime_options)
                for s in self.specialists.values():
                    if s.base_model == spec.base_model and s.kind == "lora":
                        try:
                            rt.add_specialist(s)
                        except Exception as err:  # a broken adapter disables itself, not the others on its base
                            breaker = self._breakers.setdefault(s.name, _Breaker(s.name, self.retry_after_s))
                            breaker.failure(err, loading=True)
                self._runtimes[spec.base_model] = rt
            if name not in rt.adapters:  # left out above (broken), or its retry after the cool-down
                rt.add_specialist(spec)
            return rt

    def _predictor(self, spec: Specialist) -> Any:
        with self._lock:
            predictor = self._predictors.get(spec.name)
            if predictor is None:
                from aad_core.specialists import load_predictor

                predictor = self._predictors[spec.name] = load_predictor(spec, self.ws)
            return predictor

    def _breaker(self, name: str) -> _Breaker:
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                breaker = self._breakers[name] = _Breaker(name, self.retry_after_s)
            return breaker

    def unavailable(self, name: str) -> str:
        """Why specialist ``name`` is disabled right now ("" when it may be tried)."""
        breaker = self._breakers.get(name)
        return breaker.blocked() if breaker is not None else ""

    def _guarded(self, name: str, load: Callable[[], Any], use: Callable[[Any], Any]) -> Any:
        """``use(load())`` behind ``name``'s circuit breaker."""
        breaker = self._breaker(name)
        with self._lock:
            why = breaker.check()
        if why:
            raise SpecialistUnavailable(f"{name}: {why}", hint="The server log names the cause.")
        settled = False
        try:
            try:
                model = load()
            except Exception as err:
                with self._lock:
                    breaker.failure(err, loading=True)
                settled = True
                raise
            try:
                out = use(model)
            except Exception as err:
                with self._lock:
                    breaker.failure(err, loading=False)
                settled = True
                raise
            with self._lock:
                breaker.success()
            settled = True
            return out
        finally:
            if not settled:  # interrupted (KeyboardInterrupt, ...): a later request may retry
                breaker.trying = False

    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]:
        spec = self._spec(name)
        if spec.kind != "lora":
            return self._guarded(name, lambda: self._predictor(spec),
                                 lambda p: p.generate(requests, max_new_tokens=max_new_tokens))

        def loaded_runtime() -> Any:
            rt = self._runtime(name)
            if not rt.loaded:
                rt.load()  # a broken base model or adapter raises here: a load error
            return rt

        return self._guarded(name, loaded_runtime,
                             lambda rt: rt.generate(requests, adapter=name, max_new_tokens=max_new_tokens))

    def preload(self) -> None:
        """Load every specialist now (a LoRA runtime warms up with one dummy generation), so that the
        first request is not the cold one. A specialist that cannot load is disabled by its circuit
        breaker (logged once); the others still load."""
        for spec in self.specialists.values():
            try:
                if spec.kind == "lora":
                    self._runtime(spec.name).load()
                else:
                    self._predictor(spec)
            except Exception as err:
                breaker = self._breaker(spec.name)
                with self._lock:
                    if not breaker.blocked():  # not opened already while its runtime was built
                        breaker.failure(err, loading=True)

    def max_length(self, name: str) -> int | None:
        """The prompt + answer tokens the specialist was trained on (``[train] max_length`` when it was
        trained, from its manifest's hyperparameters); None when the manifest does not say."""
        if name not in self._max_lengths:
            self._max_lengths[name] = trained_max_length(self._spec(name))
        return self._max_lengths[name]

    def prompt_tokens(self, name: str, request: ChatRequest) -> int | None:
        """Tokens of ``request``'s prompt as the LoRA specialist ``name`` sees it (its tokenizer and chat
        template); None for other kinds (``aad serve`` then estimates ``usage.prompt_tokens``)."""
        return self._runtime(name).prompt_tokens(request) if self._spec(name).kind == "lora" else None

    def prompt_too_long(self, name: str, request: ChatRequest) -> str:
        """Why ``request`` is too long for the LoRA specialist ``name`` ("" when it fits): a prompt longer
        than the tokens it was trained on was never seen in training, and holds the runtime for long."""
        spec = self._spec(name)
        why = self.unavailable(name)
        if why:  # to the teacher at once, without loading the broken artifact again
            return why
        limit = self.max_length(name) if spec.kind == "lora" else None
        if limit is None:
            return ""
        n = self._runtime(name).prompt_tokens(request)
        return f"prompt {n} tokens > specialist max_length {limit}" if n > limit else ""
