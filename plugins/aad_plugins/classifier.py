"""Trainer ``classifier``: the specialist kind for tasks whose answers come from a closed set.

It learns a logistic regression on the request vector the router already computes
(:func:`aad_core.models.embedding.embed_requests`: the workspace's ``[embed]`` embedder and view),
so serving costs one matrix product after routing (the embedding's part cache makes the second
embedding of a request free). Each distinct teacher answer is a class, out-of-scope answers ("none
of these", a refusal) included: they are just another class, and go back to the teacher through
the confidence gate like any other answer.

Measured on the demo's intent node (about 200 training / 40 held-out requests, all-MiniLM-L6-v2): logistic
regression 0.947 at C = 10 and 0.99 at the default C = 1000, against 0.792 for the LoRA specialist.

Files in the specialist's folder: ``classifier.npz`` (``coef``, ``intercept``, ``classes`` as
strings, ``embedder`` model id, ``view``, ``max_chars_per_part``; read with ``allow_pickle=False``)
and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError, param_error
from aad_core.formats.answers import answer_pairs
from aad_core.formats.kinds import output_kind
from aad_core.formats.labels import label_key
from aad_core.models.runtime import Generation
from aad_core.plugins import Predictor, Trainer, hookimpl

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import ChatRequest, Trace
    from aad_core.workspace import Workspace

FILE = "classifier.npz"
METRICS = "metrics.json"
FORMAT = 1


class ClassifierTrainer(Trainer):
    """A logistic regression over the routing embedding, one class per distinct teacher answer.

    Parameters
    ----------
    C : float
        Inverse regularisation strength of the logistic regression. Unit-norm MiniLM vectors need little
        regularisation: on Banking77 C = 1000 was as accurate as any (0.859) and calibrated (mean top
        probability 0.86), where C = 10 under-fits (0.846, 0.47); see docs/specialists.md.
    max_iter : int
        Iterations of the lbfgs solver.
    max_distinct_share : float
        A task whose answers are not labels (JSON, tool calls, text) fits when its distinct answers are at
        most this share of its training answers (a small fixed set); labels follow the 'label' output kind.
    calibration_folds : int
        Folds of the out-of-fold predictions on the training split that the risk-coverage gate chooses
        the confidence threshold on (every training call answered by a classifier fitted without it);
        fewer than 2 = none, and the gate calibrates on part of the held-out calls instead.
    seed : int
        Seed of the solver and of the folds.
    workspace : Workspace or None
        The workspace, for its ``[embed]`` embedder and view (the router's request vector).
    """

    kind = "classifier"
    uses_selection = False  # an embedding and a convex fit: the whole training split costs seconds

    def __init__(self, C: float = 1000.0, max_iter: int = 2000, max_distinct_share: float = 0.3,
                 calibration_folds: int = 5, seed: int = 0, workspace: Workspace | None = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.max_distinct_share = max_distinct_share
        self.calibration_folds = calibration_folds
        self.seed = seed
        self.workspace = workspace

    # -- which tasks -----------------------------------------------------------------------------
    def applies_to(self, train: Sequence[Trace]) -> tuple[bool, str]:
        answers = answer_pairs(train)
        n = len(answers)
        if n < 2:
            return False, f"too few recorded answers to learn from ({n})"
        kind = output_kind(answers)
        label = kind == "label"
        distinct = len({_class_key(text, label) for text, _ in answers})
        if label:
            return True, f"closed label set: {distinct} labels over {n} answers (output kind 'label')"
        if distinct <= max(2, self.max_distinct_share * n):
            return True, f"answers from a small fixed set: {distinct} distinct over {n} (output kind {kind!r})"
        return False, (f"free-form answers: {distinct} distinct over {n} (output kind {kind!r}, more than "
                       f"{self.max_distinct_share:.0%} distinct); a classifier only repeats answers it has seen")

    # -- training --------------------------------------------------------------------------------
    def _validate(self) -> None:
        owner = type(self).__name__
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise param_error("C", owner, "a float > 0", self.C)
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise param_error("max_iter", owner, "an int >= 1", self.max_iter)
        if not (0 < self.max_distinct_share <= 1):
            raise param_error("max_distinct_share", owner, "a float in (0, 1]", self.max_distinct_share)

    def _config(self) -> Any:
        if self.workspace is None:
            raise AADError("The classifier trainer needs a workspace: it embeds requests with the workspace's "
                           "[embed] embedder and view, as the router does.",
                           hint="Build it with build_component('trainer', 'classifier', config, workspace=ws).")
        return self.workspace.config

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        import numpy as np

        from aad_core.models.embedding import embed_requests, get_embedder

        self._validate()
        config = self._config()
        train = [t for t in train if t.response is not None]
        if not train:
            raise AADError("The classifier got no training trace with a recorded answer.",
                           hint="Run 'aad select' again, or check the task's traces.")
        label = output_kind(answer_pairs(train)) == "label"
        keys = [_class_key(text, label) for text, _ in answer_pairs(train)]
        spelling = _spellings(answer_pairs(train), label)
        started = time.perf_counter()
        cache = getattr(self.workspace, "cache_dir", None)
        x = embed_requests([t.request for t in train], config, cache_dir=cache, show_progress=show_progress)
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        class_keys = sorted(set(keys))
        coef, intercept = self._fit(x, np.array([class_keys.index(k) for k in keys]), len(class_keys))
        fit_s = time.perf_counter() - started
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        view = [p for p in config.embed.view if p != "answer"]
        np.savez(
            output_dir / FILE, coef=coef, intercept=intercept,
            classes=np.array([spelling[k] for k in class_keys], dtype=str), class_keys=np.array(class_keys, dtype=str),
            embedder=np.array(get_embedder(config).model_id), view=np.array(view, dtype=str),
            max_chars_per_part=np.array(int(config.embed.max_chars_per_part)), label=np.array(label),
            format=np.array(FORMAT),
        )
        metrics: dict[str, Any] = {
            "n_train": len(train), "n_eval": 0, "n_classes": len(class_keys), "label_answers": label,
            "C": float(self.C), "embed_s": round(embed_s, 3), "fit_s": round(fit_s, 3),
            "train_accuracy": _accuracy(_probs(x, coef, intercept), [class_keys.index(k) for k in keys]),
        }
        metrics.update(self._eval_metrics(eval, config, coef, intercept, class_keys, label))
        calibration = self._out_of_fold(x, np.array([class_keys.index(k) for k in keys]), len(class_keys))
        if calibration is not None:
            metrics["calibration"] = calibration
        (output_dir / METRICS).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if show_progress:
            from rich.console import Console

            acc = metrics.get("eval_accuracy")
            Console(stderr=True).print(
                f"  classifier: {len(class_keys)} classes from {len(train)} traces, fit in {fit_s:.2f} s"
                + (f", held-out accuracy {acc:.3f} on {metrics['n_eval']}" if acc is not None else ""))
        return metrics

    def _fit(self, x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(coef (k, dim), intercept (k,)) in softmax form for every k, one and two classes included."""
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        if n_classes == 1:  # one answer: always it
            return np.zeros((1, x.shape[1]), dtype=np.float32), np.zeros(1, dtype=np.float32)
        model = LogisticRegression(C=float(self.C), max_iter=self.max_iter, random_state=self.seed)
        model.fit(x, y)
        coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
        if n_classes == 2:  # sigmoid(z) = softmax([-z/2, z/2])[1]
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        return coef, intercept

    def _out_of_fold(self, x: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, Any] | None:
        """Calibration pairs for the risk-coverage gate from out-of-fold predictions on the training
        split: each training request is answered by a classifier fitted without it (``folds``-fold),
        so the gate can choose its threshold on every training call instead of a share of the few
        held-out ones. None when there are too few calls for ``folds`` folds."""
        import warnings

        import numpy as np

        folds = min(self.calibration_folds, len(y))
        if self.calibration_folds < 2 or folds < 2 or n_classes < 2:
            return None
        order = np.random.default_rng(self.seed).permutation(len(y))
        confidence = np.zeros(len(y), dtype=np.float64)
        agree = np.zeros(len(y), dtype=bool)
        for k in range(folds):
            held = order[k::folds]
            fit = np.setdiff1d(order, held)
            present = np.unique(y[fit])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                coef, intercept = self._fit(x[fit], np.searchsorted(present, y[fit]), len(present))
            probs = _probs(x[held], coef, intercept)
            confidence[held] = probs.max(axis=1)
            agree[held] = present[probs.argmax(axis=1)] == y[held]
        return {"signal": "confidence", "source": f"{folds}-fold out-of-fold predictions on the training split",
                "confidence": [float(c) for c in confidence], "agreement": [int(a) for a in agree]}

    def _eval_metrics(self, eval: Sequence[Trace], config: Any, coef: np.ndarray, intercept: np.ndarray,
                      class_keys: list[str], label: bool) -> dict[str, Any]:
        from aad_core.models.embedding import embed_requests

        pairs = answer_pairs(eval)
        traces = [t for t in eval if t.response is not None]
        if not traces:
            return {"n_eval": 0, "eval_accuracy": None}
        x = embed_requests([t.request for t in traces], config, cache_dir=getattr(self.workspace, "cache_dir", None))
        probs = _probs(x, coef, intercept)
        index = {k: i for i, k in enumerate(class_keys)}
        truth = [index.get(_class_key(text, label), -1) for text, _ in pairs]
        top = probs.max(axis=1)
        sure = top >= 0.5
        return {
            "n_eval": len(traces),
            "eval_accuracy": _accuracy(probs, truth),
            "eval_mean_confidence": round(float(top.mean()), 4),
            "eval_share_confident": round(float(sure.mean()), 4),  # top probability >= 0.5
            "eval_accuracy_confident": _accuracy(probs[sure], [t for t, s in zip(truth, sure) if s]) if sure.any()
            else None,
            "eval_unseen_answers": sum(t < 0 for t in truth),  # answers no training trace gave
        }

    # -- serving ---------------------------------------------------------------------------------
    def load_predictor(self, specialist_dir: Path) -> ClassifierPredictor:
        import numpy as np

        from aad_core.models.embedding import get_embedder

        path = Path(specialist_dir) / FILE
        if not path.exists():
            raise AADError(f"{specialist_dir} holds no classifier ({FILE} is missing).",
                           hint="Pass a classifier specialist's version folder, or train it again ('aad train').")
        with np.load(path, allow_pickle=False) as saved:
            data = {k: saved[k] for k in saved.files}
        config = self._config()
        view = [str(v) for v in data["view"]]
        max_chars = int(data["max_chars_per_part"])
        if view != [p for p in config.embed.view if p != "answer"] or max_chars != config.embed.max_chars_per_part:
            # trained under another [embed] view: embed as it was trained (no vector shared with the router)
            config = config.model_copy(update={"embed": config.embed.model_copy(
                update={"view": view, "max_chars_per_part": max_chars})})
        trained_with, now = str(data["embedder"]), get_embedder(config).model_id
        if trained_with != now:
            raise AADError(f"The classifier in {specialist_dir} was trained on {trained_with!r} vectors; the "
                           f"workspace's embedder is now {now!r}.",
                           hint="Train it again ('aad train'), or set [embed] embedder back.")
        return ClassifierPredictor(data["coef"], data["intercept"], [str(c) for c in data["classes"]], config)


class ClassifierPredictor(Predictor):
    """Answers the most probable class; ``confidence`` = its probability, ``mean_logprob`` = its log."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, classes: list[str], config: Any) -> None:
        self.coef = coef
        self.intercept = intercept
        self.classes = classes
        self.config = config

    def predict_proba(self, requests: Sequence[ChatRequest]) -> np.ndarray:
        """Class probabilities ``(len(requests), len(classes))``, columns in the order of ``classes``."""
        from aad_core.models.embedding import embed_requests

        return _probs(embed_requests(list(requests), self.config), self.coef, self.intercept)

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 128) -> list[Generation]:
        if not requests:
            return []
        started = time.perf_counter()
        probs = self.predict_proba(requests)
        latency = (time.perf_counter() - started) * 1000 / len(requests)
        out = []
        for row in probs:
            i = int(row.argmax())
            p = float(row[i])
            out.append(Generation(text=self.classes[i], mean_logprob=math.log(max(p, 1e-12)), n_tokens=0,
                                  latency_ms=latency, confidence=p))
        return out


def _class_key(text: str, label: bool) -> str:
    """Two answers are one class when their keys are equal (labels: case and spaces ignored)."""
    return label_key(text) if label else text.strip()


def _spellings(pairs: list[tuple[str, bool]], label: bool) -> dict[str, str]:
    """Each class key's most frequent spelling (what the specialist answers)."""
    counts: dict[str, Counter[str]] = {}
    for text, _ in pairs:
        counts.setdefault(_class_key(text, label), Counter())[text.strip()] += 1
    return {k: c.most_common(1)[0][0] for k, c in counts.items()}


def _probs(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    import numpy as np

    z = x.astype(np.float32) @ coef.T + intercept
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _accuracy(probs: np.ndarray, truth: Sequence[int]) -> float | None:
    if not len(truth):
        return None
    return round(float(sum(int(p.argmax()) == t for p, t in zip(probs, truth)) / len(truth)), 4)


@hookimpl
def aad_register_trainers(register: Any) -> None:
    register(
        "classifier",
        ClassifierTrainer,
        description="specialist kind 'classifier': logistic regression on the routing embedding, one class per "
        "distinct teacher answer; for closed answer sets; ~1 ms per request after routing",
    )
