"""How the magics report mistakes: IPython's ``UsageError``, one line, no traceback.

Argument mistakes (:class:`~djinn_nb.notebook.magic_args.ArgError`) and every error the
server reports (:class:`~djinn_nb.DjinnError`) become one line that names the fix.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from IPython.core.error import UsageError

from . import magic_args as A
from ..errors import DjinnError, UnknownRunError

__all__ = ["one_line", "usage_errors"]


def one_line(message: Any) -> str:
    return " ".join(str(message).split())


def usage_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn argument mistakes and server errors into a one-line ``UsageError``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except A.ArgError as e:
            raise UsageError(one_line(e)) from None
        except UnknownRunError as e:
            raise UsageError(f"{one_line(e)}; list the runs with %djinn_runs") from None
        except DjinnError as e:
            raise UsageError(one_line(e)) from None

    return wrapper
