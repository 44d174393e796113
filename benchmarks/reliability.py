"""Capture reliability under faults (issue 15): what is lost, what is kept, what leaks.

Each case prints one line with its figures; the last line is the headline. Cases:

* ``kill9-full``   kill -9 while the agent submits as fast as it can (a child process); a new writer
                   then recovers the write-ahead log. Holds when the traces lost to the kill are at
                   most those submitted in its last 200 ms and no raw e-mail was on disk before the
                   recovery (the WAL is encrypted)
* ``kill9-paced``  the same while the agent submits 160 calls/s (``--only kill9`` runs both)
* ``disk-full``    the workspace on a tiny tmpfs (root) -- else ENOSPC injected in the store and the spool
* ``poison``       one batch of 256 with a lone surrogate, deeply nested tool-call arguments and metadata
* ``queue-16x500`` 16 threads x 500 calls: exactly 8,000 stored
* ``queue-full``   16 threads x 1,500 calls with the default queue (10,000): agent-side latency, counts;
                   then the same 16 threads call a stand-in (``deque.append``) instead of submit(), in the
                   same process while the writer is still redacting the backlog: its p95 is the harness's
                   own share (GIL scheduling of 16 threads and the writer), printed next to submit()'s.
                   Holds when submit()'s p95 <= 2 ms
* ``exit``         a child exits without close(): kept, tracebacks printed
* ``pii-fields``   PII in every field (messages, refusal, reasoning, tool descriptions, tool-call
                   arguments and their log-probs, params, metadata, tags, error), all entities, every file
                   under .aad/ scanned for the raw values (a name's first or last name, an address's
                   street line), e-mail/phone/card/IBAN/SSN/IP/name/street address; recall per entity
* ``pii-recall``   person names and street addresses in natural one-value messages (no other string of
                   the trace to help), recall per entity, and the share of banking77 queries (no PII)
                   the redactor changes

    python benchmarks/reliability.py               # all cases (~2-4 min on 2 cores)
    python benchmarks/reliability.py --only poison,exit --n-pii 100
    python benchmarks/reliability.py --only kill9          # both kill -9 cases (~1 min)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import logging
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from aad_core.capture import CaptureWriter  # noqa: E402
from aad_core.config import AADSettings  # noqa: E402
from aad_core.schema import ChatRequest, FunctionCall, Message, TokenLogprob, ToolCall, Trace, Usage  # noqa: E402
from aad_core.store.sqlite import SQLiteTraceStore  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def report(case: str, ok: bool, figures: str) -> None:
    RESULTS.append((case, ok, figures))
    print(f"{case:<13} {'holds' if ok else 'FAILS'}  {figures}", flush=True)


def trace(i: int, user: str | None = None, **kw: object) -> Trace:
    user = user or f"Where is order {i}? Mail me at user{i}@example.com"
    return Trace(id=f"t-{i}", source="bench", model="teacher",
                 request=ChatRequest(messages=[Message(role="system", content="You are a support agent."),
                                               Message(role="user", content=user)]),
                 response=Message(role="assistant", content=f"Order {i} ships tomorrow."),
                 usage=Usage(prompt_tokens=20, completion_tokens=6, total_tokens=26), **kw)  # type: ignore[arg-type]


def stored_ids(ws_root: Path) -> tuple[set[str], dict]:
    """Ids in the store after a fresh writer loaded any spool and write-ahead log left behind (what
    a later run recovers), and that writer's stats."""
    w = CaptureWriter(workspace=ws_root)
    w.flush(600)
    ids = set(w.store.ids())
    stats = w.stats()
    w.close(60)
    return ids, stats


def raw_on_disk(folder: Path, values: list[str]) -> int:
    db = folder / "traces.db"
    if db.exists():
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    blob = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    return sum(1 for v in values if v.encode() in blob)


def raw_parts_on_disk(folder: Path, parts: list[list[str]]) -> int:
    """How many values have a part stored raw (as a whole word) in any file under ``folder``."""
    raw_on_disk(folder, [])  # checkpoint the WAL into the database file
    blob = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file()).decode("utf-8", "replace")
    words = set(re.findall(r"[^\W_]+", blob))
    count = 0
    for ps in parts:
        # a cheap pre-test (every word of the part in the blob) before the whole-word search
        if any(all(w in words for w in re.findall(r"[^\W_]+", p)) and _leaked(blob, [p]) for p in ps):
            count += 1
    return count


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# -- kill -9 -----------------------------------------------------------------------------------
_CHILD = r"""
import os, sys, time
sys.path.insert(0, {bench!r})
from reliability import trace
from aad_core.capture import CaptureWriter
w = CaptureWriter(workspace={ws!r})
rate = {rate}
every = 1 if rate else 20  # paced: every trace is reported, so the count at the kill is exact
w._redactor_ready.wait(120)  # an agent that has been running a while: the redactor is built
print("ready", flush=True)
t0 = time.perf_counter()
i = 0
while True:
    w.submit(trace(i))
    i += 1
    if i % every == 0:
        print(i, time.perf_counter(), w._overflowed.value, flush=True)
    if rate:
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
"""


