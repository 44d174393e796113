"""Run the transformer of a sentence-transformers model with ONNX Runtime on CPU.

Why: on 2 CPU cores one short request embeds in about a third of PyTorch's time (measured,
all-MiniLM-L6-v2, 300 requests of the benchmark workload: p50 4.2 ms vs 12.7 ms), which the
router's per-request budget needs; bulk embedding is ~15 % faster.

Why not sentence-transformers' own ``backend="onnx"``: it exports through optimum-onnx, whose
releases (0.1.0) require transformers < 4.58 while aad runs on transformers 5. So the transformer
module is exported here once with ``torch.onnx.export`` and cached under
``$AAD_CACHE_DIR/embedders/``; the model's own pooling and normalisation modules then run on the
ONNX output, so the vectors match the PyTorch backend (cosine >= 0.99999 measured).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def onnx_available() -> bool:
    """Whether onnxruntime and onnx (needed for the one-time export) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def export_dir(source: str) -> Path:
    """The cache folder of the export of ``source`` (a local folder or a model name)."""
    import sentence_transformers
    import torch

    from aad_core.models.cache import cache_base

    ident = [source, sentence_transformers.__version__, torch.__version__]
    folder = Path(source)
    if folder.is_dir():  # a changed local model gets a new export
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            st = f.stat()
            ident.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    digest = hashlib.sha256("\x00".join(ident).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in folder.name or source)[-48:]
    return cache_base() / "embedders" / f"{slug}-{digest}"


class OnnxTransformer:
    """The first module of a loaded ``SentenceTransformer``, exported to ONNX and run by onnxruntime.

    ``embed(texts)`` returns what the whole sentence-transformers pipeline returns (pooling and
    normalisation by the model's own torch modules), as float32 numpy rows.
    """

    def __init__(self, st_model: Any, source: str, *, threads: int | None = None) -> None:
        import onnxruntime as ort
        import torch

        self.st_model = st_model
        probe = _tokenize(st_model, ["probe"])
        self.input_names = [k for k in _INPUTS if k in probe]
        path = export_dir(source) / "model.onnx"
        if not path.exists():
            self._export(path, probe)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _export(self, path: Path, probe: dict[str, Any]) -> None:
        import torch

        from aad_core.models.cache import FileLock

        transformer = self.st_model[0].auto_model.eval()
        names = self.input_names

        class _Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = transformer

            def forward(self, *args: torch.Tensor) -> torch.Tensor:
                return self.inner(**dict(zip(names, args))).last_hidden_state

        with FileLock(path.parent.parent / f".{path.parent.name}.lock"):
            if path.exists():  # another process exported it meanwhile
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{os.getpid()}.{path.name}")
            log.info("exporting %s to ONNX (once) at %s", type(transformer).__name__, path)
            axes = {n: {0: "batch", 1: "seq"} for n in [*names, "token_embeddings"]}
            # The exporter puts the wrapper back in the mode it found it in, recursively: a wrapper left in
            # (nn.Module's default) training mode would leave the shared model's dropout on for the rest of
            # the process (the classifier's tuned encoder reads its frozen layers), so it is built in eval.
            wrapped = _Wrapped().eval()
            try:
                with warnings.catch_warnings(), torch.inference_mode():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        wrapped, tuple(probe[n] for n in names), str(tmp), input_names=names,
                        output_names=["token_embeddings"], dynamic_axes=axes, opset_version=17, dynamo=False,
                    )
            finally:
                transformer.eval()
            tmp.replace(path)

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        features = _tokenize(self.st_model, texts)
        feed = {n: features[n].numpy().astype(np.int64, copy=False) for n in self.input_names}
        (hidden,) = self.session.run(["token_embeddings"], feed)
        features["token_embeddings"] = torch.from_numpy(hidden)
        with torch.inference_mode():
            for module in list(self.st_model)[1:]:
                features = module(features)
            vecs = torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1)
        return vecs.float().numpy()


def _tokenize(st_model: Any, texts: list[str]) -> dict[str, Any]:
    # sentence-transformers 6 renamed tokenize() to preprocess(); older releases only have tokenize().
    prep = getattr(st_model, "preprocess", None) or st_model.tokenize
    return prep(texts)
