"""aad.toml + AAD_* environment: defaults, overrides, validation messages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from aad_core.config import AADSettings, default_config_toml, load_config
from aad_core.errors import ConfigError
from aad_core.workspace import Workspace


def test_init_writes_a_config_that_loads_to_the_defaults(workspace: Workspace) -> None:
    text = workspace.config_path.read_text()
    assert "# Share of each cluster's training split kept" in text  # help text as comments
    tomllib.loads(text)
    assert load_config(workspace.config_path).model_dump() == AADSettings().model_dump()
    assert workspace.db_path.exists()


def test_environment_overrides_the_file(workspace: Workspace, monkeypatch) -> None:
    monkeypatch.setenv("AAD_SELECT__FRACTION", "0.5")
    monkeypatch.setenv("AAD_SEED", "7")
    cfg = load_config(workspace.config_path)
    assert (cfg.select.fraction, cfg.seed) == (0.5, 7)


def test_bad_value_names_file_line_key_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "aad.toml"
    path.write_text(default_config_toml().replace("fraction = 0.3", "fraction = 1.5"))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.startswith("fraction ="))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:{line}" in msg
    assert "[select.fraction]" in msg and "1.5" in msg
    assert "AAD_SELECT__FRACTION" in msg


def test_cross_field_validation_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "aad.toml"
    path.write_text("[cluster]\nk_min = 9\nk_max = 3\n")
    with pytest.raises(ConfigError, match="k_min \\(9\\) must not exceed k_max \\(3\\)"):
        load_config(path)
    path.write_text("[select]\nfractoin = 0.2\n")
    with pytest.raises(ConfigError, match="fractoin"):
        load_config(path)
    path.write_text("[select\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
