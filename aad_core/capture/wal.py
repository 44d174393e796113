"""The write-ahead log: submitted traces, encrypted, on disk within ``wal_flush_ms`` (``.aad/wal/``).

The capture writer's WAL thread appends every batch of submitted traces, *before* redaction, as
one record to a segment file and fsyncs it, so a process killed with ``kill -9`` loses only the
traces of the last few tens of milliseconds; the next writer of the workspace redacts and stores
the rest. Raw traces never touch the disk in plaintext:

* each record is the batch's JSON lines encrypted with AES-256-GCM under a random per-workspace
  key (``.aad/wal/key``, mode 0600; a fresh 96-bit nonce per record; a cut or altered record fails
  authentication and is skipped, never parsed);
* a segment is deleted (or, the one being appended to, truncated to its header) as soon as every
  trace in it is stored, spooled redacted, or counted lost.

The key lives beside the segments: this protects against casual disclosure (a copied or backed
up traces folder, ``grep``), not against someone who can read the workspace.

Layout: a segment is ``<time_ns>-<pid>-<random>.seg`` (``…-plain.seg`` when its writer does not redact:
only such a segment may be stored unredacted by another writer that does not redact; any other waits
for a writer that redacts): a 16-byte header (magic and key id), then
records of ``length (4 bytes) | nonce (12) | ciphertext and tag (length)``. Its writer holds an
exclusive ``flock`` on it for as long as it may append or still owes traces in it, so concurrent
writers never recover each other's live segments; a segment whose lock is free belongs to a dead
(or closed) writer and is recovered by whoever takes the lock first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aad_core.capture.spool import pid_alive
from aad_core.keyfile import KeyFileError, load_secret
from aad_core.keyfile import fsync_dir as _fsync_dir
from aad_core.keyfile import write_all as _write_all
from aad_core.schema import Trace

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: a segment's owner is told by its pid instead
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAGIC = b"AADWAL1\n"
KEY_FILE = "key"
KEY_BYTES = 32
KEY_ID_BYTES = 8
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES
NONCE_BYTES = 12
LENGTH_BYTES = 4
TAG_BYTES = 16
SEGMENT_SUFFIX = ".seg"
#: Before :data:`SEGMENT_SUFFIX`: the segment of a writer that does not redact (``[capture] redact = false``).
PLAIN_TAG = "-plain"
TMP_SUFFIX = ".tmp"
#: A segment stops taking records past this size; it is deleted once all its traces are stored.
SEGMENT_BYTES = 4 << 20
#: Records longer than this are taken for a corrupt length field.
MAX_RECORD_BYTES = 256 << 20


class WalKeyError(KeyFileError):
    """The WAL key file exists but is not a key."""


def _pid_of(path: Path) -> int | None:
    fields = path.name.split("-")
    return int(fields[1]) if len(fields) >= 3 and fields[1].isdigit() else None


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another open file holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def load_key(folder: Path) -> bytes:
    """The workspace's WAL key, created (32 random bytes, mode 0600) when missing. Two writers
    starting at once agree on one key (:func:`aad_core.keyfile.load_secret`)."""
    return load_secret(folder / KEY_FILE, KEY_BYTES, what="WAL key", error=WalKeyError)


def key_id(key: bytes) -> bytes:
    """A short fingerprint of ``key``, stored in each segment's header (tells a foreign key from damage)."""
    return hashlib.sha256(b"aad-wal-key-id:" + key).digest()[:KEY_ID_BYTES]


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int = HEADER_BYTES
    pending: int = 0  # traces appended and not yet acknowledged
    sealed: bool = False  # takes no more records


