"""langchain-tests' standard unit suite (pinned: langchain-tests==1.1.9) for RoutedChatModel."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_core.language_models.fake_chat_models import FakeListChatModel  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from aad_langchain import RoutedChatModel  # noqa: E402


class TestRoutedChatModelStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[RoutedChatModel]:
        return RoutedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"teacher": FakeListChatModel(responses=["teacher answer"]), "workspace": "unused-ws",
                "model": "aad-routed"}

    @property
    def has_tool_choice(self) -> bool:
        return True
