"""Errors shared by the engine, the server and the client.

Every error a user can cause has its own class so that the server can send it
as ``(kind, message)`` and the client can raise the same class again, without
pickling exceptions or leaking server tracebacks.
"""
from __future__ import annotations


class DjinnError(Exception):
    """Base class of every djinn_nb error."""

    kind = "DjinnError"


class BadRequestError(DjinnError, ValueError):
    """An argument is of the wrong type, out of range or malformed."""

    kind = "BadRequestError"


class BreakpointError(BadRequestError):
    """A breakpoint names a layer or step the run cannot reach."""

    kind = "BreakpointError"


class ActivationError(BadRequestError):
    """A replacement activation or edit does not fit the paused checkpoint."""

    kind = "ActivationError"


class RunStateError(DjinnError, RuntimeError):
    """The run is not in a state that allows the call (finished, closed, running)."""

    kind = "RunStateError"


class UnknownRunError(DjinnError, KeyError):
    """No run with that id exists for this client."""

    kind = "UnknownRunError"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(DjinnError, TypeError):
    """The model's decoder blocks, final norm or head could not be found or split exactly."""

    kind = "UnsupportedModelError"


class NoTokenizerError(BadRequestError):
    """A text prompt was given to a model that has no tokenizer."""

    kind = "NoTokenizerError"


class AuthenticationError(DjinnError, PermissionError):
    """The connection's token was missing or wrong."""

    kind = "AuthenticationError"


class ProtocolError(DjinnError):
    """Client and server do not speak the same protocol version."""

    kind = "ProtocolError"


class ExecutionError(DjinnError, RuntimeError):
    """The model failed while running (out of device memory, say); the run is marked failed."""

    kind = "ExecutionError"


class QuotaError(DjinnError):
    """A server limit refused the call (``quota`` names it); nothing was changed."""

    kind = "QuotaError"

    def __init__(self, message: str = "", quota: str | None = None):
        super().__init__(message)
        self.quota = quota


class NonFiniteError(ExecutionError):
    """A step's logits were NaN or infinite; the message names the layer where values stopped being finite."""

    kind = "NonFiniteError"


class SaeError(BadRequestError):
    """A sparse autoencoder cannot be loaded or used as asked (its files, its site, a feature id)."""

    kind = "SaeError"


class TransportError(DjinnError, ConnectionError):
    """The connection could not be made or secured (TLS refused, certificate not trusted, timeout)."""

    kind = "TransportError"


ERROR_CLASSES: dict[str, type[DjinnError]] = {
    cls.kind: cls
    for cls in (
        DjinnError,
        BadRequestError,
        BreakpointError,
        ActivationError,
        RunStateError,
        UnknownRunError,
        UnsupportedModelError,
        NoTokenizerError,
        AuthenticationError,
        ProtocolError,
        ExecutionError,
        QuotaError,
        NonFiniteError,
        TransportError,
        SaeError,
    )
}


def error_from_wire(kind: str, message: str) -> DjinnError:
    """Rebuild an error sent by the server as ``(kind, message)``."""
    return ERROR_CLASSES.get(kind, DjinnError)(message)
