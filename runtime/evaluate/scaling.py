"""Test-time scaling of a grid run: more compute at evaluation for more solved puzzles.

Three ways to spend it, combinable, each a vote of candidate answers:

    augmentation voting   K copies of each held-out puzzle: copy 0 the puzzle itself, then K - 1 random
                          symmetries that map solutions to solutions (sudoku: digit, band, row-in-band,
                          stack, column-in-stack permutations and a transpose; n_queens, maze and official
                          mazes: the 8 symmetries of the square, distinct non-identity ones first). Each copy
                          is solved, its prediction mapped back by the inverse symmetry.
    noisy trajectories    N replicas of each copy as rows of one batch (PTRM, arXiv 2605.19943); replica 0 runs
                          clean (so n = 1 is the plain solve), replicas 1..N-1 get Gaussian noise added to
                          their latent states at the start of every segment (`NoisyTrajectories`). The copy's
                          candidate is the replica whose halting head is surest (highest q_halt, `pick="q"`),
                          or every replica's answer goes to the vote (`pick="vote"`).
    ensembles             other run folders trained on the same data solve the same copies (same symmetries,
                          same noise); their candidates join the main run's in the vote.

The vote is the official ARC rule: candidates ranked by (votes, mean sigmoid(q_halt)), both descending,
the first seen winning a full tie; the answer is the top one. A puzzle counts solved as `eval` counts it:
reasoning-gym grids when the answer is *a* solution (`GRID_TASKS[task].solved`), an official-layout
dataset when every labelled cell matches its label.

Compute is the forward segments actually run: per puzzle, the sum over the rows a setting uses (runs x
copies x replicas) of the segments each ran before halting. One evaluation scores every prefix setting —
runs m = 1..M (the main run first), copies k = 1..K, replicas n = 1, 2, 4, ..., N — from the same rows, so one
call draws accuracy against compute: `RUN/eval-scaling.json` and `RUN/eval-scaling.png`.

ARC datasets hold augmented copies of every task already (dihedral transforms, colour permutations,
translations), and plain `hrmspec eval` votes over them as the official evaluation does (ARC/pass@K):
`--vote-augment` is refused for them; trajectories and ensembles score each example by exact match.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hrmspec.errors import CheckpointError, HrmspecError
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.files import write_text_atomic, writing
from hrmspec.runtime.artifacts.grids import GRID_TASKS, GridConfig, _apply, augmentations
from hrmspec.runtime.artifacts.placement import to_device
from hrmspec.runtime.artifacts.plot import new_figure, save_figure
from hrmspec.runtime.artifacts.puzzle_data import SOURCE as PUZZLES
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSource, is_puzzle_source
from hrmspec.runtime.evaluate.heldout import DEFAULT_N, held_out_set, load_run
from hrmspec.runtime.evaluate.puzzles import kind_of
from hrmspec.runtime.execution.losses import IGNORE_INDEX
from hrmspec.runtime.execution.supervision import Supervisor

RESULT_FILE = "eval-scaling.json"
PLOT_FILE = "eval-scaling.png"
DEFAULT_NOISE = 0.1  # sigma when trajectories > 1 and no --noise: a tenth of each state's RMS
BATCH_ROWS = 256  # rows (copies x replicas of a few puzzles) one solve computes
PICKS = ("q", "vote")


# ---------------------------------------------------------------------------------------------
# symmetries


@dataclass(frozen=True)
class Symmetry:
    """A relabelling of a grid row: cell i of the new row is cell order[i] of the old one, and a token t
    becomes values[t]. Both are permutations, so it has an inverse (`inverse`)."""

    order: tuple[int, ...]
    values: tuple[int, ...]

    @classmethod
    def identity(cls, cells: int, vocab: int) -> Symmetry:
        return cls(tuple(range(cells)), tuple(range(vocab)))

    @property
    def is_identity(self) -> bool:
        return self.order == tuple(range(len(self.order))) and self.values == tuple(range(len(self.values)))

    def apply(self, tokens: Sequence[int]) -> list[int]:
        return _apply(list(tokens), list(self.order), list(self.values))

    def inverse(self) -> Symmetry:
        """The symmetry undoing this one: new[i] = values[old[order[i]]] gives old[order[i]] = values⁻¹[new[i]],
        so the inverse reads cell order⁻¹[j] for cell j and maps tokens through values⁻¹."""
        order = [0] * len(self.order)
        for i, j in enumerate(self.order):
            order[j] = i
        values = [0] * len(self.values)
        for t, u in enumerate(self.values):
            values[u] = t
        return Symmetry(tuple(order), tuple(values))

    def widened(self, vocab: int) -> Symmetry:
        """The same with tokens from len(values) to vocab - 1 kept as they are: a model's prediction may hold
        any token of its vocabulary, not only the task's."""
        extra = tuple(range(len(self.values), vocab))
        return Symmetry(self.order, self.values + extra) if extra else self


