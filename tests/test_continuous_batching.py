"""Continuous batching (issue 16): a call that arrives while an adapter's fast copy decodes a batch joins it at
the next pass and gets its answer as soon as it is complete — a long answer never holds a short one — and
every answer is the one the prompt gets alone. Tiny random students; each pass is slowed down so that the
calls below overlap on any machine."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_specialist_speed import USERS, _adapter, _request, _runtime, _same, peaked_student  # noqa: F401

LONG_USER = "exchange rate for a transfer fee, and why my card payment was declined twice " * 3


def _slowed(rt: Any, adapter: str, delay: float = 0.02) -> list[int]:
    """Slow every forward pass of ``adapter``'s fast copy; returns the rows of each pass."""
    model = rt._fast_model(adapter)
    forward = model.forward
    rows: list[int] = []

    def slow(*args: Any, **kw: Any) -> Any:
        rows.append(int(kw["input_ids"].shape[0]))
        time.sleep(delay)
        return forward(*args, **kw)

    model.forward = slow
    return rows


def _serving(student: Path, adapter: Path, name: str, delay: float = 0.02, **kw: Any) -> tuple[Any, list[int]]:
    """A loaded runtime that micro-batches ``adapter`` (as ``name``) on its merged fast copy, each pass slowed
    down (see :func:`_slowed`); returns it and the rows of each pass."""
    rt = _runtime(student, batch_window_ms=1, fast_path="merged", **kw)
    rt.add_adapter(name, adapter)
    rt.load()
    return rt, _slowed(rt, name, delay)


def test_a_later_call_joins_the_running_batch_and_returns_before_a_longer_answer(peaked_student: Path,
                                                                                   tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "a", 5)
    requests = {"long": _request(USERS[0]), "short": _request(USERS[1]), "pair_1": _request(USERS[2]),
                "pair_2": _request(LONG_USER), "other_node": _request(USERS[4], system="Answer in one word.")}
    budget = {"long": 48, "short": 3, "pair_1": 4, "pair_2": 4, "other_node": 3}
    reference = _runtime(peaked_student, prefix_cache=0, fast_path="merged")
    reference.add_adapter("a", adapter)
    expected = {k: reference.generate([r], max_new_tokens=budget[k], adapter="a")[0] for k, r in requests.items()}
    assert expected["long"].n_tokens > 20, "the long call must outlive the others for this test to mean anything"

    rt, passes = _serving(peaked_student, adapter, "a")
    results: dict[str, Any] = {}
    finished: dict[str, float] = {}

    def call(keys: list[str]) -> None:
        gens = rt.generate([requests[k] for k in keys], max_new_tokens=budget[keys[0]], adapter="a")
        for k, g in zip(keys, gens):
            results[k] = g
            finished[k] = time.monotonic()

    first = threading.Thread(target=call, args=(["long"],))
    first.start()
    while len(passes) < 3:  # the long call's batch is decoding
        time.sleep(0.005)
    later = [threading.Thread(target=call, args=(keys,)) for keys in (["short"], ["pair_1", "pair_2"], ["other_node"])]
    for t in later:
        t.start()
    for t in [first, *later]:
        t.join(timeout=120)

    for key, gen in expected.items():
        _same([results[key]], [gen])
    assert rt.stats["joined_rows"] >= 3, "short and the pair joined the running batch"
    assert max(passes) >= 3, "passes decoded the joined rows together with the long one"
    for key in ("short", "pair_1", "pair_2"):
        assert finished[key] < finished["long"], f"{key} waited for the longer answer"


def test_a_batch_that_keeps_taking_calls_drops_dead_cache_columns_and_answers_each_alike(
        peaked_student: Path, tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "b", 6)
    # A short system prompt (no cached prefix: the batch's columns are all its rows' own) and longer answers.
    users = [USERS[i % len(USERS)] + " please" * (i % 4) for i in range(16)]
    budget = [12 + 3 * (i % 5) for i in range(16)]
    reference = _runtime(peaked_student, prefix_cache=0, fast_path="merged")
    reference.add_adapter("b", adapter)
    expected = [reference.generate([_request(u, system="Be brief.")], max_new_tokens=budget[i], adapter="b")[0]
                for i, u in enumerate(users)]
    rt, _ = _serving(peaked_student, adapter, "b", 0.01, batch_size=4)
    results: list[Any] = [None] * len(users)

    def client(start: int) -> None:  # a closed loop: the next call as soon as the last one is answered
        for i in range(start, len(users), 4):
            results[i] = rt.generate([_request(users[i], system="Be brief.")], max_new_tokens=budget[i],
                                     adapter="b")[0]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    _same(results, expected)
    assert rt.stats["joined_rows"] >= 4 and rt.stats["compactions"] >= 1


