"""Mutation check: does the suite catch realistic bugs? `make mutate` (not part of `make test`).

Each `Mutation` below is one bug of the kind that has survived before: a text in one source file
replaced by a plausible wrong one. For each, this script writes the mutated file, runs the tests
that should catch it (`pytest -x`), restores the file byte for byte, and records whether a test
failed (caught) or all passed (survived). It ends with a table and exits 1 if anything survived.

    python tests/mutate.py                 every mutation
    python tests/mutate.py relu-kink ...   the named ones
    python tests/mutate.py --list          the table of mutations, nothing run

Before anything is mutated, every file named must be unchanged from git's HEAD (so `git checkout`
would restore it too) and the tests of each mutation must pass on the unmutated tree: a test that
already fails catches nothing. The original text is restored in a `finally`, on SIGINT and SIGTERM
too. A mutation whose text no longer occurs exactly once is reported as stale: update its `find`.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    find: str  # occurs exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids
    what: str  # the bug, in words


MUTATIONS = (
    Mutation("bce-target-inverted", "runtime/execution/supervision.py",
             "solved.to(out.q_halt.dtype), reduction=\"sum\")", "(~solved).to(out.q_halt.dtype), reduction=\"sum\")",
             ("tests/test_losses_reference.py",), "the BCE halting target is the unsolved rows"),
    Mutation("segment-loss-mean", "runtime/execution/supervision.py",
             "lm = row_mean(token_losses(out.logits, labels, self.loss_kind), labels).sum()",
             "lm = row_mean(token_losses(out.logits, labels, self.loss_kind), labels).mean()",
             ("tests/test_losses_reference.py",), "the segment LM loss averaged over rows instead of summed"),
    Mutation("q-target-last-segment", "runtime/execution/supervision.py",
             "torch.where(is_last, q_halt,", "torch.where(is_last, torch.maximum(q_halt, q_cont),",
             ("tests/test_supervision.py", "tests/test_losses_reference.py"),
             "the Q target at the last segment bootstraps from q_continue"),
    Mutation("relu-kink", "hrmspec/ir/autodiff.py",
             "\"relu\": lambda b, n, a, y, g: ((a[0] <= 0.0).where(0.0, g),),",
             "\"relu\": lambda b, n, a, y, g: ((a[0] < 0.0).where(0.0, g),),",
             ("tests/test_autodiff_edges.py",), "relu passes the gradient at exactly 0"),
    Mutation("max-ties", "hrmspec/ir/autodiff.py",
             "return g * m / b.reduce(\"sum\", m)", "return g * m",
             ("tests/test_autodiff_edges.py",), "max's gradient goes whole to every tied element"),
    Mutation("triton-bf16-ties-away", "backends/triton/printer.py",
             "bits = bits + 0x7FFF + ((bits >> 16) & 1)", "bits = bits + 0x8000",
             ("tests/test_casts.py",), "the Triton printer rounds bf16 ties away from zero"),
    Mutation("c-bf16-ties-away", "backends/cstyle/dialects.py",
             "(u + 0x7fffu + ((u >> 16) & 1u)) >> 16", "(u + 0x8000u) >> 16",
             ("tests/test_casts.py",), "the C dialects round bf16 ties away from zero"),
    Mutation("c-f16-ties-away", "backends/cstyle/dialects.py",
             "+ 0xfffu + ((a >> 13) & 1u)) >> 13", "+ 0x1000u) >> 13",
             ("tests/test_casts.py",), "host C rounds fp16 ties away from zero"),
    Mutation("c-f16-subnormal-truncated", "backends/cstyle/dialects.py",
             "(unsigned int)rintf(hrm_as_float(a) * 16777216.0f)", "(unsigned int)(hrm_as_float(a) * 16777216.0f)",
             ("tests/test_casts.py",), "host C truncates fp16 subnormals instead of rounding them"),
    Mutation("triton-bf16-nan-unquiet", "backends/triton/printer.py",
             "nan = ((bits >> 16) | 0x40) << 16", "nan = bits",
             ("tests/test_casts.py",), "a bf16-rounded NaN keeps low payload bits a truncating store turns into inf"),
    Mutation("c-tree-half", "backends/cstyle/printer.py",
             "for (int step = {B // 2}; step > 0;", "for (int step = {B // 4}; step > 0;",
             ("tests/test_cstyle_backend.py::test_builtin_forward_and_backward_on_the_cpu",),
             "the tree reduction skips half the partials"),
    Mutation("c-mean-unscaled", "backends/cstyle/printer.py",
             "scale = \" * inv_width\" if p.nodes[r].op == \"mean\" else \"\"", "scale = \"\"",
             ("tests/test_cstyle_backend.py::test_builtin_forward_and_backward_on_the_cpu",),
             "mean is printed as a sum"),
    Mutation("resume-rng", "runtime/training/loop.py",
             "            ckpt.set_rng_state(state[\"rng\"])", "            pass",
             ("tests/test_resume_after_kill.py::"
              "test_sigkill_mid_interval_then_resume_is_the_uninterrupted_run_bit_for_bit",),
             "a resumed run does not restore the RNG states"),
    Mutation("kl-reversed", "runtime/execution/adaptive.py",
             "return (prev.exp() * (prev - cur)).sum(-1)", "return (cur.exp() * (cur - prev)).sum(-1)",
             ("tests/test_exit_criteria.py",), "the KL exit criterion in the other direction"),
    Mutation("latent-relative-to-old", "runtime/execution/adaptive.py",
             "return (cur - prev).norm(dim=-1) / cur.norm(dim=-1)",
             "return (cur - prev).norm(dim=-1) / prev.norm(dim=-1)",
             ("tests/test_exit_criteria.py",), "the latent change is relative to the previous state"),
    Mutation("stablemax-offset", "runtime/execution/losses.py",
             "1.0 / (1.0 - x.clamp(max=0.0)), x + 1.0)", "1.0 / (1.0 - x.clamp(max=0.0)), x + 2.0)",
             ("tests/test_losses_reference.py",), "stablemax's linear branch starts at 2"),
    Mutation("ignored-tokens-counted", "runtime/execution/losses.py",
             "return torch.where(valid, loss, torch.zeros_like(loss))", "return loss",
             ("tests/test_losses_reference.py",), "softmax token losses count the ignored positions"),
    Mutation("act-no-remainder", "runtime/execution/rules.py",
             "weight = torch.where(stop, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))",
             "weight = torch.where(stop, p, torch.where(running, p, torch.zeros_like(p)))",
             ("tests/test_losses_reference.py",), "ACT's halting step takes p instead of the remainder"),
    Mutation("exit-gate-entropy-sign", "runtime/execution/rules.py",
             "return (p * step_losses).sum(-1) - beta * entropy", "return (p * step_losses).sum(-1) + beta * entropy",
             ("tests/test_losses_reference.py",), "the exit gate's entropy bonus is a penalty"),
    Mutation("ponder-prior-untruncated", "runtime/execution/rules.py",
             "    log_g[-1] = (T - 1) * math.log1p(-prior)\n", "",
             ("tests/test_losses_reference.py",), "PonderNet's prior keeps only the geometric mass at T, not the tail"),
    Mutation("ponder-kl-reversed", "runtime/execution/rules.py",
             "return (p * step_losses).sum(-1) + beta * (p * (log_p - log_g)).sum(-1)",
             "return (p * step_losses).sum(-1) + beta * (log_g.exp() * (log_g - log_p)).sum(-1)",
             ("tests/test_losses_reference.py",), "PonderNet's KL taken from the prior to p"),
    Mutation("prefix-lm-one-sided", "hrmspec/mask.py",
             "visible = visible | (pre[0] & pre[1])", "visible = visible | pre[1]",
             ("tests/test_masks.py", "tests/test_causality.py"),
             "a response token sees the whole instruction, later positions too"),
    Mutation("token-mlp-text-allowed", "hrmspec/capabilities.py",
             "if not kind.causal_safe and objective_type in TEXT_OBJECTIVES:", "if False:",
             ("tests/test_causality.py",), "a token MLP under a text objective validates (it sees the future)"),
    Mutation("rope-sign", "backends/reference/naive.py",
             "return x * cos + rotate_half(x) * sin", "return x * cos - rotate_half(x) * sin",
             ("tests/test_hf.py",), "the rotary embedding turns the other way"),
    Mutation("credit-ramp-floor", "hrmspec/graph/credit_plan.py",
             "return credit.depth_from + math.floor(ramp * (credit.depth_to - credit.depth_from) + 1e-9)",
             "return credit.depth_from + math.ceil(ramp * (credit.depth_to - credit.depth_from) - 1e-9)",
             ("tests/test_credit.py",), "the credit depth steps up at the start of each ramp interval"),
    Mutation("linear-ce-upstream", "backends/common/chunked_linear_ce.py",
             "g = d_loss.detach().to(lse.dtype).reshape(1).contiguous()",
             "g = torch.ones_like(d_loss).detach().to(lse.dtype).reshape(1).contiguous()",
             ("tests/test_upstream_gradients.py",), "the chunked loss ignores the upstream gradient"),
    Mutation("ema-warmup", "runtime/training/optim.py",
             "decay = min(self.decay, (1 + self.steps) / (10 + self.steps))", "decay = self.decay",
             ("tests/test_optim.py",), "the EMA decay does not warm up"),
)


# -- running ------------------------------------------------------------------------------------------------
_restore: dict[Path, bytes] = {}


def _put_back(*_) -> None:
    for path, data in _restore.items():
        path.write_bytes(data)
    _restore.clear()


def _interrupted(signum, _frame) -> None:
    _put_back()
    sys.exit(128 + signum)


def pytest(tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    """(exit code, the first failing test or the last line, seconds) of `pytest -x` on `tests`."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", *tests]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    lines = done.stdout.splitlines()
    failed = next((ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))), None)
    return done.returncode, failed or (lines[-1] if lines else done.stderr.strip()[-200:]), time.perf_counter() - t0


