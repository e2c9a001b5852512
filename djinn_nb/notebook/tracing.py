"""Causal tracing (ROME's figure 1) on server checkpoints: which (layer, position) restores the answer.

The grid is built the way djinn_nb makes it cheap: each prompt passes once,
pausing at each traced layer in turn (a fork from layer L's checkpoint runs
only to layer L+1), and each layer's row is one ``fork_many`` of the corrupted
run's checkpoint with the clean activation patched in at one position per fork,
run to the next token as a batch on the server. No cell reruns a whole forward,
no activation crosses the wire, and every run it starts is closed before it
returns, whatever happens.

It uses only the client API (``generate``, ``fork``, ``fork_many``,
``token_probs``), so it works against any server.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

from ..errors import BadRequestError, DjinnError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

    from ..client import Client, Run

__all__ = ["causal_trace", "plot_causal_trace"]

RESIDUAL_AND_OUTPUT_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


def _ids(client: "Client", prompt: str | Sequence[int], what: str) -> list[int]:
    if isinstance(prompt, str):
        return client.tokenize(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and all(type(t) is int for t in prompt):
        return list(prompt)
    raise BadRequestError(f"{what} must be text or a non-empty list of token ids")


def _chain(client: "Client", ids: list[int], layers: list[int], site: str, opened: list["Run"]) -> list["Run"]:
    """Runs paused at ``site`` of each layer of the prompt pass: one pass, each fork going one layer on."""
    first = client.generate(ids, max_new_tokens=1, breakpoints=[(layers[0], 0, site)])
    opened.append(first)
    chain = [first]
    for layer in layers[1:]:
        nxt = chain[-1].fork(breakpoints=[(layer, 0, site)])
        opened.append(nxt)
        chain.append(nxt)
    return chain


def _labels(client: "Client", ids: list[int], positions: list[int]) -> list[Any]:
    if not client.info.get("has_tokenizer"):
        return positions
    texts = client.decode_each([ids[p] for p in positions])  # one call for all the labels
    return [f"{p}: {t}" for p, t in zip(positions, texts)]


def causal_trace(
    client: "Client",
    clean: str | Sequence[int],
    corrupted: str | Sequence[int],
    answer: int | str | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    site: str = "resid_post",
    progress: bool = True,
) -> "pd.DataFrame":
    """The probability of ``answer`` when the clean activation at (layer, position) is restored
    into the corrupted run's prompt pass: a DataFrame with layers as index and positions as
    columns (labelled ``"3:  Tower"`` when the server has a tokenizer).

    ``clean_prob`` is the clean run's own probability of ``answer`` (its prompt pass, nothing
    patched), at every site: restoring every position of one site is the clean run only at the
    residual sites, not at ``attn_out``/``mlp_out``. ``corrupt_prob`` (nothing restored) is
    computed in the same batch as the first layer's cells, so a cell whose restored input
    equals the corrupted one shows exactly the same number.

    ``answer``: a token id or a text of one token; default the clean run's greedy next token.
    ``.attrs``: ``clean_prob``, ``corrupt_prob``, ``answer`` (id), ``answer_text`` (with a
    tokenizer, else None), ``site``, ``positions``, ``tokens``.
    Both prompts must have the same number of tokens.
    """
    import pandas as pd

    if site not in RESIDUAL_AND_OUTPUT_SITES:
        raise BadRequestError(f"causal_trace patches one of {list(RESIDUAL_AND_OUTPUT_SITES)}, not {site!r}")
    clean_ids, corrupt_ids = _ids(client, clean, "clean"), _ids(client, corrupted, "corrupted")
    if len(clean_ids) != len(corrupt_ids):
        raise BadRequestError(
            f"the clean and corrupted prompts must have the same number of tokens: {len(clean_ids)} vs {len(corrupt_ids)}"
        )
    n_layers = int(client.info["num_layers"])
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    positions = list(range(len(clean_ids))) if positions is None else list(positions)
    if not layers or any(type(l) is not int or not 0 <= l < n_layers for l in layers):
        raise BadRequestError(f"layers must be integers in 0..{n_layers - 1}, got {layers!r}"[:200])
    if not positions or any(type(p) is not int or not 0 <= p < len(clean_ids) for p in positions):
        raise BadRequestError(f"positions must be integers in 0..{len(clean_ids) - 1}, got {positions!r}"[:200])
    if len(set(positions)) != len(positions):
        raise BadRequestError("positions must be distinct")
    if isinstance(answer, str):
        answer_ids = client.tokenize(answer)
        if len(answer_ids) != 1:
            raise BadRequestError(f"answer {answer!r} is {len(answer_ids)} tokens; pass one token (or its id)")
        answer = answer_ids[0]
    opened: list[Run] = []
    try:
        clean_chain = _chain(client, clean_ids, layers, site, opened)
        corrupt_chain = _chain(client, corrupt_ids, layers, site, opened)
        clean_end = clean_chain[-1].fork(breakpoints=[])  # the clean run itself, to its next token
        opened.append(clean_end)
        if answer is None:
            answer = clean_end.token_ids[-1]
        clean_prob = client.token_probs([clean_end], answer)[0]
        rows: list[list[float]] = []
        bar = _progress(progress, len(layers))
        for src, dst in zip(clean_chain, corrupt_chain):
            cells = [{"patch_from": src, "positions": [p], "breakpoints": [], "max_new_tokens": 1} for p in positions]
            if not rows:  # the corrupted reference rides in the first batch, so equal inputs give equal bits
                cells.append({"breakpoints": [], "max_new_tokens": 1})
            forks = dst.fork_many(cells)
            try:
                probs = client.token_probs(forks, answer)
            finally:
                _close(forks)
            if not rows:
                *probs, corrupt_prob = probs
            rows.append(probs)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        _close(opened)
    frame = pd.DataFrame(rows, index=pd.Index(layers, name="layer"),
                         columns=pd.Index(_labels(client, clean_ids, positions), name="position"))
    answer_text = client.decode([int(answer)]) if client.info.get("has_tokenizer") else None
    frame.attrs.update(clean_prob=clean_prob, corrupt_prob=corrupt_prob, answer=int(answer), answer_text=answer_text,
                       site=site, positions=positions, tokens=[clean_ids[p] for p in positions])
    return frame


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="causal trace (layers)", leave=False)


def _close(runs: Sequence["Run"]) -> None:
    for run in runs:
        try:
            run.close()
        except DjinnError:
            pass


def answer_label(attrs: dict[str, Any]) -> str:
    """``' Paris' #7042`` (or ``#7042`` without a tokenizer): the answer token by text and id."""
    answer, text = attrs.get("answer"), attrs.get("answer_text")
    if answer is None:
        return "answer"
    return f"{text!r} #{answer}" if text is not None else f"#{answer}"


