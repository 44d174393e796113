"""Traces to model inputs through the student's chat template (tools and tool calls included).

Our messages are in the OpenAI format (tool-call arguments as a JSON string); Hugging Face chat
templates expect arguments as a dict. When a template has no place for tools or tool calls (many
small models' templates only render ``content``), the tools are described in the system message and
the calls written as ``<tool_call>{...}</tool_call>`` text, so no information is silently dropped.
A tokenizer without any template gets a plain ChatML layout.

Labels mask the prompt with -100: the loss and every score cover the answer tokens only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aad_core.schema import ChatRequest, Message, Trace

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

_PLAIN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: use the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def _supports(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """(renders tools, renders tool calls) for this tokenizer's chat template."""
    template = _template(tokenizer) or ""
    return "tools" in template, "tool_calls" in template


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return raw


def tool_call_text(message: Message) -> str:
    """Tool calls as text: one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` per call."""
    parts = []
    for call in message.tool_calls or []:
        payload = {"name": call.function.name, "arguments": _arguments(call.function.arguments)}
        parts.append(f"<tool_call>{json.dumps(payload, ensure_ascii=False)}</tool_call>")
    return "\n".join(parts)


def tools_text(tools: list[dict[str, Any]]) -> str:
    return "You may call these tools:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def to_hf_message(message: Message, *, calls_native: bool) -> dict[str, Any]:
    """One OpenAI-format message as a Hugging Face chat-template dict."""
    out: dict[str, Any] = {"role": message.role if message.role != "developer" else "system", "content": message.text()}
    if message.role == "function":
        out["role"] = "tool"
    if message.tool_calls:
        if calls_native:
            out["tool_calls"] = [
                {"type": "function", "id": c.id, "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in message.tool_calls
            ]
        else:
            out["content"] = "\n".join(p for p in (out["content"], tool_call_text(message)) if p)
    if message.tool_call_id and calls_native:
        out["tool_call_id"] = message.tool_call_id
    if message.name and message.role in ("tool", "function"):
        out["name"] = message.name
    return out


def _hf_messages(tokenizer: PreTrainedTokenizerBase, request: ChatRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]:
    tools_native, calls_native = _supports(tokenizer)
    messages = [to_hf_message(m, calls_native=calls_native) for m in request.messages]
    tools = request.tools or None
    if tools and not tools_native:
        block = tools_text(tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{block}".strip()}
        else:
            messages.insert(0, {"role": "system", "content": block})
        tools = None
    return messages, tools, calls_native


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            *, add_generation_prompt: bool) -> str:
    template = _template(tokenizer)
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    if template is not None:
        try:
            return tokenizer.apply_chat_template(messages, **kwargs)
        except Exception:  # a strict template (e.g. roles must alternate): use the plain layout
            pass
    flat = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    return tokenizer.apply_chat_template(flat, chat_template=_PLAIN_TEMPLATE, **kwargs)


def prompt_text(tokenizer: PreTrainedTokenizerBase, request: ChatRequest) -> str:
    """The request rendered with the student's chat template, ending with the generation prompt."""
    messages, tools, _ = _hf_messages(tokenizer, request)
    return _render(tokenizer, messages, tools, add_generation_prompt=True)


def answer_text(tokenizer: PreTrainedTokenizerBase, request: ChatRequest, answer: Message) -> str:
    """The answer as the template renders it after the prompt (including its end-of-turn marker)."""
    messages, tools, calls_native = _hf_messages(tokenizer, request)
    prompt = _render(tokenizer, messages, tools, add_generation_prompt=True)
    full = _render(tokenizer, [*messages, to_hf_message(answer, calls_native=calls_native)], tools,
                   add_generation_prompt=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    text = to_hf_message(answer, calls_native=False)["content"]
    eos = tokenizer.eos_token or ""
    return f"{text}{eos}"


def encode_trace(tokenizer: PreTrainedTokenizerBase, trace: Trace, max_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``labels`` (prompt = -100) and ``attention_mask`` for one trace.

    The prompt is cut from the left when prompt + answer exceed ``max_length``; the answer keeps
    at least ``max_length - max_length // 4`` tokens' room and is cut from the right beyond that.
    """
    if trace.response is None:
        raise ValueError(f"Trace {trace.id} has no response: only answered traces can be encoded.")
    prompt = prompt_text(tokenizer, trace.request)
    answer = answer_text(tokenizer, trace.request, trace.response)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    keep_prompt = max(max_length - len(answer_ids), min(len(prompt_ids), max_length // 4))
    keep_prompt = min(keep_prompt, len(prompt_ids))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    ids = list(prompt_ids) + list(answer_ids)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def pad_batch(features: list[dict[str, list[int]]], pad_id: int, *, side: str = "right") -> dict[str, Any]:
    """Dynamic padding of encoded traces to the longest in the batch (torch tensors)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        gap = width - len(f["input_ids"])
        for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
            row = list(f[key])
            out[key].append(row + [fill] * gap if side == "right" else [fill] * gap + row)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def answer_window_start(labels: Any) -> int:
    """The first position whose logits any answer token needs (one before the earliest label)."""
    has = labels != -100
    if not bool(has.any()):
        return 0
    first = has.int().argmax(dim=1)[has.any(dim=1)]
    return max(int(first.min()) - 1, 0)


def answer_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, int]:
    """``(logits, labels, start)`` of a padded batch over its answer window only.

    ``logits_to_keep`` makes the LM head and the loss cover positions ``start`` to the end:
    SmolLM2's head (576 x 49,152) is about a fifth of its forward FLOPs, and most of a sample's
    tokens are prompt. ``logits[:, i]`` predicts ``labels[:, i]`` (both already shifted); a
    full-width tensor aligned with them is ``full[:, start:-1]``.
    """
    start = answer_window_start(batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=batch["labels"].shape[1] - start)
    return out.logits[:, :-1], batch["labels"][:, start + 1 :], start


def template_messages(tokenizer: PreTrainedTokenizerBase | None, request: ChatRequest
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The request's messages and tools as the student's chat template gets them, in training and serving:
    tools folded into the system message and tool calls written as text when the template has no place for
    them (``tokenizer`` None: a template without one). A server that applies the same template (vLLM) renders
    the same prompt from these. Native tool-call arguments are dicts, as templates expect them."""
    messages, tools, _ = _hf_messages(tokenizer, request)  # type: ignore[arg-type]  # None: no template
    return messages, tools