def kill9(case: str, seconds: float, rate: float) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        code = _CHILD.format(bench=str(Path(__file__).parent), ws=str(ws), rate=rate)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        progress: list[tuple[int, float, int]] = []
        start = time.perf_counter()

        def read() -> None:
            for line in child.stdout:  # type: ignore[union-attr]
                fields = line.split()
                if len(fields) == 3 and fields[0].isdigit():
                    progress.append((int(fields[0]), float(fields[1]), int(fields[2])))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(seconds)
        killed_at = time.perf_counter()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        reader.join(5)
        slack = 0 if rate else 19  # at most this many submitted after the last report
        submitted = progress[-1][0] + slack if progress else 0
        overflowed = progress[-1][2] if progress else 0  # dropped at submit (queue full): counted and logged
        last_200ms = submitted - max((n for n, t, _ in progress if t <= killed_at - 0.2), default=0)
        data = ws / ".aad"
        segments = len(list((data / "wal").glob("*.seg")))
        raw = b"@example.com" in b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        ids, stats = stored_ids(ws)
        recovery_s = time.perf_counter() - t0
        kept = len(ids)
        lost = max(0, submitted - kept)
        by_kill = max(0, lost - overflowed)
        report(case, by_kill <= last_200ms and not raw,
               f"lost to the kill {by_kill} <= submitted in its last 200 ms {last_200ms}: "
               f"{'yes' if by_kill <= last_200ms else 'NO'}; submitted ~{submitted} in {killed_at - start:.1f} s, "
               f"{overflowed} dropped and counted at submit (queue full), kept {kept} ({stats['recovered']} recovered "
               f"from {segments} WAL segment(s) by the next writer in {recovery_s:.1f} s, {stats['wal_skipped']} cut "
               f"record(s) skipped); raw e-mails on disk before recovery: {'yes' if raw else 'none'}")
        return by_kill, last_200ms, submitted


# -- disk full -----------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(size_kb: int) -> Iterator[Path | None]:
    """A tmpfs of ``size_kb`` (needs root); None when it cannot be mounted."""
    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp) / "disk"
        mnt.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                                  capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is None or done.returncode != 0:
            yield None
            return
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


class _Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_logs() -> Iterator[_Logs]:
    h = _Logs()
    logger = logging.getLogger("aad_core.capture")
    logger.addHandler(h)
    old = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield h
    finally:
        logger.removeHandler(h)
        logger.setLevel(old[0])
        logger.propagate = old[1]


def disk_full(n: int) -> None:
    cfg = AADSettings(capture={"queue_size": 500, "retry_interval_s": 0.2, "write_timeout_s": 0.5})
    with small_disk(4096) as mnt, captured_logs() as logs:
        how = "tmpfs of 4 MiB" if mnt is not None else "simulated ENOSPC"
        root = (mnt or Path(tempfile.mkdtemp())) / "ws"
        ws = Workspace.init(root)
        undo = None
        if mnt is None:  # inject ENOSPC in the store and the spool after ~200 traces, until trace 1000
            undo = _inject_enospc(after=200)
        filler = root / "filler.bin"
        w = CaptureWriter(workspace=ws, config=cfg)
        held_max = 0
        for i in range(n):
            w.submit(trace(i, f"Order {i}: " + "lorem ipsum dolor sit amet " * 20))
            if i % 100 == 99:
                w.flush(60)
                held_max = max(held_max, w.stats()["held"])
            if i == 150 and mnt is not None:  # the disk fills up (another program's file)
                with contextlib.suppress(OSError), filler.open("wb") as fh:
                    while True:
                        fh.write(b"\0" * 65536)
            if i == 1000:  # and is freed again
                filler.unlink(missing_ok=True)
                if undo:
                    undo()
                    undo = None
                time.sleep(0.3)
        w.flush(60)
        parts = len(list(ws.spool_dir.glob("*.part")))
        empty = sum(1 for p in ws.spool_dir.glob("*") if p.is_file() and p.stat().st_size == 0)
        w.close(30)
        after = w.stats()
        if undo:
            undo()
        in_db = SQLiteTraceStore(ws.db_path).count() if ws.db_path.exists() else 0
        in_spool = sum(sum(1 for _ in p.open("rb")) for p in ws.spool_dir.glob("*.jsonl")) if ws.spool_dir.exists() else 0
        rollback = sum("cannot rollback" in line for line in logs.lines)
        logged_lost = max((int(re.search(r"(\d+) lost", line).group(1)) for line in logs.lines  # type: ignore[union-attr]
                           if line.startswith("aad capture closed:")), default=0)
        causes = sorted({c for c in ("No space left on device", "database or disk is full", "disk I/O error")
                         if any(c in line for line in logs.lines)})
        honest = in_db + in_spool + after["lost"] == n and logged_lost == after["lost"]
        report("disk-full", honest and rollback == 0 and parts == 0 and empty == 0 and bool(causes),
               f"{how}, full from trace 150 to 1000: {n} submitted, {in_db} in the store, {in_spool} spooled, {after['lost']} lost "
               f"(log says {logged_lost}; at most {held_max} held in memory while full); cause in log: "
               f"{', '.join(causes) or 'none'}; 'cannot rollback' lines {rollback}; .part files {parts}, empty files {empty}")