def plot_causal_trace(frame: "pd.DataFrame", title: str | None = None) -> "Figure":
    """The grid as a heatmap (positions × layers, token labels), with the clean and corrupted
    runs' probabilities marked on the colour bar and named in a legend below.

    A ``matplotlib.figure.Figure`` that is not pyplot's: as a cell's last line it is shown once
    (a pyplot figure was drawn twice: as the value, and again when the cell ended).
    """
    from matplotlib.lines import Line2D

    from .plots import figure_class

    data = frame.to_numpy().T
    fig = figure_class()(figsize=(max(5.0, 1.6 + 0.45 * data.shape[1]), 1.6 + 0.32 * data.shape[0]))
    ax = fig.subplots()
    lo = min(float(data.min()), frame.attrs.get("corrupt_prob", data.min()))
    hi = max(float(data.max()), frame.attrs.get("clean_prob", data.max()))
    image = ax.imshow(data, aspect="auto", cmap="Purples", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks(range(data.shape[1]), [str(i) for i in frame.index])
    ax.set_yticks(range(data.shape[0]), [str(c) for c in frame.columns])
    ax.set_xlabel(f"layer (restored at {frame.attrs.get('site', 'resid_post')})")
    ax.set_ylabel("restored position")
    label = answer_label(frame.attrs)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({label})")
    handles = []
    lines: tuple[tuple[str, Literal["-", "--"], str], ...] = (("clean_prob", "-", "clean run"),
                                                              ("corrupt_prob", "--", "corrupted run"))
    for key, style, name in lines:
        if key in frame.attrs:
            value = frame.attrs[key]
            bar.ax.axhline(value, color="black", linestyle=style, linewidth=1.5)
            handles.append(Line2D([], [], color="black", linestyle=style, label=f"{name}: {value:.4f}"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title or f"p({label}) with the clean state restored", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    return fig
