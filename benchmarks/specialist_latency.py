"""Specialist latency on CPU (issue 16): how fast the promoted generative (LoRA) specialists answer.

For each promoted LoRA specialist of a workspace (the demo's, trained with ``aad demo`` + ``aad distill``
when ``--train`` is given and it has none), on the held-out requests of its task, in one run:

* cold first request: the first request after the runtime was loaded and warmed (``preload``, as
  ``aad serve`` and ``RoutedChatModel(preload=True)`` do; the load time is printed apart);
* warm single-request p50 / p95 (one request at a time, the prefix cache filled);
* throughput at concurrency 1 / 4 / 8 (threads calling the pool, as the server's workers do;
  micro-batching groups them);
* the baseline: the same requests through plain ``transformers`` ``generate()`` (base + PEFT adapter,
  unmerged, float32, one request at a time, no prefix reuse, no batching), and how many of the
  specialist's answers (served through ``[route] fast_path``, e.g. its merged int8 copy) are identical;
* the recorded teacher latency of the same requests.

It ends with the headline line, e.g.
``specialist latency: p50 210 ms (label) / 480 ms (20-token JSON); 7.1x faster than plain generate; 3.4x
faster than the teacher`` (the factors are the smallest over the specialists).

    python benchmarks/specialist_latency.py --workspace demo-workspace [--train] [--n 24] [--quick]
        [--fast-path int8|int4|merged|none]

Run it on a quiet machine: every figure is wall-clock time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

from aad_core.models.runtime import FAST_PATHS  # noqa: E402
from aad_core.schema import ChatRequest, Specialist, Trace  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _lora_specialists(ws: Workspace) -> list[Specialist]:
    from aad_core.specialists import SpecialistRegistry

    return [s for s in SpecialistRegistry(ws).promoted().values() if s.kind == "lora"]


def _train(folder: Path) -> None:
    """The demo workspace with its specialists trained (minutes to an hour on 2 CPU cores)."""
    aad = [sys.executable, "-m", "aad_core"]
    if not (folder / "aad.toml").exists():
        subprocess.run([*aad, "demo", str(folder)], check=True)
    subprocess.run([*aad, "distill", "-w", str(folder)], check=True)


def _requests(ws: Workspace, spec: Specialist, n: int) -> list[Trace]:
    """Up to ``n`` held-out calls of the specialist's task (its training calls when none is held out)."""
    from aad_core.artifacts import load_clusters

    state = load_clusters(ws)
    ids = sorted(state.heldout_ids(spec.cluster_id)) or sorted(
        t for t, c in state.assignments.items() if c == spec.cluster_id)
    with ws.store() as store:
        traces = [t for t in store.iter_traces(ids=ids) if t.response is not None and t.status == "ok"]
    return traces[:n]


def _kind(answers: list[str], tokens: list[int]) -> str:
    mean = statistics.mean(tokens) if tokens else 0
    if answers and sum(a.lstrip().startswith(("{", "[")) for a in answers) >= len(answers) / 2:
        return f"{mean:.0f}-token JSON"
    return "label" if mean <= 6 else f"{mean:.0f}-token text"


