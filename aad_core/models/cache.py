"""aad's user cache (``$AAD_CACHE_DIR`` or ``~/.cache/aad``) and a cross-process lock for
preparing what goes into it (materialised students, exported encoders)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from aad_core.errors import AADError

CACHE_ENV = "AAD_CACHE_DIR"


def cache_base() -> Path:
    """aad's user cache: ``$AAD_CACHE_DIR`` or ``~/.cache/aad``."""
    base = os.environ.get(CACHE_ENV)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "aad"



class FileLock:
    """A small cross-process lock: an exclusively created file, stale after ``stale_s``."""

    def __init__(self, path: Path, *, timeout_s: float = 600.0, stale_s: float = 900.0) -> None:
        self.path, self.timeout_s, self.stale_s = path, timeout_s, stale_s

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > self.stale_s:
                        self.path.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise AADError(
                        f"Timed out waiting for the lock {self.path} (another aad process is preparing a model).",
                        hint=f"If no other aad process runs, delete {self.path}.",
                    ) from None
                time.sleep(0.5)

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)
