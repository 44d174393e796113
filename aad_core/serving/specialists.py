"""The specialists the engine serves: what it needs from them (:class:`SpecialistBackend`) and the
default backend, a :class:`SpecialistPool` of the workspace's promoted specialists."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Specialist

if TYPE_CHECKING:
    from aad_core.workspace import Workspace


class GenerationLike(Protocol):
    text: str
    mean_logprob: float
    n_tokens: int
    latency_ms: float


class SpecialistBackend(Protocol):
    """What the engine needs from the specialists: batched generation by adapter name."""

    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]: ...


class SpecialistPool:
    """Promoted specialists, each served by its kind. Kind "lora": one
    :class:`~aad_core.models.runtime.SpecialistRuntime` per base model, every adapter of that base
    loaded into it (PEFT multi-adapter). Any other kind: the predictor its trainer component loads
    (``Trainer.load_predictor``, see :func:`aad_core.specialists.load_predictor`)."""

    def __init__(self, ws: Workspace | None, specialists: Sequence[Specialist], *, merge_hot: str | None = None) -> None:
        self.ws = ws
        self.specialists = {s.name: s for s in specialists}
        self.merge_hot = merge_hot
        self._runtimes: dict[str, Any] = {}
        self._predictors: dict[str, Any] = {}
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

                rt = SpecialistRuntime(spec.base_model)
                for s in self.specialists.values():
                    if s.base_model == spec.base_model and s.kind == "lora":
                        rt.add_specialist(s)
                self._runtimes[spec.base_model] = rt
            return rt

    def _predictor(self, spec: Specialist) -> Any:
        with self._lock:
            predictor = self._predictors.get(spec.name)
            if predictor is None:
                from aad_core.specialists import load_predictor

                predictor = self._predictors[spec.name] = load_predictor(spec, self.ws)
            return predictor

    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]:
        spec = self._spec(name)
        if spec.kind != "lora":
            return self._predictor(spec).generate(requests, max_new_tokens=max_new_tokens)
        return self._runtime(name).generate(requests, adapter=name, max_new_tokens=max_new_tokens)
