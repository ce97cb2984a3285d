"""Malformed specs and the errors they give: place (file:line:col), field path, message and hint.

Each row of the table edits one line of BASE (a valid two-module spec) and names the error it must
cause. Line numbers refer to BASE as printed below; columns are 1-based.
"""

from __future__ import annotations

import pytest

from hrmspec.errors import Location, SpecError, SpecProblems
from hrmspec.kinds import MLPS
from hrmspec.spec import load_spec, load_spec_text, parse_override

FILE = "spec.yaml"

BASE = """\
name: t
model:
  vocab: 64
  d_model: 32
  heads: 4
  ffn: 64
  block:
    norm: {eps: 1.0e-6, place: pre}
    attention: {mask: prefix_lm}
    mlp: swiglu
  modules:
    L: {layers: 1}
    H: {layers: 1}
  states:
    z_H: {init: embed}
    z_L: {init: buffer}
  schedule:
    - repeat: 2
      do:
        - repeat: 3
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
  credit:
    depth: {from: 2, to: 5, warmup: 0.2}
    priority: [H, L]
"""

STMT = '"z_H = H(z_H + z_L)"'  # on line 22; its text starts at column 12
S = 12
CREDIT = "    depth: {from: 2, to: 5, warmup: 0.2}\n    priority: [H, L]\n"


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the base spec"
    return text.replace(old, new)


def stmt(new: str) -> str:
    """BASE with the H statement on line 22 replaced."""
    return edit(STMT, f'"{new}"')


def add_state(line: str) -> str:
    """BASE with one more state after z_L (on line 17)."""
    return edit("    z_L: {init: buffer}\n", f"    z_L: {{init: buffer}}\n    {line}\n")


SECTIONS = "expected a mapping of sections (name, model, ...)"


def row(id, text, path, message, line, col=None, hint=None):
    return pytest.param(text, path, message, line, col, hint, id=id)


