"""What djinn_nb's runs must reproduce: plain HF greedy generation, and the same edit made by a hook.

The exactness claim ("a paused and resumed run gives exactly the tokens of plain
``model.generate``; a steered one exactly those of the same edit made by a torch
forward hook") needs one reference that everything checks against: the CPU tests,
the GPU tests under ``tests/gpu/``, the GPU exactness runner and the plain-PyTorch
baseline of exp3. It lives here, in the package, so none of them keeps a copy.

An edit is named the way a breakpoint is: by decoder block ``layer`` and the
forward call it applies to (``call`` 0 = the prompt pass, k = the k-th decoding
step). The hook is a :class:`~djinn_nb.core.pause.Trace` with ``edit=``. Which
module is hooked is chosen by ``module_of(model, layer) -> (module, pre)``; the
default is the block's output, and a later ``site=`` can pass another resolver
(an attention output, a block's input) without changing the callers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from .architecture import find_anatomy, weight_of
from .pause import Trace

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What ``AutoModelForCausalLM`` loads: a model with ``generate`` (for the type checker only)."""

#: ``module_of(model, layer) -> (module, pre)``: where an edit or a capture hooks in.
ModuleOf = Callable[[nn.Module, int], "tuple[nn.Module, bool]"]
EditFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["ModuleOf", "EditFn", "block_output_site", "hf_model", "edit_at", "generate", "scale", "add"]

_loaded: dict[str, CausalLM] = {}


def block_output_site(model: nn.Module, layer: int) -> tuple[nn.Module, bool]:
    """The default site: decoder block ``layer``'s output (what a breakpoint pauses after)."""
    return find_anatomy(model).blocks[layer], False


def hf_model(path: str) -> CausalLM:
    """``AutoModelForCausalLM.from_pretrained(path)`` in float32, eval mode; loaded once per path."""
    if path not in _loaded:
        from transformers import AutoModelForCausalLM

        _loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _loaded[path]


def scale(factor: float) -> EditFn:
    """The edit ``h * factor`` (what ``Edit(scale=factor)`` does to a paused activation)."""
    return lambda h: h * factor


def add(value: float) -> EditFn:
    """The edit ``h + value`` on every hidden unit (a constant steering vector)."""
    return lambda h: h + torch.full((h.shape[-1],), value, dtype=h.dtype, device=h.device)


@contextmanager
def edit_at(
    model: nn.Module, layer: int, edit: EditFn, call: int = 0, module_of: ModuleOf | None = None
) -> Iterator[Trace]:
    """While the ``with`` block runs, ``edit`` changes the value at ``module_of(model, layer)`` on
    that module's ``call``-th forward call only (0 = the prompt pass); other calls pass unchanged."""
    module, pre = (module_of or block_output_site)(model, layer)
    calls = [0]

    def on_call(h: torch.Tensor) -> torch.Tensor:
        n = calls[0]
        calls[0] += 1
        return edit(h) if n == call else h

    with Trace(module, pre=pre, edit=on_call) as trace:
        yield trace


def generate(
    model: CausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    edit_layer: int | None = None,
    edit_call: int = 0,
    edit: EditFn | None = None,
    module_of: ModuleOf | None = None,
) -> list[int]:
    """Greedy ``model.generate`` from ``prompt_ids``; the new token ids.

    With ``edit_layer``, ``edit`` changes block ``edit_layer``'s output (or the site
    ``module_of`` names) on its ``edit_call``-th forward call, as :func:`edit_at` does.
    """
    ids = torch.tensor([list(prompt_ids)], device=weight_of(model.get_input_embeddings()).device)

    def run() -> list[int]:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    if edit_layer is None:
        return run()
    if edit is None:
        raise ValueError("edit_layer needs an edit function")
    with edit_at(model, edit_layer, edit, edit_call, module_of):
        return run()
