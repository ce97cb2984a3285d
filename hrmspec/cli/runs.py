"""The commands that run a model: train, eval, generate, plot, consolidate, compare.

Their parsers are built with the CLI's; what they run (torch, the training loop, matplotlib) is
imported when a command runs, so `hrmspec validate` and `show` start without it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hrmspec import progress
from hrmspec.backends import BACKENDS
from hrmspec.errors import CheckpointError, HrmspecError
from hrmspec.runtime.artifacts import preflight
from hrmspec.runtime.artifacts.config import DEVICE_NAMES, TrainError, check_device_name
from hrmspec.runtime.artifacts.data import DataError, Sample, format_sample
from hrmspec.runtime.artifacts.plot import plot_readouts, plot_run
from hrmspec.runtime.training.compare_report import print_table, write_report
from hrmspec.spec.arguments import positive_int, spec_arguments, spec_from_arguments
from hrmspec.spec.source import parse_override


def cmd_train(args) -> int:
    from hrmspec.runtime.training.loop import train

    spec = spec_from_arguments(args)
    # what the run would refuse, all at once and located, before its folder is made or locked
    preflight.check(spec, preflight.source_of(args.spec, dict(parse_override(o) for o in args.overrides)))
    with progress.shown():  # data generation, tokenizer training: a line each, from the first seconds
        last = train(spec, args.out, resume=args.resume, fsdp=args.fsdp, progress_bar=not args.no_progress,
                     overwrite=args.overwrite, backend=args.backend, device=args.device)
    if last:
        print(f"step {last['step']}: loss {last['loss']:.4f}; checkpoints in {args.out}/checkpoints")
    return 0


def cmd_eval(args) -> int:
    from hrmspec.runtime.evaluate.adaptive_eval import loss_text
    from hrmspec.runtime.evaluate.heldout import evaluate_run, sample_lines

    if args.per_cycle:
        return _per_cycle(args)
    if any(getattr(args, k, None) is not None for k in ("vote_augment", "trajectories", "noise", "noise_state", "pick",
                                                        "ensemble", "seed")):
        return _scaling(args)
    if args.show is not None:
        return _show(args)
    res = evaluate_run(args.dir, n=args.n, tasks=args.tasks, all_segments=args.all_segments,
                       backend=args.backend or "auto", device=args.device or "auto", depth=depth_policy(args),
                       allow_nonfinite=args.allow_nonfinite, data_dir=args.data)
    if "exact_accuracy" in res:  # a dataset folder in the official layout, scored as the official code does
        from hrmspec.runtime.evaluate.puzzles import summary_lines

        print("\n".join(summary_lines(res)))
        if res.get("limited_by"):
            print(f"ran {res['n']:,} of --n {res['requested']:,}: {res['limited_by']}")
        if res.get("samples"):
            print("sample predictions:", *sample_lines(res), sep="\n")
        print(f"checkpoint {res['checkpoint']}")
        wrote = [f"{args.dir}/eval-{res['label']}.json", f"{args.dir}/eval.json"]
        if any(k.startswith("ARC/") for k in res):
            wrote.append(f"{args.dir}/submission.json")
        print(f"wrote {', '.join(wrote)}")
        return 0
    t = Table(title="Held-out accuracy")
    t.add_column("task")
    t.add_column("accuracy", justify="right")
    t.add_column("n", justify="right")
    for name, r in res["tasks"].items():
        t.add_row(name, f"{100 * r['accuracy']:.1f}%", str(r["n"]))
    t.add_row("[bold]all[/bold]", f"[bold]{100 * res['accuracy']:.1f}%[/bold]", str(res["n"]))
    Console().print(t)
    print(f"checkpoint {res['checkpoint']}")  # on its own line: a table caption would wrap a long path
    if res.get("limited_by"):  # how many samples ran, and why fewer than --n
        print(f"ran {res['n']} of --n {res['requested']}: {res['limited_by']}")
    else:
        print(f"ran {res['n']} held-out samples (--n {res.get('requested', args.n or 200)})")
    if res.get("loss") is not None:  # under --exit: full depth's, printed below
        grid = "max_segments" in res
        what = f"cross-entropy per cell, {res['loss_tokens']} cells" if grid else \
            f"response tokens teacher-forced, {res['loss_tokens']} tokens"
        print(f"held-out {loss_text(res)}: {what}")
    if res.get("samples"):
        print("sample predictions:", *sample_lines(res), sep="\n")
    if res.get("max_segments", 1) > 1:  # deep supervision: what halting spared
        print(_steps_line(res["segments"], res["max_segments"], "segments per puzzle", "segments"))
    if "steps" in res:  # halting per step of the loop
        print(_steps_line(res["steps"], res["max_steps"]))
    if "full_depth" in res:  # adaptive depth, against full depth
        from hrmspec.runtime.evaluate.adaptive_eval import report_lines

        print("\n".join(report_lines(res)))
    print(f"wrote {args.dir}/eval-{res['label']}.json and {args.dir}/eval.json")
    return 0


def _scaling(args) -> int:
    """`eval` with test-time scaling options: every prefix setting's segments per puzzle and accuracy, as a table
    (runtime/evaluate/scaling.py)."""
    from hrmspec.runtime.evaluate.scaling import Options, evaluate_scaling, setting_label

    if args.exit or args.max_steps is not None or args.warm_start or args.all_steps or args.threshold is not None \
            or args.compile or getattr(args, "show", None) is not None:
        raise HrmspecError("--vote-augment, --trajectories, --noise and --ensemble solve grid puzzles in segments: "
                           "they take --n, --tasks, --data, --all-segments, --backend, --device and --allow-nonfinite "
                           "only")
    opts = Options(vote_augment=args.vote_augment or 1, trajectories=args.trajectories or 1, noise=args.noise,
                   noise_state=tuple(args.noise_state) if args.noise_state else None, pick=args.pick or "q",
                   ensemble=tuple(args.ensemble or ()), seed=args.seed or 0)
    res = evaluate_scaling(args.dir, opts, n=args.n, tasks=args.tasks, all_segments=args.all_segments,
                           backend=args.backend or "auto", device=args.device or "auto",
                           allow_nonfinite=args.allow_nonfinite, data_dir=args.data)
    t = Table(title=f"Test-time scaling, {res['n']} puzzles")
    t.add_column("setting")
    t.add_column("segments / puzzle", justify="right")
    t.add_column("accuracy", justify="right")
    for s in res["settings"]:
        t.add_row(setting_label(s, bool(res["ensemble"])), f"{s['segments']:.2f}", f"{100 * s['accuracy']:.1f}%")
    Console().print(t)
    print("k: augmented copies voted, n: trajectories per copy" + (", m: runs voting" if res["ensemble"] else "") +
          f" (noise {res['noise']:g}, pick {res['pick']})")
    if res.get("limited_by"):
        print(f"ran {res['n']} puzzles: {res['limited_by']}")
    print(f"checkpoint {', '.join(res['checkpoints'])}")
    print(f"wrote {args.dir}/eval-scaling.json and {args.dir}/eval-scaling.png")
    return 0


def _per_cycle(args) -> int:
    from hrmspec.runtime.evaluate.readout import Readout, readout_run

    if (args.tasks or args.all_segments or args.all_steps or args.threshold is not None or args.exit or args.compile
            or args.data):
        raise HrmspecError("--per-cycle reads out one forward at the spec's full depth on the spec's held-out rows: "
                           "it takes --n, --backend, --device and --allow-nonfinite only")
    res = readout_run(args.dir, n=args.n or 64, backend=args.backend or "auto", device=args.device or "auto",
                      allow_nonfinite=args.allow_nonfinite)
    shown = Readout(res["points"], res["calls"], res["rows"], res["tokens"])
    print("\n".join(shown.lines()))
    print(f"checkpoint {res['checkpoint']}")
    print(f"wrote {args.dir}/readout.json")
    return 0


def _show(args) -> int:
    """`eval --show K`: the first K held-out puzzles of a grid run drawn after each segment, to DIR/show-<i>.png."""
    import torch

    from hrmspec.runtime.artifacts.draw_grids import check_grid_run, grid_figure, save_figure, segment_grids
    from hrmspec.runtime.artifacts.grids import GridConfig
    from hrmspec.runtime.artifacts.placement import to_device
    from hrmspec.runtime.artifacts.puzzle_data import SOURCE, PuzzleSource, is_puzzle_source
    from hrmspec.runtime.evaluate.heldout import held_out_set, load_run
    from hrmspec.runtime.evaluate.puzzles import kind_of

    if args.show < 1:
        raise HrmspecError(f"--show {args.show}: expected a number of puzzles >= 1")
    if (args.tasks or args.all_segments or args.all_steps or args.threshold is not None or args.exit or args.compile
            or args.n is not None):
        raise HrmspecError("--show draws the first K held-out puzzles with every segment run: it takes --data, "
                           "--backend, --device and --allow-nonfinite only")
    run = Path(args.dir)
    check_grid_run(run, "--show")  # before the model is loaded
    model, _, spec, _ = load_run(run, backend=args.backend or "auto", device=args.device or "auto",
                                 allow_nonfinite=args.allow_nonfinite)
    data = {"source": SOURCE, "path": str(args.data)} if args.data else dict(spec.data)
    try:
        if args.data or is_puzzle_source(data):
            rows = PuzzleSource.from_dict(data).split("test")
            kind, count = kind_of(rows), min(args.show, len(rows))
            batch = rows.batch(torch.arange(count)) if count else None
            side = round(len(batch["input_ids"][0]) ** 0.5) if count else 0
            names = [kind] * count
        else:
            rows = held_out_set(GridConfig.from_dict(data))
            count = min(args.show, len(rows))
            batch = rows.batch(torch.arange(count)) if count else None
            side, names = rows.side, rows.tasks[:count]
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if not count:
        raise HrmspecError(f"--show: {run} has no held-out puzzles to draw")
    batch = to_device(batch, model.embed.weight.device)
    records = segment_grids(model, batch)
    inputs, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    for i in range(count):
        fig = grid_figure(records[i], names[i], side, label=labels[i], puzzle=inputs[i],
                          title=f"held-out puzzle {i} ({names[i] or 'grid'})")
        print(f"wrote {save_figure(fig, run / f'show-{i}.png')}")
    if count < args.show:
        print(f"drew {count} of --show {args.show}: the held-out set holds {len(rows)}")
    return 0


MAX_NEW_TOKENS = 64  # generate's default answer length, when the model has room for it


def cmd_generate(args) -> int:
    import torch

    from hrmspec.runtime.evaluate.heldout import load_run
    from hrmspec.runtime.execution.depth import DecodeStats

    _utf8(args.prompt, "the prompt")  # before the model is loaded
    if args.condition is not None:
        _utf8(args.condition, "--condition")
    model, tok, spec, _ = load_run(args.dir, backend=args.backend or "auto", device=args.device or "auto",
                                   allow_nonfinite=args.allow_nonfinite)
    depth = depth_policy(args)
    if depth.exit is not None:  # a criterion or a spec adaptive depth cannot run: refused before anything is decoded
        from hrmspec.runtime.evaluate.adaptive_eval import checked

        depth = checked(model, depth)
    if tok is None:  # a grid run: the prompt is a puzzle
        return _solve_grid(model, spec, args)
    limit = spec.model.max_seq_len
    if len(args.prompt) > 8 * limit:  # longer than any tokenization could fit: refused before encoding
        raise DataError(f"the prompt is {len(args.prompt):,} characters; model.max_seq_len is {limit} tokens")
    prompt, _ = format_sample(Sample(instruction=args.prompt, response="", condition=args.condition))
    ids = torch.tensor([tok.encode(prompt)])
    room = limit - ids.shape[1]  # the tokens the model can still read after the prompt
    if args.max_new_tokens is None and room < 1:
        raise DataError(f"the prompt is {ids.shape[1]} tokens and model.max_seq_len is {limit}: no room is left for "
                        "an answer; shorten the prompt")
    if args.max_new_tokens is None:  # the default, capped to what fits
        new_tokens = min(MAX_NEW_TOKENS, room)
        if new_tokens < MAX_NEW_TOKENS:
            print(f"note: at most {new_tokens} new tokens (not the default {MAX_NEW_TOKENS}): the prompt is "
                  f"{ids.shape[1]} tokens and model.max_seq_len {limit}", file=sys.stderr)
    elif args.max_new_tokens > room:
        raise DataError(f"the prompt is {ids.shape[1]} tokens and --max-new-tokens {args.max_new_tokens}: more than "
                        f"model.max_seq_len {limit}; shorten the prompt or lower --max-new-tokens")
    else:
        new_tokens = args.max_new_tokens
    stats = DecodeStats()
    out = model.generate(ids, new_tokens, eos_id=tok.eos_id, temperature=args.temperature, top_k=args.top_k,
                         depth=depth, stats=stats)
    row = out[0, ids.shape[1] :].tolist()
    if tok.eos_id in row:
        row = row[: row.index(tok.eos_id)]
    print(tok.decode(row, skip_special=True))
    if depth.exit is not None:  # adaptive depth: the steps each position ran
        from hrmspec.runtime.evaluate.adaptive_eval import depth_lines, depth_summary

        print("\n".join(depth_lines(depth_summary(stats))))
    elif stats.positions:
        print(_steps_line(stats.mean_steps, stats.max_steps))
    return 0


def _generate(args) -> int:
    """`generate`, its --png checked first: an image path, for a grid run (before the model is loaded)."""
    if args.png is not None:
        from hrmspec.runtime.artifacts.draw_grids import check_grid_run, image_format

        image_format(args.png, "--png")
        check_grid_run(args.dir, "--png")
    return cmd_generate(args)


def _utf8(text: str, what: str) -> None:
    """Refuse an argument that is not UTF-8 text (the shell passed raw bytes; Python holds them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"code point U+{ord(bad):04X}"
        raise DataError(f"{what} is not UTF-8 text ({byte} at character {e.start}): pass text the terminal encodes "
                        "as UTF-8") from None


def _steps_line(mean: float, most: int, label: str = "steps per position", unit: str = "steps") -> str:
    """What halting spared: the mean steps (or segments) used of the most there are."""
    return f"{label}: {mean:.2f} of {most} ({100 * (1 - mean / most):.1f}% of the {unit} spared by halting)"


def _solve_grid(model, spec, args) -> int:
    import torch

    from hrmspec.runtime.artifacts.grids import GridConfig, parse_grid, render
    from hrmspec.runtime.execution.supervision import Supervisor

    if (spec.data or {}).get("source") == "hrm_dataset":  # its puzzles are rows of a dataset, not typed text
        raise HrmspecError(f"{args.dir} trained on a dataset folder ({spec.data.get('path')}): draw its held-out "
                           f"puzzles with `hrmspec eval {args.dir} --show K`; generate types puzzles of the "
                           "reasoning-gym grid tasks")
    task = next(iter(GridConfig.from_dict(spec.data).tasks()))
    cells = parse_grid(args.prompt, task, spec.model.max_seq_len)
    side = round(len(cells) ** 0.5)
    device = model.embed.weight.device
    batch = {"input_ids": torch.tensor([cells], device=device), "puzzle_ids": torch.zeros(1, dtype=torch.long,
                                                                                          device=device)}
    supervisor = Supervisor(model)
    logits, steps = supervisor.solve(batch, all_segments=args.all_segments)
    print(render(logits[0].argmax(-1).tolist(), side, task))
    print(f"segments: {int(steps[0])} of {supervisor.spec.segments}")
    if args.png is not None:
        from hrmspec.runtime.artifacts.draw_grids import grid_figure, save_figure, segment_grids

        records = segment_grids(model, batch)[0]
        fig = grid_figure(records, task, side, puzzle=cells, title=f"{task}: every segment run")
        print(f"wrote {save_figure(fig, args.png, what='--png')}")
    return 0


def cmd_plot(args) -> int:
    path = plot_run(args.dir, args.out)
    print(f"wrote {path}")
    readouts = plot_readouts(args.dir, path.with_name(f"{path.stem}-readout{path.suffix}") if args.out else None)
    if readouts is not None:
        print(f"wrote {readouts}")
    return 0


def cmd_consolidate(args) -> int:
    from hrmspec.runtime.artifacts.checkpoint import latest_checkpoint
    from hrmspec.runtime.artifacts.sharded import consolidate

    folder = Path(args.ckpt)
    if (folder / "checkpoints").is_dir():  # a run: its newest checkpoint
        folder = latest_checkpoint(folder) or folder
    if not folder.is_dir():
        raise CheckpointError(f"{args.ckpt} is not a run or checkpoint folder")
    for path in consolidate(folder):
        print(f"wrote {path}")
    return 0


def _register_consolidate(sub, name):
    p = sub.add_parser(name, help="write an FSDP checkpoint's single-file layout (model/ema.safetensors) from its "
                       "shards")
    p.add_argument("ckpt", help="a sharded checkpoint folder, or a run (its newest checkpoint)")
    p.set_defaults(func=cmd_consolidate)


def _register_train(sub, name):
    p = sub.add_parser(name, help="train a spec on its data: section (see README)")
    spec_arguments(p)
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, tokenizer")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run: delete its checkpoints and metrics first")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _placement_arguments(p, "train.backend", "train.device")
    p.set_defaults(func=cmd_train)


