"""``aad eval`` (held-out evaluation and the risk-coverage gate) and ``aad report`` (the HTML report)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, open_workspace, print_json


def _fmt(part: Any) -> str:
    return f"{part['score']:.3f}" if isinstance(part, dict) and isinstance(part.get("score"), (int, float)) else "-"


def eval_table(result: dict[str, Any]) -> Table:
    settings = result.get("gate") or {}
    table = Table(title=f"Held-out evaluation (gate: agreement >= {settings.get('target_agreement', 0.95):.2f} on >= "
                  f"{settings.get('min_coverage', 0.2):.0%} of the test calls)")
    numeric = ("n", "base", "specialist", "teacher", "served", "agreement", "p50 ms")
    for col in ("cluster", "label", "routine", "metric", "n", "base", "specialist", "teacher", "served", "agreement",
                "p50 ms", "promoted"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for c in result.get("clusters", []):
        test = (c.get("gate") or {}).get("test") or {}
        lat = ((c.get("latency") or {}).get("specialist") or {}).get("p50_ms")
        metric = str(c.get("metric", "-")) + ("*" if c.get("weakest_metric") else "")
        promoted = "[green]yes[/]" if c.get("promoted") else ("no" if c.get("status") == "evaluated" else "-")
        table.add_row(
            str(c.get("cluster_id")), str(c.get("label", ""))[:32], "yes" if c.get("routine") else "no", metric,
            str(c.get("n_heldout", "-")), _fmt(c.get("base")), _fmt(c.get("specialist")), _fmt(c.get("teacher")),
            # a parity-fallback verdict has no served share: the specialist serves every call
            f"{test['coverage']:.0%}" if "coverage" in test else ("all" if test else "-"),
            f"{test['agreement']:.3f}" if test.get("n_served") or ("coverage" not in test and test) else "-",
            f"{lat:.0f}" if isinstance(lat, (int, float)) else "-", promoted,
        )
    return table


def eval_cmd(
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Score specialists vs base student vs teacher on held-out traces; promote those the risk-coverage gate passes.

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
            console.print(f"  cluster {c['cluster_id']}: {c['reason']}", highlight=False, markup=False)
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
