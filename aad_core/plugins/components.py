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

    from aad_core.models.runtime import Generation
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
    """S5: picks the training subset of one cluster.

    Class attributes tell the select stage what to compute first: ``needs_scores`` (default True:
    the scorer's per-trace scores, a forward pass of the student per trace; False: ``scores`` are
    zeros and the scorer never runs), ``needs_embeddings`` and ``needs_answers`` (default False:
    ``embeddings=`` / ``answers=`` keywords)."""

    needs_scores: bool = True
    needs_embeddings: bool = False
    needs_answers: bool = False

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


class Predictor(ABC):
    """A trained specialist that answers requests: what a :class:`Trainer` of a kind other than
    ``"lora"`` returns from :meth:`Trainer.load_predictor`."""

    @abstractmethod
    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int) -> list[Generation]:
        """One :class:`aad_core.models.runtime.Generation` per request, in order: ``text`` (the answer as the
        teacher would write it; tool calls as a JSON list), ``mean_logprob``, ``n_tokens``, ``latency_ms``
        and, where the kind has one, ``confidence`` (e.g. a classifier's top probability)."""


#: ``Trainer.train`` metrics key: ids of the held-out calls (calibration part) the specialist was fitted on.
HELDOUT_TRAINED_ON = "heldout_trained_on"


class Trainer(Component, ABC):
    """S5: a specialist kind. Fits one specialist on one task's traces, and serves what it trained.

    ``kind`` names what it trains (``"lora"``: a PEFT adapter on the shared base student, served by
    aad's multi-adapter runtime; any other kind serves through :meth:`load_predictor`).
    :meth:`applies_to` says whether the kind fits a task; the train stage tries the configured
    trainers in order and trains the first that fits.
    """

    #: What the trainer produces: "lora" (a PEFT adapter on the base student), "classifier", ...
    kind: str = "lora"
    #: True: train on the task's selected traces (``aad select``); False: on its whole training split
    #: (for kinds whose cost hardly grows with the data, such as a classifier on embeddings).
    uses_selection: bool = True

    @abstractmethod
    def train(
        self,
        train: Sequence[Trace],
        eval: Sequence[Trace],
        output_dir: Path,
        *,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        """Train, save the specialist in ``output_dir`` (kind "lora": a PEFT adapter), return metrics.

        ``eval`` is the calibration part of the task's held-out calls (early stopping, vote weights); the
        gate's test part is never given. Two metrics keys feed the gate: ``"calibration"``
        (``{"signal", "source", "confidence": [...], "agreement": [...]}``: pairs the gate chooses the
        serving threshold on instead of the calibration part) and :data:`HELDOUT_TRAINED_ON` (the ids of
        the ``eval`` calls the specialist was fitted on, which the evaluation then leaves out)."""

    def applies_to(self, train: Sequence[Trace]) -> tuple[bool, str]:
        """Whether this kind fits the task whose training traces are ``train``, and why (shown to users)."""
        return True, f"the {self.kind} kind fits every task"

    def load_predictor(self, specialist_dir: Path) -> Predictor:
        """The specialist saved in ``specialist_dir`` (a version folder of the registry), ready to answer.

        Kind "lora" specialists are served by aad's shared-base runtime instead, so a LoRA trainer
        need not implement this; every other kind must.
        """
        raise NotImplementedError(
            f"{type(self).__name__} (kind {self.kind!r}) does not implement load_predictor(); a specialist kind "
            "other than 'lora' must, so that aad can serve what it trained."
        )


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
