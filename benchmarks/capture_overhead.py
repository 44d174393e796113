"""Added latency per LLM call of aad's capture handlers, measured in one process.

Each arm calls the same fake (instant) teacher model; calls with and without the handler are
interleaved so that machine noise hits both alike. Reported: median and p95 per-call latency
without and with the handler, the difference (the overhead the agent feels) and the ratio.
Redaction runs on the writer's background thread, so "redaction on" shows only its indirect cost
(CPU / GIL contention) on the agent's calls.

    python benchmarks/capture_overhead.py            # LangChain and LlamaIndex, 2,000 calls per arm
    python benchmarks/capture_overhead.py --n 5000 --only langchain

Target (issue 3): median added latency <= 0.5 ms per call with redaction off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarise(plain: list[float], captured: list[float]) -> dict[str, float]:
    out = {
        "plain_median_ms": statistics.median(plain), "plain_p95_ms": pct(plain, 0.95),
        "captured_median_ms": statistics.median(captured), "captured_p95_ms": pct(captured, 0.95),
    }
    out["added_median_ms"] = out["captured_median_ms"] - out["plain_median_ms"]
    out["added_p95_ms"] = out["captured_p95_ms"] - out["plain_p95_ms"]
    out["ratio_median"] = out["captured_median_ms"] / out["plain_median_ms"]
    # Share of calls slower than 2 ms: on a loaded machine the OS preempts some calls of both arms.
    out["plain_slow_pct"] = 100 * sum(v > 2 for v in plain) / len(plain)
    out["captured_slow_pct"] = 100 * sum(v > 2 for v in captured) / len(captured)
    return out


def measure(arms: Arms, n: int, block: int = 250) -> dict[str, dict[str, float]]:
    """Blocks of ``block`` plain calls and ``block`` captured calls, alternating. The writer is
    flushed after each captured block (outside the timing), so its background work lands in the
    captured block that caused it and never in a plain one.

    Two clocks: wall time (what the agent feels, machine noise included) and the calling
    thread's CPU time (the handler's own work, without preemption by other processes)."""
    for i in range(50):  # warm-up
        arms.plain(i)
        arms.enable()
        arms.captured(i)
        arms.disable()
    arms.handler.flush(300)
    wall: dict[str, list[float]] = {"plain": [], "captured": []}
    cpu: dict[str, list[float]] = {"plain": [], "captured": []}

    def timed(arm: str, fn: Callable[[int], Any], k: int) -> None:
        for i in range(k):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            fn(i)
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            wall[arm].append((t1 - t0) / 1e6)
            cpu[arm].append((c1 - c0) / 1e6)

    while len(wall["plain"]) < n:
        k = min(block, n - len(wall["plain"]))
        timed("plain", arms.plain, k)
        arms.enable()
        timed("captured", arms.captured, k)
        arms.disable()
        arms.handler.flush(300)
    return {"wall": summarise(wall["plain"], wall["captured"]), "cpu": summarise(cpu["plain"], cpu["captured"])}


@dataclass
class Arms:
    plain: Callable[[int], Any]
    captured: Callable[[int], Any]
    handler: Any
    enable: Callable[[], None] = lambda: None
    disable: Callable[[], None] = lambda: None


def langchain_arms(ws: str, redact: bool) -> Arms:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from aad_langchain import AADCallbackHandler

    class InstantTeacher(BaseChatModel):
        model_name: str = "instant-teacher"

        @property
        def _llm_type(self) -> str:
            return "instant"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
            msg = AIMessage(content="", tool_calls=[{"name": "lookup", "args": {"order": "A-17"}, "id": "c2"}],
                            usage_metadata={"input_tokens": 120, "output_tokens": 12, "total_tokens": 132})
            return ChatResult(generations=[ChatGeneration(message=msg)])

        def bind_tools(self, tools, **kwargs):  # type: ignore[no-untyped-def]
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    @tool
    def lookup(order: str) -> str:
        """Look an order up."""
        return order

    model = InstantTeacher().bind_tools([lookup])
    history = [
        SystemMessage("You are the order desk of a shop. Answer briefly; use tools for order data."),
        HumanMessage("Where is my order A-17?"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"order": "A-17"}, "id": "c1"}]),
        ToolMessage("A-17: shipped on Monday, arrives Thursday.", tool_call_id="c1"),
        HumanMessage("And can you check it again, please?"),
    ]
    handler = AADCallbackHandler(workspace=ws, redact=redact)
    cfg = {"callbacks": [handler], "metadata": {"aad_task": "orders"}}
    return Arms(lambda i: model.invoke(history), lambda i: model.invoke(history, config=cfg), handler)


def llamaindex_arms(ws: str, redact: bool) -> Arms:
    from llama_index.core.base.llms.types import ChatMessage, ChatResponse
    from llama_index.core.llms import CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

    from llama_index.core.instrumentation import get_dispatcher

    from aad_llamaindex import attach

    class InstantLLM(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="instant-teacher", is_chat_model=True)

        @llm_chat_callback()
        def chat(self, messages, **kwargs):  # type: ignore[no-untyped-def]
            return ChatResponse(message=ChatMessage(role="assistant", content="It arrives Thursday."),
                                raw={"usage": {"prompt_tokens": 90, "completion_tokens": 5}})

        @llm_completion_callback()
        def complete(self, prompt, formatted=False, **kwargs):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        @llm_completion_callback()
        def stream_complete(self, prompt, formatted=False, **kwargs):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    llm = InstantLLM()
    msgs = [ChatMessage(role="system", content="You are the order desk."),
            ChatMessage(role="user", content="Where is my order A-17?")]
    handler = attach(workspace=ws, redact=redact)
    root = get_dispatcher()

    def enable() -> None:  # the dispatcher is process-wide: switch the handler on per block
        root.add_event_handler(handler)
        root.add_span_handler(handler.span_handler)

    def disable() -> None:
        root.event_handlers = [h for h in root.event_handlers if h is not handler]
        root.span_handlers = [h for h in root.span_handlers if h is not handler.span_handler]

    disable()
    return Arms(lambda i: llm.chat(msgs), lambda i: llm.chat(msgs), handler, enable, disable)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="calls per arm")
    ap.add_argument("--only", choices=["langchain", "llamaindex"], default=None)
    args = ap.parse_args()

    from aad_core.plugins import create_component
    from aad_core.schema import ChatRequest, Message, Trace

    # Build presidio's engines before timing, as a long-running agent would have.
    create_component("redactor", "presidio").redact(
        [Trace(request=ChatRequest(messages=[Message(role="user", content="warm up a@b.co")]))])

    frameworks = [args.only] if args.only else ["langchain", "llamaindex"]
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'framework':<11} {'redaction':<9} {'clock':<5} {'plain med':>10} {'p95':>7} {'handler med':>12} "
          f"{'p95':>7} {'added med':>10} {'added p95':>10} {'ratio':>6}  (ms per call, n={args.n})")
    for fw in frameworks:
        for redact in (False, True):
            with tempfile.TemporaryDirectory() as ws:
                arms = (langchain_arms if fw == "langchain" else llamaindex_arms)(ws, redact)
                handler = arms.handler
                results = measure(arms, args.n)
                handler.flush(300)
                stats = handler.stats()
                store_count = handler.writer.store.count()
                handler.close()
            for clock, r in results.items():
                print(f"{fw:<11} {'on' if redact else 'off':<9} {clock:<5} {r['plain_median_ms']:>10.3f} "
                      f"{r['plain_p95_ms']:>7.3f} {r['captured_median_ms']:>12.3f} {r['captured_p95_ms']:>7.3f} "
                      f"{r['added_median_ms']:>10.3f} {r['added_p95_ms']:>10.3f} {r['ratio_median']:>6.2f}"
                      + (f"  [>2ms: {r['plain_slow_pct']:.1f}% / {r['captured_slow_pct']:.1f}% of calls]"
                         if clock == "wall" else ""))
            print(f"{'':<27}stored {store_count} of {stats['captured']} captured calls, "
                  f"errors {stats['errors'] + stats['handler_errors']}")
            if fw == "langchain" and not redact:
                verdict = "meets" if results["wall"]["added_median_ms"] <= 0.5 else "MISSES"
                print(f"{'':<27}target: median added (wall) <= 0.5 ms with redaction off: {verdict}")


if __name__ == "__main__":
    main()
