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


def spec_from_arguments(args: argparse.Namespace) -> Spec:
    """The spec `args.spec` names, with its `--set` overrides applied."""
    return load_spec(args.spec, dict(parse_override(o) for o in args.overrides))


__all__ = ["spec_arguments", "spec_from_arguments"]
