"""``lln bench``: exponent fit, timing rule, worker records, limits, reports, decoding.

Worker processes import torch (a few seconds each on a busy machine), so only two tests go
through the real subprocess path end to end (a sweep and a decoding run, 6 processes in
all); the limit handling is tested with stand-in "interpreters" that start in
milliseconds, and the worker's logic (all decoding methods included) in-process.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lln
from lln.bench import command, report, runner
from lln.bench.decode import Decoder
from lln.bench.fit import fit_exponent
from lln.bench.measure import plan_repeats, summarize, time_runs
from lln.bench.worker import default_config, run_config, split_method
from lln.cli import build_parser

PLUGIN = '''
import time


def sleepy(q, k, v, *, is_causal=False):
    time.sleep(60)
    return v


def allocator_fails(q, k, v, *, is_causal=False):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")


def memory_error(q, k, v, *, is_causal=False):
    raise MemoryError()


def broken(q, k, v, *, is_causal=False):
    raise ValueError("broken on purpose")
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``bench_plugin`` of failing attentions, importable in-process."""
    (tmp_path / "bench_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bench_plugin"


def tiny_config(**changes) -> dict:
    config = default_config()
    config.update(method="softmax", mode="fwd_bwd", n=37, heads=2, dim=8, threads=1,
                  target_seconds=0.01, min_repeats=2, max_repeats=3)
    config.update(changes)
    return config


# --------------------------------------------------------------------------- fit


def test_fit_recovers_a_known_exponent_and_honours_the_range():
    rng = random.Random(0)
    lengths = [1024 * 2**i for i in range(7)]
    noisy = [3e-6 * n**1.37 * math.exp(rng.gauss(0, 0.01)) for n in lengths]
    fit = fit_exponent(lengths, noisy)
    assert fit.exponent == pytest.approx(1.37, abs=0.02)
    assert fit.prefactor == pytest.approx(3e-6, rel=0.2)
    # quadratic below 4096, linear from there: only the range decides what is fitted
    bent = [n**2 if n < 4096 else 4096 * n for n in lengths]
    assert fit_exponent(lengths, bent, n_min=4096).exponent == pytest.approx(1.0, abs=1e-9)
    assert fit_exponent(lengths, bent, n_max=4096).exponent == pytest.approx(2.0, abs=1e-9)
    assert fit_exponent(lengths, bent, n_min=4096).lengths == tuple(lengths[2:])
    # missing values are left out; fewer than two points -> None
    assert fit_exponent([1024, 2048, 4096], [None, 2.0, 4.0]).exponent == pytest.approx(1.0)
    assert fit_exponent([1024, 2048], [1.0, None]) is None
    with pytest.raises(ValueError, match="one entry each"):
        fit_exponent([1, 2], [1.0])
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        fit_exponent([0, 2], [1.0, 2.0])


# --------------------------------------------------------------------------- timing rule


def test_repeats_rule_and_summary():
    assert plan_repeats(0.5, target_seconds=2.0) == 4
    assert plan_repeats(5.0, target_seconds=2.0) == 3  # at least min_repeats
    assert plan_repeats(1e-5, target_seconds=2.0) == 10  # at most max_repeats
    stats = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats["median"], stats["min"], stats["max"]) == (3.0, 1.0, 5.0)
    assert (stats["q1"], stats["q3"], stats["iqr"]) == (2.0, 4.0, 2.0)
    assert stats["times"] == [4.0, 1.0, 3.0, 2.0, 5.0]


def test_long_first_call_is_the_only_measurement():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    timing = time_runs(slow, warmup=1, long_seconds=0.01)
    assert len(calls) == 1 and timing["repeats"] == 1 and timing["warmup_reused"]
    assert timing["median"] >= 0.03
    calls.clear()
    timing = time_runs(slow, warmup=1, long_seconds=10.0, target_seconds=0.01)
    assert len(calls) == 1 + 3 and timing["repeats"] == 3 and not timing["warmup_reused"]
    calls.clear()
    timing = time_runs(slow, warmup=2, repeats=2)
    assert len(calls) == 4 and len(timing["warmup_times"]) == 2


