"""Observer hook implementations that cannot break aad.

pluggy calls every observer (``aad_trace_captured``, ``aad_specialist_trained``, ``aad_request_routed``)
in the order it documents: ``tryfirst`` implementations first, ``trylast`` ones last, the rest last
registered first, and wrappers (``wrapper=True``, old-style ``hookwrapper=True``) around all of them.
Right after a plugin is registered, each of its observer :class:`pluggy.HookImpl`\\ s gets its function
replaced by a guard (pluggy calls ``impl.function(*args)`` in ``impl.argnames`` order, with the
argument names it read from the original function), so an exception is logged with the plugin's name
and the other observers still run:

* a plain observer that raises is logged; the call goes on with the next implementation;
* a wrapper that raises before its ``yield`` is logged and lets the call through unwrapped;
* a wrapper that raises after its ``yield`` (or yields twice) is logged and the result passes unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Generator
from typing import Any

import pluggy

from aad_core.plugins import hookspecs

log = logging.getLogger(__name__)

#: Hooks aad calls while it works; registration hooks are not guarded (a failure there marks the plugin failed).
OBSERVER_HOOKS: tuple[str, ...] = tuple(
    name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("aad_") and not name.startswith("aad_register_")
)

_GUARDED = "__aad_guarded__"


def _report(hook: str, impl: pluggy.HookImpl, origin: str, where: str) -> None:
    log.exception("aad observer %s of plugin %r%s raised%s; the other observers still run",
                  hook, impl.plugin_name, origin, where)


def _guard_plain(fn: Callable[..., Any], hook: str, impl: pluggy.HookImpl, origin: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            _report(hook, impl, origin, "")
            return None

    return guarded


def _guard_wrapper(fn: Callable[..., Any], hook: str, impl: pluggy.HookImpl, origin: str) -> Callable[..., Any]:
    """One guard for both wrapper styles: a new-style wrapper receives the result and returns it (or
    another); an old-style hookwrapper receives a :class:`pluggy.Result`, and what it returns is ignored."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Generator[None, Any, Any]:
        try:
            gen = fn(*args, **kwargs)
            next(gen)
        except Exception:  # StopIteration too: a wrapper that never yields
            _report(hook, impl, origin, " before its yield")
            return (yield)
        thrown: BaseException | None = None
        try:
            sent = yield
        except BaseException as exc:  # an inner implementation raised: the wrapper sees it, as pluggy documents
            thrown, sent = exc, None
        try:
            if thrown is not None:
                gen.throw(thrown)
            else:
                gen.send(sent)
        except StopIteration as stop:
            return stop.value
        except Exception as err:
            if err is thrown:
                raise
            _report(hook, impl, origin, " after its yield")
        else:
            gen.close()
            log.error("aad observer %s of plugin %r%s yielded twice; its second part did not run",
                      hook, impl.plugin_name, origin)
        if thrown is not None:
            raise thrown
        return sent

    return guarded


def guard_observers(pm: pluggy.PluginManager, plugin: object, origin: str = "") -> None:
    """Wrap ``plugin``'s observer implementations (idempotent). ``origin`` is appended to the plugin's
    name in log records, e.g. ``" (my-dist 1.0)"``."""
    for hook in OBSERVER_HOOKS:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.plugin is not plugin or getattr(impl.function, _GUARDED, False):
                continue
            guard = _guard_wrapper if (impl.wrapper or impl.hookwrapper) else _guard_plain
            guarded = guard(impl.function, hook, impl, origin)
            setattr(guarded, _GUARDED, True)
            # HookImpl.function is typed Final, but pluggy reads it at every call; argnames stay the original's.
            setattr(impl, "function", guarded)  # noqa: B010