def _inject_enospc(after: int):  # type: ignore[no-untyped-def]
    from aad_core.capture import spool as spool_mod

    real_add, real_write = SQLiteTraceStore.add, spool_mod.Spool.write
    seen = {"n": 0}

    def add(self, traces):  # type: ignore[no-untyped-def]
        seen["n"] += len(traces)
        if seen["n"] > after:
            raise sqlite3.OperationalError("database or disk is full")
        return real_add(self, traces)

    def write(self, traces):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    SQLiteTraceStore.add, spool_mod.Spool.write = add, write  # type: ignore[method-assign]

    def undo() -> None:
        SQLiteTraceStore.add, spool_mod.Spool.write = real_add, real_write  # type: ignore[method-assign]

    return undo


# -- poison --------------------------------------------------------------------------------------
def poison() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        w = CaptureWriter(workspace=ws, config=AADSettings(capture={"linger_s": 2.0, "batch_size": 256}))
        w._redactor_ready.wait(120)
        emails = [f"person{i}@example.com" for i in range(256)]
        traces = [trace(i, f"Mail {emails[i]} about order {i}") for i in range(256)]
        deep = '{"to": "' + emails[7] + '", "x": ' + "[" * 5000 + "]" * 5000 + "}"
        traces[7].response = Message(role="assistant", tool_calls=[ToolCall(function=FunctionCall(name="f", arguments=deep))])
        traces[8] = trace(8, f"Mail {emails[8]} \ud800 lone surrogate")
        nested: dict = {"email": emails[9]}
        for _ in range(3000):
            nested = {"a": nested}
        traces[9].metadata = {"deep": nested}
        t0 = time.perf_counter()
        for t in traces:
            w.submit(t)
        w.flush(300)
        elapsed = time.perf_counter() - t0
        s = w.stats()
        w.close(60)
        kept = SQLiteTraceStore(ws.db_path).count()
        raw = raw_on_disk(ws.data_dir, emails)
        report("poison", kept >= 255 and raw == 0 and s["spool_files"] == 0,
               f"batch of 256 with 3 poison traces: {kept} stored ({s['repaired']} repaired, {s['dropped']} dropped), "
               f"raw e-mails on disk {raw}, spool files {s['spool_files']}, {elapsed:.1f} s")


# -- queue ---------------------------------------------------------------------------------------
def run_agents(call: Callable[[Trace], object], threads: int, per_thread: int, first: int) -> tuple[list[float], float]:
    """``threads`` threads each build ``per_thread`` traces and pass each to ``call``, timing the
    call alone; the latencies (ms) and the seconds the threads took."""
    lat: list[list[float]] = [[] for _ in range(threads)]

    def agent(k: int) -> None:
        for i in range(per_thread):
            t = trace(first + k * per_thread + i)
            t0 = time.perf_counter()
            call(t)
            lat[k].append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=agent, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return [v for xs in lat for v in xs], time.perf_counter() - t0