_PROBE_SCRIPT = """
import json, torch
from lln.bench.measure import MemoryProbe
mib = 2**20
probe = MemoryProbe()
probe.start()
x = torch.ones(16 * mib)  # 64 MiB, written, then freed before stop()
del x
first = probe.stop()
probe.start()  # the 64 MiB peak is forgotten
second = probe.stop()
print(json.dumps({"first": first, "second": second}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_probe_sees_a_known_allocation_and_resets():
    """In a fresh interpreter: in-process RSS depends on what earlier tests left in the
    allocator (freed memory it still holds can serve the 64 MiB without a new page), so the
    result would depend on test order."""
    import os
    import subprocess

    src = str(Path(lln.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    record = result["first"]
    assert record["source"].startswith("VmHWM (reset")
    assert 60 * mib <= record["delta_bytes"] < 160 * mib
    assert record["peak_bytes"] == record["baseline_bytes"] + record["delta_bytes"]
    assert result["second"]["delta_bytes"] < 32 * mib


# --------------------------------------------------------------------------- worker


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_worker_record_in_process(mode):
    record = run_config(tiny_config(mode=mode, method="lln_diag"))
    assert record["status"] == "ok", record.get("traceback")
    timing, memory = record["time"], record["memory"]
    assert 2 <= timing["repeats"] <= 3 and len(timing["times"]) == timing["repeats"]
    assert 0 < timing["min"] <= timing["median"] <= timing["max"]
    assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
    assert memory["delta_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"]
    assert record["threads"] == torch.get_num_threads() and record["primed_n"] == 37


@pytest.mark.parametrize("method", ["lln_diag", "softmax"])
def test_worker_decode_record_in_process(method):
    record = run_config(tiny_config(method=method, mode="decode", n=50, decode_steps=5,
                                    decode_warmup=2))
    assert record["status"] == "ok", record.get("traceback")
    assert record["time"]["repeats"] == 5 and record["prefill_s"] > 0
    state = record["memory"]["state_bytes"]
    if method == "softmax":  # K and V of 50 + 2 + 5 tokens, 2 heads, dim 8, float32
        assert state == 2 * 2 * 57 * 8 * 4
    else:  # sums (D x Dv, D, D), moments, and at most one unfinished block of 8 tokens
        assert 0 < state < 2 * (8 * 8 + 8 + 8) * 4 + 2 * 2 * 8 * 8 * 4 + 1024


def test_worker_classifies_failures(plugin):
    oom = run_config(tiny_config(method=f"{plugin}:allocator_fails"))
    assert oom["status"] == "oom" and "can't allocate memory" in oom["detail"]
    assert run_config(tiny_config(method=f"{plugin}:memory_error"))["status"] == "oom"
    broken = run_config(tiny_config(method=f"{plugin}:broken"))
    assert broken["status"] == "error" and broken["detail"] == "ValueError: broken on purpose"
    unknown = run_config(tiny_config(method="no_such_attention"))
    assert unknown["status"] == "error" and "valid names" in unknown["detail"]
    missing = run_config(tiny_config(method=f"{plugin}:nothing_here"))
    assert missing["status"] == "error" and "cannot import method" in missing["detail"]


# --------------------------------------------------------------------------- limits


def fake_python(tmp_path: Path, code: str) -> str:
    """An executable that ignores the worker arguments and runs ``code`` in plain Python."""
    script = tmp_path / "fake-python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c {json.dumps(code)}\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_subprocess_limits_and_kills_are_recorded(tmp_path):
    config = tiny_config()
    sleeper = fake_python(tmp_path, "import time; time.sleep(30)")
    start = time.perf_counter()
    record = runner.run_in_subprocess(config, timeout=0.5, python=sleeper)
    assert record["status"] == "timeout" and time.perf_counter() - start < 10

    hog = fake_python(tmp_path, "import time; x = bytearray(400 * 2**20); time.sleep(30)")
    record = runner.run_in_subprocess(config, timeout=20, memory_limit=100 * 2**20, python=hog)
    assert record["status"] == "oom" and "limit 100 MiB" in record["detail"]

    suicide = fake_python(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    record = runner.run_in_subprocess(config, timeout=20, python=suicide)
    assert record["status"] == "oom" and "SIGKILL" in record["detail"]

    crash = fake_python(tmp_path, "import sys; print('boom', file=sys.stderr); sys.exit(3)")
    record = runner.run_in_subprocess(config, timeout=20, python=crash)
    assert record["status"] == "error" and "code 3" in record["detail"]
    assert "boom" in record["detail"]


def test_sweep_skips_larger_lengths_after_a_timeout(monkeypatch):
    ran = []

    def fake_run(config, *, timeout, memory_limit):
        ran.append((config["method"], config["n"]))
        if config["method"] == "slow" and config["n"] >= 128:
            return {"status": "timeout", "detail": "killed", "wall_s": 1.0}
        return {"status": "ok", "time": {"median": 1e-3}, "memory": {"delta_bytes": 1},
                "wall_s": 0.1}

    monkeypatch.setattr(runner, "run_in_subprocess", fake_run)
    configs = [{"method": m, "mode": "fwd", "n": n} for n in (64, 128, 256, 512)
               for m in ("slow", "fine", "never")]
    results = runner.sweep(configs, progress=False,
                           skip=lambda c: "no causal mode" if c["method"] == "never" else None)
    status = {(r["method"], r["n"]): r["status"] for r in results}
    assert status[("slow", 64)] == "ok" and status[("slow", 128)] == "timeout"
    assert status[("slow", 256)] == status[("slow", 512)] == "skipped"
    assert all(status[("fine", n)] == "ok" for n in (64, 128, 256, 512))
    assert all(status[("never", n)] == "unsupported" for n in (64, 128, 256, 512))
    assert ("slow", 256) not in ran and ("never", 64) not in ran


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("method", ["lln", "lln_diag", "softmax"])
def test_decoder_steps_equal_one_causal_call(method):
    """Prefill 37 tokens, decode 5: the outputs equal the causal attention of all 42 tokens
    at those positions (float64, rel. error < 1e-10)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 42, 8, generator=g, dtype=torch.float64) for _ in range(3))
    full = {
        "lln": lambda: lln.lln_attention(q, k, v, is_causal=True),
        "lln_diag": lambda: lln.lln_diag_attention(q, k, v, is_causal=True),
        "softmax": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }[method]()
    decoder = Decoder(method, q[:, :, :37], k[:, :, :37], v[:, :, :37], capacity=42)
    steps = [decoder.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1])
             for i in range(37, 42)]
    err = (torch.cat(steps, 2) - full[:, :, 37:]).abs().max() / full.abs().max()
    assert err < 1e-10
    assert decoder.position == 42
    if method == "softmax":
        assert decoder.memory_bytes() == 2 * 2 * 3 * 42 * 8 * 8  # K and V of 42 tokens
        with pytest.raises(ValueError, match="KV cache is full"):
            decoder.step(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    else:  # the state does not grow with the context
        short = Decoder(method, q[:, :, :5], k[:, :, :5], v[:, :, :5], capacity=5)
        assert 0 < decoder.memory_bytes() <= short.memory_bytes() + 2 * 3 * 8 * 8 * 8 * 2


@pytest.mark.parametrize("method", [
    pytest.param("lln", marks=pytest.mark.slow), "lln_diag",
    pytest.param("softmax", marks=pytest.mark.slow)])
def test_compiled_decoder_traces_one_graph_and_equals_eager(method, monkeypatch):
    """``<method>+compile`` runs the same step under torch.compile(fullgraph=True) (here
    with Dynamo's eager backend, to keep the test fast; Inductor in the slow tests)."""
    import lln.bench.decode as decode_module

    real_compile = torch.compile
    monkeypatch.setattr(decode_module.torch, "compile",
                        lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g) for _ in range(3))
    eager = Decoder(method, q[:, :, :20], k[:, :, :20], v[:, :, :20], capacity=30)
    compiled = Decoder(method + "+compile", q[:, :, :20], k[:, :, :20], v[:, :, :20],
                       capacity=30)
    for i in range(20, 30):
        token = (q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        assert (compiled.step(*token) - eager.step(*token)).abs().max() <= 1e-6
    assert compiled.memory_bytes() == eager.memory_bytes()
    torch._dynamo.reset()


def test_decode_batches_get_labels_and_one_table_each():
    parser = build_parser()
    args = parser.parse_args(["bench", "--decode", "--methods", "lln", "softmax",
                              "--lengths", "64"])
    configs = command.build_configs(args, ["lln", "softmax"])
    assert [(c["label"], c["batch"]) for c in configs] == [
        ("lln B=1", 1), ("softmax B=1", 1), ("lln B=8", 8), ("softmax B=8", 8)]
    one = command.build_configs(parser.parse_args(["bench", "--decode", "--batch", "4"]), ["lln"])
    assert "label" not in one[0] and one[0]["batch"] == 4
    with pytest.raises(ValueError, match="--batch takes several sizes only with --decode"):
        command.build_configs(parser.parse_args(["bench", "--batch", "1", "8"]), ["lln"])
    results = [
        {**_ok(m, "decode", 64, t, 0), "memory": {"delta_bytes": 0, "state_bytes": 2**10}}
        for m, t in [("lln B=1", 1e-4), ("softmax B=1", 2e-4), ("lln B=8", 3e-4),
                     ("softmax B=8", 4e-4)]
    ]
    document = _document(results)
    document["header"]["settings"].update(mode="decode", batch=[1, 8])
    markdown = report.decode_markdown(document)
    assert "B=1,8 H=12" in markdown
    assert "**Decoding (B=1): time per token**" in markdown
    assert "**Decoding (B=8): time per token**" in markdown
    assert markdown.count("| T | lln | softmax |") == 4  # time and memory, per batch
    assert "| 64 | 0.300 ms | 0.400 ms |" in markdown


def test_decoder_rejects_bad_arguments():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="method must be one of"):
        Decoder("elu", q, q, q, capacity=8)
    with pytest.raises(ValueError, match="capacity must be >= the context length 4"):
        Decoder("softmax", q, q, q, capacity=3)


