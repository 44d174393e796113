"""The fast path of LoRA specialists on CPU (issue 16, "cheaper arithmetic"): each adapter answers from
a private copy of the base with only that adapter merged ("merged": the unmerged answers exactly), with
int8 weights ("int8"). Tiny random students, and one real SmolLM2 test with a trained adapter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from test_specialist_speed import USERS, _adapter, _request, _runtime, _same, peaked_student  # noqa: F401
from tiny_models import make_tiny_student  # noqa: F401

from aad_core.schema import ChatRequest, Message
from aad_core.workspace import Workspace

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _requests() -> list[ChatRequest]:
    return ([_request(u) for u in USERS] + [_request(u, tools=TOOLS) for u in USERS[:2]]
            + [ChatRequest(messages=[Message(role="user", content="no system prompt at all")])])


def test_the_merged_copy_answers_exactly_as_the_unmerged_adapter(peaked_student: Path, tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "a", 1)
    plain, merged = _runtime(peaked_student, fast_path="none"), _runtime(peaked_student, fast_path="merged")
    for rt in (plain, merged):
        rt.add_adapter("a", adapter)
    requests = _requests()
    reference = [plain.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests]
    assert len({g.text for g in reference}) > 2  # the answers differ: equality below means something
    assert not plain._fast and plain.stats["fast_builds"] == 0
    _same([merged.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests], reference)
    _same(merged.generate(requests, max_new_tokens=12, adapter="a"), reference)  # batched, prefix reused
    assert merged.stats["fast_builds"] == 1 and merged.stats["prefix_hits"] > 0
    # The shared model is untouched: the base student and scoring are those of the unmerged runtime.
    from peft import PeftModel

    assert isinstance(merged._model, PeftModel) and "a" in merged._model.peft_config
    _same(merged.generate(requests, max_new_tokens=12), plain.generate(requests, max_new_tokens=12))
    pairs = [(r, "card_arrival") for r in requests[:3]]
    for x, y in zip(merged.answer_logprobs(pairs, adapter="a"), plain.answer_logprobs(pairs, adapter="a")):
        assert abs(x[0] - y[0]) < 1e-4 and x[1] == y[1]


def test_the_int8_copy_answers_every_request_with_finite_log_probs(peaked_student: Path, tmp_path: Path) -> None:
    import torch

    from aad_core.models.runtime import _int8_linear_class

    # fast_path="int8" is the default; int8 alone (no bfloat16 copy for wide matmuls): batch-invariant arithmetic
    rt = _runtime(peaked_student, bf16_from_rows=0)
    assert rt.fast_path == "int8"
    uncached = _runtime(peaked_student, prefix_cache=0, bf16_from_rows=0)
    uncached.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 1))
    rt.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 1))
    requests = _requests()
    singles = [rt.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests]
    batched = rt.generate(requests, max_new_tokens=12, adapter="a")
    for gens in (singles, batched):
        assert len(gens) == len(requests)
        assert all(math.isfinite(g.mean_logprob) and g.mean_logprob <= 0 for g in gens)
    # Weight-only int8: a row's answer does not depend on its batch nor on the prefix cache; the bfloat16
    # matmuls round a little differently with other shapes, so the log-probs may differ slightly.
    for other in (batched, [uncached.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests]):
        assert [g.text for g in other] == [g.text for g in singles]
        assert max(abs(x.mean_logprob - y.mean_logprob) for x, y in zip(other, singles)) < 1e-2
    fast = rt._fast["a"]
    linears = [m for m in fast.modules() if isinstance(m, _int8_linear_class())]
    assert linears and not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert fast.get_input_embeddings().weight.dtype == torch.float32  # the tied embeddings stay float
    assert rt._model.get_input_embeddings().weight.data_ptr() != fast.get_input_embeddings().weight.data_ptr()
    no_head = _runtime(peaked_student, int8_lm_head=False)
    no_head.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 1))
    assert len(no_head.generate(requests, max_new_tokens=4, adapter="a")) == len(requests)
    assert type(no_head._fast["a"].get_output_embeddings()) is torch.nn.Linear


def test_the_copy_is_rebuilt_when_the_adapter_changes_and_dropped_on_merge(peaked_student: Path,
                                                                            tmp_path: Path) -> None:
    first, second = _adapter(peaked_student, tmp_path / "a1", 1), _adapter(peaked_student, tmp_path / "a2", 2)
    rt = _runtime(peaked_student, fast_path="merged")
    rt.add_adapter("a", first)
    req = _request(USERS[0])
    rt.generate([req], max_new_tokens=10, adapter="a")
    old = rt._fast["a"]
    rt.add_adapter("a", second)  # new weights: the old copy must not serve them
    assert "a" not in rt._fast and not any(k[0] == "a" for k in rt._prefixes)
    fresh = _runtime(peaked_student, fast_path="none")
    fresh.add_adapter("a", second)
    _same(rt.generate([req], max_new_tokens=10, adapter="a"), fresh.generate([req], max_new_tokens=10, adapter="a"))
    assert rt._fast["a"] is not old and rt.stats["fast_builds"] == 2
    rt.merge("a")
    assert not rt._fast and not rt._prefixes
    _same(rt.generate([req], max_new_tokens=10, adapter="a"), fresh.generate([req], max_new_tokens=10, adapter="a"))
    int8 = _runtime(peaked_student)
    int8.add_adapter("a", second)
    int8.merge("a")  # the shared model is the merged adapter: its int8 copy is built from it
    assert len(int8.generate([req], max_new_tokens=4, adapter="a")) == 1 and "a" in int8._fast


def test_load_builds_and_warms_every_adapters_copy_and_the_base_and_hints_keep_the_shared_model(
        peaked_student: Path, tmp_path: Path) -> None:
    from aad_core.models.runtime import SpecialistRuntime

    rt = SpecialistRuntime(peaked_student, device="cpu", batch_window_ms=0)
    rt.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 1))
    rt.add_adapter("b", _adapter(peaked_student, tmp_path / "b", 2))
    rt.load()
    assert set(rt._fast) == {"a", "b"} and rt.stats["fast_builds"] == 2
    assert rt._fast_model(None) is None
    rt._hints["b"] = object()  # an adapter trained with answer hints answers through the shared model
    assert rt._fast_model("b") is None
    off = SpecialistRuntime(peaked_student, device="cpu", warmup=False, fast_path="none")
    off.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 1))
    off.load()
    assert not off._fast
    from aad_core.errors import AADError

    with pytest.raises(AADError, match="fast_path"):
        SpecialistRuntime(peaked_student, fast_path="fp8")


def test_route_fast_path_reaches_the_pool_and_the_evaluation(workspace: Workspace, peaked_student: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aad_core.config import RouteConfig
    from aad_core.serving.specialists import SpecialistPool

    assert RouteConfig().fast_path == "int8"
    assert SpecialistPool(workspace, []).runtime_options["fast_path"] == workspace.config.route.fast_path
    workspace.config.route.fast_path = "merged"
    assert SpecialistPool(workspace, []).runtime_options["fast_path"] == "merged"

    from aad_core.models import runtime as runtime_mod
    from aad_core.pipeline.evaluate import runner

    built: dict[str, Any] = {}

    class Recording(runtime_mod.SpecialistRuntime):
        def __init__(self, *a: Any, **kw: Any) -> None:
            built.update(kw)
            raise RuntimeError("stop")

    monkeypatch.setattr(runtime_mod, "SpecialistRuntime", Recording)
    spec = type("Spec", (), {"kind": "lora", "base_model": str(peaked_student), "name": "x"})()
    state = type("State", (), {"heldout_ids": lambda self, _c: ["t"]})()
    cluster = type("Cluster", (), {"id": 0})()
    store = type("Store", (), {"iter_traces": lambda self, ids: [type("T", (), {"response": "r"})()]})()
    workspace.config.eval.max_heldout = None
    with pytest.raises(RuntimeError, match="stop"):
        runner.evaluate_specialist(workspace, state, cluster, spec, store, {})
    workspace.config.route.bf16_from_rows = 0
    with pytest.raises(RuntimeError, match="stop"):
        runner.evaluate_specialist(workspace, state, cluster, spec, store, {})
    assert built == {"fast_path": "merged", "prompt_lookup": workspace.config.route.prompt_lookup_tokens,
                     "bf16_from_rows": 0}
    assert SpecialistPool(workspace, []).runtime_options["bf16_from_rows"] == 0


@pytest.mark.real_model
def test_int8_answers_on_smollm2_with_a_trained_adapter(tmp_path: Path) -> None:
    """The int8 copy against the unmerged adapter, on real requests with a really trained adapter: the
    merged copy gives the same answers; int8 must give the same answers on all but at most one request."""
    import csv

    from conftest import SHARED, make_trace

    from aad_core.models.students import is_materialised

    if not is_materialised("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not materialised (aad models pull smollm2-135m)")
    path = SHARED / "data" / "banking77" / "train.csv"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    system = "Label the banking customer's message with its intent. Reply with the label only."
    train = [make_trace(r["text"], r["category"], system=system) for r in rows[:400:25]]  # 16
    heldout = [make_trace(r["text"], r["category"], system=system) for r in rows[1000:1400:50]]  # 8 others
    from aad_plugins.qlora import QLoRATrainer

    out = tmp_path / "adapter"
    QLoRATrainer(student="smollm2-135m", batch_size=4, gradient_accumulation=1, learning_rate=1e-3, max_steps=8,
                 max_length=96, quantization="auto", early_stopping_patience=0,
                 device="cpu").train(train, train[:4], out, show_progress=False)
    requests = [t.request for t in heldout]
    answers: dict[str, list[Any]] = {}
    from aad_core.models.runtime import SpecialistRuntime

    batched: dict[str, list[str]] = {}
    for mode, extra in (("none", {}), ("merged", {}), ("int8", {}), ("int8 only", {"bf16_from_rows": 0})):
        rt = SpecialistRuntime("smollm2-135m", device="cpu", warmup=False, batch_window_ms=0,
                               fast_path=mode.split()[0], **extra)
        rt.add_adapter("b77", out)
        answers[mode] = [rt.generate([r], max_new_tokens=12, adapter="b77")[0] for r in requests]
        if mode.startswith("int8"):  # batched as evaluation does
            batched[mode] = [g.text for g in rt.generate(requests, max_new_tokens=12, adapter="b77")]
        del rt
    # int8 alone is row by row: batched answers are the ones a request gets alone. The default also answers
    # passes of 16+ rows (8 rows drafting) with bfloat16 copies, which round by the pass's width: a near-tie
    # may flip.
    assert batched["int8 only"] == [g.text for g in answers["int8 only"]]
    assert sum(a != b.text for a, b in zip(batched["int8"], answers["int8"])) <= 1
    reference = [g.text for g in answers["none"]]
    assert [g.text for g in answers["merged"]] == reference
    same = sum(a.text == b for a, b in zip(answers["int8"], reference))
    drift = max(abs(a.mean_logprob - b.mean_logprob) for a, b in zip(answers["int8"], answers["none"]))
    print(f"int8 vs unmerged: {same}/{len(reference)} identical answers; max |mean log-prob diff| {drift:.4f}")
    for a, b in zip(answers["int8"], reference):
        if a.text != b:
            print(f"  int8 {a.text!r} vs unmerged {b!r}")
    assert same >= len(reference) - 1
    assert all(math.isfinite(g.mean_logprob) for g in answers["int8"])


def test_wide_matmuls_use_the_bfloat16_copy_and_narrow_ones_the_int8_weights(peaked_student: Path,
                                                                             tmp_path: Path) -> None:
    import pytest
    import torch

    from aad_core.models.runtime import _int8_linear_class, _int8_supported

    if not _int8_supported():
        pytest.skip("this torch build has no int8 weight-only CPU kernel")
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    layer = _int8_linear_class()(dense, 4)
    narrow, wide = torch.randn(3, 64), torch.randn(2, 3, 64)  # 3 rows, then 6
    int8 = torch.ops.aten._weight_int8pack_mm(narrow.to(torch.bfloat16), layer.weight_int8, layer.scale).float()
    assert torch.equal(layer(narrow), int8 + dense.bias)
    bf16 = torch.nn.functional.linear(wide.reshape(6, 64).to(torch.bfloat16), dense.weight.to(torch.bfloat16)).float()
    assert torch.equal(layer(wide), (bf16 + dense.bias).reshape(2, 3, 32))
    assert _int8_linear_class()(dense, 0).weight_bf16 is None

    adapter = _adapter(peaked_student, tmp_path / "a", 1)
    runtimes = {rows: _runtime(peaked_student, bf16_from_rows=rows) for rows in (0, 16, 1)}
    for rt in runtimes.values():
        rt.add_adapter("a", adapter)
    requests = _requests()
    # A random tiny model's answers are near-ties everywhere, so the arithmetic of a pass can flip them: on
    # the real student the served answers were measured identical instead (benchmarks/specialist_latency.py).
    for rt in runtimes.values():
        gens = rt.generate(requests, max_new_tokens=12, adapter="a")
        assert len(gens) == len(requests) and all(math.isfinite(g.mean_logprob) for g in gens)
    assert all(m.weight_bf16 is None for m in runtimes[0]._fast["a"].modules() if isinstance(m, _int8_linear_class()))
    with pytest.raises(ValueError, match="The 'bf16_from_rows' parameter of SpecialistRuntime must be an int >= 0"):
        _runtime(peaked_student, bf16_from_rows=-1)


def test_the_int4_copy_decodes_with_int4_codes_and_answers_each_row_as_alone(peaked_student: Path,
                                                                             tmp_path: Path) -> None:
    """``fast_path="int4"``: the copy's layers keep int4 codes (groups of 32 inputs) beside the int8 weights,
    decoding passes use them, and (int4 products being row by row too) a batched answer is the answer alone."""
    from aad_core.models.lean_llama import LeanLlamaForward
    from aad_core.models.runtime import INT4_GROUP, _int4_supported, _int8_linear_class

    if not _int4_supported():
        pytest.skip("this torch build has no CPU int4 kernel")
    rt = _runtime(peaked_student, fast_path="int4", bf16_from_rows=0)
    rt.add_adapter("a", _adapter(peaked_student, tmp_path / "a", 1))
    requests = _requests()
    singles = [rt.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests]
    copy_ = rt._fast["a"]
    layers = [m for m in copy_.modules() if isinstance(m, _int8_linear_class())]
    assert isinstance(copy_.forward, LeanLlamaForward)
    assert any(m.int4_group == INT4_GROUP and m.weight_int4 is not None for m in layers)
    assert all(math.isfinite(g.mean_logprob) for g in singles)
    assert [g.text for g in rt.generate(requests, max_new_tokens=12, adapter="a")] == [g.text for g in singles]
