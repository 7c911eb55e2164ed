"""``lln calibrate``: re-derive the LLN calibration by Monte Carlo.

``--target moments`` (default): the moment-matching constants (a, b). Writes
``calibrate.json``, ``calibrate.png`` (Var(log P_lln) against sigma_lln^2 with the fitted
lines, one colour per head dim) and ``summary.md`` (the (a, b) table) to ``--out``.

``--target entropy``: the sigma_tilde that equates LLN's mean normalised row entropy with
softmax's, by bisection on a (D, N, sigma_q^2 sigma_k^2) grid, and the closed forms of
:mod:`lln.ops.entropy_matching` fitted to it. Writes ``entropy.json``, ``entropy.png`` and
``entropy.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Monte-Carlo calibration of LLN: moment-matching (a, b) or entropy-matched sigma_tilde"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=["moments", "entropy"], default="moments",
                        help="what LLN is matched on: Var(log P) (moments, default: the (a, b) "
                        "fit) or the mean normalised row entropy (entropy)")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="head dims D to calibrate (default: 16 32 64 128)")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="tokens N (moments: one value, default 512; entropy: one or "
                        "more, default 256 1024)")
    parser.add_argument("--products", type=float, nargs="+", default=None,
                        help="entropy only: sigma_q^2 sigma_k^2 values (default 2^(k/2), "
                        "k=-8..8)")
    parser.add_argument("--causal", action="store_true",
                        help="entropy only: causal matrices (rows normalised by their visible "
                        "count)")
    parser.add_argument("--tol", type=float, default=5e-4,
                        help="entropy only: bisection tolerance on sigma_tilde (default 5e-4)")
    parser.add_argument("--sigma2-min", type=float, default=1.3,
                        help="smallest sigma_lln^2 (default 1.3)")
    parser.add_argument("--sigma2-max", type=float, default=18.0,
                        help="largest sigma_lln^2 (default 18)")
    parser.add_argument("--points", type=int, default=12, help="grid points (default 12)")
    parser.add_argument("--spacing", choices=["sigma", "sigma2"], default="sigma",
                        help="grid evenly spaced in sigma_lln (default) or in sigma_lln^2")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="draws per point (default 8; entropy: one value or one per N, "
                        "default 4)")
    parser.add_argument("--bootstrap", type=int, default=2000,
                        help="bootstrap resamples over seeds (default 2000; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    from ..cli_util import add_out_arguments

    add_out_arguments(parser, "calibrate")


def summary_markdown(results: list[dict], command: str) -> str:
    """The (a, b) table as markdown, with the paper check for D = 64."""
    from .calibrate import PAPER_A, PAPER_B, paper_check

    cfg = results[0]["config"]
    lines = [
        "# Moment-matching constants by Monte Carlo",
        "",
        f"Command: `{command}`",
        "",
        f"Var(log P_lln) over all N^2 entries, N = {cfg['n']}, symmetric split "
        f"alpha = beta, {cfg['points']} values of sigma_lln^2 in "
        f"[{cfg['sigma2_min']:g}, {cfg['sigma2_max']:g}] evenly spaced in "
        f"{'sigma_lln' if cfg['spacing'] == 'sigma' else 'sigma_lln^2'}, "
        f"{cfg['seeds']} seeds per point; OLS on every measurement.",
        "",
        "| D | a | 95% CI a (bootstrap) | b | 95% CI b (bootstrap) | R^2 | max residual |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, boot = r["fit"], r.get("bootstrap", {})
        ci_a = boot.get("ci_a", f["ci_a"])
        ci_b = boot.get("ci_b", f["ci_b"])
        lines.append(
            f"| {r['config']['dim']} | {f['a']:.4f} | [{ci_a[0]:.4f}, {ci_a[1]:.4f}] | "
            f"{f['b']:.4f} | [{ci_b[0]:.4f}, {ci_b[1]:.4f}] | {f['r2']:.4f} | "
            f"{f['max_abs_residual']:.3f} |"
        )
    for r in results:
        if r["config"]["dim"] == 64:
            c = paper_check(r)
            lines += [
                "",
                f"D = 64 against the paper (a = {PAPER_A:.4f}, b = {PAPER_B:.4f}): a off by "
                f"{100 * c['rel_err_a']:.1f}% ({'within' if c['a_within_5pct'] else 'OUTSIDE'}"
                f" 5%), b off by {c['abs_err_b']:.3f} "
                f"({'within' if c['b_within_0.04'] else 'OUTSIDE'} 0.04).",
            ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import numpy as np

    from .io import require_matplotlib

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in results:
        x = np.asarray(r["sigma2"])
        y = np.asarray(r["var_log_p"])
        f = r["fit"]
        line = ax.errorbar(x, y.mean(1), yerr=y.std(1), fmt="o", ms=3,
                           label=f"D={r['config']['dim']}: a={f['a']:.3f}, b={f['b']:.3f}")
        ax.plot(x, f["a"] * x + f["b"], color=line[0].get_color(), lw=1)
    ax.set_xlabel(r"$\sigma_{lln}^2 = \alpha^2\sigma_q^2 + \beta^2\sigma_k^2$")
    ax.set_ylabel(r"Var(log $P_{lln}$)")
    ax.set_title(f"LLN log-variance, N={results[0]['config']['n']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    import shlex
    import sys

    import torch

    from ..cli_util import resolve_out
    from .calibrate import calibrate, paper_check
    from .io import write_json

    if args.target == "entropy":
        run_entropy(args)
        return
    for name in ("products", "causal"):
        if getattr(args, name):
            raise ValueError(f"--{name} applies to --target entropy only")
    if args.n is not None and len(args.n) != 1:
        raise ValueError(f"--target moments takes one --n, got {args.n}")
    if args.seeds is not None and len(args.seeds) != 1:
        raise ValueError(f"--target moments takes one --seeds, got {args.seeds}")
    n = 512 if args.n is None else args.n[0]
    seeds = 8 if args.seeds is None else args.seeds[0]
    args.out = resolve_out(args.out, "calibrate", overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    results = []
    for dim in args.dims:
        result = calibrate(
            dim, n, sigma2_min=args.sigma2_min, sigma2_max=args.sigma2_max,
            points=args.points, seeds=seeds, spacing=args.spacing,
            bootstrap=args.bootstrap, seed=args.seed, progress=True,
        )
        if dim == 64:
            result["paper_check"] = paper_check(result)
        results.append(result)
        f = result["fit"]
        print(f"D={dim:4d}  a={f['a']:.4f} +- {f['se_a']:.4f}  b={f['b']:.4f} +- "
              f"{f['se_b']:.4f}  R^2={f['r2']:.4f}")
    command = "lln " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "calibrate.json", {"command": command, "results": results})
    (args.out / "summary.md").write_text(summary_markdown(results, command))
    try:
        plot(results, args.out / "calibrate.png")
    except ImportError as err:
        print(f"no plot: {err}")
    print(f"wrote {args.out}/calibrate.json, summary.md, calibrate.png")


def entropy_markdown(result: dict, command: str) -> str:
    """The matched sigma_tilde table, the fits and their entropy errors as markdown."""
    from ..ops.entropy_matching import ENTROPY_FORMS

    cfg, points, fits = result["config"], result["points"], result["fits"]
    mask = "causal (rows normalised by their visible count)" if cfg["is_causal"] else "non-causal"
    lines = [
        f"# Entropy-matched sigma_tilde by bisection ({mask})",
        "",
        f"Command: `{command}`",
        "",
        f"q, k: {cfg['q_k']}. Seeds per N: "
        + ", ".join(f"N = {n}: {s}" for n, s in zip(cfg["ns"], cfg["seeds"], strict=True))
        + f" (base seed {cfg['seed']}); float64; bisection to {cfg['tol']:g} in sigma_tilde "
        "on the mean over seeds of the mean normalised row entropy.",
        "",
        "## Fits (OLS on every grid point; `s` = sigma_q sigma_k, `L` = log2 D, "
        "`M` = log2 N)",
        "",
        "| form | features | coefficients | R^2 | rms / max residual (sigma_tilde) | "
        "max abs entropy error, all / products in [0.25, 4] |",
        "|---|---|---|---|---|---|",
    ]
    in_range = [0.25 - 1e-9 <= p["product"] <= 4 + 1e-9 for p in points]
    for name, fit in fits.items():
        errs = [abs(p["forms"][f"fit:{name}"]["error"]) for p in points]
        errs_in = [e for e, ok in zip(errs, in_range, strict=True) if ok]
        lines.append(
            f"| {name} | {', '.join(ENTROPY_FORMS[name])} | "
            f"{', '.join(f'{c:.4f}' for c in fit['coefficients'])} | {fit['r2']:.4f} | "
            f"{fit['rms_residual']:.3f} / {fit['max_abs_residual']:.3f} | "
            f"{max(errs):.4f} / {max(errs_in) if errs_in else float('nan'):.4f} |"
        )
    lines += ["", "## Max |LLN - softmax| normalised entropy over products in [0.25, 4], "
              "per D and N", "",
              "| D | N | moments (paper a, b) | " + " | ".join(fits) + " |",
              "|---" * (len(fits) + 3) + "|"]
    for dim in cfg["dims"]:
        for n in cfg["ns"]:
            sel = [p for p, ok in zip(points, in_range, strict=True)
                   if ok and p["dim"] == dim and p["n"] == n]
            if not sel:
                continue
            cells = [max(abs(p["moments_entropy"] - p["softmax_entropy"]) for p in sel)]
            cells += [max(abs(p["forms"][f"fit:{f}"]["error"]) for p in sel) for f in fits]
            lines.append(f"| {dim} | {n} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    lines += ["", "## Matched sigma_tilde (softmax entropy target in brackets)", "",
              "| sigma_q^2 sigma_k^2 | "
              + " | ".join(f"D={d}, N={n}" for d in cfg["dims"] for n in cfg["ns"]) + " |",
              "|---" * (len(cfg["dims"]) * len(cfg["ns"]) + 1) + "|"]
    for t in cfg["products"]:
        cells = []
        for d in cfg["dims"]:
            for n in cfg["ns"]:
                p = next(p for p in points if p["dim"] == d and p["n"] == n and p["product"] == t)
                cells.append(f"{p['sigma_tilde']:.3f} ({p['softmax_entropy']:.3f})")
        lines.append(f"| {t:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_entropy(result: dict, path: Path) -> None:
    import numpy as np

    from .io import require_matplotlib

    plt = require_matplotlib()
    cfg, points = result["config"], result["points"]
    best = min(result["fits"], key=lambda f: result["fits"][f]["rms_residual"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for d in cfg["dims"]:
        for n in cfg["ns"]:
            sel = [p for p in points if p["dim"] == d and p["n"] == n]
            s = np.asarray([p["sigma_qk"] for p in sel])
            line = axes[0].plot(s, [p["sigma_tilde"] for p in sel], "o", ms=3,
                                label=f"D={d}, N={n}")[0]
            axes[0].plot(s, [p["forms"][f"fit:{best}"]["sigma_tilde"] for p in sel], "-",
                         color=line.get_color(), lw=1)
            axes[1].plot(s, [p["forms"][f"fit:{best}"]["error"] for p in sel], "-o", ms=3,
                         color=line.get_color(), label=f"D={d}, N={n}")
            axes[1].plot(s, [p["moments_entropy"] - p["softmax_entropy"] for p in sel], ":",
                         color=line.get_color())
    axes[0].set_xlabel(r"$\sigma_q\sigma_k$")
    axes[0].set_ylabel(r"matched $\tilde\sigma$ (lines: fit " + best + ")")
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_xlabel(r"$\sigma_q\sigma_k$")
    axes[1].set_ylabel("LLN - softmax normalised entropy")
    axes[1].set_title(f"solid: entropy matching ({best}); dotted: moment matching", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Entropy-matched calibration, " + ("causal" if cfg["is_causal"] else "non-causal"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_entropy(args: argparse.Namespace) -> None:
    """``lln calibrate --target entropy``: validate, measure, fit, write."""
    import shlex
    import sys

    import torch

    from ..cli_util import resolve_out
    from .calibrate import ENTROPY_NS, ENTROPY_PRODUCTS, calibrate_entropy
    from .io import write_json

    ns = list(ENTROPY_NS) if args.n is None else args.n
    seeds = [4] if args.seeds is None else args.seeds
    if len(seeds) not in (1, len(ns)):
        raise ValueError(f"--seeds takes one value or one per --n ({len(ns)}), got {seeds}")
    if any(n < 2 for n in ns):
        raise ValueError(f"--n must be >= 2 (entropy needs two keys), got {ns}")
    if any(d < 1 for d in args.dims) or any(s < 1 for s in seeds):
        raise ValueError("--dims and --seeds must be positive")
    if not args.tol > 0:
        raise ValueError(f"--tol must be > 0, got {args.tol}")
    products = args.products or list(ENTROPY_PRODUCTS)
    if any(not t > 0 for t in products):
        raise ValueError(f"--products must be positive, got {products}")
    args.out = resolve_out(args.out, "calibrate", overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    result = calibrate_entropy(
        args.dims, ns, products, seeds=seeds[0] if len(seeds) == 1 else seeds,
        seed=args.seed, is_causal=args.causal, tol=args.tol, progress=True,
    )
    command = "lln " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "entropy.json", result)
    summary = entropy_markdown(result, command)
    (args.out / "entropy.md").write_text(summary)
    try:
        plot_entropy(result, args.out / "entropy.png")
    except ImportError as err:
        print(f"no plot: {err}")
    print(summary.split("## Matched")[0])
    print(f"wrote {args.out}/entropy.json, entropy.md, entropy.png")
