"""The `model` section of a spec, validated into a `ModelSpec`.

`read_model` reads the sizes (vocab, d_model, heads, ...), the shared layer (`model.block`, see
`hrmspec.spec.block`), the modules and the states, the schedule (`hrmspec.spec.schedule`), the
output state, the head, the init and embedding scale, and the credit plan
(`hrmspec.spec.credit`). It also makes the checks that span several of these: every declared
module is called, the input reaches the model, the output is a state the schedule assigns, and
rotary embeddings get an even head_dim.
"""

from __future__ import annotations

from dataclasses import replace

from hrmspec.errors import Gather, SpecError
from hrmspec.spec.block import layer_fields, mlp_width, standalone_norm, width_fields
from hrmspec.spec.credit import read_credit
from hrmspec.spec.fields import Fields, describe, near
from hrmspec.spec.grammar import INPUT
from hrmspec.spec.halting import read_halting
from hrmspec.spec.schedule import MAX_CALLS, check_names, flatten, read_schedule, sampled_loop, unrolled_calls
from hrmspec.spec.schema import (
    AttentionSpec,
    BlockSpec,
    InitSpec,
    ModelSpec,
    ModuleSpec,
    NormSpec,
    PuzzleSpec,
    Repeat,
    StateSpec,
    lecun_std,
)
from hrmspec.spec.source import PathT, Source, dotted

_STATE_INITS = ("embed", "buffer", "zeros", "learned", "random")
_WEIGHT_INITS = ("lecun_normal", "normal")


