"""Foundation commands: init, ingest, plugins, config (the traces group: traces_cmds)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, err_console, fail, open_workspace, print_json

def init(
    directory: Annotated[Path, typer.Argument(help="Folder of the new workspace.")] = Path("."),
) -> None:
    """Create a workspace: aad.toml and .aad/ with an empty SQLite trace store."""
    from aad_core.workspace import Workspace

    ws = Workspace.init(directory)
    console.print(f"Workspace ready at [bold]{ws.root}[/]")
    where: object = ws.db_path
    if ws.store_url:  # [store] url / AAD_STORE__URL: say which store, never its password
        from aad_core.store.postgres import redacted_url

        where = redacted_url(str(ws.store_url))
    console.print(f"  config: {ws.config_path}\n  traces: {where}")
    console.print("Next: [bold]aad ingest FILE.jsonl[/] or attach a capture handler (see README).")


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="JSONL files or folders of *.jsonl files.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="openai-chat | openai-ft | aad | otlp-json (OpenTelemetry "
                                     "spans, OpenInference or GenAI conventions; alias otel)")] = "openai-chat",
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Store the valid lines, list the rejected ones, exit non-zero.")
    ] = False,
    redact: Annotated[
        bool | None, typer.Option("--redact/--no-redact", help="Remove PII before storing (default: \\[capture] redact).")
    ] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Import recorded LLM calls. All-or-nothing unless --skip-invalid; re-importing adds nothing."""
    from aad_core.capture.ingest import FORMATS, iter_paths, read_jsonl
    from aad_core.capture.otel import FORMAT_NAMES as OTEL_FORMATS
    from aad_core.capture.otel import read_otlp_json

    if fmt not in FORMATS + OTEL_FORMATS:
        raise fail(f"The '--format' option must be one of {', '.join(FORMATS + OTEL_FORMATS)}. Got {fmt!r} instead.")
    otel = fmt in OTEL_FORMATS
    traces, errors, lines = [], [], 0
    files = list(iter_paths(paths))
    if otel:  # OTLP JSON files are often *.json: a folder gives those too
        files += sorted(f for p in paths if p.is_dir() for f in p.rglob("*.json"))
    if not files:
        raise fail(f"No JSONL files found in {', '.join(map(str, paths))}.")
    for path in files:
        result = read_otlp_json(path) if otel else read_jsonl(path, fmt)
        traces += result.traces
        errors += result.errors
        lines += result.lines
    if errors and not skip_invalid:
        more = f" ({len(errors) - 1} more invalid line(s) after it)" if len(errors) > 1 else ""
        raise fail(f"{errors[0].message}{more}. Nothing was imported.", errors[0].hint)
    ws = open_workspace(workspace, create=True)  # a named folder is created once the files are known to be valid
    do_redact = ws.config.capture.redact if redact is None else redact
    if do_redact and traces:
        from aad_core.capture.redaction import redact_traces

        traces = redact_traces(traces, ws.config, ws)
    store = ws.store()
    try:
        added = store.add(traces)
    finally:
        store.close()
    console.print(
        f"Read {lines} {'span' if otel else 'line'}(s) from {len(files)} file(s): stored {added} new trace(s), "
        f"{len(traces) - added} already present, {len(errors)} rejected."
    )
    if errors:
        for e in errors[:20]:
            err_console.print(f"  rejected {e.message}", highlight=False)
        if len(errors) > 20:
            err_console.print(f"  ... and {len(errors) - 20} more")
        raise typer.Exit(1)


def plugins(json_out: JsonOption = False) -> None:
    """Every loaded plugin: distribution, version, hooks, components; failed plugins with the reason."""
    from aad_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    infos = sorted(pm.plugins.values(), key=lambda p: p.name)
    if json_out:
        print_json(
            {
                "plugins": [p.as_dict() for p in infos],
                "components": {
                    kind: [
                        {"name": c.name, "plugin": c.plugin, "description": c.description}
                        for c in pm.registry.items(kind)
                    ]
                    for kind in sorted({c.kind for c in pm.registry.items()})
                },
            }
        )
        return
    table = Table(title="aad plugins")
    for col in ("plugin", "distribution", "version", "status", "components / error"):
        table.add_column(col)
    for p in infos:
        detail = ", ".join(f"{c['kind']}:{c['name']}" for c in p.components) if p.status == "loaded" else (p.error or "")
        style = {"failed": "red", "disabled": "dim"}.get(p.status, "")
        table.add_row(p.name, p.distribution or "-", p.version or "-", f"[{style}]{p.status}[/]" if style else p.status, detail)
    console.print(table)


def config(json_out: JsonOption = False, workspace: WorkspaceOption = None) -> None:
    """Show the effective configuration (aad.toml + AAD_* environment), every key with its help, and the
    parameters of the components it uses ([<kind>.<name>] tables) with where each was set."""
    from rich.markup import escape

    from aad_core.plugins.params import describe_components

    ws = open_workspace(workspace)
    cfg = ws.config
    components = describe_components(cfg)
    if json_out:
        core = cfg.model_dump(mode="json", exclude=set(_component_kinds()))
        print_json({**core, "components": components})
        return
    console.print(f"[bold]seed[/] = {cfg.seed}")
    for section_name in type(cfg).model_fields:
        section = getattr(cfg, section_name)
        if not hasattr(type(section), "model_fields"):
            continue
        table = Table(title=escape(f"[{section_name}]"), title_justify="left", show_lines=False)
        table.add_column("key")
        table.add_column("value")
        table.add_column("help", overflow="fold")
        for key, field in type(section).model_fields.items():
            table.add_row(key, escape(repr(getattr(section, key))), escape(field.description or ""))
        console.print(table)
    for comp in components:
        title = f"[{comp['kind']}.{comp['name']}]" + (f"  plugin {comp['plugin']}" if comp["plugin"] else "")
        if comp["error"]:
            err_console.print(f"[red]{escape(title)}[/]: {escape(comp['error'])}")
        if not comp["params"]:
            continue
        table = Table(title=escape(title), title_justify="left", show_lines=False)
        for col in ("key", "value", "set in", "help"):
            table.add_column(col, overflow="fold" if col == "help" else None)
        for row in comp["params"]:
            table.add_row(row["key"], escape(repr(row["value"])), escape(row["source"]), escape(row["help"]))
        console.print(table)


def _component_kinds() -> tuple[str, ...]:
    from aad_core.plugins.registry import KINDS

    return KINDS


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(ingest)
    app.command()(plugins)
    app.command()(config)
