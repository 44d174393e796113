"""Banking77 as a new user's agent: ``aad distill`` with the default ``aad.toml``, scored through the router.

A new user records their intent-routing node (one system prompt, the customer's query as the user
message, the intent label as the teacher's answer) and runs aad with nothing configured:

1. ``aad init`` a fresh workspace (the default ``aad.toml``, untouched);
2. ``aad ingest`` 1,000 Banking77 training queries, stratified over all 77 intents (~13 each),
   as OpenAI chat-completion records (with PII redaction, as by default);
3. ``aad distill`` (every stage, default configuration);
4. every query of the 3,080-query test split goes through the public ``RoutedChatModel`` with a
   teacher stub that answers the gold label.

It prints ``banking77: accuracy A of 3080; coverage C at agreement G``:

* accuracy: the served specialist's answer, asked for every test query whatever its confidence,
  equals the gold label (the specialist the router serves for the node; 0 when none is promoted);
* coverage: the share of test queries the router served with a specialist (past its calibrated
  confidence threshold); agreement: the share of those whose answer equals the gold label.

Targets (issue 14): accuracy >= 0.88, coverage >= 0.70 at agreement >= 0.97.

    nice .venv/bin/python benchmarks/distill_banking77.py [--keep DIR] [--n-train 1000] [--n-test 3080]

Data: aad_core/demo/data/banking77 — Casanueva et al. (2020), PolyAI, CC-BY-4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

SYSTEM = ("You are the intent router of a bank's customer-support agent. Classify the customer's message "
          "into exactly one of the bank's 77 intents and answer with the intent label only.")
AAD = Path(sys.executable).with_name("aad")


def stratified(rows: Sequence[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` rows, round-robin over the labels (each label's rows shuffled with ``seed``)."""
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row[1]].append(row)
    rng = random.Random(seed)
    for items in by_label.values():
        rng.shuffle(items)
    out: list[tuple[str, str]] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in by_label.values()):
        for label in sorted(by_label):
            if depth < len(by_label[label]) and len(out) < n:
                out.append(by_label[label][depth])
        depth += 1
    return out


def record(text: str, label: str, index: int) -> dict[str, Any]:
    """One recorded teacher call in the OpenAI chat-completions format ``aad ingest`` reads."""
    return {
        "request": {"model": "gpt-4o-2024-08-06", "temperature": 0,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]},
        "response": {"id": f"chatcmpl-b77-{index}", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": label},
                                  "finish_reason": "stop"}]},
        "source": "banking77-benchmark",
    }


def _run(*args: str) -> None:
    started = time.perf_counter()
    print(f"$ aad {' '.join(args)}", file=sys.stderr, flush=True)
    subprocess.run([str(AAD), *args], check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def score(ws_dir: Path, test: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Route every test query; ask the served specialist for every query too."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from aad_core.serving.engine import RoutingEngine
    from aad_core.specialists import SpecialistRegistry, load_predictor
    from aad_core.workspace import Workspace
    from aad_langchain import RoutedChatModel

    gold = {text: label for text, label in test}

    class GoldTeacher(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "gold-teacher"

        def _generate(self, messages: list[Any], stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=gold[messages[-1].content]))])

    ws = Workspace.find(ws_dir)
    promoted = SpecialistRegistry(ws).promoted()
    accuracy = 0.0
    spec = next(iter(promoted.values()), None)
    if spec is not None:
        from aad_core.schema import ChatRequest

        predictor = load_predictor(spec, ws)
        requests = [ChatRequest.model_validate({"messages": [{"role": "system", "content": SYSTEM},
                                                             {"role": "user", "content": text}]})
                    for text, _ in test]
        answers = []
        for start in range(0, len(requests), 256):
            answers += [g.text.strip() for g in predictor.generate(requests[start:start + 256], max_new_tokens=16)]
        accuracy = statistics.fmean(a == label for a, (_, label) in zip(answers, test))
    engine = RoutingEngine(ws, record=False, teacher_model="gold-teacher")
    routed = RoutedChatModel(teacher=GoldTeacher(), workspace=ws.root, routing_engine=engine)
    served = agree = 0
    latencies = []
    try:
        for n, (text, label) in enumerate(test, 1):
            started = time.perf_counter()
            reply = routed.invoke([SystemMessage(content=SYSTEM), HumanMessage(content=text)])
            route = reply.response_metadata["aad_route"]
            if route["target"] == "specialist":
                served += 1
                agree += reply.content.strip() == label
                latencies.append((time.perf_counter() - started) * 1000)
            if n % 500 == 0:
                print(f"  routed {n} of {len(test)} test queries", file=sys.stderr, flush=True)
    finally:
        engine.close()
    return {"accuracy": accuracy, "n": len(test), "served": served,
            "coverage": served / len(test) if test else 0.0, "agreement": agree / served if served else 0.0,
            "specialist": None if spec is None else f"{spec.name} v{spec.version} ({spec.kind})",
            "served_p50_ms": statistics.median(latencies) if latencies else None}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=None, help="default: the whole test split (3,080)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="build the workspace here and keep it")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from aad_core.demo.datasets import load_banking77

    train = stratified([(e.text, e.label) for e in load_banking77("train")], args.n_train, args.seed)
    test = [(e.text, e.label) for e in load_banking77("test")]
    if args.n_test:
        test = stratified(test, args.n_test, args.seed)
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="aad-b77-")
        ws_dir = Path(tmp.name) / "ws"
    else:
        ws_dir = args.keep
    started = time.perf_counter()
    _run("init", str(ws_dir))
    traces = ws_dir / "banking77-train.jsonl"
    traces.write_text("".join(json.dumps(record(t, l, i)) + "\n" for i, (t, l) in enumerate(train)), encoding="utf-8")
    _run("ingest", str(traces), "-w", str(ws_dir))
    _run("distill", "-w", str(ws_dir))
    distill_s = time.perf_counter() - started
    fig = score(ws_dir, test)
    fig.update(n_train=len(train), distill_s=round(distill_s, 1))
    print(f"train {len(train)} queries ({len({l for _, l in train})} intents); ingest + distill {distill_s:.0f} s; "
          f"specialist {fig['specialist']}; served p50 {fig['served_p50_ms'] or 0:.1f} ms (routing included)")
    line = (f"banking77: accuracy {fig['accuracy']:.3f} of {fig['n']}; coverage {fig['coverage']:.2f} "
            f"at agreement {fig['agreement']:.3f}")
    fig["headline"] = line
    print(line)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2), encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return fig


if __name__ == "__main__":
    main()
