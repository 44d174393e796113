"""The one way settings reach a component: its ``[<kind>.<name>]`` table, checked against its signature.

A component factory's signature is its configuration schema. Every parameter but the context values
below can be set in ``aad.toml`` as ``[<kind>.<name>] key = value`` or as ``AAD_<KIND>__<NAME>__<KEY>``
(:mod:`aad_core.config`); its type is the annotation (or the default's type), its help the entry in
the numpydoc ``Parameters`` section of the factory's docstring. :func:`build_component` is the only
place that builds a component from config. It checks every key once, before the factory is called:
an unknown key, a value of the wrong type or a missing required parameter is a :class:`ConfigError`
that names the key, the component and its plugin, and where the value was set (``aad.toml:LINE`` or
the ``AAD_*`` variable). Then it adds the :data:`CONTEXT` values the factory's signature names.

* Environment values are strings: JSON is tried first (``8``, ``2.0``, ``true``, ``["a", "b"]``),
  then the plain string.
* A parameter annotated with ``Path`` (alone or in a union) takes a file path: a relative path is
  relative to the workspace folder (the folder of ``aad.toml``), ``~`` is expanded.
* Table values win over the factory's defaults only; a context name cannot be set in a table (it
  belongs to the core section that :data:`CONTEXT` names).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import ConfigError

if TYPE_CHECKING:
    from aad_core.config import AADSettings
    from aad_core.plugins.registry import ComponentInfo


#: The core key that names the component each kind uses: ``[select] scorer`` picks the scorer.
CHOSEN_BY: dict[str, tuple[str, str]] = {
    "redactor": ("capture", "redactor"),
    "embedder": ("embed", "embedder"),
    "clusterer": ("cluster", "clusterer"),
    "scorer": ("select", "scorer"),
    "selector": ("select", "selector"),
    "trainer": ("train", "trainer"),
    "evaluator": ("eval", "evaluator"),
    "router": ("route", "router"),
}


#: ``[train] trainer = "auto"``: the specialist kinds tried per task, cheapest first. A kind that does
#: not fit a task (``Trainer.applies_to``) or is not installed is skipped.
AUTO_TRAINERS: tuple[str, ...] = ("classifier", "qlora")


def trainer_names(config: AADSettings) -> list[str]:
    """The trainers ``[train] trainer`` lists, in the order the train stage tries them: a name, a list of
    names, or ``"auto"`` (:data:`AUTO_TRAINERS` that are installed; also allowed inside a list)."""
    from aad_core.plugins.manager import get_registry

    chosen = config.train.trainer
    names: list[str] = []
    for name in [chosen] if isinstance(chosen, str) else list(chosen):
        if name == "auto":
            known = set(get_registry().names("trainer"))
            names.extend(n for n in AUTO_TRAINERS if n in known)
        else:
            names.append(name)
    return list(dict.fromkeys(names))


def component_key(name: str) -> str:
    """A component name as matched against tables and environment variables: lower case, '-' as '_'."""
    return name.lower().replace("-", "_")


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (str, bool, number, list, table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@dataclass(frozen=True)
class ContextValue:
    """A value the core offers a factory whose signature has a parameter of that name."""

    help: str
    #: Where a user sets it (a context name cannot be set in a component's table).
    set_in: str
    #: The kinds it is offered to; () = every kind.
    kinds: tuple[str, ...] = ()
    #: How to read it from the config; None = only the caller has it (then it is passed when given).
    read: Callable[[AADSettings], Any] | None = None


#: Every context value the core offers, in one place. A factory receives those its signature names.
CONTEXT: dict[str, ContextValue] = {
    "workspace": ContextValue("The workspace of the run (folders, config, trace store), where there is one.",
                              "the workspace folder"),
    "seed": ContextValue("Seed of every random step.", "the top-level 'seed' key", read=lambda c: c.seed),
    "student": ContextValue("The student model: a known name, a hub id or a local path.", "[train] student",
                            ("scorer", "trainer"), lambda c: c.train.student),
    "max_length": ContextValue("Prompt + answer tokens kept per sample.", "[train] max_length",
                               ("scorer", "trainer"), lambda c: c.train.max_length),
    "k": ContextValue("Number of clusters; None = chosen by the clusterer within [k_min, k_max].",
                      "[cluster] k (or 'aad cluster --k')", ("clusterer",), lambda c: c.cluster.k),
    "k_min": ContextValue("Smallest K tried when k is None.", "[cluster] k_min", ("clusterer",),
                          lambda c: c.cluster.k_min),
    "k_max": ContextValue("Largest K tried when k is None.", "[cluster] k_max", ("clusterer",),
                          lambda c: c.cluster.k_max),
    "embedder": ContextValue("The workspace's embedder (an Embedder instance).",
                             "[embed] embedder and its [embedder.<name>] table", ("evaluator",)),
}


class Lazy:
    """A context value computed only when a factory takes it: ``embedder=Lazy(lambda: get_embedder(cfg))``."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def context_for(kind: str) -> dict[str, ContextValue]:
    """The context values offered to factories of ``kind``."""
    return {n: c for n, c in CONTEXT.items() if not c.kinds or kind in c.kinds}


