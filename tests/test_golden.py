"""Golden snapshots: the generated source of every kernel the shipped specs need.

tests/golden/ holds `snapshot_files(spec)` (hrmspec/emit.py) of every shipped spec and of the
variant specs in tests/golden/variants/ (block kinds and norms the shipped specs do not use), each
distinct kernel source once:

    kernels/<target>/<kernel>[.b<block>].<py|cu|cl|c>.golden   one source, shared by the specs that need it
    specs/<spec>/<target>.json                               the spec's manifest: its kernels, their golden files

Any change of the IR, the fusion plan, a printer or a dialect table shows here as a diff. After an
intended change, regenerate the snapshots (stale files are deleted) and review the diff with git:

    HRMSPEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
    git status tests/golden && git diff tests/golden
"""

import difflib
import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hrmspec.cli import main
from hrmspec.emit import GOLDEN_SUFFIX, MANIFEST, TARGETS, kernel_files, snapshot_files, spec_kernels, write_files
from hrmspec.spec import shipped_specs_dir

GOLDEN = Path(__file__).parent / "golden"
FOLDERS = ("kernels", "specs")  # what the snapshots own under GOLDEN (README.md and the single kernels are not theirs)
UPDATE = os.environ.get("HRMSPEC_UPDATE_GOLDEN", "0") not in ("", "0")
REGENERATE = "HRMSPEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py"
REVIEW = "review the result with `git status tests/golden` and `git diff tests/golden`."
# spec name -> what load_spec reads: a shipped spec's name, or a variant's file
SOURCES = {p.stem: p.stem for p in shipped_specs_dir().glob("*.yaml")}
SOURCES |= {p.stem: str(p) for p in (GOLDEN / "variants").glob("*.yaml")}
SPECS = sorted(SOURCES)
DIFF_LINES = 40  # of unified diff in a failure message
LISTED = 10  # file names listed per kind of problem


@functools.cache
def generated(spec: str) -> dict[str, str]:
    return snapshot_files(SOURCES[spec])


