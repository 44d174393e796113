"""OpenAI's error object for ``aad serve``: the exceptions a request fails with (:class:`OpenAIError`,
:class:`TeacherError`), the JSON response they become, and the ASGI middleware that turns any other
exception into a 500 of the same shape.

Needs ``pip install 'aad[serve]'`` (FastAPI).
"""

from __future__ import annotations

import logging
from typing import Any

from aad_core.errors import AADError

try:
    from fastapi.responses import JSONResponse
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise AADError(f"'aad serve' needs FastAPI: {_err}", hint="pip install 'aad[serve]'") from None

# The server's logger (docs/routing.md names it), whichever of its modules logs.
log = logging.getLogger("aad_core.serving.server")


class OpenAIError(AADError):
    """An error answered as OpenAI's error object with HTTP ``status``; its message (and hint) is what
    the client reads, so it must never hold internal URLs or upstream bodies."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status, self.type, self.param, self.code = status, type, param, code

    def client_message(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class TeacherError(OpenAIError):
    """The teacher failed: 502 (unreachable, an HTTP error, not a chat completion) or 504 (timed out)."""

    def __init__(self, message: str, *, status: int = 502, code: str = "teacher_error",
                 hint: str | None = None) -> None:
        super().__init__(status, message, type="upstream_error", code=code, hint=hint)


def error_response(status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error object with HTTP ``status``."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _openai_error_response(err: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return error_response(err.status, err.client_message(), err.type, param=err.param, code=err.code, headers=headers)


class _ErrorsAsJSON:
    """ASGI middleware: an exception no handler took becomes a 500 in OpenAI's shape (logged with its
    traceback), never Starlette's plain-text page or a dropped connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            log.exception("aad serve: unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # a streamed answer already under way: nothing else can be sent
                raise
            await _internal_error()(scope, receive, send)


def _internal_error() -> JSONResponse:
    return error_response(500, "The aad server failed on this request (an internal error; the server log has the "
                          "traceback). Retry it, and report it if it persists.", "server_error", code="internal_error")

