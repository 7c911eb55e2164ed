"""``lln calibrate``: re-derive the moment-matching constants (a, b) by Monte Carlo.

Writes ``calibrate.json``, ``calibrate.png`` (Var(log P_lln) against sigma_lln^2 with the
fitted lines, one colour per head dim) and ``summary.md`` (the (a, b) table) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Monte-Carlo fit of the moment-matching constants (a, b) per head dim"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="head dims D to calibrate (default: 16 32 64 128)")
    parser.add_argument("--n", type=int, default=512, help="tokens N (default 512)")
    parser.add_argument("--sigma2-min", type=float, default=1.3,
                        help="smallest sigma_lln^2 (default 1.3)")
    parser.add_argument("--sigma2-max", type=float, default=18.0,
                        help="largest sigma_lln^2 (default 18)")
    parser.add_argument("--points", type=int, default=12, help="grid points (default 12)")
    parser.add_argument("--spacing", choices=["sigma", "sigma2"], default="sigma",
                        help="grid evenly spaced in sigma_lln (default) or in sigma_lln^2")
    parser.add_argument("--seeds", type=int, default=8, help="draws per point (default 8)")
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

    args.out = resolve_out(args.out, "calibrate", overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    results = []
    for dim in args.dims:
        result = calibrate(
            dim, args.n, sigma2_min=args.sigma2_min, sigma2_max=args.sigma2_max,
            points=args.points, seeds=args.seeds, spacing=args.spacing,
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
