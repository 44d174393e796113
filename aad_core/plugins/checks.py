"""The guard around every component the registry builds: its main method's contract, checked at the boundary.

A component that raises an unexpected exception (not an :class:`~aad_core.errors.AADError`) or returns
the wrong shape from its main method reaches the user as a :class:`~aad_core.errors.PluginError` that
names the component, the plugin, its distribution, the ``aad_register_<kind>s`` hook that registered it
and the method, with what was expected and what came back, instead of a traceback from deep inside aad.

The guard is an instance attribute that shadows the class's method: the object itself is returned, so
``isinstance`` and every other attribute keep working. Objects that cannot take attributes
(``__slots__``) or lack the method are returned unguarded.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError, PluginError

if TYPE_CHECKING:
    from aad_core.plugins.registry import ComponentInfo

log = logging.getLogger(__name__)

#: (expected, got) when the output breaks the contract, else None.
Check = Callable[[Any, Any, Any], "tuple[str, str] | None"]


@dataclass(frozen=True)
class Contract:
    """A kind's main method, the argument whose length the output must match, and the output check."""

    method: str
    first_arg: str
    check: Check


# -- describing what came back -------------------------------------------------------------------
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of shape {tuple(shape)}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {len(value)} ({', '.join(kinds) or 'empty'})"
    return f"{type(value).__name__} {_short(value)}"


def _len(value: Any) -> int | None:
    try:
        return len(value)
    except TypeError:
        return None


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _n(n: int | None, what: str) -> str:
    return f"{n} {what}" if n is not None else what


def _sequence_of(out: Any, n: int | None, ok: Callable[[Any], bool], what: str) -> tuple[str, str] | None:
    """``out`` must be a list (or tuple) of ``n`` items that pass ``ok``; ``what`` names one item."""
    expected = f"a list of {_n(n, what)}"
    if not isinstance(out, (list, tuple)):
        return expected, _got(out)
    if n is not None and len(out) != n:
        return expected, f"a {type(out).__name__} of {len(out)} items"
    for i, item in enumerate(out):
        if not ok(item):
            return expected, f"{_got(item)} at index {i}"
    return None


# -- one check per kind ----------------------------------------------------------------------------
def _check_embed(out: Any, texts: Any, _instance: Any) -> tuple[str, str] | None:
    import numpy as np

    n = _len(texts)
    expected = f"an array of shape ({n if n is not None else 'n'}, dim)"
    try:
        arr = np.asarray(out)
    except Exception:
        return expected, _got(out)
    if n == 0 and arr.size == 0:
        return None
    if not np.issubdtype(arr.dtype, np.number):
        return f"{expected} of numbers", f"{type(out).__name__} of dtype {arr.dtype}"
    if arr.ndim != 2 or (n is not None and arr.shape[0] != n):
        return expected, f"{type(out).__name__} of shape {arr.shape}"
    return None


def _check_fit(_out: Any, embeddings: Any, instance: Any) -> tuple[str, str] | None:
    import numpy as np

    shape = getattr(embeddings, "shape", None)
    n, dim = (shape[0], shape[1]) if shape is not None and len(shape) == 2 else (None, None)
    expected = (f"fit() to set labels_ of shape ({n if n is not None else 'n'},) and "
                f"centroids_ of shape (k, {dim if dim is not None else 'dim'})")
    labels, centroids = getattr(instance, "labels_", None), getattr(instance, "centroids_", None)
    if labels is None or centroids is None:
        missing = [a for a, v in (("labels_", labels), ("centroids_", centroids)) if v is None]
        return expected, f"no {' and no '.join(missing)}"
    lab, cen = np.asarray(labels), np.asarray(centroids)
    if lab.ndim != 1 or (n is not None and lab.shape[0] != n) or not np.issubdtype(lab.dtype, np.integer):
        return expected, f"labels_ of shape {lab.shape} and dtype {lab.dtype}"
    if cen.ndim != 2 or (dim is not None and cen.shape[1] != dim):
        return expected, f"centroids_ of shape {cen.shape}"
    return None


def _check_score(out: Any, traces: Any, _instance: Any) -> tuple[str, str] | None:
    return _sequence_of(out, _len(traces), lambda d: isinstance(d, dict) and _is_real(d.get("score")),
                        "dicts, each with a float 'score'")


def _check_select(out: Any, ids: Any, _instance: Any) -> tuple[str, str] | None:
    expected = "a list of ids taken from the input ids"
    if not isinstance(out, (list, tuple)):
        return expected, _got(out)
    if _len(ids) is None:  # an iterator the selector consumed: nothing left to compare with
        return None
    try:
        known: Any = set(ids)
    except TypeError:  # unhashable ids: compare one by one
        known = list(ids)
    for i, item in enumerate(out):
        try:
            present = item in known
        except TypeError:
            present = False
        if not present:
            return expected, f"{_short(item)} at index {i}, which is not one of the input ids"
    return None


def _check_train(out: Any, _train: Any, _instance: Any) -> tuple[str, str] | None:
    return None if isinstance(out, dict) else ("a dict of metrics", _got(out))


