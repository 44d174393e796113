"""``aad traces``: stats, list, export, feedback, delete, with the filters of the trace API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, err_console, fail, open_workspace, print_json

traces_app = typer.Typer(help="Inspect, export, score and delete the recorded traces.", no_args_is_help=True)

TaskOption = Annotated[str | None, typer.Option("--task", help="Only traces with this task tag.")]
SourceOption = Annotated[str | None, typer.Option("--source", help="Only traces from this source (langchain, "
                                                   "llamaindex, serve, router, openai-chat, ...).")]
StatusOption = Annotated[str | None, typer.Option("--status", help="ok | error")]
SinceOption = Annotated[str | None, typer.Option("--since", help="Recorded at or after this time (ISO 8601: "
                                                 "2026-05-01 or 2026-05-01T12:00:00+02:00; no zone = UTC).")]
UntilOption = Annotated[str | None, typer.Option("--until", help="Recorded before this time (ISO 8601).")]
WhereOption = Annotated[list[str] | None, typer.Option(
    "--where", help="KEY=VALUE on the trace's metadata (repeat for several); the keys 'model' and 'tag' match "
    "the model and a tag.")]
MinScoreOption = Annotated[float | None, typer.Option("--min-score", help="Only traces with feedback scored "
                                                      ">= this (traces without feedback never match).")]
MaxScoreOption = Annotated[float | None, typer.Option("--max-score", help="Only traces with feedback scored "
                                                      "<= this.")]


def _filters(task: str | None, source: str | None, status: str | None, since: str | None, until: str | None,
             where: list[str] | None, min_score: float | None, max_score: float | None) -> dict[str, Any]:
    from aad_core.store.base import TraceFilter, parse_where

    try:
        filters = {"task": task, "source": source, "status": status, "since": since, "until": until,
                   "where": parse_where(where or []), "min_score": min_score, "max_score": max_score}
        TraceFilter.of(**filters)  # a bad --since / --where fails here, with the reason
    except ValueError as err:
        raise fail(str(err)) from None
    return {k: v for k, v in filters.items() if v not in (None, {})}


@traces_app.command("stats")
def traces_stats(json_out: JsonOption = False, workspace: WorkspaceOption = None) -> None:
    """Counts by source, task, model and status; tokens; time span."""
    ws = open_workspace(workspace)
    store = ws.store()
    try:
        stats = store.stats()
    finally:
        store.close()
    if json_out:
        print_json(stats)
        return
    console.print(f"[bold]{stats['traces']}[/] traces, {stats['redacted']} redacted, from {stats['first']} to {stats['last']}")
    tok = stats["tokens"]
    console.print(f"tokens: {tok['prompt']:,} prompt + {tok['completion']:,} completion = {tok['total']:,}")
    if stats["cost"] is not None:
        console.print(f"recorded cost: ${stats['cost']:.4f}")
    for key in ("by_source", "by_task", "by_model", "by_status"):
        table = Table(title=key.replace("_", " "), title_justify="left")
        table.add_column(key[3:])
        table.add_column("traces", justify="right")
        for k, v in stats[key].items():
            table.add_row(k, str(v))
        console.print(table)


@traces_app.command("list")
def traces_list(
    task: TaskOption = None, source: SourceOption = None, status: StatusOption = None, since: SinceOption = None,
    until: UntilOption = None, where: WhereOption = None, min_score: MinScoreOption = None,
    max_score: MaxScoreOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many traces.")] = 50,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """The traces matching the filters, oldest first: id, time, source, task, model, feedback, request."""
    from aad_core.traces import find_traces

    filters = _filters(task, source, status, since, until, where, min_score, max_score)
    ws = open_workspace(workspace)
    traces = list(find_traces(ws, limit=limit, **filters))
    if json_out:
        print_json([t.model_dump(mode="json", exclude_none=True) for t in traces])
        return
    table = Table(title=f"{len(traces)} trace(s)" + (f" (first {limit})" if len(traces) == limit else ""),
                  title_justify="left")
    for col in ("id", "created", "source", "task", "model", "status", "score", "last user message"):
        table.add_column(col, overflow="fold" if col == "last user message" else None)
    for t in traces:
        score = (t.feedback or {}).get("score")
        table.add_row(t.id, t.created_at.strftime("%Y-%m-%d %H:%M:%S"), t.source, t.task or "-", t.model or "-",
                      t.status, "-" if score is None else f"{score:g}",
                      escape(t.request.last_user_message()[:80]))
    console.print(table)


@traces_app.command("export")
def traces_export(
    out: Annotated[Path, typer.Argument(help="Output JSONL file ('-' for stdout).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="openai-ft | aad")] = "aad",
    task: TaskOption = None, source: SourceOption = None, status: StatusOption = None, since: SinceOption = None,
    until: UntilOption = None, where: WhereOption = None, min_score: MinScoreOption = None,
    max_score: MaxScoreOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Write the traces (those matching the filters) as JSONL; the file imports again with 'aad ingest --format FORMAT'."""
    from aad_core.capture.ingest import EXPORTERS

    if fmt not in EXPORTERS:
        raise fail(f"The '--format' option must be one of {', '.join(EXPORTERS)}. Got {fmt!r} instead.")
    filters = _filters(task, source, status, since, until, where, min_score, max_score)
    if fmt == "openai-ft":
        filters.setdefault("status", "ok")
    ws = open_workspace(workspace)
    convert = EXPORTERS[fmt]
    store = ws.store()
    n = 0
    handle = sys.stdout if str(out) == "-" else out.open("w", encoding="utf-8")
    try:
        for trace in store.iter_traces(**filters):
            handle.write(json.dumps(convert(trace), ensure_ascii=False) + "\n")
            n += 1
    finally:
        store.close()
        if handle is not sys.stdout:
            handle.close()
    err_console.print(f"Exported {n} trace(s) as {fmt} to {out}")


