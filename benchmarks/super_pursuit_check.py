"""Check that a committed SUPER result is reproducible: retrain the start of one arm and seed with this
checkout and compare it with the first rows of its raw CSV.

Trains ``--arm`` / ``--seed`` exactly as ``benchmarks/super_pursuit.py`` does (same preset, overrides and
one thread), for ``--frames`` env steps (a multiple of the evaluation interval, 4,000 with the preset, so
the rerun's last evaluation is one the full run made too), and compares every metric of
each iteration (losses, share fraction, epsilon, optimiser steps, training and evaluation returns; not the
timings) with the same iterations of ``<results>/<arm>_s<seed>.csv``, value for value. The runs are
deterministic, so a code change that claims to leave the results unchanged must pass this against runs
made before it. Exits 1 on any difference and prints the first ones.

    python benchmarks/super_pursuit_check.py --arm quantile --seed 3 [--frames 80000]
        [--results benchmarks/results/super_pursuit] [section.field=value ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from super_pursuit import ARMS, DEFAULT_OUT, train_command  # noqa: E402  (the sibling script)

NOT_COMPARED = ("time_s", "frames_per_s", "timers/", "system/")  # timings and the machine's thread count


def differences(committed: list[dict[str, str]], rerun: list[dict[str, str]]) -> tuple[list[str], list[tuple]]:
    """The compared columns and every ``(iteration, column, committed, rerun)`` that differs, over the
    rerun's rows (the committed run must have at least as many)."""
    columns = [c for c in rerun[0] if c in committed[0] and not c.startswith(NOT_COMPARED)]
    return columns, [(i, c, old[c], new[c]) for i, (old, new) in enumerate(zip(committed, rerun)) for c in columns
                     if old[c] != new[c]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True, help=f"one of {', '.join(ARMS)}")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--frames", type=int, default=80_000, help="env steps to retrain (from the start)")
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT, help="folder of the committed CSVs")
    parser.add_argument("overrides", nargs="*", help="the extra section.field=value the runs were made with")
    args = parser.parse_args()
    if args.arm not in ARMS:
        parser.error(f"unknown arm {args.arm!r}; accepted: {', '.join(ARMS)}")
    path = args.results / f"{args.arm}_s{args.seed}.csv"
    if not path.is_file():
        parser.error(f"no committed run {path}; run benchmarks/super_pursuit.py --arms {args.arm} --seeds {args.seed}")
    with path.open() as handle:
        committed = list(csv.DictReader(handle))
    if not committed or int(committed[-1]["frames"]) < args.frames:
        parser.error(f"{path} covers {committed[-1]['frames'] if committed else 0} frames; --frames must not exceed it")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MARLKIT_THREADS": "1"}
        result = subprocess.run(train_command(args.arm, args.seed, args.frames, run, args.overrides),
                                capture_output=True, text=True, env=env)
        if result.returncode:
            sys.exit(f"the rerun failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        with (run / "metrics.csv").open() as handle:
            rerun = list(csv.DictReader(handle))
    columns, diffs = differences(committed, rerun)
    print(f"{args.arm} seed {args.seed}: {len(rerun)} iterations x {len(columns)} metrics against {path.name}: "
          f"{len(diffs)} differing values")
    for iteration, column, old, new in diffs[:5]:
        print(f"  iteration {iteration}, {column}: committed {old}, rerun {new}")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
