"""`juicefs-fsm` command line: `run` (the daemon), control-socket clients, `diagram`, `demo`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="juicefs-fsm",
        description="Controller for a JuiceFS volume with Litestream-replicated SQLite metadata.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    diagram = sub.add_parser("diagram", help="draw the state chart (Mermaid to stdout by default)")
    diagram.add_argument("--format", choices=["mermaid", "dot", "svg", "png"], default="mermaid")
    diagram.add_argument("--output", "-o", default="-", help="file to write, '-' for stdout")
    diagram.add_argument("--base-dir", help="highlight the current state of the daemon there")

    demo = sub.add_parser("demo", help="a local-mode walk through start, write, checkpoint, "
                                       "change, restore, stop")
    demo.add_argument("--base-dir", help="where to put the demo volume (default: a temp dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "diagram":
        from .diagram import command as diagram_command

        return diagram_command(args)
    from .demo import command as demo_command

    return demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
