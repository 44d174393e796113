"""Fast specialists (issue 16): prefix key/value reuse, micro-batching, too-long prompts to the
teacher at once, and preloading — with tiny random students (one real SmolLM2 test)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_router import engine_for, make_router
from tiny_models import make_tiny_student

from aad_core.schema import ChatRequest, Message
from aad_core.workspace import Workspace

SYSTEM = "You are a helpful assistant. Classify the banking query into its intent. " * 6
USERS = ["card arrival?", "What is the weather in Paris?", "exchange rate for a transfer fee",
         "SELECT name FROM users", "balance not updated"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _request(user: str, system: str = SYSTEM, **kw: Any) -> ChatRequest:
    return ChatRequest(messages=[Message(role="system", content=system), Message(role="user", content=user)], **kw)


@pytest.fixture(scope="module")
def peaked_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student whose weights are scaled up: its greedy answers vary from request to request (the
    plain tiny student's near-uniform logits answer every prompt with the same special token)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    tiny = make_tiny_student(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("peaked")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(6.0)
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if "token" in f.name or "template" in f.name:
            shutil.copy(f, out)
    return out


def _adapter(student: Path, folder: Path, seed: int) -> Path:
    """A random LoRA adapter (non-zero B, so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def _runtime(student: Path, **kw: Any) -> Any:
    from aad_core.models.runtime import SpecialistRuntime

    kw.setdefault("batch_window_ms", 0)
    return SpecialistRuntime(student, device="cpu", warmup=False, **kw)


def _same(a: list, b: list) -> None:
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.n_tokens for g in a] == [g.n_tokens for g in b]
    for x, y in zip(a, b):
        assert abs(x.mean_logprob - y.mean_logprob) < 1e-4


def test_prefix_reuse_answers_token_for_token_as_without_it(peaked_student: Path) -> None:
    requests = [_request(u) for u in USERS] + [_request(u, tools=TOOLS) for u in USERS[:2]]
    requests.append(ChatRequest(messages=[Message(role="user", content="no system prompt at all")]))
    plain = _runtime(peaked_student, prefix_cache=0)
    cached = _runtime(peaked_student)
    reference = [plain.generate([r], max_new_tokens=12)[0] for r in requests]
    assert len({g.text for g in reference}) > 2  # the answers differ: equality below means something
    _same([cached.generate([r], max_new_tokens=12)[0] for r in requests], reference)
    _same(cached.generate(requests, max_new_tokens=12), reference)  # batched: prefix | left-padded rest
    _same(plain.generate(requests, max_new_tokens=12), reference)
    stats = cached.stats
    assert stats["prefix_builds"] == 2  # the system prompt alone, and with the tools
    assert stats["prefix_hits"] >= 2 * 7 - 2 and stats["reused_tokens"] > stats["prompt_tokens"]
    assert plain.stats["reused_tokens"] == 0


def test_prefixes_are_per_adapter_bounded_and_dropped_when_the_adapter_changes(peaked_student: Path,
                                                                                 tmp_path: Path) -> None:
    first, second = _adapter(peaked_student, tmp_path / "a1", 1), _adapter(peaked_student, tmp_path / "a2", 2)
    # "merged": exact arithmetic (int8's bfloat16 matmuls round a little differently with and without a
    # cached prefix; tests/test_fast_path.py checks that path).
    rt = _runtime(peaked_student, prefix_cache=2, fast_path="merged")
    rt.add_adapter("a", first)
    req = _request(USERS[0])
    base = rt.generate([req], max_new_tokens=10)
    with_a = rt.generate([req], max_new_tokens=10, adapter="a")
    assert {k[0] for k in rt._prefixes} == {None, "a"}
    rt.add_adapter("a", second)  # new weights: the old prefix of "a" must not serve them
    assert {k[0] for k in rt._prefixes} == {None}
    fresh = _runtime(peaked_student, prefix_cache=0, fast_path="merged")
    fresh.add_adapter("a", second)
    again = rt.generate([req], max_new_tokens=10, adapter="a")
    _same(again, fresh.generate([req], max_new_tokens=10, adapter="a"))
    assert [g.text for g in with_a] != [g.text for g in again] or with_a[0].mean_logprob != again[0].mean_logprob
    _same(rt.generate([req], max_new_tokens=10), base)
    for i in range(3):  # LRU of 2
        rt.generate([_request("hello", system=f"System prompt number {i}. " * 8)], max_new_tokens=2)
    assert len(rt._prefixes) == 2
    rt.merge("a")
    assert not rt._prefixes


