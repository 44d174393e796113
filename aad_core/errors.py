"""Error types. Every aad error says what went wrong, where, what was expected, and how to fix it."""

from __future__ import annotations


class AADError(Exception):
    """Base class for errors aad raises on purpose.

    ``hint`` is the action that fixes the problem (often a command to run); the CLI prints it on
    its own line after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class ConfigError(AADError):
    """A configuration value is invalid (file, key, expected vs got)."""


class UnknownComponentError(AADError, KeyError):
    """A component was asked for by a name no plugin registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return AADError.__str__(self)


class WorkspaceError(AADError):
    """The workspace is missing or incomplete."""


class IngestError(AADError):
    """A record in an input file is invalid. ``location`` is ``file:line``."""

    def __init__(self, message: str, *, location: str, hint: str | None = None) -> None:
        super().__init__(f"{location}: {message}", hint=hint)
        self.location = location


class StageError(AADError):
    """A pipeline stage cannot run because an earlier stage's artifact is missing or stale."""


class PluginError(AADError):
    """A plugin's component raised, or returned the wrong shape, in its main method.

    The message names the component (kind and name), the plugin, its distribution and version, the
    hook that registered it and the method, with what was expected and what came back. When the
    component raised, the error is also an instance of the original exception's type (``except
    ValueError`` still catches a plugin's ``ValueError``) and chains it as ``__cause__``.
    """

    def __init__(self, message: str, *, hint: str | None = None, plugin: str | None = None,
                 distribution: str | None = None, version: str | None = None, kind: str | None = None,
                 name: str | None = None, method: str | None = None, hook: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.plugin, self.distribution, self.version = plugin, distribution, version
        self.kind, self.name, self.method, self.hook = kind, name, method, hook

    def __reduce__(self) -> tuple[object, ...]:  # the per-type subclasses are made at run time
        return (PluginError, (self.message,), dict(self.__dict__))


def param_error(param: str, owner: str, expected: str, got: object) -> ValueError:
    """The scikit-learn-style validation message: "The 'x' parameter of Y must be ... Got ... instead."."""
    return ValueError(f"The {param!r} parameter of {owner} must be {expected}. Got {got!r} instead.")
