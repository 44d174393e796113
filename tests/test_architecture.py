"""The layout's rules, read from the source by scripts/import_graph.py: no import cycles, no room
importing a room of a higher layer, and default plugins that use only the public plugin API."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def graph_tool():
    spec = importlib.util.spec_from_file_location("aad_import_graph", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph(graph_tool):
    return graph_tool.imports(graph_tool.modules())


def test_every_module_has_a_room(graph_tool, graph):
    homeless = [m for m in graph if m != "aad_core" and graph_tool.room(m) is None]
    assert homeless == [], f"add these modules' rooms to LAYERS in scripts/import_graph.py: {homeless}"


def test_no_import_cycles(graph_tool, graph):
    assert graph_tool.cycles(graph) == []


def test_no_upward_imports(graph_tool, graph):
    assert graph_tool.upward_imports(graph) == []


def test_default_plugins_use_only_the_public_plugin_api(graph_tool, graph):
    assert graph_tool.boundary_violations(graph) == []


def test_the_checks_can_fail(graph_tool):
    """The detectors find what they look for on a made-up graph."""
    fake = {"aad_core.schema": {"aad_core.pipeline.cluster"}, "aad_core.pipeline.cluster": {"aad_core.schema"},
            "aad_plugins.x": {"aad_core.serving.engine"}, "aad_core.serving.engine": set()}
    assert graph_tool.cycles(fake) == [["aad_core.pipeline.cluster", "aad_core.schema"]]
    assert ("aad_core.schema", "aad_core.pipeline.cluster") in graph_tool.upward_imports(fake)
    assert graph_tool.boundary_violations(fake) == [("aad_plugins.x", "aad_core.serving.engine")]


def test_type_checking_imports_do_not_count(graph_tool, tmp_path, monkeypatch):
    pkg = tmp_path / "aad_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "schema.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aad_core.cli import x\n")
    (pkg / "cli.py").write_text("def f():\n    from aad_core.schema import y\n")
    monkeypatch.setattr(graph_tool, "PACKAGES", {"aad_core": pkg})
    g = graph_tool.imports(graph_tool.modules())
    assert g["aad_core.schema"] == set()
    assert g["aad_core.cli"] == {"aad_core.schema"}


def test_importing_aad_keeps_bitsandbytes_quiet() -> None:
    """bitsandbytes' import-time warning about an optional CPU kernel package must not reach the
    stderr of an agent that uses aad (it prints wherever the CPU has avx512-bf16)."""
    import subprocess

    code = "import aad_core, bitsandbytes, logging; logging.getLogger('bitsandbytes.x').warning('loud')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "gemm_4bit_forward" not in run.stderr and "loud" not in run.stderr
