"""Benchmark outputs: the header, scaling fits, markdown tables, PNG plots, README section.

Everything here works on the plain JSON-able result records of :mod:`lln.bench.runner`
(``{"method", "mode", "n", "status", "time", "memory", ...}``), so a saved ``results.json``
can be re-rendered without re-running anything.
"""

from __future__ import annotations

import os
import platform
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .fit import fit_exponent
from .runner import total_memory_bytes

BASELINE = "softmax"
MODE_TITLES = {"fwd_bwd": "Forward + backward", "fwd": "Forward", "decode": "Decoding"}
STATUS_CELLS = {"unsupported": "n/a"}


# --------------------------------------------------------------------------- header


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, RAM, OS and Python: enough to tell two result files apart."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    uname = platform.uname()
    ram = total_memory_bytes()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_bytes": ram,
        "os": f"{uname.system} {uname.release} {uname.machine}",
        "python": platform.python_version(),
    }


def make_header(settings: dict[str, Any], *, command: str) -> dict[str, Any]:
    """The JSON header: machine, torch / lln versions, settings, date, exact command."""
    import torch

    from .. import __version__

    header: dict[str, Any] = {
        "machine": machine_info(),
        "torch": torch.__version__,
        "lln": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": settings,
    }
    if settings.get("device", "cpu").startswith("cuda") and torch.cuda.is_available():
        header["machine"]["gpu"] = torch.cuda.get_device_name(settings["device"])
    try:
        header["loadavg_start"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        header["loadavg_start"] = None
    return header


def machine_line(header: dict[str, Any], threads: int | None) -> str:
    """``Machine: <cpu>, 2 cores, 2 threads, 23 GiB RAM, Linux ...; torch ..., lln ...``."""
    machine, s = header["machine"], header["settings"]
    ram = f", {machine['ram_bytes'] / 2**30:.0f} GiB RAM" if machine.get("ram_bytes") else ""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    batch = s["batch"]
    batch = ",".join(map(str, batch)) if isinstance(batch, list) else batch
    layout = f"B={batch} H={s['heads']} D={s['dim']} {s['dtype']} on {s['device']}"
    if s.get("mode") != "decode":
        layout += ", causal" if s["causal"] else ", non-causal"
    if s.get("contend"):
        layout += f", with a CPU-bound process pinned to core {s.get('contend_core')} (--contend)"
    return (
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {threads} torch threads"
        f"{ram}{gpu}, {machine['os']}; torch {header['torch']}, lln {header['lln']}; "
        f"{layout}; {header['date']}."
    )


# --------------------------------------------------------------------------- analysis


def _index(results: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["method"], r["mode"], r["n"]): r for r in results}


def _median(result: dict[str, Any] | None) -> float | None:
    if result is None or result.get("status") != "ok":
        return None
    return result["time"]["median"]


def _delta(result: dict[str, Any] | None) -> int | None:
    if result is None or result.get("status") != "ok":
        return None
    return result["memory"]["delta_bytes"]