def _throughput(pool: Any, name: str, requests: list[ChatRequest], concurrency: int, max_new: int) -> float:
    """Requests per second with ``concurrency`` callers, each sending one request at a time."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(lambda r: pool.generate(name, [r], max_new_tokens=max_new), requests))
    return len(requests) / (time.perf_counter() - started)


def _baseline(spec: Specialist, requests: list[ChatRequest], max_new: int) -> tuple[list[float], list[str]]:
    """Plain transformers: the base student + the adapter, ``generate()`` one request at a time."""
    import torch
    from peft import PeftModel

    from aad_core.models.chat_format import prompt_text
    from aad_core.models.students import load_student

    model, tok = load_student(spec.base_model, device="cpu")
    model = PeftModel.from_pretrained(model, spec.path).eval()
    model.generate(**tok(["Hi"], return_tensors="pt"), max_new_tokens=2, do_sample=False,
                   pad_token_id=tok.pad_token_id)  # the first generate() of a process is slow
    times, texts = [], []
    for r in requests:
        started = time.perf_counter()
        enc = tok([prompt_text(tok, r)], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        times.append((time.perf_counter() - started) * 1000)
        texts.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    del model
    return times, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=Path("demo-workspace"))
    ap.add_argument("--train", action="store_true", help="Build and distil the demo workspace when it has no "
                    "promoted LoRA specialist.")
    ap.add_argument("--n", type=int, default=24, help="Held-out requests per specialist.")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="Default: [route] max_new_tokens.")
    ap.add_argument("--quick", action="store_true", help="A smoke run: 4 requests, one specialist, 16 new tokens.")
    ap.add_argument("--fast-path", choices=FAST_PATHS, default=None,
                    help="How the specialists compute (default: the workspace's [route] fast_path).")
    ap.add_argument("--parallel-batches", type=int, default=None,
                    help="Micro-batches decoding at once (default: the workspace's [route] parallel_batches).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures to this file.")
    args = ap.parse_args()

    ws = Workspace.find(args.workspace) if (args.workspace / "aad.toml").exists() else None
    if (ws is None or not _lora_specialists(ws)) and args.train:
        _train(args.workspace)
        ws = Workspace.find(args.workspace)
    if ws is None or not _lora_specialists(ws):
        sys.exit(f"{args.workspace} holds no promoted LoRA specialist: run with --train, or 'aad demo "
                 f"{args.workspace}' and 'aad distill -w {args.workspace}' first.")
    specs = _lora_specialists(ws)[: 1 if args.quick else None]
    n = 4 if args.quick else args.n
    max_new = 16 if args.quick else (args.max_new_tokens or ws.config.route.max_new_tokens)
    levels = (1, 4) if args.quick else (1, 4, 8)

    from aad_core.serving.specialists import SpecialistPool

    pool = SpecialistPool(ws, specs)  # the runtime options of the workspace's [route], as served
    if args.fast_path:
        pool.runtime_options["fast_path"] = args.fast_path
    if args.parallel_batches:
        pool.runtime_options["parallel_batches"] = args.parallel_batches
    fast_path = pool.runtime_options["fast_path"]
    started = time.perf_counter()
    pool.preload()
    load_s = time.perf_counter() - started
    print(f"Loaded and warmed {len(specs)} LoRA specialist(s) in {load_s:.1f} s "
          f"(prefix_cache {pool.runtime_options.get('prefix_cache')}, batch_window_ms "
          f"{pool.runtime_options.get('batch_window_ms')}, fast_path {fast_path}, parallel_batches "
          f"{pool.runtime_options.get('parallel_batches')}); {n} requests each, "
          f"max_new_tokens {max_new}.")
    results = []
    for spec in specs:
        traces = _requests(ws, spec, n)
        if not traces:
            print(f"{spec.name}: no held-out requests; skipped")
            continue
        requests = [t.request for t in traces]
        started = time.perf_counter()
        pool.generate(spec.name, [requests[0]], max_new_tokens=max_new)
        cold_ms = (time.perf_counter() - started) * 1000
        warm, answers, tokens = [], [], []
        for r in requests:
            started = time.perf_counter()
            gen = pool.generate(spec.name, [r], max_new_tokens=max_new)[0]
            warm.append((time.perf_counter() - started) * 1000)
            answers.append(gen.text)
            tokens.append(gen.n_tokens)
        tput = {c: _throughput(pool, spec.name, (requests * (1 + max(levels) // len(requests)))[: max(len(requests), c * 2)],
                               c, max_new) for c in levels}
        base_ms, base_answers = _baseline(spec, requests, max_new)
        teacher = [t.latency_ms for t in traces if t.latency_ms]
        row = {
            "specialist": spec.name, "kind": _kind(answers, tokens), "n": len(requests),
            "cold_ms": cold_ms, "warm_p50_ms": statistics.median(warm), "warm_p95_ms": _pct(warm, 0.95),
            "throughput_rps": tput, "baseline_p50_ms": statistics.median(base_ms),
            "baseline_p95_ms": _pct(base_ms, 0.95),
            "fast_path": fast_path, "identical": sum(a == b for a, b in zip(answers, base_answers)),
            "teacher_p50_ms": statistics.median(teacher) if teacher else None,
        }
        results.append(row)
        print(f"\n{spec.name} ({row['kind']}, {row['n']} held-out requests)")
        print(f"  warm p50 / p95        {row['warm_p50_ms']:8.0f} / {row['warm_p95_ms']:.0f} ms")
        print(f"  cold first request    {cold_ms:8.0f} ms ({cold_ms / row['warm_p50_ms']:.1f}x warm p50)")
        print("  throughput            " + ", ".join(f"c{c} {v:.2f} req/s" for c, v in tput.items())
              + f" (c{max(levels)} / c1 = {tput[max(levels)] / tput[1]:.1f}x)")
        print(f"  plain generate()      {row['baseline_p50_ms']:8.0f} / {row['baseline_p95_ms']:.0f} ms "
              f"({row['baseline_p50_ms'] / row['warm_p50_ms']:.1f}x the specialist's p50)")
        print(f"  identical answers     {row['identical']} / {row['n']} (fast_path {fast_path} vs plain "
              "generate(), unmerged float32)")
        for a, b in zip(answers, base_answers):
            if a != b:
                print(f"    differs: {a!r} (served) vs {b!r} (plain)")
        if row["teacher_p50_ms"]:
            print(f"  recorded teacher p50  {row['teacher_p50_ms']:8.0f} ms")
    if not results:
        sys.exit("No specialist had requests to measure.")
    if args.json:
        args.json.write_text(json.dumps({"load_s": load_s, "fast_path": fast_path, "specialists": results}, indent=2),
                             encoding="utf-8")
    parts = " / ".join(f"{r['warm_p50_ms']:.0f} ms ({r['kind']})" for r in results)
    vs_plain = min(r["baseline_p50_ms"] / r["warm_p50_ms"] for r in results)
    teachers = [r["teacher_p50_ms"] / r["warm_p50_ms"] for r in results if r["teacher_p50_ms"]]
    same, total = sum(r["identical"] for r in results), sum(r["n"] for r in results)
    line = (f"specialist latency: p50 {parts}; {vs_plain:.1f}x faster than plain generate "
            f"(fast_path {fast_path}, {same}/{total} answers identical)")
    if teachers:
        line += f"; {min(teachers):.1f}x faster than the teacher"
    print("\n" + line)


if __name__ == "__main__":
    main()