@dataclass
class Leftover:
    """A segment of a dead writer, locked by this process while its traces are stored.

    ``traces``: the traces of every intact record; ``skipped``: records that were cut (the last
    one, by a kill) or failed authentication, plus lines that are not a trace; ``problem``: why
    nothing could be read, or None; ``keep``: leave the file in place (it may be readable by
    another aad version) rather than delete it."""

    path: Path
    fd: int
    traces: list[Trace] = field(default_factory=list)
    skipped: int = 0
    problem: str | None = None
    keep: bool = False

    @property
    def plain(self) -> bool:
        """Written by a writer that does not redact: another such writer may store it as it is."""
        return self.path.name.endswith(PLAIN_TAG + SEGMENT_SUFFIX)

    def remove(self) -> None:
        """Every trace is stored: delete the segment (then unlock it)."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.release()

    def release(self) -> None:
        """Leave the segment for a later writer (unlock it)."""
        try:
            os.close(self.fd)
        except OSError:
            pass


class WriteAheadLog:
    """One writer's segments in ``folder``: append encrypted batches, acknowledge stored traces,
    and find the segments that dead writers left behind."""

    def __init__(self, folder: Path, *, segment_bytes: int = SEGMENT_BYTES, plain: bool = False) -> None:
        """``plain``: this writer does not redact (its segments are tagged so)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.folder = folder
        self.plain = plain
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(folder, 0o700)
        except OSError:
            pass
        key = load_key(folder)
        self._aead: Any = AESGCM(key)
        self._key_id = key_id(key)
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._current: int | None = None
        self._next = 0
        self._closed = False

    # -- appending ---------------------------------------------------------------------------
    def append(self, payloads: Sequence[bytes]) -> int:
        """Encrypt ``payloads`` (one serialised trace each) as one record, append it to the
        current segment and fsync it. Returns the segment's number for :meth:`ack`. Raises
        (OSError) when the record could not be made durable; nothing of it is left then."""
        plain = b"\n".join(payloads)
        with self._lock:
            if self._closed:
                raise RuntimeError("the write-ahead log is closed")
            sid = self._current if self._current is not None else self._open_segment()
            seg = self._segments[sid]
            seg.pending += len(payloads)  # no ack can empty the segment while the record is written
            offset = seg.size
        nonce = os.urandom(NONCE_BYTES)
        length = (len(plain) + TAG_BYTES).to_bytes(LENGTH_BYTES, "big")
        record = length + nonce + self._aead.encrypt(nonce, plain, self._key_id + length)
        try:
            _write_all(seg.fd, record)
            os.fsync(seg.fd)
        except BaseException:
            with self._lock:
                seg.pending -= len(payloads)
                try:
                    os.ftruncate(seg.fd, offset)  # no partial record left behind
                except OSError:
                    pass
                seg.size = offset
                if seg.pending <= 0 and seg.size <= HEADER_BYTES:
                    self._drop(sid)
            raise
        with self._lock:
            seg.size = offset + len(record)
            if seg.size >= self._segment_bytes and self._current == sid:
                seg.sealed, self._current = True, None
        return sid

    def ack(self, sid: int, n: int) -> None:
        """``n`` traces of segment ``sid`` are stored, spooled or counted lost. A segment with
        none left is deleted, or truncated to its header when it is the one being appended to."""
        with self._lock:
            seg = self._segments.get(sid)
            if seg is None:
                return
            seg.pending -= n
            if seg.pending > 0:
                return
            if seg.sealed or self._closed:
                self._drop(sid)
            elif seg.size > HEADER_BYTES:
                try:
                    os.ftruncate(seg.fd, HEADER_BYTES)
                    seg.size = HEADER_BYTES
                except OSError:
                    pass

    def segments(self) -> int:
        """Segment files in the folder, of every writer (0 when it cannot be read)."""
        try:
            return sum(1 for _ in self.folder.glob("*" + SEGMENT_SUFFIX))
        except OSError:
            return 0

    def close(self) -> None:
        """Delete this writer's segments that owe nothing (no empty file is left) and unlock the
        others, which the next writer of the workspace recovers."""
        with self._lock:
            self._closed = True
            self._current = None
            for sid in list(self._segments):
                seg = self._segments[sid]
                if seg.pending <= 0:
                    self._drop(sid)
                else:
                    os.close(seg.fd)
                    del self._segments[sid]

    def _open_segment(self) -> int:
        """Create, lock and register a new segment (under a temporary name until its header is
        durable, so that no other writer ever sees it unlocked)."""
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{PLAIN_TAG if self.plain else ''}"
        tmp = self.folder / (name + TMP_SUFFIX)
        path = self.folder / (name + SEGMENT_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _try_lock(fd)
            _write_all(fd, MAGIC + self._key_id)
            os.fsync(fd)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.folder)
        sid = self._next
        self._next += 1
        self._segments[sid] = _Segment(path, fd)
        self._current = sid
        return sid

    def _drop(self, sid: int) -> None:
        seg = self._segments.pop(sid)
        if self._current == sid:
            self._current = None
        try:
            seg.path.unlink(missing_ok=True)
        except OSError as err:
            log.debug("aad capture: cannot delete WAL segment %s: %s", seg.path, err)
        finally:
            os.close(seg.fd)

    # -- recovery ----------------------------------------------------------------------------
    def leftovers(self, skip: set[Path] | None = None) -> Iterator[Leftover]:
        """The segments of writers that are gone, oldest first, each locked and decrypted.
        Segments another live writer holds are left alone; empty ones (a writer killed before
        its first record) are deleted. ``skip``: paths not to take again."""
        with self._lock:
            own = {seg.path for seg in self._segments.values()}
        self._remove_stale_tmp()
        for path in sorted(self.folder.glob("*" + SEGMENT_SUFFIX)):
            if path in own or (skip and path in skip):
                continue
            if fcntl is None:  # pragma: no cover - Windows: the pid in the name tells its owner
                pid = _pid_of(path)
                if pid is not None and (pid == os.getpid() or pid_alive(pid)):
                    continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # another writer recovered and deleted it
            try:
                if not _try_lock(fd) or os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)  # live, or already recovered and deleted by another writer
                    continue
                data = _read_all(fd)
            except OSError:
                os.close(fd)
                continue
            left = Leftover(path, fd)
            self._decode(data, left)
            if not left.traces and not left.skipped and left.problem is None:
                left.remove()  # empty: nothing to recover
                continue
            yield left

    def _decode(self, data: bytes, left: Leftover) -> None:
        from cryptography.exceptions import InvalidTag

        if len(data) < HEADER_BYTES:
            left.skipped += 1 if data else 0  # cut inside the header: a writer killed at its first write
            return
        if data[: len(MAGIC)] != MAGIC:
            left.problem, left.keep = "not a WAL segment of this aad version", True
            return
        kid = data[len(MAGIC) : HEADER_BYTES]
        if kid != self._key_id:
            left.problem = "encrypted with another key (the WAL key file was replaced)"
            return
        pos = HEADER_BYTES
        while pos < len(data):
            head = data[pos : pos + LENGTH_BYTES]
            size = int.from_bytes(head, "big") if len(head) == LENGTH_BYTES else -1
            end = pos + LENGTH_BYTES + NONCE_BYTES + size
            if size < TAG_BYTES or size > MAX_RECORD_BYTES or end > len(data):
                left.skipped += 1  # a cut last record (the kill came mid-write), or a damaged length
                return
            nonce = data[pos + LENGTH_BYTES : pos + LENGTH_BYTES + NONCE_BYTES]
            try:
                plain = self._aead.decrypt(nonce, data[pos + LENGTH_BYTES + NONCE_BYTES : end], kid + head)
            except InvalidTag:
                left.skipped += 1  # damaged: authenticated encryption never yields altered text
                pos = end
                continue
            pos = end
            for line in plain.split(b"\n"):
                if not line:
                    continue
                try:
                    left.traces.append(Trace.model_validate_json(line))
                except (ValueError, RecursionError):
                    left.skipped += 1

    def _remove_stale_tmp(self) -> None:
        """Temporary files (a segment being created, a key being written) of dead processes."""
        for tmp in self.folder.glob("*" + TMP_SUFFIX):
            pid = _pid_of(tmp)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                tmp.unlink(missing_ok=True)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