def _check_evaluate(out: Any, _predictions: Any, _instance: Any) -> tuple[str, str] | None:
    expected = "a dict with a float 'score' in [0, 1]"
    if not isinstance(out, dict):
        return expected, _got(out)
    score = out.get("score")
    if "score" not in out:
        return expected, f"a dict without 'score' (keys {sorted(map(str, out))})"
    if not _is_real(score):
        return expected, f"'score' = {_got(score)}"
    if math.isnan(float(score)) or not 0.0 <= float(score) <= 1.0:
        return expected, f"'score' = {score!r}"
    return None


def _check_route(out: Any, requests: Any, _instance: Any) -> tuple[str, str] | None:
    from aad_core.schema import RoutingDecision

    return _sequence_of(out, _len(requests), lambda d: isinstance(d, RoutingDecision),
                        "RoutingDecision objects")


def _check_redact(out: Any, traces: Any, _instance: Any) -> tuple[str, str] | None:
    from aad_core.schema import Trace

    return _sequence_of(out, _len(traces), lambda t: isinstance(t, Trace), "Trace objects")


#: The main method of each component kind and what it must return.
CONTRACTS: dict[str, Contract] = {
    "redactor": Contract("redact", "traces", _check_redact),
    "embedder": Contract("embed", "texts", _check_embed),
    "clusterer": Contract("fit", "embeddings", _check_fit),
    "scorer": Contract("score", "traces", _check_score),
    "selector": Contract("select", "ids", _check_select),
    "trainer": Contract("train", "train", _check_train),
    "evaluator": Contract("evaluate", "predictions", _check_evaluate),
    "router": Contract("route", "requests", _check_route),
}


# -- the error -----------------------------------------------------------------------------------
def _origin(info: ComponentInfo) -> str:
    dist = " ".join(p for p in (info.distribution, info.version) if p) if info.distribution else None
    where = f"distribution {dist}" if dist else "no distribution"
    return (f"the {info.kind} {info.name!r} of plugin {info.plugin!r} "
            f"({where}, registered by aad_register_{info.kind}s)")


def _hint(info: ComponentInfo) -> str:
    owner = f"the authors of {info.distribution}" if info.distribution else f"the authors of plugin {info.plugin!r}"
    return (f"This is a bug in the plugin (or in what it was given): report it to {owner}, choose another "
            f"{info.kind} in aad.toml, or disable the plugin with AAD_DISABLE_PLUGINS={info.plugin}.")


@functools.lru_cache(maxsize=None)
def _error_type(base: type[Exception]) -> type[PluginError]:
    """A PluginError that is also a ``base``, so ``except ValueError`` still catches a plugin's ValueError."""
    if base is Exception:
        return PluginError
    try:
        return type(f"Plugin{base.__name__}", (PluginError, base), {"__module__": PluginError.__module__})
    except Exception:  # e.g. a layout conflict with a C-level exception type
        return PluginError


def plugin_error(info: ComponentInfo, method: str, expected: str, got: str,
                 cause: Exception | None = None) -> PluginError:
    """The error the user sees when ``info``'s component breaks the contract of ``method``."""
    verb = f"raised in {method}()" if cause is not None else f"returned the wrong shape from {method}()"
    origin = _origin(info)
    message = f"{origin[0].upper()}{origin[1:]} {verb}. Expected {expected}. Got {got} instead."
    fields: dict[str, Any] = dict(hint=_hint(info), plugin=info.plugin, distribution=info.distribution,
                                  version=info.version, kind=info.kind, name=info.name, method=method,
                                  hook=f"aad_register_{info.kind}s")
    if cause is not None:
        try:
            return _error_type(type(cause))(message, **fields)
        except Exception:  # the original type's __init__ wants other arguments
            pass
    return PluginError(message, **fields)


# -- the guard -----------------------------------------------------------------------------------
class GuardedMethod:
    """Calls a component's bound main method and checks what it raised or returned."""

    def __init__(self, method: Callable[..., Any], info: ComponentInfo, contract: Contract) -> None:
        functools.update_wrapper(self, method)
        self._method = method
        self._info = info
        self._contract = contract

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        contract = self._contract
        first = args[0] if args else kwargs.get(contract.first_arg)
        try:
            out = self._method(*args, **kwargs)
        except AADError:
            raise
        except Exception as err:
            raise plugin_error(self._info, contract.method, f"{contract.method}() to return a result",
                               f"{type(err).__name__}: {err}", cause=err) from err
        problem = contract.check(out, first, getattr(self._method, "__self__", None))
        if problem is not None:
            raise plugin_error(self._info, contract.method, *problem)
        return out

    def __repr__(self) -> str:
        return f"<guarded {self._method!r}>"


def guard_component(info: ComponentInfo, component: Any) -> Any:
    """Return ``component`` with its main method guarded (the same object; see the module docstring)."""
    contract = CONTRACTS.get(info.kind)
    if contract is None:
        return component
    method = getattr(component, contract.method, None)
    if method is None or isinstance(method, GuardedMethod) or not callable(method):
        return component
    try:
        setattr(component, contract.method, GuardedMethod(method, info, contract))
    except (AttributeError, TypeError):
        log.debug("%s %r of plugin %r takes no attributes; its %s() is not guarded",
                  info.kind, info.name, info.plugin, contract.method)
    return component
