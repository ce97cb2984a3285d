"""The commands that read a spec: validate, show, cost, compile, check.

They never import torch (`hrmspec validate` starts in a fraction of a second); `check` loads the
Triton interpreter when it runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import networkx as nx
import yaml
from rich.console import Console
from rich.table import Table

import hrmspec
from hrmspec.backends import REGISTRY, get_backend
from hrmspec.cost import (
    DEFAULT_MFU,
    MAX_GPUS,
    MAX_PRICE,
    MAX_SEQ_LEN,
    MAX_TOKENS,
    MIN_MFU,
    CostError,
    estimate,
    find_gpu,
    parse_count,
    parse_fraction,
    parse_positive,
    report,
    seq_len_and_source,
)
from hrmspec.emit import MANIFEST, TARGETS, kernel_files, spec_kernels, write_files
from hrmspec.errors import HrmspecError
from hrmspec.gpus import GPUS, get_gpu
from hrmspec.graph import build_graph
from hrmspec.graph.fusion import fuse_model
from hrmspec.graph.roofline import roofline
from hrmspec.runtime.artifacts import preflight
from hrmspec.show import roofline_table, show
from hrmspec.spec.arguments import positive_int
from hrmspec.spec.arguments import spec_arguments as _spec_args
from hrmspec.spec.arguments import spec_from_arguments as _load
from hrmspec.spec.schedule import MAX_REPEAT, sampled_loop
from hrmspec.spec.source import parse_override


def cmd_validate(args) -> int:
    """The whole spec: the model (the loader), then what a run would refuse (train:, data:, across sections)."""
    spec = _load(args)
    preflight.check(spec, preflight.source_of(args.spec, dict(parse_override(o) for o in args.overrides)), run=False)
    print(f"{spec.source}: ok ({spec.name})")
    return 0


DTYPE_BYTES = (1, 2, 4, 8)  # fp8, bf16, fp32, fp64
MAX_BATCH = 10**7  # rows per step, as train.batch_size


def _progress(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = math.nan
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise HrmspecError(f"--progress: expected a training progress in [0, 1], found {str(text)[:40]!r}")
    return v


def _recurrence(text: str | None, spec) -> int | None:
    """--recurrence N: at least 1 and at most what the spec's sampled loop may draw."""
    if text is None:
        return None
    loop = sampled_loop(spec.model.schedule)
    most = loop.sample.max if loop is not None else MAX_REPEAT
    return int(parse_positive(text, "--recurrence", integer=True, maximum=most))


def cmd_show(args) -> int:
    gpu = get_gpu(args.roofline) if args.roofline else None  # an unknown name fails before anything prints
    if args.json and gpu is None:
        raise HrmspecError("--json prints the roofline: give --roofline GPU as well (" + ", ".join(GPUS) + ")")
    # numbers are read here, so a bad one is one line (exit 2), never a negative memory or "progress nan"
    progress = _progress(args.progress)
    seq_len = int(parse_positive(args.seq_len, "--seq-len", integer=True, maximum=MAX_SEQ_LEN)) \
        if args.seq_len is not None else None
    dtype_bytes = int(parse_positive(args.dtype_bytes, "--dtype-bytes", integer=True, maximum=max(DTYPE_BYTES)))
    if dtype_bytes not in DTYPE_BYTES:
        raise HrmspecError(f"--dtype-bytes: expected one of {', '.join(map(str, DTYPE_BYTES))}, found {dtype_bytes}")
    batch = int(parse_positive(args.batch, "--batch", integer=True, maximum=MAX_BATCH))
    spec = _load(args)
    G = build_graph(spec, progress, recurrence=_recurrence(args.recurrence, spec))
    # the row `hrmspec cost` counts attention at: a grid's cells and puzzle positions, else train.seq_len, else
    # model.max_seq_len
    seq_len, seq_source = (seq_len, "--seq-len") if seq_len is not None else seq_len_and_source(spec)
    if gpu is not None:
        r = roofline(G, gpu, batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes)
        if args.json:
            print(json.dumps(r.as_dict(), indent=1))
            return 0
    show(G, seq_len=seq_len, dtype_bytes=dtype_bytes, seq_source=seq_source)
    if gpu is not None:
        roofline_table(r, _wide_console())
    if args.png:
        from hrmspec.graph.draw import draw_schedule

        draw_schedule(G, args.png)
        print(f"wrote {args.png}")
    return 0