# --------------------------------------------------------------------------- reports


def _ok(method, mode, n, seconds, delta):
    return {"method": method, "mode": mode, "n": n, "status": "ok", "threads": 2,
            "time": {"median": seconds}, "memory": {"delta_bytes": delta,
                                                    "peak_bytes": delta + 300 * 2**20}}


def _document(results):
    header = {
        "machine": {"cpu": "Test CPU", "cpu_count": 2, "ram_bytes": 8 * 2**30, "os": "TestOS"},
        "torch": "2.x", "lln": "0.1", "date": "2026-01-01T00:00:00+00:00",
        "command": "lln bench --test",
        "settings": {"batch": 1, "heads": 12, "dim": 64, "dtype": "float32", "device": "cpu",
                     "causal": True, "mode": "sweep", "threads": 2, "decode_steps": 4},
    }
    return {"header": header, "results": results, "fit_range": "(N ≥ 1024)",
            "fits": report.scaling_fits(results, n_min=1024)}


def test_sweep_markdown_ratios_statuses_and_exponents():
    mib = 2**20
    results = [
        _ok("softmax", "fwd_bwd", 1024, 1.0, 100 * mib),
        _ok("lln", "fwd_bwd", 1024, 0.1, 50 * mib),
        _ok("lln_diag", "fwd_bwd", 1024, 0.125, 55 * mib),
        {"method": "softmax", "mode": "fwd_bwd", "n": 2048, "status": "timeout",
         "detail": "killed"},
        _ok("lln", "fwd_bwd", 2048, 0.2, 100 * mib),
        {"method": "lln_diag", "mode": "fwd_bwd", "n": 2048, "status": "oom", "detail": "x"},
        {"method": "softmax", "mode": "fwd_bwd", "n": 4096, "status": "skipped"},
        _ok("lln", "fwd_bwd", 4096, 0.4, 200 * mib),
        {"method": "lln_diag", "mode": "fwd_bwd", "n": 4096, "status": "unsupported"},
    ]
    markdown = report.sweep_markdown(_document(results))
    assert "Machine: Test CPU, 2 cores, 2 torch threads, 8 GiB RAM" in markdown
    assert "Command: `lln bench --test`" in markdown
    assert "| 1024 | 1.00 s | 100.0 ms (10×) | 125.0 ms (8.0×) |" in markdown
    assert "| 2048 | timeout | 200.0 ms | oom |" in markdown
    assert "| 4096 | skipped | 400.0 ms | n/a |" in markdown
    assert "| exponent (N ≥ 1024) | - | 1.00 | - |" in markdown
    assert "| 1024 | 100 MiB | 50 MiB (0.5×) | 55 MiB (0.6×) |" in markdown
    assert "lln_diag over lln: time +25%, memory +10%" in markdown
    assert "lln 400.0 ms vs softmax" not in markdown  # no softmax time at 4096 to compare


