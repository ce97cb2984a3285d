"""User-facing errors.

Every error a user can cause (a malformed spec, a missing file, a checkpoint that does not fit its
spec) is a subclass of `HrmspecError`. The CLI prints `str(error)` and exits 2; only `--debug`
shows a traceback. Messages follow one shape::

    specs/tiny.yaml:12:5: model.modules.L.layers: expected a positive integer, found 'four'
      hint: did you mean 'layers'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class HrmspecError(Exception):
    """Base class of errors caused by user input; the CLI reports them without a traceback."""


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file position (1-based) or a command-line override."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.col}"
        return self.file


class SpecError(HrmspecError):
    """A spec that cannot be loaded: names the place, the field, what was expected and found."""

    def __init__(self, message: str, loc: Location | None = None, path: str = "", hint: str = ""):
        self.message, self.loc, self.path, self.hint = message, loc, path, hint
        where = f"{loc}: " if loc is not None else ""
        field = f"{path}: " if path else ""
        text = f"{where}{field}{message}"
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


MAX_PROBLEMS = 20  # reported at once; more would bury the first ones


class SpecProblems(SpecError):
    """Several problems of one spec, reported together (each on its own line, with its place)."""

    def __init__(self, problems: list[SpecError]):
        self.problems = problems
        shown = problems[:MAX_PROBLEMS]
        more = f"\n(and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        count = f"{len(problems)} problems:\n" if len(problems) > 1 else ""
        HrmspecError.__init__(self, count + "\n".join(str(p) for p in shown) + more)
        self.message, self.loc, self.path, self.hint = str(self), None, "", ""


class Gather:
    """The errors of a section's independent parts, reported together: `gather(part, stand_in)` runs `part`;
    when it fails, its error is kept and `stand_in` returned, so the parts after it are still checked.
    `done()` raises what was kept: the one error, or all of them in the order of the file."""

    def __init__(self):
        self.errors: list[SpecError] = []

    def __call__(self, part, stand_in=None):
        try:
            return part()
        except SpecProblems as e:
            self.errors.extend(e.problems)
        except SpecError as e:
            self.errors.append(e)
        return stand_in

    def ran(self, part) -> bool:
        """Run `part`; whether it ran without a problem (its problem is kept)."""
        return self(lambda: part() or True, False)

    def done(self) -> None:
        """Raise what was kept: one problem per place (a second one there follows from the first), in the
        order of each file (files in the order their first problem was found), unplaced ones last."""
        kept, places = [], set()
        for e in self.errors:
            place = (e.loc.file, e.loc.line, e.loc.col) if e.loc is not None and e.loc.line else None
            if place is None or place not in places:
                kept.append(e)
                places.add(place)
        files = list(dict.fromkeys(e.loc.file for e in kept if e.loc is not None and e.loc.line))

        def where(e: SpecError):
            placed = e.loc is not None and e.loc.line
            return (files.index(e.loc.file), e.loc.line, e.loc.col) if placed else (len(files), 0, 0)

        kept.sort(key=where)
        if len(kept) == 1:
            raise kept[0]
        if kept:
            raise SpecProblems(kept)


class CheckpointError(HrmspecError):
    """A checkpoint that is missing, corrupt or does not match its spec."""


class KernelError(HrmspecError):
    """A kernel that cannot run on the given tensors (too wide, wrong device, bad output buffer)."""


def close_match(name: str, choices: Iterable[str]) -> str:
    """A 'did you mean' hint for a misspelt name, or '' when nothing is close. A choice that differs only
    in case wins ('z_h' -> 'z_H', not 'z_L'), then difflib's closest."""
    choices = [str(c) for c in choices]
    folded = [c for c in choices if c.casefold() == str(name).casefold() and c != str(name)]
    found = folded or difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    return f"did you mean '{found[0]}'?" if found else ""
