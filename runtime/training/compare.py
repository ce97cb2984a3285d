"""`hrmspec compare`: train several specs on the same data under the same budget, then score each on
the same held-out set: accuracy, and the held-out loss that ranks runs too short to answer anything.

The budget is training FLOPs, tokens or optimizer steps. With `flops=X` each spec gets the step count
whose training FLOPs (`hrmspec.cost.RunFlops`: the graph's forward, the credited calls' backward,
the credit ramp as the loop advances it, attention at train.seq_len) come closest to X; with
`tokens=X` the steps that process X token positions; with `steps=N`, N steps. Everything else
of a spec's train: section (batch, learning rate, ...) stays its own.

Each spec trains into DIR/<name>/ with the training loop's `train`, and the results go to
DIR/compare.json after every spec, so a run stopped half way loses nothing. Running the command
again skips the specs that finished (trained to their steps and scored on as many held-out
samples), resumes the ones with checkpoints, scores again the ones scored on another number of
samples, and retries the ones that failed. A run folder trained under another plan (other data, step
count, model) is never resumed or skipped: that spec fails with what differs. One spec failing (its
error is recorded) does not stop the others.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hrmspec.cost import CostError, RunFlops, parse_count
from hrmspec.errors import HrmspecError, SpecError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.config import TrainConfig
from hrmspec.runtime.artifacts.data import DataConfig, DataError
from hrmspec.runtime.artifacts.grids import GridConfig
from hrmspec.runtime.artifacts.plot import read_metrics
from hrmspec.runtime.artifacts.runfolder import TrainInterrupted
from hrmspec.runtime.evaluate.heldout import evaluate_run
from hrmspec.runtime.training.loop import train
from hrmspec.spec.load import load_spec
from hrmspec.spec.schema import Spec
from hrmspec.spec.source import load_yaml_text, parse_override, read_json, read_yaml

RESULTS = "compare.json"
BUDGETS = ("flops", "tokens", "steps")
MAX_SEEDS = 64
MAX_STEPS = 10**9  # optimizer steps of one run: a budget that gives more is a typo, not a plan
RESULTS_BYTES, RESULTS_VALUES = 64 << 20, 2_000_000  # compare.json as read back: specs x seeds x their curves


class CompareError(HrmspecError):
    """A comparison that cannot start: a budget, the data, or specs that cannot share them."""


@dataclass(frozen=True)
class Budget:
    kind: str  # flops | tokens | steps
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, sep, value = str(text).partition("=")
        kind = kind.strip()
        if not sep or kind not in BUDGETS:
            raise CompareError(f"--budget: expected flops=X, tokens=X or steps=N, found {str(text)[:40]!r}")
        try:
            amount = parse_count(value, f"--budget {kind}")
        except CostError as e:
            raise CompareError(str(e)) from None
        if kind == "steps" and amount != int(amount):
            raise CompareError(f"--budget steps: expected a whole number of steps, found {value.strip()[:40]!r}")
        if kind == "steps" and amount > MAX_STEPS:
            raise CompareError(f"--budget steps: expected at most {MAX_STEPS:,} steps, found {amount:g}")
        return cls(kind, amount)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass
class Plan:
    """One spec of a comparison: where it trains, and what the budget gives it."""

    name: str
    folder: str  # under the comparison's folder
    spec: Spec  # with the shared data, the step count and the evaluation cadence set
    steps: int = 0
    batch_size: int = 0
    seq_len: int = 0  # token positions per row
    params: int = 0
    forward: float = 0.0  # forward FLOPs per token
    # training FLOPs of the steps, run-length encoded: (steps in a row, FLOPs of each), one entry per
    # credit depth of the ramp, however many steps
    phases: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None  # the spec cannot be planned (its train: section, say)
    seed: int | None = None  # train.seed of this run when the comparison runs each spec under several

    @property
    def key(self) -> str:
        """What names this run in compare.json: the spec, and its seed when there are several."""
        return self.name if self.seed is None else f"{self.name} (seed {self.seed})"

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def train_flops(self) -> float:
        return self.flops_after(self.steps)

    def flops_after(self, step: int) -> float:
        """Training FLOPs of the first `step` steps."""
        total, left = 0.0, max(0, step)
        for count, flops in self.phases:
            total += min(count, left) * flops
            left -= min(count, left)
        return total

    @property
    def step_flops(self) -> list[float]:
        """The training FLOPs of each step, written out: one number per step (for a few steps only)."""
        return [flops for count, flops in self.phases for _ in range(count)]


# --------------------------------------------------------------------------- planning


def read_data(text: str | None) -> dict | None:
    """--data: a YAML file holding a data: section, or the section written inline; relative paths in it
    are made absolute (against the file's folder, or the working directory), so every run and its
    evaluation read the same files."""
    if text is None:
        return None
    path = Path(text)
    try:
        is_file = path.is_file()
    except OSError:  # a long inline mapping is no path
        is_file = False
    try:  # with the limits of a spec: size, alias expansions, nesting
        data = read_yaml(path) if is_file else load_yaml_text(text, "--data")
    except SpecError as e:
        raise CompareError(f"--data: cannot read {'the file ' + str(path) if is_file else 'the YAML'}: "
                           f"{e.message}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), dict):
        data = data["data"]  # a file with the section under its key: a spec, say
    if not isinstance(data, dict) or not data:
        raise CompareError("--data: expected a YAML file or an inline mapping, e.g. "
                           "--data '{source: jsonl, path: train.jsonl, eval_path: eval.jsonl}'")
    return absolute_paths(data, path.parent if is_file else Path.cwd())


def absolute_paths(data: dict, root: Path) -> dict:
    """A data: section with its file paths made absolute against `root`."""
    out = dict(data)
    for key in ("path", "eval_path"):
        if isinstance(out.get(key), str) and not Path(out[key]).is_absolute():
            out[key] = str((root / out[key]).resolve())
    return out


def shared_data(specs: list[Spec], data: dict | None) -> dict:
    """The data every spec trains on: --data, else the one data: section the specs agree on."""
    kinds = {s.name: "grid puzzles" if s.objective.type == "grid" else "text" for s in specs}
    if len(set(kinds.values())) > 1:
        listed = "; ".join(f"{n}: {k}" for n, k in kinds.items())
        raise CompareError(f"the specs train on different kinds of data ({listed}): compare specs of one objective")
    if data is not None:
        return data
    found: dict[str, dict] = {}
    for s in specs:
        if s.data:
            found.setdefault(json.dumps(absolute_paths(s.data, Path(s.source).parent), sort_keys=True), s.name)
    if not found:
        raise CompareError("no spec has a data: section: give the data with --data FILE or --data '{...}'")
    if len(found) > 1:
        raise CompareError(f"the specs' data: sections differ ({', '.join(found.values())}): give the data all "
                           "train on with --data")
    return json.loads(next(iter(found)))


def folder_name(name: str) -> str:
    """A spec's name as a folder name: no separators, never '.' or '..', never one of the reports."""
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip() or "spec"
    if set(folder) == {"."} or folder.startswith("compare."):
        folder = "_" + folder
    return folder


def steps_for(budget: Budget, run: RunFlops, row_tokens: int, name: str = "the spec") -> int:
    """The optimizer steps the budget gives a spec that trains on `row_tokens` token positions a step.
    CompareError for a budget below one step of the spec (it would train one step, or none) or above
    MAX_STEPS."""
    if budget.kind == "steps":
        return int(budget.value)
    one = row_tokens * (1 if budget.kind == "tokens" else run.mean)  # what a step spends, on the average
    guess = round(budget.value / one)
    what = "tokens" if budget.kind == "tokens" else "training FLOPs"
    if guess < 1:
        raise CompareError(f"--budget {budget}: less than one optimizer step of {name} ({one:.3g} {what} a step); "
                           "give a budget of many steps")
    if guess > MAX_STEPS:
        raise CompareError(f"--budget {budget}: {guess:.3g} optimizer steps of {name}, over the limit of "
                           f"{MAX_STEPS:,} ({one:.3g} {what} a step)")
    if budget.kind == "tokens" or guess > 100_000:  # a step is a negligible share of the budget
        return guess
    # the mean over a run of n steps differs a little from the integral; look around the guess
    return min(range(max(1, guess - 2), guess + 3),
               key=lambda n: abs(row_tokens * run.summed(n) - budget.value))


def plan_runs(specs: list[Spec], budget: Budget, data: dict | None = None, evals: int = 3,
              eval_n: int = 200, seeds: int = 1) -> list[Plan]:
    """One plan per spec, or `seeds` per spec (train.seed = its own, +1, ...: weights and batch order), each in
    <spec>/seed<k>/. Raises CompareError for what concerns them all (names, objectives, data); a spec that
    cannot be planned on its own carries its error and is recorded as failed."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise CompareError(f"--seeds: expected 1 to {MAX_SEEDS} runs per spec, found {seeds!r}")
    common = shared_data(specs, data)
    try:  # a data: section none could train on is refused before any training
        (GridConfig if specs[0].objective.type == "grid" else DataConfig).from_dict(common)
    except DataError as e:
        raise CompareError(str(e)) from None
    plans: list[Plan] = []
    seen: dict[str, str] = {}
    for s in specs:
        folder = folder_name(s.name)
        if folder in seen:
            raise CompareError(f"two specs are named {s.name!r} (or {seen[folder]!r}, the same folder): give each "
                               "its own name: in its file")
        seen[folder] = s.name
        if seeds == 1:
            plans.append(_plan(s, folder, budget, common, evals, eval_n))
            continue
        base = s.train.get("seed", 0) if isinstance(s.train.get("seed", 0), int) else 0
        plans += [_plan(s, f"{folder}/seed{base + k}", budget, common, evals, eval_n, base + k) for k in range(seeds)]
    return plans


def _plan(spec: Spec, folder: str, budget: Budget, data: dict, evals: int, eval_n: int,
          seed: int | None = None) -> Plan:
    plan = Plan(spec.name, folder, spec, seed=seed)
    try:
        spec = load_spec(spec, {"data": data} if seed is None else {"data": data, "train.seed": seed})
        cfg = TrainConfig.from_dict(dict(spec.train))
        run = RunFlops(spec, cfg.seq_len if spec.objective.type != "grid" else None)
        plan.batch_size, plan.seq_len = cfg.batch_size, run.seq_len
        plan.steps = steps_for(budget, run, cfg.batch_size * run.seq_len, repr(spec.name))
        every = -(-plan.steps // (evals + 1)) if evals > 0 else 0  # at most `evals` before the last step
        plan.spec = load_spec(spec, {"train.steps": plan.steps, "train.eval_every": every, "train.eval_n": eval_n})
        plan.params, plan.forward = run.params, run.forward
        plan.phases = [(count, plan.batch_size * plan.seq_len * f) for count, f in run.phases(plan.steps)]
    except CompareError:  # the budget does not fit the spec: the comparison is refused, not this run
        raise
    except HrmspecError as e:
        plan.error = str(e)
    return plan


# --------------------------------------------------------------------------- running


def read_results(out: Path) -> tuple[dict, int | None]:
    """The entries of DIR/compare.json as written last time, by run (`Plan.key`), and the held-out size they were
    scored on (nothing when there is none or it cannot be read)."""
    if not (out / RESULTS).is_file():
        return {}, None
    try:
        doc = read_json(out / RESULTS, max_bytes=RESULTS_BYTES, max_values=RESULTS_VALUES)
        return ({r.get("run", r["spec"]): r for r in doc["runs"] if isinstance(r, dict) and "spec" in r},
                doc.get("held_out"))
    except (SpecError, KeyError, TypeError, AttributeError):
        return {}, None


def write_results(out: Path, budget: Budget, eval_n: int, runs: list[dict]) -> None:
    doc = {"budget": {"kind": budget.kind, "value": budget.value}, "held_out": eval_n, "runs": runs}
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out / RESULTS)  # a reader never sees half a file


# what a run folder's checkpoint must share with a plan to be resumed under it (the cadence of logs,
# evaluations and checkpoints may change)
PLAN_SECTIONS = ("model", "objective", "supervision", "data", "train")
CADENCE = ("log_every", "eval_every", "eval_n", "save_every", "keep", "threads")


def trained_steps(plan: Plan, out: Path) -> int:
    """The steps the run folder of `plan` has trained (its newest checkpoint), 0 for none; a folder holding
    a run of another plan (other data, budget or model) is refused rather than resumed or skipped."""
    run = out / plan.folder
    latest = ckpt.latest_checkpoint(run)
    if latest is None:
        return 0
    try:
        old = read_yaml(latest / "spec.yaml") or {}
    except SpecError as e:
        raise CompareError(f"{latest}/spec.yaml cannot be read ({e.message}); the checkpoint is damaged") from None

    def part(doc: dict, key: str):
        v = doc.get(key) if isinstance(doc, dict) else None
        return {k: x for k, x in v.items() if k not in CADENCE} if key == "train" and isinstance(v, dict) else v

    changed = [k for k in PLAN_SECTIONS if part(old, k) != part(plan.spec.raw, k)]
    if changed:
        raise CompareError(f"{run} holds a run of another plan (its {', '.join(changed)} differ): compare into "
                           "another --out, or delete that folder")
    return int(latest.name[len(ckpt.PREFIX):])


def run_compare(plans: list[Plan], budget: Budget, out: str | Path, eval_n: int = 200, progress_bar: bool = True,
                say=print) -> list[dict]:
    """Train and evaluate every plan in turn into `out`; the entries of compare.json, in plan order."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"cannot create the folder {out}: {e.strerror}") from None
    before, scored_on = read_results(out)
    results = {p.key: before[p.key] for p in plans if p.key in before}

    def record(plan: Plan, entry: dict) -> None:
        results[plan.key] = entry
        write_results(out, budget, eval_n, [results[p.key] for p in plans if p.key in results])

    for i, plan in enumerate(plans, start=1):
        head, prev = f"[{i}/{len(plans)}] {plan.key}", before.get(plan.key)
        if plan.error is not None:
            say(f"{head}: failed: {plan.error}")
            record(plan, entry(plan, "failed", error=plan.error))
            continue
        spent, start = 0.0, time.perf_counter()
        try:
            done = trained_steps(plan, out)
            # an earlier attempt's training time counts when its checkpoints are taken up
            spent = float(prev.get("train_s") or 0.0) if done and prev and prev.get("steps") == plan.steps else 0.0
            if done == plan.steps and prev and prev.get("status") == "done" and scored_on == eval_n \
                    and (out / plan.folder / "eval.json").is_file():
                say(f"{head}: finished earlier, skipped")
                continue
            say(f"{head}: {plan.steps} steps, {plan.tokens:,} tokens, {plan.train_flops:.3e} training FLOPs"
                + (f", from step {done}" if done else "") + f" -> {out / plan.folder}")
            record(plan, run_one(plan, out, eval_n, progress_bar, done, spent))
        except TrainInterrupted as e:
            record(plan, entry(plan, "interrupted", error=str(e), train_s=spent + time.perf_counter() - start))
            raise TrainInterrupted(f"{plan.name}: {str(e).split(';')[0]}, with a checkpoint; run the same command "
                                   "again to go on", e.exit_code - 128) from None
        except Exception as e:  # recorded; the other specs go on
            message = str(e) if isinstance(e, HrmspecError) else f"{type(e).__name__}: {e}"
            say(f"{head}: failed: {message}")
            record(plan, entry(plan, "failed", error=message, train_s=spent + time.perf_counter() - start))
    return [results[p.key] for p in plans if p.key in results]


def run_one(plan: Plan, out: Path, eval_n: int, progress_bar: bool, done: int = 0, spent: float = 0.0) -> dict:
    """Train one plan (on from step `done`, its newest checkpoint) and evaluate it on the held-out set."""
    run = out / plan.folder
    t0 = time.perf_counter()
    if done < plan.steps:
        # a folder with no checkpoint holds at most the logs of an attempt that died before its first one
        train(plan.spec, run, resume=done > 0, overwrite=done == 0, progress_bar=progress_bar)
    t1 = time.perf_counter()
    res = finished_evaluation(run, eval_n) or evaluate_run(run, n=eval_n)
    t2 = time.perf_counter()
    return entry(plan, "done", result=res, train_s=spent + t1 - t0, eval_s=t2 - t1, curve=curve(plan, run, res),
                 loss_curve=curve(plan, run, res, "loss") if res.get("loss") is not None else None)


def finished_evaluation(run: Path, eval_n: int) -> dict | None:
    """The evaluation training wrote at its end (run/eval.json), when it is the one `eval` would make now: of the
    newest checkpoint, at full depth, on `eval_n` samples (train.eval_n is set to it). None otherwise (then
    the run is evaluated again): a run finished earlier on another --n, or an eval.json of another kind."""
    path = run / "eval.json"
    if not path.is_file():
        return None
    try:
        res = read_json(path, max_bytes=RESULTS_BYTES, max_values=RESULTS_VALUES)
    except HrmspecError:
        return None
    newest = ckpt.latest_checkpoint(run)
    same = (isinstance(res, dict) and res.get("label") == "full" and res.get("requested") == eval_n
            and newest is not None and res.get("checkpoint") == str(newest))
    return res if same else None


def curve(plan: Plan, run: Path, final: dict, key: str = "accuracy") -> list[dict]:
    """Held-out accuracy (or `key`: "loss") against training FLOPs: the evaluations logged during training before
    the last step, then the final one."""
    try:
        _, evals = read_metrics(run)
    except HrmspecError:
        evals = []
    points = [{"step": r["step"], "flops": plan.flops_after(r["step"]), key: r["eval"][key]}
              for r in evals if isinstance(r.get("eval"), dict) and r["eval"].get(key) is not None
              and isinstance(r.get("step"), int) and r["step"] < plan.steps]
    return points + [{"step": plan.steps, "flops": plan.train_flops, key: final.get(key)}]


def entry(plan: Plan, status: str, result: dict | None = None, error: str | None = None, train_s: float = 0.0,
          eval_s: float = 0.0, curve: list[dict] | None = None, loss_curve: list[dict] | None = None) -> dict[str, Any]:
    """One spec's record in compare.json."""
    result = result or {}
    tokens = plan.tokens
    return {
        "spec": plan.name, "run": plan.key, "seed": plan.seed, "folder": plan.folder, "source": plan.spec.source,
        "status": status,
        "params": plan.params, "steps": plan.steps, "batch_size": plan.batch_size, "seq_len": plan.seq_len,
        "tokens": tokens, "train_flops": plan.train_flops,
        "flops_per_token": plan.train_flops / tokens if tokens else None, "forward_flops_per_token": plan.forward,
        "accuracy": result.get("accuracy"), "n": result.get("n"),
        "loss": result.get("loss"), "perplexity": result.get("perplexity"),
        "tasks": {t: r["accuracy"] for t, r in (result.get("tasks") or {}).items()},
        "train_s": round(train_s, 3), "eval_s": round(eval_s, 3), "wall_s": round(train_s + eval_s, 3),
        "curve": curve or [], "loss_curve": loss_curve or [], "error": error,
    }


MAX_VARIANTS = 256  # specs x sweep values: a grid larger than this is a typo, not a plan


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`--sweep KEY=V1,V2,...` (or `KEY=[V1, V2]`, for values that hold commas) -> (key, values), each value
    YAML as in `--set`."""
    key, raw = parse_override(text)
    if isinstance(raw, list):
        values = raw
    else:
        text_value = text.partition("=")[2]
        values = [parse_override(f"{key}={part}")[1] for part in text_value.split(",")]
    if not values or any(v == "" for v in values):
        raise CompareError(f"--sweep {text!r}: expected KEY=V1,V2,... with at least one value and no empty one")
    if len({repr(v) for v in values}) != len(values):
        raise CompareError(f"--sweep {text!r}: a value is listed twice")
    return key, values


def sweep_grid(sweeps: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the sweeps' values (the first sweep varies slowest); [{}] without sweeps."""
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise CompareError(f"--sweep: {next(k for k in keys if keys.count(k) > 1)} is swept twice; give its "
                           "values once, comma-separated")
    grid = [{}]
    for key, values in sweeps:
        grid = [{**combo, key: v} for combo in grid for v in values]
    return grid


def _value_text(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def load_specs(names: list[str], overrides: dict[str, Any] | None = None,
               sweeps: list[tuple[str, list[Any]]] | None = None) -> list[Spec]:
    """The specs to compare, each with the same `--set` overrides; with `sweeps` (`parse_sweep`), one variant
    of each spec per combination of their values, named `<spec> [key=value, ...]`."""
    if not names:
        raise CompareError("give at least one spec to compare")
    grid = sweep_grid(sweeps or [])
    if len(names) * len(grid) > MAX_VARIANTS:
        raise CompareError(f"{len(names)} specs x {len(grid)} sweep combinations is {len(names) * len(grid)} runs, "
                           f"over the limit of {MAX_VARIANTS}")
    specs = []
    for n in names:
        for combo in grid:
            spec = load_spec(n, {**(overrides or {}), **combo} or None)
            if combo:
                label = ", ".join(f"{k}={_value_text(v)}" for k, v in combo.items())
                spec = load_spec(spec, {"name": f"{spec.name} [{label}]"[:100]})
            specs.append(spec)
    return specs


__all__ = ["BUDGETS", "Budget", "CompareError", "Plan", "load_specs", "parse_sweep", "plan_runs", "read_data",
           "run_compare", "steps_for", "sweep_grid"]
