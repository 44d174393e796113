"""aad for LangChain: capture (:class:`AADCallbackHandler`), routing (:class:`RoutedChatModel`), middle
tiers of its cascade (:class:`LangChainTier`) and a chat model as the live teacher of ``aad augment``
(:func:`langchain_teacher`).

Requires ``langchain-core`` (``pip install 'aad[langchain]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AADCallbackHandler", "LangChainTier", "RoutedChatModel", "langchain_teacher"]

_LAZY = {"AADCallbackHandler": "aad_langchain.callback", "RoutedChatModel": "aad_langchain.chat_model",
         "LangChainTier": "aad_langchain.tiers", "langchain_teacher": "aad_langchain.teacher"}

if TYPE_CHECKING:
    from aad_langchain.callback import AADCallbackHandler
    from aad_langchain.chat_model import RoutedChatModel
    from aad_langchain.teacher import langchain_teacher
    from aad_langchain.tiers import LangChainTier


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aad_langchain' has no attribute {name!r}")
