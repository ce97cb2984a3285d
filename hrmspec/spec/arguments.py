"""The command-line arguments every spec-reading command shares: the spec, and `--set` overrides."""

from __future__ import annotations

import argparse

from hrmspec.spec.load import load_spec
from hrmspec.spec.schema import Spec
from hrmspec.spec.source import parse_override


def spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a spec file (YAML) or a shipped spec's name, e.g. hrm-text-tiny")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec value; VALUE is YAML (e.g. --set model.d_model=256 --set 'data.tasks=[gcd]')",
    )


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text[:20]!r}")
    return v


def spec_from_arguments(args: argparse.Namespace) -> Spec:
    """The spec `args.spec` names, with its `--set` overrides applied."""
    return load_spec(args.spec, dict(parse_override(o) for o in args.overrides))


__all__ = ["positive_int", "spec_arguments", "spec_from_arguments"]
