"""A test plugin that implements every hook in aad_core/plugins/hookspecs.py with a tiny working
component or a recording observer. tests/test_hooks.py adds it with ``add_plugin`` and drives each
hook through aad's own code paths; its meta-test fails when a hookspec has no implementation here.

Every component is named ``hook-tester`` and built only from the public plugin API.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aad_core.plugins import (Clusterer, Embedder, Evaluator, Redactor, Register, Router, Scorer, Selector, Trainer,
                              hookimpl)
from aad_core.schema import ChatRequest, RoutingDecision, Specialist, Trace

NAME = "hook-tester"
DIM = 16

#: What the observers saw, by hook name (tests clear it).
SEEN: dict[str, list[Any]] = {"aad_trace_captured": [], "aad_specialist_trained": [], "aad_request_routed": []}


class TinyRedactor(Redactor):
    """Replaces the word 'secret' by a placeholder."""

    def __init__(self, **_params: Any) -> None:
        pass

    def redact(self, traces: Sequence[Trace]) -> list[Trace]:
        out = []
        for t in traces:
            data = json.loads(t.model_dump_json())
            text = json.dumps(data).replace("secret", "<SECRET_1>")
            out.append(Trace.model_validate({**json.loads(text), "redacted": True}))
        return out


class TinyEmbedder(Embedder):
    """Hashed bag of words, unit rows."""

    def __init__(self, **_params: Any) -> None:
        pass

    @property
    def model_id(self) -> str:
        return f"hook-tester-bow-{DIM}"

    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        out = np.full((len(texts), DIM), 0.05, dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[i, int(hashlib.sha1(word.encode()).hexdigest(), 16) % DIM] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class TinyClusterer(Clusterer):
    """Two clusters: the first row and the row least like it seed them; every row joins the nearer."""

    def __init__(self, **_params: Any) -> None:
        pass

    def fit(self, embeddings: np.ndarray) -> TinyClusterer:
        X = np.asarray(embeddings, dtype=np.float32)
        seeds = X[[0, int(np.argmin(X @ X[0]))]]
        self.labels_ = np.argmax(X @ seeds.T, axis=1).astype(np.int64)
        self.centroids_ = np.stack([X[self.labels_ == c].mean(axis=0) for c in (0, 1)])
        return self


class TinyScorer(Scorer):
    """Longer answers first."""

    def __init__(self, **_params: Any) -> None:
        pass

    def score(self, traces: Sequence[Trace], *, show_progress: bool = False) -> list[dict[str, float]]:
        return [{"score": float(len(t.answer_text().split()))} for t in traces]


class TinySelector(Selector):
    """The top ceil(fraction * n) ids by score."""

    def select(self, ids: Sequence[str], scores: Sequence[float], fraction: float, *,
               embeddings: np.ndarray | None = None, seed: int = 0) -> list[str]:
        order = sorted(range(len(ids)), key=lambda i: -scores[i])
        return [ids[i] for i in order[: max(1, math.ceil(fraction * len(ids)))]]


class TinyTrainer(Trainer):
    """Writes an empty 'adapter' and reports how many traces it saw."""

    def __init__(self, **params: Any) -> None:
        self.params = params

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "adapter_config.json").write_text("{}", encoding="utf-8")
        return {"n_train": len(train), "n_eval": len(eval)}


class TinyEvaluator(Evaluator):
    """Exact match."""

    metric = "exact"

    def evaluate(self, predictions: Sequence[str], references: Sequence[str], **context: Any) -> dict[str, Any]:
        hits = [p == r for p, r in zip(predictions, references)]
        return {"score": sum(hits) / len(hits) if hits else 0.0, "n": len(hits), "metric": self.metric}


class TinyRouter(Router):
    """Every request to the teacher."""

    def __init__(self, workspace: Any = None) -> None:
        self.workspace = workspace

    def route(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]:
        return [RoutingDecision(target="teacher", reason="hook-tester sends everything to the teacher")
                for _ in requests]


@hookimpl
def aad_register_redactors(register: Register) -> None:
    register(NAME, TinyRedactor, description=TinyRedactor.__doc__)


@hookimpl
def aad_register_embedders(register: Register) -> None:
    register(NAME, TinyEmbedder, description=TinyEmbedder.__doc__)


@hookimpl
def aad_register_clusterers(register: Register) -> None:
    register(NAME, TinyClusterer, description=TinyClusterer.__doc__)


@hookimpl
def aad_register_scorers(register: Register) -> None:
    register(NAME, TinyScorer, description=TinyScorer.__doc__)


@hookimpl
def aad_register_selectors(register: Register) -> None:
    register(NAME, TinySelector, description=TinySelector.__doc__)


@hookimpl
def aad_register_trainers(register: Register) -> None:
    register(NAME, TinyTrainer, description=TinyTrainer.__doc__)


@hookimpl
def aad_register_evaluators(register: Register) -> None:
    register(NAME, TinyEvaluator, description=TinyEvaluator.__doc__)


@hookimpl
def aad_register_routers(register: Register) -> None:
    register(NAME, TinyRouter, description=TinyRouter.__doc__)


@hookimpl
def aad_trace_captured(traces: list[Trace]) -> None:
    SEEN["aad_trace_captured"].append(list(traces))


@hookimpl
def aad_specialist_trained(specialist: Specialist) -> None:
    SEEN["aad_specialist_trained"].append(specialist)


@hookimpl
def aad_request_routed(decisions: list[RoutingDecision]) -> None:
    SEEN["aad_request_routed"].append(list(decisions))
