"""``lln sweep``: entropy, spectral gap and Var(log P) against sigma_q^2 sigma_k^2.

Writes ``sweep.json``, ``curves.png`` (the three instruments against the product, one line
per method, +-1 std over seeds), ``histograms.png`` (log P of one matrix per method at
``--hist-product`` with the fitted normal) and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

HELP = "temperature sweep of entropy, spectral gap and Var(log P) on Gaussian q, k"

_LABELS = {
    "var_log_p": "Var(log P)",
    "norm_entropy": "entropy / log N",
    "gap": r"spectral gap $1-|\lambda_2|$",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .sweep import DEFAULT_METHODS

    parser.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    parser.add_argument("--n", type=int, default=256, help="tokens N (default 256)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"methods (default: {' '.join(DEFAULT_METHODS)}); see "
                        "lln.analysis.analysis_methods()")
    parser.add_argument("--products", type=float, nargs="+", default=None,
                        help="sigma_q^2 sigma_k^2 values (default 2^(k/2), k=-8..8)")
    parser.add_argument("--seeds", type=int, default=4, help="draws per product (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--causal", action="store_true",
                        help="causal matrices (prefix statistics; entropy normalised by each "
                        "row's visible count)")
    parser.add_argument("--hist-product", type=float, default=1.0,
                        help="product of the log P histograms (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    from ..cli_util import add_out_arguments

    add_out_arguments(parser, "sweep")


def summary_markdown(result: dict, command: str) -> str:
    """Tables of the sweep and the acceptance checks."""
    cfg, products, methods = result["config"], result["products"], result["methods"]
    names = list(methods)
    acc = result["acceptance"]
    lines = [
        f"# Temperature sweep, D = {cfg['dim']}, N = {cfg['n']}"
        + (", causal" if cfg.get("is_causal") else ""),
        "",
        f"Command: `{command}`",
        "",
        f"q, k: {cfg['q_k']}; {cfg['seeds']} seeds per product, float64, exact attention "
        "matrices. Means over seeds; entropy normalised by log N; gap = 1 - |lambda_2|.",
        "",
        f"- softmax entropy monotone in temperature: {acc['softmax_entropy_monotone']}; "
        f"gap monotone: {acc['softmax_gap_monotone']}",
    ]
    lo, hi = acc["match_range"]
    for name, check in acc["vs_softmax"].items():
        worst = check["max_abs_diff_in_range"]
        lines.append(
            f"- {name} vs softmax over products in [{lo:g}, {hi:g}]: max |diff| entropy "
            f"{worst['norm_entropy']:.3f}, gap {worst['gap']:.3f}, Var(log P) "
            f"{worst['var_log_p']:.2f}; within {acc['tolerance']}: "
            f"{check['within_tolerance_in_range']}; departs (> {acc['tolerance']}) at "
            f"products {', '.join(f'{t:.3g}' for t in check['departs_at_products']) or 'none'}"
            f"; entropy within {acc['entropy_tolerance']} (entropy-matching acceptance): "
            f"{check['entropy_within_entropy_tolerance_in_range']}"
        )
    lines += ["", "### spectral gap minus softmax's, paired over seeds (mean +- std)", "",
              "| sigma_q^2 sigma_k^2 | " + " | ".join(n for n in names if n != "softmax") + " |",
              "|---" * len(names) + "|"]
    for i, t in enumerate(products):
        cells = []
        for check in acc["vs_softmax"].values():
            d = check.get("gap_paired_diff")
            cells.append("-" if d is None else f"{d['mean'][i]:+.3f} +- {d['std'][i]:.3f}")
        lines.append(f"| {t:.3g} | " + " | ".join(cells) + " |")
    for key in ("norm_entropy", "gap", "var_log_p", "skewness"):
        lines += ["", f"### {_LABELS.get(key, key)}", "",
                  "| sigma_q^2 sigma_k^2 | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for i, t in enumerate(products):
            cells = []
            for name in names:
                value = methods[name][key]["mean"][i]
                cells.append("nan" if value is None or not math.isfinite(value)
                             else f"{value:.3f}")
            lines.append(f"| {t:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, path: Path) -> None:
    import numpy as np

    from .io import require_matplotlib

    plt = require_matplotlib()
    products = np.asarray(result["products"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key in zip(axes, ("var_log_p", "norm_entropy", "gap"), strict=True):
        for name, metrics in result["methods"].items():
            mean = np.asarray(metrics[key]["mean"])
            std = np.asarray(metrics[key]["std"])
            ax.plot(products, mean, marker="o", ms=3, label=name)
            ax.fill_between(products, mean - std, mean + std, alpha=0.2)
        if key == "var_log_p":
            ax.plot(products, products, "k:", lw=1, label=r"$\sigma_q^2\sigma_k^2$")
            ax.set_yscale("log")
        lo, hi = result["acceptance"]["match_range"]
        ax.axvspan(lo, hi, color="grey", alpha=0.08)
        ax.set_xscale("log")
        ax.set_xlabel(r"$\sigma_q^2\sigma_k^2$ (colder $\rightarrow$)")
        ax.set_title(_LABELS[key])
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"Concentration vs temperature, D={cfg['dim']}, N={cfg['n']}"
                 + (", causal" if cfg.get("is_causal") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(result: dict, path: Path) -> None:
    import numpy as np

    from .io import require_matplotlib

    plt = require_matplotlib()
    hists = result["histograms"]
    fig, axes = plt.subplots(1, len(hists), figsize=(3.2 * len(hists), 3), squeeze=False)
    for ax, (name, h) in zip(axes[0], hists.items(), strict=True):
        edges = np.asarray(h["edges"])
        ax.stairs(h["density"], edges, fill=True, alpha=0.5)
        x = np.linspace(edges[0], edges[-1], 200)
        sd = max(h["std"], 1e-12)
        ax.plot(x, np.exp(-0.5 * ((x - h["mean"]) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)), "r")
        ax.set_title(f"{name}\nmean {h['mean']:.2f}, sd {h['std']:.2f}", fontsize=9)
        ax.set_xlabel("log P")
    fig.suptitle(f"log P at sigma_q^2 sigma_k^2 = {result['config']['hist_product']:.3g} "
                 "(red: fitted normal)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    import shlex
    import sys

    import torch

    from ..cli_util import resolve_out
    from .io import write_json
    from .sweep import DEFAULT_PRODUCTS, temperature_sweep

    args.out = resolve_out(args.out, "sweep", overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    result = temperature_sweep(
        dim=args.dim, n=args.n, products=args.products or DEFAULT_PRODUCTS,
        methods=args.methods, seeds=args.seeds, seed=args.seed,
        hist_product=args.hist_product, is_causal=args.causal, progress=True,
    )
    command = "lln " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sweep.json", result)
    summary = summary_markdown(result, command)
    (args.out / "summary.md").write_text(summary)
    try:
        plot_curves(result, args.out / "curves.png")
        plot_histograms(result, args.out / "histograms.png")
    except ImportError as err:
        print(f"no plots: {err}")
    print("\n".join(line for line in summary.splitlines() if line.startswith("- ")))
    print(f"wrote {args.out}/sweep.json, summary.md, curves.png, histograms.png")