def test_decode_markdown_growth_row():
    results = [
        {**_ok(m, "decode", n, t, 0), "memory": {"delta_bytes": 0, "state_bytes": s}}
        for m, n, t, s in [("lln", 1024, 1e-3, 2**17), ("lln", 65536, 1.2e-3, 2**17),
                           ("softmax", 1024, 1e-3, 2**20), ("softmax", 65536, 4e-2, 2**26)]
    ]
    document = _document(results)
    document["header"]["settings"]["mode"] = "decode"
    markdown = report.decode_markdown(document)
    assert "| T=65536 / T=1024 | 1.20× | 40.00× |" in markdown
    assert "| 65536 | 128 KiB | 64 MiB |" in markdown


def test_plots_are_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(RuntimeWarning, match=r"pip install lln\[plot\]"):
        assert report.write_plots(_document([_ok("lln", "fwd", 64, 1.0, 1)]), tmp_path) == []


def test_readme_section_replacement(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n"
                      "after\n")
    report.replace_marked_section(readme, "| new | table |\n")
    assert readme.read_text() == (
        "# Title\n\nbefore\n<!-- bench:start -->\n| new | table |\n<!-- bench:end -->\nafter\n"
    )
    report.replace_marked_section(readme, "second")  # idempotent markers
    assert readme.read_text().count("<!-- bench:start -->") == 1 and "second" in readme.read_text()
    readme.write_text("<!-- bench:end -->\n<!-- bench:start -->\n")
    with pytest.raises(ValueError, match="comes before"):
        report.replace_marked_section(readme, "x")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="exactly once"):
        report.replace_marked_section(readme, "x")


