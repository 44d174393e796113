"""``aad distill`` (the whole pipeline, resumable) and ``aad demo`` (the embedded demo workspace)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from aad_core.cli.app import WorkspaceOption, console, open_workspace


def distill(
    quick: Annotated[bool, typer.Option("--quick", help="Smaller profile: 2 specialists, fewer steps and held-out samples.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage, even those up to date with their inputs.")] = False,
    if_needed: Annotated[bool, typer.Option(
        "--if-needed", help="Retrain only the tasks with enough new traces ([route] retrain_min_new_traces), drift or "
        "shadow disagreements; a new version replaces the served one only if it does at least as well on the same "
        "test calls. Nothing to do: exits at once (for cron / systemd timers).")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Run curate+cluster -> select -> train -> evaluate -> calibrate router, then write the report.

    Each stage is skipped when its artifact is up to date with its inputs (config and the stage
    before it); re-running after an interruption resumes where it stopped.
    """
    from aad_core.pipeline.distill import PROFILES, StageResult, run_distill

    ws = open_workspace(workspace)
    profile = PROFILES["quick" if quick else "full"]

    def show(r: StageResult) -> None:
        if r.status == "skipped":
            console.print(f"[dim]• {r.stage}: skipped ({r.detail})[/]")
        else:
            console.print(f"[green]✓[/] {r.stage} ({r.seconds:.0f} s): {r.detail}")

    if if_needed:
        if force:
            raise typer.BadParameter("--if-needed and --force exclude each other: --force retrains every task.")
        _if_needed(ws, profile, show)
        return
    console.print(f"[bold]aad distill[/] on {ws.root} — profile [bold]{profile.name}[/]: {profile.description}")
    start = time.perf_counter()
    run_distill(ws, profile=profile, force=force, on_stage=show)
    console.print(summary_table(ws))
    for line in summary_reasons(ws):
        console.print(line, highlight=False, markup=False)  # reasons name config keys: [train] max_length
    console.print(f"Done in {time.perf_counter() - start:.0f} s. Report: [bold]{ws.report_path}[/]")


def _if_needed(ws: Any, profile: Any, show: Any) -> None:
    """``aad distill --if-needed``: the plan per task, then (only when a task needs it) the stages."""
    from rich.markup import escape

    from aad_core.pipeline.retrain import TaskPlan, run_if_needed

    start = time.perf_counter()

    def plan_table(plan: list[TaskPlan]) -> None:
        if not plan:
            console.print("Nothing to retrain: no task has a trained specialist yet (run 'aad distill' first).")
            return
        table = Table(title=f"aad distill --if-needed on {ws.root}", title_justify="left")
        for col in ("task", "specialist", "new traces", "drift", "shadow", "retrain", "why"):
            table.add_column(col)
        for p in plan:
            spec = f"{p.specialist} v{p.served_version}" if p.served_version else f"{p.specialist} (none served)"
            table.add_row(f"{p.cluster_id} {p.task}", spec, str(p.new_traces), ", ".join(p.drift) or "-",
                          escape(p.shadow or "-"), "[bold]yes[/]" if p.retrain else "no", escape(p.why))
        console.print(table)
        if not any(p.retrain for p in plan):
            console.print("Nothing needs retraining.")

    result = run_if_needed(ws, profile=profile, on_plan=plan_table, on_stage=show)
    for o in result.outcomes:
        mark = "[green]promoted[/]" if o.get("promoted") else "[yellow]kept the served version[/]"
        console.print(f"{o.get('specialist', 'cluster ' + str(o['cluster_id']))} "
                      f"{'v' + str(o['version']) if o.get('version') else ''}: {mark}: {escape(str(o.get('reason')))}",
                      highlight=False)
    if result.retrained:
        console.print(f"Done in {time.perf_counter() - start:.0f} s. Report: [bold]{ws.report_path}[/]")


def _eval_entries(ws: Any) -> list[dict[str, Any]]:
    from aad_core.artifacts import EvalReport

    evaluation = EvalReport.load_optional(ws)
    return evaluation.clusters if evaluation else []


def summary_table(ws: Any) -> Table:
    """Per cluster: size, routine, base / specialist / teacher score, where it is routed."""
    table = Table(title="aad distill summary", title_justify="left")
    for col in ("id", "task", "size", "routine", "metric", "base", "spec.", "teacher", "route"):
        table.add_column(col, justify="right" if col in ("id", "size", "base", "spec.", "teacher") else "left",
                         no_wrap=True, min_width=len(col))

    def fmt(part: Any) -> str:
        return f"{part['score']:.2f}" if isinstance(part, dict) and isinstance(part.get("score"), (int, float)) else "-"

    for c in _eval_entries(ws):
        routed = "[green]specialist[/]" if c.get("promoted") else "teacher"
        table.add_row(str(c.get("cluster_id")), str(c.get("task") or c.get("label", ""))[:16], str(c.get("size", "")),
                      "yes" if c.get("routine") else "no", str(c.get("metric", "-"))[:8], fmt(c.get("base")),
                      fmt(c.get("specialist")), fmt(c.get("teacher")), routed)
    return table


def summary_reasons(ws: Any) -> list[str]:
    """One line per cluster: why it is (not) routed to a specialist."""
    return [f"  {c.get('cluster_id')} {c.get('task') or c.get('label', '')}: {c.get('reason', '')}"
            for c in _eval_entries(ws)]


def demo(
    directory: Annotated[Path, typer.Argument(help="Folder of the demo workspace (created if missing).")] = Path("demo-workspace"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling and the generated tickets.")] = 0,
) -> None:
    """Create a workspace holding the demo agent's recorded teacher calls (public data; see its README)."""
    from aad_core.demo import create_demo_workspace

    with console.status("Assembling the demo workload (banking77, bfcl-eval, defog, AgentDojo) and redacting it..."):
        ws = create_demo_workspace(directory, seed=seed)
    with ws.store() as store:
        stats = store.stats()
    nodes = ", ".join(f"{k} {v}" for k, v in sorted(stats["by_task"].items()))
    console.print(f"Demo workspace ready at [bold]{ws.root}[/]: {stats['traces']} traces ({nodes}).")
    console.print(f"Read {ws.root / 'README.md'} for the data sources and licenses. Next: [bold]aad distill -w {directory}[/]")


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
    app.command("demo")(demo)
