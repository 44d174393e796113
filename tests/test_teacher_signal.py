"""KL math against values computed by hand, and the chat-format encoding it runs on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tiny_models import tiny_student  # noqa: F401  (session fixture)

torch = pytest.importorskip("torch")

from aad_core.models.teacher_signal import (  # noqa: E402
    entropy,
    from_logprobs,
    kl_exact,
    kl_one_hot,
    kl_topk_tail,
    vocab_mismatch,
)


def _lp(*probs: float) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log()


def test_one_hot_kl_is_negative_log_likelihood() -> None:
    student = _lp(0.5, 0.25, 0.25)
    assert kl_one_hot(student, torch.tensor([1])).item() == pytest.approx(math.log(4))
    assert kl_one_hot(student, torch.tensor([0])).item() == pytest.approx(math.log(2))


def test_exact_kl_hand_computed() -> None:
    p, q = _lp(0.5, 0.5, 0.0 + 1e-300), _lp(0.25, 0.25, 0.5)
    # 0.5*ln(0.5/0.25) * 2 = ln 2
    assert kl_exact(p, q).item() == pytest.approx(math.log(2), abs=1e-9)
    assert kl_exact(q, q).item() == pytest.approx(0.0, abs=1e-12)


def test_top_k_plus_tail_hand_computed() -> None:
    # Vocabulary of 4. Teacher top-2: token 0 with 0.6, token 2 with 0.3 -> tail 0.1.
    student = _lp(0.4, 0.1, 0.2, 0.3)  # on {0, 2}: 0.4, 0.2 -> student tail 0.4
    ids = torch.tensor([[0, 2]])
    lps = torch.tensor([[math.log(0.6), math.log(0.3)]], dtype=torch.float64)
    expected = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.1 * math.log(0.1 / 0.4)
    assert kl_topk_tail(student, ids, lps).item() == pytest.approx(expected, abs=1e-9)


def test_top_k_unmapped_teacher_token_goes_to_tail() -> None:
    student = _lp(0.5, 0.5)
    ids = torch.tensor([[0, -1]])  # the second teacher token does not exist in the student vocabulary
    lps = torch.tensor([[math.log(0.7), math.log(0.2)]], dtype=torch.float64)
    # teacher: {0: 0.7, tail: 0.3}; student: {0: 0.5, tail: 0.5}
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert kl_topk_tail(student, ids, lps).item() == pytest.approx(expected, abs=1e-9)


def test_top_k_equals_exact_when_k_covers_vocabulary() -> None:
    p = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    ids = torch.arange(5).repeat(3, 1)
    assert torch.allclose(kl_topk_tail(q, ids, p), kl_exact(p, q), atol=1e-9)


def test_entropy_uniform() -> None:
    assert entropy(_lp(0.25, 0.25, 0.25, 0.25)).item() == pytest.approx(math.log(4))


def test_signal_uses_top_k_only_when_tokens_align(tiny_student: Path) -> None:
    from transformers import AutoTokenizer

    from aad_core.schema import TokenLogprob, TopLogprob

    tok = AutoTokenizer.from_pretrained(tiny_student)
    answer = tok("card_arrival", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = [tok.decode([i]) for i in answer[:-1]]
    rec = [TokenLogprob(token=p, logprob=-0.2, top_logprobs=[TopLogprob(token=p, logprob=-0.2)]) for p in pieces]
    sig = from_logprobs(tok, answer, rec)
    assert sig.kind == "top-k" and sig.ids.shape == (len(answer), 1)
    assert sig.ids[-1, 0].item() == tok.eos_token_id and sig.logprobs[-1, 0].item() == 0.0
    wrong = [TokenLogprob(token="zz" + p, logprob=-0.2) for p in pieces]
    fallback = from_logprobs(tok, answer, wrong)
    assert fallback.kind == "one-hot" and "do not match" in fallback.fallback_reason
    assert from_logprobs(tok, answer, None).kind == "one-hot"


def test_vocab_mismatch_detected(tiny_student: Path, tmp_path: Path) -> None:
    from tiny_models import make_tiny_student
    from transformers import AutoTokenizer

    same = AutoTokenizer.from_pretrained(tiny_student)
    other = AutoTokenizer.from_pretrained(make_tiny_student(tmp_path / "other", vocab_size=300))
    assert vocab_mismatch(same, AutoTokenizer.from_pretrained(tiny_student)) is None
    assert "differ" in vocab_mismatch(other, same)


def test_encode_trace_masks_prompt_and_keeps_answer(tiny_student: Path) -> None:
    from conftest import make_trace
    from transformers import AutoTokenizer

    from aad_core.models.chat_format import encode_trace, prompt_text
    from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Trace

    tok = AutoTokenizer.from_pretrained(tiny_student)
    trace = make_trace("where is my card " * 30, "card_arrival")
    enc = encode_trace(tok, trace, 40)
    assert len(enc["input_ids"]) == 40 == len(enc["labels"]) == len(enc["attention_mask"])
    answer = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert tok.decode(answer).startswith("card_arrival")  # the whole answer survives; the prompt was cut
    assert enc["labels"][0] == -100 and enc["labels"][-1] != -100
    assert prompt_text(tok, trace.request).endswith("<|im_start|>assistant\n")

    tool_trace = Trace(
        request=ChatRequest(messages=[Message(role="user", content="weather?")],
                            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]),
        response=Message(role="assistant", tool_calls=[ToolCall(function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]),
    )
    enc = encode_trace(tok, tool_trace, 200)
    answer_text = tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert '"get_weather"' in answer_text and '"Paris"' in answer_text
    assert "get_weather" in prompt_text(tok, tool_trace.request)  # the bound tools reach the prompt


def test_template_without_tool_support_folds_tools_into_text(tiny_student: Path) -> None:
    from transformers import AutoTokenizer

    from aad_core.models.chat_format import prompt_text, answer_text
    from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall

    tok = AutoTokenizer.from_pretrained(tiny_student)
    tok.chat_template = (  # SmolLM2's template: content only
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    req = ChatRequest(messages=[Message(role="system", content="Be brief."), Message(role="user", content="weather?")],
                      tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
    prompt = prompt_text(tok, req)
    assert "Be brief." in prompt and "get_weather" in prompt
    call = Message(role="assistant", tool_calls=[ToolCall(function=FunctionCall(name="get_weather", arguments="{}"))])
    assert answer_text(tok, req, call).startswith('<tool_call>{"name": "get_weather"')
    tok.chat_template = None
    assert prompt_text(tok, req).endswith("<|im_start|>assistant\n")  # the plain fallback layout


def test_local_teacher_soft_targets_stay_float32_under_the_students_bf16_autocast(tiny_student: Path) -> None:
    """The trainer runs the student's passes under bfloat16 autocast (precision 'bf16'); the local
    teacher's distributions inside that block must be the float32 ones."""
    from transformers import AutoTokenizer

    from aad_core.models.teacher_signal import LocalTeacher

    teacher = LocalTeacher(str(tiny_student), device="cpu").load(AutoTokenizer.from_pretrained(tiny_student))
    ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
    mask = torch.ones_like(ids)
    plain = teacher.answer_logprobs(ids, mask, temperature=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = teacher.answer_logprobs(ids, mask, temperature=2.0)
        student_like = teacher.model_(input_ids=ids, attention_mask=mask).logits  # what autocast does to a pass
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert student_like.dtype == torch.bfloat16  # so the test would see a teacher pass left under autocast