def queue_case(case: str, threads: int, per_thread: int, expect_all: bool, baseline: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        w = CaptureWriter(workspace=ws)
        w._redactor_ready.wait(120)
        total = threads * per_thread
        t0 = time.perf_counter()
        all_lat, agent_s = run_agents(w.submit, threads, per_thread, 0)
        base = ""
        if baseline:
            # The same harness with a trivial call, while the writer thread still redacts the
            # backlog: what 16 threads and the GIL cost a call that takes no lock at all.
            sink: collections.deque[Trace] = collections.deque()
            base_lat, _ = run_agents(sink.append, threads, per_thread, total)
            base = (f" (stand-in deque.append in the same harness: p50 {statistics.median(base_lat):.4f} ms, "
                    f"p95 {pct(base_lat, 0.95):.4f} ms, max {max(base_lat):.1f} ms)")
        flushed = w.flush(900)
        drain_s = time.perf_counter() - t0
        s = w.stats()
        w.close(60)
        kept = SQLiteTraceStore(ws.db_path).count()
        p50, p95, worst = statistics.median(all_lat), pct(all_lat, 0.95), max(all_lat)
        counted = kept + s["lost"] == total
        ok = counted and flushed and p95 <= 2.0 and (kept == total if expect_all else True) and s["spool_files"] == 0
        report(case, ok, f"{threads} threads x {per_thread}: {kept} stored, {s['lost']} lost (queue full "
               f"{s['overflowed']}), counts add up: {counted}; submit() p50 {p50:.4f} ms, p95 {p95:.4f} ms, "
               f"max {worst:.1f} ms{base}; agent {agent_s:.1f} s, all stored after {drain_s:.1f} s")
        return p95


# -- exit without close ----------------------------------------------------------------------------
def exit_without_close() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                "from reliability import trace\nfrom aad_core.capture import CaptureWriter\n"
                f"w = CaptureWriter(workspace={str(ws)!r})\n"
                "for i in range(200): w.submit(trace(i))\n")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - t0
        kept = SQLiteTraceStore(ws / ".aad" / "traces.db").count()
        tracebacks = done.stderr.count("Traceback") + done.stderr.count("Exception ignored")
        raw = raw_on_disk(ws / ".aad", [f"user{i}@example.com" for i in range(200)])
        report("exit", kept == 200 and tracebacks == 0 and raw == 0 and done.returncode == 0,
               f"200 submitted, no close(): {kept} kept, {tracebacks} tracebacks, raw e-mails on disk {raw}, "
               f"exit code {done.returncode}, process took {elapsed:.1f} s (redaction engine built at start)")


# -- PII in every field ----------------------------------------------------------------------------
def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body + "0")):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _card(rng: random.Random) -> str:
    prefix = rng.choice([str(rng.randint(2221, 2720)), "4" + str(rng.randint(100, 999)), str(rng.randint(51, 55)) + "00"])
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(15 - len(prefix)))
    n = body + _luhn_digit(body)
    return rng.choice([n, " ".join(n[i:i + 4] for i in range(0, 16, 4)), "-".join(n[i:i + 4] for i in range(0, 16, 4))])


def _values(entity: str, rng: random.Random) -> str:
    if entity == "email":
        return f"{rng.choice(['ana', 'li.wei', 'j_smith', 'omar'])}{rng.randint(1, 99999)}@{rng.choice(['example.com', 'mail.org', 'corp.co.uk'])}"
    if entity == "phone":  # numbers that can exist (a valid area code): an unassigned number is nobody's
        import phonenumbers

        while True:
            a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(1000, 9999)
            v = rng.choice([f"+1 {a}-{b}-{c}", f"({a}) {b}-{c}", f"{a}.{b}.{c}", f"+44 20 {rng.choice('378')}{b} {c}"])
            if phonenumbers.is_valid_number(phonenumbers.parse(v, "US")):
                return v
    if entity == "card":
        return _card(rng)
    if entity == "iban":
        return rng.choice(["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606"])
    if entity == "ssn":
        return f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    if entity == "name":
        return _name(rng)[0]
    if entity == "address":
        return _address(rng)[0]
    return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


_FAKE: list = []


def _faker(rng: random.Random):  # type: ignore[no-untyped-def]
    """Faker's en_US provider (the test extra installs it), re-seeded from ``rng``."""
    if not _FAKE:
        from faker import Faker

        _FAKE.append(Faker("en_US"))
    _FAKE[0].seed_instance(rng.randint(0, 2**31))
    return _FAKE[0]


