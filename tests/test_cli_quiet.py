"""A quiet library and command line (issue 18): model loads print nothing, AAD_LOG_LEVEL, plain tables
when stdout is not a terminal, and scripts/setup's one line per step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=full)


# -- logging -------------------------------------------------------------------------------------

def test_aad_log_level_sets_only_aads_loggers() -> None:
    code = (
        "import logging, aad_core\n"
        "logging.getLogger('aad_core.x').info('aad-info')\n"
        "logging.getLogger('aad_plugins.y').debug('aad-debug')\n"
        "logging.getLogger('other').warning('other-warning')\n"
        "print(logging.getLogger().level, logging.getLogger('other').getEffectiveLevel())\n"
    )
    run = _python(code, AAD_LOG_LEVEL="info")
    assert run.returncode == 0, run.stderr
    assert "aad-info" in run.stderr and "aad-debug" not in run.stderr
    assert "other-warning" in run.stderr  # Python's own fallback, untouched
    assert run.stdout.split() == ["30", "30"]  # root and other loggers keep their levels


def test_aad_log_level_unset_prints_no_info_and_defers_to_the_application() -> None:
    run = _python("import logging, aad_core; logging.getLogger('aad_core.x').info('aad-info')")
    assert run.returncode == 0 and run.stderr == ""
    # With AAD_LOG_LEVEL set and the application's own logging configured, a record prints once, its way.
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout, format='APP %(message)s')\n"
            "import aad_core; logging.getLogger('aad_core.x').info('aad-info')")
    run = _python(code, AAD_LOG_LEVEL="INFO")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "APP aad-info\n" and run.stderr == ""


def test_a_bad_aad_log_level_is_named_and_ignored() -> None:
    run = _python("import aad_core", AAD_LOG_LEVEL="loud")
    assert run.returncode == 0
    assert "AAD_LOG_LEVEL='loud' is not a log level" in run.stderr


def test_set_log_level_none_restores_the_default() -> None:
    import logging

    import aad_core

    aad_core.set_log_level("DEBUG")
    try:
        assert logging.getLogger("aad_core").level == logging.DEBUG
        assert logging.getLogger("aad_plugins").level == logging.DEBUG
    finally:
        aad_core.set_log_level(None)
    assert logging.getLogger("aad_core").level == logging.NOTSET
    assert not logging.getLogger("aad_core").handlers


# -- quiet_loading -------------------------------------------------------------------------------

def test_quiet_loading_is_scoped_to_the_load() -> None:
    import logging
    import warnings

    from aad_core.models.quiet import quiet_loading

    hf_logging = pytest.importorskip("transformers.utils.logging")
    before_hook = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(before_hook)
    level = logging.getLogger("transformers").level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_loading():
            warnings.warn("hidden", FutureWarning)
            bar = hf_logging.tqdm(range(3), desc="Loading weights")
            assert type(bar).__name__ == "EmptyTqdm"
            assert logging.getLogger("transformers").getEffectiveLevel() >= logging.ERROR
        warnings.warn("shown", FutureWarning)
    assert [str(w.message) for w in seen] == ["shown"]
    assert logging.getLogger("transformers").level == level
    assert hf_logging.set_tqdm_hook(before_hook) is before_hook  # the hook found before is back


@pytest.mark.real_model
def test_loading_a_student_and_the_embedder_prints_nothing() -> None:
    """A real load in a fresh process (as in a user's agent): stdout and stderr stay empty."""
    code = (
        "import aad_core\n"
        "from aad_core.models.students import load_student\n"
        "model, tok = load_student('smollm2-135m')\n"
        "from aad_core.models.embedding import embedder_named\n"
        "v = embedder_named('minilm').embed(['hello world'])\n"
        "assert v.shape == (1, 384)\n"
    )
    run = _python(code, PYTHONWARNINGS="default")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", (run.stdout, run.stderr)


# -- tables --------------------------------------------------------------------------------------

def test_tables_are_plain_text_when_stdout_is_not_a_terminal() -> None:
    from rich.table import Table

    code = (
        "from aad_core.cli.app import console\n"
        "from rich.table import Table\n"
        "t = Table(title='aad distill summary')\n"
        "for c in ('id', 'task', 'size', 'routine', 'metric', 'base', 'spec.', 'teacher', 'route', 'reason'):\n"
        "    t.add_column(c, no_wrap=True)\n"
        "t.add_row('3', 'banking77-intents', '1200', 'yes', 'classification', '0.10', '0.93', '0.95',\n"
        "          '[green]specialist[/]', 'agreement 0.96 >= 0.95 at coverage 0.80 on 120 test calls')\n"
        "console.print(t)\n"
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "aad distill summary" in lines[0]
    assert lines[1].startswith("| id ") and lines[2].startswith("|----")
    row = lines[3]
    assert "agreement 0.96 >= 0.95 at coverage 0.80 on 120 test calls" in row and row.endswith("|")
    assert len(row) > 80 and row.isascii() and "\x1b" not in run.stdout and "…" not in run.stdout
    assert Table  # rich is importable here too


# -- scripts/setup ---------------------------------------------------------------------------------

def _fake_checkout(tmp_path: Path, pip_exit: int) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", tmp_path / "scripts" / "setup")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python"
    fake.write_text("#!/usr/bin/env bash\nfor i in $(seq 1 300); do echo \"pip line $i\"; done\n"
                    f"echo 'pip: the last word' >&2\nexit {pip_exit}\n")
    fake.chmod(0o755)
    return tmp_path


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("pip_exit", [0, 1])
def test_setup_prints_a_line_per_step_and_keeps_pips_log(tmp_path: Path, pip_exit: int) -> None:
    root = _fake_checkout(tmp_path, pip_exit)
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", "scripts/setup"], cwd=root, capture_output=True, text=True, timeout=60, env=env)
    log = (root / ".venv" / "setup.log").read_text()
    assert "pip line 300" in log and "pip: the last word" in log
    if pip_exit == 0:
        assert run.returncode == 0, run.stderr
        assert len(run.stdout.splitlines()) <= 5 and "pip line" not in run.stdout + run.stderr
        assert "done" in run.stdout
        # up to date: a second run prints nothing
        again = subprocess.run(["bash", "scripts/setup"], cwd=root, capture_output=True, text=True, timeout=60, env=env)
        assert again.returncode == 0 and again.stdout == "" and again.stderr == ""
    else:
        assert run.returncode == 1
        assert "FAILED" in run.stdout and "pip line 1\n" not in run.stdout
        assert "setup.log" in run.stderr and "pip: the last word" in run.stderr  # the log's tail on failure


#: What other libraries print when they are not silenced at their source.
_FOREIGN_NOISE = ("Traceback", "Warning", "warnings.warn", "kernels-community", "Loading weights", "it/s]",
                  "Exception ignored")


@pytest.mark.real_model
def test_aad_demo_then_aad_cluster_print_nothing_from_other_libraries(tmp_path: Path) -> None:
    """The README's first steps, as a new user runs them (real redaction engine, real MiniLM): stderr
    holds aad's own progress lines only, no warning or traceback from another library."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": ""}
    env.pop("AAD_LOG_LEVEL", None)
    folder = tmp_path / "demo-workspace"
    for args in (["demo", str(folder)], ["cluster", "-w", str(folder)]):
        run = subprocess.run([sys.executable, "-m", "aad_core", *args], capture_output=True, text=True, env=env,
                             timeout=600)
        assert run.returncode == 0, run.stderr
        noise = [line for line in run.stderr.splitlines() if any(n in line for n in _FOREIGN_NOISE)]
        assert not noise, f"aad {args[0]} printed another library's output: {noise}"
    assert (folder / ".aad" / "state" / "clusters.json").exists()



def test_train_stage_progress_keeps_config_keys_in_reasons(capsys) -> None:
    """'raise [train] max_length to about 417' lost its '[train]' to console markup in 'aad distill'."""
    from aad_core.pipeline.train import _say

    _say(True, "qlora: raise [train] max_length to about 417 (90 % of its calls) to train one")
    assert "raise [train] max_length to about 417" in capsys.readouterr().err
