"""``aad export vllm OUT_DIR``: the promoted LoRA specialists as adapter folders and the command that serves them."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, open_workspace, print_json

export_app = typer.Typer(help="Export the promoted specialists for another server (vLLM).", no_args_is_help=True)


@export_app.command("vllm")
def export_vllm_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write: one adapter folder per LoRA specialist, "
                                            "serve.sh and README.md.")],
    base_model: Annotated[str | None, typer.Option(
        "--base-model", help="The base model vLLM serves: a path or hub id of the same weights the adapters were "
        "trained on (default: the local folder of the student they were trained on).")] = None,
    port: Annotated[int, typer.Option(
        help="The port 'vllm serve' listens on, in the command and the aad.toml lines.")] = 8001,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write each promoted LoRA specialist as a PEFT adapter folder vLLM loads, with the 'vllm serve
    --enable-lora' command (serve.sh, README.md) and the \\[route] lines that send the specialists to it."""
    from aad_core.serving.vllm_export import export_vllm

    result = export_vllm(open_workspace(workspace), out_dir, base_model=base_model, port=port)
    if as_json:
        print_json(result.to_json())
        return
    table = Table(title=f"Exported for vLLM ({result.out_dir})")
    for col in ("specialist", "served by", "LoRA rank", "why"):
        table.add_column(col)
    for a in result.adapters:
        table.add_row(a.name, "vLLM", str(a.rank), f"adapter v{a.version} in {a.path.name}/")
    for s in result.local:
        table.add_row(s.name, "aad (stays local)", "-", s.reason)
    console.print(table)
    console.print("Serve them (or run serve.sh in that folder):", highlight=False)
    console.print(" \\\n    ".join(shlex.join(p) for p in result.command_parts), highlight=False, markup=False)
    console.print("Then point aad at the server in aad.toml:", highlight=False)
    console.print(result.route_toml.rstrip(), highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