# fmt: off
ROWS = [
    # ------------------------------------------------------------------ unknown keys, at every level
    row("unknown-top", BASE + "nmae: x\n", "nmae", "unknown key 'nmae'", 27, 1, "did you mean 'name'?"),
    row("unknown-model", edit("  vocab: 64\n", "  vocab: 64\n  dropout: 0.1\n"), "model.dropout",
        "unknown key 'dropout'", 4, 3, "allowed keys here: block, credit, d_model"),
    row("misspelt-model", edit("  heads: 4\n", "  heads: 4\n  head_dimm: 8\n"), "model.head_dimm",
        "unknown key 'head_dimm'", 6, 3, "did you mean 'head_dim'?"),
    row("misplaced-model-mlp", edit("  ffn: 64\n", "  ffn: 64\n  mlp: gelu\n"), "model.mlp",
        "unknown key 'mlp'", 7, 3, "'mlp' is a key of model.block and model.modules.<name>"),
    row("misplaced-model-layers", edit("  ffn: 64\n", "  ffn: 64\n  layres: 2\n"), "model.layres",
        "unknown key 'layres'", 7, 3, "did you mean 'layers'? (a key of model.modules.<name>)"),
    row("unknown-block", edit("    mlp: swiglu\n", "    mlp: swiglu\n    nrom: {}\n"), "model.block.nrom",
        "unknown key 'nrom'", 11, 5, "did you mean 'norm'?"),
    row("block-ffn", edit("    mlp: swiglu\n", "    mlp: swiglu\n    ffn: 64\n"), "model.block.ffn",
        "unknown key 'ffn'", 11, 5, "'ffn' is a key of model and model.modules.<name>"),
    row("unknown-norm", edit("place: pre}", "plce: pre}"), "model.block.norm.plce",
        "unknown key 'plce'", 8, 25, "did you mean 'place'?"),
    row("unknown-attention", edit("{mask: prefix_lm}", "{mask: prefix_lm, rope: 500}"),
        "model.block.attention.rope", "unknown key 'rope'", 9, 34, "did you mean 'rope_theta'?"),
    row("unknown-module", edit("L: {layers: 1}", "L: {layers: 1, layer: 2}"), "model.modules.L.layer",
        "unknown key 'layer'", 12, 20, "did you mean 'layers'?"),
    row("misspelt-required-module", edit("L: {layers: 1}", "L: {layres: 1}"), "model.modules.L.layres",
        "unknown key 'layres'", 12, 9, "did you mean 'layers'? (it is required)"),
    row("unknown-state", edit("z_H: {init: embed}", "z_H: {init: embed, int: 1}"), "model.states.z_H.int",
        "unknown key 'int'", 15, 24, "did you mean 'init'?"),
    row("unknown-credit", edit("    priority: [H, L]\n", "    priority: [H, L]\n    prio: [H]\n"),
        "model.credit.prio", "unknown key 'prio'", 27, 5, "did you mean 'priority'?"),
    row("unknown-depth", edit("warmup: 0.2}", "warmup: 0.2, wramup: 1}"), "model.credit.depth.wramup",
        "unknown key 'wramup'", 25, 42, "did you mean 'warmup'?"),
    row("misspelt-repeat", edit("    - repeat: 2\n", "    - repaet: 2\n"), "model.schedule[0].repaet",
        "unknown key 'repaet'", 18, 7, "did you mean 'repeat'?"),
    row("misspelt-credit-mode", edit(CREDIT, "    dpeth: 5\n"), "model.credit.dpeth",
        "unknown key 'dpeth'", 25, 5, "did you mean 'depth'?"),
    # ------------------------------------------------------------------ wrong types and values
    row("string-for-int", edit("vocab: 64", "vocab: sixty"), "model.vocab",
        "expected a positive integer, found 'sixty'", 3, 10),
    row("negative-int", edit("L: {layers: 1}", "L: {layers: -1}"), "model.modules.L.layers",
        "expected a non-negative integer, found -1", 12, 17),
    row("zero-layers-no-norm", edit("L: {layers: 1}", "L: {layers: 0, exit_norm: none}"), "model.modules.L.layers",
        "expected at least 1 layer, or an exit_norm for a module of 0 layers", 12, 17),
    row("bool-for-int", edit("heads: 4", "heads: true"), "model.heads",
        "expected a positive integer, found true", 5, 10),
    row("float-for-int", edit("d_model: 32", "d_model: 32.0"), "model.d_model",
        "expected a positive integer, found 32.0", 4, 12, "write 32"),
    row("zero-repeat", edit("- repeat: 2", "- repeat: 0"), "model.schedule[0].repeat",
        "expected a positive integer, found 0", 18, 15),
    row("eps-not-a-number", edit("eps: 1.0e-6", "eps: small"), "model.block.norm.eps",
        "expected a number in (0, 1], found 'small'", 8, 17),
    row("eps-negative", edit("eps: 1.0e-6", "eps: -1.0e-6"), "model.block.norm.eps",
        "expected a number in (0, 1], found -1e-06", 8, 17),
    row("bool-for-bool", edit("{mask: prefix_lm}", "{mask: prefix_lm, bias: 'no'}"),
        "model.block.attention.bias", "expected true or false, found 'no'", 9, 41),
    row("embed-scale", edit("  output: z_H\n", "  output: z_H\n  embed_scale: atuo\n"), "model.embed_scale",
        "expected a positive number or auto, found 'atuo'", 24, 16, "did you mean 'auto'?"),
    # ------------------------------------------------------------------ bad choices
    row("mask-kind", edit("mask: prefix_lm", "mask: prefixlm"), "model.block.attention.mask",
        "expected one of causal | prefix_lm | bidirectional, found 'prefixlm'", 9, 23,
        "did you mean 'prefix_lm'?"),
    row("mlp-kind", edit("mlp: swiglu", "mlp: swigl"), "model.block.mlp",
        f"expected one of {' | '.join(MLPS)}, found 'swigl'", 10, 10, "did you mean 'swiglu'?"),
    row("norm-place", edit("place: pre", "place: sandwhich"), "model.block.norm.place",
        "expected one of pre | post | sandwich | pre_post, found 'sandwhich'", 8, 32, "did you mean 'sandwich'?"),
    row("init-kind", edit("init: buffer", "init: bufer"), "model.states.z_L.init",
        "expected one of embed | buffer | zeros | learned | random, found 'bufer'", 16, 17, "did you mean 'buffer'?"),
    row("objective", BASE + "objective: lmm\n", "objective",
        "expected one of task_completion | lm | grid, found 'lmm'", 27, 12, "did you mean 'lm'?"),
    row("credit-word", edit(f"  credit:\n{CREDIT}", "  credit: nne\n"), "model.credit",
        "expected a mapping with one of depth, last, per_cycle (or the word none or last_cycle), found 'nne'", 24, 11,
        "did you mean 'none'?"),
    row("section-not-mapping", BASE + "train: [1]\n", "train", "expected a mapping, found a list [1]", 27, 8),
    row("state-shorthand", edit("z_H: {init: embed}", "z_H: embed"), "model.states.z_H",
        "expected a mapping {init: embed | buffer | zeros | learned | random}, found 'embed'", 15, 10,
        "write z_H: {init: embed}"),
    # ------------------------------------------------------------------ missing keys and sizes
    row("missing-vocab", edit("  vocab: 64\n", ""), "model", "missing required key 'vocab'", 2, 1,
        "e.g. vocab: 65536"),
    row("missing-d_model", edit("  d_model: 32\n", ""), "model", "missing required key 'd_model'", 2, 1),
    row("missing-heads", edit("  heads: 4\n", ""), "model", "missing required key 'heads'", 2, 1),
    row("missing-modules", edit("  modules:\n    L: {layers: 1}\n    H: {layers: 1}\n", ""), "model",
        "missing required key 'modules'", 2, 1),
    row("missing-schedule", BASE[: BASE.index("  schedule:")] + "  output: z_H\n", "model",
        "missing required key 'schedule'", 2, 1),
    row("missing-init", edit("z_L: {init: buffer}", "z_L: {}"), "model.states.z_L",
        "missing required key 'init'", 16, 5),
    row("missing-width", edit("  ffn: 64\n", ""), "model.modules.L",
        "expected an MLP width: model.ffn, model.expansion or this module's ffn", 11, 5),
    row("heads-divide", edit("heads: 4", "heads: 5"), "model.heads",
        "expected heads to divide d_model (32), found 5", 5, 10, "use heads 4 or 8 (divisors of 32)"),
    row("odd-head-dim", edit("  heads: 4\n", "  heads: 4\n  head_dim: 7\n"), "model.head_dim",
        "expected an even head_dim (rotary embeddings), found 7", 6, 13),
    row("odd-derived-head-dim", edit("heads: 4", "heads: 32"), "model.heads",
        "expected an even head_dim for rotary embeddings, found d_model / heads = 1", 5, 10),
    row("ffn-and-expansion", edit("  ffn: 64\n", "  ffn: 64\n  expansion: 4\n"), "model.expansion",
        "expected either 'ffn' (a width) or 'expansion' (a ratio of d_model), found both", 7, 3),
    row("module-ffn-and-expansion", edit("L: {layers: 1}", "L: {layers: 1, ffn: 8, expansion: 2}"),
        "model.modules.L.expansion", "found both", 12, 28),
    # ------------------------------------------------------------------ statements
    row("unknown-module-call", stmt("z_H = HH(z_H + z_L)"), "model.schedule[0].do[1]",
        "unknown module 'HH'", 22, S + 6, "did you mean 'H'?"),
    row("state-called-as-module", stmt("z_H = z_L(z_H)"), "model.schedule[0].do[1]",
        "unknown module 'z_L'", 22, S + 6, "'z_L' is a state; declared modules: L, H"),
    row("unknown-input-state", stmt("z_H = H(z_H + z_LL)"), "model.schedule[0].do[1]",
        "unknown state 'z_LL'", 22, S + 14, "did you mean 'z_L'?"),
    row("unknown-target-state", stmt("h_new = H(z_H + z_L)"), "model.schedule[0].do[1]",
        "unknown state 'h_new' on the left of '='", 22, S, "declare it under model.states"),
    row("misspelt-target-state", stmt("z_Hh = H(z_H + z_L)"), "model.schedule[0].do[1]",
        "unknown state 'z_Hh' on the left of '='", 22, S, "did you mean 'z_H'?"),
    row("module-as-input", stmt("z_H = H(z_H + L)"), "model.schedule[0].do[1]",
        "unknown state 'L'", 22, S + 14, "'L' is a module, not a state"),
    row("syntax-error", stmt("z_H = H(z_H + )"), "model.schedule[0].do[1]",
        "cannot parse the statement 'z_H = H(z_H + )'", 22, S + 14),
    row("not-an-assignment", stmt("H(z_H + z_L)"), "model.schedule[0].do[1]",
        "expected an assignment 'state = Module(inputs)', found 'H(z_H + z_L)'", 22, S),
    row("augmented-assignment", stmt("z_H += H(z_H)"), "model.schedule[0].do[1]",
        "expected an assignment 'state = Module(inputs)', found 'z_H += H(z_H)'", 22, S),
    row("two-statements", stmt("z_H = H(z_H); z_L = L(z_L)"), "model.schedule[0].do[1]",
        "expected one statement, found 2", 22, S + 14, "write one statement per list item"),
    row("times-not-plus", stmt("z_H = H(z_H * z_L)"), "model.schedule[0].do[1]",
        "expected '+' between states, found '*'", 22, S + 12, "states are combined by addition only"),
    row("minus-not-plus", stmt("z_H = H(z_H + z_L - x)"), "model.schedule[0].do[1]",
        "expected '+' between states, found '-'", 22, S + 18),
    row("two-args", stmt("z_H = H(z_H, z_L)"), "model.schedule[0].do[1]",
        "expected one input expression in H(...), found 2 arguments", 22, S + 13, "sum the inputs"),
    row("keyword-arg", stmt("z_H = H(z_H, skip=z_L)"), "model.schedule[0].do[1]",
        "expected one input expression, found the keyword argument 'skip='", 22, S + 13),
    row("cat-one-state", stmt("z_H = H(cat(z_H))"), "model.schedule[0].do[1]",
        "expected at least two states in cat(...), found 1", 22, S + 8, "a single input needs no injection"),
    row("not-a-sum", stmt("z_H = H(z_H + 1)"), "model.schedule[0].do[1]",
        "expected a state name or a sum of states, found '1'", 22, S + 14),
    row("duplicate-in-sum", stmt("z_H = H(z_H + z_L + z_H)"), "model.schedule[0].do[1]",
        "expected each name once in a sum, found 'z_H' twice", 22, S + 20),
    row("assign-to-x", stmt("x = H(z_H + z_L)"), "model.schedule[0].do[1]",
        "cannot assign to 'x': it is the input embedding, not a state", 22, S),
    row("right-side-not-call", stmt("z_H = z_H + z_L"), "model.schedule[0].do[1]",
        "expected a module call on the right of '=', found 'z_H + z_L'", 22, S + 6),
    row("statement-not-string", edit(STMT, "42"), "model.schedule[0].do[1]",
        'expected a statement string like "z_L = L(z_L + z_H)", found 42', 22, 11),
    row("statement-as-mapping", edit(STMT, "z_H: H(z_H + z_L)"), "model.schedule[0].do[1]",
        "expected a statement string or a repeat block {repeat, do}, found a mapping", 22, 11,
        'quote statements'),
    row("schedule-not-list", edit(BASE[BASE.index("  schedule:"): BASE.index("  output:")],
                                  '  schedule: "z_H = H(z_H)"\n'), "model.schedule",
        "expected a non-empty list of statements and repeat blocks, found 'z_H = H(z_H)'", 17, 14),
    # ------------------------------------------------------------------ the model as a whole
    row("module-never-called", edit("    H: {layers: 1}\n", "    H: {layers: 1}\n    G: {layers: 1}\n"),
        "model.modules.G", "module 'G' is declared but never called in the schedule", 14, 5),
    row("module-and-state", add_state("H: {init: zeros}"),
        "model.states.H", "expected distinct module and state names, found 'H' as both", 17, 5),
    row("state-named-x", add_state("x: {init: zeros}"),
        "model.states.x", "'x' is the input embedding and cannot be declared as a state", 17, 5),
    row("output-unknown", edit("output: z_H", "output: z_HH"), "model.output",
        "expected a state, found 'z_HH'", 23, 11, "did you mean 'z_H'?"),
    row("output-never-assigned", edit("output: z_H", "output: z_M", add_state("z_M: {init: zeros}")),
        "model.output",
        "expected the output to be a state the schedule assigns (z_L, z_H), found 'z_M'", 24, 11),
    row("input-never-read", edit("z_H: {init: embed}", "z_H: {init: zeros}"), "model.states",
        "the input never reaches the model", 14, 3, "e.g. z_H: {init: embed}"),
    # ------------------------------------------------------------------ credit
    row("credit-two-modes", edit("    priority: [H, L]\n", "    last: 2\n"), "model.credit.last",
        "expected exactly one of depth, last, per_cycle, truncate; found depth and last", 26, 5),
    row("credit-no-mode", edit(CREDIT, "    priority: [H, L]\n"), "model.credit",
        "expected exactly one of depth, last, per_cycle, truncate; found none of them", 24, 3),
    row("priority-missing-module", edit("priority: [H, L]", "priority: [H]"), "model.credit.priority",
        "expected every called module (L, H), found no L", 26, 15, "e.g. priority: [H, L]"),
    row("priority-unknown-module", edit("priority: [H, L]", "priority: [H, LL]"), "model.credit.priority[1]",
        "unknown module 'LL'", 26, 19, "did you mean 'L'?"),
    row("priority-twice", edit("priority: [H, L]", "priority: [H, L, H]"), "model.credit.priority[2]",
        "expected each module once, found 'H' twice", 26, 22),
    row("priority-with-last", edit(CREDIT, "    last: 2\n    priority: [H, L]\n"), "model.credit.priority",
        "unexpected key 'priority' with 'last' credit", 26, 5),
    row("depth-from-above-to", edit("from: 2, to: 5", "from: 5, to: 2"), "model.credit.depth.to",
        "expected 'to' >= 'from' (5), found 2", 25, 26),
    row("depth-too-small", edit("from: 2, to: 5", "from: 1, to: 5"), "model.credit.depth.from",
        "expected a depth of at least 2 (one grad-carrying call per module), found 1", 25, 19),
    row("depth-int-too-small", edit("depth: {from: 2, to: 5, warmup: 0.2}", "depth: 1"), "model.credit.depth",
        "expected a depth of at least 2", 25, 12),
    row("depth-warmup-range", edit("warmup: 0.2", "warmup: 2"), "model.credit.depth.warmup",
        "expected a number in [0, 1], found 2", 25, 37),
    row("per-cycle-unknown-module", edit(CREDIT, "    per_cycle: {LL: [1, 2]}\n"),
        "model.credit.per_cycle.LL", "unknown module 'LL'", 25, 17, "did you mean 'L'?"),
    row("per-cycle-negative", edit(CREDIT, "    per_cycle: {L: [1, -2]}\n"), "model.credit.per_cycle.L[1]",
        "expected a non-negative integer, found -2", 25, 24),
    row("per-cycle-not-list", edit(CREDIT, "    per_cycle: {L: 3}\n"), "model.credit.per_cycle.L",
        "expected a list of non-negative integers, found 3", 25, 20, "e.g. [3]"),
    # ------------------------------------------------------------------ reserved forms
    row("reserved-prelude", edit("  vocab: 64\n", "  vocab: 64\n  prelude: {layers: 2}\n"), "model.prelude",
        "'prelude' is reserved for a later version and not supported yet", 4, 3, "a module called once"),
    row("act-is-halting", edit("  output: z_H\n", "  output: z_H\n  act: {max_cycles: 4}\n"),
        "model.act", "unknown key 'act'", 24, 3, "adaptive computation time is written halting: {type: act"),
    row("reserved-sampled-depth", edit("- repeat: 2", "- repeat: {min: 1, max: 4}"),
        "model.schedule[0].repeat", "missing required key 'sample'", 18, 7,
        "e.g. repeat: {sample: lognormal_poisson, mean: 32, sigma: 0.5}; found the unknown key 'min'"),
    # ------------------------------------------------------------------ YAML itself
    row("duplicate-key", edit("  vocab: 64\n", "  vocab: 64\n  vocab: 65\n"), "model.vocab",
        "duplicate key 'vocab' (first defined at spec.yaml:3:3)", 4, 3),
    row("yaml-syntax", edit("  vocab: 64\n", "  vocab: [64\n"), "",
        "invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence at 3:10)", 4, 10),
    row("yaml-tab", edit("  vocab: 64\n", "\tvocab: 64\n"), "", "invalid YAML: found character '\\t'", 3, 1,
        "indent with spaces"),
    row("yaml-indent", edit("  heads: 4\n", "   heads: 4\n"), "", "mapping values are not allowed here", 5, 9,
        "check the indentation"),
    row("empty-file", "", "", "the file is empty", 1, 1),
    row("comments-only", "# nothing yet\n", "", "the file is empty", 1, 1),
    row("top-level-list", "- model\n- name\n", "", f"{SECTIONS}, found a list", 1, 1),
    row("top-level-scalar", "hello\n", "", f"{SECTIONS}, found the text 'hello'", 1, 1),
]
# fmt: on