def cmd_cost(args) -> int:
    if args.tokens is None:
        raise CostError("--tokens is required: the training tokens, e.g. --tokens 40B")
    tokens = parse_count(args.tokens, "--tokens", maximum=MAX_TOKENS)
    gpu = find_gpu(args.gpu)
    mfu = parse_fraction(args.mfu, "--mfu", minimum=MIN_MFU) if args.mfu is not None else DEFAULT_MFU
    gpus = int(parse_positive(args.gpus, "--gpus", integer=True, maximum=MAX_GPUS))
    price = parse_positive(args.price, "--price", maximum=MAX_PRICE) if args.price is not None else None
    seq_len = int(parse_positive(args.seq_len, "--seq-len", integer=True, maximum=MAX_SEQ_LEN)) \
        if args.seq_len is not None else None
    spec = _load(args)
    e = estimate(spec, tokens, gpu, mfu, gpus, price, seq_len)
    if args.json:
        try:  # standard JSON only: never NaN or Infinity
            print(json.dumps(e.to_dict(), allow_nan=False))
        except ValueError:
            raise CostError(f"the estimate of {spec.name} is not a finite number: check --tokens, --mfu and "
                            "--seq-len") from None
        return 0
    t = Table(title=f"Training cost of {spec.name}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for row in report(e, gpu, spec.model.credit):
        t.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    return 0


def cmd_compile(args) -> int:
    spec = _load(args)
    try:
        model = hrmspec.compile(spec, backend=args.backend)
        print(f"{spec.name}: compiled for backend '{args.backend}', {model.num_parameters():,} parameters")
    except HrmspecError as e:
        if not args.emit:
            raise
        # writing the source needs no device: emit for a backend this machine cannot run
        print(f"note: backend '{args.backend}' cannot run here ({e}); writing its source only")
        model = hrmspec.compile(spec, backend="reference")
    if args.emit:
        out = Path(args.emit)
        data = nx.node_link_data(model.graph, edges="edges")
        data["graph"] = {k: v for k, v in data["graph"].items() if isinstance(v, (str, int, float, type(None)))}
        write_files(out, {"spec.yaml": yaml.safe_dump(spec.raw, sort_keys=False),
                          "graph.json": json.dumps(data, indent=1, default=str)})  # links replaced, never followed
        print(f"wrote {out}/spec.yaml, {out}/graph.json")
        _emit_kernels(spec, args.backend, out)
    return 0


def _emit_kernels(spec, backend: str, out) -> None:
    """The source of every kernel the spec needs on `backend` (its fusion regions, forward and
    backward) as DIR/kernels/<name>.<suffix>, and DIR/kernels.json indexing them: the
    files the golden snapshots pin (hrmspec/emit.py). A backend without an emit target (the
    reference) generates no kernels."""
    if backend not in TARGETS:
        return
    kernels = spec_kernels(spec)
    write_files(out, kernel_files(kernels, backend))
    print(f"wrote {len(kernels)} kernels to {out}/kernels/ (index: {out}/{MANIFEST})")


def cmd_check(args) -> int:
    spec = _load(args)
    get_backend("triton")  # the kernels checked; without a GPU: the interpreter, chosen before triton is imported
    from hrmspec.check import ARCHS, check_kernels, ptxas_available, report

    console = _wide_console()
    plan = fuse_model(build_graph(spec))
    archs = tuple(args.arch or ARCHS)
    compile_ = not args.no_compile and ptxas_available()
    if not args.no_compile and not compile_:
        console.print("[yellow]no ptxas in this triton build: the sm_80 / sm_90 compile is skipped[/yellow]")
    checks = check_kernels(plan.kernels, draws=args.draws, archs=archs if compile_ else ())
    report(checks, archs, console, title=f"{spec.name}: {len(checks)} kernels ({args.draws} draws each)")
    failed = [c.kernel.name for c in checks if not c.ok]
    if failed:
        console.print(f"[red]{len(failed)} of {len(checks)} kernels failed:[/red] {', '.join(failed)}")
        return 1
    fallbacks = sum(bool(c.fallback) for c in checks)
    note = f" ({fallbacks} run the reference op: too wide for a one-block kernel)" if fallbacks else ""
    console.print(f"[green]all {len(checks)} kernels ok[/green]{note}")
    return 0



def _register_validate(sub, name: str) -> None:
    p = sub.add_parser(name, help="check a spec and report the first error")
    _spec_args(p)
    p.set_defaults(func=cmd_validate)


def _register_show(sub, name: str) -> None:
    p = sub.add_parser(name, help="print the unrolled graph, parameters, FLOPs and memory")
    _spec_args(p)
    # numbers are read by the command, so a bad one is one line (exit 2), not argparse's usage text
    p.add_argument("--seq-len", default=None,
                   help="row length for attention FLOPs (default, as cost's: train.seq_len, else model.max_seq_len; "
                   "a grid spec: its cells and puzzle positions)")
    p.add_argument("--progress", default="1", help="training progress 0..1 for the credit plan")
    p.add_argument("--recurrence", default=None, metavar="N",
                   help="run a sampled loop N times, 1 to its max (default: its evaluation count)")
    p.add_argument("--dtype-bytes", default="2", help="bytes per activation element: 1, 2, 4 or 8 (default 2: bf16)")
    p.add_argument("--png", metavar="FILE", help="also draw the unrolled schedule to a PNG")
    p.add_argument("--roofline", metavar="GPU", help="also predict a training step on GPU (" + ", ".join(GPUS)
                   + "): per kernel of the fusion plan its FLOPs, bytes, intensity, bound and time at the GPU's "
                   "published peaks (docs/kernels.md#roofline)")
    p.add_argument("--batch", default="1", help="rows of --seq-len tokens per step, for --roofline (default 1)")
    p.add_argument("--json", action="store_true", help="print the roofline as JSON instead of the tables")
    p.set_defaults(func=cmd_show)


def _register_cost(sub, name: str) -> None:
    p = sub.add_parser(name, help="training FLOPs, GPU-hours, wall time and dollars of a run of a spec")
    _spec_args(p)
    # values are read by the command, so a bad one is one line (exit 2), not argparse's usage text
    p.add_argument("--tokens", help="training tokens, e.g. 40B, 500M, 1e9 (required)")
    p.add_argument("--gpu", default="h100", help="a100 | h100 | h200 | b200 (default h100)")
    p.add_argument("--mfu", default=None,
                   help=f"model FLOPs utilization in [{MIN_MFU:g}, 1] (default {DEFAULT_MFU:g}; see docs/compare.md)")
    p.add_argument("--gpus", default="1", help="GPUs training together: the wall time divides by it (default 1)")
    p.add_argument("--price", default=None, help="dollars per GPU-hour (default: the GPU table's)")
    p.add_argument("--seq-len", default=None,
                   help="row length for attention FLOPs (default: train.seq_len, else model.max_seq_len)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_cost)


def _register_compile(sub, name: str) -> None:
    p = sub.add_parser(name, help="compile a spec for a backend")
    _spec_args(p)
    p.add_argument("--backend", default="reference", choices=tuple(REGISTRY), help=_backend_help())
    emitting = [b for b in REGISTRY.values() if b.emit is not None]
    p.add_argument("--emit", metavar="DIR", help="write the resolved spec and the graph to DIR, and the source of "
                   "every generated kernel (DIR/kernels/, DIR/kernels.json) of "
                   + ", ".join(f"{b.name} ({b.emit})" for b in emitting) + "; writing source needs no device")
    p.set_defaults(func=cmd_compile)


def _register_check(sub, name: str) -> None:
    p = sub.add_parser(name, help="property-test every kernel a spec needs and compile it for sm_80 / sm_90")
    _spec_args(p)
    p.add_argument("--draws", type=positive_int, default=3, help="random draws per kernel (default 3)")
    p.add_argument("--arch", type=int, action="append", metavar="SM", help="compile for sm_SM (default: 80 and 90)")
    p.add_argument("--no-compile", action="store_true", help="numerics only, no sm_80 / sm_90 compile")
    p.set_defaults(func=cmd_check)


def _wide_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)  # a log or a pipe: whole kernel names


def _backend_help() -> str:
    """The backends of the registry, what each is and needs, for `--backend`."""
    lines = [f"{b.name}: {b.description}" + (f"; needs {b.needs}" if b.needs else "") for b in REGISTRY.values()]
    return "target backend (default reference). " + ". ".join(lines)


COMMANDS: list[tuple[str, object]] = [
    ("validate", _register_validate),
    ("show", _register_show),
    ("cost", _register_cost),
    ("compile", _register_compile),
    ("check", _register_check),
]
