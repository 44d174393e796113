"""The shared embedding API: which text of a trace is embedded, and how.

A trace is seen through a *view* (``[embed] view``): some of its parts — the system prompt, the
bound tool names, the last (or every) user message, the answer. Each part is embedded on its own
and the request vector is the L2-normalised mean of its parts' vectors. Two reasons:

* MiniLM reads at most 256 word pieces; concatenated, a long shared system prompt would push the
  user message out of the window and every call of an agent node would look the same.
* Agent nodes share their system prompt and tools, so those parts are embedded once (the
  per-process part cache and the workspace cache), which keeps both clustering and the router's
  per-request embedding fast.

:func:`trace_view` gives the same parts joined as one string (labels, reports, external tools).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError

if TYPE_CHECKING:
    import numpy as np

    from aad_core.plugins.components import Embedder
    from aad_core.config import AADSettings
    from aad_core.schema import ChatRequest

VIEW_PARTS = ("system", "tools", "last_user", "all_user", "answer")
#: Parts that carry the caller's context (shared by every call of an agent node).
CONTEXT_PARTS = ("system", "tools")

_embedders: dict[tuple[str, str | None, str], Embedder] = {}
_embedders_lock = threading.Lock()
_PART_CACHE_SIZE = 4096
_part_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
_part_lock = threading.Lock()


def view_parts(
    request: ChatRequest, view: Sequence[str], max_chars_per_part: int, answer: str | None = None
) -> list[tuple[str, str]]:
    """The non-empty ``(part, text)`` pairs of ``request`` in the order of ``view``."""
    out: list[tuple[str, str]] = []
    for part in view:
        if part == "system":
            text = request.system_prompt()
        elif part == "tools":
            names = request.tool_names()
            text = ("tools: " + ", ".join(names)) if names else ""
        elif part == "last_user":
            text = request.last_user_message()
        elif part == "all_user":
            text = "\n".join(m.text() for m in request.messages if m.role == "user")
        elif part == "answer":
            text = answer or ""
        else:
            raise ValueError(
                f"The 'view' parameter of trace_view must list parts among {VIEW_PARTS}. Got {part!r} instead."
            )
        text = text.strip()[:max_chars_per_part]
        if text:
            out.append((part, text))
    return out


def trace_view(
    request: ChatRequest, view: Sequence[str], max_chars_per_part: int, answer: str | None = None
) -> str:
    """The view of a request as one string: its parts, each cut to ``max_chars_per_part``, one per line."""
    return "\n".join(text for _, text in view_parts(request, view, max_chars_per_part, answer))


def get_embedder(config: AADSettings) -> Embedder:
    """The configured embedder (``[embed] embedder`` with its ``[embedder.<name>]`` table), built once per
    process per name and parameters; the model loads lazily."""
    from aad_core.plugins.params import build_component

    name = config.embed.embedder
    key = (name, json.dumps(config.component_table("embedder", name), sort_keys=True, default=repr))
    with _embedders_lock:
        emb = _embedders.get(key)
        if emb is None:
            emb = build_component("embedder", name, config)
            _embedders[key] = emb
        return emb


def unit_vectors(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit length along its last axis (zero rows stay zero)."""
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embedder_named(name: str) -> Embedder:
    """The registered embedder ``name`` with its default settings, from :func:`get_embedder`'s cache."""
    from aad_core.config import AADSettings, EmbedConfig

    return get_embedder(AADSettings.model_construct(embed=EmbedConfig(embedder=name)))


def clear_caches() -> None:
    """Forget the cached embedders and part vectors of this process (tests, after a config change)."""
    with _embedders_lock:
        _embedders.clear()
    with _part_lock:
        _part_cache.clear()


def _text_key(text: str, model_id: str) -> str:
    return hashlib.sha256(f"{model_id}\x00{text}".encode()).hexdigest()


class EmbeddingCache:
    """Vectors by ``sha256(model_id, text)`` in ``cache_dir/embeddings.sqlite``."""

    def __init__(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / "embeddings.sqlite"
        self.conn = sqlite3.connect(self.path, timeout=60)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, dim INTEGER, vec BLOB)")

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        import numpy as np

        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            rows = self.conn.execute(
                f"SELECT key, vec FROM vectors WHERE key IN ({', '.join('?' * len(chunk))})", chunk
            ).fetchall()
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO vectors (key, dim, vec) VALUES (?, ?, ?)",
                [(k, int(v.shape[0]), v.astype("float32").tobytes()) for k, v in items.items()],
            )

    def close(self) -> None:
        self.conn.close()


