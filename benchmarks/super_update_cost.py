"""Benchmark: the cost of one SUPER update (pursuit-super), and of the same with another marlkit checkout.

Each run trains ``iql --preset pursuit-super`` for ``--frames`` env steps (one torch thread, no evaluation or
checkpoint inside) with one sharing mode and reports the median training time of its iterations after the
first five (100 optimiser steps each, every agent's update included). ``--other PATH`` adds the same runs
with the marlkit package found at PATH (a folder holding ``marlkit/``, e.g. a worktree's package links),
interleaved round by round with this checkout's, so a change is measured side by side in one sitting.

    python benchmarks/super_update_cost.py [--modes none,quantile] [--rounds 2] [--frames 8000] [--other PATH]
        [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys
from marlkit.pipelines import make_config, pipeline_for
mode, frames, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
extra = dict(item.split("=", 1) for item in sys.argv[4:])
cfg = make_config("iql", "pursuit-super", {"sharing.mode": mode, "collector.total_frames": frames,
                  "logger.run_dir": run_dir, "logger.progress": False, "logger.eval_every": 10**9,
                  "logger.checkpoint_every": 10**9, **extra})
pipeline_for("iql").train(cfg)
"""


def run(mode: str, frames: int, pythonpath: str | None, extra: list[str]) -> float:
    """Median training seconds per iteration (100 updates) of one run, after its first five that train."""
    env = {**os.environ, "MARLKIT_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        subprocess.run([sys.executable, "-c", CHILD, mode, str(frames), str(run_dir), *extra], env=env, check=True,
                       capture_output=True)
        with (run_dir / "metrics.csv").open() as handle:
            rows = list(csv.DictReader(handle))
    times = [float(r["timers/training_s"]) for r in rows if float(r["counters/optimiser_steps"]) > 0][5:]
    if not times:
        raise SystemExit(f"--frames {frames} left no timed iteration (the first five that train are skipped): raise it")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="none,quantile")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8000, help="env steps per run (the first five training "
                        "iterations after the 1,000 warm-up steps are not timed)")
    parser.add_argument("--other", default=None, help="PYTHONPATH of another marlkit checkout to run beside this one")
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value for every run (tiny checks)")
    args = parser.parse_args()
    codes = {"this": None} | ({"other": args.other} if args.other else {})  # None: the marlkit this Python imports
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for mode in args.modes.split(","):
            for name, path in codes.items():
                seconds = run(mode, args.frames, path, args.set)
                results.setdefault((mode, name), []).append(seconds)
                print(f"round {round_}: {mode} {name}: {seconds:.3f} s per 100 updates", flush=True)
    print("\n| mode | code | s per 100 updates (each round) | ms per update (median) |")
    print("|---|---|---|---|")
    for (mode, name), values in results.items():
        print(f"| {mode} | {name} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values) * 10:.2f} |")


if __name__ == "__main__":
    main()
