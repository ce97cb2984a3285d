"""The generated source of every kernel a spec needs, as files.

The kernels are those of the fusion plan, `fuse_model(build_graph(spec)).kernels`: every fused
region, forward and backward. The runtime runs exactly the plan's regions, so these are the
kernels that run. For one target `kernel_files` returns, as {relative file name: text}:

    kernels/<kernel name>.<suffix>   the source of one kernel
    kernels.json                     the manifest: per kernel its name, direction, region kind, row
                                     width, inputs, outputs, the regions it runs in ("L: 0.rope",
                                     "H: inject+0.attn_norm") and its source file

The targets (`TARGETS`) are the backends of the registry that print kernels (`emit` of a
`hrmspec.backends.Backend`):

    triton   .py  an importable module per kernel (backends/triton/printer.py); storage types
                  are not part of the source, they come with the pointers at launch
    cuda     .cu  CUDA C (backends/cstyle/printer.py), bf16 storage: what NVRTC compiles for
                  sm_80 / sm_90 (`backends/cstyle/nvrtc.py`)
    opencl   .cl  OpenCL C (the same printer), f32 storage: what the opencl backend runs on PoCL

A C-style source is specialised for its storage types and its threads per row, so it is printed
for the target's storage type (row partials of vector gradients in f32, as the launchers store
them) and `block_size(width)` threads at the spec's row width; the manifest records both (the
printer's `specialisation`).

`hrmspec compile SPEC --backend B --emit DIR` writes `kernel_files(spec_kernels(spec), B)` under
DIR. The golden snapshots (tests/test_golden.py) pin `snapshot_files(spec)` of every shipped spec,
as paths relative to tests/golden/, each distinct source stored once for all specs:

    kernels/triton/<kernel>.py.golden            Triton: the source depends on the program only
    kernels/<cuda|opencl>/<kernel>.b<block>.<cu|cl>.golden
                                                 C: on the program and the threads per row (the
                                                 storage type is the target's)
    specs/<spec>/<target>.json                   the spec's manifest for the target: the entries
                                                 of kernels.json, with "golden" (the shared file)
                                                 in place of "source"

A kernel's name carries a hash of its program, so specs that need the same program at the same
threads per row share its file (`Target.snapshot_file`); the test fails if two specs print different
text under one name. The `.golden` suffix keeps the snapshots out of imports, linters and builds:
they are expected output, not source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hrmspec.backends import REGISTRY, EmitTarget
from hrmspec.graph.build import build_graph
from hrmspec.graph.fusion import KernelInfo, fuse_model
from hrmspec.spec.load import load_spec

MANIFEST = "kernels.json"
GOLDEN_SUFFIX = ".golden"


@dataclass(frozen=True)
class Target:
    """Where the generated kernels of backend `name` go, and how they are printed (`emit`)."""

    name: str
    emit: EmitTarget

    @property
    def suffix(self) -> str:
        return self.emit.suffix

    @cached_property
    def printer(self):
        return self.emit.load()

    def specialisation(self, kernel: KernelInfo) -> dict[str, Any]:
        """What the source depends on besides the program and the target: {} for Triton, the storage
        type and the threads per row for a C dialect."""
        return self.printer.specialisation(kernel.width)

    def source_file(self, kernel: KernelInfo) -> str:
        """Where `hrmspec compile --emit` writes the kernel's source."""
        return f"kernels/{kernel.name}{self.suffix}"

    def variant(self, kernel: KernelInfo) -> str:
        """What the source depends on besides the program (whose hash the name carries) and the target:
        nothing for Triton, the threads per row for a C dialect (".b64")."""
        block = self.specialisation(kernel).get("block")
        return "" if block is None else f".b{block}"

    def snapshot_file(self, kernel: KernelInfo) -> str:
        """The golden file of the kernel's source, relative to tests/golden/, shared by every spec that needs it."""
        return f"kernels/{self.name}/{kernel.name}{self.variant(kernel)}{self.suffix}{GOLDEN_SUFFIX}"

    def render(self, kernel: KernelInfo) -> str:
        return self.printer.source(kernel.program, kernel.name, kernel.width)


TARGETS = {b.name: Target(b.name, b.emit) for b in REGISTRY.values() if b.emit is not None}


def spec_kernels(spec) -> list[KernelInfo]:
    """The kernels spec needs, in the fusion plan's order; `spec` is a Spec, a path or a shipped spec's name."""
    return fuse_model(build_graph(load_spec(spec))).kernels


def manifest_entry(kernel: KernelInfo, target: Target, golden: bool = False) -> dict[str, Any]:
    """The kernel's entry of kernels.json; with `golden`, that of a spec's golden manifest, which names
    the shared golden file ("golden") rather than the emitted one ("source")."""
    entry = {
        "kernel": kernel.name,
        "direction": kernel.direction,
        "region": kernel.forward.name,
        "width": kernel.width,
        "inputs": list(kernel.program.input_names),
        "outputs": list(kernel.program.output_names),
        "runs_in": list(kernel.regions),
        "source": target.source_file(kernel),
    }
    entry.update(target.specialisation(kernel))
    if golden:
        del entry["source"]
        entry["golden"] = target.snapshot_file(kernel)
    return entry


def kernel_files(kernels: list[KernelInfo], target: str) -> dict[str, str]:
    """The source of each kernel for `target` (a key of TARGETS) and the manifest; see the module docstring."""
    if target not in TARGETS:
        raise ValueError(f"no generated kernels for target '{target}'; targets: {', '.join(TARGETS)}")
    t = TARGETS[target]
    files = {t.source_file(k): t.render(k) for k in kernels}
    manifest = [manifest_entry(k, t) for k in kernels]
    files[MANIFEST] = json.dumps(manifest, indent=1) + "\n"
    return files


def snapshot_files(spec) -> dict[str, str]:
    """The golden files of `spec`, by their path relative to tests/golden/: the source of each of its
    kernels for every target (shared with the other specs) and its manifest per target; see the module
    docstring."""
    spec = load_spec(spec)
    kernels = spec_kernels(spec)
    files = {}
    for name, t in TARGETS.items():
        files.update({t.snapshot_file(k): t.render(k) for k in kernels})
        manifest = [manifest_entry(k, t, golden=True) for k in kernels]
        files[f"specs/{spec.name}/{name}.json"] = json.dumps(manifest, indent=1) + "\n"
    return files


def write_files(out: Path, files: Mapping[str, str], what: str = "--emit") -> None:
    """Write each file under `out`, creating folders; UTF-8 with "\\n" line ends on every platform. Each file
    is written through a temp file renamed over it, so a link in its place is replaced, never followed; a
    link in place of a folder, `out` that is a file, a checkpoint or a run folder, or a folder that cannot
    be written is one line naming it (runtime/artifacts/files.py)."""
    from hrmspec.runtime.artifacts.files import atomic_write, output_folder, refuse_link, writing

    out = output_folder(out, what)
    with writing(out):
        for name, text in files.items():
            path = out / name
            for folder in reversed(path.relative_to(out).parents[:-1]):  # kernels/, ... below `out`
                refuse_link(out / folder)
                (out / folder).mkdir(exist_ok=True)
            data = text.encode("utf-8")
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))


__all__ = ["GOLDEN_SUFFIX", "MANIFEST", "TARGETS", "Target", "kernel_files", "manifest_entry", "snapshot_files",
           "spec_kernels", "write_files"]