def embed_texts(
    texts: Sequence[str], embedder: Embedder, *, cache_dir: Path | None = None, show_progress: bool = False
) -> np.ndarray:
    """Embed ``texts`` (float32, unit rows). Identical texts are embedded once; with ``cache_dir``
    vectors are read from / written to ``cache_dir/embeddings.sqlite`` so re-runs don't re-embed."""
    import numpy as np

    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    vectors: dict[str, np.ndarray] = {}
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    try:
        keys = {t: _text_key(t, embedder.model_id) for t in unique}
        if cache is not None:
            stored = cache.get(list(keys.values()))
            vectors = {t: stored[k] for t, k in keys.items() if k in stored}
        todo = [t for t in unique if t not in vectors]
        if todo:
            fresh = _checked(embedder.embed(todo, show_progress=show_progress), len(todo), embedder)
            new = dict(zip(todo, fresh))
            vectors.update(new)
            if cache is not None:
                cache.put({keys[t]: v for t, v in new.items()})
    finally:
        if cache is not None:
            cache.close()
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([vectors[t] for t in texts]).astype(np.float32, copy=False)


def _checked(vecs: Any, n: int, embedder: Embedder) -> np.ndarray:
    import numpy as np

    arr = np.asarray(vecs, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise AADError(
            f"Embedder {type(embedder).__name__} returned shape {arr.shape} for {n} texts; expected ({n}, dim).",
            hint="Fix the embedder plugin's embed() method.",
        )
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


def _combine(part_vectors: list[np.ndarray]) -> np.ndarray:
    import numpy as np

    v = np.sum(part_vectors, axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def embed_part_lists(
    part_lists: Sequence[Sequence[tuple[str, str]]],
    embedder: Embedder,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embed many views given as ``(part, text)`` lists.

    Returns the combined request vectors ``(n, dim)`` and, per part name, the part's vectors
    ``(n, dim)`` (zero rows where the view lacks that part).
    """
    import numpy as np

    all_texts = [text for parts in part_lists for _, text in parts]
    vecs = embed_texts(all_texts, embedder, cache_dir=cache_dir, show_progress=show_progress)
    dim = vecs.shape[1] if vecs.size else _dimension(embedder)
    rows: dict[str, list[int]] = {}
    where: dict[str, list[int]] = {}
    i = 0
    for row, parts in enumerate(part_lists):
        for name, _ in parts:
            rows.setdefault(name, []).append(row)
            where.setdefault(name, []).append(i)
            i += 1
    per_part: dict[str, np.ndarray] = {}
    combined = np.zeros((len(part_lists), dim), dtype=np.float32)
    for name in rows:
        m = np.zeros((len(part_lists), dim), dtype=np.float32)
        m[rows[name]] = vecs[where[name]]
        per_part[name] = m
        combined += m
    norms = np.linalg.norm(combined, axis=1, keepdims=True)
    combined /= np.maximum(norms, 1e-12)
    return combined, per_part


def _dimension(embedder: Embedder) -> int:
    import numpy as np

    return int(np.asarray(embedder.embed(["x"])).shape[1])


def embed_requests(
    requests: Sequence[ChatRequest],
    config: AADSettings,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Embed requests with the configured embedder and view (the ``answer`` part is ignored: a
    request has none yet). Rows are unit vectors, comparable with the cluster centroids.

    Without ``cache_dir`` (the router's hot path) part vectors are kept in a small per-process LRU,
    so a shared system prompt is embedded once and each call embeds only its new parts.
    """
    import numpy as np

    embedder = get_embedder(config)
    view = [p for p in config.embed.view if p != "answer"]
    part_lists = [view_parts(r, view, config.embed.max_chars_per_part) for r in requests]
    if cache_dir is not None or len(requests) > 64:
        combined, _ = embed_part_lists(part_lists, embedder, cache_dir=cache_dir, show_progress=show_progress)
        return combined
    model_id = embedder.model_id
    texts = list(dict.fromkeys(text for parts in part_lists for _, text in parts))
    with _part_lock:
        known = {t: _part_cache[(model_id, t)] for t in texts if (model_id, t) in _part_cache}
        for t in known:
            _part_cache.move_to_end((model_id, t))
    todo = [t for t in texts if t not in known]
    if todo:
        fresh = _checked(embedder.embed(todo), len(todo), embedder)
        with _part_lock:
            for t, v in zip(todo, fresh):
                known[t] = v
                _part_cache[(model_id, t)] = v
            while len(_part_cache) > _PART_CACHE_SIZE:
                _part_cache.popitem(last=False)
    if not known:
        return np.zeros((len(requests), _dimension(embedder)), dtype=np.float32)
    dim = next(iter(known.values())).shape[0]
    out = np.zeros((len(requests), dim), dtype=np.float32)
    for row, parts in enumerate(part_lists):
        if parts:
            out[row] = _combine([known[t] for _, t in parts])
    return out