@pytest.mark.parametrize("text, path, message, line, col, hint", ROWS)
def test_malformed_spec(text, path, message, line, col, hint):
    with pytest.raises(SpecError) as info:
        load_spec_text(text, FILE)
    e = info.value
    if isinstance(e, SpecProblems):  # the row's mistake is the first problem of the file
        e = e.problems[0]
    shown = str(e)
    assert message in e.message, shown
    assert e.path == path, shown
    assert e.loc is not None and e.loc.file == FILE and e.loc.line == line, shown
    if col is not None:
        assert e.loc.col == col, shown
    if hint is not None:
        assert hint in e.hint, shown
    # the one shape every error has: file:line:col: path: message, then the hint
    where = f"{FILE}:{e.loc.line}:{e.loc.col}: "
    assert shown.startswith(where + (f"{path}: " if path else "") + e.message), shown
    if e.hint:
        assert shown.endswith(f"\n  hint: {e.hint}")


def test_the_table_is_large():
    assert len(ROWS) >= 35


WORDS = ("expected", "unknown", "unexpected", "missing", "duplicate", "never", "cannot", "not supported")


def test_every_field_error_says_expected_or_names_the_key():
    for param in ROWS:
        text, path, message, *_ = param.values
        if path:
            with pytest.raises(SpecError) as info:
                load_spec_text(text, FILE)
            m = info.value.message
            assert any(w in m for w in WORDS), m


