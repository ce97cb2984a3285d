"""What `show`, `plot` and `generate` tell a user: show's assumptions and its agreement with cost, the
schedule drawing's inputs and halting heads, the training plot's panels, and generate's defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_hostile_input import MODEL

from hrmspec.cli import main
from hrmspec.cost import seq_len_and_source
from hrmspec.spec.load import load_spec

SPECS = sorted(p.stem for p in Path("specs").glob("*.yaml"))


def _row(out: str, label: str) -> str:
    """The value column of the table row `label` in rich's output."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[0] == label:
            return cells[1]
    raise AssertionError(f"no row {label!r} in:\n{out}")


def _show_forward(out: str) -> str:
    """show's forward FLOPs per token as cost prices them: a sampled loop's mean over its count."""
    for line in out.splitlines():
        if "forward FLOPs, mean over the sampled count" in line:
            return line.strip("│ ").split("│")[1].strip()
    return _row(out, "forward FLOPs")


# -- show: the row length it assumed, and agreement with cost ------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("seq_len", [None, "96"])
def test_show_and_cost_agree_on_forward_flops(capsys, name, seq_len):
    given = [] if seq_len is None else ["--seq-len", seq_len]
    assert main(["show", name, *given]) == 0
    shown = capsys.readouterr().out
    assert main(["cost", name, "--tokens", "1e9", "--json", *given]) == 0
    priced = json.loads(capsys.readouterr().out)
    from hrmspec.graph.analysis import human

    assert _show_forward(shown) == human(priced["forward_flops_per_token"])
    # the header says the row length it counted attention at, and why
    length, why = (int(seq_len), "--seq-len") if seq_len else seq_len_and_source(load_spec(name))
    assert length == priced["seq_len"]
    assert f"attention at {length} tokens: {why}" in shown
    assert f"Cost per token at sequence length {length}" in shown


def test_show_counts_attention_at_train_seq_len_not_2048(capsys):
    spec = load_spec("hrm-text-tiny", {"model.max_seq_len": 128, "train.seq_len": 128})
    assert seq_len_and_source(spec) == (128, "train.seq_len")
    assert main(["show", "hrm-text-tiny", "--set", "model.max_seq_len=128", "--set", "train.seq_len=128"]) == 0
    out = capsys.readouterr().out
    assert "attention at 128 tokens: train.seq_len" in out
    assert "2048" not in out
    assert _row(out, "activation memory for one 128-token row")