@traces_app.command("feedback")
def traces_feedback(
    trace_id: Annotated[str, typer.Argument(help="The trace's id (a LangChain call: its run_id).")],
    score: Annotated[float, typer.Argument(help="A number: 1 / 0, -1..1, 1..5, ... (the latest one is the "
                                           "trace's score, which --min-score filters on).")],
    comment: Annotated[str | None, typer.Option("--comment", "-m", help="A comment kept with the score.")] = None,
    name: Annotated[str, typer.Option("--name", help="The score's name (scores are kept per name).")] = "user",
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Attach a score (and a comment) to a recorded call."""
    from aad_core.traces import record_feedback

    feedback = record_feedback(open_workspace(workspace), trace_id, score, comment=comment, name=name)
    if json_out:
        print_json({"id": trace_id, "feedback": feedback})
        return
    console.print(f"Trace {trace_id}: {name} score {score:g}" + (f" ({comment})" if comment else ""), highlight=False)


@traces_app.command("delete")
def traces_delete(
    ids: Annotated[list[str] | None, typer.Argument(help="Ids of the traces to delete.")] = None,
    task: TaskOption = None, source: SourceOption = None, status: StatusOption = None, since: SinceOption = None,
    until: UntilOption = None, where: WhereOption = None, min_score: MinScoreOption = None,
    max_score: MaxScoreOption = None,
    everything: Annotated[bool, typer.Option("--all", help="With no ids and no filters: delete every trace.")] = False,
    keep_derived: Annotated[bool, typer.Option(
        "--keep-derived", help="List the derived files under .aad/ (stage state, report) that hold text of a "
        "deleted call instead of removing them.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count the traces that would be deleted.")] = False,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Delete traces by id or filter (a data-deletion request): from the store, the spool and the embedding
    cache; derived files holding their text are removed; the specialists trained on them are named."""
    from aad_core.traces import delete_traces, find_traces

    filters = _filters(task, source, status, since, until, where, min_score, max_score)
    ws = open_workspace(workspace)
    if not ids and not filters and not everything:
        raise fail("Say which traces to delete: ids or filters (--task, --source, --since, --until, --where ...).",
                   "--all deletes every trace.")
    if dry_run:
        from aad_core.store.base import TraceFilter

        flt = TraceFilter.of(**filters)
        n = (sum(1 for t in find_traces(ws, ids=ids) if flt.matches(t)) if ids
             else sum(1 for _ in find_traces(ws, **filters)))
        console.print(f"{n} trace(s) would be deleted.")
        return
    report = delete_traces(ws, ids or None, purge=not keep_derived, everything=everything, **filters)
    if json_out:
        print_json(report.to_json())
        return
    console.print(f"Deleted {report.deleted} trace(s) from the store, {report.spooled} from the spool, "
                  f"{report.cached_vectors} cached embedding(s).")
    for f in report.removed_files:
        console.print(f"  removed {f} (held text of a deleted call; the next stage run writes it again)")
    for f in report.files_with_text:
        console.print(f"  [yellow]still holds text of a deleted call:[/] {f}")
    if report.files_with_ids:
        console.print(f"  {len(report.files_with_ids)} stage file(s) still name deleted ids (no text): "
                      + ", ".join(report.files_with_ids) + "; re-run 'aad distill' to refresh them.")
    for s in report.specialists:
        console.print(f"  [yellow]specialist {s['name']} v{s['version']}[/] (cluster {s['cluster_id']}"
                      f"{', promoted' if s['promoted'] else ''}) was trained on {s['traces']} of them: "
                      "retrain to forget them ('aad distill --force').")


def register(app: typer.Typer) -> None:
    app.add_typer(traces_app, name="traces")