def merge(snapshots: dict[str, dict[str, str]]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The union of the specs' files, and the files two specs generate with different text, as
    {file: {spec: text}} for every spec that generates it (a bug: the file name misses something its
    source depends on)."""
    texts: dict[str, dict[str, str]] = {}
    for spec, files in snapshots.items():
        for name, text in files.items():
            texts.setdefault(name, {})[spec] = text
    tree = {name: next(iter(by_spec.values())) for name, by_spec in texts.items()}
    conflicts = {name: by_spec for name, by_spec in texts.items() if len(set(by_spec.values())) > 1}
    return tree, conflicts


@functools.cache
def generated_tree() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    return merge({spec: generated(spec) for spec in SPECS})


def read(name: str) -> str | None:
    path = GOLDEN / name
    return path.read_bytes().decode("utf-8") if path.is_file() else None


def on_disk() -> dict[str, str]:
    """Every file of the snapshots (under GOLDEN/kernels and GOLDEN/specs), by its path relative to GOLDEN."""
    return {p.relative_to(GOLDEN).as_posix(): p.read_bytes().decode("utf-8")
            for folder in FOLDERS for p in sorted((GOLDEN / folder).rglob("*")) if p.is_file()}


def _listing(title: str, names: list[str]) -> list[str]:
    """`title (n):` and the first LISTED names, one a line; nothing when there are none."""
    if not names:
        return []
    more = [f"  ... and {len(names) - LISTED} more"] if len(names) > LISTED else []
    return [f"{title} ({len(names)}):"] + [f"  {n}" for n in names[:LISTED]] + more


def _diff(a: str, b: str, a_name: str, b_name: str) -> list[str]:
    return list(difflib.unified_diff(a.splitlines(), b.splitlines(), a_name, b_name, lineterm=""))


def _cut(lines: list[str]) -> list[str]:
    return lines[:DIFF_LINES] + ["..."] if len(lines) > DIFF_LINES else lines


@pytest.mark.parametrize("spec", SPECS)
def test_kernel_sources_match_the_golden_files(spec):
    # the spec's manifests and the (shared) source of each of its kernels
    want = generated(spec)
    if UPDATE:
        write_files(GOLDEN, {name: text for name, text in want.items() if read(name) != text})
    have = {name: text for name in want if (text := read(name)) is not None}
    missing = sorted(set(want) - set(have))
    changed = sorted(n for n in have if want[n] != have[n])
    if not (missing or changed):
        return
    message = [f"the generated kernels of spec '{spec}' differ from tests/golden/:"]
    message += _listing("changed", changed)
    message += _listing("missing from tests/golden/", missing)
    diff: list[str] = []
    for name in changed:
        diff += _diff(have[name], want[name], f"tests/golden/{name} (golden)", f"tests/golden/{name} (generated)")
    message += _cut(diff)
    message += ["", f"If the change is intended, regenerate the golden files with\n    {REGENERATE}\nand {REVIEW}"]
    pytest.fail("\n".join(message), pytrace=False)


def _groups(texts: dict[str, str]) -> list[tuple[list[str], str]]:
    """The specs that generate each distinct text, in the order of the specs: [(specs, text)]."""
    groups: dict[str, list[str]] = {}
    for spec, text in texts.items():
        groups.setdefault(text, []).append(spec)
    return [(specs, text) for text, specs in groups.items()]


def test_specs_agree_on_every_shared_file():
    # a shared file name stands for one source: if two specs print different text under it, its name
    # misses something the source depends on (Target.variant in hrmspec/emit.py)
    _, conflicts = generated_tree()
    if not conflicts:
        return
    message = ["specs generate different text under the same golden file name; the name must carry everything "
               "the source depends on (see Target.variant and Target.snapshot_file in hrmspec/emit.py):"]
    message += _listing("conflicting (specs grouped by the text they generate)",
                        [f"{name}: {' | '.join(', '.join(specs) for specs, _ in _groups(texts))}"
                         for name, texts in sorted(conflicts.items())])
    name, texts = min(conflicts.items())
    (a, a_text), (b, b_text) = [(specs[0], text) for specs, text in _groups(texts)[:2]]
    message += _cut(_diff(a_text, b_text, f"{name} (spec {a})", f"{name} (spec {b})"))
    pytest.fail("\n".join(message), pytrace=False)


def test_a_conflict_between_specs_is_found():
    tree, conflicts = merge({"a": {"f": "x", "g": "1"}, "b": {"f": "y", "g": "1"}, "c": {"f": "x"}})
    assert tree == {"f": "x", "g": "1"}
    assert conflicts == {"f": {"a": "x", "b": "y", "c": "x"}}


def test_no_stale_golden_files():
    # stale: a shared kernel no spec uses any more, a manifest of a target or a spec that is gone
    tree, _ = generated_tree()
    stale = sorted(set(on_disk()) - set(tree))
    if UPDATE:
        for name in stale:
            (GOLDEN / name).unlink()
        for folder in FOLDERS:
            dirs = [p for p in (GOLDEN / folder).rglob("*") if p.is_dir()]
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
        return
    if stale:
        message = ["tests/golden/ holds files that no shipped spec generates any more:"]
        message += _listing("stale", stale)
        message += ["", f"If that is intended, delete them with\n    {REGENERATE}\nand {REVIEW}"]
        pytest.fail("\n".join(message), pytrace=False)


@pytest.mark.parametrize("spec", SPECS)
def test_the_snapshot_holds_every_kernel_once_per_target(spec):
    kernels, files = spec_kernels(SOURCES[spec]), generated(spec)
    names = [k.name for k in kernels]
    assert len(set(names)) == len(names)
    manifests = {f"specs/{spec}/{target}.json" for target in TARGETS}
    assert manifests <= set(files)
    for target, t in TARGETS.items():
        manifest = json.loads(files[f"specs/{spec}/{target}.json"])
        assert [e["kernel"] for e in manifest] == names
        assert all(e["runs_in"] and "source" not in e for e in manifest)
        golden = [e["golden"] for e in manifest]
        assert sorted(golden) == sorted(n for n in files if n.startswith(f"kernels/{target}/"))
        variants = [f".b{e['block']}" if "block" in e else "" for e in manifest]
        assert golden == [f"kernels/{target}/{n}{v}{t.suffix}{GOLDEN_SUFFIX}" for n, v in zip(names, variants)]
    assert len(files) == len(manifests) + len(TARGETS) * len(names)


def as_golden(spec: str, target: str, emitted: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """What `hrmspec compile --backend target --emit DIR` wrote (`emitted`, by path under DIR) next to the
    golden files it should equal, both keyed by golden file: each source under the name the spec's
    golden manifest gives its kernel, and the manifest with "source" for "golden"."""
    golden_manifest = json.loads(read(f"specs/{spec}/{target}.json") or "[]")
    manifest = json.loads(emitted[MANIFEST])
    assert [e["kernel"] for e in manifest] == [g["kernel"] for g in golden_manifest]
    assert set(emitted) == {MANIFEST} | {e["source"] for e in manifest}
    got = {g["golden"]: emitted[e["source"]] for e, g in zip(manifest, golden_manifest, strict=True)}
    want = {g["golden"]: read(g["golden"]) for g in golden_manifest}
    manifest = [{k: v for k, v in e.items() if k != "source"} | {"golden": g["golden"]}
                for e, g in zip(manifest, golden_manifest, strict=True)]
    got[f"specs/{spec}/{target}.json"] = json.dumps(manifest, indent=1) + "\n"
    want[f"specs/{spec}/{target}.json"] = json.dumps(golden_manifest, indent=1) + "\n"
    return got, want


@pytest.mark.parametrize("target", TARGETS)
def test_emitted_files_are_the_golden_ones(target):
    # kernel_files (what --emit writes: kernels/<name>.<suffix> + kernels.json) maps onto the golden files
    spec = "hrm-text-tiny"
    got, want = as_golden(spec, target, kernel_files(spec_kernels(spec), target))
    differ = [n for n in got if got[n] != want[n]]
    assert not differ, f"what --emit writes for {target} differs from these golden files: {differ}"


def _digests(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def test_generation_is_deterministic():
    for spec in SPECS:
        differ = _differing(_digests(snapshot_files(SOURCES[spec])), _digests(generated(spec)))
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
    run = subprocess.run([sys.executable, "-c", DIGESTS], input=json.dumps([SOURCES[s] for s in SPECS]),
                         capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    for spec, line in zip(SPECS, run.stdout.splitlines(), strict=True):
        differ = _differing(json.loads(line), _digests(generated(spec)))
        assert not differ, f"{spec}: these files differ in a process with another hash seed: {differ}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")
def test_compile_emit_writes_the_golden_files_of_its_backend(tmp_path):
    # what `hrmspec compile --backend triton --emit DIR` writes (DIR/kernels/<name>.py, DIR/kernels.json)
    # is, file for file through the golden manifest, what tests/golden/ holds
    spec = "hrm-text-tiny"
    assert main(["compile", spec, "--backend", "triton", "--emit", str(tmp_path)]) == 0
    written = {p.relative_to(tmp_path).as_posix(): p.read_bytes().decode("utf-8")
               for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    emitted = {n: t for n, t in written.items() if n not in ("spec.yaml", "graph.json")}
    got, want = as_golden(spec, "triton", emitted)
    differ = [n for n in got if got[n] != want[n]]
    assert not differ, f"what --emit wrote differs from these golden files: {differ}"
