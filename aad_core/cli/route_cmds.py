"""Routing commands: ``aad route`` (decide, show or calibrate thresholds) and ``aad serve``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, fail, open_workspace, print_json


def _thresholds_table(state: dict[str, Any]) -> Table:
    table = Table(title="Router thresholds (per cluster)")
    for col in ("cluster", "routine", "specialist", "threshold", "quantile", "margin", "separation", "own<thr", "intr>=thr",
                "output", "confidence thr."):
        table.add_column(col, justify="right" if col not in ("specialist", "output") else "left")

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    for cid, c in sorted(state.get("clusters", {}).items(), key=lambda kv: int(kv[0])):
        table.add_row(cid, "yes" if c.get("routine") else "no", c.get("specialist") or "-", fmt(c.get("threshold")),
                      fmt(c.get("quantile_threshold")), fmt(c.get("margin_threshold")), fmt(c.get("separation_threshold")),
                      f"{c.get('own_rejected', 0)}/{c.get('n_own', 0)}",
                      f"{c.get('intruders_admitted', 0)}/{c.get('n_intruders', 0)}",
                      c.get("output_kind", "text"), fmt(c.get("confidence_threshold")))
    return table


def _teacher_nodes_line(state: dict[str, Any]) -> str:
    nodes = state.get("teacher_nodes") or {}
    calls = sum(int(v.get("calls", 0)) for v in nodes.values() if isinstance(v, dict))
    return (f"{len(nodes)} agent node(s) ({calls} training calls) never reach a specialist: their requests go to the "
            "teacher without being embedded (\\[route] teacher_node_min_calls).")


def _eval_line(ev: dict[str, Any]) -> str:
    m = ev.get("matrix", [[0, 0], [0, 0]])
    acc = ev.get("accuracy")
    return (f"Held-out routing accuracy: {'-' if acc is None else f'{acc:.1%}'} over {ev.get('n', 0)} requests "
            f"(routine->specialist {m[0][0]}, routine->teacher {m[0][1]}, complex->specialist {m[1][0]}, "
            f"complex->teacher {m[1][1]})")


def route_cmd(
    text: Annotated[str | None, typer.Argument(help="A user message to route (omit with --show / --calibrate).")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt sent with TEXT.")] = None,
    show: Annotated[bool, typer.Option("--show", "--thresholds", help="Print the per-cluster thresholds.")] = False,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Calibrate thresholds from the traces (confidence "
                                            "thresholds from the eval gate), write router.json and router_eval.json.")] = False,
    no_confidence: Annotated[bool, typer.Option("--no-confidence", help="With --calibrate: store no confidence "
                                                "thresholds (every validated specialist answer is served).")] = False,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Where would a request go? Prints the routing decision: target, cluster, similarity, threshold, reason."""
    from aad_core.artifacts import RouterEval, RouterState
    from aad_core.pipeline.calibrate import calibrate_router

    ws = open_workspace(workspace)
    if calibrate:
        state = calibrate_router(ws, show_progress=not json_out, confidence=not no_confidence)
        if json_out and text is None:
            print_json(state)
            return
        if not json_out:
            console.print(_thresholds_table(state))
            console.print(_teacher_nodes_line(state))
            console.print(_eval_line(RouterEval.load(ws).to_json()))
            console.print(f"Saved {RouterState.path(ws)} and {RouterEval.path(ws)}")
    if show:
        saved = RouterState.load_optional(ws)
        if saved is None:
            raise fail("The router is not calibrated yet.", "Run 'aad route --calibrate' (or 'aad distill').")
        state = {**saved.stamp, **saved.to_json()}
        if json_out and text is None:
            print_json(state)
            return
        console.print(_thresholds_table(state))
        console.print(_teacher_nodes_line(state))
        if RouterEval.exists(ws):
            console.print(_eval_line(RouterEval.load(ws).to_json()))
    if text is None:
        if not (show or calibrate):
            raise fail("Give a message to route, or --show / --calibrate.", "Example: aad route \"Where is my card?\"")
        return
    from aad_core.serving.engine import RoutingEngine
    from aad_core.schema import ChatRequest, Message

    messages = ([Message(role="system", content=system)] if system else []) + [Message(role="user", content=text)]
    decision = RoutingEngine(ws, record=False).decide([ChatRequest(messages=messages)])[0]
    if json_out:
        print_json(decision.model_dump())
        return
    color = "green" if decision.target == "specialist" else "yellow"
    console.print(f"[bold {color}]{decision.target}[/]"
                  + (f"  specialist={decision.specialist}" if decision.target == "specialist" else ""))
    console.print(f"  cluster {decision.cluster_id}  similarity {decision.similarity}  threshold {decision.threshold}"
                  f"  ({decision.latency_ms} ms)")
    console.print(f"  reason: {decision.reason}", highlight=False, markup=False)


