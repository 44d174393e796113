"""``aad eval`` (held-out evaluation and the parity gate) and ``aad report`` (the HTML report)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, open_workspace, print_json


def _fmt(part: Any) -> str:
    return f"{part['score']:.3f}" if isinstance(part, dict) and isinstance(part.get("score"), (int, float)) else "-"


def eval_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"Held-out evaluation (parity {result.get('parity', 0.95):.0%} of the teacher)")
    for col in ("cluster", "label", "routine", "metric", "n", "base", "specialist", "teacher", "p50 ms", "promoted"):
        table.add_column(col, justify="right" if col in ("n", "base", "specialist", "teacher", "p50 ms") else "left")
    for c in result.get("clusters", []):
        lat = ((c.get("latency") or {}).get("specialist") or {}).get("p50_ms")
        metric = str(c.get("metric", "-")) + ("*" if c.get("weakest_metric") else "")
        promoted = "[green]yes[/]" if c.get("promoted") else ("no" if c.get("status") == "evaluated" else "-")
        table.add_row(
            str(c.get("cluster_id")), str(c.get("label", ""))[:32], "yes" if c.get("routine") else "no", metric,
            str(c.get("n_heldout", "-")), _fmt(c.get("base")), _fmt(c.get("specialist")), _fmt(c.get("teacher")),
            f"{lat:.0f}" if isinstance(lat, (int, float)) else "-", promoted,
        )
    return table


def eval_cmd(
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Score specialists vs base student vs teacher on held-out traces; promote those at parity.

    Also measures specialist latency (p50/p95) and cost per 1M tokens; writes .aad/state/eval.json.
    """
    from aad_core.artifacts import EvalReport
    from aad_core.pipeline.evaluate import run_evaluate

    ws = open_workspace(workspace)
    result = run_evaluate(ws, show_progress=not json_out)
    if json_out:
        print_json(result)
        return
    console.print(eval_table(result))
    for c in result.get("clusters", []):
        if c.get("reason"):
            console.print(f"  cluster {c['cluster_id']}: {c['reason']}", highlight=False)
    if any(c.get("weakest_metric") for c in result.get("clusters", [])):
        console.print("  * semantic agreement (embedding similarity): the weakest metric.")
    console.print(f"Written: {EvalReport.path(ws)}. Next: [bold]aad report[/]")


def report_cmd(
    open_browser: Annotated[bool, typer.Option("--open", help="Open the report in the default web browser.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Write one self-contained HTML report (.aad/report.html) from the stages run so far; print its path."""
    from aad_core.report import write_report

    ws = open_workspace(workspace)
    path = write_report(ws)
    typer.echo(str(path))
    if open_browser:
        import webbrowser

        webbrowser.open(path.as_uri())


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
