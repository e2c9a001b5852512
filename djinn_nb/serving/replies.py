"""How an exposed call answers: plain arguments checked by type alone, results and errors as JSON text.

Every ``exposed_`` call of the service is wrapped by :func:`_reply` (:func:`served` makes one
that hands its arguments to a method of one of the service's call groups): an argument that is
not a plain value is refused without being touched (no ``repr``, no attribute access, so
no callback into the client), a wrong number of arguments is a ``BadRequestError``, and
a ``DjinnError`` returns as ``{"ok": false, "error": {"kind", "message"}}`` so the client
raises the same class. Only wrapped calls are served (``djinn_call``).
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

from ..errors import BadRequestError, DjinnError
from .. import wire

log = logging.getLogger("djinn_nb.serving.service")

__all__ = ["PLAIN", "_reply", "_since", "_str", "served"]


PLAIN = (str, bytes, int, float, bool, type(None))


def _reply(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an exposed call; turn its result or a ``DjinnError`` into JSON text."""

    signature = inspect.signature(fn)
    name = fn.__name__.removeprefix("exposed_")
    params = list(signature.parameters.values())[1:]
    if any(p.kind != p.POSITIONAL_OR_KEYWORD for p in params):  # the arity check below counts positions only
        raise TypeError(f"{fn.__name__}: exposed calls take plain positional parameters")
    least = sum(p.default is inspect.Parameter.empty for p in params)
    arity = f"{least}" if least == len(params) else f"{least} to {len(params)}"

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any) -> Any:
        try:
            for i, a in enumerate(args):  # by type alone: a remote object is never touched
                if not _plain(a):
                    raise BadRequestError(f"argument {i + 1} of {name} must be a plain value (str, bytes, int, "
                                          "float, bool, None, or a tuple of those), not a remote object")
            if not least <= len(args) <= len(params):  # what signature.bind checked, at a tenth of the cost
                raise BadRequestError(f"{name} takes {arity} arguments, got {len(args)}")
            ctx = self._ctx
            with ctx.state.activity, ctx.caller():  # whatever takes the device turn queues as its caller
                result = fn(self, *args)
        except DjinnError as e:
            return wire.dumps({"ok": False, "error": {"kind": e.kind, "message": str(e)}})
        except Exception as e:  # noqa: BLE001 - a bug must not leak a traceback or kill the connection
            log.exception("internal error in %s", fn.__name__)
            return wire.dumps({"ok": False, "error": {"kind": "DjinnError", "message": f"internal server error: {type(e).__name__}: {e}"}})
        if isinstance(result, tuple):  # (meta, payload)
            meta, payload = result
            return wire.dumps({"ok": True, "result": meta}), payload
        return wire.dumps({"ok": True, "result": result})  # non-finite floats become null

    wrapper.djinn_call = True  # type: ignore[attr-defined]  # a function attribute; what _rpyc_getattr serves (rpyc's own exposed_get_service_* are not)
    return wrapper


def served(group: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """The service's ``exposed_<name>`` for ``method`` (named ``name``) of its call group in attribute
    ``group``: a :func:`_reply` call with the method's parameters (the arity check reads them) and
    doc, that hands its arguments to the connection's group."""
    name = method.__name__

    def call(service: Any, *args: Any) -> Any:
        return getattr(getattr(service, group), name)(*args)

    call.__name__ = call.__qualname__ = "exposed_" + name
    call.__doc__ = method.__doc__
    call.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]  # (self, its parameters)
    return _reply(call)


def _plain(a: Any) -> bool:
    """A plain value, or a tuple of them (rpyc sends a tuple by value only when all its items are)."""
    if type(a) in PLAIN:
        return True
    return type(a) is tuple and len(a) <= 1024 and all(type(x) in PLAIN for x in a)


def _str(value: Any, what: str) -> str:
    if type(value) is not str or not value or len(value) > 256:
        raise BadRequestError(f"{what} must be a non-empty string")
    return value




def _since(value: Any) -> int | None:
    """How many token ids the client holds: None (send them all) or a non-negative int."""
    if value is not None and (type(value) is not int or value < 0):
        raise BadRequestError(f"since must be a non-negative integer or None, got {value!r}"[:120])
    return value