def test_methods_are_checked_before_running(tmp_path):
    assert command.resolve_methods(["all"], decode=False)[:3] == ["softmax", "lln", "lln_diag"]
    assert command.resolve_methods(None, decode=True) == [
        "lln", "lln_diag", "softmax", "lln+compile", "lln_diag+compile", "softmax+compile"]
    with pytest.raises(ValueError, match="valid names"):
        command.resolve_methods(["lln", "nope"], decode=False)
    with pytest.raises(ValueError, match="--decode supports"):
        command.resolve_methods(["elu"], decode=True)
    readme = tmp_path / "README.md"
    readme.write_text("nothing to replace\n")
    args = build_parser().parse_args(["bench", "--out", str(tmp_path / "o"), "--readme",
                                      str(readme), "--quiet"])
    with pytest.raises(ValueError, match="exactly once"):
        command.run(args)  # fails before any worker starts
    assert not (tmp_path / "o" / "results.json").exists()


def test_method_options_are_parsed_checked_and_bound():
    """``NAME[KEY=VALUE,...]`` passes keyword options to the method (e.g. checkpoint=True)."""
    assert split_method("lln") == ("lln", {})
    assert split_method("lln[checkpoint=True, chunk_size=32,constants=head_dim]") == (
        "lln", {"checkpoint": True, "chunk_size": 32, "constants": "head_dim"}
    )
    assert split_method("pkg.mod:fn[scale=0.5]") == ("pkg.mod:fn", {"scale": 0.5})
    for bad in ("lln[checkpoint]", "lln[]", "lln[checkpoint=True", "[x=1]", "lln[1x=2]"):
        with pytest.raises(ValueError, match=r"NAME\[KEY=VALUE"):
            split_method(bad)
    names = ["lln", "lln[checkpoint=True]", "lln"]
    assert command.resolve_methods(names, decode=False) == names[:2]
    with pytest.raises(ValueError, match="valid names"):
        command.resolve_methods(["nope[x=1]"], decode=False)
    config = {"mode": "fwd_bwd", "causal": True, "method": "nystrom[num_landmarks=8]"}
    assert command._unsupported(config) == "nystrom[num_landmarks=8] has no causal mode"
    record = run_config(tiny_config(method="lln_diag[checkpoint=True,chunk_size=8]"))
    assert record["status"] == "ok", record.get("traceback")
    unknown = run_config(tiny_config(method="lln[no_such_option=1]"))
    assert unknown["status"] == "error" and "no_such_option" in unknown["detail"]


