"""Trace-store throughput, SQLite vs PostgreSQL: many processes capturing at once, then one reader.

Each of P processes runs T threads that submit C calls each through aad's capture writer (redaction
off: this measures the store, not Presidio) to the same store; the figure is all traces / wall time
from the first process start to the last writer's close (every trace stored, counted after). Then
one process reads every trace back in order (``iter_traces``, what ``aad cluster`` and the other
stages do first) and the read rate is traces / second. PostgreSQL is a real server started from the
``pgserver`` wheel in a temporary folder (its defaults; local socket), SQLite is one WAL file.

    python benchmarks/store_scale.py [--processes 4] [--threads 8] [--calls 500] [--json OUT]

The issue's acceptance run is the default, 4 x 8 x 500 = 16,000 traces per store. The last line is
the headline, e.g.

    store: postgresql 9.1k traces/s vs sqlite 12.4k traces/s writing (4 processes x 8 threads, 16000 traces); reading 40k/s vs 60k/s
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _trace(proc: int, thread: int, i: int):
    from aad_core.schema import ChatRequest, Message, Trace, Usage

    return Trace(
        id=f"{proc}-{thread}-{i}", source="bench", task=f"node-{i % 5}", model="teacher",
        request=ChatRequest(messages=[Message(role="system", content="You classify banking requests into intents."),
                                      Message(role="user", content=f"Where is my card? request {proc}/{thread}/{i}")]),
        response=Message(role="assistant", content="card_arrival"),
        usage=Usage(prompt_tokens=30, completion_tokens=3, total_tokens=33), latency_ms=120.0,
    )


def _writer(url: str, db: str, proc: int, threads: int, calls: int, start: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    from aad_core.capture.writer import CaptureWriter
    from aad_core.config import AADSettings
    from aad_core.store import open_store

    store = open_store(url or None, default_path=db)
    cfg = AADSettings()
    cfg.capture.redact = False
    writer = CaptureWriter(store=store, config=cfg)
    start.wait()

    def work(t: int) -> None:
        for i in range(calls):
            writer.submit(_trace(proc, t, i))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    writer.close()
    stats = writer.stats()
    store.close()
    if stats["written"] != threads * calls:
        raise SystemExit(f"process {proc}: {stats}")


def measure(kind: str, url: str, db: str, processes: int, threads: int, calls: int) -> dict:
    from aad_core.store import open_store

    open_store(url or None, default_path=db).close()  # schema created before the clock starts
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, db, p, threads, calls, start)) for p in range(processes)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every process import aad and open its store
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    write_s = time.perf_counter() - t0
    if any(p.exitcode for p in procs):
        raise SystemExit(f"{kind}: a writer process failed ({[p.exitcode for p in procs]})")
    with open_store(url or None, default_path=db) as store:
        count = store.count()
        t0 = time.perf_counter()
        read = sum(1 for _ in store.iter_traces())
        read_s = time.perf_counter() - t0
    expected = processes * threads * calls
    return {"store": kind, "traces": count, "expected": expected, "exact": count == expected == read,
            "write_s": round(write_s, 2), "write_per_s": round(count / write_s), "read_s": round(read_s, 2),
            "read_per_s": round(read / read_s)}


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=500, help="calls per thread")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        pg_dir = tempfile.mkdtemp(prefix="aad-bench-pg-")
        server = pgserver.get_server(pg_dir, cleanup_mode="stop")
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="aad-bench-sqlite-") as tmp:
            for kind, url in (("sqlite", ""), ("postgresql", server.get_uri())):
                r = measure(kind, url, os.path.join(tmp, "traces.db"), args.processes, args.threads, args.calls)
                results.append(r)
                print(f"{kind:10s} {r['traces']} traces (exact: {r['exact']}): write {r['write_s']} s = "
                      f"{r['write_per_s']}/s; read {r['read_s']} s = {r['read_per_s']}/s", flush=True)
    finally:
        server.cleanup()
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))
    sq, pg = results
    print(f"store: postgresql {_k(pg['write_per_s'])} traces/s vs sqlite {_k(sq['write_per_s'])} traces/s writing "
          f"({args.processes} processes x {args.threads} threads, {pg['expected']} traces each, exact counts: "
          f"{'yes' if pg['exact'] and sq['exact'] else 'NO'}); reading {_k(pg['read_per_s'])}/s vs {_k(sq['read_per_s'])}/s")


if __name__ == "__main__":
    main()