def serve_cmd(
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1 keeps it local).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    teacher_url: Annotated[str | None, typer.Option("--teacher-url", help="Base URL of an OpenAI-compatible teacher, "
                                                    "e.g. https://api.openai.com/v1 (key: $AAD_TEACHER_API_KEY). "
                                                    "Default: \\[teacher] base_url of aad.toml, with its model, "
                                                    "api_key_env and timeout_s.")] = None,
    teacher_model: Annotated[str | None, typer.Option("--teacher-model", help="Model name sent to the teacher "
                                                      "(default: \\[teacher] model when the teacher comes from "
                                                      "aad.toml, else the client's 'model').")] = None,
    preload: Annotated[bool, typer.Option(help="Load and warm the router and every promoted specialist before "
                                          "accepting requests, so that the first one is not cold.")] = True,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="AAD_SERVE_API_KEY", show_default=False,
        help="Bearer key clients must send to /v1/... (/health stays open). With it, the client's Authorization "
             "header is never forwarded to the teacher: set $AAD_TEACHER_API_KEY.")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1,
                                                help="Largest request body accepted; larger ones get HTTP 413.")
                              ] = 1024 * 1024,
    teacher_concurrency: Annotated[int, typer.Option("--teacher-concurrency", min=1,
                                                     help="Teacher calls in flight at once; the others wait.")] = 16,
    teacher_timeout: Annotated[float | None, typer.Option(
        "--teacher-timeout", min=0.1, show_default=False,
        help="Seconds a teacher call may take (then HTTP 504). Default: \\[teacher] timeout_s when the teacher comes "
             "from aad.toml, else 120.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions that routes between specialists and the teacher.

    The teacher is --teacher-url, else the \\[teacher] section of aad.toml (the one 'aad augment' uses: base_url,
    model, api_key_env, timeout_s); command-line options win over the section."""
    from aad_core.serving.server import TEACHER_KEY_ENV, configured_teacher, serve

    ws = open_workspace(workspace)
    teacher = configured_teacher(ws.config.teacher, url=teacher_url, model=teacher_model, timeout_s=teacher_timeout)
    if teacher is None:
        console.print("[yellow]No --teacher-url and no \\[teacher] base_url in aad.toml: requests the router sends to "
                      "the teacher will fail with HTTP 503.[/]")
    else:
        if not teacher_url:
            model = teacher.model or "the client's model"
            console.print(f"Teacher from aad.toml \\[teacher]: {model} (timeout {teacher.timeout_s:g} s)")
        if api_key and not teacher.api_key:
            env = ws.config.teacher.api_key_env if not teacher_url and ws.config.teacher.api_key_env else TEACHER_KEY_ENV
            console.print(f"[yellow]--api-key is set but ${env} is not: the teacher gets no key (the "
                          "client's Authorization header holds aad's key and is not forwarded).[/]")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]Listening on {host} without --api-key: anyone who can reach it can use the teacher.[/]")
    console.print(f"aad router on http://{host}:{port}/v1/chat/completions (workspace {ws.root})")
    serve(ws, host=host, port=port, teacher=teacher, teacher_model=teacher_model, preload=preload,
          api_key=api_key or None, max_body_bytes=max_body_bytes, teacher_concurrency=teacher_concurrency)


def register(app: typer.Typer) -> None:
    app.command("route")(route_cmd)
    app.command("serve")(serve_cmd)