def test_without_train_seq_len_the_model_row_is_used(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(MODEL.replace("MAX", "48"))
    assert main(["show", str(spec)]) == 0
    assert "attention at 48 tokens: model.max_seq_len" in capsys.readouterr().out


def test_a_grid_row_is_its_cells_and_puzzle_positions():
    spec = load_spec("hrm-act")
    length, why = seq_len_and_source(spec)
    assert length == spec.model.max_seq_len + spec.model.puzzle.positions
    assert why.startswith("a grid row")


# -- generate: documented defaults that fit the model ---------------------------------------------------------

# the one-layer model of the hostile-input tests, max_seq_len filled in per test


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run of a model with room for 64 tokens, trained one step."""
    root = tmp_path_factory.mktemp("gen")
    samples = "".join(json.dumps({"instruction": f"add {i} and 1", "response": str(i + 1)}) + "\n" for i in range(30))
    (root / "train.jsonl").write_text(samples)
    (root / "s.yaml").write_text(MODEL.replace("MAX", "64") + "data: {source: jsonl, path: train.jsonl, "
                                 "eval_path: train.jsonl}\ntrain: {steps: 1, batch_size: 2, seq_len: 64}\n")
    assert main(["train", str(root / "s.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def test_generate_caps_the_default_to_the_model_and_says_so(tiny_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(tiny_run), "add 2 and 1"]) == 0
    err = capsys.readouterr().err
    cap = re.search(r"at most (\d+) new tokens \(not the default 64\): the prompt is (\d+) tokens and "
                    r"model.max_seq_len 64", err)
    assert cap, err
    assert int(cap[1]) + int(cap[2]) == 64 and int(cap[1]) < 64


def test_an_explicit_length_that_fits_is_used_silently_and_one_that_does_not_is_an_error(tiny_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(tiny_run), "add 2 and 1", "--max-new-tokens", "3"]) == 0
    assert "new tokens" not in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "add 2 and 1", "--max-new-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 64: more than model.max_seq_len 64" in err and err.count("\n") == 1


def test_a_prompt_that_fills_the_model_is_one_line(tiny_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(tiny_run), " ".join(["add"] * 60)]) == 2
    err = capsys.readouterr().err
    assert "model.max_seq_len is 64: no room is left for an answer" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _subcommand(name: str):
    import argparse

    from hrmspec.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def test_generate_help_gives_every_default():
    options = {o: a for a in _subcommand("generate")._actions for o in a.option_strings}
    for option, default in [("--max-new-tokens", "default 64, capped at model.max_seq_len"), ("--top-k", "default"),
                            ("--temperature", "default 0"), ("--condition", "default"), ("--exit", "default")]:
        assert default in (options[option].help or ""), option
    assert "eval also runs full depth" not in options["--exit"].help
    assert "generate" in options["--exit"].help
    eval_options = {o: a for a in _subcommand("eval")._actions for o in a.option_strings}
    assert "eval also runs full depth" in eval_options["--exit"].help


# -- plot: synthetic metrics.jsonl files ------------------------------------------------------------------


def _run_folder(root: Path, name: str, records: list[dict], spec: str | None = "hrm-text-tiny",
                overrides: dict | None = None) -> Path:
    """A run folder as training leaves it: metrics.jsonl and, with `spec`, the resolved spec.yaml."""
    import yaml

    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if spec is not None:
        (run / "spec.yaml").write_text(yaml.safe_dump(load_spec(spec, overrides).raw, sort_keys=False))
    return run


def _records(at: list[int], depth=None, **per_step) -> list[dict]:
    """Log lines at steps `at`: a loss falling from 4.2 to 3.5, the credit depth `depth(step)`, other fields."""
    out = []
    for i, s in enumerate(at):
        rec = {"step": s, "loss": 4.2 - 0.7 * i / max(1, len(at) - 1), "lr": 1e-3,
               "credit_depth": depth(s) if depth else None}
        out.append({**rec, **{k: v[i] for k, v in per_step.items()}})
    return out


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_credit_none_is_no_credit_limit_not_a_flat_zero(tmp_path):
    from hrmspec.runtime.artifacts.plot import training_figure

    run = _run_folder(tmp_path, "r", _records([10, 20, 30]), overrides={"model.credit": "none"})
    credit = training_figure(run).axes[2]
    assert credit.get_lines() == [] and any("no credit limit" in t for t in _texts(credit))


def test_other_credit_plans_say_they_have_no_ramp(tmp_path):
    from hrmspec.runtime.artifacts.plot import training_figure

    run = _run_folder(tmp_path, "r", _records([10, 20]), overrides={"model.credit": {"last": 3}})
    credit = training_figure(run).axes[2]
    assert credit.get_lines() == [] and any("last 3" in t and "no depth ramp" in t for t in _texts(credit))


def test_the_credit_ramp_starts_at_step_0_with_the_specs_first_depth(tmp_path):
    from hrmspec.graph.credit_plan import credit_depth
    from hrmspec.runtime.artifacts.plot import training_figure

    credit = load_spec("hrm-text-tiny").model.credit
    steps = list(range(10, 101, 10))
    run = _run_folder(tmp_path, "r", _records(steps, lambda s: credit_depth(credit, s / 100)))
    (line,) = training_figure(run).axes[2].get_lines()
    x, y = list(line.get_xdata()), list(line.get_ydata())
    assert x == [0, *steps]
    assert y[0] == credit.depth_from and y[1:] == [credit_depth(credit, s / 100) for s in steps]
    assert y[0] < y[-1] == credit.depth_to


def test_without_a_readable_spec_the_ramp_starts_at_the_first_logged_depth(tmp_path):
    from hrmspec.runtime.artifacts.plot import training_figure

    run = _run_folder(tmp_path, "r", _records([10, 20, 30], lambda s: 2 + s // 20), spec=None)
    (line,) = training_figure(run).axes[2].get_lines()
    assert list(line.get_xdata()) == [0, 10, 20, 30] and list(line.get_ydata()) == [2, 2, 3, 3]


@pytest.mark.parametrize("key, spec, most", [("steps", "ut", 8), ("segments", "hrm-act", 16)])
def test_halting_steps_are_plotted_with_the_most_there_are(tmp_path, key, spec, most):
    from hrmspec.runtime.artifacts.plot import training_figure

    values = [most * 0.9, most * 0.6, most * 0.4]
    run = _run_folder(tmp_path, "r", _records([5, 10, 15], **{key: values}), spec=spec)
    fig = training_figure(run)
    assert len(fig.axes) == 4
    lines = fig.axes[3].get_lines()
    assert list(lines[0].get_xdata()) == [5, 10, 15] and list(lines[0].get_ydata()) == values
    assert [tuple(line.get_ydata()) for line in lines[1:]] == [(most, most)]
    assert ("position" if key == "steps" else "segments") in fig.axes[3].get_ylabel()


def test_a_run_without_halting_has_three_panels(tmp_path):
    from hrmspec.runtime.artifacts.plot import training_figure

    assert len(training_figure(_run_folder(tmp_path, "r", _records([1, 2]))).axes) == 3


def _tick_labels(fig, axis) -> list[str]:
    fig.canvas.draw()
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [t.label1.get_text() for t in ticks if t.label1.get_visible() and t.label1.get_text()]


@pytest.mark.parametrize("low, high", [(3.5, 4.2), (0.4, 3.0), (0.9, 20.0), (6.1, 6.1)])
def test_loss_ticks_are_plain_numbers_over_small_ranges(tmp_path, low, high):
    from hrmspec.runtime.artifacts.plot import training_figure

    records = [{"step": s, "loss": low + (high - low) * s / 9, "credit_depth": None} for s in range(10)]
    fig = training_figure(_run_folder(tmp_path, "r", records))
    loss = fig.axes[0]
    labels = _tick_labels(fig, loss.yaxis)
    lo, hi = loss.get_ylim()
    shown = [float(t) for t in labels]  # plain numbers: "3.8", never "3.8×10⁰" or "$\\mathdefault{10^{0}}$"
    assert len([v for v in shown if lo <= v <= hi]) >= 2, labels


def _compare_folder(root: Path) -> Path:
    folder = root / "cmp"
    folder.mkdir()
    _run_folder(folder, "a", _records([1, 2, 3]))
    _run_folder(folder, "b", [{**r, "loss": r["loss"] / 2} for r in _records([1, 2, 3, 4])])
    outside = _run_folder(root, "outside", _records([1, 2]))
    runs = [{"spec": "a", "run": "a", "folder": "a"}, {"spec": "b", "run": "b", "folder": "b"},
            {"spec": "evil", "folder": "../outside"}, {"spec": "abs", "folder": str(outside)}]
    (folder / "compare.json").write_text(json.dumps({"budget": {"kind": "steps", "value": 3}, "runs": runs}))
    return folder


def test_plot_on_a_compare_folder_draws_each_variants_loss(tmp_path, capsys):
    from hrmspec.runtime.artifacts.plot import compare_figure

    folder = _compare_folder(tmp_path)
    (ax,) = compare_figure(folder).axes
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b"]  # the runs outside the folder are left out
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [3, 4]
    assert main(["plot", str(folder)]) == 0
    assert (folder / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {folder / 'training.png'}" in capsys.readouterr().out


def test_plot_on_a_compare_folder_replaces_a_linked_output(tmp_path, capsys):
    folder = _compare_folder(tmp_path)
    aim = tmp_path / "aim.txt"
    aim.write_text("keep")
    (folder / "training.png").symlink_to(aim)
    assert main(["plot", str(folder)]) == 0
    assert aim.read_text() == "keep" and not (folder / "training.png").is_symlink()


def test_a_compare_folder_without_metrics_is_one_line(tmp_path, capsys):
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "compare.json").write_text(json.dumps({"runs": [{"spec": "a", "folder": "a", "status": "failed"}]}))
    assert main(["plot", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "compare.md" in err and err.count("\n") == 1 and not (folder / "training.png").exists()


# -- show --png: what the drawing lays out -------------------------------------------------------------------


def _layout(name: str, overrides: dict | None = None):
    from hrmspec.graph import build_graph
    from hrmspec.graph.draw import schedule_layout

    G = build_graph(load_spec(name, overrides))
    return G, schedule_layout(G)


@pytest.mark.parametrize("name", SPECS)
def test_the_input_is_drawn_as_an_input_in_a_row_of_its_own(name):
    G, layout = _layout(name)
    (x,) = layout.kind("input")
    assert x.node == "x" and "input" in x.sub
    assert x.y == layout.rows["input"]
    assert all(b.y != x.y for b in layout.boxes if b is not x)  # no module call, state or head in its row
    assert not [b for b in layout.kind("init") if b.node == "x"]
    # the calls that read x get an arrow from it, labelled as the input
    readers = {n for n, a in G.nodes(data=True) if "x" in a.get("inputs", ())}
    assert {a.dst for a in layout.arrows if a.src == "x" and a.state == "x"} == readers


@pytest.mark.parametrize("name, rule, heads", [("ut", "act", 8), ("ouro", "exit_gate", 4), ("hrm-act", "q_learning", 1),
                                               ("trm-tiny", "bce", 1), ("hrm-text-tiny", None, 0)])
def test_halting_heads_are_drawn_where_they_read_the_output(name, rule, heads):
    from hrmspec.graph.layout import loop_layout

    G, layout = _layout(name)
    spec = G.graph["spec"]
    found = layout.kind("halting")
    assert layout.halting == rule
    if rule is None:
        assert found == [] and "halting" not in layout.rows
        return
    assert len(found) == heads
    assert all(b.y == layout.rows["halting"] for b in found)
    calls = {b.node: b for b in layout.kind("call")}
    into = {a.dst: a for a in layout.arrows if a.dst.startswith("halt:")}
    assert set(into) == {b.node for b in found}
    output = spec.model.output
    if spec.model.halting is not None:  # after each step, reading the output as that step left it
        steps = loop_layout(G.graph["calls"]).steps
        for box, step in zip(sorted(found, key=lambda b: b.x), steps):
            last_write = max(c.index for c in G.graph["calls"] if c.target == output and c.index <= step[-1].index)
            assert into[box.node].src == f"call:{last_write}" and into[box.node].state == output
            assert box.x == calls[f"call:{step[-1].index}"].x
    else:  # a segment's head reads the output after the whole schedule, beside the LM head
        (box,) = found
        head = layout.kind("head")[0]
        last_write = max(c.index for c in G.graph["calls"] if c.target == output)
        assert box.x == head.x and into[box.node].src == f"call:{last_write}"


def test_a_drawing_with_halting_heads_is_written(tmp_path):
    from hrmspec.graph import build_graph
    from hrmspec.graph.draw import HALTING_COLOR, INPUT_COLOR, draw_schedule

    path = draw_schedule(build_graph(load_spec("ouro")), tmp_path / "ouro.png")
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    for color in (HALTING_COLOR, INPUT_COLOR):
        assert ((abs(rgb - to_rgb(color)) < 0.02).all(axis=-1)).sum() > 500
