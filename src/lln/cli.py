"""The ``lln`` command line. ``lln --help`` lists the subcommands."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lln", description="Linear Log-Normal attention: demos and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="LLN+Diag vs softmax attention on random data: agreement, time, memory"
    )
    demo.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192],
                      help="sequence lengths to time (default: 1024 4096 8192)")
    demo.add_argument("--heads", type=int, default=12)
    demo.add_argument("--dim", type=int, default=64, help="head dim")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(tuple(args.lengths), heads=args.heads, dim=args.dim, seed=args.seed)


if __name__ == "__main__":
    main()
