"""What a connection's call groups are given: narrow, typed interfaces.

Why: the call groups (runs, reads, texts, stepping, branches, SAEs, patching) were mixins of
``DjinnService``, each typing ``self`` as a protocol of the service and reaching into its private
members; a type checker could not check the service against them (its rpyc base class has no
type information), and any change to the service could break one unseen. Each group is now a
class given only these:

- :class:`Caller` (``context.CallContext``): who is calling, the scope a call runs in, the
  quota checks made before a call allocates and the admission of the runs it made;
- :class:`Replies` (``text_calls.TextCalls``): what replies carry (a run's brief or summary
  with its text, history records and token ids with their texts; built by ``run_views``);
- :class:`Requests` (``requests.Requests``): a request made the engine's (an ``EditRequest``
  an ``Edit``, a breakpoint's feature conditions checked);
- :class:`Tensors` (``transfers.Transfers``): tensors in and out, inline or on the side channel.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Iterable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.engine import Engine
    from ..core.navigation import TokenRecord
    from ..core.runs import Run
    from ..core.specs import Edit
    from ..wire.messages import EditRequest
    from .state import ServerState

__all__ = ["Caller", "Replies", "Requests", "Tensors"]


class Caller(Protocol):
    """The connection's caller, and the checks every call makes."""

    @property
    def state(self) -> ServerState: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def admin(self) -> bool: ...

    def who(self) -> str:
        """The caller's name (an ``AuthenticationError`` before hello, or once its token is no longer accepted)."""

    def scope(self) -> AbstractContextManager[Any]:
        """The caller's scheduling scope for a call that steps: its turn on the device, its deadline."""

    def check_quota(self, max_new_tokens: int | None = None, new_runs: int = 1, adding: int = 0) -> None:
        """Refuse, before anything changes, a call that would take the caller past a quota."""

    def check_bytes(self, owner: str, adding: int = 0) -> None:
        """Refuse what would take ``owner`` (or the server) past a byte quota with ``adding`` more."""

    def admit(self, run: Run) -> None:
        """Close and refuse a new run that took its owner past a byte quota."""

    def admit_all(self, runs: list[Run]) -> None:
        """Close all of one call's new runs, and refuse the call, if they took their owner past a byte quota."""


class Replies(Protocol):
    """What replies carry: briefs and summaries with their texts, token texts."""

    def brief(self, run: Run, since: int | None, new: bool = False) -> dict[str, Any]: ...

    def closed_brief(self, run: Run, since: int | None) -> dict[str, Any]: ...

    def summary(self, run: Run) -> dict[str, Any]: ...

    def history(self, records: list[TokenRecord]) -> list[dict[str, Any]]: ...

    def token_texts(self, ids: Iterable[int]) -> dict[int, str]: ...


class Requests(Protocol):
    """A call's request made the engine's, checked."""

    def edit(self, req: EditRequest, act: Any, add: Any) -> Edit: ...

    def check_features(self, breakpoints: Any) -> None: ...


class Tensors(Protocol):
    """Tensors in and out of a call: inline, or on the side channel."""

    def take(self, meta: Any, data: Any, what: str) -> torch.Tensor | None: ...

    def send(self, t: torch.Tensor, bulk: Any) -> Any: ...
