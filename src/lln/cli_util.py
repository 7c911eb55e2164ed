"""Output folders of the ``lln`` commands: default run folders, no silent overwrites, and
"cannot write there" found before any work starts.

Every command that writes results takes ``--out`` (a folder) and ``--overwrite``:

* without ``--out`` the results go to a new folder ``runs/<command>-<UTC time>``;
* an ``--out`` that already holds files is refused unless ``--overwrite`` is given;
* an ``--out`` that cannot be created or written is reported at once, naming the option.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path


class OutputExistsError(ValueError):
    """The output folder holds results and ``--overwrite`` was not given (a usage error)."""


def default_run_folder(command: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<command>-<UTC time>`` (e.g. ``runs/sweep-20260101T120000Z``), with a numeric
    suffix if that folder exists already."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(root) / f"{command}-{stamp}"
    path, number = base, 1
    while path.exists():
        number += 1
        path = base.with_name(f"{base.name}-{number}")
    return path


def prepare_out(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Create the output folder ``path`` and check that it can be written.

    Raises:
        OutputExistsError: ``path`` holds files and ``overwrite`` is False.
        ValueError: ``path`` is a file, or cannot be created or written (message names
            ``flag`` and the reason).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; expected a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{flag} {path} already holds results: pass --overwrite to replace them, or "
            f"choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be written ({error.strerror or error}); "
                         "expected a writable folder") from None
    return path


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Check that the file ``path`` can be written (its folder is created)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be written ({error.strerror or error})") \
            from None
    return path


def add_out_arguments(parser, command: str) -> None:
    """``--out`` (default: a new ``runs/<command>-<UTC time>``) and ``--overwrite``."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: a new folder runs/{command}-<UTC time>; "
                             "an existing non-empty folder needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that already holds results, replacing them")


def resolve_out(out: str | os.PathLike | None, command: str, *, overwrite: bool = False) -> Path:
    """The output folder of ``command``: ``out``, or a new default run folder; created and
    checked by :func:`prepare_out` (call before any work)."""
    path = prepare_out(out if out is not None else default_run_folder(command),
                       overwrite=overwrite)
    print(f"lln {command}: writing to {path}", flush=True)
    return path
