"""The `model.credit` section: which module calls of the schedule carry gradient.

It is `none` (or absent: every call carries gradient), `last_cycle`, or one of three modes:
  last_cycle every call from the start of the last iteration of the outermost `repeat` on (TRM's
             rule: the whole last outer cycle carries gradient, however many calls it holds);
  depth      HRM-Text's rule: the last d calls, handed out to modules in `priority` order, with d
             fixed or ramped from `from` to `to` over the first `warmup` of training;
  last       the last k calls in execution order, whatever their module;
  per_cycle  transformers' `L_bp_cycles`: per module, its trailing grad calls in each outer cycle;
  truncate   Huginn's truncated backprop: the last k iterations of the schedule's loop (the top-level
             repeat; with a sampled count, of the count drawn) and every call outside the loop.
Module names are checked against the modules the schedule calls (`called`, in call order). See
"Credit assignment" in docs/spec-language.md for the semantics.
"""

from __future__ import annotations

from hrmspec.errors import SpecError
from hrmspec.spec.fields import Fields, describe, near
from hrmspec.spec.schema import CreditSpec
from hrmspec.spec.source import PathT, Source, dotted


def read_credit(src: Source, path: PathT, called: list[str]) -> CreditSpec:
    """model.credit at `path`; `called` lists the module of every schedule statement, in order."""
    node = src.data["model"].get("credit")
    if node is None or node == "none":
        return CreditSpec(mode="none")
    if node == "last_cycle":
        if not any(isinstance(item, dict) and "repeat" in item for item in src.data["model"].get("schedule") or []):
            raise SpecError("'last_cycle' credit needs a repeat in the schedule: it gives gradient to the whole "
                            "last iteration of the outermost repeat", src.loc(path), dotted(path),
                            "e.g. credit: {last: 2}")
        return CreditSpec(mode="last_cycle")
    f = Fields(
        src,
        path,
        "a mapping with one of depth, last, per_cycle (or the word none or last_cycle)",
        "model.credit",
        near(node, ["none", "last_cycle"]) if isinstance(node, str) else "e.g. credit: {depth: 5, priority: [H, L]}",
    )
    modes = [k for k in ("depth", "last", "per_cycle", "truncate") if f.has(k)]
    if not modes:
        f.read.update({"depth", "last", "per_cycle", "truncate", "priority"})
        f.finish()  # a misspelt mode is reported as such
    if len(modes) != 1:
        where = path + (modes[1],) if len(modes) > 1 else path
        f.fail(
            where,
            f"expected exactly one of depth, last, per_cycle, truncate; found {' and '.join(modes) or 'none of them'}",
            "e.g. credit: {depth: {from: 2, to: 5, warmup: 0.2}, priority: [H, L]}",
            key=True,
        )
    mode = modes[0]
    if mode != "depth" and f.has("priority"):
        f.fail(
            path + ("priority",),
            f"unexpected key 'priority' with '{mode}' credit: it orders modules for depth credit only",
            key=True,
        )
    if mode == "last":
        k = f.integer("last")
        f.finish()
        return CreditSpec(mode="last", last=k)
    if mode == "truncate":
        k = f.integer("truncate")
        if not any(isinstance(item, dict) and "repeat" in item for item in src.data["model"].get("schedule") or []):
            f.fail(path + ("truncate",), "'truncate' credit needs a repeat in the schedule: it keeps gradient for the "
                   "last iterations of the top-level loop", "e.g. credit: {last: 2}")
        f.finish()
        return CreditSpec(mode="truncate", truncate=k)
    if mode == "per_cycle":
        f.read.add("per_cycle")
        f.finish()
        return CreditSpec(mode="per_cycle", per_cycle=_per_cycle(src, path + ("per_cycle",), called))
    return _depth_credit(f, path, called)


def _called_hint(name: str, uniq: list[str]) -> str:
    """The hint for a module name that the schedule never calls."""
    return near(name, uniq) or f"called modules: {', '.join(uniq)}"


def _per_cycle(src: Source, path: PathT, called: list[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    uniq = list(dict.fromkeys(called))
    g = Fields(
        src,
        path,
        "a mapping of module name -> list of grad calls per cycle",
        hint="e.g. per_cycle: {L: [0, 3]}",
    )
    table = []
    for name in list(g.data):
        if name not in uniq:
            g.fail(path + (name,), f"unknown module '{name}'", _called_hint(name, uniq), key=True)
        counts = g.raw(name)
        if isinstance(counts, int) and not isinstance(counts, bool):
            g.fail(
                path + (name,),
                f"expected a list of non-negative integers, found {counts}",
                f"e.g. [{counts}]",
            )
        if not isinstance(counts, list):
            g.fail(path + (name,), f"expected a list of non-negative integers, found {describe(counts)}")
        for i, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                g.fail(path + (name, i), f"expected a non-negative integer, found {describe(c)}")
        table.append((name, tuple(counts)))
    if not table:
        g.fail(path, "expected at least one module", "e.g. per_cycle: {L: [0, 3]}")
    g.finish()
    return tuple(table)


def _depth_credit(f: Fields, path: PathT, called: list[str]) -> CreditSpec:
    dpath = path + ("depth",)
    depth = f.raw("depth")
    if isinstance(depth, int) and not isinstance(depth, bool):
        lo = hi = f.integer("depth")
        warmup, from_path = 0.0, dpath
    else:
        d = Fields(
            f.src,
            dpath,
            "an integer or a mapping {from, to, warmup}",
            "model.credit.depth",
            "e.g. depth: 5, or depth: {from: 2, to: 5, warmup: 0.2}",
        )
        lo = d.integer("from")
        hi = d.integer("to", lo)
        warmup = d.number("warmup", 0.0, lo=0.0, hi=1.0)
        d.finish()
        if hi < lo:
            d.fail(
                dpath + ("to",),
                f"expected 'to' >= 'from' ({lo}), found {hi}",
                "depth ramps up from 'from' to 'to'",
            )
        from_path = dpath + ("from",)
    uniq = list(dict.fromkeys(called))
    prio = f.raw("priority", None)
    if prio is None:
        prio = uniq
    if not isinstance(prio, list) or not all(isinstance(p, str) for p in prio):
        f.fail(
            path + ("priority",), f"expected a list of module names, found {describe(prio)}", f"e.g. {uniq}"
        )
    for i, name in enumerate(prio):
        if name not in uniq:
            f.fail(path + ("priority", i), f"unknown module '{name}'", _called_hint(name, uniq))
        if name in prio[:i]:
            f.fail(path + ("priority", i), f"expected each module once, found '{name}' twice")
    missing = [m for m in uniq if m not in prio]
    if missing:
        f.fail(
            path + ("priority",),
            f"expected every called module ({', '.join(uniq)}), found no {', '.join(missing)}",
            f"e.g. priority: [{', '.join(prio + missing)}]",
        )
    if lo < len(prio):
        f.fail(
            from_path,
            f"expected a depth of at least {len(prio)} (one grad-carrying call per module), found {lo}",
            f"modules in priority order: {', '.join(prio)}",
        )
    f.finish()
    return CreditSpec(mode="depth", depth_from=lo, depth_to=hi, warmup=warmup, priority=tuple(prio))
