"""How well attribution patching ranks the exact causal-trace grid (issue 23, item 3), in one run.

    python -m experiments.bench.attribution --out experiments/results/cpu-2core

For each prompt pair (the Eiffel Tower example of notebook 05 and three more, each pair the
same number of tokens, the answer the clean run's greedy next token) and each site
(``resid_post``, ``mlp_out``, ``attn_out``: layers × positions; ``z``: layers × heads, each head
restored at every position), the exact grid (``djinn_nb.causal_trace``: p(answer) with one cell
restored) and the AtP estimate (``djinn_nb.attribution_patching``, metrics ``prob`` and
``logit_diff``) on the embedded SmolLM2-135M. Recorded: Spearman's rank correlation over every
cell, and the recall of the exact grid's 10 highest cells within the estimate's k highest, for
several k; the wall time of each, with a one-token generate of the prompt for scale; and the
time of ``causal_trace(..., cells=top_k_of(estimate, k))`` for the largest k.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import djinn_nb

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json

PAIRS = [
    ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"),
    ("The capital of France is the city of", "The capital of Italy is the city of"),
    ("When John and Mary went to the store, Mary gave a drink to",
     "When John and Mary went to the store, John gave a drink to"),
    ("The Great Wall is located in the country of", "The Taj Mahal is located in the country of"),
]
SITES = ("resid_post", "mlp_out", "attn_out", "z")
METRICS = ("prob", "logit_diff")


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1000


def measure_pair(client: Any, clean: Any, corrupted: Any, sites: list[str], ks: list[int], top: int) -> dict[str, Any]:
    """Every site's exact grid and estimates for one prompt pair, with their agreement."""
    _, forward_ms = _timed(lambda: client.generate(clean, max_new_tokens=1).close())
    trace, estimate = djinn_nb.causal_trace, djinn_nb.attribution_patching
    out: dict[str, Any] = {"clean": clean, "corrupted": corrupted, "one_token_generate_ms": forward_ms, "sites": {}}
    for site in sites:
        exact, exact_ms = _timed(trace, client, clean, corrupted, site=site, progress=False)
        row: dict[str, Any] = {"shape": list(exact.shape), "exact_ms": exact_ms, "answer": exact.attrs["answer"],
                               "answer_text": exact.attrs["answer_text"], "clean_prob": exact.attrs["clean_prob"],
                               "corrupt_prob": exact.attrs["corrupt_prob"],
                               "exact_top": [list(c) for c in djinn_nb.top_k_of(exact, top)], "metrics": {}}
        tenth = sorted(exact.to_numpy().ravel(), reverse=True)[top - 1]
        row["exact_cells_within_1pct_of_the_10th"] = int((exact.to_numpy() >= 0.99 * tenth).sum())  # ties: >10 makes the top 10 ambiguous
        for metric in METRICS:
            est, est_ms = _timed(estimate, client, clean, corrupted, site=site, metric=metric)
            agree = {f"recall_top{top}_in_top{k}": djinn_nb.rank_agreement(est, exact, k=k, top=top)["recall"] for k in ks}
            row["metrics"][metric] = {"ms": est_ms, "foil": est.attrs["foil"],
                                      "spearman": djinn_nb.rank_agreement(est, exact, k=top, top=top)["spearman"], **agree}
        k = max(ks)
        cells = djinn_nb.top_k_of(djinn_nb.attribution_patching(client, clean, corrupted, site=site, metric="prob"), k)
        chosen, chosen_ms = _timed(trace, client, clean, corrupted, site=site, cells=cells, progress=False)
        diff = (chosen - exact).abs().max().max()
        row["cells_top_k"] = {"k": k, "ms": chosen_ms, "computed": int(chosen.notna().sum().sum()),
                              "max_abs_diff_vs_full_grid": float(diff),
                              "best_exact_found": float(chosen.max().max()), "best_exact": float(exact.max().max())}
        out["sites"][site] = row
        m = row["metrics"]
        print(f"  {site:10s} {exact.shape}: exact {exact_ms:6.0f} ms; AtP prob {m['prob']['ms']:4.0f} ms rho "
              f"{m['prob']['spearman']:.2f} recall@{k} {m['prob'][f'recall_top{top}_in_top{k}']:.1f}; logit_diff rho "
              f"{m['logit_diff']['spearman']:.2f}; cells={k}: {chosen_ms:5.0f} ms", flush=True)
    return out


def summary(pairs: list[dict[str, Any]], ks: list[int], top: int) -> dict[str, Any]:
    """Per site and metric, the mean over pairs of each agreement figure."""
    import statistics

    result: dict[str, Any] = {}
    for site in pairs[0]["sites"]:
        for metric in METRICS:
            rows = [p["sites"][site]["metrics"][metric] for p in pairs]
            keys = ["spearman"] + [f"recall_top{top}_in_top{k}" for k in ks]
            result[f"{site}/{metric}"] = {key: statistics.fmean(r[key] for r in rows) for key in keys}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, model=None, device="cpu", model_help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sites", default=",".join(SITES))
    p.add_argument("--ks", default="10,20,50", help="the estimate's top k cells in which the exact top cells are sought")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--pairs", type=int, default=len(PAIRS))
    p.add_argument("--out", default="experiments/out/attribution")
    args = p.parse_args(argv)
    env = environment(args.device, model_dtype(args.dtype, args.device, args.model))  # the commit measured, at the start
    client = djinn_nb.connect(model=args.model, device=args.device, dtype=args.dtype)
    ks = [int(k) for k in args.ks.split(",")]
    sites = args.sites.split(",")
    pairs = PAIRS[:args.pairs]
    if not client.info["has_tokenizer"]:  # a random model: token ids, one position differing
        pairs = [([5, 17, 42, 99, 3, 250, 11, 7], [5, 17, 42, 31, 3, 250, 11, 7])]
    measured = []
    for clean, corrupted in pairs:
        print(f"{clean!r} / {corrupted!r}", flush=True)
        measured.append(measure_pair(client, clean, corrupted, sites, ks, args.top))
    info = client.info
    out = {"benchmark": "attribution patching (AtP) against the exact causal-trace grid: rank agreement",
           "model": info["model"], "num_layers": info["num_layers"], "num_heads": info["num_heads"],
           "sites": sites, "metrics": list(METRICS), "top": args.top, "ks": ks,
           "environment": env,
           "mean_over_pairs": summary(measured, ks, args.top), "pairs": measured}
    client.close()
    name = f"attribution_{(args.model or 'embedded').replace(':', '_').replace('/', '_')}_{out['environment']['dtype']}.json"
    path = write_json(Path(args.out) / name, out)
    print("wrote", path)
    for key, row in out["mean_over_pairs"].items():
        print(f"{key:22s} " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