def read_model(src: Source, top: Fields) -> ModelSpec:
    """The `model` mapping of the document; `top` reads the top level and records 'model' as read. Every
    problem found is reported (`Gather`): a part that fails stands in with a default so the parts after it,
    and the checks across them, still run where they do not depend on it."""
    path: PathT = ("model",)
    top.raw("model")
    f = Fields(src, path, "a mapping (vocab, d_model, heads, ...)", "model")
    gather = Gather()
    vocab = gather(lambda: f.integer("vocab", maximum=1 << 24), 256)
    d_model = gather(lambda: f.integer("d_model", maximum=1 << 16))
    heads = gather(lambda: f.integer("heads", maximum=1 << 12))
    head_dim = gather(lambda: f.integer("head_dim", 0, maximum=1 << 12), 0)
    if not head_dim:
        if d_model and heads and d_model % heads:
            gather(lambda: f.fail(path + ("heads",), f"expected heads to divide d_model ({d_model}), found {heads}",
                                  _divisor_hint(d_model, heads)))
        head_dim = max((d_model or 64) // (heads or 1), 1)
    d_model, heads = d_model or 64, heads or 1  # stand-ins: the problem is reported
    max_seq_len = gather(lambda: f.integer("max_seq_len", 2048, maximum=1 << 24), 2048)

    # the shared layer (model.block) and the MLP width (model.ffn or model.expansion)
    def shared_layer():
        bf = Fields(src, path + ("block",), "a mapping {norm, attention, mlp}", "model.block")
        parts = layer_fields(bf, BlockSpec(NormSpec(), AttentionSpec(), "swiglu", 0))
        bf.finish()
        return parts

    f.read.add("block")
    norm, attention, mlp = gather(shared_layer, (NormSpec(), AttentionSpec(), "swiglu"))
    ffn, expansion = gather(lambda: width_fields(f), (None, 4.0))  # a stand-in width: no module lacks one
    block = BlockSpec(norm, attention, mlp, mlp_width(mlp, d_model, ffn, expansion) or 0)  # 0: set per module
    final_norm = gather(lambda: standalone_norm(f, "final_norm", norm, False, flag=True))

    modules = _modules(src, path + ("modules",), f, block, d_model, ffn, expansion, gather)
    module_names = [m.name for m in modules]
    uses_rope = [m for m in modules if m.block.attention.rope_theta is not None]
    if uses_rope and head_dim % 2:
        if f.has("head_dim"):
            gather(lambda: f.fail(path + ("head_dim",), f"expected an even head_dim (rotary embeddings), found "
                                  f"{head_dim}"))
        else:
            gather(lambda: f.fail(path + ("heads",), f"expected an even head_dim for rotary embeddings, found "
                                  f"d_model / heads = {head_dim}",
                                  "choose heads so that d_model / heads is even, or set rope_theta: none"))

    before = len(gather.errors)
    states = _states(src, path + ("states",), f, module_names, gather)
    states_read = len(gather.errors) == before  # no stand-in among them: their inits can be checked

    schedule = gather(lambda: read_schedule(src, path + ("schedule",), f.raw("schedule")))
    wired = None
    if schedule is not None and modules and states:
        wired = _wiring(src, path, f, gather, schedule, modules, states, states_read)
    f.read.update(("output", "credit", "halting"))  # read by the wiring, or not checkable without a schedule
    head = gather(lambda: f.choice("head", ("tied", "untied"), "untied"), "untied")
    init = gather(lambda: _init(src, path, f), InitSpec())
    scale = gather(lambda: _embed_scale(path, f, d_model, init), 1.0)
    puzzle = gather(lambda: _puzzle(src, path, f, d_model))
    positions = gather(lambda: f.choice("positions", ("none", "learned"), "none"), "none")
    if wired is not None:
        modules = wired[-1]  # with their injections
    modules = gather(lambda: _token_mlp_widths(src, path, modules, max_seq_len + (puzzle.positions if puzzle else 0),
                                               expansion), modules)
    if f.has("act"):
        gather(lambda: f.fail(path + ("act",), "unknown key 'act'", "adaptive computation time is written halting: "
                              "{type: act, threshold: 0.99, weight: 0.01}", key=True))
        f.read.add("act")
    gather(f.finish)
    gather.done()
    if wired is None:  # every way to get here records a problem; should one not, say where it stopped
        f.fail(path + ("schedule",), "the schedule could not be checked against the modules and states", key=True)
    schedule, output, credit, halting, _ = wired
    return ModelSpec(
        vocab=vocab,
        d_model=d_model,
        heads=heads,
        head_dim=head_dim,
        block=block,
        modules=tuple(modules),
        states=tuple(states),
        schedule=schedule,
        output=output,
        head=head,
        embed_scale=float(scale),
        init=init,
        credit=credit,
        max_seq_len=max_seq_len,
        final_norm=final_norm,
        puzzle=puzzle,
        positions=positions,
        halting=halting,
    )


def _wiring(src: Source, path: PathT, f: Fields, gather: Gather, schedule: tuple, modules: list[ModuleSpec],
            states: list[StateSpec], states_read: bool = True):
    """What the schedule ties together, checked: the calls' names, the loop's form, every module called, the
    input reaching the model, the output, the credit plan and halting. (schedule, output, credit, halting,
    modules with their injections); None when a problem stops the checks that depend on it. `states_read`:
    False when a state stands in for one with a problem (its init is not checked against the input)."""
    module_names, state_names = [m.name for m in modules], [s.name for s in states]
    calls = unrolled_calls(schedule)
    if calls > MAX_CALLS:
        gather(lambda: f.fail(path + ("schedule",), f"the schedule unrolls to {calls:,} module calls; at most "
                              f"{MAX_CALLS:,} are supported", "lower the repeat counts"))
        return None
    statements = flatten(schedule)
    named = [gather.ran(lambda st=st: check_names(st, module_names, state_names)) for st in statements]
    gather(lambda: _check_sampled(src, path + ("schedule",), schedule))
    if not all(named):
        return None
    modules = gather(lambda: _injections(src, modules, statements), modules)
    called = [st.module for st in statements]
    for m in module_names:
        if m not in called:
            gather(lambda m=m: f.fail(path + ("modules", m), f"module '{m}' is declared but never called in the "
                                      "schedule", f'call it, e.g. "{state_names[0]} = {m}({state_names[0]})", '
                                      "or remove it", key=True))
    if states_read and not any(s.init == "embed" for s in states) and not any(INPUT in st.inputs for st in statements):
        gather(lambda: f.fail(path + ("states",), f"the input never reaches the model: no state has 'init: embed' "
                              f"and no statement reads '{INPUT}'",
                              f"e.g. {state_names[0]}: {{init: embed}}, or add '{INPUT}' to a sum", key=True))
    output = gather(lambda: _output(path, f, state_names, statements))
    credit = gather(lambda: read_credit(src, path + ("credit",), called))
    f.read.add("credit")
    if f.raw("halting", None) is not None and sampled_loop(schedule) is not None:
        gather(lambda: f.fail(path + ("halting",), "model.halting runs the loop step by step at a fixed count; it "
                              "cannot be combined with a sampled repeat count",
                              "give the loop a fixed count, or drop halting", key=True))
        return None
    if output is None or credit is None:
        return None
    halting = gather(lambda: read_halting(src, path + ("halting",), f, schedule, output, credit))
    return schedule, output, credit, halting, modules


def _output(path: PathT, f: Fields, state_names: list[str], statements: list) -> str:
    """model.output: a state the schedule assigns (default the first state)."""
    output = f.raw("output", state_names[0])
    if output not in state_names:
        hint = near(output, state_names) or (
            f"'{INPUT}' is the input embedding, not a state"
            if output == INPUT
            else f"states: {', '.join(state_names)}"
        )
        f.fail(path + ("output",), f"expected a state, found {describe(output)}", hint)
    assigned = [st.target for st in statements]
    if output not in assigned:
        where = path + ("output",) if f.has("output") else path
        f.fail(
            where,
            f"expected the output to be a state the schedule assigns ({', '.join(dict.fromkeys(assigned))}), "
            f"found '{output}'",
            key=not f.has("output"),
        )
    return output


def _embed_scale(path: PathT, f: Fields, d_model: int, init: InitSpec) -> float:
    """model.embed_scale: a positive number, or auto: the embedding table is initialised with std s and
    scaled by 1/s, so the input starts at unit scale."""
    scale = f.raw("embed_scale", "auto")
    if scale == "auto":
        return 1.0 / (lecun_std(d_model) if init.type == "lecun_normal" else init.std)
    if isinstance(scale, str) and not _is_number(scale):
        hint = near(scale, ["auto"]) or "auto: 1 / (the embedding's init std)"
        f.fail(path + ("embed_scale",), f"expected a positive number or auto, found {describe(scale)}", hint)
    return f.number("embed_scale", positive=True)


def _puzzle(src: Source, path: PathT, f: Fields, d_model: int) -> PuzzleSpec | None:
    """model.puzzle: {identifiers, dim, positions} — learned puzzle vectors in front of the tokens."""
    if f.raw("puzzle", None) is None:
        return None
    g = Fields(src, path + ("puzzle",), "a mapping {identifiers, dim, positions}", "model.puzzle",
               "e.g. puzzle: {identifiers: 1000, positions: 16}")
    identifiers = g.integer("identifiers", maximum=1 << 24)
    dim = g.integer("dim", d_model)
    positions = g.integer("positions", -(-dim // d_model))
    if positions * d_model < dim:
        g.fail(path + ("puzzle", "positions"), f"expected at least {-(-dim // d_model)} positions to hold a "
               f"{dim}-wide puzzle vector at d_model {d_model}, found {positions}")
    g.finish()
    return PuzzleSpec(identifiers, dim, positions)


MAX_LAYERS = 1024  # layers of one module


def _check_sampled(src: Source, path: PathT, schedule: tuple) -> None:
    """A sampled repeat count is a top-level repeat, the only one (the loop whose depth is drawn), and the
    schedule's last repeat (the loop of its layout)."""
    sampled = [i for i, item in enumerate(schedule) if isinstance(item, Repeat) and item.sample is not None]

    def nested(items: tuple, where: PathT) -> None:
        for i, item in enumerate(items):
            if isinstance(item, Repeat):
                if item.sample is not None:
                    raise SpecError("a sampled repeat count must be a loop of the schedule's top level",
                                    src.loc(where + (i, "repeat")), dotted(where + (i, "repeat")),
                                    "sample the outermost loop; inner loops keep fixed counts")
                nested(item.body, where + (i, "do"))

    for i, item in enumerate(schedule):
        if isinstance(item, Repeat):
            nested(item.body, path + (i, "do"))
    if len(sampled) > 1:
        where = path + (sampled[1], "repeat")
        raise SpecError("only one repeat of the schedule can have a sampled count", src.loc(where), dotted(where),
                        "give the others fixed counts")
    later = [i for i, item in enumerate(schedule) if isinstance(item, Repeat) and sampled and i > sampled[0]]
    if later:  # the loop of the layout (hrmspec/graph/layout.py) is the last top-level repeat
        where = path + (later[0], "repeat")
        raise SpecError("a repeat after the sampled one: the sampled repeat must be the schedule's last loop",
                        src.loc(where), dotted(where), "nest this repeat inside the sampled one, or before it")


def _injections(src: Source, modules: list[ModuleSpec], statements: list) -> list[ModuleSpec]:
    """Modules called with cat(...) inject by concatenation through their adapter; every call of such a
    module must concatenate the same number of states (the adapter's width is fixed)."""
    out = []
    for m in modules:
        calls = [st for st in statements if st.module == m.name]
        cats = [st for st in calls if st.combine == "cat"]
        if cats:
            other = next((st for st in calls if st.combine != "cat" or len(st.inputs) != len(cats[0].inputs)), None)
            if other is not None:
                raise SpecError(
                    f"module {m.name} is called with cat({', '.join(cats[0].inputs)}) and with "
                    f"'{other}': its adapter takes {len(cats[0].inputs)} concatenated states at every call",
                    other.loc, other.path, f"call {m.name} the same way everywhere, or use two modules")
            m = replace(m, inject="cat", inject_arity=len(cats[0].inputs))
        out.append(m)
    return out


def _token_mlp_widths(src: Source, path: PathT, modules: list[ModuleSpec], length: int,
                      expansion: float | None) -> list[ModuleSpec]:
    """Modules whose attention is a token_mlp, with its width over the `length` positions of a row:
    `attention.ffn` if given, else the block MLP's width rule at `expansion` x length (TRM's mlp_t)."""
    out = []
    for m in modules:
        a = m.block.attention
        if a.type == "token_mlp" and not a.ffn:
            if expansion is None:
                raise SpecError(f"module {m.name}: a token_mlp needs its width: model.expansion (a ratio of the "
                                f"{length} positions) or attention.ffn", src.loc(path), dotted(path),
                                "e.g. attention: {type: token_mlp, ffn: 256}")
            a = replace(a, ffn=mlp_width(m.block.mlp, length, None, expansion))
            m = replace(m, block=replace(m.block, attention=a))
        out.append(m)
    return out


def _divisor_hint(d_model: int, heads: int) -> str:
    below = max(h for h in range(1, heads) if d_model % h == 0) if heads > 1 else None
    above = min((h for h in range(heads + 1, d_model + 1) if d_model % h == 0), default=None)
    options = " or ".join(str(h) for h in (below, above) if h is not None)
    return f"use heads {options} (divisors of {d_model}), or set head_dim"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _modules(
    src: Source,
    path: PathT,
    f: Fields,
    block: BlockSpec,
    d_model: int,
    ffn: int | None,
    expansion: float | None,
    gather: Gather,
) -> list[ModuleSpec]:
    """model.modules: each module's block is `block` with the module's own fields applied. A module with a
    problem (reported) stands in as one default layer, so the schedule's calls of it are still checked."""
    if not gather.ran(lambda: f.raw("modules")):  # missing: reported
        return []
    mf = gather(lambda: Fields(src, path, "a mapping of module name -> {layers, ...}",
                               hint="e.g. modules: {L: {layers: 2}}"))
    if mf is None:
        return []
    if not mf.data:
        gather(lambda: mf.fail(path, "expected at least one module", "e.g. modules: {L: {layers: 2}, H: {layers: 2}}"))
        return []

    def module(name) -> ModuleSpec:
        mpath = path + (name,)
        if not isinstance(name, str) or not name.isidentifier() or name == INPUT:
            mf.fail(
                mpath,
                f"expected a module name (an identifier other than '{INPUT}'), found {name!r}",
                key=True,
            )
        if name in ("states", "schedule", "output", "credit", "halting") and name not in f.data and (
                not isinstance(mf.data[name], dict) or "layers" not in mf.data[name]):
            mf.fail(mpath, f"`{name}:` is indented under `modules:`; it belongs beside it under `model:`",
                    f"indent `{name}:` to the column of `modules:` ({src.key_loc(path).col})", key=True)
        shorthand = f"write {name}: {{layers: {mf.data[name]}}}" if isinstance(mf.data[name], int) else ""
        g = Fields(src, mpath, "a mapping {layers, exit_norm, ...}", "model.modules.<name>", shorthand)
        layers = g.integer("layers", minimum=0, maximum=MAX_LAYERS)
        norm, attention, mlp = layer_fields(g, block)
        exit_norm = standalone_norm(g, "exit_norm", norm, "rms")
        if layers == 0 and not g.has("exit_norm"):  # the default exit norm does not make a module of it
            g.fail(mpath + ("layers",), "expected a positive integer, found 0",
                   "a module of 0 layers is a norm alone (between stages): write its exit_norm, e.g. "
                   "{layers: 0, exit_norm: {type: rms, affine: true}}")
        if layers == 0 and exit_norm is None:  # a module of no layers is its exit norm alone
            g.fail(mpath + ("layers",), "expected at least 1 layer, or an exit_norm for a module of 0 layers (a "
                   "norm between stages)", "e.g. {layers: 0, exit_norm: {type: rms, affine: true}}")
        own_ffn, own_expansion = width_fields(g)
        width = mlp_width(mlp, d_model, own_ffn, own_expansion)
        if width is None:  # the module's own width first, then the model's
            width = mlp_width(mlp, d_model, ffn, expansion)
        if width is None:
            g.fail(mpath, "expected an MLP width: model.ffn, model.expansion or this module's ffn", key=True)
        g.finish()
        return ModuleSpec(name=name, layers=layers, exit_norm=exit_norm, block=BlockSpec(norm, attention, mlp, width))

    modules = []
    for name in list(mf.data):
        stand_in = ModuleSpec(name=str(name), layers=1, exit_norm=NormSpec(),
                              block=replace(block, ffn=block.ffn or 4 * d_model))
        modules.append(gather(lambda name=name: module(name), stand_in))
        mf.read.add(name)
    return modules


def _states(src: Source, path: PathT, f: Fields, module_names: list[str], gather: Gather) -> list[StateSpec]:
    """model.states: each state's name and how it starts; a state with a problem (reported) stands in as a
    buffer."""
    if not gather.ran(lambda: f.raw("states")):  # missing: reported
        return []
    sf = gather(lambda: Fields(src, path, "a mapping of state name -> {init}",
                               hint="e.g. states: {z_H: {init: embed}}"))
    if sf is None:
        return []
    if not sf.data:
        gather(lambda: sf.fail(path, "expected at least one state", "e.g. states: {z_H: {init: embed}}"))
        return []

    def state(name) -> StateSpec:
        spath = path + (name,)
        if name == INPUT:
            sf.fail(spath, f"'{INPUT}' is the input embedding and cannot be declared as a state", key=True)
        if not isinstance(name, str) or not name.isidentifier():
            sf.fail(spath, f"expected a state name (an identifier), found {name!r}", key=True)
        if name in module_names:
            sf.fail(
                spath,
                f"expected distinct module and state names, found '{name}' as both",
                "rename one",
                key=True,
            )
        shorthand = f"write {name}: {{init: {sf.data[name]}}}" if sf.data[name] in _STATE_INITS else ""
        g = Fields(
            src, spath, "a mapping {init: embed | buffer | zeros | learned | random}", "model.states.<name>", shorthand
        )
        init = g.choice("init", _STATE_INITS)
        std = g.number("std", 1.0, lo=0.0) if init == "random" else 1.0  # random: a draw per forward
        g.finish()
        return StateSpec(name=name, init=init, std=std)

    states = []
    for name in list(sf.data):
        states.append(gather(lambda name=name: state(name), StateSpec(name=str(name), init="buffer", std=1.0)))
        sf.read.add(name)
    return states


def _init(src: Source, path: PathT, f: Fields) -> InitSpec:
    """model.init: the weight init, a name or a mapping {type, std}."""
    node = f.raw("init", None)
    if node is None:
        return InitSpec()
    if isinstance(node, str):
        return InitSpec(type=f.choice("init", _WEIGHT_INITS))
    g = Fields(src, path + ("init",), "lecun_normal, normal or a mapping {type, std}", "model.init")
    init = InitSpec(
        type=g.choice("type", _WEIGHT_INITS, "lecun_normal"),
        std=g.number("std", 0.02, positive=True),
    )
    g.finish()
    return init
