"""The `hrmspec` command line (also `python -m hrmspec`).

User errors (a malformed spec, a missing file, a checkpoint that does not fit) print one clear
message and exit 2; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hrmspec.cli import data, interop, runs, spec
from hrmspec.errors import HrmspecError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hrmspec",
        description="Compile, inspect and train Hierarchical Recurrent Models written as YAML specs.",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for group in (spec, runs, interop, data):  # spec commands, runs (train, eval, generate, ...), conversions, data
        for name, register in group.COMMANDS:
            register(sub, name)
    return parser


MAX_MESSAGE = 2000  # characters of an error message printed: a value echoed from a hostile file stays short


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with control characters (escape sequences, bells) and lone surrogates escaped, lines kept, and
    cut to `limit` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit:,} characters more)"
    return "\n".join("".join(ch if ch.isprintable() and not "\ud800" <= ch <= "\udfff" else repr(ch)[1:-1]
                              for ch in line) for line in text.split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HrmspecError as e:
        if args.debug:
            raise
        code = getattr(e, "exit_code", None)  # a run stopped by a signal: 128 + its number, not an error
        text = printable(str(e))
        print(f"hrmspec: {text}" if code else f"hrmspec: error: {text}", file=sys.stderr)
        return code or EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hrmspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
