"""Prompt-lookup (n-gram speculative) decoding of single requests (issue 16): drafts copied from the
prompt, the answer so far and the adapter's previous answer are checked in one forward pass, so the
answers and their mean log-probs are those of plain greedy decoding — with tiny random students."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from test_specialist_speed import TOOLS, USERS, _adapter, _request, _runtime, _same, peaked_student  # noqa: F401

from aad_core.schema import ChatRequest, Message
from aad_core.workspace import Workspace


def _requests() -> list[ChatRequest]:
    # The peaked tiny student repeats itself ("%%%%", "DEDEDE"): prompts holding those runs are answers that
    # copy the request, and its own repetitions are copies of the answer so far.
    copies = ["%%%%%%%%%%%%%%%% card arrival %%%%%%%%", "DEDEDEDEDEDEDEDE JJJJJJJJ @==+-@==+-",
              "the quick brown fox jumps over the lazy dog the quick brown fox jumps"]
    return ([_request(u) for u in USERS + copies] + [_request(u, tools=TOOLS) for u in USERS[:2]]
            + [ChatRequest(messages=[Message(role="user", content="no system prompt at all " * 3)])])


def _singles(rt: Any, requests: list[ChatRequest], max_new_tokens: int = 24, **kw: Any) -> list[Any]:
    return [rt.generate([r], max_new_tokens=max_new_tokens, **kw)[0] for r in requests]


def test_prompt_lookup_answers_exactly_as_plain_greedy_with_and_without_a_cached_prefix(peaked_student: Path) -> None:
    requests = _requests()
    plain = _runtime(peaked_student, prefix_cache=0, prompt_lookup=0)
    reference = _singles(plain, requests)
    assert len({g.text for g in reference}) > 2  # the answers differ: equality below means something
    assert plain.stats["lookup_passes"] == 0
    for prefix_cache in (0, 8):
        rt = _runtime(peaked_student, prefix_cache=prefix_cache, prompt_lookup=10)
        _same(_singles(rt, requests), reference)
        _same(_singles(rt, requests), reference)  # again: now drafting from the previous answer too
        stats = rt.stats
        # Every token came from a lookup pass, and accepted drafts saved passes.
        assert stats["lookup_tokens"] >= sum(g.n_tokens for g in reference) * 2
        assert 0 < stats["lookup_passes"] < 0.9 * stats["lookup_tokens"]
        assert (stats["prefix_hits"] > 0) == (prefix_cache > 0)
    # Short budgets (drafts cut to fit) and a batch (batched lookup: see test_runtime_batch_lookup.py) answer alike too.
    rt = _runtime(peaked_student, prompt_lookup=4)
    for n in (1, 2, 5):
        _same(_singles(rt, requests[:6], n), _singles(plain, requests[:6], n))
    passes = rt.stats["lookup_passes"]
    _same(rt.generate(requests[:5], max_new_tokens=24), reference[:5])  # one prefix: one batch of 5
    assert rt.stats["lookup_passes"] == passes
    _same(rt.generate(requests, max_new_tokens=24), reference)  # a row alone in its prefix group: lookup


def test_prompt_lookup_answers_as_plain_greedy_with_an_adapter(peaked_student: Path, tmp_path: Path) -> None:
    adapter = _adapter(peaked_student, tmp_path / "a", 1)
    requests = _requests()
    # "merged": float32, exact up to rounding.
    plain, lookup = _runtime(peaked_student, fast_path="merged", prompt_lookup=0), _runtime(peaked_student,
                                                                                            fast_path="merged")
    for rt in (plain, lookup):
        rt.add_adapter("a", adapter)
    reference = _singles(plain, requests, adapter="a")
    assert len({g.text for g in reference}) > 2
    _same(_singles(lookup, requests, adapter="a"), reference)
    assert 0 < lookup.stats["lookup_passes"] < lookup.stats["lookup_tokens"] and lookup._last_answer["a"]
    # int8 (the served default): the same answers; bfloat16 matmuls of other widths round a little differently.
    plain8, lookup8 = _runtime(peaked_student, prompt_lookup=0), _runtime(peaked_student)
    for rt in (plain8, lookup8):
        rt.add_adapter("a", adapter)
    a, b = _singles(plain8, requests, adapter="a"), _singles(lookup8, requests, adapter="a")
    assert [g.text for g in a] == [g.text for g in b]
    assert all(math.isfinite(g.mean_logprob) for g in b)
    assert max(abs(x.mean_logprob - y.mean_logprob) for x, y in zip(a, b)) < 1e-2


def test_the_draft_is_what_followed_the_most_recent_occurrence_of_the_longest_matching_ngram() -> None:
    from aad_core.models.runtime import _lookup_draft

    assert _lookup_draft([1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3], 3) == [7, 8, 5]  # "2 3": its latest occurrence
    assert _lookup_draft([1, 2, 3, 4, 5, 6, 0, 9, 3, 0, 5, 6], 2) == [0, 9]  # "5 6" beats the later "6"
    assert _lookup_draft([4, 5, 6, 7, 1, 5, 6], 10, max_ngram=1) == [7, 1, 5, 6]  # cut at the end
    assert _lookup_draft([1, 2, 3], 4) == [] and _lookup_draft([7], 4) == [] and _lookup_draft([], 4) == []


def test_an_equal_ngram_is_drafted_from_the_answer_so_far_then_the_previous_answer_then_the_prompt() -> None:
    from aad_core.models.runtime import _lookup_draft

    previous, prompt = [10, 11, 12, 2], [20, 10, 30, 31, 40]
    regions = (len(previous), len(previous) + len(prompt))
    # "10" occurs in the previous answer and (later) in the prompt: the previous answer's continuation, cut at
    # its end (2 = its end-of-sequence), not the prompt's
    assert _lookup_draft(previous + prompt + [10], 8, regions=regions) == [11, 12, 2]
    assert _lookup_draft(previous + prompt + [10], 8) == [30, 31, 40, 10]  # without regions: the latest one
    # a longer n-gram wins wherever it is ("20 10" only in the prompt) ...
    assert _lookup_draft(previous + prompt + [20, 10], 2, regions=regions) == [30, 31]
    # ... and the answer so far comes first among equals
    assert _lookup_draft(previous + prompt + [10, 50, 10], 3, regions=regions) == [50, 10]
    # a match on the previous answer's last token has nothing to draft: the prompt's occurrence is used
    assert _lookup_draft([3, 4, 5, 5, 6, 8, 9, 5], 4, regions=(3, 7)) == [6, 8, 9, 5]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10", None])
def test_prompt_lookup_is_validated(peaked_student: Path, bad: Any) -> None:
    from aad_core.models.runtime import SpecialistRuntime

    with pytest.raises(ValueError, match=r"The 'prompt_lookup' parameter of SpecialistRuntime must be an int >= 0\. "
                                         r"Got .* instead\."):
        SpecialistRuntime(peaked_student, prompt_lookup=bad)
    assert SpecialistRuntime(peaked_student, prompt_lookup=0).prompt_lookup == 0


def test_route_prompt_lookup_tokens_reaches_the_pool(workspace: Workspace) -> None:
    from pydantic import ValidationError

    from aad_core.config import RouteConfig
    from aad_core.models.runtime import DEFAULT_PROMPT_LOOKUP
    from aad_core.serving.specialists import SpecialistPool

    assert RouteConfig().prompt_lookup_tokens == DEFAULT_PROMPT_LOOKUP
    assert SpecialistPool(workspace, []).runtime_options["prompt_lookup"] == DEFAULT_PROMPT_LOOKUP
    workspace.config.route.prompt_lookup_tokens = 0
    assert SpecialistPool(workspace, []).runtime_options["prompt_lookup"] == 0
    with pytest.raises(ValidationError):
        RouteConfig(prompt_lookup_tokens=-1)
