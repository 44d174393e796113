"""The Typer app, shared options, and the error handling every command gets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup
from rich.console import Console

from aad_core.errors import AADError

class _AADGroup(TyperGroup):
    """Turns :class:`AADError` into a two-line message (what, and the fix) with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AADError as err:
            raise fail(err.message, err.hint) from None


app = typer.Typer(
    name="aad",
    cls=_AADGroup,
    help="Adaptive Agentic Distillation: record an agent's LLM calls, distil specialists for its "
    "routine tasks, and route between them and the teacher.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace folder (default: $AAD_WORKSPACE or the nearest folder with aad.toml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def open_workspace(path: Path | None):  # -> Workspace
    from aad_core.workspace import Workspace

    return Workspace.find(path)


def print_json(data: Any) -> None:
    """JSON on stdout, unstyled (safe to pipe)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]Error:[/] {message}", highlight=False)
    if hint:
        err_console.print(f"[yellow]Hint:[/] {hint}", highlight=False)
    return typer.Exit(code)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the aad version and exit.")] = False,
) -> None:
    if version:
        from aad_core import __version__

        console.print(f"aad {__version__}")
        raise typer.Exit()


def main() -> None:
    """Entry point of the ``aad`` script."""
    app()