def test_a_failing_pass_answers_every_caller_of_the_batch_with_the_error(peaked_student: Path,
                                                                          tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "c", 7)
    rt, passes = _serving(peaked_student, adapter, "c")
    join_row = rt._join_row

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("out of memory in a joining row")

    errors: list[BaseException] = []

    def call(user: str, budget: int) -> None:
        try:
            rt.generate([_request(user)], max_new_tokens=budget, adapter="c")
        except RuntimeError as err:
            errors.append(err)

    first = threading.Thread(target=call, args=(USERS[0], 48))
    first.start()
    while len(passes) < 2:
        time.sleep(0.005)
    rt._join_row = broken  # type: ignore[method-assign]
    second = threading.Thread(target=call, args=(USERS[1], 4))
    second.start()
    for t in (first, second):
        t.join(timeout=60)
    assert not first.is_alive() and not second.is_alive()
    assert len(errors) == 2 and all("joining row" in str(e) for e in errors)
    rt._join_row = join_row  # type: ignore[method-assign]
    assert rt.generate([_request(USERS[2])], max_new_tokens=3, adapter="c")[0].n_tokens >= 1  # the worker lives on


def test_a_call_to_another_adapter_is_not_starved_by_a_batch_that_keeps_taking_calls(peaked_student: Path,
                                                                                     tmp_path: Path) -> None:
    rt = _runtime(peaked_student, batch_window_ms=1, fast_path="merged")
    rt.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 8))
    rt.add_adapter("b", _adapter(peaked_student, tmp_path / "b", 9))
    rt.load()
    passes = _slowed(rt, "a")
    _slowed(rt, "b")
    finished: dict[str, float] = {}

    def call(key: str, adapter: str, user: str, budget: int) -> None:
        rt.generate([_request(user)], max_new_tokens=budget, adapter=adapter)
        finished[key] = time.monotonic()

    first = threading.Thread(target=call, args=("a_long", "a", USERS[0], 40))
    first.start()
    while len(passes) < 2:
        time.sleep(0.005)
    other = threading.Thread(target=call, args=("b", "b", USERS[1], 3))
    other.start()
    time.sleep(0.05)  # queued behind the running batch
    same = threading.Thread(target=call, args=("a_short", "a", USERS[2], 3))
    same.start()
    for t in (first, other, same):
        t.join(timeout=120)
    assert rt.stats["joined_rows"] == 0, "no call joined while a call to another adapter waited"
    assert finished["b"] < finished["a_short"]


