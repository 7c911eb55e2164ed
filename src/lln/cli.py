"""The ``lln`` command line. ``lln --help`` lists the subcommands.

Each subcommand lives in its own module, which defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args)``; heavy imports happen inside ``run`` so that
``lln --help`` stays fast. Add a command by adding one line to :data:`COMMANDS`.
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
        command.set_defaults(_run=module.run)
    return parser


def _unavailable(error: ImportError):
    """The run function of a command whose module could not be imported."""

    def run(args: argparse.Namespace) -> None:
        raise ModuleNotFoundError(str(error))

    return run


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args._run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        # bad options or missing optional data/packages: one clear line, not a traceback
        parser.exit(2, f"lln {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