# ---------------------------------------------------------------------- accepted edge cases


def test_eps_written_without_a_dot_is_accepted():
    # YAML 1.1 reads 1e-6 (no dot, no sign in the exponent) as a string
    spec = load_spec_text(edit("eps: 1.0e-6", "eps: 1e-6"), FILE)
    assert spec.model.block.norm.eps == pytest.approx(1e-6)
    assert isinstance(spec.model.block.norm.eps, float)


def test_null_unsets_an_inherited_width():
    spec = load_spec_text(edit("L: {layers: 1}", "L: {layers: 1, ffn: null, expansion: 2}"), FILE)
    assert spec.model.module("L").block.ffn == 256  # ceil(round(2 * 32 * 2/3) / 256) * 256


# ---------------------------------------------------------------------- files: extends, --set, missing


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_extends_missing_file(tmp_path):
    p = _write(tmp_path, "child.yaml", "name: c\nextends: base.yml\n")
    _write(tmp_path, "base.yaml", BASE)
    with pytest.raises(SpecError) as info:
        load_spec(p)
    e = info.value
    assert "base spec not found" in e.message and e.path == "extends"
    assert (e.loc.line, e.loc.col) == (2, 10)
    assert e.hint == "did you mean 'base.yaml'?"


def test_extends_cycle(tmp_path):
    a = _write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    _write(tmp_path, "b.yaml", "name: b\nextends: a.yaml\n")
    with pytest.raises(SpecError) as info:
        load_spec(a)
    e = info.value
    assert e.message == "'extends' forms a cycle: a.yaml -> b.yaml -> a.yaml"
    assert e.loc.file.endswith("b.yaml") and (e.loc.line, e.loc.col) == (2, 10)