# -- a factory's parameters ----------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One parameter of a component factory, as aad.toml sees it."""

    name: str
    annotation: Any  # resolved; Any when unknown
    annotation_text: str
    default: Any  # inspect.Parameter.empty when required
    help: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def is_path(self) -> bool:
        return re.search(r"\bPath\b", self.annotation_text) is not None


@dataclass(frozen=True)
class Signature:
    params: dict[str, Param]
    var_keyword: bool  # takes **kwargs: keys it does not name are passed through unchecked
    known: bool  # False when the factory has no readable signature (nothing is checked)


@functools.lru_cache(maxsize=256)
def signature(factory: Any) -> Signature:
    """The keyword parameters of ``factory`` with their resolved types and numpydoc help."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return Signature({}, True, False)
    module = sys.modules.get(getattr(factory, "__module__", "") or "")
    namespace = dict(vars(module)) if module else {}
    docs = param_docs(factory)
    params: dict[str, Param] = {}
    var_keyword = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_keyword = True
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        text = p.annotation if isinstance(p.annotation, str) else _annotation_text(p.annotation)
        params[p.name] = Param(p.name, _resolve(p.annotation, p.default, namespace), text, p.default,
                               docs.get(p.name, ""))
    return Signature(params, var_keyword, True)


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _resolve(annotation: Any, default: Any, namespace: dict[str, Any]) -> Any:
    if annotation is inspect.Parameter.empty:
        return type(default) if default not in (inspect.Parameter.empty, None) else Any
    if isinstance(annotation, str):
        try:
            # the factory's own annotation, in its module's namespace, as typing.get_type_hints does
            return eval(annotation, namespace)  # noqa: S307
        except Exception:  # noqa: BLE001 - a name only imported for type checkers: the type is not checked
            return Any
    return annotation


_SECTION_RULE = re.compile(r"^\s*-{3,}\s*$")


def param_docs(factory: Any) -> dict[str, str]:
    """Parameter help from the numpydoc ``Parameters`` section of the factory's (or its ``__init__``'s) docstring."""
    docs = [getattr(factory, "__doc__", None)]
    if isinstance(factory, type):
        docs.append(getattr(factory.__init__, "__doc__", None))
    out: dict[str, str] = {}
    for doc in docs:
        if not isinstance(doc, str):
            continue
        lines = inspect.cleandoc(doc).splitlines()
        in_params, current = False, []
        for i, line in enumerate(lines):
            if i + 1 < len(lines) and _SECTION_RULE.match(lines[i + 1]) and line.strip():
                in_params, current = line.strip() == "Parameters", []
                continue
            if not in_params or _SECTION_RULE.match(line):
                continue
            if line and not line[0].isspace():  # "name : type", "a, b : int" or "name:"
                current = [n.strip() for n in line.split(":", 1)[0].split(",") if n.strip()]
                for name in current:
                    out.setdefault(name, "")
            elif line.strip():
                for name in current:
                    out[name] = f"{out[name]} {line.strip()}".strip()
    return out


def configurable(kind: str, factory: Any) -> list[Param]:
    """The parameters a user may set in ``[<kind>.<name>]`` (the signature minus the context values)."""
    offered = context_for(kind)
    return [p for p in signature(factory).params.values() if p.name not in offered]


# -- resolving a component's parameters ------------------------------------------------------------

@dataclass
class ComponentParams:
    """What :func:`build_component` passes to a factory, and where each user value came from."""

    info: ComponentInfo
    kwargs: dict[str, Any]
    #: key -> where it was set (only the user's keys; context values are not listed).
    sources: dict[str, str] = field(default_factory=dict)

    def build(self) -> Any:
        """Call the factory (through :meth:`Registry.create`, so the registry's checks apply)."""
        from aad_core.plugins.manager import get_registry

        try:
            return get_registry().create(self.info.kind, self.info.name, **self.kwargs)
        except (ValueError, TypeError) as err:  # a component that checks its parameters in __init__
            key = next((k for k in self.sources if f"'{k}'" in str(err)), None)
            if key is None:
                raise
            raise ConfigError(f"{_where(self.sources[key])}: {err}",
                              hint=_fix_hint(self.info, key, self.sources[key])) from err

    @property
    def effective(self) -> dict[str, Any]:
        """Every parameter's value (given or default) that is plain data, for records and hashes."""
        sig = signature(self.info.factory)
        out: dict[str, Any] = {}
        for name, p in sig.params.items():
            value = self.kwargs.get(name, p.default)
            if value is not inspect.Parameter.empty and _plain(value):
                out[name] = str(value) if isinstance(value, Path) else value
        out.update({k: v for k, v in self.kwargs.items() if k not in sig.params and _plain(v)})
        return out


def component_params(
    kind: str,
    name: str,
    config: AADSettings,
    *,
    params: Mapping[str, Any] | None = None,
    params_source: str = "a keyword argument",
    **context: Any,
) -> ComponentParams:
    """Check the user's parameters of component ``name`` of ``kind`` and add the context it takes.

    ``params`` are explicit values (e.g. ``aad train --epochs``) that win over the table; ``context``
    holds values only the caller has (:data:`CONTEXT` names; None = not available, a :class:`Lazy`
    is computed only when taken).
    """
    from aad_core.plugins.manager import get_registry

    offered = context_for(kind)
    unknown = sorted(set(context) - set(offered))
    if unknown:
        raise ValueError(f"The context of a {kind} may hold {sorted(offered)}. Got {unknown} instead.")
    info = get_registry().get(kind, name)
    sig = signature(info.factory)
    user: dict[str, tuple[Any, str]] = {}
    for key, value in config.component_table(kind, name).items():
        user[key] = (value, config.param_source(kind, name, key) or "set in code")
    for key, value in (params or {}).items():
        user = {k: v for k, v in user.items() if k.lower() != key.lower()}
        user[key] = (value, params_source)

    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    root = _root(config, context.get("workspace"))
    for key, (value, source) in user.items():
        from_env = _is_env(source)
        p = sig.params.get(key) or (next((q for n, q in sig.params.items() if n.lower() == key.lower()), None)
                                    if from_env else None)
        if p is not None and p.name in offered:
            raise ConfigError(
                f"{_where(source)}: [{kind}.{name}] {key}: '{p.name}' is given to every {kind} by aad "
                f"({offered[p.name].help[:-1].lower()}); it is set in {offered[p.name].set_in}.",
                hint=f"Remove it from [{kind}.{name}] and set {offered[p.name].set_in} instead.",
            )
        if p is None:
            if not sig.var_keyword:
                raise _unknown_key(info, key, source)
            kwargs[key] = _decode_env(value) if from_env and isinstance(value, str) else value
            sources[key] = source
            continue
        kwargs[p.name] = _checked(info, p, value, source, from_env, root)
        sources[p.name] = source

    for pname, p in sig.params.items():
        if pname in kwargs or pname not in offered:
            continue
        given = context.get(pname)
        if given is not None:
            kwargs[pname] = given.make() if isinstance(given, Lazy) else given
        elif offered[pname].read is not None:
            kwargs[pname] = offered[pname].read(config)  # type: ignore[misc]
    missing = [p.name for p in sig.params.values() if p.required and p.name not in kwargs]
    if missing:
        where = config.path or "aad.toml"
        raise ConfigError(
            f"The {_component(info)} needs {', '.join(repr(m) for m in missing)}, which is not set.",
            hint=f"Set it in [{kind}.{name}] of {where}: " + ", ".join(f"{m} = ..." for m in missing) + ".",
        )
    return ComponentParams(info, kwargs, sources)


def build_component(
    kind: str,
    name: str,
    config: AADSettings,
    *,
    params: Mapping[str, Any] | None = None,
    params_source: str = "a keyword argument",
    **context: Any,
) -> Any:
    """Build the component ``name`` of ``kind`` from ``config``: see :func:`component_params`."""
    return component_params(kind, name, config, params=params, params_source=params_source, **context).build()


# -- checks and messages -------------------------------------------------------------------------

def _checked(info: ComponentInfo, p: Param, value: Any, source: str, from_env: bool, root: Path | None) -> Any:
    adapter = _adapter(p.annotation)
    candidates = [value]
    if from_env and isinstance(value, str):
        decoded = _decode_env(value)
        candidates = [decoded, value] if decoded is not value else [value]
    error = ""
    for candidate in candidates:
        if adapter is None:
            checked = candidate
            break
        try:
            checked = adapter.validate_python(candidate)
            break
        except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, or a validator that raised
            errors = getattr(err, "errors", None)
            error = errors()[0]["msg"] if callable(errors) else str(err)
    else:
        raise ConfigError(
            f"{_where(source)}: The '{p.name}' parameter of the {_component(info)} must be "
            f"{p.annotation_text or 'of its default type'} ({error}). Got {value!r} instead.",
            hint=_fix_hint(info, p.name, source) + (f" Its help: {p.help}" if p.help else ""),
        )
    if p.is_path and isinstance(checked, (str, Path)) and str(checked):
        path = Path(checked).expanduser()
        checked = str(path if path.is_absolute() or root is None else root / path)
    return checked


@functools.lru_cache(maxsize=512)
def _cached_adapter(annotation: Any) -> Any:
    from pydantic import ConfigDict, TypeAdapter

    try:
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # noqa: BLE001 - a type pydantic cannot check: pass values through
        return None


def _adapter(annotation: Any) -> Any:
    if annotation is Any:
        return None
    try:
        return _cached_adapter(annotation)
    except TypeError:  # unhashable annotation
        return _cached_adapter.__wrapped__(annotation)


def _decode_env(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _is_env(source: str) -> bool:
    return source.upper().startswith("AAD_")


def _where(source: str) -> str:
    return f"environment variable {source}" if _is_env(source) else source


def _component(info: ComponentInfo) -> str:
    dist = getattr(info, "distribution", None)
    return f"{info.kind} {info.name!r} (plugin {info.plugin}{f', distribution {dist}' if dist else ''})"


def _fix_hint(info: ComponentInfo, key: str, source: str) -> str:
    if _is_env(source):
        return f"Fix or unset {source}."
    return f"Fix [{info.kind}.{info.name}] {key} in {source.rsplit(':', 1)[0] if ':' in source else 'aad.toml'}."


def _unknown_key(info: ComponentInfo, key: str, source: str) -> ConfigError:
    names = [p.name for p in configurable(info.kind, info.factory)]
    close = difflib.get_close_matches(key.lower(), names, n=1)
    accepted = ", ".join(names) or "no parameters"
    return ConfigError(
        f"{_where(source)}: unknown key '{key}' for the {_component(info)}: it takes {accepted}.",
        hint=(f"Did you mean '{close[0]}'? " if close else "") + (
            f"Unset {source}." if _is_env(source) else f"Remove or rename it in [{info.kind}.{info.name}]."),
    )


def _root(config: AADSettings, workspace: Any) -> Path | None:
    if getattr(config, "path", None) is not None:
        return config.path.parent  # type: ignore[union-attr]
    root = getattr(workspace, "root", None)
    return Path(root) if root is not None else None


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, Path)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# -- which components a config uses; their tables as TOML ---------------------------------------

def chosen_components(config: AADSettings, kind: str) -> list[str]:
    """The component names of ``kind`` that ``config`` uses (every registered evaluator under 'auto'; every
    trainer ``[train] trainer`` lists)."""
    from aad_core.plugins.manager import get_registry

    section, key = CHOSEN_BY[kind]
    chosen = getattr(getattr(config, section), key)
    if kind == "evaluator":
        extra = sorted(set(config.eval.cluster_evaluators.values()))
        names = get_registry().names("evaluator") if chosen == "auto" else [chosen]
        return list(dict.fromkeys([*names, *extra]))
    if kind == "trainer":
        return trainer_names(config)
    return [chosen]


def component_tables_toml(config: AADSettings, kind: str) -> list[str]:
    """TOML lines of the tables of the ``kind`` components ``config`` uses: every parameter at its value
    (default unless set), its help as a comment. Components without parameters, or not installed, are left out."""
    from aad_core.errors import AADError
    from aad_core.plugins.manager import get_registry

    out: list[str] = []
    for name in chosen_components(config, kind):
        try:
            info = get_registry().get(kind, name)
        except AADError:
            continue
        params = configurable(kind, info.factory)
        if not params:
            continue
        table = config.component_table(kind, name)
        header = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
        out.append(f"# The {_component(info)}: {info.description}")
        out.append(f"[{kind}.{header}]")
        for p in params:
            value = table.get(p.name, p.default)
            if p.help:
                out.append(f"# {p.help}")
            if value is inspect.Parameter.empty or value is None or not _plain(value):
                out.append(f"# {p.name} =" + (" (required)" if p.required else ""))
            else:
                out.append(f"{p.name} = {toml_value(value)}")
        out.append("")
    return out


def describe_components(config: AADSettings) -> list[dict[str, Any]]:
    """Every component ``config`` uses or has a table for, with each parameter's value, source and help."""
    from aad_core.errors import AADError
    from aad_core.plugins.manager import get_registry

    out = []
    for kind in CHOSEN_BY:
        names = list(dict.fromkeys([*chosen_components(config, kind), *getattr(config, kind)]))
        for name in names:
            try:
                info = get_registry().get(kind, name)
            except AADError:
                if any(component_key(t) == component_key(name) for t in getattr(config, kind)):
                    out.append({"kind": kind, "name": name, "plugin": None, "params": [],
                                "error": f"no {kind} named {name!r} is installed"})
                continue
            error = None
            try:
                checked = component_params(kind, name, config).kwargs
            except ConfigError as err:
                checked, error = {}, str(err)
            table = config.component_table(kind, name)
            rows = []
            for p in configurable(kind, info.factory):
                set_here = p.name in table
                value = checked.get(p.name, table[p.name]) if set_here else (None if p.required else p.default)
                source = (config.param_source(kind, name, p.name) or "set in code") if set_here else "default"
                rows.append({"key": p.name, "value": value, "source": source, "help": p.help})
            out.append({"kind": kind, "name": name, "plugin": info.plugin, "params": rows, "error": error})
    return out
