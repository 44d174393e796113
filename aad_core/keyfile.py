"""A workspace's secret keys: random bytes in a file of mode 0600, created on first use.

The write-ahead log's key (``.aad/wal/key``, :mod:`aad_core.capture.wal`) and the key of the
redactor's pseudonyms for identity fields (``.aad/pseudonym.key``,
:meth:`aad_core.workspace.Workspace.pseudonym_key`) are made here. Two processes
starting at once agree on one key: it is written to a private temporary file first and linked into
place, which fails when another process was first.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

KEY_BYTES = 32
#: Suffix of a key file being written (``.<name>-<pid>-<random>.tmp``).
TMP_SUFFIX = ".tmp"


class KeyFileError(RuntimeError):
    """A key file exists but does not hold a key (or cannot be created)."""


def fsync_dir(folder: Path) -> None:
    """Make a created or renamed file's name durable (best effort; not possible everywhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def load_secret(path: Path, nbytes: int = KEY_BYTES, *, what: str = "key",
                error: type[Exception] = KeyFileError) -> bytes:
    """The key in ``path``, created (``nbytes`` random bytes, mode 0600) when missing; a key file that
    others could read is made private again. ``error`` (naming ``what``) when the file holds no key."""
    folder = path.parent
    for _ in range(3):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None:
            if len(data) != nbytes:
                raise error(f"{path} is not a {what} ({len(data)} bytes, expected {nbytes})")
            try:
                if os.stat(path).st_mode & 0o077:
                    os.chmod(path, 0o600)
            except OSError:
                pass
            return data
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, os.urandom(nbytes))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # complete or absent, and never replaces another process's key
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(folder)
    raise error(f"cannot create or read the {what} {path}")
