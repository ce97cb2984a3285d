"""Test-time scaling on a CPU: trm-tiny on 4 x 4 mini sudoku, scored with more compute at inference.

    python benchmarks/tts_demo.py                 # train trm-tiny (seed 0, as the grid demo), then score it
    python benchmarks/tts_demo.py --run DIR       # score a trained grid run instead

One trained run, scored on the same held-out puzzles with every prefix of the settings (hrmspec eval
--vote-augment K --trajectories N --noise S: runtime/evaluate/scaling.py): k = 1..K augmented copies of
each puzzle voted (sudoku symmetries, inverted before the vote), n = 1, 2, 4, .. N trajectories of each
copy with Gaussian noise of S x RMS added to the latent state at every segment (trajectory 1 is clean),
the answer the trajectory with the highest q_halt. Accuracy is plotted against the segments each puzzle
ran. Results: benchmarks/results/tts_demo.{md,json,png} (the json and png are eval's own).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from hrmspec.cli import main
from hrmspec.runtime.evaluate.scaling import setting_label

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def run(args: list[str]) -> None:
    code = main(args)
    if code:
        raise SystemExit(f"hrmspec {' '.join(args)} exited {code}")


def main_(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a trained grid run to score (default: train trm-tiny into runs/tts-demo)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000, as the grid demo)")
    p.add_argument("--n", type=int, default=200, help="held-out puzzles scored (default 200)")
    p.add_argument("--vote-augment", type=int, default=4)
    p.add_argument("--trajectories", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.3)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    folder = a.run
    if folder is None:
        folder = Path("runs/tts-demo")
        if not (folder / "eval.json").is_file():
            run(["train", "trm-tiny", "--out", str(folder), "--overwrite", "--set", f"train.steps={a.steps}"])
    t1 = time.perf_counter()
    run(["eval", str(folder), "--n", str(a.n), "--vote-augment", str(a.vote_augment), "--trajectories",
         str(a.trajectories), "--noise", str(a.noise)])
    t2 = time.perf_counter()
    res = json.loads((folder / "eval-scaling.json").read_text())
    RESULTS.mkdir(exist_ok=True)
    for suffix in ("json", "png"):
        shutil.copyfile(folder / f"eval-scaling.{suffix}", RESULTS / f"tts_demo.{suffix}")
    lines = [f"# Test-time scaling: {folder.name}", "",
             f"{a.n} held-out puzzles; --vote-augment {a.vote_augment} --trajectories {a.trajectories} "
             f"--noise {a.noise}; training {t1 - t0:.0f} s, scoring {t2 - t1:.0f} s", "",
             "| setting | segments per puzzle | solved |", "|---|---:|---:|"]
    for s in res.get("settings", []):
        lines.append(f"| {setting_label(s, False)} | {s['segments']:.2f} | {100 * s['accuracy']:.1f}% |")
    (RESULTS / "tts_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main_()
