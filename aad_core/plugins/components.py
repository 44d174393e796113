"""Small base classes for the component kinds plugins register.

Conventions (scikit-learn's): ``__init__`` only stores its parameters; anything learned or
loaded ends in ``_``; heavy libraries (torch, transformers, sentence-transformers) are imported
inside methods, never at module import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import ChatRequest, RoutingDecision, Trace


class Component:
    """Shared helpers: ``get_params`` returns the constructor's parameters (for manifests)."""

    def get_params(self) -> dict[str, Any]:
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name in sig.parameters
            if name != "self" and hasattr(self, name)
        }


class Redactor(Component, ABC):
    """S2: removes personal data from traces before they are stored or trained on."""

    @abstractmethod
    def redact(self, traces: Sequence[Trace]) -> list[Trace]:
        """Return redacted copies (``redacted=True``); the same value maps to the same placeholder
        everywhere in one trace."""


class Embedder(Component, ABC):
    """S3: texts to L2-normalised vectors."""

    @abstractmethod
    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Return an array of shape ``(len(texts), dim)`` with unit-norm rows."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """A stable identifier of the model (cache key)."""


class Clusterer(Component, ABC):
    """S3: groups embeddings. After :meth:`fit`: ``labels_`` (n,), ``centroids_`` (k, dim)."""

    labels_: np.ndarray
    centroids_: np.ndarray

    @abstractmethod
    def fit(self, embeddings: np.ndarray) -> Clusterer: ...


class Scorer(Component, ABC):
    """S5: how much a sample would teach the student. Higher = more worth training on."""

    @abstractmethod
    def score(self, traces: Sequence[Trace], *, show_progress: bool = False) -> list[dict[str, float]]:
        """One dict per trace with ``"score"`` and its components (e.g. ``kl``, ``entropy``)."""


class Selector(Component, ABC):
    """S5: picks the training subset of one cluster."""

    @abstractmethod
    def select(
        self,
        ids: Sequence[str],
        scores: Sequence[float],
        fraction: float,
        *,
        embeddings: np.ndarray | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Return the chosen ids (``ceil(fraction * len(ids))`` of them, at least one)."""


class Trainer(Component, ABC):
    """S5: fits one specialist adapter on one cluster's selected traces."""

    @abstractmethod
    def train(
        self,
        train: Sequence[Trace],
        eval: Sequence[Trace],
        output_dir: Path,
        *,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        """Train, save a PEFT adapter in ``output_dir``, return metrics."""


class Evaluator(Component, ABC):
    """Scores predictions against references (the teacher's answers)."""

    #: Short name of the task metric reported as ``score``.
    metric: str = "score"

    @abstractmethod
    def evaluate(
        self, predictions: Sequence[str], references: Sequence[str], **context: Any
    ) -> dict[str, Any]:
        """Return ``{"score": float in [0, 1], "n": int, ...}``."""


class Router(Component, ABC):
    """S6: decides, per request, specialist or teacher."""

    @abstractmethod
    def route(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]: ...