def test_extends_itself(tmp_path):
    a = _write(tmp_path, "a.yaml", "extends: a.yaml\n")
    with pytest.raises(SpecError, match="'extends' forms a cycle: a.yaml -> a.yaml"):
        load_spec(a)


def test_extends_not_a_string(tmp_path):
    a = _write(tmp_path, "a.yaml", "extends: [b.yaml]\n")
    with pytest.raises(SpecError, match="expected a file name, found a list"):
        load_spec(a)


def test_error_in_child_points_at_child_and_in_base_at_base(tmp_path):
    _write(tmp_path, "base.yaml", edit("mask: prefix_lm", "mask: prefixlm"))
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nmodel:\n  vocab: sixty\n")
    with pytest.raises(SpecProblems) as info:  # both reported: the child's first, then the base's
        load_spec(child)
    first, second = info.value.problems
    assert (first.loc.file, first.loc.line) == (str(child), 3)
    assert second.loc.file.endswith("base.yaml") and second.loc.line == 9
    child.write_text("extends: base.yaml\nmodel:\n  vocab: 100\n")
    with pytest.raises(SpecError) as info:
        load_spec(child)
    assert info.value.loc.file.endswith("base.yaml") and info.value.loc.line == 9


def test_extends_in_text_without_a_file():
    with pytest.raises(SpecError, match="'extends' needs a spec file"):
        load_spec_text("extends: base.yaml\n" + BASE, FILE)