def test_concurrent_calls_are_answered_in_one_batch(peaked_student: Path) -> None:
    reference = _runtime(peaked_student, prefix_cache=0)
    expected = {u: reference.generate([_request(u)], max_new_tokens=8)[0] for u in USERS[:4]}
    rt = _runtime(peaked_student, batch_window_ms=200)
    rt.load()
    results: dict[str, Any] = {}
    barrier = threading.Barrier(4)

    def call(user: str) -> None:
        barrier.wait()
        results[user] = rt.generate([_request(user)], max_new_tokens=8)[0]

    threads = [threading.Thread(target=call, args=(u,)) for u in USERS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == set(expected)
    for user, gen in results.items():
        _same([gen], [expected[user]])
    assert rt.stats["batches"] == 1  # four calls, one forward pass


def test_micro_batches_of_an_adapters_fast_copy_decode_side_by_side_with_the_same_answers(
        peaked_student: Path, tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "a", 3)
    reference = _runtime(peaked_student, prefix_cache=0, fast_path="merged")
    reference.add_adapter("a", adapter)
    users = USERS * 3
    expected = [reference.generate([_request(u)], max_new_tokens=10, adapter="a")[0] for u in users]
    rt = _runtime(peaked_student, batch_window_ms=1, fast_path="merged", parallel_batches=2)
    rt.add_adapter("a", adapter)
    rt.load()
    overlaps: list[int] = []
    decode = rt._decode_plan

    def watched(*args: Any, **kw: Any) -> Any:  # how many batches decode at this moment
        overlaps.append(rt._busy)
        time.sleep(0.05)  # long enough for a second batch to start beside this one
        return decode(*args, **kw)

    rt._decode_plan = watched  # type: ignore[method-assign]
    results: list[Any] = [None] * len(users)

    def call(i: int) -> None:
        results[i] = rt.generate([_request(users[i])], max_new_tokens=10, adapter="a")[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    _same(results, expected)
    assert max(overlaps) == 2, "two micro-batches decoded at once"
    deadline = time.monotonic() + 10  # callers return as their rows finish; the workers wind down just after
    while rt._busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt._busy == 0 and 1 <= rt._workers <= 2


def test_one_slot_or_the_shared_model_decodes_one_batch_at_a_time(peaked_student: Path, tmp_path: Path) -> None:
    for options in ({"parallel_batches": 1, "fast_path": "merged"}, {"parallel_batches": 2, "fast_path": "none"}):
        rt = _runtime(peaked_student, batch_window_ms=1, **options)
        rt.add_adapter("a", _adapter(peaked_student, tmp_path / f"a{len(options)}{options['fast_path']}", 4))
        rt.load()
        seen: list[int] = []
        decode = rt._decode_plan

        def watched(*args: Any, _decode: Any = decode, _seen: list[int] = seen, _rt: Any = rt, **kw: Any) -> Any:
            _seen.append(_rt._busy)
            time.sleep(0.03)
            return _decode(*args, **kw)

        rt._decode_plan = watched  # type: ignore[method-assign]
        threads = [threading.Thread(target=rt.generate, args=([_request(u)],), kwargs={"adapter": "a", "max_new_tokens": 4})
                   for u in USERS]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join(timeout=60)
        assert seen and max(seen) == 0, f"{options}: no batch decodes outside the model lock"


def test_parallel_batches_must_be_a_positive_int(peaked_student: Path) -> None:
    with pytest.raises(ValueError, match="The 'parallel_batches' parameter of SpecialistRuntime must be an int >= 1"):
        _runtime(peaked_student, parallel_batches=0)


def test_a_failed_micro_batch_raises_in_its_caller(peaked_student: Path) -> None:
    from aad_core.errors import AADError

    rt = _runtime(peaked_student, batch_window_ms=1)
    with pytest.raises(AADError, match="No adapter named"):
        rt.generate([_request("x")], adapter="missing")


def _pool(ws: Workspace, student: Path, tmp_path: Path, max_length: int | None) -> Any:
    from aad_core.serving.specialists import SpecialistPool
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(ws)
    spec = registry.save(cluster_id=0, label="cards", name="cards", adapter_dir=_adapter(student, tmp_path / "ad", 3),
                         base_model=str(student),
                         hyperparameters={"trainer": "qlora"} | ({"max_length": max_length} if max_length else {}))
    spec = registry.set_promoted(spec.name, spec.version, True, "test")
    return SpecialistPool(ws, [spec], runtime_options={"warmup": False, "batch_window_ms": 0})


def test_a_prompt_longer_than_the_specialists_max_length_goes_to_the_teacher_at_once(
        workspace: Workspace, peaked_student: Path, tmp_path: Path) -> None:
    pool = _pool(workspace, peaked_student, tmp_path, max_length=64)
    engine = engine_for(workspace, pool, output_kind="text")
    long_request = ChatRequest(messages=[Message(role="user", content="my card has not arrived " * 20)])
    decision, outcome = engine.attempt(long_request)
    assert decision.target == "teacher" and decision.escalated and outcome is not None
    n = pool._runtime("cards").prompt_tokens(long_request)
    assert n > 64 and decision.reason == f"escalated: prompt {n} tokens > specialist max_length 64"
    assert pool._runtime("cards").stats["prompt_tokens"] == 0  # never generated
    decision, outcome = engine.attempt(ChatRequest(messages=[Message(role="user", content="my card?")]))
    assert outcome is not None and "max_length" not in outcome.reason
    assert pool._runtime("cards").stats["prompt_tokens"] > 0  # this one the specialist tried
    engine.close()
    # A manifest without max_length (trained before it was stored): nothing is enforced.
    assert _pool(workspace, peaked_student, tmp_path / "old", None).prompt_too_long("cards", long_request) == ""


def test_preload_loads_and_warms_every_specialist_before_the_first_call(
        workspace: Workspace, peaked_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from aad_core.models import students
    from aad_langchain import RoutedChatModel

    pool = _pool(workspace, peaked_student, tmp_path, max_length=None)
    engine = engine_for(workspace, pool, output_kind="text")
    llm = RoutedChatModel(teacher=FakeListChatModel(responses=["teacher"]), routing_engine=engine, preload=True)
    runtime = pool._runtimes[str(peaked_student)]
    assert runtime.loaded and runtime.adapters == ["cards"]

    def no_loading(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the first call loaded the student")

    monkeypatch.setattr(students, "load_student", no_loading)
    started = time.perf_counter()
    msg = llm.invoke("my card has not arrived")
    assert msg.response_metadata["aad_route"]["specialist"] == "cards" and time.perf_counter() - started < 30
    assert runtime.stats["prompt_tokens"] > 0
    engine.close()


def test_the_server_preloads_at_start_up(workspace: Workspace, peaked_student: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from aad_core.serving.server import create_app

    pool = _pool(workspace, peaked_student, tmp_path, max_length=None)
    engine = engine_for(workspace, pool, output_kind="text")
    assert not pool._runtimes
    with TestClient(create_app(workspace, engine=engine, capture=False, preload=True)) as client:
        assert pool._runtimes[str(peaked_student)].loaded
        assert client.get("/health").status_code == 200
    engine.close()


@pytest.mark.real_model
def test_prefix_reuse_on_smollm2_answers_as_without_it() -> None:
    from aad_core.models.students import is_materialised

    if not is_materialised("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not materialised (aad models pull smollm2-135m)")
    system = ("You are the order-extraction step of a shop's support agent. Read the customer's message and return "
              "a JSON object with the keys order_id (string or null), product (string or null), quantity (integer "
              "or null) and issue (one of: late, damaged, wrong_item, refund, other). Reply with the JSON only. ") * 3
    requests = [_request(u, system=system) for u in (
        "My order 12345 of two blue mugs arrived broken.", "Where is my parcel? Order A-778, a lamp.",
        "I got a red scarf instead of the green one, order 991.")]
    rt = _runtime("smollm2-135m", prefix_cache=0)  # one student in memory, with and without prefix reuse
    reference = [rt.generate([r], max_new_tokens=24)[0] for r in requests]
    rt.prefix_cache, encoded = 8, rt.stats["prompt_tokens"]
    _same([rt.generate([r], max_new_tokens=24)[0] for r in requests], reference)
    assert rt.stats["prefix_builds"] == 1 and rt.stats["reused_tokens"] > 3 * (rt.stats["prompt_tokens"] - encoded)