def _nonfinite_argument(p) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or infinity (a diverged run) instead of refusing them")


def _placement_arguments(p, backend_default: str = "auto", device_default: str = "auto") -> None:
    """--backend and --device (runtime/artifacts/placement.py); train's defaults are its train: section's."""
    p.add_argument("--backend", choices=("auto", *BACKENDS), default=None,
                   help=f"the kernels the model runs: auto (Triton on CUDA, the reference on the CPU) or a backend; "
                   f"default {backend_default}")
    p.add_argument("--device", type=_device, default=None, metavar="DEVICE",
                   help=f"{DEVICE_NAMES}: where the model, its batches and state live (auto: CUDA when there is "
                   f"one; under torchrun cuda:LOCAL_RANK); default {device_default}")


def _device(text: str) -> str:
    try:
        return check_device_name(text, "--device")
    except TrainError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _register_eval(sub, name):
    p = sub.add_parser(name, help="decode held-out samples and score them with the tasks' answer checkers")
    p.add_argument("dir", help="a run directory")
    p.add_argument("--tasks", nargs="+", help="evaluate these tasks instead of the spec's")
    p.add_argument("--n", type=positive_int, default=None,
                   help="held-out samples (default 200; a dataset folder: every test example)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="a grid run: evaluate on this dataset folder in the official HRM/TRM layout (hrmspec "
                   "build-data) instead of the spec's data, every segment run, with the official metrics (exact and "
                   "token accuracy; ARC: votes over augmentations, pass@K and submission.json)")
    p.add_argument("--all-segments", action="store_true",
                   help="with deep supervision: run every segment instead of stopping each row where its head says")
    _halting_arguments(p)
    _placement_arguments(p)
    _depth_arguments(p)
    _nonfinite_argument(p)
    p.add_argument("--per-cycle", action="store_true",
                   help="instead of decoding: read the output out through the head after each step of the loop "
                   "(each H cycle) on the first --n held-out rows (default 64), teacher-forced: loss and accuracy "
                   "against depth, "
                   "and each state's norm and change per module call; writes readout.json")
    p.add_argument("--compile", action="store_true",
                   help="decode with the decode step compiled by torch.compile (specs with a fixed unrolling): "
                   "tens of seconds to compile, then faster per token (1.5x eager at batches of 64 on 2 CPU "
                   "cores): for large or repeated evaluations")
    p.add_argument("--show", type=int, default=None, metavar="K",
                   help="a grid run: instead of scoring, draw the first K held-out puzzles' predicted grids after "
                   "each segment (every segment run), with each segment's sigmoid(q_halt), the cells changed since "
                   "the previous segment and the cells wrong against the label; writes DIR/show-<i>.png")
    scaling = p.add_argument_group("test-time scaling (grid runs; any of these options: a table of accuracy against "
                                   "forward segments per puzzle, DIR/eval-scaling.json and DIR/eval-scaling.png)")
    scaling.add_argument("--vote-augment", type=positive_int, default=None, metavar="K",
                         help="solve K copies of each puzzle (itself, then K-1 random symmetries that keep solutions "
                         "solutions: sudoku permutations and transpose, the square's 8 symmetries for n_queens and "
                         "mazes), map the answers back and vote (votes, then mean sigmoid(q_halt)); refused for "
                         "ARC, whose dataset eval already votes over (default 1: no voting)")
    scaling.add_argument("--trajectories", type=positive_int, default=None, metavar="N",
                         help="solve each copy N times as rows of one batch, trajectories 2..N with Gaussian noise "
                         "on the latent states at every segment; reports n = 1, 2, 4, ..., N (default 1)")
    scaling.add_argument("--noise", type=float, default=None, metavar="SIGMA",
                         help="the noise of --trajectories: SIGMA times the state's RMS (per position) times a "
                         "standard normal draw (default 0.1)")
    scaling.add_argument("--noise-state", nargs="+", default=None, metavar="NAME",
                         help="the states the noise goes to (default: every state but the model's output, e.g. z_L "
                         "of HRM, z of TRM)")
    scaling.add_argument("--pick", choices=("q", "vote"), default=None,
                         help="how --trajectories answer: q, the trajectory whose halting head is surest (highest "
                         "q_halt; needs a halting head); vote, every trajectory votes (default q)")
    scaling.add_argument("--ensemble", nargs="+", default=None, metavar="RUN",
                         help="other run folders trained on the same puzzles: they solve the same copies and "
                         "their answers join the vote (the table adds m, the runs voting)")
    scaling.add_argument("--seed", type=int, default=None,
                         help="the seed of the symmetries and the noise: one seed, one result (default 0)")
    p.set_defaults(func=cmd_eval)


def _halting_arguments(p) -> None:
    p.add_argument("--all-steps", action="store_true",
                   help="with model.halting: run every step of the loop instead of stopping each position where "
                   "its head says")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="with model.halting: the cumulative probability at which a position stops (act's "
                   "1 - epsilon, the exit gate's q), instead of the spec's")


