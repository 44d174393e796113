"""``langchain_teacher``: a LangChain chat model as the live teacher of ``aad augment`` / ``aad prompt-search``.

.. code-block:: python

    from aad_core.pipeline.augment import run_augment
    from aad_langchain import langchain_teacher

    run_augment(ws, "intent", teacher=langchain_teacher(ChatOpenAI(model="gpt-4o")))

The teacher's runs carry ``metadata["aad_tier"]`` (it is a :class:`~aad_langchain.LangChainTier`): an
:class:`~aad_langchain.AADCallbackHandler` on the model never records them as ordinary traces; what
``aad augment`` keeps is stored by it, as ``augmented`` traces.
"""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from aad_langchain.tiers import LangChainTier, _model_name

__all__ = ["langchain_teacher"]


def langchain_teacher(model: BaseChatModel, *, name: str | None = None) -> LangChainTier:
    """``model`` as a teacher: a :class:`LangChainTier` (its ``generate(request)`` answers a
    :class:`~aad_core.schema.ChatRequest`), named ``teacher-<model name>`` unless ``name`` is given."""
    return LangChainTier(model, name=name or f"teacher-{_model_name(model)}")
