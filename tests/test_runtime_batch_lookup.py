"""Prompt-lookup decoding of micro-batches (issue 16): several rows share one key/value cache, each with
its own drafts, holes (padding, rejected drafts) and positions, and every row answers exactly as plain
greedy decoding of it alone — with tiny random students."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
from test_prompt_lookup import _requests, _singles
from test_specialist_speed import _adapter, _runtime, _same, peaked_student  # noqa: F401

from aad_core.schema import ChatRequest

Answer = tuple[list[int], list[float]]
#: Rows of the batches below: the requests of _requests() sharing the system prompt (USERS, then prompts
#: that repeat themselves, so that drafts are found, accepted and rejected).
SHARED = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Tiny models gain nothing from intra-op threads, and on a busy machine their spinning slows every pass.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(student: Path, **kw: Any) -> tuple[Any, Any, list[list[int]], list[ChatRequest]]:
    """A loaded runtime, its base model, and the prompt token ids of the shared-system-prompt requests."""
    from aad_core.models.chat_format import prompt_text

    rt = _runtime(student, **kw)
    rt._ensure_loaded()
    tok = rt._tokenizer
    requests = _requests()[:SHARED]
    ids = [list(x) for x in tok([prompt_text(tok, r) for r in requests], add_special_tokens=False)["input_ids"]]
    model, _ = rt._runner(None)
    return rt, model, ids, requests


def _alone(rt: Any, model: Any, row: list[int], max_new_tokens: int) -> Answer:
    """Plain greedy ``model.generate()`` of one prompt alone: its tokens up to end-of-sequence included, and
    the raw log-prob of each."""
    import torch

    tok = rt._tokenizer
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(row):].tolist()
    lps = [float(torch.log_softmax(step[0].float(), dim=-1)[t]) for step, t in zip(out.logits, new)]
    n = new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else len(new)
    return new[:n], lps[:n]


def _batch(rt: Any, model: Any, rows: list[list[int]], prefix: Any, max_new_tokens: int) -> list[Answer]:
    import torch

    with torch.no_grad():
        return rt._lookup_decode_batch(model, rows, prefix, None, max_new_tokens)


def _single(rt: Any, model: Any, row: list[int], prefix: Any, max_new_tokens: int) -> Answer:
    import torch

    with torch.no_grad():
        return rt._lookup_decode(model, row, prefix, None, max_new_tokens)


def _equal(got: list[Answer], want: list[Answer]) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert len(a) == len(b) and max((abs(x - y) for x, y in zip(a, b)), default=0.0) < 1e-4


def _prefix(rt: Any, requests: list[ChatRequest], ids: list[list[int]], use: bool) -> Any:
    if not use:
        return None
    prefix = rt._prefix_for(requests[0], ids[0], None)
    assert prefix is not None and all(tuple(row[: len(prefix.ids)]) == prefix.ids for row in ids)
    return prefix


@pytest.mark.parametrize("use_prefix", [False, True])
def test_batches_of_1_to_8_answer_as_each_row_alone(peaked_student: Path, use_prefix: bool) -> None:
    rt, model, ids, requests = _setup(peaked_student)
    prefix = _prefix(rt, requests, ids, use_prefix)
    alone = [_alone(rt, model, row, 24) for row in ids]
    assert len({tuple(t) for t, _ in alone}) > 4  # the answers differ: equality below means something
    _equal([_single(rt, model, row, prefix, 24) for row in ids], alone)
    for k in range(1, SHARED + 1):
        picked = [(3 * k + i) % SHARED for i in range(k)]  # other rows, orders and prompt lengths each time
        _equal(_batch(rt, model, [ids[i] for i in picked], prefix, 24), [alone[i] for i in picked])
    stats = rt.stats
    assert stats["lookup_batches"] == SHARED
    # Drafts were accepted: fewer passes than the 24 of one token per pass, in each of the SHARED batches.
    assert stats["lookup_batch_tokens"] == 24 * sum(range(1, SHARED + 1))
    assert 0 < stats["lookup_batch_passes"] < 0.9 * 24 * SHARED


@pytest.mark.parametrize("use_prefix", [False, True])
def test_accepted_partly_rejected_and_missing_drafts_leave_every_row_unchanged(
        peaked_student: Path, use_prefix: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from aad_core.models import runtime as runtime_mod

    rt, model, ids, requests = _setup(peaked_student)
    prefix = _prefix(rt, requests, ids, use_prefix)
    alone = [_alone(rt, model, row, 24) for row in ids]
    vocab = len(rt._tokenizer)
    kinds: list[str] = []

    def drafts(seq: list[int], k: int, max_ngram: int = 3, regions: tuple[int, int] = (0, 0)) -> list[int]:
        # The true continuation (accepted), cut short, wrong from some token on (rejected there), or none.
        r = next(i for i, row in enumerate(ids) if seq[: len(row)] == row)
        so_far = len(seq) - len(ids[r])
        true = alone[r][0][so_far : so_far + k]
        rng = random.Random(len(seq) * 131 + r)
        kind = rng.choice(["exact", "wrong", "wrong", "none"]) if true else "none"
        kinds.append(kind)
        if kind == "none":
            return []
        if kind == "wrong":
            i = rng.randrange(len(true))
            true = true[:i] + [(true[i] + 1) % vocab] + true[i + 1 :]
        return true

    monkeypatch.setattr(runtime_mod, "_lookup_draft", drafts)
    for rows in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 2, 5], [3, 6]):
        rt._last_answer.clear()  # the drafts above find their row by the prompt at the start of seq
        _equal(_batch(rt, model, [ids[i] for i in rows], prefix, 24), [alone[i] for i in rows])
    assert {"exact", "wrong", "none"} <= set(kinds)


def test_rows_that_end_early_leave_the_batch_and_the_others_go_on(peaked_student: Path) -> None:
    rt, model, ids, requests = _setup(peaked_student)
    prefix = _prefix(rt, requests, ids, True)
    tokens = [_alone(rt, model, row, 24)[0] for row in ids]
    # The tiny student never ends by itself: a token it writes in some answers (at different steps, not in
    # others) becomes end-of-sequence.
    firsts: dict[int, set[int]] = {}
    for t in {t for answer in tokens for t in answer}:
        firsts[t] = {answer.index(t) for answer in tokens if t in answer[1:20]}
    eos = max((t for t in firsts if sum(t not in a for a in tokens) >= 2), key=lambda t: len(firsts[t]))
    assert len(firsts[eos]) >= 2
    rt._tokenizer = copy.deepcopy(rt._tokenizer)
    rt._tokenizer.eos_token = rt._tokenizer.convert_ids_to_tokens(eos)
    assert rt._tokenizer.eos_token_id == eos
    alone = [_alone(rt, model, row, 24) for row in ids]
    lengths = {len(t) for t, _ in alone}
    assert len(lengths) >= 3 and 24 in lengths  # rows end at different steps, some at the budget
    assert all(t[-1] == eos for t, _ in alone if len(t) < 24)
    for use_prefix in (True, False):
        p = prefix if use_prefix else None
        _equal(_batch(rt, model, ids, p, 24), alone)
        _equal(_batch(rt, model, ids[::-1], p, 24), alone[::-1])
        _equal([_single(rt, model, row, p, 24) for row in ids], alone)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_short_budgets_cut_the_drafts_and_stop_every_row_at_max_new_tokens(peaked_student: Path,
                                                                           max_new_tokens: int) -> None:
    rt, model, ids, requests = _setup(peaked_student)
    prefix = _prefix(rt, requests, ids, True)
    alone = [_alone(rt, model, row, max_new_tokens) for row in ids]
    for p in (prefix, None):
        got = _batch(rt, model, ids, p, max_new_tokens)
        _equal(got, alone)
        assert all(len(t) == max_new_tokens for t, _ in got)
    assert _batch(rt, model, ids[:3], prefix, 0) == [([], [])] * 3


def test_generate_decodes_micro_batches_with_prompt_lookup(peaked_student: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import aad_core.models.runtime as runtime_module

    requests = _requests()  # 8 rows under one prefix, 2 under another (tools), 1 without any
    plain = _runtime(peaked_student, prefix_cache=0, prompt_lookup=0)
    reference = _singles(plain, requests)
    assert plain.stats["lookup_batches"] == 0
    # a batch of more than LOOKUP_BATCH_ROWS rows decodes plainly (the same answers)
    assert runtime_module.LOOKUP_BATCH_ROWS == 8  # the default: the batch size's
    monkeypatch.setattr(runtime_module, "LOOKUP_BATCH_ROWS", 4)
    rt = _runtime(peaked_student, prefix_cache=8)
    _same(rt.generate(requests, max_new_tokens=24), reference)
    assert rt.stats["lookup_batches"] == 1  # the 2 rows with tools
    monkeypatch.setattr(runtime_module, "LOOKUP_BATCH_ROWS", 8)
    for prefix_cache in (0, 8):
        rt = _runtime(peaked_student, prefix_cache=prefix_cache)
        _same(rt.generate(requests, max_new_tokens=24), reference)
        _same(rt.generate(requests, max_new_tokens=24), reference)  # drafting from the previous answer too
        stats = rt.stats
        # Without prefixes: 11 rows in batches of 8 and 3; with them: 8, 2 and a single row (lookup alone).
        assert stats["lookup_batches"] == 4
        assert (stats["lookup_passes"] > 0) == (prefix_cache > 0)
        assert 0 < stats["lookup_batch_passes"] < stats["lookup_batch_tokens"] // 2
    # A generation config that changes greedy's choices keeps plain generate() for batches too.
    rt = _runtime(peaked_student, prefix_cache=0)
    rt._ensure_loaded()
    rt._model.generation_config.repetition_penalty = 1.3
    rt.generate(requests[:3], max_new_tokens=4)
    assert rt.stats["lookup_batches"] == 0


def test_batched_lookup_with_an_adapter_answers_as_plain_greedy(peaked_student: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import math

    import aad_core.models.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "LOOKUP_BATCH_ROWS", 8)

    adapter = _adapter(peaked_student, tmp_path / "a", 1)
    requests = _requests()
    runtimes = {}
    for name, kw in {"plain": {"fast_path": "merged", "prompt_lookup": 0}, "merged": {"fast_path": "merged"},
                     "plain8": {"prompt_lookup": 0, "bf16_from_rows": 0}, "int8": {"bf16_from_rows": 0}}.items():
        runtimes[name] = _runtime(peaked_student, **kw)
        runtimes[name].add_adapter("a", adapter)
    reference = _singles(runtimes["plain"], requests, adapter="a")
    assert len({g.text for g in reference}) > 2
    _same(runtimes["merged"].generate(requests, adapter="a", max_new_tokens=24), reference)
    assert runtimes["merged"].stats["lookup_batches"] == 2
    # int8 (the served default): the same answers; bfloat16 matmuls of other widths round a little differently.
    a = _singles(runtimes["plain8"], requests, adapter="a")
    b = runtimes["int8"].generate(requests, adapter="a", max_new_tokens=24)
    assert [g.text for g in a] == [g.text for g in b] and runtimes["int8"].stats["lookup_batches"] == 2
    assert all(math.isfinite(g.mean_logprob) for g in b)
    assert max(abs(x.mean_logprob - y.mean_logprob) for x, y in zip(a, b)) < 1e-2