#: Street suffixes as people write them: the full word (Faker's USPS list) or its abbreviation.
_ABBREV = {"Street": "St", "Avenue": "Ave", "Road": "Rd", "Boulevard": "Blvd", "Lane": "Ln", "Drive": "Dr",
           "Court": "Ct", "Place": "Pl", "Terrace": "Ter", "Parkway": "Pkwy", "Highway": "Hwy", "Circle": "Cir"}


def _name(rng: random.Random) -> tuple[str, list[str]]:
    """A person's name and the parts that must not survive redaction (first and last name)."""
    fake = _faker(rng)
    first, last = fake.first_name(), fake.last_name()
    form = rng.random()
    if form < 0.6:
        return f"{first} {last}", [first, last]
    if form < 0.75:
        return f"{first} {rng.choice('ABCDEFGHJKLMNPRSTW')}. {last}", [first, last]
    if form < 0.9:
        return f"{rng.choice(['Mr.', 'Ms.', 'Mrs.', 'Dr.'])} {first} {last}", [first, last]
    return f"{last}, {first}", [first, last]


def _address(rng: random.Random) -> tuple[str, list[str]]:
    """A street address (number, street name, suffix, optional unit, optional city/state/ZIP) and
    the parts that must not survive redaction (the street line, and the number with the name)."""
    fake = _faker(rng)
    number, name = fake.building_number(), rng.choice([fake.first_name, fake.last_name])()
    suffix = rng.choice([fake.street_suffix(), rng.choice(["Street", "Avenue", "Road", "Boulevard", "Lane", "Drive"])])
    if suffix in _ABBREV and rng.random() < 0.5:
        suffix = _ABBREV[suffix] + rng.choice(["", "."])
    street = f"{number} {name} {suffix}"
    v = street
    if rng.random() < 0.3:
        v += rng.choice([" ", ", "]) + fake.secondary_address()
    tail = rng.random()
    if tail < 0.6:
        v += rng.choice([", ", "\n"]) + f"{fake.city()}, {fake.state_abbr(include_territories=False)} {fake.postcode()}"
    elif tail < 0.75:
        v += f", {fake.city()}, {fake.state_abbr(include_territories=False)}"
    return v, [street, f"{number} {name}"]


#: Natural messages for the recall case: one value per message, no other PII.
_TEMPLATES = {
    "name": ["Hi, this is {v}, I need help with my order.", "Please send the invoice to {v}.",
             "My name is {v} and my card was declined.", "Can you ask {v} to call me back tomorrow?",
             "{v} reported the issue yesterday.", "Book a table for two under the name {v}.",
             "The account holder is {v}.", "Forward this thread to {v} in accounting, thanks"],
    "address": ["Please ship it to {v}.", "My new address is {v}", "I moved to {v} last month, update my account.",
                "Deliver to {v} before Friday.", "Send the replacement card to {v} please",
                "billing address: {v}", "Is there a branch near {v}?", "We met at {v}, remember?"],
}


