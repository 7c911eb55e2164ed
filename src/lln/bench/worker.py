"""One benchmark configuration, in a fresh process: ``python -m lln.bench.worker CONFIG``.

``CONFIG`` is a JSON object (the text itself, or ``@path`` to a file holding it); the result
is written as JSON to ``config["result_path"]``. A fresh process per configuration keeps the
peak memory honest: nothing allocated by an earlier configuration is still held by the
allocator, and the peak resets to the RSS after imports and inputs (see
:mod:`lln.bench.measure`).

Order of events (``fwd`` / ``fwd_bwd``): import, set threads, one untimed *priming* call of
the same method and mode at ``min(n, PRIME_LENGTH)`` tokens (loads the kernels' code pages
and starts autograd's and the thread pool's machinery, which would otherwise be counted as
memory of the first configuration only), make the inputs (and the output gradient), reset
the memory peak, then warm-up and timed calls. ``decode``: make the context, prefill (timed
once, ``prefill_s``), make the tokens, reset the peak, then warm-up and timed steps.

Config keys (see :func:`default_config`): ``method`` (a registry name, or ``module:attr``
for any callable with the registry signature, either optionally followed by keyword options
for it, ``NAME[KEY=VALUE,...]``: see :func:`split_method`), ``mode`` (``fwd``, ``fwd_bwd`` or
``decode``), ``n`` (sequence length, or context length T when decoding), ``batch``,
``heads``, ``dim``, ``dtype``, ``device``, ``causal``, ``threads``, ``seed``, timing
options (``warmup``, ``repeats``, ``long_seconds``, ``target_seconds``, ``min_repeats``,
``max_repeats``) and decoding options (``decode_steps``, ``decode_warmup``).

The result has ``status`` ``ok``, ``oom`` (``MemoryError`` or an allocator error) or
``error`` (any other exception, with ``detail``); ``time`` (seconds, :func:`summarize`),
``memory`` (bytes, :class:`MemoryProbe`) and ``threads`` when ok. Timeouts and kills are
recorded by the parent (:mod:`lln.bench.runner`).
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("fwd", "fwd_bwd", "decode")
#: Length of the untimed priming call made before the memory baseline (fwd / fwd_bwd).
PRIME_LENGTH = 128


def default_config() -> dict[str, Any]:
    """Every config key with its default (``method``, ``mode`` and ``n`` must be set)."""
    return {
        "method": None,
        "mode": None,
        "n": None,
        "batch": 1,
        "heads": 12,
        "dim": 64,
        "dtype": "float32",
        "device": "cpu",
        "causal": True,
        "threads": None,
        "seed": 0,
        "warmup": 1,
        "repeats": None,
        "long_seconds": 10.0,
        "target_seconds": 2.0,
        "min_repeats": 3,
        "max_repeats": 10,
        "decode_steps": 64,
        "decode_warmup": 8,
        "result_path": None,
    }


def split_method(name: str) -> tuple[str, dict[str, Any]]:
    """A method name and the keyword options it carries, e.g. ``"lln[checkpoint=True]"`` ->
    ``("lln", {"checkpoint": True})``.

    Options are ``KEY=VALUE`` separated by commas; a value is read as a Python literal
    (``True``, ``64``, ``1.5``, ``None``), or else taken as a string.

    Raises:
        ValueError: a malformed option list (the message shows the expected form).
    """
    base, bracket, rest = name.partition("[")
    if not bracket:
        return name, {}
    options: dict[str, Any] = {}
    items = rest[:-1].split(",") if rest.endswith("]") else []
    for item in items:
        key, equals, text = (part.strip() for part in item.partition("="))
        if not (equals and key.isidentifier()):
            items = []
            break
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    if not (base and items):
        raise ValueError(
            f"method {name!r}: options must read NAME[KEY=VALUE,...], e.g. "
            "'lln[checkpoint=True]'"
        )
    return base, options


def resolve_method(name: str) -> Callable[..., Any]:
    """The attention function for ``name``: a registry name or ``package.module:attr``,
    with the keyword options of ``NAME[KEY=VALUE,...]`` bound (see :func:`split_method`)."""
    name, options = split_method(name)
    if options:
        return functools.partial(resolve_method(name), **options)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import method {name!r}: {error}") from error
    from ..ops.registry import get_attention

    return get_attention(name).fn


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``MemoryError`` and torch's CPU / CUDA allocation failures."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return "out of memory" in message or "can't allocate memory" in message
    return False


def _forward_case(
    config: dict[str, Any], fn: Callable[..., Any], dtype, device: str, n: int | None = None
):
    """``(run, reset)`` for the ``fwd`` / ``fwd_bwd`` modes; inputs made here, untimed.

    ``n`` overrides ``config["n"]`` (for the priming call at a small length).
    """
    import torch

    shape = (config["batch"], config["heads"], n or config["n"], config["dim"])
    generator = torch.Generator().manual_seed(config["seed"])
    q, k, v, grad = (
        torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(4)
    )
    causal = config["causal"]
    if config["mode"] == "fwd":
        del grad

        def forward() -> Any:
            with torch.no_grad():
                return fn(q, k, v, is_causal=causal)

        return forward, lambda: None

    leaves = [t.requires_grad_(True) for t in (q, k, v)]

    def forward_backward() -> None:
        fn(*leaves, is_causal=causal).backward(grad)

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    return forward_backward, clear_grads


def _decode_case(config: dict[str, Any], dtype, device: str, record: dict[str, Any]):
    """``(run, reset)`` timing one decoded token after a context of ``n`` tokens."""
    import torch

    from .decode import Decoder

    b, h, t, d = config["batch"], config["heads"], config["n"], config["dim"]
    steps, warm = config["decode_steps"], config["decode_warmup"]
    generator = torch.Generator().manual_seed(config["seed"])
    q, k, v = (
        torch.randn(b, h, t, d, generator=generator).to(device=device, dtype=dtype)
        for _ in range(3)
    )
    start = time.perf_counter()
    decoder = Decoder(config["method"], q, k, v, capacity=t + warm + steps + 1)
    record["prefill_s"] = time.perf_counter() - start
    del q, k, v
    tokens = [
        torch.randn(3, b, h, 1, d, generator=generator).to(device=device, dtype=dtype)
        for _ in range(warm + steps)
    ]
    it = iter(tokens)

    def step() -> Any:
        token = next(it)
        return decoder.step(token[0], token[1], token[2])

    record["decoder"] = decoder
    return step, lambda: None


def run_config(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; returns the result record (no timeouts)."""
    record: dict[str, Any] = {"status": "ok"}
    try:
        import torch

        from .measure import MemoryProbe, time_runs

        if config["threads"]:
            torch.set_num_threads(int(config["threads"]))
        record["threads"] = torch.get_num_threads()
        dtype = getattr(torch, config["dtype"])
        device = config["device"]
        sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else lambda: None
        )
        if config["mode"] == "decode":
            run, reset = _decode_case(config, dtype, device, record)
            timing = {
                "warmup": config["decode_warmup"],
                "repeats": config["decode_steps"],
                "long_seconds": float("inf"),
            }
        else:
            fn = resolve_method(config["method"])
            # Priming: one call at a small length first, so that one-off costs (code pages
            # of the kernels, autograd and thread-pool start-up) are not counted as memory.
            record["primed_n"] = min(config["n"], PRIME_LENGTH)
            prime, prime_reset = _forward_case(config, fn, dtype, device, record["primed_n"])
            prime_reset()
            prime()
            del prime, prime_reset
            run, reset = _forward_case(config, fn, dtype, device)
            timing = {
                key: config[key]
                for key in (
                    "warmup", "repeats", "long_seconds", "target_seconds", "min_repeats",
                    "max_repeats",
                )
            }
        probe = MemoryProbe(device)
        probe.start()
        record["time"] = time_runs(run, reset=reset, sync=sync, **timing)
        record["memory"] = probe.stop()
        decoder = record.pop("decoder", None)
        if decoder is not None:
            record["memory"]["state_bytes"] = decoder.memory_bytes()
    except BaseException as error:  # noqa: BLE001 - every failure becomes a record
        if isinstance(error, KeyboardInterrupt):
            raise
        record.pop("decoder", None)
        if is_out_of_memory(error):
            record.update(status="oom", detail=f"{type(error).__name__}: {error}"[:500])
        else:
            record.update(
                status="error",
                detail=f"{type(error).__name__}: {error}"[:500],
                traceback=traceback.format_exc()[-4000:],
            )
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the config, run it, write the result JSON; exit code 0 if written."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lln.bench.worker CONFIG_JSON | @CONFIG_PATH", file=sys.stderr)
        return 2
    text = Path(argv[0][1:]).read_text() if argv[0].startswith("@") else argv[0]
    config = default_config()
    config.update(json.loads(text))
    record = run_config(config)
    output = json.dumps(record, indent=1)
    if config["result_path"]:
        Path(config["result_path"]).write_text(output)
    else:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
