"""The spool: JSONL files of traces that could not be written to the store yet (``.aad/spool/``).

A file appears complete or not at all (written as ``.part``, then renamed). Before a file is
loaded back it is claimed by an atomic rename, so concurrent writers never load the same file
twice; a claim left by a process that died while loading is given back.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aad_core.schema import Trace

SPOOL_SUFFIX = ".jsonl"
CLAIM_SUFFIX = ".loading"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class SpoolClaim:
    """A spool file this process is loading: ``path`` is its name in the spool, ``claim`` its name while claimed."""

    path: Path
    claim: Path

    @property
    def bad_path(self) -> Path:
        """Where unreadable lines of the file are kept."""
        return self.path.with_suffix(".bad")

    def read(self) -> tuple[list[Trace], list[str]]:
        """The traces in the file, and the lines that are not a valid trace."""
        traces: list[Trace] = []
        bad: list[str] = []
        with self.claim.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    traces.append(Trace.model_validate_json(line))
                except ValueError:
                    bad.append(line if line.endswith("\n") else line + "\n")
        return traces, bad

    def give_back(self) -> None:
        """Return the file to the spool (loading failed; it is retried later)."""
        self.claim.replace(self.path)

    def keep_bad(self, lines: list[str]) -> None:
        self.bad_path.write_text("".join(lines), encoding="utf-8")

    def remove(self) -> None:
        """The file is loaded: delete it."""
        self.claim.unlink()


class Spool:
    """The spool folder: write a batch as one file, count the files, claim them oldest first."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, traces: Sequence[Trace]) -> None:
        """Write ``traces`` as one new spool file; raises when the folder cannot be written."""
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / (name + ".part")
        with part.open("w", encoding="utf-8") as fh:
            for t in traces:
                fh.write(t.model_dump_json(exclude_none=True) + "\n")
        part.replace(self.folder / (name + SPOOL_SUFFIX))  # complete files only

    def exists(self) -> bool:
        return self.folder.is_dir()

    def count(self) -> int:
        """Files waiting to be loaded back (0 when the folder cannot be read)."""
        try:
            return sum(1 for _ in self.folder.glob("*" + SPOOL_SUFFIX))
        except OSError:
            return 0

    def claims(self) -> Iterator[SpoolClaim]:
        """Claim the spool files one at a time, oldest first, skipping those another writer took."""
        self._release_stale_claims()
        for path in sorted(self.folder.glob("*" + SPOOL_SUFFIX)):
            claim = path.with_name(f"{path.name}.{os.getpid()}{CLAIM_SUFFIX}")
            try:
                path.replace(claim)
            except FileNotFoundError:
                continue  # another writer took it
            yield SpoolClaim(path, claim)

    def _release_stale_claims(self) -> None:
        """Give back files claimed by a process that died while loading them."""
        for claim in self.folder.glob("*" + CLAIM_SUFFIX):
            pid_text = claim.name[: -len(CLAIM_SUFFIX)].rsplit(".", 1)[-1]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                try:
                    claim.replace(claim.with_name(claim.name[: -len(CLAIM_SUFFIX)].rsplit(".", 1)[0]))
                except OSError:
                    pass
