"""Workspace resolution (issue 18): a folder named by ``workspace=``, ``--workspace`` or ``$AAD_WORKSPACE``
follows one rule. Recording (capture, ``aad ingest``) creates a missing one; everything else refuses it
with the folder, where its name came from, and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aad_core.capture.writer import CaptureWriter
from aad_core.cli import app
from aad_core.errors import WorkspaceError
from aad_core.workspace import Workspace
from conftest import make_trace

runner = CliRunner()


def _jsonl(path: Path) -> Path:
    line = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps({"request": {"messages": line["messages"][:1]},
                                "response": {"choices": [{"message": line["messages"][1]}]}}) + "\n")
    return path


def _capture(new: Path, monkeypatch, how: str) -> None:
    if how == "argument":
        writer = CaptureWriter(workspace=str(new), redact=False)
    else:
        monkeypatch.setenv("AAD_WORKSPACE", str(new))
        writer = CaptureWriter(redact=False)
    with writer:
        writer.submit(make_trace("hello", "hi"))
    assert writer.stats()["written"] == 1


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("AAD_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_capture_creates_a_named_missing_workspace_either_way(tmp_path: Path, monkeypatch, how: str) -> None:
    new = tmp_path / "a" / "new-agent"
    _capture(new, monkeypatch, how)
    assert (new / "aad.toml").exists()
    with Workspace(new).store() as store:
        assert store.count() == 1


@pytest.mark.parametrize("how", ["option", "environment"])
def test_ingest_creates_a_named_missing_workspace_either_way(tmp_path: Path, monkeypatch, how: str) -> None:
    new = tmp_path / "ingested"
    args = ["ingest", str(_jsonl(tmp_path / "calls.jsonl")), "--no-redact"]
    if how == "option":
        args += ["--workspace", str(new)]
    else:
        monkeypatch.setenv("AAD_WORKSPACE", str(new))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (new / "aad.toml").exists() and "stored 1 new trace" in result.output


def test_ingest_of_an_invalid_file_creates_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = runner.invoke(app, ["ingest", str(bad), "-w", str(tmp_path / "nope")])
    assert result.exit_code == 1 and not (tmp_path / "nope").exists()


@pytest.mark.parametrize("how", ["option", "environment", "api"])
def test_reading_refuses_a_named_missing_workspace_the_same_way(tmp_path: Path, monkeypatch, how: str) -> None:
    new = tmp_path / "missing"
    if how == "api":
        with pytest.raises(WorkspaceError) as err:
            Workspace.find(new)
        message = err.value.message + " " + (err.value.hint or "")
    else:
        args = ["traces", "stats"]
        if how == "option":
            args += ["--workspace", str(new)]
        else:
            monkeypatch.setenv("AAD_WORKSPACE", str(new))
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        message = " ".join(result.output.split())
    assert str(new) in message and "does not exist" in message and f"aad init {new}" in message
    assert ("$AAD_WORKSPACE" in message) == (how == "environment")
    assert not new.exists()


def test_a_named_folder_is_the_workspace_itself_not_a_parent(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "ws")
    sub = ws.root / "sub"
    sub.mkdir()
    with pytest.raises(WorkspaceError, match="has no aad.toml"):
        Workspace.find(sub)
    assert Workspace.find(ws.root).root == ws.root
    assert Workspace.find(sub, create=True).root == sub.resolve()  # recording makes it a workspace of its own


def test_the_argument_wins_over_the_environment_and_no_name_searches_upward(tmp_path: Path, monkeypatch) -> None:
    a, b = Workspace.init(tmp_path / "a"), Workspace.init(tmp_path / "b")
    monkeypatch.setenv("AAD_WORKSPACE", str(a.root))
    assert Workspace.find().root == a.root
    assert Workspace.find(b.root).root == b.root
    monkeypatch.delenv("AAD_WORKSPACE")
    deep = b.root / "x" / "y"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert Workspace.find().root == b.root
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkspaceError, match="No aad workspace"):
        Workspace.find(create=True)  # nothing is created in an arbitrary current folder


def test_an_error_keeps_the_config_keys_it_names() -> None:
    """'[store] url' in a hint is text, not console markup: it reaches the user whole."""
    from aad_core.cli.app import err_console, fail

    with err_console.capture() as cap:
        fail("Cannot reach the [store] server", "Check [store] url (or AAD_STORE__URL).")
    out = cap.get()
    assert "Cannot reach the [store] server" in out and "Check [store] url" in out
