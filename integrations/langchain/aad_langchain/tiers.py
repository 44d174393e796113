"""``LangChainTier``: any LangChain chat model as a middle tier of the cascade (specialist -> tier -> teacher).

.. code-block:: python

    from aad_langchain import LangChainTier, RoutedChatModel

    llm = RoutedChatModel(teacher=ChatOpenAI(model="gpt-4o"), workspace="./my-agent",
                          tiers=[LangChainTier(ChatOpenAI(model="gpt-4o-mini", logprobs=True), name="mini",
                                               tasks=["intent"], min_mean_logprob=-0.3)])

The tier's run carries ``metadata["aad_tier"]``: :class:`~aad_langchain.AADCallbackHandler` never records
it, so a middle tier's answer never becomes training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, convert_to_messages, convert_to_openai_messages

from aad_core.schema import TIER_METADATA_KEY, ChatRequest, Message, Usage
from aad_core.serving.cascade import DEFAULT_TIER_TIMEOUT_S, Tier, TierReply, as_tier, mean_logprob_of

__all__ = ["LangChainTier", "tier_of"]

#: Request parameters a LangChain chat model gets as call arguments (``stop``) or not at all.
_SKIP = ("model", "stream", "stream_options", "tools", "tool_choice", "stop", "aad")


def _model_name(model: BaseChatModel) -> str:
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return str(getattr(model, "_llm_type", type(model).__name__))


class LangChainTier(Tier):
    """A middle tier answered by a LangChain chat model.

    Parameters
    ----------
    model : BaseChatModel
        Any chat model (``ChatOpenAI``, ``ChatOllama``, a fake model in tests). For the confidence gate it
        must report log-probs in ``response_metadata["logprobs"]`` (e.g. ``ChatOpenAI(logprobs=True)``).
    name : str or None
        The tier's name (default: the model's name).
    tasks, min_mean_logprob, timeout_s :
        As for :class:`aad_core.serving.cascade.Tier`.
    """

    def __init__(self, model: BaseChatModel, name: str | None = None, *, tasks: Sequence[str | int] | None = None,
                 min_mean_logprob: float | None = None, timeout_s: float = DEFAULT_TIER_TIMEOUT_S) -> None:
        if not isinstance(model, BaseChatModel):
            raise ValueError(f"The 'model' parameter of LangChainTier must be a LangChain BaseChatModel. "
                             f"Got {model!r} instead.")
        super().__init__(name or _model_name(model), tasks=tasks, min_mean_logprob=min_mean_logprob,
                         timeout_s=timeout_s)
        self.model = model

    def generate(self, request: ChatRequest) -> TierReply:
        messages: list[BaseMessage] = convert_to_messages(
            [m.model_dump(mode="json", exclude_none=True) for m in request.messages])
        runnable: Any = self.model
        if request.tools:
            choice = request.params.get("tool_choice")
            try:
                runnable = self.model.bind_tools(request.tools, **({"tool_choice": choice} if choice else {}))
            except NotImplementedError:
                runnable = self.model
        extra = {k: v for k, v in request.params.items() if k not in _SKIP}
        if extra:
            runnable = runnable.bind(**extra)
        stop = request.params.get("stop")
        # aad_tier in the run's metadata: capture handlers skip this run (never training data)
        config = {"metadata": {TIER_METADATA_KEY: self.name}, "run_name": f"aad-tier-{self.name}"}
        answer = runnable.invoke(messages, config=config, **({"stop": [stop] if isinstance(stop, str) else stop}
                                                             if stop else {}))
        if not isinstance(answer, AIMessage):
            answer = AIMessage(content=answer.content)
        raw = convert_to_openai_messages([answer])[0]
        message = Message.model_validate({k: v for k, v in raw.items() if v is not None})
        um = answer.usage_metadata
        usage = Usage(prompt_tokens=um["input_tokens"], completion_tokens=um["output_tokens"],
                      total_tokens=um["total_tokens"]) if um else None
        meta = answer.response_metadata or {}
        model = meta.get("model_name") or meta.get("model") or _model_name(self.model)
        return TierReply(message, mean_logprob_of(meta.get("logprobs")), usage, str(model))


def tier_of(obj: Any) -> Tier:
    """A :class:`Tier` from a LangChain chat model, a Tier, a ``[[route.tiers]]`` dict or a TierConfig."""
    if isinstance(obj, BaseChatModel):
        return LangChainTier(obj)
    return as_tier(obj)
