"""The trace API: find, score and delete recorded calls (``aad traces list/export/feedback/delete``).

* :func:`find_traces` - the traces matching filters (task, source, status, time range, metadata
  ``key=value``, feedback score; :mod:`aad_core.store.base`).
* :func:`record_feedback` - attach a score (and a comment) to a recorded call: stored on the trace as
  ``Trace.feedback`` and usable as a filter (``min_score=``), e.g. to distil only from calls users
  liked. The LangChain and LlamaIndex handlers call it as ``handler.feedback(run_id, score, ...)``.
* :func:`run_tree` - the run tree of a recorded call's pipeline invocation: the chain / agent / tool runs
  above its calls (``metadata["aad_run_path"]``) and every stored call sharing its root run id
  (``aad traces show ID --tree``).
* :func:`delete_traces` - a data-deletion request: the traces leave the store (their bytes
  overwritten in SQLite), the spool (``.aad/spool/``) and the embedding cache; derived files under
  ``.aad/`` that still hold their text are removed (``purge=True``) or listed, and the trained
  specialists whose training split held them are named, since a model cannot unlearn a call without
  being trained again (``aad distill --force``). The paraphrases ``aad augment`` made of a deleted
  call (source ``augmented``) are deleted with it: they restate its text.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.schema import Trace, root_run_id, run_path
from aad_core.store.base import FILTER_KEYS, TraceFilter, merged_feedback

if TYPE_CHECKING:
    from aad_core.workspace import Workspace

#: Files under .aad/ searched for copies of deleted calls are skipped above this size (model weights).
MAX_SCAN_BYTES = 64 * 1024 * 1024
_MIN_TEXT = 12  # texts shorter than this are too common to count as a copy


def _open(target: Any) -> tuple[Any, bool]:
    """``(store, owned)`` for a Workspace, a folder, a CaptureWriter (flushed first) or a store."""
    from aad_core.workspace import Workspace

    if isinstance(target, (str, Path)):
        target = Workspace.find(target)
    if isinstance(target, Workspace):
        return target.store(), True
    flush = getattr(target, "flush", None)
    if callable(flush) and hasattr(target, "submit"):  # a CaptureWriter: what it has queued is stored first
        flush()
        return target.store, False
    return target, False


def find_traces(target: Any, *, limit: int | None = None, **filters: Any) -> Iterator[Trace]:
    """The traces of ``target`` (a Workspace, its folder, or a store) that match ``filters``."""
    store, owned = _open(target)
    try:
        yield from store.iter_traces(limit=limit, **filters)
    finally:
        if owned:
            store.close()


def record_feedback(target: Any, trace_id: str, score: float, *, comment: str | None = None, name: str = "user",
                    by: str | None = None) -> dict[str, Any]:
    """Attach ``score`` (any number: 1/0, -1..1, 0..5...) and an optional comment to the trace ``trace_id``.

    ``target``: a Workspace or its folder, a store, or a CaptureWriter (its queue is flushed first, so
    feedback given right after the call finds it). Scores are kept by ``name`` (e.g. ``"user"``,
    ``"thumbs"``, ``"grader"``); the latest one is the trace's ``feedback["score"]``, which
    ``min_score=`` / ``--min-score`` filter on. Returns the trace's new feedback; raises
    :class:`~aad_core.errors.AADError` when no trace has that id (not recorded, sampled out, or deleted).
    """
    store, owned = _open(target)
    try:
        trace = store.get(str(trace_id))
        if trace is None:
            raise AADError(
                f"No recorded trace has the id {trace_id!r}.",
                hint="LangChain traces use the run_id; 'aad traces list' shows the ids (a call may also have "
                "been sampled out by [capture] sample_rate, or capture was off).",
            )
        feedback = merged_feedback(trace.feedback, score, comment=comment, name=name, by=by)
        store.set_feedback(trace.id, feedback)
        return feedback
    finally:
        if owned:
            store.close()


@dataclass
class RunNode:
    """One run of a pipeline's tree: a chain, agent or tool run (known from the recorded calls' paths; such
    runs are not stored themselves) or a recorded call (``trace`` set)."""

    run_id: str
    name: str = ""
    trace: Trace | None = None
    children: list[RunNode] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_id": self.run_id, "name": self.name}
        if self.trace is not None:
            t = self.trace
            out["trace"] = {k: v for k, v in {
                "id": t.id, "created_at": t.created_at.isoformat(), "source": t.source, "task": t.task,
                "model": t.model, "status": t.status, "latency_ms": t.latency_ms, "session_id": t.session_id,
                "user_id": t.user_id}.items() if v is not None}
        out["children"] = [c.to_json() for c in self.children]
        return out


@dataclass
class RunTree:
    """The run tree of one pipeline invocation (:func:`run_tree`)."""

    root_run_id: str
    root: RunNode
    #: The recorded calls in it, oldest first.
    traces: list[Trace]

    def to_json(self) -> dict[str, Any]:
        return {"root_run_id": self.root_run_id, "calls": len(self.traces), "tree": self.root.to_json()}


def build_run_tree(root_id: str, traces: Iterable[Trace]) -> RunTree:
    """The tree of the calls ``traces`` of one invocation (root ``root_id``): each call hangs under the runs of
    its recorded path, merged by run id; children in the order their first call was made."""
    members = sorted(traces, key=lambda t: t.created_at)
    root = RunNode(root_id)
    nodes = {root_id: root}
    for t in members:
        parent = root
        for entry in run_path(t):
            rid = entry["run_id"]
            if rid == root_id:
                root.name = root.name or entry["name"]
                parent = root
                continue
            node = nodes.get(rid)
            if node is None:
                node = nodes[rid] = RunNode(rid, entry["name"])
                parent.children.append(node)
            parent = node
        own = t.run_id or t.id
        leaf = nodes.get(own)
        if leaf is None:
            leaf = nodes[own] = RunNode(own)
            parent.children.append(leaf)
        leaf.trace = t
    return RunTree(root_run_id=root_id, root=root, traces=members)


def run_tree(target: Any, trace_id: str) -> RunTree:
    """The run tree of the pipeline invocation that made the call ``trace_id``: every stored call sharing its
    root run id (``metadata["aad_root_run_id"]``; a call recorded without one is its own root) under the
    chain / agent / tool runs of their ``metadata["aad_run_path"]``. ``target``: as for :func:`find_traces`.
    Raises :class:`~aad_core.errors.AADError` when no trace has that id."""
    store, owned = _open(target)
    try:
        trace = store.get(str(trace_id))
        if trace is None:
            raise AADError(f"No recorded trace has the id {trace_id!r}.",
                           hint="'aad traces list' shows the ids (LangChain calls use their run_id).")
        root_id = root_run_id(trace)
        members = {t.id: t for t in store.iter_traces(root_run_id=root_id)}
    finally:
        if owned:
            store.close()
    members.setdefault(trace.id, trace)
    return build_run_tree(root_id, members.values())


@dataclass
class Deletion:
    """What :func:`delete_traces` did."""

    ids: list[str]
    deleted: int = 0
    spooled: int = 0
    cached_vectors: int = 0
    removed_files: list[str] = field(default_factory=list)
    files_with_text: list[str] = field(default_factory=list)
    files_with_ids: list[str] = field(default_factory=list)
    specialists: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ids": self.ids, "deleted": self.deleted, "spooled": self.spooled, "cached_vectors": self.cached_vectors,
            "removed_files": self.removed_files, "files_with_text": self.files_with_text,
            "files_with_ids": self.files_with_ids, "specialists": self.specialists,
        }


def delete_traces(ws: Workspace, ids: Iterable[str] | None = None, *, purge: bool = True, everything: bool = False,
                  **filters: Any) -> Deletion:
    """Delete the traces ``ids`` and/or those matching ``filters`` from ``ws`` (see the module's docstring).

    With neither ids nor filters nothing is deleted unless ``everything=True``. ``purge``: remove the
    derived files under ``.aad/`` (stage state, report, caches) that hold text of a deleted call;
    False lists them in ``files_with_text`` instead. Trained specialists are never removed here:
    the ones whose training split held a deleted call are in ``specialists``.
    """
    unknown = set(filters) - set(FILTER_KEYS)
    if unknown:
        raise TypeError(f"Unknown trace filter(s) {sorted(unknown)}; the filters are {', '.join(FILTER_KEYS)}.")
    active = {k: v for k, v in filters.items() if v not in (None, {}, [], "")}
    if ids is None and not active and not everything:
        raise AADError("Say which traces to delete: ids, or filters (task, source, time range, metadata...).",
                       hint="'aad traces delete ID...' or 'aad traces delete --where user=alice'; "
                       "--all deletes every trace.")
    store = ws.store()
    try:
        flt = TraceFilter.of(**active)
        given = None if ids is None else list(dict.fromkeys(str(i) for i in ids))
        if given is not None:  # the ids given; with filters too, those of them that match the filters
            wanted = given if not active else [t.id for t in store.iter_traces(ids=given) if flt.matches(t)]
        else:
            wanted = [t.id for t in store.iter_traces(**active)]
        wanted += _augmented_from(store, wanted)
        traces = list(store.iter_traces(ids=wanted))
        report = Deletion(ids=wanted)
        report.specialists = _specialists_that_saw(ws, set(wanted))
        report.deleted = store.delete(wanted)
    finally:
        store.close()
    given_set = None if given is None else set(given)

    def spooled_match(trace: Trace) -> bool:  # the same selection, applied to traces not in the store yet
        return (given_set is None or trace.id in given_set) and flt.matches(trace)

    spooled_texts: list[Trace] = []
    report.spooled = _scrub_spool(ws.spool_dir, set(wanted), spooled_texts, spooled_match)
    traces += spooled_texts
    report.ids = list(dict.fromkeys(wanted + [t.id for t in spooled_texts]))
    gone = set(report.ids)
    report.cached_vectors = _scrub_embeddings(ws, traces)
    needles = _needles(traces)
    id_needles = [i.encode() for i in gone]
    for path in _derived_files(ws):
        try:
            if path.stat().st_size > MAX_SCAN_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        rel = str(path.relative_to(ws.root))
        if any(n in data for n in needles):
            if purge and ws.specialists_dir.resolve() not in path.resolve().parents:  # never break a specialist
                path.unlink(missing_ok=True)
                report.removed_files.append(rel)
            else:
                report.files_with_text.append(rel)
        elif any(n in data for n in id_needles):
            report.files_with_ids.append(rel)
    return report


# -- helpers -----------------------------------------------------------------------------------

def _augmented_from(store: Any, ids: list[str]) -> list[str]:
    """Ids of the ``aad augment`` paraphrases of the calls ``ids`` not among them."""
    from aad_core.schema import AUGMENTED_SOURCE, augmented_from

    gone = set(ids)
    if not gone:
        return []
    return [t.id for t in store.iter_traces(source=AUGMENTED_SOURCE)
            if t.id not in gone and augmented_from(t) in gone]


def _specialists_that_saw(ws: Workspace, ids: set[str]) -> list[dict[str, Any]]:
    """Trained specialists whose cluster's training split (clusters.json) holds one of ``ids``, or that were
    fitted on one of its held-out calls (a classifier's calibration part, ``metrics["heldout_trained_on"]``)."""
    from aad_core.artifacts import ClusterState
    from aad_core.plugins.components import HELDOUT_TRAINED_ON
    from aad_core.specialists import SpecialistRegistry

    try:
        state = ClusterState.load_optional(ws)
    except Exception:  # noqa: BLE001 - an unreadable state file: nothing to say about specialists
        return []
    if state is None:
        return []
    seen: dict[int, int] = {}
    for tid in ids:
        cid = state.assignments.get(tid)
        if cid is not None and state.split.get(tid) == "train":
            seen[cid] = seen.get(cid, 0) + 1
    try:
        specs = SpecialistRegistry(ws).list()
    except Exception:  # noqa: BLE001
        return []
    out = []
    for s in specs:
        n = seen.get(s.cluster_id, 0) + len(ids & set((s.metrics or {}).get(HELDOUT_TRAINED_ON) or ()))
        if n:
            out.append({"name": s.name, "version": s.version, "cluster_id": s.cluster_id, "promoted": s.promoted,
                        "traces": n})
    return out


def _scrub_spool(spool_dir: Path, ids: set[str], found: list[Trace], match: Any = None) -> int:
    """Rewrite the spool's files without the traces ``ids`` (and those ``match`` accepts); returns how
    many lines were removed."""
    if not spool_dir.exists():
        return 0
    removed = 0
    for path in sorted(spool_dir.iterdir()):
        if not path.is_file():
            continue
        try:
            lines = path.read_bytes().splitlines(keepends=True)
        except OSError:
            continue
        keep: list[bytes] = []
        for raw in lines:
            hit = False
            try:
                trace = Trace.model_validate_json(raw)
                hit = trace.id in ids or (match is not None and match(trace))
                if hit:
                    found.append(trace)
            except (ValueError, AttributeError):
                hit = any(i.encode() in raw for i in ids)  # a cut line: match its id as text
            if hit:
                removed += 1
            else:
                keep.append(raw)
        if len(keep) == len(lines):
            continue
        tmp = path.with_name(path.name + ".scrub")
        tmp.write_bytes(b"".join(keep))
        os.replace(tmp, path)
        if not keep:
            path.unlink(missing_ok=True)
    return removed


def _texts(trace: Trace, max_chars: int) -> set[str]:
    from aad_core.models.embedding import VIEW_PARTS, trace_view, view_parts

    parts = view_parts(trace.request, VIEW_PARTS, max_chars, answer=trace.answer_text())
    texts = {text for _, text in parts}
    texts.add(trace_view(trace.request, VIEW_PARTS, max_chars, answer=trace.answer_text()))
    return texts


def _scrub_embeddings(ws: Workspace, traces: list[Trace]) -> int:
    """Remove the cached vectors of the deleted traces' texts (every view part, every cached model)."""
    path = ws.cache_dir / "embeddings.sqlite"
    if not path.exists() or not traces:
        return 0
    from aad_core.models.embedding import _text_key

    max_chars = ws.config.embed.max_chars_per_part
    texts: set[str] = set()
    for t in traces:
        for limit in {max_chars, 1000}:
            texts |= _texts(t, limit)
    conn = sqlite3.connect(path, timeout=60)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        models = _cached_model_ids(ws, conn)
        keys = [_text_key(text, m) for text in texts for m in models]
        removed = 0
        with conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                cur = conn.execute(f"DELETE FROM vectors WHERE key IN ({', '.join('?' * len(chunk))})", chunk)
                removed += cur.rowcount
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed
    finally:
        conn.close()


def _cached_model_ids(ws: Workspace, conn: sqlite3.Connection) -> list[str]:
    """The embedder model ids whose vectors may be in the cache: the configured one, the ones the
    stage artifacts name, and the packaged default."""
    ids = {"sentence-transformers/all-MiniLM-L6-v2"}
    try:
        from aad_core.models.embedding import get_embedder

        ids.add(get_embedder(ws.config).model_id)
    except Exception:  # noqa: BLE001 - an embedder that cannot be built here still has its vectors removed below
        pass
    clusters = ws.state_path("clusters.json")
    if clusters.exists():
        try:
            model_id = json.loads(clusters.read_text(encoding="utf-8")).get("model_id")
            if model_id:
                ids.add(str(model_id))
        except (OSError, ValueError):
            pass
    return sorted(ids)


def _needles(traces: list[Trace]) -> list[bytes]:
    """Byte strings whose presence in a file means it holds text of one of ``traces``: the start of
    each user message and answer, as written raw and as JSON escapes it."""
    out: set[bytes] = set()
    for t in traces:
        texts = [m.text() for m in t.request.messages if m.role == "user"] + [t.answer_text()]
        for text in texts:
            text = (text or "").strip()
            if len(text) < _MIN_TEXT:
                continue
            head = text[:48]
            out.add(head.encode("utf-8"))
            out.add(json.dumps(head)[1:-1].encode("ascii"))
            out.add(json.dumps(head, ensure_ascii=False)[1:-1].encode("utf-8"))
    return sorted(out)


def _derived_files(ws: Workspace) -> list[Path]:
    """Files under .aad/ other than the trace store, the spool and the embedding cache (handled above)."""
    skip_dirs = {ws.spool_dir.resolve()}
    skip = {ws.db_path.resolve(), ws.db_path.with_name(ws.db_path.name + "-wal").resolve(),
            ws.db_path.with_name(ws.db_path.name + "-shm").resolve()}
    cache = ws.cache_dir / "embeddings.sqlite"
    skip |= {cache.resolve(), cache.with_name(cache.name + "-wal").resolve(),
             cache.with_name(cache.name + "-shm").resolve()}
    out: list[Path] = []
    if not ws.data_dir.exists():
        return out
    for path in sorted(ws.data_dir.rglob("*")):
        if not path.is_file() or path.resolve() in skip or any(d in path.resolve().parents for d in skip_dirs):
            continue
        out.append(path)
    return out