def test_bad_override_value(tmp_path):
    p = _write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError) as info:
        load_spec(p, {"model.d_model": "big"})
    e = info.value
    assert str(e) == "--set model.d_model: model.d_model: expected a positive integer, found 'big'"


def test_misspelt_override_key(tmp_path):
    p = _write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError) as info:
        load_spec(p, {"model.dmodel": 64})
    e = info.value
    assert e.message == "unknown key 'dmodel'" and e.hint == "did you mean 'd_model'?"
    assert e.loc.file == "--set model.dmodel"


def test_override_creating_an_unknown_section_names_the_override(tmp_path):
    p = _write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError) as info:
        load_spec(p, {"model.blok.mlp": "gelu"})
    e = info.value
    assert e.path == "model.blok" and e.loc.file == "--set model.blok.mlp" and "'block'" in e.hint


def test_override_through_a_scalar(tmp_path):
    p = _write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError, match="'model.vocab' is not a mapping"):
        load_spec(p, {"model.vocab.size": 3})


@pytest.mark.parametrize(
    "text, message",
    [
        ("model.d_model", "expected key=value"),
        ("model.d_model=[1", "bad --set value '[1'"),
    ],
)
def test_bad_override_syntax(text, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[")):
        parse_override(text)


def test_bad_override_key():
    with pytest.raises(SpecError, match="bad override key 'model..d_model'"):
        load_spec("hrm-text-tiny", {"model..d_model": 3})


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nothere.yaml")
    e = info.value
    assert e.message.startswith("spec file not found:") and e.loc is None
    assert "shipped specs: " in e.hint and "hrm-text-tiny" in e.hint


def test_missing_spec_file_close_to_a_shipped_one():
    with pytest.raises(SpecError) as info:
        load_spec("hrm-text-tiy")
    assert info.value.hint == "did you mean 'hrm-text-tiny'?"


def test_not_utf8(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_bytes(b"name: \xff\n")
    with pytest.raises(SpecError, match="expected UTF-8 text"):
        load_spec(p)


def test_every_problem_of_the_model_section_is_reported_at_once():
    """Four independent mistakes, four problems, each at its place in file order; a mistake's consequences (a
    module standing in for one with a problem) add none."""
    text = (edit("  vocab: 64\n", "  vocab: sixty-four\n")
            .replace("L: {layers: 1}", "L: {layres: 1}", 1)
            .replace("init: buffer", "init: bufer", 1)
            .replace("output: z_H", "output: z_h", 1))
    with pytest.raises(SpecProblems) as info:
        load_spec_text(text, FILE)
    got = [(p.path, p.loc.line) for p in info.value.problems]
    want = ["model.vocab", "model.modules.L.layres", "model.states.z_L.init", "model.output"]
    assert [p for p, _ in got] == want, got
    assert [line for _, line in got] == sorted(line for _, line in got)
    assert str(info.value).startswith("4 problems:\n") and "did you mean 'z_H'?" in str(info.value)


def test_a_problem_and_its_echo_at_the_same_place_are_reported_once():
    from hrmspec.errors import Gather

    gather = Gather()
    for message in ("first", "its echo"):
        gather(lambda m=message: (_ for _ in ()).throw(SpecError(m, Location(FILE, 3, 5), "model.x")))
    with pytest.raises(SpecError) as info:
        gather.done()
    assert not isinstance(info.value, SpecProblems) and info.value.message == "first"


@pytest.mark.parametrize("section, message", [("modules", "expected at least one module"),
                                              ("states", "expected at least one state")])
def test_an_empty_modules_or_states_key_is_one_located_problem(section, message):
    """`modules:` with nothing under it (null) is no module at all: said at the key, with no traceback."""
    lines = BASE.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {section}:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    "))
    text = "".join(lines[:start + 1] + lines[end:])
    with pytest.raises(SpecError) as info:
        load_spec_text(text, FILE)
    problems = info.value.problems if isinstance(info.value, SpecProblems) else [info.value]
    assert any(message in p.message and p.path == f"model.{section}" for p in problems), str(info.value)
