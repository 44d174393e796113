"""``aad cluster``: curate, embed and cluster the traces; flag routine task clusters (S2, S3)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, open_workspace, print_json


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def cluster(
    k: Annotated[
        int | None,
        typer.Option("--k", min=1, help="Number of clusters (default: \\[cluster] k, or chosen by silhouette)."),
    ] = None,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Find the agent's task clusters, flag routine ones, split train/held-out, write a 2-D map."""
    from aad_core.pipeline.cluster import run_cluster
    from aad_core.report import draw_cluster_map

    ws = open_workspace(workspace)
    state = run_cluster(ws, k=k, show_progress=not json_out)
    map_path = draw_cluster_map(ws)
    if json_out:
        data = state.to_json()
        for c in data["clusters"]:
            c.pop("centroid", None)
        data.pop("assignments")
        data.pop("split")
        data["n_dropped"] = len(data.pop("dropped"))
        data["state_file"] = str(state.path(ws))
        data["map"] = str(map_path) if map_path else None
        print_json(data)
        return
    cfg = ws.config.cluster
    by_task = any(c.estimate is not None for c in state.clusters)
    rule = (f"candidate = size >= {cfg.min_size} and distillability estimate >= {cfg.min_estimate}" if by_task
            else f"routine = variance < {cfg.variance_threshold} and size >= {cfg.min_size}")
    table = Table(
        title=f"{len(state.clusters)} task clusters ({state.criterion or 'K by config'}; {rule})",
        title_justify="left",
    )
    for col, just in (("id", "right"), ("label", "left"), ("task", "left"), ("size", "right"),
                      ("variance", "right"), ("estimate", "right"), ("routine", "center"), ("calls", "right"),
                      ("tokens", "right"),
                      ("cost", "right")):
        if col == "label":
            table.add_column(col, max_width=40)
        else:
            table.add_column(col, justify=just, no_wrap=True, min_width=len(col))  # type: ignore[arg-type]
    for c in state.clusters:
        table.add_row(
            str(c.id), c.label, c.task or "-", str(c.size), f"{c.variance:.3f}",
            f"{c.estimate['estimate']:.2f}" if c.estimate else "-",
            "[green]yes[/]" if c.routine else "no", _pct(c.share_calls), _pct(c.share_tokens),
            _pct(c.share_cost) if state.replaceability.get("cost") is not None else "-",
        )
    console.print(table)
    n_held = sum(1 for v in state.split.values() if v == "heldout")
    reasons: dict[str, int] = {}
    for r in state.dropped.values():
        key = r.split(" of ")[0]
        reasons[key] = reasons.get(key, 0) + 1
    n_excl = sum(1 for v in state.split.values() if v == "excluded")
    excl = f" / {n_excl} left out of training: feedback marks the teacher's answer wrong" if n_excl else ""
    console.print(
        f"kept {len(state.assignments)} trace(s) ({len(state.assignments) - n_held - n_excl} train / {n_held} held-out"
        f"{excl}); dropped {len(state.dropped)}"
        + (f" ({', '.join(f'{n} {k}' for k, n in sorted(reasons.items()))})" if reasons else "")
    )
    rep = state.replaceability
    console.print(
        f"[bold]Replaceability[/]: {rep['routine_clusters']} routine cluster(s) hold {_pct(rep['calls'])} of calls, "
        f"{_pct(rep['tokens'])} of tokens, {_pct(rep.get('cost'))} of recorded teacher cost."
    )
    console.print(f"clusters: {state.path(ws)}")
    if map_path:
        console.print(f"map: {map_path}")


def register(app: typer.Typer) -> None:
    app.command()(cluster)
