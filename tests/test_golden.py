"""Golden snapshots: the generated source of every kernel the shipped specs need.

tests/golden/specs/<spec>/ holds `snapshot_files(spec)` (hrmspec/emit.py): for each target
(triton/, cuda/, opencl/) the source of every kernel of the spec's fusion plan and a manifest
(kernels.json). Any change of the IR, the fusion plan, a printer or a dialect table shows here as a
diff. After an intended change, regenerate the snapshots (stale files are deleted) and review the
diff with git:

    HRMSPEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
    git status tests/golden/specs && git diff tests/golden/specs
"""

import difflib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hrmspec.cli import main
from hrmspec.emit import TARGETS, snapshot_files, spec_kernels, write_files
from hrmspec.spec import shipped_specs_dir

GOLDEN = Path(__file__).parent / "golden" / "specs"
UPDATE = os.environ.get("HRMSPEC_UPDATE_GOLDEN", "0") not in ("", "0")
REGENERATE = "HRMSPEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py"
SPECS = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))
DIFF_LINES = 40  # of unified diff in a failure message
LISTED = 10  # file names listed per kind of problem


@functools.cache
def generated(spec: str) -> dict[str, str]:
    return snapshot_files(spec)


def on_disk(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by its path relative to it."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes().decode("utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def update(folder: Path, want: dict[str, str]) -> None:
    """Make `folder` hold exactly `want`: write what differs, delete the rest, then empty folders."""
    have = on_disk(folder)
    write_files(folder, {name: text for name, text in want.items() if have.get(name) != text})
    for name in set(have) - set(want):
        (folder / name).unlink()
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def _listing(title: str, names: list[str]) -> list[str]:
    """`title (n):` and the first LISTED names, one a line; nothing when there are none."""
    if not names:
        return []
    more = [f"  ... and {len(names) - LISTED} more"] if len(names) > LISTED else []
    return [f"{title} ({len(names)}):"] + [f"  {n}" for n in names[:LISTED]] + more


def _diff_excerpt(folder: Path, changed: list[str], have: dict[str, str], want: dict[str, str]) -> list[str]:
    """The unified diff golden -> generated of the changed files, cut after DIFF_LINES lines."""
    lines: list[str] = []
    for name in changed:
        rel = (folder / name).relative_to(Path(__file__).parent.parent).as_posix()
        lines += difflib.unified_diff(have[name].splitlines(), want[name].splitlines(), f"{rel} (golden)",
                                      f"{rel} (generated)", lineterm="")
        if len(lines) >= DIFF_LINES:
            return lines[:DIFF_LINES] + ["..."]
    return lines


@pytest.mark.parametrize("spec", SPECS)
def test_kernel_sources_match_the_golden_files(spec):
    folder, want = GOLDEN / spec, generated(spec)
    if UPDATE:
        update(folder, want)
    have = on_disk(folder)
    missing = sorted(set(want) - set(have))
    stale = sorted(set(have) - set(want))
    changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
    if not (missing or stale or changed):
        return
    message = [f"the generated kernels of spec '{spec}' differ from tests/golden/specs/{spec}/:"]
    message += _listing("changed", changed)
    message += _listing("missing from the golden folder", missing)
    message += _listing("stale (no longer generated)", stale)
    message += _diff_excerpt(folder, changed, have, want)
    message += ["", f"If the change is intended, regenerate the golden files with\n    {REGENERATE}\n"
                "and review the result with `git status tests/golden/specs` and `git diff tests/golden/specs`."]
    pytest.fail("\n".join(message), pytrace=False)


def test_every_golden_folder_belongs_to_a_shipped_spec():
    extra = sorted(p.name for p in GOLDEN.iterdir() if p.name not in SPECS) if GOLDEN.is_dir() else []
    if UPDATE:
        for name in extra:
            path = GOLDEN / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    if extra:
        pytest.fail(f"tests/golden/specs/ holds {extra}, which no shipped spec generates; delete them with\n"
                    f"    {REGENERATE}", pytrace=False)


def test_the_snapshot_holds_every_kernel_once_per_target():
    spec = SPECS[0]
    kernels, files = spec_kernels(spec), generated(spec)
    names = [k.name for k in kernels]
    assert len(set(names)) == len(names)
    for target in TARGETS:
        sources = sorted(n for n in files if n.startswith(f"{target}/kernels/"))
        assert sources == sorted(f"{target}/kernels/{n}{TARGETS[target].suffix}" for n in names)
        manifest = json.loads(files[f"{target}/kernels.json"])
        assert [e["kernel"] for e in manifest] == names
        assert all(e["runs_in"] and f"{target}/{e['source']}" in files for e in manifest)


def _digests(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def test_generation_is_deterministic():
    for spec in SPECS:
        differ = _differing(_digests(snapshot_files(spec)), _digests(generated(spec)))
        assert not differ, f"{spec}: two runs generate different files: {differ}"


DIGESTS = """
import hashlib, json
from hrmspec.emit import snapshot_files
for spec in json.loads(input()):
    print(json.dumps({n: hashlib.sha256(t.encode()).hexdigest() for n, t in snapshot_files(spec).items()}))
"""


def test_generation_does_not_depend_on_the_hash_seed():
    # the order of sets (and of dicts filled from them) of strings changes with the hash seed, from
    # one process to the next; the snapshots must not (golden files written on one machine are
    # compared on another)
    env = {**os.environ, "PYTHONHASHSEED": "1234"}
    run = subprocess.run([sys.executable, "-c", DIGESTS], input=json.dumps(SPECS), capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    for spec, line in zip(SPECS, run.stdout.splitlines(), strict=True):
        differ = _differing(json.loads(line), _digests(generated(spec)))
        assert not differ, f"{spec}: these files differ in a process with another hash seed: {differ}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")
def test_compile_emit_writes_the_golden_files_of_its_backend(tmp_path):
    # what `hrmspec compile --backend triton --emit DIR` writes is what the snapshot holds in triton/
    spec = "hrm-text-tiny"
    assert main(["compile", spec, "--backend", "triton", "--emit", str(tmp_path)]) == 0
    written = {n: t for n, t in on_disk(tmp_path).items() if n not in ("spec.yaml", "graph.json")}
    assert written == {n.removeprefix("triton/"): t for n, t in generated(spec).items() if n.startswith("triton/")}