def dihedral(side: int, turns: int, transpose: bool) -> Symmetry:
    """One of the 8 symmetries of a side x side square as a cell order (tokens unchanged, `values` empty:
    see `widened`): `turns` quarter turns after an optional transpose, as `grids.square_symmetry` draws them."""
    order = []
    for i in range(side):
        for j in range(side):
            r, c = (j, i) if transpose else (i, j)
            for _ in range(turns % 4):
                r, c = side - 1 - c, r
            order.append(r * side + c)
    return Symmetry(tuple(order), ())


def symmetries(kind: str, side: int, vocab: int, count: int, rng: random.Random) -> list[Symmetry]:
    """`count` symmetries of a puzzle: the identity, then random ones of `kind` (sudoku: `grids.augmentations`;
    square: the 7 non-identity symmetries of the square in a random order, repeated if count > 8)."""
    out = [Symmetry.identity(side * side, vocab)]
    if kind == "sudoku":
        while len(out) < count:
            order, values = augmentations(side, rng)
            out.append(Symmetry(tuple(order), tuple(values)).widened(vocab))
    elif kind == "square":
        others = [(t, tr) for tr in (False, True) for t in range(4) if (t, tr) != (0, False)]
        while len(out) < count:
            rng.shuffle(others)
            out += [dihedral(side, t, tr).widened(vocab) for t, tr in others[:count - len(out)]]
    elif count > 1:
        raise ValueError(f"no symmetries known for {kind!r}")
    return out


# ---------------------------------------------------------------------------------------------
# the vote


def ranked(candidates: Sequence[tuple[Hashable, float]]) -> list[tuple[Hashable, int, float]]:
    """(answer, votes, mean confidence) of each distinct answer among `candidates` ((answer, confidence)
    pairs), ranked by votes then mean confidence, both descending; a full tie keeps the first seen first."""
    votes: dict[Hashable, list[float]] = {}
    for answer, confidence in candidates:
        votes.setdefault(answer, []).append(confidence)
    rows = [(a, len(c), sum(c) / len(c)) for a, c in votes.items()]
    return sorted(rows, key=lambda r: (-r[1], -r[2]))  # sorted is stable: first seen first on a tie


def vote(candidates: Sequence[tuple[Hashable, float]]) -> Hashable:
    """The answer the official ARC rule picks among `candidates` (see `ranked`)."""
    return ranked(candidates)[0][0]


# ---------------------------------------------------------------------------------------------
# noisy trajectories


