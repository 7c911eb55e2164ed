"""The ``lln`` command line. ``lln --help`` lists the subcommands.

Each subcommand lives in its own module, which defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args)``; heavy imports happen inside ``run`` so that
``lln --help`` stays fast. Add a command by adding one line to :data:`COMMANDS`.

Errors: usage errors (``ValueError``, a missing file, a missing optional package, an output
folder that cannot be written) end with one line ``lln CMD: error: ...`` and exit code 2;
Ctrl-C ends with one line and exit code 130. ``--debug`` (before or after the command)
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib

#: subcommand name -> module implementing it.
COMMANDS: dict[str, str] = {
    "demo": "lln.demo",
    "bench": "lln.bench.command",
    "train": "lln.train.command",
    "results": "lln.train.results",
    "calibrate": "lln.analysis.cli_calibrate",
    "sweep": "lln.analysis.cli_sweep",
    "analyze": "lln.analysis.cli_analyze",
    "convert": "lln.hf.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lln", description="Linear Log-Normal attention: demos and tools."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # an optional extra is not installed
            command = sub.add_parser(name, help=f"(unavailable: {error})")
            command.set_defaults(_run=_unavailable(error), _unavailable=True)
            continue
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
        command.set_defaults(_run=module.run)
    return parser


def _unavailable(error: ImportError):
    """The run function of a command whose module could not be imported."""

    def run(args: argparse.Namespace) -> None:
        raise ImportError(f"{error} (install the extra it belongs to, e.g. "
                          "pip install 'lln[hf,plot]')")

    return run


#: Errors reported as one line with exit code 2: bad options (ValueError), missing files,
#: folders that cannot be written (PermissionError, IsADirectoryError...), missing optional
#: packages or data (ImportError, ModuleNotFoundError). Anything else is a bug: traceback.
USAGE_ERRORS = (ValueError, ImportError, FileNotFoundError, PermissionError, IsADirectoryError,
                NotADirectoryError, FileExistsError)


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._argv = [a for a in argv if a != "--debug"]
    try:
        args._run(args)
    except USAGE_ERRORS as error:
        if args.debug:
            raise
        # bad options or missing optional data/packages: one clear line, not a traceback
        message = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
        parser.exit(2, f"lln {args.command}: error: {message}\n")
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, f"\nlln {args.command}: interrupted\n")


if __name__ == "__main__":
    main()
