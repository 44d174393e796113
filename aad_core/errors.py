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


def param_error(param: str, owner: str, expected: str, got: object) -> ValueError:
    """The scikit-learn-style validation message: "The 'x' parameter of Y must be ... Got ... instead."."""
    return ValueError(f"The {param!r} parameter of {owner} must be {expected}. Got {got!r} instead.")
