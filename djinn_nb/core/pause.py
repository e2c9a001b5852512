"""One way to look at, change or stop a forward pass at a module: :class:`Trace`.

Modelled on baukit's ``nethook.Trace``/``StopForward``: a context manager that
hooks one module while the ``with`` block runs and removes its hooks in
``finally``. It can record the value at that point, replace it, and stop the
forward there, in which case the ``with`` block swallows the stop and the code
after it reads what was recorded::

    with Trace(model.transformer.h[6], stop=True, keep_inputs=True) as t:
        model(input_ids=ids)
    t.stopped, t.value, t.args, t.kwargs   # block 6's output and how it was called

The engine pauses runs with it, the load-time exactness probe splits the model
with it, and the plain-PyTorch reference and baseline make their edits with it.

A point is a module's output (``pre=False``: the hidden state a block or
sub-layer returned, the first element of a tuple) or its input (``pre=True``:
the first positional argument, or ``hidden_states`` when passed by keyword).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import UnsupportedModelError


class StopForward(Exception):
    """Raised from a hook to end the forward; the :class:`Trace` that raised it swallows it."""

    def __init__(self, trace: "Trace"):
        super().__init__("forward stopped by a Trace")
        self.trace = trace


def output_hidden(out: object) -> torch.Tensor:
    """The hidden state in what a module returned (a tensor, or a tuple/list starting with one)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedModelError(f"module returned {type(out).__name__}, not a tensor")


def input_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a module was called with: its first positional argument or ``hidden_states``."""
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise UnsupportedModelError("module was called without a hidden-state tensor")
    return h


def _replace_output(out: object, new: torch.Tensor) -> object:
    """``out`` (what :func:`output_hidden` accepted: a tensor, or a tuple/list) with ``new`` first."""
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


class Trace:
    """Hook ``module`` for the duration of a ``with`` block.

    - ``pre``: the point is the module's input instead of its output.
    - ``edit(value) -> value``: replace the value there (the forward goes on with it).
    - ``on_value(value)``: called with the (edited) value at every call, e.g. to record watches.
    - ``stop``: end the forward at the first call, after recording (``stopped`` is then true).
    - ``keep_inputs``: also record the module's arguments after the hidden state, as
      ``args``/``kwargs`` (what it takes to call the module again, or the modules after it).

    ``value`` holds the value at the last call (``None`` before any).

    Besides the ``with`` block, a trace can stand: :meth:`hook` registers it until
    :meth:`unhook`, and its hooks do nothing while ``active`` is false. The step loop
    keeps a breakpoint's traces standing across steps instead of adding and removing
    hooks at every step (a :class:`StopForward` from a standing trace is the caller's to catch).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        pre: bool = False,
        stop: bool = False,
        keep_inputs: bool = False,
        edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_value: Callable[[torch.Tensor], None] | None = None,
    ):
        self.module, self.pre, self.stop, self.keep_inputs = module, pre, stop, keep_inputs
        self.edit, self.on_value = edit, on_value
        self.value: torch.Tensor | None = None
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}
        self.stopped = False
        self.active = True
        self._handles: list[Any] = []

    def _seen(self, value: torch.Tensor) -> None:
        self.value = value
        if self.on_value is not None:
            self.on_value(value)
        if self.stop:
            self.stopped = True
            raise StopForward(self)

    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not self.active:
            return None
        if self.keep_inputs:
            self.args, self.kwargs = (args[1:], kwargs) if args else (
                args, {k: v for k, v in kwargs.items() if k != "hidden_states"}
            )
        if not self.pre:
            return None
        h = input_hidden(args, kwargs)
        if self.edit is not None:
            h = self.edit(h)
            args, kwargs = _replace_input(args, kwargs, h)
            self._seen(h)
            return args, kwargs
        self._seen(h)
        return None

    def _post_hook(self, _module: nn.Module, _args: tuple, _kwargs: dict, out: object) -> Any:
        if not self.active:
            return None
        h = output_hidden(out)
        if self.edit is not None:
            h = self.edit(h)
            self._seen(h)
            return _replace_output(out, h)
        self._seen(h)
        return None

    def hook(self) -> "Trace":
        """Register the hooks (until :meth:`unhook`)."""
        if self.pre or self.keep_inputs:
            self._handles.append(self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if not self.pre:
            self._handles.append(self.module.register_forward_hook(self._post_hook, with_kwargs=True))
        return self

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forget(self) -> None:
        """Drop what the last call recorded (a standing trace must not keep tensors alive)."""
        self.value, self.args, self.kwargs, self.stopped = None, (), {}, False

    def __enter__(self) -> "Trace":
        return self.hook()

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> bool:
        self.unhook()
        return isinstance(exc, StopForward) and exc.trace is self
