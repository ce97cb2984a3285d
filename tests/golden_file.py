"""Single golden files: one generated text each, under tests/golden/, compared byte for byte.

`HRMSPEC_UPDATE_GOLDEN=1` rewrites the files that differ (as it does the snapshots of tests/test_golden.py);
review the diff with `git diff tests/golden` before committing.
"""

import difflib
import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("HRMSPEC_UPDATE_GOLDEN", "0") not in ("", "0")
DIFF_LINES = 40


def check_golden(name: str, text: str) -> None:
    """`text` is what tests/golden/`name` holds; with HRMSPEC_UPDATE_GOLDEN=1 it is written there first."""
    path = GOLDEN / name
    if UPDATE_GOLDEN and (not path.is_file() or path.read_bytes() != text.encode()):
        path.write_bytes(text.encode())
    assert path.is_file(), f"{path} is missing; generate it with HRMSPEC_UPDATE_GOLDEN=1"
    golden = path.read_bytes().decode()
    if text != golden:
        diff = list(difflib.unified_diff(golden.splitlines(), text.splitlines(), f"{name} (golden)",
                                         f"{name} (generated)", lineterm=""))
        raise AssertionError("\n".join([f"tests/golden/{name} differs from the generated text; if the change is "
                                        "intended, regenerate it with HRMSPEC_UPDATE_GOLDEN=1:",
                                        *diff[:DIFF_LINES]]))
