"""Shared fixtures. Fast tests use tiny in-process models; tests marked ``real_model`` load the
real defaults (all-MiniLM-L6-v2, SmolLM2-135M-Instruct) from their PyPI wheels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for a model hub or a public-suffix list from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

from aad_core.plugins import reset_plugin_manager  # noqa: E402
from aad_core.schema import ChatRequest, Message, Trace, Usage  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402

#: A folder whose data/ holds the real data sets: the copy that ships with aad (aad_core/demo/data).
SHARED = Path(__file__).resolve().parents[1] / "aad_core" / "demo"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh, initialised workspace in a temporary folder."""
    return Workspace.init(tmp_path / "ws")


@pytest.fixture(autouse=True)
def _fresh_plugin_manager():
    """Each test sees plugins loaded from scratch (tests may change sys.path or the env)."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def make_trace(user: str, answer: str, *, system: str = "You are a helpful assistant.", task: str | None = None,
               **kwargs) -> Trace:
    """A minimal ok trace: system + user -> assistant answer."""
    return Trace(
        source="test",
        task=task,
        model="teacher-model",
        request=ChatRequest(messages=[Message(role="system", content=system), Message(role="user", content=user)]),
        response=Message(role="assistant", content=answer),
        usage=Usage(prompt_tokens=len(user.split()) + 5, completion_tokens=len(answer.split()),
                    total_tokens=len(user.split()) + 5 + len(answer.split())),
        **kwargs,
    )


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED / 'data'} (the packaged real data) is not present")
    return SHARED


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (the ``pgserver`` wheel: a bundled server, started in a
    temporary folder, stopped at the end). Skipped only outside CI when pgserver is not installed."""
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip("pgserver is not installed (pip install 'aad[test]')")
        # Not under pytest's tmp_path: as root, pgserver runs the server as another user, who cannot enter
        # pytest's private folder.
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="aad-pg-")
        server = pgserver.get_server(folder, cleanup_mode="stop")
    yield server
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh, empty schema on the session's PostgreSQL server (``aad_schema=`` parameter)."""
    import uuid

    sep = "&" if "?" in postgres_server.get_uri() else "?"
    return f"{postgres_server.get_uri()}{sep}aad_schema=t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An empty trace store on each backend: SQLite and a fresh schema on the session's PostgreSQL server."""
    from aad_core.store import open_store

    if request.param == "sqlite":
        st = open_store(None, default_path=tmp_path / ".aad" / "traces.db")
    else:
        st = open_store(request.getfixturevalue("postgres_url"), default_path=tmp_path / "unused.db")
    yield st
    st.close()
