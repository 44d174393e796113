"""What the trainer shows: a logged message (also printed to stderr when progress is on) and the progress bar."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__package__)  # "aad_plugins.qlora", the logger of the single-file module before


def announce(message: str, show: bool) -> None:
    log.info(message)
    if show:
        from rich.console import Console

        Console(stderr=True).print(message, highlight=False)


def progress_bar(enabled: bool) -> Any:  # -> rich.progress.Progress
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
        disable=not enabled,
    )
