"""A workspace: ``aad.toml`` plus the ``.aad/`` folder that holds every artifact.

::

    aad.toml
    .aad/
      traces.db            SQLite (WAL) trace store
      spool/               traces that could not be written yet (capture), loaded back on start
      cache/               embedding cache and other derived data
      state/               the current artifact of each pipeline stage (JSON, NPY, PNG)
      specialists/<name>/<version>/   adapter_model.safetensors, adapter_config.json, manifest.json
      report.html
      pseudonym.key        the secret key of the pseudonyms of personal user / session ids (mode 0600)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from aad_core.config import CONFIG_FILE, AADSettings, default_config_toml, load_config
from aad_core.errors import WorkspaceError

DATA_DIR = ".aad"
#: The key of the redactor's pseudonyms for personal ids, in ``.aad/`` (see :meth:`Workspace.pseudonym_key`).
PSEUDONYM_KEY_FILE = "pseudonym.key"
WORKSPACE_ENV = "AAD_WORKSPACE"


@dataclass
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    # -- creation and discovery --------------------------------------------------------------
    @classmethod
    def init(cls, root: Path | str = ".", *, exist_ok: bool = True) -> Workspace:
        """Create ``aad.toml`` (if missing) and ``.aad/`` with an empty trace store."""
        ws = cls(Path(root))
        ws.root.mkdir(parents=True, exist_ok=True)
        if ws.config_path.exists() and not exist_ok:
            raise WorkspaceError(f"{ws.config_path} already exists.", hint="Use the existing workspace or another folder.")
        if not ws.config_path.exists():
            ws.config_path.write_text(default_config_toml(), encoding="utf-8")
        for d in (ws.data_dir, ws.spool_dir, ws.cache_dir, ws.state_dir, ws.specialists_dir):
            d.mkdir(parents=True, exist_ok=True)
        ws.store().close()
        return ws

    @classmethod
    def find(cls, start: Path | str | None = None, *, create: bool = False) -> Workspace:
        """The workspace of a folder named by ``start`` (``workspace=``, ``--workspace``) or ``$AAD_WORKSPACE``.

        One rule, whichever of the three names the folder (``start`` wins over the variable):

        * a named folder is the workspace itself (its parents are not searched); when it holds no
          ``aad.toml`` it is created (``aad.toml`` and ``.aad/``, parents included) if ``create`` —
          what recording does: the capture handlers, :class:`~aad_core.capture.writer.CaptureWriter`
          and ``aad ingest`` — and refused otherwise (every other command and API: there would be
          nothing in it to read), with the fix in the error;
        * no folder named: the nearest folder at or above the current one with ``aad.toml``; none is
          an error (nothing is created in an arbitrary current folder).
        """
        source = None
        if start is not None and str(start) != "":
            source = "named by --workspace or workspace="
        elif os.environ.get(WORKSPACE_ENV):
            start, source = os.environ[WORKSPACE_ENV], f"${WORKSPACE_ENV}"
        if source is not None:
            folder = Path(str(start)).expanduser().resolve()
            if (folder / CONFIG_FILE).exists():
                return cls(folder)
            if create:
                return cls.init(folder)
            what = "does not exist" if not folder.exists() else f"has no {CONFIG_FILE}"
            if folder.exists() and not folder.is_dir():
                what = "is a file, not a folder"
            raise WorkspaceError(
                f"The workspace folder {folder} ({source}) {what}: it is not an aad workspace.",
                hint=f"Run 'aad init {folder}' to create it (capture and 'aad ingest' create it themselves), "
                f"or name another folder.",
            )
        here = Path.cwd().resolve()
        for folder in (here, *here.parents):
            if (folder / CONFIG_FILE).exists():
                return cls(folder)
        raise WorkspaceError(
            f"No aad workspace at or above {here} (no {CONFIG_FILE}).",
            hint=f"Run 'aad init .' first, or pass --workspace / set {WORKSPACE_ENV}.",
        )

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def db_path(self) -> Path:
        return self.data_dir / "traces.db"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "state"

    @property
    def specialists_dir(self) -> Path:
        return self.data_dir / "specialists"

    @property
    def report_path(self) -> Path:
        return self.data_dir / "report.html"

    @property
    def pseudonym_key_path(self) -> Path:
        return self.data_dir / PSEUDONYM_KEY_FILE

    def pseudonym_key(self) -> bytes:
        """The workspace's secret key for pseudonyms of personal ids (the redactor's keyed pseudonyms of
        ``Trace.user_id`` / ``session_id``): 32 random bytes in ``.aad/pseudonym.key`` (mode 0600), created
        on first use. Raises :class:`aad_core.keyfile.KeyFileError` (or OSError) when it cannot be had."""
        from aad_core.keyfile import load_secret

        return load_secret(self.pseudonym_key_path, what="pseudonym key")

    # -- config and store --------------------------------------------------------------------
    @cached_property
    def config(self) -> AADSettings:
        return load_config(self.config_path if self.config_path.exists() else None)

    @property
    def store_url(self) -> str | None:
        """``[store] url`` (None: the SQLite file ``.aad/traces.db``)."""
        return self.config.store.url

    def store(self, *, timeout_s: float = 60.0):  # -> TraceStore (SQLite or PostgreSQL; imports kept lazy)
        """The workspace's trace store: ``[store] url``, else SQLite in ``.aad/traces.db``."""
        from aad_core.store import open_store

        self.data_dir.mkdir(parents=True, exist_ok=True)
        return open_store(self.store_url, default_path=self.db_path, timeout_s=timeout_s)

    # -- stage artifacts ---------------------------------------------------------------------
    def state_path(self, name: str) -> Path:
        return self.state_dir / name

    def write_state(self, name: str, data: Any) -> Path:
        """Write a JSON artifact atomically, stamped with the aad version and time."""
        from aad_core import __version__

        path = self.state_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, dict):
            data = {"aad_version": __version__, "written_at": datetime.now(timezone.utc).isoformat(), **data}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
        return path

    def read_state(self, name: str, *, stage_hint: str | None = None) -> Any:
        path = self.state_path(name)
        if not path.exists():
            from aad_core.errors import StageError

            raise StageError(
                f"{path} does not exist yet.",
                hint=f"Run '{stage_hint}' first." if stage_hint else None,
            )
        return json.loads(path.read_text(encoding="utf-8"))