def _depth_arguments(p, command: str = "eval") -> None:
    then = ("eval also runs full depth to compare" if command == "eval" else
            "every generated token's position decides alone, and the steps they ran are printed "
            "after the answer")
    p.add_argument("--exit", metavar="CRITERION", default=None,
                   help="adaptive depth: each position leaves the loop when CRITERION says: kl:EPS, entropy:EPS, "
                   f"latent:EPS, cosine:EPS, argmax:N, or none (full depth); {then} (default: no adaptive depth, "
                   "the spec's full depth)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="adaptive depth: the most steps of the loop (default: its evaluation count)")
    p.add_argument("--warm-start", action="store_true",
                   help="adaptive depth: start each decoded token's loop states from the previous token's")


def depth_policy(args):
    """The depth options of `eval` and `generate` as one DepthPolicy (runtime/execution/depth.py): the exit
    criterion (--max-steps or --warm-start alone: --exit none), --all-steps, --threshold, --compile."""
    from hrmspec.runtime.execution.depth import DepthPolicy

    adaptive = args.exit is not None or args.max_steps is not None or args.warm_start
    return DepthPolicy(exit=("none" if args.exit is None else args.exit) if adaptive else None,
                       max_steps=args.max_steps, warm_start=args.warm_start, all_steps=args.all_steps,
                       threshold=args.threshold, compile=getattr(args, "compile", False))


def _probability(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], found {text}")
    return v


def _register_generate(sub, name):
    p = sub.add_parser(name, help="answer one prompt with a trained run (a grid run: solve one puzzle)")
    p.add_argument("dir", help="a run directory")
    p.add_argument("prompt", help="the instruction; for a grid run the puzzle, row by row, '.' or 0 for an "
                   "empty cell (e.g. '1.3. .4.. ..1. 3...')")
    p.add_argument("--condition", default=None,
                   help="a condition the run trained with, put in the prompt as its token <|NAME|>, e.g. direct or "
                   "cot (default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help=f"the most tokens to generate; decoding stops earlier at the end-of-answer token (default "
                   f"{MAX_NEW_TOKENS}, capped at model.max_seq_len minus the prompt's tokens; a larger N than fits "
                   "is an error)")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="sampling temperature, a number >= 0 (default 0: greedy, the most likely token)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="with --temperature above 0: sample among the K most likely tokens only (default: all)")
    p.add_argument("--all-segments", action="store_true",
                   help="a grid run: run every segment instead of stopping where the halting head says")
    p.add_argument("--png", metavar="OUT", default=None,
                   help="a grid run: also draw the predicted grid after each segment (every segment run) to OUT "
                   "(.png, .svg or .pdf), with each segment's sigmoid(q_halt) and the cells that changed")
    _halting_arguments(p)
    _placement_arguments(p)
    _depth_arguments(p, "generate")
    _nonfinite_argument(p)
    p.set_defaults(func=_generate)


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (0.0 <= v < float("inf")):  # nan fails too
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, found {text[:20]!r}")
    return v


def cmd_compare(args) -> int:
    from hrmspec.runtime.training.compare import (
        Budget,
        CompareError,
        load_specs,
        parse_sweep,
        plan_runs,
        read_data,
        run_compare,
    )

    budget = Budget.parse(args.budget)
    if args.n < 1 or args.evals < 0:
        raise CompareError(f"--n must be >= 1 and --evals >= 0, found {args.n} and {args.evals}")
    specs = load_specs(args.spec, dict(parse_override(o) for o in args.overrides),
                       [parse_sweep(s) for s in args.sweeps])
    plans = plan_runs(specs, budget, read_data(args.data), evals=args.evals, eval_n=args.n, seeds=args.seeds)
    runs = run_compare(plans, budget, args.out, eval_n=args.n, progress_bar=not args.no_progress)
    print_table(runs, str(budget))
    md, png = write_report(Path(args.out), runs, str(budget), args.n)
    print(f"wrote {Path(args.out) / 'compare.json'}, {md}, {png}")
    failed = [r.get("run") or r["spec"] for r in runs if r.get("status") != "done"]
    if failed:
        what = "runs" if args.seeds > 1 else "specs"
        print(f"{len(failed)} of {len(runs)} {what} failed ({', '.join(failed)}); their errors are in compare.json; "
              "run the same command again to retry them")
    return 1 if failed else 0


def _register_compare(sub, name):
    p = sub.add_parser(name, help="train several specs on the same data and budget; compare held-out accuracy")
    p.add_argument("spec", nargs="+", help="spec files or shipped specs' names")
    p.add_argument("--budget", required=True, metavar="KIND=X",
                   help="flops=X (each spec's steps from its training FLOPs per step), tokens=X or steps=N; "
                   "X like 1e15, 2.5T, 40M")
    p.add_argument("--data", help="the data: section every spec trains on: a YAML file or inline YAML "
                   "(default: the one the specs' data: sections agree on)")
    p.add_argument("--out", required=True, help="folder: one run folder per spec, compare.json, .md and .png")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every spec (e.g. --set train.batch_size=8)")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="train a variant of each spec per value (e.g. --sweep model.schedule[0].repeat=1,2,4); "
                   "several --sweep give their grid (every combination); values are YAML as in --set, "
                   "KEY=[...] for values with commas")
    p.add_argument("--n", type=int, default=200, help="held-out samples each spec is scored on (default 200)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train each spec N times, train.seed = its own, +1, ... (default 1); the report gives every "
                   "run and each spec's mean and range")
    p.add_argument("--evals", type=int, default=3,
                   help="held-out evaluations during each run, for the accuracy-vs-FLOPs curve (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)


def _register_plot(sub, name):
    p = sub.add_parser(name, help="plot loss, accuracy, credit depth and halting steps of a run to a PNG (a compare "
                       "folder: each variant's loss)")
    p.add_argument("dir", help="a run directory, or the --out folder of `hrmspec compare`")
    p.add_argument("--out", default=None, help="PNG path (default DIR/training.png)")
    p.set_defaults(func=cmd_plot)


COMMANDS: list[tuple[str, object]] = [
    ("train", _register_train), ("eval", _register_eval), ("generate", _register_generate), ("plot", _register_plot),
    ("consolidate", _register_consolidate), ("compare", _register_compare),
]

__all__ = ["COMMANDS", "argparse"]
