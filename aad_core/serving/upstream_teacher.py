"""The teacher ``aad serve`` forwards requests to: :class:`UpstreamTeacher` (an OpenAI-compatible
``/chat/completions`` called with httpx), :func:`checked_completion` (is an answer a chat completion?),
and the gate that bounds how many teacher calls are in flight at once.

Failures are :class:`~aad_core.serving.openai_errors.TeacherError` (502 / 504), whose messages never
hold the teacher's URL nor its answer (both are logged at WARNING).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from aad_core.config import TEACHER_KEY_ENV
from aad_core.errors import AADError
from aad_core.schema import Message
from aad_core.serving.openai_errors import TeacherError

try:
    import anyio
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise AADError(f"'aad serve' needs FastAPI: {_err}", hint="pip install 'aad[serve]'") from None

if TYPE_CHECKING:
    from aad_core.config import TeacherConfig

# The server's logger (docs/routing.md names it), whichever of its modules logs.
log = logging.getLogger("aad_core.serving.server")

DEFAULT_TEACHER_TIMEOUT_S = 120.0


class UpstreamTeacher:
    """Calls an OpenAI-compatible ``{base_url}/chat/completions`` with httpx: :meth:`acall` (async, what
    the server uses) or the instance itself (sync: shadow evaluation, other callers).

    Parameters
    ----------
    base_url : str
        e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1``.
    model : str or None
        Model name sent upstream (None = the client's ``model`` field).
    api_key : str or None
        The teacher's bearer token (None = ``$AAD_TEACHER_API_KEY``; when neither is set, the
        ``authorization`` the caller passes, which the server sets only when it has no key of its own).
    timeout_s : float
        Upstream request timeout; a call that runs out of it is :class:`TeacherError` 504.
    transport : httpx transport or None
        For tests (e.g. ``httpx.MockTransport``, used by the async client too when it can).

    Failures raise :class:`TeacherError`, whose message names neither the URL nor the upstream body
    (both are logged at WARNING).
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TEACHER_TIMEOUT_S, transport: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(TEACHER_KEY_ENV)
        self.timeout_s = timeout_s
        self.transport = transport
        self._client: Any = None
        self._client_lock = threading.Lock()  # shadow calls reach client() from several threads
        self._aclient: Any = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(timeout=self.timeout_s, transport=self.transport)
            return self._client

    def aclient(self) -> Any:
        """The async client of the running event loop (one per loop: an httpx pool cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            import httpx

            transport = self.transport if hasattr(self.transport, "handle_async_request") else None
            old, old_loop = self._aclient, self._aclient_loop
            # a client of another loop cannot be reused: close its pool on that loop when it still can run
            if old is not None and old_loop is not None and not old_loop.is_closed() and not old_loop.is_running():
                with contextlib.suppress(Exception):
                    old_loop.run_until_complete(old.aclose())
            self._aclient = httpx.AsyncClient(timeout=self.timeout_s, transport=transport)
            self._aclient_loop = loop
        return self._aclient

    async def aclose(self) -> None:
        if self._aclient is not None and self._aclient_loop is asyncio.get_running_loop():
            await self._aclient.aclose()
        self._aclient = self._aclient_loop = None
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _prepare(self, body: dict[str, Any], authorization: str | None) -> tuple[dict[str, Any], dict[str, str]]:
        payload = {**body, "stream": False}
        payload.pop("aad", None)
        payload.pop("stream_options", None)  # only valid with stream: true
        if self.model:
            payload["model"] = self.model
        headers = {"Content-Type": "application/json"}
        auth = f"Bearer {self.api_key}" if self.api_key else authorization
        if auth:
            headers["Authorization"] = auth
        return payload, headers

    def _failed(self, err: Exception) -> TeacherError:
        import httpx

        if isinstance(err, httpx.TimeoutException):
            log.warning("teacher %s timed out after %g s: %r", self.url, self.timeout_s, err)
            return TeacherError(f"The teacher did not answer within {self.timeout_s:g} s.", status=504,
                                code="teacher_timeout", hint="Retry later, or start 'aad serve' with a larger "
                                "--teacher-timeout.")
        log.warning("teacher %s could not be reached: %r", self.url, err)
        return TeacherError("The teacher could not be reached.",
                            hint="The server log names the cause; check --teacher-url and that the teacher is up.")

    def _parse(self, resp: Any) -> dict[str, Any]:
        if resp.status_code >= 400:
            log.warning("teacher %s answered HTTP %s: %s", self.url, resp.status_code, resp.text[:2000])
            hint = ("Check the key that reaches the teacher ($AAD_TEACHER_API_KEY on the server, else the client's "
                    "key when the server has no --api-key)." if resp.status_code in (401, 403)
                    else "The server log holds the teacher's answer.")
            raise TeacherError(f"The teacher answered HTTP {resp.status_code}.", code="teacher_http_error", hint=hint)
        try:
            data = resp.json()
        except ValueError:
            log.warning("teacher %s answered HTTP %s with a body that is not JSON: %r", self.url, resp.status_code,
                        resp.text[:2000])
            raise TeacherError("The teacher's answer is not JSON (expected an OpenAI chat completion).",
                               code="teacher_bad_answer", hint="Check that --teacher-url points at an "
                               "OpenAI-compatible /v1 base URL.") from None
        return checked_completion(data, where=self.url)

    def __call__(self, body: dict[str, Any], authorization: str | None = None) -> dict[str, Any]:
        import httpx

        payload, headers = self._prepare(body, authorization)
        try:
            resp = self.client().post(self.url, json=payload, headers=headers)
        except httpx.HTTPError as err:
            raise self._failed(err) from None
        return self._parse(resp)

    async def acall(self, body: dict[str, Any], authorization: str | None = None) -> dict[str, Any]:
        import httpx

        payload, headers = self._prepare(body, authorization)
        try:
            resp = await self.aclient().post(self.url, json=payload, headers=headers)
        except httpx.HTTPError as err:
            raise self._failed(err) from None
        return self._parse(resp)


def configured_teacher(cfg: TeacherConfig, *, url: str | None = None, model: str | None = None,
                       timeout_s: float | None = None) -> UpstreamTeacher | None:
    """The teacher ``aad serve`` forwards to: ``url`` (``--teacher-url``) with ``model`` and ``timeout_s``
    (default :data:`DEFAULT_TEACHER_TIMEOUT_S`) and the key ``$AAD_TEACHER_API_KEY``; without ``url``, the
    ``[teacher]`` section's ``base_url``, ``model``, key (``api_key_env``, else ``$AAD_TEACHER_API_KEY``)
    and ``timeout_s``, the one ``aad augment`` uses, each overridden by ``model`` / ``timeout_s`` when
    given. None when neither names a teacher."""
    if url:
        return UpstreamTeacher(url, model, timeout_s=DEFAULT_TEACHER_TIMEOUT_S if timeout_s is None else timeout_s)
    if cfg.base_url is None:
        return None
    key: str | None = None  # None: $AAD_TEACHER_API_KEY
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env) or ""
        if not key:
            log.warning("[teacher]: the environment variable %s (api_key_env) is not set; the server sends the "
                        "teacher no key of its own", cfg.api_key_env)
    return UpstreamTeacher(cfg.base_url, model or cfg.model, api_key=key,
                           timeout_s=cfg.timeout_s if timeout_s is None else timeout_s)


def checked_completion(data: Any, *, where: str = "the teacher") -> Any:
    """``data`` when it is an OpenAI chat completion with a first choice holding a message (or, from an
    injected teacher callable, a Message / string / (Message, Usage)); else :class:`TeacherError` 502."""
    if not isinstance(data, dict):
        if isinstance(data, (Message, str, tuple)):
            return data
        why = f"a JSON {type(data).__name__}, not an object"
    else:
        choices = data.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        if first is None:
            why = "no 'choices'" if "choices" not in data else "'choices' is not a non-empty list"
        elif not isinstance(first, dict) or not isinstance(first.get("message"), dict):
            why = "'choices[0].message' is not an object"
        else:
            return data
    log.warning("%s answered something that is not a chat completion (%s): %s", where, why, repr(data)[:2000])
    raise TeacherError(f"The teacher's answer is not a chat completion ({why}).", code="teacher_bad_answer",
                       hint="Check that --teacher-url points at an OpenAI-compatible /v1 base URL.")


class _TeacherGate:
    """At most ``n`` teacher calls in flight; the others wait on the event loop. Its primitives belong to
    one event loop, so they are made again when the app runs on another (each TestClient has its own)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._threads: anyio.CapacityLimiter | None = None

    def current(self) -> tuple[asyncio.Semaphore, anyio.CapacityLimiter]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._semaphore is None or self._threads is None:
            # Sync teacher callables run on their own threads, never taking the ones the handlers need.
            self._loop, self._semaphore, self._threads = loop, asyncio.Semaphore(self.n), anyio.CapacityLimiter(self.n)
        return self._semaphore, self._threads


def _is_async_callable(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))

