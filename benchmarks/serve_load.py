"""``aad serve`` under load: 8 clients x 50 requests on 127.0.0.1, errors and specialist latency.

The server is the real one (``aad_core.serving.server.create_app`` under uvicorn, specialists
preloaded and warmed as ``aad serve`` does) on a distilled workspace (the demo's), in a process of its
own (``--server process``, the default), as a deployment runs it: clients in the server's process
would share its interpreter lock (``--server thread`` measures that layout). Its teacher is a
stub that answers each request with the recorded teacher answer of that call after
``--teacher-ms`` (default 700 ms, about the demo's recorded teacher p50), so teacher-served requests
hold a server worker as a real upstream call would. Teacher answers are not captured (the script
writes nothing into the workspace).

Requests: the held-out calls of every cluster (routine or not: the router decides), in a seeded
order, sent round-robin by ``--clients`` threads with one request in flight each, ``--requests``
each, through ``httpx`` as OpenAI chat completions (tools included). A response counts as an
error when its status is not 200 or it has no choice. ``aad_route.target`` says who answered.

    python benchmarks/serve_load.py --workspace demo-workspace [--clients 8] [--requests 50] [--server process|thread] [--json OUT]

It ends with one line, e.g.

    serve: 8 clients x 50 requests, 0 errors; specialist p50 310 ms / p95 1,240 ms (212 served); teacher p50 760 ms (188)

Target (issue 16): 0 errors and specialist p95 <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

from specialist_latency import _pct  # noqa: E402 - the sibling benchmark's percentile (benchmarks/ is on sys.path)


def _body(trace: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "aad-routed", "messages": [m.model_dump(exclude_none=True) for m in trace.request.messages]}
    if trace.request.tools:
        body["tools"] = trace.request.tools
    return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _held_out_calls(ws: Any, seed: int) -> list[Any]:
    from aad_core.artifacts import load_clusters

    state = load_clusters(ws)
    ids = [tid for c in state.clusters for tid in state.heldout_ids(c.id)]
    with ws.store() as store:
        calls = [t for t in store.iter_traces(ids=ids) if t.response is not None]
    random.Random(seed).shuffle(calls)
    return calls


def _server(ws: Any, calls: list[Any], teacher_ms: float, port: int) -> tuple[Any, Any]:
    """The real app (specialists preloaded, nothing recorded) under uvicorn on ``port``, with the teacher stub."""
    import uvicorn

    from aad_core.serving.engine import RoutingEngine
    from aad_core.serving.server import create_app

    recorded = {json.dumps(_body(t)["messages"], sort_keys=True): t for t in calls}

    def teacher(body: dict[str, Any], _authorization: str | None) -> dict[str, Any]:
        time.sleep(teacher_ms / 1000)
        trace = recorded[json.dumps(body["messages"], sort_keys=True)]
        msg = trace.response.model_dump(exclude_none=True)
        msg.setdefault("content", None)
        return {"id": f"chatcmpl-stub-{trace.id}", "object": "chat.completion", "created": int(time.time()),
                "model": "teacher-stub", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    engine = RoutingEngine(ws, record=False)
    app = create_app(ws, teacher=teacher, engine=engine, capture=False, preload=True)
    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")), engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=Path("demo-workspace"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--teacher-ms", type=float, default=700.0, help="the teacher stub's latency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", choices=("process", "thread"), default="process",
                    help="where the server runs: its own process (as deployed), or a thread of the clients' process")
    ap.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)  # the server process itself
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from aad_core.workspace import Workspace

    ws = Workspace.find(args.workspace)
    calls = _held_out_calls(ws, args.seed)
    if not calls:
        sys.exit(f"{args.workspace} has no held-out calls: run 'aad distill -w {args.workspace}' first.")
    if args.serve_port is not None:  # the server process: serve until terminated
        server, engine = _server(ws, calls, args.teacher_ms, args.serve_port)
        try:
            server.run()
        finally:
            engine.close()
        return

    port = _free_port()
    child: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    engine: Any = None
    started = time.perf_counter()
    if args.server == "process":
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--workspace", str(args.workspace),
                                  "--teacher-ms", str(args.teacher_ms), "--seed", str(args.seed),
                                  "--serve-port", str(port)])
    else:
        server, engine = _server(ws, calls, args.teacher_ms, port)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
    try:
        figures = _load(args, calls, port, started, child, thread, server if thread is not None else None, engine)
    finally:  # the server process never outlives this one (a failed start, an error, Ctrl-C)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    print(figures.pop("line"))


def _load(args: argparse.Namespace, calls: list[Any], port: int, started: float, child: Any, thread: Any,
          server: Any, engine: Any) -> dict[str, Any]:
    """Wait for the server, run the clients, stop an in-process server; the figures (and the headline)."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=120) as client:
        while True:  # preload (router + specialists, warmed) runs before the server accepts requests
            try:
                if client.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if child is not None and child.poll() is not None:
                sys.exit(f"the server process exited with code {child.returncode}")
            if time.perf_counter() - started > 300:
                sys.exit("the server did not start within 300 s")
            time.sleep(0.2)
    print(f"server up on 127.0.0.1:{port} in {time.perf_counter() - started:.1f} s (specialists preloaded; "
          f"{'its own process' if child is not None else 'a thread of this process'})", file=sys.stderr, flush=True)

    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            for i in range(args.requests):
                trace = calls[(k * args.requests + i) % len(calls)]
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/v1/chat/completions", json=_body(trace))
                    ok = r.status_code == 200 and bool((r.json().get("choices") or [None])[0])
                    target = (r.json().get("aad_route") or {}).get("target") if ok else None
                    status = r.status_code
                except (httpx.HTTPError, ValueError) as err:
                    ok, target, status = False, None, type(err).__name__
                with lock:
                    results.append({"ok": ok, "status": status, "target": target, "task": trace.task,
                                    "ms": (time.perf_counter() - t0) * 1000})

    load_started = time.perf_counter()
    workers = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - load_started
    if child is None:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()

    errors = [r for r in results if not r["ok"]]
    spec = [r["ms"] for r in results if r["ok"] and r["target"] == "specialist"]
    teach = [r["ms"] for r in results if r["ok"] and r["target"] != "specialist"]
    by_task: dict[str, list[float]] = {}
    for r in results:
        if r["ok"] and r["target"] == "specialist":
            by_task.setdefault(str(r["task"]), []).append(r["ms"])
    for task, ms in sorted(by_task.items()):
        print(f"  {task:<10} specialist {len(ms):>3} requests  p50 {statistics.median(ms):,.0f} ms  "
              f"p95 {_pct(ms, 0.95):,.0f} ms")
    if errors:
        print(f"  errors: {sorted({str(e['status']) for e in errors})}")
    figures = {"clients": args.clients, "requests_per_client": args.requests, "n": len(results),
               "errors": len(errors), "wall_s": round(wall, 1), "throughput_rps": round(len(results) / wall, 2),
               "specialist_n": len(spec), "specialist_p50_ms": statistics.median(spec) if spec else None,
               "specialist_p95_ms": _pct(spec, 0.95) if spec else None, "teacher_n": len(teach),
               "teacher_p50_ms": statistics.median(teach) if teach else None, "teacher_stub_ms": args.teacher_ms, "server": args.server}
    line = (f"serve: {args.clients} clients x {args.requests} requests, {len(errors)} errors; "
            + (f"specialist p50 {figures['specialist_p50_ms']:,.0f} ms / p95 {figures['specialist_p95_ms']:,.0f} ms "
               f"({len(spec)} served)" if spec else "no request served by a specialist")
            + (f"; teacher p50 {figures['teacher_p50_ms']:,.0f} ms ({len(teach)})" if teach else "")
            + f"; {figures['throughput_rps']:.1f} requests/s"
            + ("" if args.server == "process" else " (server in the clients' process)"))
    return {**figures, "line": line}


if __name__ == "__main__":
    main()
