"""Named components per kind, filled by the ``aad_register_*`` hooks.

``config`` picks components by name (``scorer = "kl-uncertainty"``); :meth:`Registry.create`
builds one, and an unknown name raises an error that lists the names that exist.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from aad_core.errors import AADError, UnknownComponentError

#: The component kinds, each filled by the hook ``aad_register_<kind>s``.
KINDS: tuple[str, ...] = (
    "redactor",
    "embedder",
    "clusterer",
    "scorer",
    "selector",
    "trainer",
    "evaluator",
    "router",
)


@dataclass(frozen=True)
class ComponentInfo:
    kind: str
    name: str
    factory: Any
    plugin: str
    capabilities: dict[str, Any] = field(default_factory=dict)
    distribution: str | None = None
    version: str | None = None

    @property
    def description(self) -> str:
        desc = self.capabilities.get("description")
        if desc:
            return str(desc)
        doc = getattr(self.factory, "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """Components by kind and name."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}

    def register(
        self, kind: str, name: str, factory: Any, *, plugin: str = "?", distribution: str | None = None,
        version: str | None = None, **capabilities: Any,
    ) -> None:
        if kind not in self._items:
            raise ValueError(f"The 'kind' parameter of Registry.register must be one of {KINDS}. Got {kind!r} instead.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {kind} name must be a non-empty string. Got {name!r} instead (plugin {plugin}).")
        if not callable(factory):
            raise ValueError(f"The factory of {kind} {name!r} (plugin {plugin}) must be callable. Got {factory!r} instead.")
        existing = self._items[kind].get(name)
        if existing is not None and existing.plugin != plugin:
            raise AADError(
                f"Two plugins register a {kind} named {name!r}: {existing.plugin} and {plugin}.",
                hint=f"Disable one with AAD_DISABLE_PLUGINS={plugin}",
            )
        self._items[kind][name] = ComponentInfo(kind, name, factory, plugin, dict(capabilities), distribution, version)

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str | None = None) -> list[ComponentInfo]:
        kinds = [kind] if kind else list(KINDS)
        return [info for k in kinds for _, info in sorted(self._items[k].items())]

    def get(self, kind: str, name: str) -> ComponentInfo:
        if kind not in self._items:
            raise UnknownComponentError(f"Unknown component kind {kind!r}; the kinds are: {', '.join(KINDS)}.")
        try:
            return self._items[kind][name]
        except KeyError:
            known = self.names(kind)
            close = difflib.get_close_matches(name, known, n=1)
            suggestion = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"Unknown {kind} {name!r}.{suggestion} Known {kind}s: {', '.join(known) or '(none)'}.",
                hint=f"Run 'aad plugins' to see every {kind} and the plugin that provides it.",
            ) from None

    def create(self, kind: str, name: str, /, **params: Any) -> Any:
        """Build the component ``name`` of ``kind`` with ``params`` (the factory is called now).

        Its main method comes back guarded (:func:`aad_core.plugins.checks.guard_component`)."""
        from aad_core.plugins.checks import guard_component

        info = self.get(kind, name)
        return guard_component(info, info.factory(**params))