def _leaked(text: str, parts: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", text) for p in parts)


def pii_recall(n: int) -> dict[str, float]:
    """Recall on natural messages (one value in one user message, no other string to help), per
    entity, with the default redactor; and the false-positive rate on banking77 queries (no PII)."""
    from aad_core.plugins import create_component

    rng = random.Random(1515)
    redactor = create_component("redactor", "presidio")
    t0 = time.perf_counter()
    redactor.redact_text("warm-up")
    warm = time.perf_counter() - t0
    recall: dict[str, float] = {}
    missed: list[str] = []
    for entity in ["name", "address"]:
        hits = 0
        for i in range(n):
            value, parts = (_name if entity == "name" else _address)(rng)
            out = redactor.redact_text(rng.choice(_TEMPLATES[entity]).format(v=value))
            if _leaked(out, parts):
                missed.append(out)
            else:
                hits += 1
        recall[entity] = hits / n
    import csv

    bank = Path(__file__).resolve().parents[1] / "aad_core" / "demo" / "data" / "banking77" / "test.csv"
    with bank.open(newline="", encoding="utf-8") as f:
        queries = [row["text"] for row in csv.DictReader(f)]
    t0 = time.perf_counter()
    changed = [q for q in queries if redactor.redact_text(q) != q]
    rate = len(queries) / (time.perf_counter() - t0)
    fp = len(changed) / len(queries)
    report("pii-recall", recall["name"] >= 0.90 and recall["address"] >= 0.80 and fp <= 0.01,
           f"{n} natural messages per entity: names {recall['name']:.1%}, addresses {recall['address']:.1%} "
           f"(spaCy model {redactor.model_}); banking77 test queries changed {len(changed)}/{len(queries)} "
           f"({fp:.2%}); engine built in {warm:.1f} s, {rate:.0f} texts/s")
    for q in changed[:5]:
        print(f"               changed: {q!r} -> {redactor.redact_text(q)!r}")
    for out in missed[:5]:
        print(f"               missed: {out!r}")
    return recall


def _pii_trace(i: int, v: str) -> Trace:
    tokens = [v[k:k + 3] for k in range(0, len(v), 3)]
    return Trace(
        id=f"pii-{i}", source="bench",
        request=ChatRequest(
            messages=[Message(role="system", content=f"Escalate to {v} when stuck."),
                      Message(role="user", content=f"My details: {v}. Please help."),
                      Message(role="assistant", content=None, refusal=f"I cannot share {v}",
                              reasoning_content=f"The user gave {v}"),
                      Message(role="tool", tool_call_id="c1", content=json.dumps({"contact": v}))],
            tools=[{"type": "function", "function": {
                "name": "notify", "description": f"Notify the owner ({v})",
                "parameters": {"type": "object", "properties": {"to": {"type": "string", "description": f"for example {v}"}}}}}],
            params={"user": v, "temperature": 0}),
        response=Message(role="assistant", content=None, refusal=f"Will not call {v}", reasoning_content=f"thinking about {v}",
                         tool_calls=[ToolCall(id="c2", function=FunctionCall(name="notify", arguments=json.dumps({"to": v})))]),
        teacher_logprobs=[TokenLogprob(token=t, logprob=-0.1) for t in ['{"to": "', *tokens, '"}']],
        metadata={"customer": v}, tags=[f"owner:{v}"], error=None)


def pii_fields(n: int) -> tuple[int, int]:
    rng = random.Random(15)
    entities = ["email", "phone", "card", "iban", "ssn", "ip", "name", "address"]
    per: dict[str, list[str]] = {}
    parts: dict[str, list[list[str]]] = {}
    for e in entities:
        if e in ("name", "address"):
            made = [(_name if e == "name" else _address)(rng) for _ in range(n)]
            per[e], parts[e] = [v for v, _ in made], [p for _, p in made]
        else:
            per[e] = [_values(e, rng) for _ in range(n)]
            parts[e] = [[v] for v in per[e]]
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        w = CaptureWriter(workspace=ws)
        k = 0
        for e in entities:
            for v in per[e]:
                w.submit(_pii_trace(k, v))
                k += 1
        w.flush(900)
        w.close(60)
        # A value counts as found when any of its parts is on disk (a name's first or last name, an
        # address's street line): a half-redacted value is a leak.
        found = {e: raw_parts_on_disk(ws.data_dir, parts[e]) for e in entities}
        total_raw = sum(found.values())
        report("pii-fields", total_raw == 0,
               f"{n} values per entity in 13 fields each, raw values found under .aad/ (recall): "
               + ", ".join(f"{e} {found[e]} ({1 - found[e] / n:.1%})" for e in entities))
        return total_raw, n * len(entities)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--n-pii", type=int, default=300, help="values per entity for pii-fields")
    ap.add_argument("--kill-after", type=float, default=3.0, help="seconds of submitting before kill -9")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:  # "kill9" names both kill9-* cases
        return not only or name in only or name.split("-")[0] in only

    logging.basicConfig(level=logging.CRITICAL)  # the cases count what they lose; keep the output to one line per case
    kill = (0, 0, 0)
    raw = (0, 0)
    if want("kill9-full"):
        kill = kill9("kill9-full", args.kill_after, rate=0)
    if want("kill9-paced"):
        kill9("kill9-paced", args.kill_after, rate=160)
    if want("disk-full"):
        disk_full(1500)
    if want("poison"):
        poison()
    if want("queue-16x500"):
        queue_case("queue-16x500", 16, 500, expect_all=True)
    if want("queue-full"):
        queue_case("queue-full", 16, 1500, expect_all=False, baseline=True)
    if want("exit"):
        exit_without_close()
    if want("pii-fields"):
        raw = pii_fields(args.n_pii)
    if want("pii-recall"):
        pii_recall(args.n_pii)
    held = sum(ok for _, ok, _ in RESULTS)
    print(f"reliability: kill -9 at full speed lost {kill[0]} of ~{kill[2]} (submitted in its last 200 ms: {kill[1]}, "
          f"traces dropped at submit as the queue was full not counted); raw PII on disk {raw[0]} "
          f"(of {raw[1]} values); {held} of {len(RESULTS)} cases hold")


if __name__ == "__main__":
    main()
