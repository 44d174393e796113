"""``aad traces``: stats, list, show (``--tree``: the run tree), export, feedback, delete, with the filters of
the trace API."""

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
SessionOption = Annotated[str | None, typer.Option("--session", help="Only traces of this session (conversation) id, "
                                                   "as stored (redacted).")]
UserOption = Annotated[str | None, typer.Option("--user", help="Only traces of this user id, as stored (redacted: an "
                                                "e-mail address is stored as its keyed pseudonym, "
                                                "<EMAIL_ADDRESS>-<12 hex digits>).")]


def _filters(task: str | None, source: str | None, status: str | None, since: str | None, until: str | None,
             where: list[str] | None, min_score: float | None, max_score: float | None,
             session: str | None = None, user: str | None = None) -> dict[str, Any]:
    from aad_core.store.base import TraceFilter, parse_where

    try:
        filters = {"task": task, "source": source, "status": status, "since": since, "until": until,
                   "where": parse_where(where or []), "min_score": min_score, "max_score": max_score,
                   "session_id": session, "user_id": user}
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
    max_score: MaxScoreOption = None, session: SessionOption = None, user: UserOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many traces.")] = 50,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """The traces matching the filters, oldest first: id, time, source, task, model, feedback, request."""
    from aad_core.traces import find_traces

    filters = _filters(task, source, status, since, until, where, min_score, max_score, session, user)
    ws = open_workspace(workspace)
    traces = list(find_traces(ws, limit=limit, **filters))
    if json_out:
        print_json([t.model_dump(mode="json", exclude_none=True) for t in traces])
        return
    table = Table(title=f"{len(traces)} trace(s)" + (f" (first {limit})" if len(traces) == limit else ""),
                  title_justify="left")
    identities = any(t.session_id or t.user_id for t in traces)  # their columns only when some trace has them
    columns = ["id", "created", "source", "task", "model", "status", "score"]
    columns += ["session", "user"] if identities else []
    for col in (*columns, "last user message"):
        table.add_column(col, overflow="fold" if col == "last user message" else None)
    for t in traces:
        score = (t.feedback or {}).get("score")
        ids = [escape(t.session_id or "-"), escape(t.user_id or "-")] if identities else []
        table.add_row(t.id, t.created_at.strftime("%Y-%m-%d %H:%M:%S"), t.source, t.task or "-", t.model or "-",
                      t.status, "-" if score is None else f"{score:g}", *ids,
                      escape(t.request.last_user_message()[:80]))
    console.print(table)


def _call_label(t: Any, *, this: bool) -> str:
    """One recorded call as a line of the run tree (console markup, values escaped)."""
    parts = [f"call {t.id}", escape(t.model or "-"), t.status if t.status == "ok" else f"[red]{t.status}[/]",
             "-" if t.latency_ms is None else f"{t.latency_ms:.0f} ms"]
    if t.session_id:
        parts.append(f"session={escape(t.session_id)}")
    if t.user_id:
        parts.append(f"user={escape(t.user_id)}")
    return "  ".join(parts) + ("  [bold]<- this trace[/]" if this else "")


def _node_label(node: Any, trace_id: str) -> str:
    run = f"{escape(node.name or 'run')}  [dim]{node.run_id}[/]"
    if node.trace is None:
        return run
    call = _call_label(node.trace, this=node.trace.id == trace_id)
    return f"{escape(node.name)}  {call}" if node.name else call


def _print_tree(tree: Any, trace_id: str) -> None:
    """The tree as a rich Tree on a terminal, else as plain lines indented two spaces per level."""
    from rich.tree import Tree

    sessions = {t.session_id for t in tree.traces if t.session_id}
    head = f"root {tree.root_run_id}: {len(tree.traces)} recorded call(s)"
    if len(sessions) == 1:
        head += f", session {escape(next(iter(sessions)))}"
    if console.is_terminal:
        def add(parent: Any, node: Any) -> None:
            for child in node.children:
                add(parent.add(_node_label(child, trace_id), highlight=False), child)

        top = Tree(head + "\n" + _node_label(tree.root, trace_id), highlight=False)
        add(top, tree.root)
        console.print(top)
        return
    lines = [head]

    def walk(node: Any, depth: int) -> None:
        lines.append("  " * depth + _node_label(node, trace_id))
        for child in node.children:
            walk(child, depth + 1)

    walk(tree.root, 0)
    for line in lines:
        console.print(line, highlight=False)


@traces_app.command("show")
def traces_show(
    trace_id: Annotated[str, typer.Argument(help="The trace's id (a LangChain call: its run_id).")],
    tree: Annotated[bool, typer.Option("--tree", help="Print the run tree of the call's pipeline invocation: the "
                                       "chain / agent / tool runs above its calls and every stored call sharing "
                                       "its root run id, with model, status, latency, session and user.")] = False,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """One recorded call: its fields, messages and answer (--tree: the run tree it belongs to)."""
    from aad_core.schema import root_run_id
    from aad_core.traces import find_traces, run_tree

    ws = open_workspace(workspace)
    if tree:
        found = run_tree(ws, trace_id)
        if json_out:
            print_json(found.to_json())
        else:
            _print_tree(found, trace_id)
        return
    trace = next(iter(find_traces(ws, ids=[trace_id])), None)
    if trace is None:
        raise fail(f"No recorded trace has the id {trace_id!r}.",
                   "'aad traces list' shows the ids (LangChain calls use their run_id).")
    if json_out:
        print_json(trace.model_dump(mode="json", exclude_none=True))
        return
    u = trace.usage
    fields = [("id", trace.id), ("created", trace.created_at.isoformat()), ("source", trace.source),
              ("task", trace.task), ("model", trace.model), ("status", trace.status), ("error", trace.error),
              ("latency", None if trace.latency_ms is None else f"{trace.latency_ms:.0f} ms"),
              ("tokens", None if u is None else f"{u.prompt_tokens} prompt + {u.completion_tokens} completion"),
              ("session", trace.session_id), ("user", trace.user_id), ("root run", root_run_id(trace)),
              ("parent run", trace.parent_run_id), ("tags", ", ".join(trace.tags) or None)]
    for name, value in fields:
        if value is not None:
            console.print(f"{name}: {escape(str(value))}", highlight=False)
    for m in trace.request.messages:
        console.print(f"[bold]{m.role}:[/] {escape(m.text())}", highlight=False)
    if trace.response is not None:
        calls = "".join(f" -> {c.function.name}({c.function.arguments})" for c in trace.response.tool_calls or [])
        console.print(f"[bold]answer:[/] {escape(trace.answer_text() + calls)}", highlight=False)


@traces_app.command("export")
def traces_export(
    out: Annotated[Path, typer.Argument(help="Output JSONL file ('-' for stdout).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="openai-ft | aad")] = "aad",
    task: TaskOption = None, source: SourceOption = None, status: StatusOption = None, since: SinceOption = None,
    until: UntilOption = None, where: WhereOption = None, min_score: MinScoreOption = None,
    max_score: MaxScoreOption = None, session: SessionOption = None, user: UserOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Write the traces (those matching the filters) as JSONL; the file imports again with 'aad ingest --format FORMAT'."""
    from aad_core.capture.ingest import EXPORTERS

    if fmt not in EXPORTERS:
        raise fail(f"The '--format' option must be one of {', '.join(EXPORTERS)}. Got {fmt!r} instead.")
    filters = _filters(task, source, status, since, until, where, min_score, max_score, session, user)
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
    max_score: MaxScoreOption = None, session: SessionOption = None, user: UserOption = None,
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

    filters = _filters(task, source, status, since, until, where, min_score, max_score, session, user)
    ws = open_workspace(workspace)
    if not ids and not filters and not everything:
        raise fail("Say which traces to delete: ids or filters (--task, --source, --since, --until, --where, "
                   "--user ...).",
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