@pytest.mark.real_model
def test_a_process_that_used_the_batch_workers_exits_cleanly(tmp_path: Path) -> None:
    """The workers are daemon threads: with the real student (its forward passes run OpenMP regions in the
    worker), one still alive when the interpreter finalises aborts the process ("terminate called without
    an active exception", killed by SIGABRT; this test failed so before the fix). They are ended at exit."""
    import subprocess
    import sys

    from aad_core.models.students import is_materialised, resolve_student

    if not is_materialised("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not materialised (aad models pull smollm2-135m)")
    script = (
        "import sys\n"
        "from aad_core.models.runtime import SpecialistRuntime\n"
        "from aad_core.schema import ChatRequest, Message\n"
        "rt = SpecialistRuntime('smollm2-135m', device='cpu')\n"
        "rt.add_adapter('a', sys.argv[1])\n"
        "r = ChatRequest(messages=[Message(role='system', content='Extract the order as JSON. ' * 5),\n"
        "                          Message(role='user', content='card arrival?')])\n"
        "for _ in range(3):\n"
        "    print(rt.generate([r], max_new_tokens=8, adapter='a')[0].n_tokens)\n"
    )
    adapter = _adapter(resolve_student("smollm2-135m"), tmp_path / "adapter", 3)
    done = subprocess.run([sys.executable, "-c", script, str(adapter)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr


def test_a_call_larger_than_a_batch_is_decoded_chunk_by_chunk_and_only_the_last_chunk_takes_calls_in(
        peaked_student: Path, tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "d", 10)
    users = [USERS[i % len(USERS)] + "!" * i for i in range(5)]
    reference = _runtime(peaked_student, prefix_cache=0, fast_path="merged")
    reference.add_adapter("d", adapter)
    expected = [reference.generate([_request(u)], max_new_tokens=24, adapter="d")[0] for u in users]
    late = reference.generate([_request(USERS[3])], max_new_tokens=4, adapter="d")[0]
    rt, passes = _serving(peaked_student, adapter, "d", batch_size=2)
    joins: list[int] = []
    join_row = rt._join_row

    def watched(*args: Any, **kw: Any) -> Any:
        joins.append(len(passes))
        return join_row(*args, **kw)

    rt._join_row = watched  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    big = threading.Thread(target=lambda: results.update(big=rt.generate([_request(u) for u in users],
                                                                         max_new_tokens=24, adapter="d")))
    big.start()
    while len(passes) < 2:
        time.sleep(0.005)
    small = threading.Thread(target=lambda: results.update(small=rt.generate([_request(USERS[3])], max_new_tokens=4,
                                                                             adapter="d")))
    small.start()
    for t in (big, small):
        t.join(timeout=120)
    _same(results["big"], expected)
    _same(results["small"], [late])
    assert joins, "the late call joined the last chunk"


def test_a_joining_call_whose_prompt_cannot_be_rendered_fails_alone(peaked_student: Path, tmp_path: Path,
                                                                   monkeypatch: Any) -> None:
    import pytest

    from aad_core.models import chat_format

    adapter = _adapter(peaked_student, tmp_path / "e", 11)
    rt, passes = _serving(peaked_student, adapter, "e")
    render = chat_format.prompt_text

    def fragile(tok: Any, request: Any, *a: Any, **kw: Any) -> Any:
        if "BOOM" in str(request.messages[-1].content):
            raise ValueError("cannot render this prompt")
        return render(tok, request, *a, **kw)

    monkeypatch.setattr(chat_format, "prompt_text", fragile)
    results: dict[str, Any] = {}

    def call(key: str, user: str, budget: int) -> None:
        try:
            results[key] = rt.generate([_request(user)], max_new_tokens=budget, adapter="e")[0]
        except ValueError as err:
            results[key] = err

    first = threading.Thread(target=call, args=("long", USERS[0], 40))
    first.start()
    while len(passes) < 2:
        time.sleep(0.005)
    bad = threading.Thread(target=call, args=("bad", "BOOM " + USERS[1], 4))
    bad.start()
    for t in (first, bad):
        t.join(timeout=60)
    assert isinstance(results["bad"], ValueError)
    assert not isinstance(results["long"], BaseException) and results["long"].n_tokens > 0
    with pytest.raises(ValueError, match="cannot render"):  # alone, it fails in its own batch's preparation
        rt.generate([_request("BOOM")], max_new_tokens=4, adapter="e")


def test_after_the_workers_are_stopped_a_call_is_answered_in_its_callers_thread(peaked_student: Path,
                                                                                tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "f", 12)
    reference = _runtime(peaked_student, prefix_cache=0, fast_path="merged")
    reference.add_adapter("f", adapter)
    expected = reference.generate([_request(USERS[1])], max_new_tokens=6, adapter="f")
    rt = _runtime(peaked_student, batch_window_ms=1, fast_path="merged")
    rt.add_adapter("f", adapter)
    _same(rt.generate([_request(USERS[1])], max_new_tokens=6, adapter="f"), expected)
    rt._stop_workers()  # what the exit hook does; an app's own exit hook may still call the specialist
    got: list[Any] = []
    caller = threading.Thread(target=lambda: got.extend(rt.generate([_request(USERS[1])], max_new_tokens=6,
                                                                    adapter="f")))
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "the call waited for a worker that is gone"
    _same(got, expected)
    assert rt._workers == 0


def test_admission_is_first_come_first_served_and_stops_for_new_weights(peaked_student: Path,
                                                                         tmp_path: Path) -> None:
    from aad_core.models.runtime import _Pending

    rt = _runtime(peaked_student, fast_path="merged", prefix_cache=0)
    rt.add_adapter("g", _adapter(peaked_student, tmp_path / "g", 13))
    rt.load()
    model = rt._fast_model("g")
    big = _Pending([_request(USERS[0]), _request(USERS[1])], "g", 4)
    small = _Pending([_request(USERS[2])], "g", 4)
    rt._pending = [big, small]
    joined: list[Any] = []
    assert rt._admit("g", joined, 1, None, model) == []  # the 2-row call came first: the small one waits too
    assert big.next_batch and rt._pending == [big, small]
    assert rt._admit("g", joined, 3, None, model) == []  # and nobody joins until the batch has drained
    big.next_batch = False
    rows = rt._admit("g", joined, 3, None, model)
    assert [key for _, _, key in rows] == [(big, 0), (big, 1), (small, 0)] and rt._pending == []
    rt._pending = [_Pending([_request(USERS[3])], "g", 4)]
    rt.add_adapter("g", _adapter(peaked_student, tmp_path / "g2", 14))  # new weights under the same name
    assert rt._admit("g", joined, 3, None, model) == [] and len(rt._pending) == 1


def test_without_prompt_lookup_later_calls_still_join(peaked_student: Path, tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "h", 15)
    reference = _runtime(peaked_student, prefix_cache=0, fast_path="merged", prompt_lookup=0)
    reference.add_adapter("h", adapter)
    expected = {u: reference.generate([_request(u)], max_new_tokens=b, adapter="h")[0]
                for u, b in ((USERS[0], 40), (USERS[1], 3))}
    rt, passes = _serving(peaked_student, adapter, "h", prompt_lookup=0)
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.update(
        long=rt.generate([_request(USERS[0])], max_new_tokens=40, adapter="h")[0]))
    first.start()
    while len(passes) < 2:
        time.sleep(0.005)
    results["short"] = rt.generate([_request(USERS[1])], max_new_tokens=3, adapter="h")[0]
    short_done = first.is_alive()
    first.join(timeout=60)
    _same([results["long"], results["short"]], [expected[USERS[0]], expected[USERS[1]]])
    assert rt.stats["joined_rows"] == 1 and short_done