# --------------------------------------------------------------------------- end to end


def test_bench_end_to_end_through_worker_processes(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\n<!-- bench:end -->\noutro\n")
    out = tmp_path / "run"
    args = build_parser().parse_args([
        "bench", "--methods", "softmax", "lln", "nystrom", "--lengths", "64", "100",
        "--modes", "fwd_bwd", "--heads", "2", "--dim", "8", "--threads", "1",
        "--target-seconds", "0.02", "--min-repeats", "2", "--max-repeats", "3",
        "--fit-min", "64", "--out", str(out), "--readme", str(readme), "--quiet",
    ])
    args.command_line = "lln bench --tiny"
    command.run(args)
    document = json.loads((out / "results.json").read_text())
    header = document["header"]
    assert document["complete"] is True
    assert header["command"] == "lln bench --tiny"
    for key in ("cpu", "cpu_count", "ram_bytes", "os"):
        assert header["machine"][key]
    assert header["torch"] == torch.__version__ and header["settings"]["threads"] == 1
    assert header["settings"]["dtype"] == "float32" and header["settings"]["causal"] is True
    results = {(r["method"], r["n"]): r for r in document["results"]}
    assert len(results) == 6
    for n in (64, 100):
        assert results[("nystrom", n)]["status"] == "unsupported"
        for method in ("softmax", "lln"):
            r = results[(method, n)]
            assert r["status"] == "ok", r
            assert r["mode"] == "fwd_bwd" and r["threads"] == 1 and r["wall_s"] > 0
            assert 0 < r["time"]["min"] <= r["time"]["median"] and r["time"]["iqr"] >= 0
            assert r["memory"]["peak_bytes"] >= r["memory"]["baseline_bytes"] > 2**20
    assert set(document["fits"]["fwd_bwd"]) == {"softmax", "lln", "nystrom"}
    assert document["fits"]["fwd_bwd"]["lln"]["lengths"] == [64, 100]
    assert document["fits"]["fwd_bwd"]["nystrom"] is None
    markdown = (out / "results.md").read_text()
    assert "| N | softmax | lln | nystrom |" in markdown and "| 100 |" in markdown
    assert readme.read_text().startswith("intro\n<!-- bench:start -->\nMachine: ")
    assert readme.read_text().endswith("<!-- bench:end -->\noutro\n")
    assert "Command: `lln bench --tiny`" in readme.read_text()
    pytest.importorskip("matplotlib")
    assert (out / "time.png").stat().st_size > 1000 and (out / "memory.png").exists()


def test_decode_end_to_end_through_worker_processes(tmp_path):
    out = tmp_path / "decode"
    args = build_parser().parse_args([
        "bench", "--decode", "--methods", "lln", "--lengths", "64", "128", "--batch", "1",
        "--heads", "2", "--dim", "8", "--threads", "1", "--decode-steps", "4",
        "--decode-warmup", "1", "--out", str(out), "--quiet", "--no-plots",
    ])
    command.run(args)
    document = json.loads((out / "results.json").read_text())
    assert document["header"]["settings"]["mode"] == "decode"
    results = {(r["method"], r["n"]): r for r in document["results"]}
    assert all(r["status"] == "ok" and r["mode"] == "decode" for r in results.values())
    assert all(r["time"]["repeats"] == 4 and r["prefill_s"] > 0 for r in results.values())
    assert len(results) == 2
    state = {key: r["memory"]["state_bytes"] for key, r in results.items()}
    assert state[("lln", 64)] == state[("lln", 128)] > 0  # constant-size state
    assert "| T=128 / T=64 |" in (out / "results.md").read_text()
    assert not (out / "time.png").exists()


def test_cli_lists_bench():
    help_text = build_parser().format_help()
    assert "bench" in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--lengths", "0"])