def _clean(paths: set[str]) -> list[str]:
    """The files that differ from HEAD (mutating them could not be undone by git)."""
    done = subprocess.run(["git", "status", "--porcelain", "--", *sorted(paths)], cwd=ROOT, capture_output=True,
                          text=True)
    return [ln[3:] for ln in done.stdout.splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="run only these mutations")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}; --list shows them", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:<26} {m.path:<40} {m.what}")
        return 0
    dirty = _clean({m.path for m in chosen})
    if dirty:
        print(f"these files have uncommitted changes; commit or stash them first: {', '.join(dirty)}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    baseline = sorted({t for m in chosen for t in m.tests})
    code, first, secs = pytest(tuple(baseline), args.timeout)
    print(f"unmutated: {'pass' if code == 0 else 'FAIL'} ({secs:.0f} s){'' if code == 0 else ': ' + first}")
    if code != 0:
        return 2
    rows = []
    for m in chosen:
        path = ROOT / m.path
        original = path.read_bytes()
        text = original.decode()
        if text.count(m.find) != 1:
            rows.append((m, "STALE", f"the text occurs {text.count(m.find)} times", 0.0))
            continue
        try:
            _restore[path] = original
            path.write_text(text.replace(m.find, m.replace))
            code, first, secs = pytest(m.tests, args.timeout)
        finally:
            _put_back()
        verdict = "caught" if code == 1 else "SURVIVED" if code == 0 else f"ERROR {code}"
        rows.append((m, verdict, first, secs))
        print(f"{m.name:<26} {verdict:<9} {secs:6.0f} s  {first}", flush=True)
    caught = sum(r[1] == "caught" for r in rows)
    print(f"\n{caught} of {len(rows)} mutations caught\n")
    print("| mutation | file | the bug | result | caught by |\n|---|---|---|---|---|")
    for m, verdict, first, _ in rows:
        print(f"| {m.name} | {m.path} | {m.what} | {verdict} | {first if verdict == 'caught' else ''} |")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
