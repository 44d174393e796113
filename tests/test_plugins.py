"""Plugin loading through entry points (stevedore) and hook calls (pluggy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aad_core import hookimpl
from aad_core.errors import AADError, UnknownComponentError
from aad_core.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "aad-length-scorer"


def make_plugin_dir(tmp_path: Path) -> Path:
    """A folder for PYTHONPATH holding the tutorial plugin plus a broken one, declared through
    *.dist-info/entry_points.txt exactly as pip would install them."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "aad_length_scorer.py", site)
    (site / "aad_broken_plugin.py").write_text("raise ImportError('needs a library that is not installed')\n")
    for dist, ep in (("aad_length_scorer-0.1.0", "length_scorer = aad_length_scorer"),
                     ("aad_broken_plugin-0.3.0", "broken = aad_broken_plugin")):
        info = site / f"{dist}.dist-info"
        info.mkdir()
        name, version = dist.rsplit("-", 1)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[aad]\n{ep}\n")
    return site


def run_aad(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "aad_core", *args], capture_output=True, text=True, env=env, timeout=120)


def test_entry_point_plugin_is_listed_and_broken_one_reported(tmp_path: Path) -> None:
    site = make_plugin_dir(tmp_path)
    result = run_aad("plugins", "--json", env_extra={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    length = by_name["length_scorer"]
    assert length["status"] == "loaded"
    assert (length["distribution"], length["version"]) == ("aad-length-scorer", "0.1.0")
    assert length["hooks"] == ["aad_register_scorers"]
    assert {"kind": "scorer", "name": "length"} in length["components"]
    assert "length" in [c["name"] for c in data["components"]["scorer"]]
    broken = by_name["broken"]
    assert broken["status"] == "failed"
    assert broken["distribution"] == "aad-broken-plugin"
    assert "ImportError: needs a library" in broken["error"]
    # the default plugins still load
    assert by_name["kmeans"]["distribution"] == "aad"


def test_entry_point_plugin_is_selectable_by_name(tmp_path: Path, monkeypatch) -> None:
    site = make_plugin_dir(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    pm = PluginManager()
    scorer = pm.registry.create("scorer", "length", weight=3.0)
    from conftest import make_trace

    assert scorer.score([make_trace("q", "one two")])[0]["score"] == 6.0
    assert pm.plugins["broken"].status == "failed"


def test_disable_plugins_blocks_before_import(tmp_path: Path, monkeypatch) -> None:
    site = make_plugin_dir(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("AAD_DISABLE_PLUGINS", "length_scorer, broken")
    sys.modules.pop("aad_length_scorer", None)
    pm = PluginManager()
    assert pm.plugins["length_scorer"].status == "disabled"
    assert pm.plugins["broken"].status == "disabled"
    assert "aad_length_scorer" not in sys.modules
    with pytest.raises(UnknownComponentError):
        pm.registry.get("scorer", "length")


class _Scorers:
    @hookimpl
    def aad_register_scorers(self, register):
        register("lenght-ish", dict, description="a near miss")
        register("other", dict)


def test_unknown_name_lists_known_names_and_suggests() -> None:
    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(_Scorers(), name="mine")
    with pytest.raises(UnknownComponentError) as err:
        pm.registry.create("scorer", "lenght")
    text = str(err.value)
    assert "Unknown scorer 'lenght'" in text
    assert "Did you mean 'lenght-ish'?" in text
    assert "Known scorers: lenght-ish, other" in text
    assert "aad plugins" in text


def test_two_plugins_with_the_same_component_name_conflict() -> None:
    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(_Scorers(), name="one")
    pm.add_plugin(_Scorers(), name="two")
    assert pm.plugins["two"].status == "failed"
    assert "Two plugins register a scorer named" in pm.plugins["two"].error


class _Misspelled:
    @hookimpl
    def aad_register_scorer(self, register):  # missing the final "s"
        register("x", dict)


def test_misspelled_hook_fails_loudly() -> None:
    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(_Misspelled(), name="typo")
    assert pm.plugins["typo"].status == "failed"
    assert "aad_register_scorer" in pm.plugins["typo"].error


def test_observer_that_raises_does_not_stop_aad(caplog) -> None:
    seen = []

    class Observers:
        @hookimpl
        def aad_request_routed(self, decisions):
            raise RuntimeError("observer bug")

        @hookimpl
        def aad_trace_captured(self, traces):
            seen.extend(traces)

    pm = PluginManager(load_entry_points=False)
    pm.add_plugin(Observers(), name="obs")
    from aad_core.schema import RoutingDecision

    pm.hooks.request_routed([RoutingDecision(target="teacher", reason="test")])
    assert "observer bug" in caplog.text
    pm.hooks.trace_captured(["t1"])  # type: ignore[list-item]
    assert seen == ["t1"]


def test_import_aad_core_does_not_import_heavy_libraries() -> None:
    code = textwrap.dedent(
        """
        import sys, aad_core, aad_core.cli, aad_core.plugins, aad_core.workspace, aad_core.capture.ingest
        aad_core.Trace, aad_core.Workspace
        heavy = [m for m in ("torch", "transformers", "sentence_transformers", "peft", "presidio_analyzer",
                             "langchain_core", "llama_index") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_aad_error_str_carries_the_hint() -> None:
    assert str(AADError("what went wrong", hint="run 'aad init'")) == "what went wrong\nHint: run 'aad init'"
