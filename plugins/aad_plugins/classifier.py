"""Trainer ``classifier``: the specialist kind for tasks whose answers come from a closed set.

Each distinct teacher answer is a class, out-of-scope answers ("none of these", a refusal) included:
they are just another class, and go back to the teacher through the confidence gate like any other
answer. The classifier sees a request as the router does (the workspace's ``[embed]`` embedder and
view: the system prompt, tool names and last user message, each embedded and summed), less the parts
every training request shares (``drop_constant_parts``), and answers with the average of two heads
over that vector: a logistic regression and a nearest-neighbour vote (a softmax over the similarities
to the training requests, each voting for its answer).

With the default ``encoder = "tuned"`` and the default all-MiniLM-L6-v2 embedder, the top 2 of
MiniLM's 6 layers are first fine-tuned on the task's own answers, SetFit-style (a supervised
contrastive loss over batches of 16 answers x 4 requests, 6 epochs;
:mod:`aad_plugins.classifier_encoder`), and the heads are fitted on the tuned vectors; the predictor
then encodes each request once more with the tuned layers (a few ms on CPU), and mixes in the heads
fitted on the untuned vectors (``frozen_weight``). ``encoder = "frozen"``
(or an embedder that cannot be tuned) uses the untuned embedder's vectors as they are: the router's
own when no view part was dropped (one matrix product after routing), else one more embedding of the
parts it keeps. Measured on Banking77 (1,000 training queries, the 3,080 test queries;
``benchmarks/classifier_banking77.py``, figures in docs/specialists.md): see :class:`ClassifierTrainer`.

The risk-coverage gate chooses the serving threshold on out-of-fold answers of the training split
(``metrics["calibration"]``): every training request answered by heads fitted without it (on a tuned
encoder, on half the split: see ``calibration_encoder``).

Files in the specialist's folder: ``classifier.npz`` (``coef``, ``intercept``, ``classes`` as
strings, the nearest-neighbour bank ``knn_x``/``knn_y``, ``embedder`` model id, ``view``,
``max_chars_per_part``, ``encoder``; read with ``allow_pickle=False``), ``encoder.safetensors`` (the
tuned layers, with ``encoder = "tuned"``) and ``metrics.json``. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aad_core.errors import AADError, param_error
from aad_core.formats.answers import answer_pairs
from aad_core.formats.kinds import output_kind
from aad_core.formats.labels import label_key
from aad_core.models.runtime import Generation
from aad_core.plugins import Predictor, Trainer, hookimpl
from aad_core.plugins.components import HELDOUT_TRAINED_ON

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import ChatRequest, Trace
    from aad_core.workspace import Workspace

FILE = "classifier.npz"
METRICS = "metrics.json"
FORMAT = 2
ENCODERS = ("tuned", "frozen")


class ClassifierTrainer(Trainer):
    """A classifier over the routing embedding (optionally tuned), one class per distinct teacher answer.

    Measured on Banking77 as a new user's agent (1,000 training queries over the 77 intents, all
    3,080 test queries; threshold chosen as the gate chooses it, on the training split's
    out-of-fold answers at agreement 0.97, alpha 0.05; ``benchmarks/classifier_banking77.py`` on 2
    busy CPU cores; docs/specialists.md has the table)::

        variant                                          accuracy  served at agreement  train (wall, loaded)
        frozen, LR C = 1000, no vote (the old default)      0.868   0.63 at 0.978         64 s
        frozen, LR C = 100 + vote                           0.881   0.62 at 0.985         73 s
        tuned, LR C = 100, no vote                          0.885   0.76 at 0.965         83 s CPU
        tuned, LR C = 100 + vote (default)                  0.890   0.72 at 0.976        127 s (83 s CPU)

    Parameters
    ----------
    C : float
        Inverse regularisation strength of the logistic regression head (100: on Banking77 C = 100
        was more accurate than 10 or 1000 on both frozen and tuned vectors).
    max_iter : int
        Iterations of the lbfgs solver.
    max_distinct_share : float
        A task whose answers are not labels (JSON, tool calls, text) fits when its distinct answers are at
        most this share of its training answers (a small fixed set); labels follow the 'label' output kind.
    calibration_folds : int
        Folds of the out-of-fold predictions on the training split that the risk-coverage gate chooses
        the confidence threshold on; fewer than 2 = none (the gate calibrates on part of the held-out
        calls instead, and a tuned encoder is tuned once, not cross-fitted).
    encoder : {"tuned", "frozen"}
        "tuned": fine-tune the embedder's top ``tune_layers`` layers on the task first (the default
        MiniLM embedder, or any sentence-transformers BERT-like model with mean pooling; another
        embedder falls back to "frozen" and ``metrics["encoder_note"]`` says why). "frozen": the
        router's vectors as they are.
    tune_layers : int
        How many top transformer layers are tuned (the lower ones stay frozen, so each text goes
        through them once).
    tune_epochs : float
        Passes over the training split (optimizer steps = epochs x requests / batch, at least 10).
    tune_lr : float
        AdamW learning rate (linear warm-up over 10 % of the steps, then linear decay).
    tune_classes_per_batch, tune_per_class : int
        A contrastive batch holds ``tune_per_class`` requests of each of ``tune_classes_per_batch`` answers.
    tune_temperature : float
        Temperature of the supervised contrastive loss.
    knn_weight : float
        Weight of the nearest-neighbour vote in the answer's probability (the rest: the logistic
        regression); 0 = the logistic regression alone.
    knn_temperature : float
        Softmax temperature over cosine similarities of the vote.
    calibration_encoder : {"shared", "cross-fitted"}
        With a tuned encoder, on which vectors the out-of-fold calibration answers are computed.
        "shared": those of the encoder tuned on the whole split (one tuning), with heads fitted on
        ``tuned_calibration_folds``-fold splits. The encoder has seen each request, which makes its
        pairs optimistic; heads fitted on half the split make them pessimistic, and on Banking77 the
        two about cancel (out-of-fold accuracy 0.879 against 0.890 on test; with 5 folds 0.915, and
        the chosen threshold served 0.76 at agreement 0.969 < 0.97). The gate's test part, never
        trained on, checks the threshold either way. "cross-fitted": two more encoders, each tuned on
        one half, answer the other half (no request seen by its encoder, but their half-data
        confidences run lower than the final encoder's, so the threshold is conservative: on Banking77
        it served 0.66 at agreement 0.985), at twice the tuning time. The default, because "shared" is
        unsafe on small tasks: on the demo's intent node (197 calls, 8 labels) the shared encoder had
        memorised every request, its out-of-fold pairs read 197 of 197 right, the threshold served
        everything, and the gate's test part found 0.917 < 0.95.
    tuned_calibration_folds : int
        Folds of the heads' out-of-fold answers on a tuned ("shared") encoder; ``calibration_folds``
        applies to frozen vectors and cross-fitted halves.
    encoder_folds : int
        With ``calibration_encoder = "cross-fitted"``: the training split is cut into this many folds and
        one encoder is tuned without each (2 = halves). More folds bring the calibration encoders closer to
        the final one, at ``encoder_folds`` tunings; on Banking77 (800 queries) 4 folds chose no better
        threshold than 2 (served 0.67 against 0.69 of the test queries at target 0.95) in 2.4x the time.
    frozen_weight : float
        With a tuned encoder, the heads fitted on the untuned embedder's vectors (the router's view of the
        request) are mixed into the answer's probability at this weight, in serving and in the gate's
        calibration pairs alike. On Banking77 (800 queries, the 3,080 test queries; ``encoder`` tuned):
        accuracy 0.876 alone, 0.881 at 0.2, 0.882 at 0.3, 0.879 at 0.5; the test's best coverage at
        agreement 0.97 moved by under 0.01. 0 = the tuned heads alone.
    fit_calibration_part : bool
        When the gate calibrates on out-of-fold answers of the training calls (``calibration_folds`` >= 2),
        also fit the held-out calibration part the train stage gives (``eval``): the gate then tests on
        the test part alone (``metrics["heldout_trained_on"]`` lists the calls fitted). On Banking77 the
        107 more calls took accuracy from 0.877 to 0.884 (``benchmarks/distill_banking77.py``).
    drop_constant_parts : bool
        Leave out of the classifier's view every part whose text is the same in all training requests
        (the node's system prompt, its tool list): they tell no answer from another, and summed into
        every vector they only shrink the distances between requests. Accuracy on Banking77 is unchanged
        (0.876 against 0.877), and a request encodes one part instead of two (13 against 25 ms).
    threads : int or None
        Torch threads while tuning (None = torch's default). On 2 busy cores one thread spent a third
        of the CPU time of two for the same steps.
    seed : int
        Seed of the solver, the folds and the tuning.
    workspace : Workspace or None
        The workspace, for its ``[embed]`` embedder and view (the router's request vector).
    """

    kind = "classifier"
    uses_selection = False  # an embedding and a small fit: the whole training split costs seconds to minutes

    def __init__(self, C: float = 100.0, max_iter: int = 2000, max_distinct_share: float = 0.3,
                 calibration_folds: int = 5, encoder: Literal["tuned", "frozen"] = "tuned", tune_layers: int = 2,
                 tune_epochs: float = 6.0, tune_lr: float = 1e-4, tune_classes_per_batch: int = 16,
                 tune_per_class: int = 4, tune_temperature: float = 0.05, knn_weight: float = 0.5,
                 knn_temperature: float = 0.02, calibration_encoder: Literal["shared", "cross-fitted"] = "cross-fitted",
                 tuned_calibration_folds: int = 2, encoder_folds: int = 2, frozen_weight: float = 0.3,
                 drop_constant_parts: bool = True, fit_calibration_part: bool = True, threads: int | None = 1,
                 seed: int = 0, workspace: Workspace | None = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.max_distinct_share = max_distinct_share
        self.calibration_folds = calibration_folds
        self.encoder = encoder
        self.tune_layers = tune_layers
        self.tune_epochs = tune_epochs
        self.tune_lr = tune_lr
        self.tune_classes_per_batch = tune_classes_per_batch
        self.tune_per_class = tune_per_class
        self.tune_temperature = tune_temperature
        self.knn_weight = knn_weight
        self.knn_temperature = knn_temperature
        self.calibration_encoder = calibration_encoder
        self.tuned_calibration_folds = tuned_calibration_folds
        self.encoder_folds = encoder_folds
        self.frozen_weight = frozen_weight
        self.drop_constant_parts = drop_constant_parts
        self.fit_calibration_part = fit_calibration_part
        self.threads = threads
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

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise param_error(name, owner, expected, getattr(self, name))

        number = (int, float)
        check("C", isinstance(self.C, number) and self.C > 0, "a float > 0")
        check("max_iter", isinstance(self.max_iter, int) and self.max_iter >= 1, "an int >= 1")
        check("max_distinct_share", isinstance(self.max_distinct_share, number) and 0 < self.max_distinct_share <= 1,
              "a float in (0, 1]")
        check("encoder", self.encoder in ENCODERS, f"one of {ENCODERS}")
        check("tune_layers", isinstance(self.tune_layers, int) and self.tune_layers >= 1, "an int >= 1")
        check("tune_epochs", isinstance(self.tune_epochs, number) and self.tune_epochs > 0, "a float > 0")
        check("tune_lr", isinstance(self.tune_lr, number) and self.tune_lr > 0, "a float > 0")
        check("tune_classes_per_batch", isinstance(self.tune_classes_per_batch, int) and self.tune_classes_per_batch >= 2,
              "an int >= 2")
        check("tune_per_class", isinstance(self.tune_per_class, int) and self.tune_per_class >= 2, "an int >= 2")
        check("tune_temperature", isinstance(self.tune_temperature, number) and self.tune_temperature > 0, "a float > 0")
        check("knn_weight", isinstance(self.knn_weight, number) and 0 <= self.knn_weight <= 1, "a float in [0, 1]")
        check("knn_temperature", isinstance(self.knn_temperature, number) and self.knn_temperature > 0, "a float > 0")
        check("calibration_encoder", self.calibration_encoder in ("shared", "cross-fitted"),
              "'shared' or 'cross-fitted'")
        check("tuned_calibration_folds", isinstance(self.tuned_calibration_folds, int), "an int (2 or more: folds)")
        check("encoder_folds", isinstance(self.encoder_folds, int) and self.encoder_folds >= 2, "an int >= 2")
        check("frozen_weight", isinstance(self.frozen_weight, number) and 0 <= self.frozen_weight < 1,
              "a float in [0, 1)")
        check("drop_constant_parts", isinstance(self.drop_constant_parts, bool), "True or False")
        check("fit_calibration_part", isinstance(self.fit_calibration_part, bool), "True or False")
        check("threads", self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
              "None or an int >= 1")

    def _config(self) -> Any:
        if self.workspace is None:
            raise AADError("The classifier trainer needs a workspace: it embeds requests with the workspace's "
                           "[embed] embedder and view, as the router does.",
                           hint="Build it with build_component('trainer', 'classifier', config, workspace=ws).")
        return self.workspace.config

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        import numpy as np

        from aad_core.models.embedding import get_embedder

        self._validate()
        config = self._config()
        train = [t for t in train if t.response is not None]
        if not train:
            raise AADError("The classifier got no training trace with a recorded answer.",
                           hint="Run 'aad select' again, or check the task's traces.")
        wall_started = time.perf_counter()
        fitted_heldout: list[str] = []
        # (only when out-of-fold pairs will replace it: frozen vectors, cross-fitted or shared-encoder folds; a
        # node that always answered the same gets pairs too: each fold's head answers that, with probability 1)
        pairs = (self.encoder == "frozen" or self.calibration_encoder == "cross-fitted"
                 or self.tuned_calibration_folds >= 2)
        if self.fit_calibration_part and self.calibration_folds >= 2 and pairs:
            from aad_core.formats.answers import teacher_answer_wrong

            # The gate calibrates on out-of-fold answers of the training calls, so the held-out calls
            # given for calibration are more training data; the gate tests on the rest (metrics says which).
            # A call whose teacher answer feedback marks wrong never trains a specialist.
            known = {t.id for t in train}
            extra = [t for t in eval if t.response is not None and t.id not in known and not teacher_answer_wrong(t)]
            train, eval, fitted_heldout = train + extra, [], [t.id for t in extra]
        label = output_kind(answer_pairs(train)) == "label"
        keys = [_class_key(text, label) for text, _ in answer_pairs(train)]
        spelling = _spellings(answer_pairs(train), label)
        class_keys = sorted(set(keys))
        y = np.array([class_keys.index(k) for k in keys])
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        view = [p for p in config.embed.view if p != "answer"]
        if self.drop_constant_parts:
            dropped = _constant_parts([t.request for t in train], view, config.embed.max_chars_per_part)
            if dropped:
                view = [p for p in view if p not in dropped]
                config = config.model_copy(update={"embed": config.embed.model_copy(update={"view": view})})
        metrics: dict[str, Any] = {"n_train": len(train), "n_eval": 0, "n_classes": len(class_keys),
                                   "label_answers": label, "C": float(self.C), "knn_weight": float(self.knn_weight),
                                   "knn_temperature": float(self.knn_temperature), "view": list(view),
                                   HELDOUT_TRAINED_ON: fitted_heldout}

        st_model, note = (_tunable_model(config) if self.encoder == "tuned" else (None, "encoder = 'frozen'"))
        started = time.perf_counter()
        tuner = None
        calibration = None
        x_frozen = None
        mix: tuple[float, np.ndarray] | None = None
        if st_model is not None and len(class_keys) >= 2:
            from aad_plugins.classifier_encoder import torch_threads

            # Every tensor op of the tuning, the frozen layers' states included, on the same number of
            # threads: another thread count sums in another order, and 37 steps later the demo's intent
            # classifier answered 22 instead of 23 of its 24 test calls.
            if self.frozen_weight > 0:
                from aad_core.models.embedding import embed_requests

                # the untuned embedder's vectors: their heads' answers are mixed in (frozen_weight)
                x_frozen = embed_requests([t.request for t in train], config, show_progress=False,
                                          cache_dir=getattr(self.workspace, "cache_dir", None))
                oof_frozen = self._oof_probs(x_frozen, y, len(class_keys))
                mix = None if oof_frozen is None else (float(self.frozen_weight), oof_frozen)
            with torch_threads(self.threads):
                tuner = _Tuning(self, st_model, config, [t.request for t in train])
                tune_metrics: dict[str, Any] = {}
                if self.calibration_folds >= 2 and self.calibration_encoder == "cross-fitted":
                    calibration, why = tuner.cross_fitted_calibration(y, len(class_keys), mix=mix)
                    tune_metrics = {"tuned": False, "why": why} if calibration is None else {}
                if calibration is not None or self.calibration_encoder == "shared" or self.calibration_folds < 2:
                    encoder, tune_metrics = tuner.tune(y, self.seed)
                    x = encoder.vectors(tuner.part_texts, tuner.states)
                    if calibration is None and tune_metrics.get("tuned") and self.tuned_calibration_folds >= 2:
                        calibration = self._out_of_fold(
                            x, y, len(class_keys), folds=self.tuned_calibration_folds,
                            on="on the encoder tuned on the whole split", mix=mix)
            if tune_metrics.get("tuned"):
                encoder.save(output_dir / _encoder_file())
            else:
                encoder = None
                note = f"not tuned: {tune_metrics.get('why', 'no reason given')}"
            metrics["tuning"] = tune_metrics
        else:
            encoder = None
        if encoder is None:
            from aad_core.models.embedding import embed_requests

            x = embed_requests([t.request for t in train], config, cache_dir=getattr(self.workspace, "cache_dir", None),
                               show_progress=show_progress)
            calibration = None
        metrics["encoder"] = "tuned" if encoder is not None else "frozen"
        if note and encoder is None and self.encoder == "tuned":
            metrics["encoder_note"] = note
        metrics["embed_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        coef, intercept = self._fit(x, y, len(class_keys))
        frozen: dict[str, Any] = {}
        if encoder is not None and mix is not None and x_frozen is not None:
            frozen_coef, frozen_intercept = self._fit(x_frozen, y, len(class_keys))
            frozen = {"frozen_coef": frozen_coef, "frozen_intercept": frozen_intercept,
                      "frozen_knn_x": x_frozen.astype(np.float32), "frozen_weight": np.array(mix[0])}
        metrics["frozen_weight"] = float(mix[0]) if frozen else 0.0
        metrics["fit_s"] = round(time.perf_counter() - started, 3)
        np.savez(
            output_dir / FILE, coef=coef, intercept=intercept,
            classes=np.array([spelling[k] for k in class_keys], dtype=str), class_keys=np.array(class_keys, dtype=str),
            embedder=np.array(get_embedder(config).model_id), view=np.array(view, dtype=str),
            max_chars_per_part=np.array(int(config.embed.max_chars_per_part)), label=np.array(label),
            knn_x=x.astype(np.float32), knn_y=y.astype(np.int32), knn_weight=np.array(float(self.knn_weight)),
            knn_temperature=np.array(float(self.knn_temperature)), encoder=np.array(metrics["encoder"]),
            format=np.array(FORMAT), **frozen,
        )
        head = _Head(coef, intercept, x, y, float(self.knn_weight), float(self.knn_temperature))
        metrics["train_accuracy"] = _accuracy(head.probs(x, exclude_self=True), list(y))
        predictor = ClassifierPredictor(coef, intercept, [spelling[k] for k in class_keys], config,
                                        knn_x=x, knn_y=y, knn_weight=self.knn_weight,
                                        knn_temperature=self.knn_temperature, encoder=encoder,
                                        frozen=_frozen_head(frozen, y, self.knn_weight, self.knn_temperature))
        metrics.update(self._eval_metrics(eval, predictor, class_keys, label))
        if calibration is None and encoder is None:
            calibration = self._out_of_fold(x, y, len(class_keys))
        if calibration is not None:
            metrics["calibration"] = calibration
        metrics["train_s"] = round(time.perf_counter() - wall_started, 3)
        (output_dir / METRICS).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if show_progress:
            from rich.console import Console

            acc = metrics.get("eval_accuracy")
            Console(stderr=True).print(
                f"  classifier ({metrics['encoder']} encoder): {len(class_keys)} classes from {len(train)} traces "
                f"in {metrics['train_s']:.1f} s"
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

    def _oof_probs(self, x: np.ndarray, y: np.ndarray, n_classes: int, folds: int | None = None) -> np.ndarray | None:
        """Out-of-fold probabilities ``(n, n_classes)``: each row from heads fitted without it
        (``folds``-fold, default ``calibration_folds``); None when there are too few calls for 2 folds."""
        import warnings

        import numpy as np

        wanted = self.calibration_folds if folds is None else folds
        folds = min(wanted, len(y))
        if wanted < 2 or folds < 2:
            return None
        if n_classes == 1:  # a node that always answered the same: every fold's head answers it, sure of it
            return np.ones((len(y), 1), dtype=np.float64)
        order = np.random.default_rng(self.seed).permutation(len(y))
        out = np.zeros((len(y), n_classes), dtype=np.float64)
        for k in range(folds):
            held = order[k::folds]
            fit = np.setdiff1d(order, held)
            present = np.unique(y[fit])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                coef, intercept = self._fit(x[fit], np.searchsorted(present, y[fit]), len(present))
            head = _Head(coef, intercept, x[fit], np.searchsorted(present, y[fit]), float(self.knn_weight),
                         float(self.knn_temperature))
            out[np.ix_(held, present)] = head.probs(x[held])
        return out

    def _out_of_fold(self, x: np.ndarray, y: np.ndarray, n_classes: int, on: str = "",
                     folds: int | None = None, mix: tuple[float, np.ndarray] | None = None) -> dict[str, Any] | None:
        """Calibration pairs for the risk-coverage gate from out-of-fold predictions on the training
        split: each training request is answered by a classifier fitted without it (``folds``-fold),
        so the gate can choose its threshold on every training call instead of a share of the few
        held-out ones. None when there are too few calls for ``folds`` folds."""
        probs = self._oof_probs(x, y, n_classes, folds)
        if probs is None:
            return None
        folds = min(self.calibration_folds if folds is None else folds, len(y))
        source = f"{folds}-fold out-of-fold predictions on the training split" + (f", {on}" if on else "")
        return _calibration(_mixed(probs, mix), y, source)

    def _eval_metrics(self, eval: Sequence[Trace], predictor: ClassifierPredictor, class_keys: list[str],
                      label: bool) -> dict[str, Any]:
        pairs = answer_pairs(eval)
        traces = [t for t in eval if t.response is not None]
        if not traces:
            return {"n_eval": 0, "eval_accuracy": None}
        probs = predictor.predict_proba([t.request for t in traces],
                                        cache_dir=getattr(self.workspace, "cache_dir", None))
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
        tuned = str(data.get("encoder", "frozen")) == "tuned"
        encoder_path = Path(specialist_dir) / _encoder_file()
        if tuned and not encoder_path.exists():
            raise AADError(f"The classifier in {specialist_dir} was trained on a tuned encoder, but "
                           f"{encoder_path.name} is missing.", hint="Train it again ('aad train').")
        return ClassifierPredictor(
            data["coef"], data["intercept"], [str(c) for c in data["classes"]], config,
            knn_x=data.get("knn_x"), knn_y=data.get("knn_y"),
            knn_weight=float(data["knn_weight"]) if "knn_weight" in data else 0.0,
            knn_temperature=float(data["knn_temperature"]) if "knn_temperature" in data else 0.02,
            encoder_path=encoder_path if tuned else None,
            frozen=_frozen_head(data, data.get("knn_y"), float(data.get("knn_weight", 0.0)),
                                float(data.get("knn_temperature", 0.02))) if tuned else None)


class ClassifierPredictor(Predictor):
    """Answers the most probable class; ``confidence`` = its probability, ``mean_logprob`` = its log.

    The probability averages the logistic regression's and the nearest-neighbour vote's (``knn_weight``).
    A classifier trained on a tuned encoder encodes requests with it (loaded on the first request);
    otherwise it uses the router's vectors.
    """

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, classes: list[str], config: Any, *,
                 knn_x: np.ndarray | None = None, knn_y: np.ndarray | None = None, knn_weight: float = 0.0,
                 knn_temperature: float = 0.02, encoder: Any = None, encoder_path: Path | None = None,
                 frozen: tuple[_Head, float] | None = None) -> None:
        self.coef = coef
        self.intercept = intercept
        self.classes = classes
        self.config = config
        self.head = _Head(coef, intercept, knn_x, knn_y, knn_weight if knn_x is not None else 0.0, knn_temperature)
        self._encoder = encoder
        self.encoder_path = encoder_path
        self.frozen = frozen
        self._lock = threading.Lock()

    @property
    def tuned(self) -> bool:
        return self._encoder is not None or self.encoder_path is not None

    def _tuned_encoder(self) -> Any:
        with self._lock:
            if self._encoder is None:
                st_model, why = _tunable_model(self.config)
                if st_model is None:
                    raise AADError(f"The classifier's tuned encoder cannot be loaded: {why}.",
                                   hint="Train it again ('aad train') with [trainer.classifier] encoder = 'frozen'.")
                from aad_plugins.classifier_encoder import TunedEncoder

                import safetensors

                with safetensors.safe_open(str(self.encoder_path), framework="pt") as f:
                    start = int((f.metadata() or {}).get("start", "-1"))
                layers = len(st_model[0].auto_model.encoder.layer)
                encoder = TunedEncoder(st_model, layers - start)
                encoder.load(self.encoder_path)
                self._encoder = encoder
            return self._encoder

    def features(self, requests: Sequence[ChatRequest], *, cache_dir: Path | None = None) -> np.ndarray:
        """The vectors the heads read: the tuned encoder's, or the router's."""
        from aad_core.models.embedding import embed_requests, view_parts

        if not self.tuned:
            return embed_requests(list(requests), self.config, cache_dir=cache_dir)
        view = [p for p in self.config.embed.view if p != "answer"]
        parts = [[text for _, text in view_parts(r, view, self.config.embed.max_chars_per_part)] for r in requests]
        return _combine_parts(self._tuned_encoder(), parts)

    def predict_proba(self, requests: Sequence[ChatRequest], *, cache_dir: Path | None = None) -> np.ndarray:
        """Class probabilities ``(len(requests), len(classes))``, columns in the order of ``classes``."""
        probs = self.head.probs(self.features(requests, cache_dir=cache_dir))
        if self.frozen is not None and self.tuned:
            from aad_core.models.embedding import embed_requests

            head, weight = self.frozen
            probs = (1 - weight) * probs + weight * head.probs(embed_requests(list(requests), self.config,
                                                                              cache_dir=cache_dir))
        return probs

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


class _Head:
    """The two heads over a request vector: softmax(x coef' + intercept), averaged with a
    nearest-neighbour vote (a softmax over the cosine similarities to the training vectors,
    temperature ``knn_temperature``, each neighbour voting for its class) at weight ``knn_weight``."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, knn_x: np.ndarray | None, knn_y: np.ndarray | None,
                 knn_weight: float, knn_temperature: float) -> None:
        self.coef = coef
        self.intercept = intercept
        self.knn_x = knn_x
        self.knn_y = None if knn_y is None else knn_y.astype(int)
        self.knn_weight = float(knn_weight) if knn_x is not None and len(knn_x) else 0.0
        self.knn_temperature = knn_temperature

    def probs(self, x: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        import numpy as np

        p = _probs(x, self.coef, self.intercept)
        if self.knn_weight <= 0:
            return p
        sims = x.astype(np.float32) @ self.knn_x.T
        if exclude_self:  # x is the bank itself: leave each row's own vote out
            np.fill_diagonal(sims, -np.inf)
        z = (sims - sims.max(axis=1, keepdims=True)) / self.knn_temperature
        w = np.exp(z)
        vote = np.zeros_like(p)
        for c in range(p.shape[1]):
            mask = self.knn_y == c
            if mask.any():
                vote[:, c] = w[:, mask].sum(axis=1)
        vote /= np.maximum(vote.sum(axis=1, keepdims=True), 1e-30)
        return (1 - self.knn_weight) * p + self.knn_weight * vote


class _Tuning:
    """Tuning the encoder for one task: the lower layers' states of every part text (computed once),
    the cross-fitted calibration, and the final tuned encoder."""

    def __init__(self, trainer: ClassifierTrainer, st_model: Any, config: Any, requests: Sequence[ChatRequest]) -> None:
        from aad_core.models.embedding import view_parts

        from aad_plugins.classifier_encoder import TunedEncoder

        self.trainer = trainer
        self.st_model = st_model
        view = [p for p in config.embed.view if p != "answer"]
        self.part_texts = [[text for _, text in view_parts(r, view, config.embed.max_chars_per_part)]
                           for r in requests]
        texts = list(dict.fromkeys(t for parts in self.part_texts for t in parts))
        base = TunedEncoder(st_model, trainer.tune_layers)
        self.states = dict(zip(texts, base.lower(texts))) if texts else {}

    def tune(self, y: np.ndarray, seed: int, rows: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
        import numpy as np

        from aad_plugins.classifier_encoder import TunedEncoder

        t = self.trainer
        rows = np.arange(len(y)) if rows is None else rows
        encoder = TunedEncoder(self.st_model, t.tune_layers)
        started = time.perf_counter()
        metrics = encoder.fine_tune(self.states, [self.part_texts[i] for i in rows], y[rows], epochs=t.tune_epochs,
                                    lr=t.tune_lr, classes_per_batch=t.tune_classes_per_batch,
                                    per_class=t.tune_per_class, temperature=t.tune_temperature, seed=seed)
        metrics["tune_s"] = round(time.perf_counter() - started, 3)
        metrics["layers"] = t.tune_layers
        return encoder, metrics

    def cross_fitted_calibration(self, y: np.ndarray, n_classes: int, *, mix: tuple[float, np.ndarray] | None = None
                                 ) -> tuple[dict[str, Any] | None, str]:
        """Out-of-fold pairs in which neither the heads nor the encoder saw the request: the split in
        two halves (stratified by answer), an encoder tuned on each half, and each half answered by the
        heads (``calibration_folds``-fold) on the vectors of the encoder tuned on the other half.
        (None, why) when a half is too small to tune on: the encoder is then not tuned at all, so
        the gate never chooses its threshold on answers the encoder learnt by heart."""
        import numpy as np

        k = self.trainer.encoder_folds
        if len(y) < 4 * k:
            return None, f"too few training requests ({len(y)}) to tune on {k} folds"
        rng = np.random.default_rng(self.trainer.seed)
        fold = np.zeros(len(y), dtype=int)
        for c in np.unique(y):
            ids = rng.permutation(np.flatnonzero(y == c))
            fold[ids] = (np.arange(len(ids)) + int(c)) % k  # small classes rotate which fold gets more
        probs = np.zeros((len(y), n_classes))
        for h in range(k):
            encoder, tuned = self.tune(y, self.trainer.seed + 1 + h, rows=np.flatnonzero(fold != h))
            if not tuned.get("tuned"):
                return None, f"{k - 1} of {k} folds of the training split cannot be tuned on ({tuned.get('why')})"
            x = encoder.vectors(self.part_texts, self.states)
            oof = self.trainer._oof_probs(x, y, n_classes)
            if oof is None:
                return None, "too few training requests for out-of-fold answers"
            held = np.flatnonzero(fold == h)
            probs[held] = oof[held]
        folds = min(self.trainer.calibration_folds, len(y))
        source = (f"{folds}-fold out-of-fold predictions on the training split, on an encoder tuned without them "
                  f"({k} folds, cross-fitted)")
        return _calibration(_mixed(probs, mix), y, source), ""


def _constant_parts(requests: Sequence[ChatRequest], view: Sequence[str], max_chars: int) -> list[str]:
    """The view parts whose text is the same in every request (the node's system prompt, its tool list):
    they tell no answer from another, and summed into every vector they only shrink the distances between
    requests. At least one part is kept."""
    from aad_core.models.embedding import view_parts

    seen: dict[str, set[str]] = {p: set() for p in view}
    for r in requests:
        present = dict(view_parts(r, view, max_chars))
        for p in view:
            seen[p].add(present.get(p, ""))
    constant = [p for p in view if len(seen[p]) == 1]
    return constant if len(constant) < len(view) else []


def _frozen_head(data: Any, knn_y: Any, knn_weight: float, knn_temperature: float) -> tuple[_Head, float] | None:
    """The heads over the untuned embedder's vectors and their weight, from the saved arrays (None: none saved)."""
    if not data or "frozen_coef" not in data or knn_y is None:
        return None
    head = _Head(data["frozen_coef"], data["frozen_intercept"], data["frozen_knn_x"], knn_y, knn_weight, knn_temperature)
    return head, float(data["frozen_weight"])


def _mixed(probs: np.ndarray, mix: tuple[float, np.ndarray] | None) -> np.ndarray:
    """``probs`` with the untuned embedder's heads' answers mixed in at their weight (``mix``), as served."""
    return probs if mix is None else (1 - mix[0]) * probs + mix[0] * mix[1]


def _calibration(probs: np.ndarray, y: np.ndarray, source: str) -> dict[str, Any]:
    return {"signal": "confidence", "source": source,
            "confidence": [float(c) for c in probs.max(axis=1)],
            "agreement": [int(a) for a in probs.argmax(axis=1) == y]}


def _encoder_file() -> str:
    from aad_plugins.classifier_encoder import ENCODER_FILE

    return ENCODER_FILE


def _tunable_model(config: Any) -> tuple[Any, str]:
    """The embedder's sentence-transformers model when its top layers can be tuned, else (None, why)."""
    from aad_core.models.embedding import get_embedder

    from aad_plugins.classifier_encoder import unsupported
    from aad_plugins.minilm import MiniLMEmbedder

    embedder = get_embedder(config)
    if not isinstance(embedder, MiniLMEmbedder):
        return None, f"the embedder {type(embedder).__name__} is not a sentence-transformers model aad can tune"
    st_model = embedder._load()  # noqa: SLF001 - the same package's embedder: share its loaded model
    why = unsupported(st_model)
    return (None, f"the embedder's model cannot be tuned: {why}") if why else (st_model, "")


def _combine_parts(encoder: Any, parts: Sequence[Sequence[str]]) -> np.ndarray:
    """Request vectors from the tuned encoder: each part encoded, summed, made unit (as the router combines)."""
    import numpy as np

    texts = list(dict.fromkeys(t for p in parts for t in p))
    vecs = encoder.encode(texts) if texts else None
    where = {t: i for i, t in enumerate(texts)}
    dim = vecs.shape[1] if vecs is not None else int(encoder.bert.config.hidden_size)
    out = np.zeros((len(parts), dim), dtype=np.float32)
    for row, p in enumerate(parts):
        if p:
            v = vecs[[where[t] for t in p]].sum(axis=0)
            out[row] = v / max(float(np.linalg.norm(v)), 1e-12)
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
        description="specialist kind 'classifier': MiniLM's top layers tuned on the task (SetFit-style), then a "
        "logistic regression + nearest-neighbour vote, one class per distinct teacher answer; for closed answer "
        "sets; one more encoder pass per request after routing (encoder='frozen': ~1 ms on the router's vector)",
    )
