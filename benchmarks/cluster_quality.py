"""Cluster quality and speed of S2+S3 on a mixed workload built from real public data.

Three task families, each an agent node with its own system prompt:

* intent  — Banking77 customer queries (CC-BY-4.0, PolyAI) -> intent label
* sql     — defog sql-eval questions (Apache-2.0) with their database schema (``defog-data``) -> SQL
* tools   — BFCL v4 function-calling items (Apache-2.0, ``bfcl-eval``) with their tools -> a tool call

Prints the cluster purity with respect to the family (target >= 0.98) and the wall time to embed
and cluster N traces (default 10,000) in a fresh workspace (target <= 60 s on 2 cores), then the
per-cluster variance per family (the basis of the routine threshold tau).

    python benchmarks/cluster_quality.py [--n 10000] [--threads 2] [--k K] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from aad_core.datasets import (  # noqa: E402
    DEFOG_DATABASES,
    defog_schema,
    load_banking77,
    load_bfcl,
    load_defog_questions,
)
from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Trace, Usage  # noqa: E402

INTENT_SYSTEM = (
    "You are the intent classifier of an online bank's support assistant. Read the customer's "
    "message and answer with exactly one intent label from the Banking77 taxonomy (e.g. card_arrival, "
    "lost_or_stolen_card, exchange_rate). Answer with the label only."
)
SQL_SYSTEM = (
    "You translate questions into a single SQLite query over the database below. Answer with SQL only.\n\n"
)
TOOLS_SYSTEM = (
    "You are a function-calling assistant. Use the provided functions to answer the user's request; "
    "call the right function with correct arguments, or answer in text when no function applies."
)


def _usage(prompt: str, answer: str) -> Usage:
    p, c = len(prompt) // 4 + 8, max(1, len(answer) // 4)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def build_workload(n: int, seed: int = 0) -> list[Trace]:
    """``n`` traces: ~6 % SQL (all 210 defog questions, repeated when n is large), ~30 % tool
    calls, the rest intent queries."""
    import random

    rng = random.Random(seed)
    sql_q = load_defog_questions()
    n_sql = min(max(len(sql_q), round(0.06 * n)), n // 3) if n >= 30 else n // 3
    n_tools = min(round(0.30 * n), 3625)
    n_intent = n - n_sql - n_tools
    intents = load_banking77("train") + load_banking77("test")
    rng.shuffle(intents)
    schemas = {db: defog_schema(db) for db in DEFOG_DATABASES}
    price = 10.0 / 1e6  # USD per token, for the cost share

    traces: list[Trace] = []
    for i, ex in enumerate(intents[:n_intent]):
        msgs = [Message(role="system", content=INTENT_SYSTEM), Message(role="user", content=ex.text)]
        u = _usage(INTENT_SYSTEM + ex.text, ex.label)
        traces.append(Trace(id=f"intent-{i}", source="benchmark", task="intent", request=ChatRequest(messages=msgs),
                            response=Message(role="assistant", content=ex.label), usage=u,
                            cost=u.total_tokens * price))
    for i in range(n_sql):
        q = sql_q[i % len(sql_q)]
        system = SQL_SYSTEM + schemas[q.db_name]
        msgs = [Message(role="system", content=system), Message(role="user", content=q.question)]
        answer = q.gold_queries()[0] if q.gold_queries() else q.query
        u = _usage(system + q.question, answer)
        traces.append(Trace(id=f"sql-{i}", source="benchmark", task="sql", request=ChatRequest(messages=msgs),
                            response=Message(role="assistant", content=answer), usage=u, cost=u.total_tokens * price,
                            metadata={"db": q.db_name}))
    for i, item in enumerate(load_bfcl(limit=n_tools, seed=seed)):
        msgs = [Message(role="system", content=TOOLS_SYSTEM)] + [Message(**m) for m in item.messages]
        calls = [ToolCall(id=f"call_{j}", function=FunctionCall(
            name=g["name"], arguments=json.dumps({k: (v[0] if isinstance(v, list) and v else v)
                                                  for k, v in g["arguments"].items()})))
                 for j, g in enumerate(item.ground_truth or [])]
        response = Message(role="assistant", content=None if calls else "None of the functions applies.",
                           tool_calls=calls or None)
        u = _usage(TOOLS_SYSTEM + json.dumps(item.messages) + json.dumps(item.tools), json.dumps(item.ground_truth))
        traces.append(Trace(id=f"tools-{i}", source="benchmark", task="tools",
                            request=ChatRequest(messages=msgs, tools=item.tools), response=response, usage=u,
                            cost=u.total_tokens * price, metadata={"bfcl_id": item.id}))
    return traces


def purity(assignments: dict[str, int], family: dict[str, str]) -> float:
    """Share of traces whose cluster's majority family is their own family."""
    by_cluster: dict[int, Counter[str]] = defaultdict(Counter)
    for tid, cid in assignments.items():
        by_cluster[cid][family[tid]] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / max(len(assignments), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="traces in the workload")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--k", type=int, default=None, help="fixed K (default: silhouette over [k_min, k_max])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the workspace in this folder")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from aad_core.pipeline.cluster import run_cluster
    from aad_core.workspace import Workspace

    t0 = time.perf_counter()
    traces = build_workload(args.n, seed=args.seed)
    family = {t.id: t.task or "?" for t in traces}
    print(f"workload: {len(traces)} traces {dict(Counter(family.values()))} built in {time.perf_counter() - t0:.1f} s")

    root = args.keep or Path(tempfile.mkdtemp(prefix="aad-cluster-bench-"))
    if root.exists() and args.keep:
        shutil.rmtree(root)
    ws = Workspace.init(root)
    with ws.store() as store:
        store.add(traces)

    from aad_core.embedding import get_embedder

    get_embedder(ws.config)._load()  # type: ignore[attr-defined]  # model load is not clustering work
    t1 = time.perf_counter()
    state = run_cluster(ws, k=args.k, show_progress=False)
    wall = time.perf_counter() - t1

    p = purity(state.assignments, family)
    print(f"\nembed + curate + cluster {len(traces)} traces: {wall:.1f} s wall on {args.threads} thread(s) "
          f"(target <= 60 s)")
    print(f"clusters: {len(state.clusters)} (K by {state.criterion}); kept {len(state.assignments)}, "
          f"dropped {len(state.dropped)} ({dict(Counter(r.split(' of ')[0] for r in state.dropped.values()))})")
    print(f"purity w.r.t. task family: {p:.4f} (target >= 0.98)")
    print(f"replaceability: {state.replaceability}")
    print(f"\n{'id':>3} {'family':<14} {'size':>6} {'variance':>9} {'mean_sim':>9} routine  label")
    for c in state.clusters:
        fam = Counter(family[t] for t in state.member_ids(c.id))
        top, cnt = fam.most_common(1)[0]
        print(f"{c.id:>3} {top + f' {cnt / c.size:.0%}':<14} {c.size:>6} {c.variance:>9.3f} {c.mean_similarity:>9.3f} "
              f"{'yes' if c.routine else 'no ':<8} {c.label}")
    print(f"\nworkspace: {root}  (map: {ws.state_path('cluster_map.png')})")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
