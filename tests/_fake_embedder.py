"""A cheap deterministic embedder for fast tests: hashed bag of words, L2-normalised.

Registered by hand (``register_fake_embedder()``), never through entry points.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from aad_core import hookimpl
from aad_core.plugins.components import Embedder

DIM = 64


class FakeEmbedder(Embedder):
    calls: list[int] = []  # texts per embed() call, shared across instances (tests inspect it)

    def __init__(self, model: str | None = None, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size

    @property
    def model_id(self) -> str:
        return f"fake-bow-{DIM}"

    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        FakeEmbedder.calls.append(len(texts))
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, 0] = 0.05
            for word in re.findall(r"\w+", text.lower()):
                out[i, int(hashlib.sha1(word.encode()).hexdigest(), 16) % DIM] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class _Plugin:
    @hookimpl
    def aad_register_embedders(self, register: Any) -> None:
        register("fake", FakeEmbedder, description="hashed bag of words (tests only)")


def register_fake_embedder() -> None:
    from aad_core.models.embedding import clear_caches
    from aad_core.plugins import get_plugin_manager

    clear_caches()
    FakeEmbedder.calls.clear()
    get_plugin_manager().add_plugin(_Plugin(), name="fake-embedder")
