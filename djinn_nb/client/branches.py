"""``djinn_nb.diff(a, b)``: two branches of one prompt compared, in one request.

A fork or a rewind makes a second branch of a generation; :func:`diff` asks the server where the
two part (the first step whose tokens differ), how far apart their states are at each (layer,
step), the KL between their next-token distributions at each step, and each one's top-k and logit
lens at the divergence. The server computes it (``core/branches.py``: states from the runs' watches
where recorded, else recomputed from each run's own KV cache) and answers numbers only, a few KB;
the texts of the tokens named come with them, so showing the result costs no further request.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..errors import BadRequestError
from ..wire.messages import DiffReply, DiffRequest
from .. import wire
from .run import Run

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .connection import Client

__all__ = ["Diff", "diff"]


class Diff:
    """What :func:`diff` found, as the server answered it (``.reply``, a ``DiffReply``), with the
    handles it was asked about (``run_a``/``run_b``; None for a run given by id)."""

    def __init__(self, client: "Client", reply: DiffReply, run_a: Run | None, run_b: Run | None):
        self.client, self.reply, self.run_a, self.run_b = client, reply, run_a, run_b

    # the reply's fields, by name
    @property
    def divergence(self) -> int | None:
        """The first step whose tokens differ (None: none does over the steps both finished)."""
        return self.reply.divergence

    @property
    def layers(self) -> list[int]:
        return list(self.reply.layers)

    @property
    def steps(self) -> list[int]:
        return list(self.reply.steps)

    @property
    def site(self) -> str:
        return self.reply.site

    @property
    def distance(self) -> list[list[float | None]]:
        """``[layer index][step index]``: the L2 distance between the two states over the step's positions."""
        return [list(row) for row in self.reply.distance]

    @property
    def kl(self) -> list[float | None]:
        """Per step: KL(a ‖ b) of the two next-token distributions (softmax of the logits)."""
        return list(self.reply.kl)

    @property
    def topk(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]] | None:
        """At the divergence, each branch's top-k ``(id, probability)``."""
        r = self.reply
        if r.topk_a is None or r.topk_b is None:
            return None
        return [(int(i), float(p)) for i, p in r.topk_a], [(int(i), float(p)) for i, p in r.topk_b]

    @property
    def lens(self) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]] | None:
        """At the divergence (a residual site), each branch's logit lens: per layer, its top-k
        ``(id, probability)`` at the step's last position."""
        r = self.reply
        if r.lens_a is None or r.lens_b is None:
            return None
        return ([[(int(i), float(p)) for i, p in row] for row in r.lens_a],
                [[(int(i), float(p)) for i, p in row] for row in r.lens_b])

    @property
    def texts(self) -> dict[int, str]:
        """The texts of the tokens the reply names (empty without a tokenizer)."""
        return dict(zip(self.reply.text_ids, self.reply.texts))

    def distance_tensor(self, relative: bool = False) -> "torch.Tensor":
        """``distance`` as a (layers, steps) float tensor, NaN where unknown; ``relative``: divided
        by the norm of run a's state there."""
        import torch

        d = torch.tensor([[float("nan") if x is None else x for x in row] for row in self.reply.distance],
                         dtype=torch.float64).reshape(len(self.reply.layers), len(self.reply.steps))
        if relative:
            n = torch.tensor([[float("nan") if x is None else x for x in row] for row in self.reply.norm],
                             dtype=torch.float64).reshape(d.shape)
            d = d / n
        return d

    def run(self, which: str) -> Run:
        """The handle on branch ``"a"`` or ``"b"`` (attached, one request, if it was given by id)."""
        if which not in ("a", "b"):
            raise BadRequestError(f"which is 'a' or 'b', not {which!r}"[:80])
        have = self.run_a if which == "a" else self.run_b
        if have is None:
            have = self.client.attach(self.reply.a if which == "a" else self.reply.b)
            if which == "a":
                self.run_a = have
            else:
                self.run_b = have
        return have

    def rewind(self, which: str, step: int, layer: int | None = None, site: str | None = None) -> Run:
        """A new run paused in ``step`` of branch ``which`` (``Run.rewind``; default layer: the
        diff's first layer, at the diff's site)."""
        if layer is None:
            layer, site = self.reply.layers[0], self.reply.site if site is None else site
        return self.run(which).rewind(step, layer, site)

    def __repr__(self) -> str:
        r = self.reply
        where = "no divergence" if r.divergence is None else f"divergence at step {r.divergence}"
        known = [x for row in r.distance for x in row if x is not None]
        top = f", largest distance {max(known):.4g}" if known else ""
        return (f"<djinn Diff {r.a} vs {r.b}: {where}; {len(r.layers)} layers x {len(r.steps)} steps at "
                f"{r.site}{top}>")


def _id(run: Any, what: str) -> tuple[str, Run | None]:
    if isinstance(run, Run):
        return run.id, run
    if type(run) is str and run:
        return run, None
    raise BadRequestError(f"{what} must be a Run or a run id, got {type(run).__name__}")


def diff(a: "Run | str", b: "Run | str", layers: Sequence[int] | None = None, site: str = "resid_post",
         k: int = 5, steps: Sequence[int] | None = None, client: "Client | None" = None) -> Diff:
    """Compare two runs of one prompt — a fork or rewind and its source, or any two runs of it.

    ``layers`` (default all) and ``site`` (default ``resid_post``) say which states are compared;
    ``steps`` is ``[start, stop)`` (default every step both runs finished); ``k`` the size of the
    top-k and the lens rows at the divergence. ``a`` and ``b`` are ``Run`` handles of one client
    or run ids (then ``client=`` or the other argument's client). One request.
    """
    a_id, run_a = _id(a, "a")
    b_id, run_b = _id(b, "b")
    clients = {id(r.client): r.client for r in (run_a, run_b) if r is not None}
    if client is not None:
        clients.setdefault(id(client), client)
    if len(clients) != 1:
        raise BadRequestError("diff compares two runs of one connection: pass Run handles of one client "
                              "(or run ids and client=)" if clients else "diff of two run ids needs client=")
    conn = next(iter(clients.values()))
    if layers is not None:
        if isinstance(layers, int):
            layers = [layers]
        layers = list(layers)
    req = DiffRequest(a=a_id, b=b_id, layers=layers, site=site, k=k, steps=None if steps is None else list(steps))
    reply = DiffReply.from_json(conn._call("diff", wire.dumps(req.to_json())))
    conn._remember((), None, dict(zip(reply.text_ids, reply.texts)))
    return Diff(conn, reply, run_a, run_b)
