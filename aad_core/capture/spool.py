"""The spool: JSONL files of traces that could not be written to the store yet (``.aad/spool/``).

A file appears complete or not at all (written as ``.part``, flushed to disk, then renamed); a
``.part`` file whose write failed (disk full) is removed, and one left by a process that died
while writing it is recovered by the next writer (its complete lines are loaded, a cut last line
is kept aside in a ``.bad`` file). Before a file is loaded back it is claimed by an atomic rename,
so concurrent writers never load the same file twice; a claim left by a process that died while
loading is given back. The spool only ever holds redacted traces.
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
PART_SUFFIX = ".part"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (spool claims and WAL segments name their owner's pid)."""
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
        with self.claim.open("rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                line = raw.decode("utf-8", errors="replace")
                try:
                    traces.append(Trace.model_validate_json(raw))
                except (ValueError, RecursionError):  # invalid UTF-8, a cut line, not a trace
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
        part = self.folder / (name + PART_SUFFIX)
        data = b"".join(t.model_dump_json(exclude_none=True).encode("utf-8") + b"\n" for t in traces)
        try:
            with part.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            part.replace(self.folder / (name + SPOOL_SUFFIX))  # complete files only
        except BaseException:
            try:  # disk full, permissions: leave no empty or partial file behind
                part.unlink()
            except OSError:
                pass
            raise

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
        """Give back files claimed by a process that died while loading them, and recover the
        files a process that died was writing (empty ones are removed)."""
        for part in self.folder.glob("*" + PART_SUFFIX):
            fields = part.name.split("-")
            if len(fields) < 3 or not fields[1].isdigit() or pid_alive(int(fields[1])):
                continue
            try:
                if part.stat().st_size == 0:
                    part.unlink()
                else:
                    part.replace(part.with_name(part.name[: -len(PART_SUFFIX)] + SPOOL_SUFFIX))
            except OSError:
                pass
        for claim in self.folder.glob("*" + CLAIM_SUFFIX):
            pid_text = claim.name[: -len(CLAIM_SUFFIX)].rsplit(".", 1)[-1]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
                try:
                    claim.replace(claim.with_name(claim.name[: -len(CLAIM_SUFFIX)].rsplit(".", 1)[0]))
                except OSError:
                    pass