def _digest(*parts) -> int:
    """A 63-bit integer from `parts`, the same on every machine and run (a generator's seed)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class NoisyTrajectories:
    """Solve a batch with Gaussian noise added to chosen latent states at the start of every segment
    (`perturb`, solve's hook), row by row as `scales` says.

    The noise of a row at a segment is sigma x scale x RMS x ε: RMS is the state's root mean square over
    d_model at that row and position, so sigma is relative to the state's own size whatever its norm;
    ε is standard normal, drawn from a torch.Generator seeded by (the row's key, the segment, the state):
    a row gets the same noise whatever else its batch holds and whichever rows halted before it, so
    results are reproducible and a replica solved alone gives what it gives in the batch."""

    def __init__(self, model, sigma: float, names: Sequence[str], keys: Sequence[int], scales: Sequence[float],
                 all_segments: bool = False):
        self.model, self.sigma, self.names = model, float(sigma), tuple(names)
        self.keys, self.scales, self.all_segments = list(keys), list(scales), all_segments
        self.sup = Supervisor(model)

    def solve(self, batch: dict[str, torch.Tensor], q_halt: torch.Tensor | None = None):
        """`Supervisor.solve` of `batch` (one row per key) with the noise: (logits, steps)."""
        return self.sup.solve(batch, all_segments=self.all_segments, q_halt=q_halt, perturb=self.perturb)

    def perturb(self, states: dict[str, torch.Tensor], segment: int,
                running: torch.Tensor) -> dict[str, torch.Tensor]:
        """The states of the running rows (`running`: their indices in the batch) with their noise added."""
        rows = running.tolist()
        noisy = [(at, row) for at, row in enumerate(rows) if self.scales[row] != 0.0]
        if self.sigma == 0.0 or not noisy:
            return states
        out = dict(states)
        for n, name in enumerate(self.names):
            x = states[name]
            eps = torch.zeros(x.shape, dtype=torch.float32)
            for at, row in noisy:
                g = torch.Generator().manual_seed(_digest(self.keys[row], segment, n))
                eps[at] = self.scales[row] * torch.randn(x.shape[1:], generator=g)
            rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
            out[name] = x + (self.sigma * rms * eps.to(x.device)).to(x.dtype)
        return out


def noise_states(model, chosen: Sequence[str] | None = None) -> tuple[str, ...]:
    """The states noise goes to: `chosen` (checked to be the model's), or every state but the output one
    (the latent z_L of HRM, z of TRM): the answer state is read by the head, the latent is what reasons."""
    spec = model.spec
    names = [s.name for s in spec.model.states]
    if chosen:
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise HrmspecError(f"--noise-state {unknown[0]}: {spec.name} has no such state; its states are "
                               f"{', '.join(names)}")
        return tuple(dict.fromkeys(chosen))
    latent = tuple(n for n in names if n != spec.model.output)
    if not latent:
        raise HrmspecError(f"{spec.name} has one state, its output {spec.model.output}: no latent state to add noise "
                           f"to; name it with --noise-state {spec.model.output}")
    return latent


# ---------------------------------------------------------------------------------------------
# the held-out puzzles


@dataclass
class HeldOut:
    """The puzzles a scaling evaluation solves, and how one counts solved."""

    count: int
    batch: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # puzzle indices -> input_ids, labels, puzzle_ids
    symmetry: list[str | None]  # per puzzle: "sudoku", "square" or None (no known symmetry)
    tasks: list[str] | None  # reasoning-gym task per puzzle; None: an official dataset, exact match
    side: int
    vocab: int  # the data's tokens
    signature: tuple  # what another run must share to vote with this one
    source: str  # where the puzzles come from (reported)
    limited_by: str | None = None
    arc: bool = False

    def solved(self, index: int, puzzle: list[int], labels: list[int], answer: Sequence[int]) -> bool:
        if self.tasks is not None:
            return GRID_TASKS[self.tasks[index]].solved(puzzle, list(answer), self.side)
        return all(a == b for a, b in zip(answer, labels) if b != IGNORE_INDEX)


def held_out(spec, n: int | None = None, tasks: list[str] | None = None, data_dir: str | None = None) -> HeldOut:
    """The first `n` held-out puzzles of a grid run as `eval` takes them: the spec's reasoning-gym grids
    (`--tasks` instead, if given; default n: DEFAULT_N), or its official-layout dataset's test split
    (`data_dir` instead, if given; default: every example)."""
    data = dict(spec.data) if data_dir is None else {"source": PUZZLES, "path": str(data_dir)}
    try:
        if is_puzzle_source(data):
            return _dataset(PuzzleSource.from_dict(data), n)
        if tasks:
            data["grids"] = tasks
        return _grids(GridConfig.from_dict(data), DEFAULT_N if n is None else n)
    except DataError as e:
        raise CheckpointError(str(e)) from None


def _grids(gcfg: GridConfig, n: int) -> HeldOut:
    rows = held_out_set(gcfg)
    count = min(n, len(rows))
    names = list(gcfg.tasks())
    return HeldOut(count, rows.batch, [GRID_TASKS[t].symmetry for t in rows.tasks[:count]], rows.tasks[:count],
                   rows.side, gcfg.vocab, ("grids", rows.side, tuple(sorted(names))), "grids: " + ", ".join(names),
                   f"the held-out set holds {len(rows)} puzzles" if count < n else None)


def _dataset(source: PuzzleSource, n: int | None) -> HeldOut:
    split = source.split("test")
    total = len(split)
    count = total if n is None else min(n, total)
    kind = kind_of(split)
    side = math.isqrt(split.seq_len)
    square = side * side == split.seq_len
    symmetry = {"sudoku": "sudoku", "maze": "square"}.get(kind or "") if square else None
    meta = split.metadata
    return HeldOut(count, split.batch, [symmetry] * count, None, side, meta.vocab_size,
                   ("dataset", kind, meta.vocab_size, meta.seq_len), f"{source.path}/test",
                   f"{source.path}/test holds {total:,} examples" if count < (n or 0) else None,
                   arc=source.arc or kind == "arc")


# ---------------------------------------------------------------------------------------------
# solving


@dataclass
class Attempts:
    """What one run made of a chunk of puzzles: for puzzle p, copy c, replica r, its answer mapped back to the
    puzzle's own layout, its confidence sigmoid(q_halt) and the segments it ran."""

    answers: list  # [p][c][r] tuple of tokens
    confidence: list  # [p][c][r] float
    steps: list  # [p][c][r] int


def solve_chunk(model, batch: dict[str, torch.Tensor], syms: list[list[Symmetry]], trajectories: int,
                sigma: float, names: Sequence[str], keys: list[int], all_segments: bool) -> Attempts:
    """Solve every copy (`syms[p]`) of each puzzle of `batch` in `trajectories` replicas, rows puzzle-major
    (puzzle, copy, replica); `keys[p]` seeds puzzle p's noise."""
    vocab = model.spec.model.vocab
    inputs = batch["input_ids"].tolist()
    rows, row_keys, scales, owner = [], [], [], []
    for p, copies in enumerate(syms):
        for c, sym in enumerate(copies):
            copy = inputs[p] if sym.is_identity else sym.widened(vocab).apply(inputs[p])
            for r in range(trajectories):
                rows.append(copy)
                row_keys.append(_digest(keys[p], c, r))
                scales.append(0.0 if r == 0 else 1.0)  # replica 0: the clean trajectory
                owner.append(p)
    device = model.embed.weight.device
    index = torch.tensor(owner)
    data = to_device({"input_ids": torch.tensor(rows, dtype=torch.long), "labels": batch["labels"][index],
                      "puzzle_ids": batch["puzzle_ids"][index]}, device)
    q = torch.zeros(len(rows), dtype=torch.float32, device=device)
    noisy = NoisyTrajectories(model, sigma, names, row_keys, scales, all_segments)
    logits, steps = noisy.solve(data, q_halt=q)
    preds, conf, used = logits.argmax(-1).tolist(), torch.sigmoid(q.double()).tolist(), steps.tolist()
    out = Attempts([], [], [])
    at = 0
    for copies in syms:
        answers, confidence, segs = [], [], []
        for sym in copies:
            back = sym.widened(vocab).inverse()
            part = range(at, at + trajectories)
            answers.append([tuple(preds[i]) if sym.is_identity else tuple(back.apply(preds[i])) for i in part])
            confidence.append([conf[i] for i in part])
            segs.append([used[i] for i in part])
            at += trajectories
        out.answers.append(answers)
        out.confidence.append(confidence)
        out.steps.append(segs)
    return out


def prefixes(count: int) -> list[int]:
    """1, 2, 4, ... below `count`, then `count`: the replica counts a curve reports."""
    out = [1]
    while out[-1] * 2 < count:
        out.append(out[-1] * 2)
    return out + ([count] if count > 1 else [])


def settings(runs: int, copies: int, trajectories: int) -> list[tuple[int, int, int]]:
    """Every prefix setting (runs m, copies k, replicas n) one evaluation scores."""
    return [(m, k, n) for m in range(1, runs + 1) for k in range(1, copies + 1) for n in prefixes(trajectories)]


def candidates(attempts: Sequence[Attempts], p: int, m: int, k: int, n: int, pick: str) -> list[tuple]:
    """(answer, confidence) of puzzle p under setting (m, k, n): per run and copy, its surest replica
    (`pick` q: highest confidence, the first on a tie) or every replica (`pick` vote)."""
    out = []
    for run in attempts[:m]:
        for c in range(k):
            pairs = list(zip(run.answers[p][c][:n], run.confidence[p][c][:n]))
            out += [max(pairs, key=lambda a: a[1])] if pick == "q" else pairs
    return out


def segments_used(attempts: Sequence[Attempts], p: int, m: int, k: int, n: int) -> int:
    return sum(sum(run.steps[p][c][:n]) for run in attempts[:m] for c in range(k))


# ---------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class Options:
    """What `hrmspec eval`'s scaling options ask for (see the module docstring)."""

    vote_augment: int = 1
    trajectories: int = 1
    noise: float | None = None  # None: DEFAULT_NOISE when trajectories > 1
    noise_state: tuple[str, ...] | None = None
    pick: str = "q"
    ensemble: tuple[str, ...] = ()
    seed: int = 0

    def check(self) -> None:
        """Refuse what cannot mean anything, before a model is loaded."""
        if self.vote_augment < 1 or self.trajectories < 1 or self.seed < 0:
            raise HrmspecError("--vote-augment and --trajectories must be at least 1, --seed at least 0")
        if self.pick not in PICKS:
            raise HrmspecError(f"--pick: expected q or vote, found {self.pick!r}")
        if self.noise is not None and (not math.isfinite(self.noise) or self.noise < 0):
            raise HrmspecError(f"--noise: expected a number >= 0, found {self.noise}")
        if self.trajectories == 1 and (self.noise is not None or self.noise_state):
            raise HrmspecError("--noise and --noise-state perturb trajectories 2..N (trajectory 1 runs clean): "
                               "give --trajectories N with N > 1")

    @property
    def sigma(self) -> float:
        if self.trajectories == 1:
            return 0.0
        return DEFAULT_NOISE if self.noise is None else float(self.noise)


def _grid_run(spec, run_dir) -> None:
    if spec.objective.type != "grid":
        raise HrmspecError(f"--vote-augment, --trajectories, --noise and --ensemble are for grid runs (puzzles solved "
                           f"in segments); {run_dir} trained the {spec.objective.type} objective")


def _refusals(opts: Options, models: list, runs: list[str], heldout: HeldOut) -> None:
    if opts.vote_augment > 1 and heldout.arc:
        raise HrmspecError("--vote-augment: an ARC dataset holds augmented copies of every task already, and eval "
                           "votes over them as the official evaluation does (ARC/pass@K); run eval without it")
    if opts.vote_augment > 1 and None in heldout.symmetry:
        raise HrmspecError(f"--vote-augment: no symmetry that keeps solutions solutions is known for {heldout.source} "
                           "(sudoku, mini_sudoku, n_queens and mazes have them)")
    if opts.trajectories > 1 and opts.pick == "q":
        for model, run in zip(models, runs):
            if Supervisor(model).halting is None:
                raise HrmspecError(f"--pick q takes the trajectory whose halting head is surest (highest q_halt); "
                                   f"{run} has no halting head (supervision.halting): use --pick vote")


def evaluate_scaling(run_dir: str | Path, opts: Options, n: int | None = None, tasks: list[str] | None = None,
                     all_segments: bool = False, backend: str = "auto", device: str = "auto",
                     allow_nonfinite: bool = False, data_dir: str | None = None,
                     batch_rows: int = BATCH_ROWS) -> dict:
    """Score every prefix setting of `opts` on the run's held-out puzzles (see the module docstring); writes
    RUN/eval-scaling.json and RUN/eval-scaling.png. An official-layout dataset runs every segment, as `eval`
    does there; reasoning-gym grids stop each row where its head says unless `all_segments`."""
    opts.check()
    run_dir = Path(run_dir)
    runs = [str(run_dir), *opts.ensemble]
    loaded = []
    for run in runs:
        model, _, spec, last = load_run(run, backend=backend, device=device, allow_nonfinite=allow_nonfinite)
        _grid_run(spec, run)
        loaded.append((model, spec, last))
    heldout = held_out(loaded[0][1], n, tasks, data_dir)
    for (_, spec, _), run in zip(loaded[1:], runs[1:]):
        other = held_out(spec, n, tasks, data_dir).signature
        if other != heldout.signature:
            raise HrmspecError(f"--ensemble {run}: its data ({_describe(other)}) is not {runs[0]}'s "
                               f"({_describe(heldout.signature)}); an ensemble votes on one kind of puzzle")
    models = [m for m, _, _ in loaded]
    _refusals(opts, models, runs, heldout)
    every = all_segments or heldout.tasks is None  # official datasets: every segment, as eval runs them
    names = [noise_states(m, opts.noise_state) if opts.trajectories > 1 else () for m in models]
    table = settings(len(models), opts.vote_augment, opts.trajectories)
    solved = [0] * len(table)
    used = [0] * len(table)
    per = max(1, batch_rows // (opts.vote_augment * opts.trajectories))
    for model in models:
        model.eval()
    for start in range(0, heldout.count, per):
        index = torch.arange(start, min(start + per, heldout.count))
        batch = heldout.batch(index)
        syms = [symmetries(heldout.symmetry[p], heldout.side, heldout.vocab, opts.vote_augment,
                           random.Random(f"scaling:{opts.seed}:{p}")) for p in index.tolist()]
        keys = [_digest(opts.seed, p) for p in index.tolist()]
        attempts = [solve_chunk(m, batch, syms, opts.trajectories, opts.sigma, s, keys, every)
                    for m, s in zip(models, names)]
        inputs, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
        for i, p in enumerate(index.tolist()):
            known: dict = {}
            for j, (m, k, t) in enumerate(table):
                answer = vote(candidates(attempts, i, m, k, t, opts.pick))
                if answer not in known:
                    known[answer] = heldout.solved(p, inputs[i], labels[i], answer)
                solved[j] += known[answer]
                used[j] += segments_used(attempts, i, m, k, t)
    count = max(heldout.count, 1)
    res = {"run": str(run_dir), "ensemble": list(opts.ensemble), "checkpoints": [str(last) for _, _, last in loaded],
           "data": heldout.source, "n": heldout.count, "limited_by": heldout.limited_by,
           "vote_augment": opts.vote_augment, "trajectories": opts.trajectories, "noise": opts.sigma,
           "noise_states": [list(s) for s in names], "pick": opts.pick, "seed": opts.seed,
           "all_segments": every, "max_segments": Supervisor(models[0]).spec.segments,
           "settings": [{"runs": m, "augment": k, "trajectories": t, "segments": used[j] / count,
                         "accuracy": solved[j] / count, "solved": solved[j]} for j, (m, k, t) in enumerate(table)]}
    if heldout.arc:
        res["note"] = "ARC: exact match per example; eval without scaling options votes over the dataset's copies"
    write_scaling(run_dir, res)
    return res


def _describe(signature: tuple) -> str:
    if signature[0] == "grids":
        return f"grids {', '.join(signature[2])} of side {signature[1]}"
    return f"a {signature[1] or 'puzzle'} dataset of vocab {signature[2]}, {signature[3]} cells"


def write_scaling(run_dir: Path, res: dict) -> list[Path]:
    """RUN/eval-scaling.json and RUN/eval-scaling.png, each written through a temp file renamed over it."""
    paths = [run_dir / RESULT_FILE, run_dir / PLOT_FILE]
    with writing(paths[0]):
        write_text_atomic(paths[0], json.dumps(res, indent=2))
    fig = scaling_figure(res)
    save_figure(fig, paths[1], "png")
    return paths


def curves(res: dict) -> dict[str, list[tuple[float, float]]]:
    """(segments per puzzle, accuracy) points to draw, by label: one curve per (runs, replicas) along the
    copies, or per runs along the replicas when there is one copy."""
    out: dict[str, list[tuple[float, float]]] = {}
    along_copies = res["vote_augment"] > 1
    for s in res["settings"]:
        label = f"{s['runs']} run{'s' if s['runs'] > 1 else ''}"
        if along_copies:
            label += f", {s['trajectories']} trajector{'ies' if s['trajectories'] > 1 else 'y'}"
        elif s["augment"] != 1:
            continue
        out.setdefault(label, []).append((s["segments"], 100 * s["accuracy"]))
    return out


def scaling_figure(res: dict):
    """Accuracy against forward segments per puzzle, one curve per `curves` label."""
    fig, (ax,) = new_figure(1, 4.5)
    for label, points in curves(res).items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    along = "copies" if res["vote_augment"] > 1 else "trajectories"
    spread = [x for points in curves(res).values() for x, _ in points]
    if spread and min(spread) > 0 and max(spread) / min(spread) > 8:  # doubling compute: even steps
        ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("forward segments per puzzle")
    ax.set_ylabel("solved (%)")
    ax.set_title(f"{Path(res['run']).name}: test-time scaling ({res['n']} puzzles, points along {along}, "
                 f"pick {res['pick']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def setting_label(s: dict, ensemble: bool) -> str:
    """A setting as `eval` prints it: k=3 n=2 (m=2 with an ensemble)."""
    return (f"m={s['runs']} " if ensemble else "") + f"k={s['augment']} n={s['trajectories']}"


__all__ = ["Attempts", "HeldOut", "NoisyTrajectories", "Options", "Symmetry", "candidates", "dihedral",
           "evaluate_scaling", "held_out", "noise_states", "prefixes", "ranked", "setting_label", "settings",
           "solve_chunk", "symmetries", "vote", "write_scaling"]
