"""The Typer app, shared options, and the error handling every command gets."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup
from rich import box
from rich.console import Console
from rich.table import Table

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

#: Width of tables printed to a file or a pipe: wide enough that no cell is cut.
PLAIN_WIDTH = 4096


class _Console(Console):
    """A rich console whose tables degrade to plain text when its output is not a terminal.

    On a terminal, tables keep their box and the terminal's width. Written to a file or a pipe, a
    table is drawn with ASCII characters (``| a | b |``, Markdown-style) and as wide as its cells need
    (rich would otherwise cut it at 80 columns, mid-character of its box), without colour codes.
    """

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self.is_terminal or not any(isinstance(o, Table) for o in objects):
            super().print(*objects, **kwargs)
            return
        for o in objects:
            if not isinstance(o, Table):
                super().print(o, **kwargs)
                continue
            o.box, o.show_edge, o.expand = box.MARKDOWN, True, False
            buffer = io.StringIO()
            Console(file=buffer, width=PLAIN_WIDTH, color_system=None, soft_wrap=True, force_terminal=False,
                    highlight=False).print(o)
            # MARKDOWN's top and bottom edges are blank lines of spaces: drop them, and trailing spaces.
            lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
            self.file.write("".join(line + "\n" for line in lines if line))
            self.file.flush()


console = _Console(soft_wrap=True)
err_console = _Console(stderr=True, soft_wrap=True)

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace folder (default: $AAD_WORKSPACE, else the nearest folder with aad.toml). A named folder "
                     "must hold aad.toml, except for 'aad ingest', which creates it."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def open_workspace(path: Path | None, *, create: bool = False):  # -> Workspace
    """The workspace of ``--workspace`` / ``$AAD_WORKSPACE`` / the current folder (the rule: Workspace.find)."""
    from aad_core.workspace import Workspace

    return Workspace.find(path, create=create)


def print_json(data: Any) -> None:
    """JSON on stdout, unstyled (safe to pipe)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    from rich.markup import escape

    # escaped: messages name config keys ("[store] url"), which are not console markup
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False)
    if hint:
        err_console.print(f"[yellow]Hint:[/] {escape(hint)}", highlight=False)
    return typer.Exit(code)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the aad version and exit.")] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True,
        help="Log aad's progress on stderr (-v: INFO, -vv: DEBUG, which also shows third-party warnings and "
        "progress bars of model loads). Default: $AAD_LOG_LEVEL, else warnings only.")] = 0,
) -> None:
    if verbose:
        from aad_core import set_log_level

        set_log_level("DEBUG" if verbose > 1 else "INFO")
    if version:
        from aad_core import __version__

        console.print(f"aad {__version__}")
        raise typer.Exit()


def main() -> None:
    """Entry point of the ``aad`` script."""
    app()
