"""The live teacher ``aad augment`` and ``aad prompt-search`` call: ``[teacher]`` or one given in Python.

The core abstraction is a function ``teacher(request: ChatRequest)`` returning the answer: its text, a
:class:`~aad_core.schema.Message`, an OpenAI chat-completion dict or a
:class:`~aad_core.serving.cascade.TierReply`. A :class:`~aad_core.serving.cascade.Tier` works too (its
``generate``), so ``aad_langchain.langchain_teacher(chat_model)`` (a LangChain chat model) does. The
``[teacher]`` endpoint is called with the cascade's OpenAI-compatible client
(:class:`~aad_core.serving.cascade.OpenAITier`: standard library HTTP, no proxy for a loopback URL).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aad_core.errors import AADError
from aad_core.schema import ChatRequest
from aad_core.serving.cascade import OpenAITier, Tier, TierReply, reply_of

if TYPE_CHECKING:
    from aad_core.config import AADSettings, TeacherConfig

log = logging.getLogger(__name__)

#: The name the ``[teacher]`` endpoint's client goes by (it is a cascade tier's client underneath).
_ENDPOINT = "teacher-endpoint"

#: What to add to aad.toml: the hint of the "no teacher" error.
TEACHER_LINES = ('[teacher]\n'
                 'base_url = "https://api.openai.com/v1"   # any OpenAI-compatible endpoint\n'
                 'model = "gpt-4o"\n'
                 'api_key_env = "OPENAI_API_KEY"')


def failure_text(err: BaseException) -> str:
    """One line on a failed teacher call: an aad error's message (without its hint), else the exception."""
    return err.message if isinstance(err, AADError) else f"{type(err).__name__}: {err}"


def with_model(request: ChatRequest, model: str | None) -> ChatRequest:
    """``request`` with ``params["model"]`` set to ``model`` (the call's recorded teacher) when it names none:
    what ``[teacher]`` sends when its own ``model`` is not set."""
    if request.params.get("model") or not model:
        return request
    return request.model_copy(update={"params": {**request.params, "model": model}})


def no_teacher_error(command: str, config_path: Any = None) -> AADError:
    """The error of a command that needs a live teacher when none is configured nor given."""
    where = f"{config_path} has no [teacher] base_url" if config_path else "no [teacher] base_url is set"
    return AADError(
        f"'{command}' needs a live teacher (an OpenAI-compatible endpoint), but {where} "
        "(expected an http(s) URL, got none).",
        hint=f"Add to aad.toml:\n{TEACHER_LINES}\n(or set AAD_TEACHER__BASE_URL and AAD_TEACHER__MODEL); in Python, "
        "pass teacher=<a function of a ChatRequest> or aad_langchain.langchain_teacher(chat_model).",
    )


class Teacher:
    """A teacher normalised to :meth:`ask` (one request) and :meth:`ask_all` (many, at most
    ``max_concurrency`` in flight, answers in the order asked).

    Parameters
    ----------
    fn : callable
        ``fn(request)`` -> the answer (see the module).
    name : str
        How the teacher is named in the artifacts and the traces' metadata.
    max_concurrency : int
        Calls in flight at once.
    """

    def __init__(self, fn: Callable[[ChatRequest], Any], *, name: str, max_concurrency: int = 4) -> None:
        if not callable(fn):
            raise ValueError(f"The 'fn' parameter of Teacher must be callable. Got {fn!r} instead.")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"The 'max_concurrency' parameter of Teacher must be an int >= 1. "
                             f"Got {max_concurrency!r} instead.")
        self.fn = fn
        self.name = name
        self.max_concurrency = max_concurrency

    def ask(self, request: ChatRequest) -> TierReply:
        """The teacher's answer to ``request`` (raises what the teacher raises)."""
        return reply_of(self.fn(request))

    def ask_all(self, requests: Sequence[ChatRequest]) -> list[TierReply | Exception]:
        """Each request's answer, or the exception its call raised, in the order given."""
        def one(request: ChatRequest) -> TierReply | Exception:
            try:
                return self.ask(request)
            except Exception as err:  # one failed call is counted, not fatal
                log.debug("teacher call failed: %s: %s", type(err).__name__, err)
                return err

        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aad-teacher") as pool:
            return list(pool.map(one, requests))


def endpoint_teacher(cfg: TeacherConfig) -> Teacher:
    """The teacher of a ``[teacher]`` section (its ``base_url`` must be set)."""
    if cfg.base_url is None:
        raise no_teacher_error("aad augment")
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not key:
        log.warning("[teacher]: the environment variable %s (api_key_env) is not set; its requests carry no API key",
                    cfg.api_key_env)
    if not cfg.api_key_env:
        from aad_core.config import TEACHER_KEY_ENV

        key = os.environ.get(TEACHER_KEY_ENV) or None
    client = OpenAITier(_ENDPOINT, cfg.base_url, model=cfg.model, api_key=key, timeout_s=cfg.timeout_s)

    def call(request: ChatRequest) -> TierReply:
        try:
            reply = client.generate(request)
        except AADError as err:  # the client words its errors as a tier's
            raise AADError(err.message.replace(f"the tier {_ENDPOINT!r}", "the teacher ([teacher] base_url)"),
                           hint="Check [teacher] base_url, model and the API key (api_key_env).") from None
        if reply.model == _ENDPOINT:  # the endpoint named no model: the one asked for
            reply.model = request.params.get("model")
        return reply

    # the model and the endpoint's host only: a base URL may hold credentials or internal paths, and the
    # name is stored in every augmented trace
    name = f"{cfg.model or 'recorded model'} @ {urlsplit(cfg.base_url).hostname or 'endpoint'}"
    return Teacher(call, name=name, max_concurrency=cfg.max_concurrency)


def resolve_teacher(config: AADSettings, teacher: Any = None, *, command: str = "aad augment") -> Teacher:
    """The teacher to call: ``teacher`` when given (a :class:`Teacher`, a :class:`Tier` such as
    ``aad_langchain.langchain_teacher(model)``, or a function of a request), else ``[teacher]``."""
    limit = config.teacher.max_concurrency
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, Tier):
        return Teacher(teacher.generate, name=teacher.name, max_concurrency=limit)
    if teacher is not None and hasattr(teacher, "invoke") and hasattr(teacher, "bind_tools"):
        raise AADError(f"The 'teacher' parameter got a LangChain chat model ({type(teacher).__name__}); it must be "
                       "a function of a ChatRequest or a Tier.",
                       hint="Wrap it: from aad_langchain import langchain_teacher; teacher=langchain_teacher(model).")
    if teacher is not None and callable(teacher):
        return Teacher(teacher, name=getattr(teacher, "__name__", type(teacher).__name__), max_concurrency=limit)
    if teacher is not None:
        raise ValueError("The 'teacher' parameter must be a function of a ChatRequest, a Tier, a Teacher or None "
                         f"([teacher] in aad.toml). Got {teacher!r} instead.")
    if config.teacher.base_url is None:
        raise no_teacher_error(command, config.path)
    return endpoint_teacher(config.teacher)