def scaling_fits(
    results: list[dict[str, Any]], *, n_min: int | None = None, n_max: int | None = None
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """``{mode: {method: {"exponent", "prefactor", "lengths"} | None}}`` of median time vs N."""
    fits: dict[str, dict[str, dict[str, Any] | None]] = {}
    for mode in _ordered({r["mode"] for r in results}, list(MODE_TITLES)):
        for method in _methods(results):
            points = [r for r in results if r["method"] == method and r["mode"] == mode]
            fit = fit_exponent(
                [r["n"] for r in points], [_median(r) for r in points], n_min=n_min, n_max=n_max
            )
            fits.setdefault(mode, {})[method] = (
                None
                if fit is None
                else {
                    "exponent": fit.exponent,
                    "prefactor": fit.prefactor,
                    "lengths": list(fit.lengths),
                }
            )
    return fits


def _ordered(items: set[str], order: list[str]) -> list[str]:
    return [x for x in order if x in items] + sorted(items - set(order))


def _methods(results: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        seen.setdefault(r["method"], None)
    return list(seen)


def _lengths(results: list[dict[str, Any]]) -> list[int]:
    return sorted({r["n"] for r in results})


# --------------------------------------------------------------------------- formatting


def format_seconds(seconds: float) -> str:
    """``0.612 ms``, ``4.25 ms``, ``123.4 ms``, ``1.23 s``, ``81.2 s``, ``312 s``."""
    ms = seconds * 1e3
    for limit, text in ((1, f"{ms:.3f} ms"), (10, f"{ms:.2f} ms"), (1000, f"{ms:.1f} ms"),
                        (10_000, f"{seconds:.2f} s"), (100_000, f"{seconds:.1f} s")):
        if ms < limit:
            return text
    return f"{seconds:.0f} s"


def format_bytes(n: float) -> str:
    """``512 B``, ``96 KiB``, ``1.5 MiB``, ``204 MiB``, ``3.1 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2g} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def format_ratio(value: float) -> str:
    """``0.055×``, ``0.5×``, ``8.0×``, ``12×``."""
    if value < 0.1:
        return f"{value:.2g}×"
    return f"{value:.1f}×" if value < 10 else f"{value:.0f}×"


def _cell(result: dict[str, Any] | None, value: str | None) -> str:
    if result is None:
        return "-"
    if result["status"] != "ok":
        return STATUS_CELLS.get(result["status"], result["status"])
    return value or "-"


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _sweep_sections(
    results: list[dict[str, Any]], fits: dict, fit_range: str
) -> list[str]:
    index, methods, lengths = _index(results), _methods(results), _lengths(results)
    lines: list[str] = []
    modes = _ordered({r["mode"] for r in results}, list(MODE_TITLES))
    for mode in modes:
        title = MODE_TITLES.get(mode, mode)
        time_rows, memory_rows = [], []
        for n in lengths:
            base = index.get((BASELINE, mode, n))
            time_row, memory_row = [str(n)], [str(n)]
            for method in methods:
                r = index.get((method, mode, n))
                t, t0 = _median(r), _median(base)
                m, m0 = _delta(r), _delta(base)
                tcell = memcell = None
                if t is not None:
                    tcell = format_seconds(t)
                    if t0 is not None and method != BASELINE:
                        tcell += f" ({format_ratio(t0 / t)})"
                if m is not None:
                    memcell = format_bytes(m)
                    if m0 and method != BASELINE:
                        memcell += f" ({format_ratio(m / m0)})"
                time_row.append(_cell(r, tcell))
                memory_row.append(_cell(r, memcell))
            time_rows.append(time_row)
            memory_rows.append(memory_row)
        exponents = [f"exponent {fit_range}"]
        for method in methods:
            fit = fits.get(mode, {}).get(method)
            exponents.append("-" if fit is None else f"{fit['exponent']:.2f}")
        time_rows.append(exponents)
        lines += [
            f"**{title}: time** (median over repeats; in brackets softmax time / this time, "
            "> 1 = faster than softmax; last row: fitted exponent p of time ~ N^p)",
            "",
            *_table(["N", *methods], time_rows),
            "",
            f"**{title}: peak memory** (peak RSS minus the RSS after imports and inputs; in "
            "brackets this / softmax)",
            "",
            *_table(["N", *methods], memory_rows),
            "",
        ]
        absolute = []
        for method in methods:
            ok = [r for r in results if r["method"] == method and r["mode"] == mode
                  and r["status"] == "ok"]
            if ok:
                last = max(ok, key=lambda r: r["n"])
                absolute.append(
                    f"{method} {format_bytes(last['memory']['peak_bytes'])} at N={last['n']}"
                )
        if absolute:
            lines += [f"Absolute peak ({title.lower()}, whole process): "
                      + ", ".join(absolute) + ".", ""]
    return lines


def key_numbers(results: list[dict[str, Any]]) -> list[str]:
    """Bullet lines: speed-up and memory of each method vs softmax at the largest N both
    finished, and the LLN+Diag overhead over LLN."""
    index, methods = _index(results), _methods(results)
    lines = []
    modes = _ordered({r["mode"] for r in results}, list(MODE_TITLES))
    pairs = [(BASELINE, m) for m in methods if m != BASELINE]
    if "lln" in methods and "lln_diag" in methods:
        pairs.append(("lln", "lln_diag"))
    for mode in modes:
        for ref, method in pairs:
            common = [
                n for n in _lengths(results)
                if _median(index.get((ref, mode, n))) and _median(index.get((method, mode, n)))
            ]
            if not common:
                continue
            n = common[-1]
            r, r0 = index[(method, mode, n)], index[(ref, mode, n)]
            t, t0 = r["time"]["median"], r0["time"]["median"]
            m, m0 = r["memory"]["delta_bytes"], r0["memory"]["delta_bytes"]
            title = MODE_TITLES.get(mode, mode).lower()
            if ref == BASELINE:
                memory = f", memory {format_bytes(m)} vs {format_bytes(m0)}"
                lines.append(
                    f"- {title}, N={n}: {method} {format_seconds(t)} vs softmax "
                    f"{format_seconds(t0)} (speed-up {format_ratio(t0 / t)}){memory}"
                )
            else:
                overhead = f"{(m / m0 - 1) * 100:+.0f}%" if m0 > 0 else "n/a"
                lines.append(
                    f"- {title}, N={n}: lln_diag over lln: time {(t / t0 - 1) * 100:+.0f}%, "
                    f"memory {overhead} ({format_bytes(m)} vs {format_bytes(m0)})"
                )
    return lines


def sweep_markdown(document: dict[str, Any]) -> str:
    """The markdown report of a ``fwd`` / ``fwd_bwd`` sweep: machine line, command, tables
    of time and memory per N and method with ratios to softmax and fitted exponents."""
    header, results = document["header"], document["results"]
    fit_range = document.get("fit_range", "")
    lines = [
        machine_line(header, _threads(results, header)),
        "",
        f"Command: `{header['command']}`",
        "",
        *_sweep_sections(results, document["fits"], fit_range),
    ]
    numbers = key_numbers(results)
    if numbers:
        lines += ["**Key numbers**", "", *numbers, ""]
    return "\n".join(lines)


def _batch_groups(methods: list[str]) -> dict[str | None, list[str]]:
    """Result names grouped by batch size: ``"lln B=8"`` -> group ``"8"``; names without a
    ``" B="`` suffix (a run with one batch size) form the one group None."""
    groups: dict[str | None, list[str]] = {}
    for method in methods:
        _, sep, batch = method.rpartition(" B=")
        groups.setdefault(batch if sep else None, []).append(method)
    return groups


def decode_markdown(document: dict[str, Any]) -> str:
    """The markdown report of a decoding run: per-token latency and carried memory vs T,
    one pair of tables per batch size."""
    header, results = document["header"], document["results"]
    index, lengths = _index(results), _lengths(results)
    steps = header["settings"].get("decode_steps")
    lines = [machine_line(header, _threads(results, header)), "", f"Command: `{header['command']}`",
             ""]
    for batch, methods in _batch_groups(_methods(results)).items():
        names = [m.rpartition(" B=")[0] if batch is not None else m for m in methods]
        at = "" if batch is None else f" (B={batch})"
        time_rows, memory_rows = [], []
        for n in lengths:
            time_row, memory_row = [str(n)], [str(n)]
            for method in methods:
                r = index.get((method, "decode", n))
                t = _median(r)
                state = r["memory"].get("state_bytes") if t is not None else None
                time_row.append(_cell(r, None if t is None else format_seconds(t)))
                memory_row.append(_cell(r, None if state is None else format_bytes(state)))
            time_rows.append(time_row)
            memory_rows.append(memory_row)
        growth = [f"T={lengths[-1]} / T={lengths[0]}"] if lengths else []
        for method in methods:
            first = _median(index.get((method, "decode", lengths[0]))) if lengths else None
            last = _median(index.get((method, "decode", lengths[-1]))) if lengths else None
            growth.append(f"{last / first:.2f}×" if first and last else "-")
        lines += [
            f"**Decoding{at}: time per token** after a context of T tokens (median over "
            f"{steps} single-token steps; LLN / LLN+Diag: recurrent state, softmax: SDPA "
            "against a pre-allocated KV cache, cache append included; +compile: the step "
            "under torch.compile; last row: growth from the shortest to the longest context)",
            "",
            *_table(["T", *names], [*time_rows, growth] if growth else time_rows),
            "",
            f"**Decoding{at}: memory carried per batch** (LLN / LLN+Diag: every tensor of "
            "the recurrent state; softmax: the filled part of the KV cache)",
            "",
            *_table(["T", *names], memory_rows),
            "",
        ]
    return "\n".join(lines)


def _threads(results: list[dict[str, Any]], header: dict[str, Any]) -> int | None:
    for r in results:
        if r.get("threads"):
            return r["threads"]
    return header["settings"].get("threads")


# --------------------------------------------------------------------------- plots


def _state_mib(result: dict[str, Any]) -> float | None:
    if _median(result) is None:
        return None
    return result["memory"]["state_bytes"] / 2**20


def _short_length(n: int) -> str:
    """``512``, ``1k``, ``64k``: tick labels."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def write_plots(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """Log-log PNGs (time and memory vs N, one panel per mode); [] with a warning when
    matplotlib is missing (``pip install lln[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        warnings.warn(
            "matplotlib is not installed, so no plots were written; "
            "`pip install lln[plot]` to get them",
            RuntimeWarning,
            stacklevel=2,
        )
        return []
    results = document["results"]
    decode = document["header"]["settings"].get("mode") == "decode"
    modes = _ordered({r["mode"] for r in results}, list(MODE_TITLES))
    xlabel = "context length T" if decode else "sequence length N"
    quantities = [
        ("time", "seconds per token" if decode else "seconds (median)", _median),
        (
            "memory",
            "state / KV cache (MiB)" if decode else "peak RSS - baseline (MiB)",
            _state_mib if decode else lambda r: None if _delta(r) is None else _delta(r) / 2**20,
        ),
    ]
    lengths = _lengths(results)
    written = []
    for name, ylabel, value in quantities:
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            for method in _methods(results):
                points = [
                    (r["n"], value(r))
                    for r in sorted(results, key=lambda r: r["n"])
                    if r["method"] == method and r["mode"] == mode
                ]
                points = [(n, y) for n, y in points if y]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [_short_length(n) for n in lengths])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(MODE_TITLES.get(mode, mode))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- README


def check_marked_section(path: Path | str, *, marker: str = "bench") -> tuple[str, str, str]:
    """Check that ``path`` has one ``<!-- {marker}:start -->`` before one
    ``<!-- {marker}:end -->``; returns ``(content, start, end)``.

    Raises:
        ValueError: a marker is missing, repeated, or the end comes before the start.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    content = path.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    for tag in (start, end):
        count = content.count(tag)
        if count != 1:
            raise ValueError(
                f"{path} must contain {tag!r} exactly once (found {count}); "
                f"put {start} and {end} around the section to generate"
            )
    if content.index(end) < content.index(start):
        raise ValueError(f"in {path}, {end!r} comes before {start!r}")
    return content, start, end


def replace_marked_section(path: Path | str, text: str, *, marker: str = "bench") -> None:
    """Replace what lies between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->``
    in the file at ``path`` by ``text`` (the markers stay; the rest of the file too).

    Raises:
        ValueError, FileNotFoundError: as :func:`check_marked_section`.
    """
    content, start, end = check_marked_section(path, marker=marker)
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(path).write_text(f"{head}{start}\n{text.strip()}\n{end}{tail}")
