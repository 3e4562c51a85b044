"""Check that a committed SUPER result is reproducible: retrain the start of one arm and seed with this
checkout and compare it with the first rows of its raw CSV.

Trains ``--arm`` / ``--seed`` exactly as ``benchmarks/super_pursuit.py`` does (same preset, overrides and
one thread), for ``--frames`` env steps (a multiple of the evaluation interval, 4,000 with the preset, so
the rerun's last evaluation is one the full run made too), and compares every metric of
each iteration (losses, share fraction, epsilon, optimiser steps, training and evaluation returns; not the
timings) with the same iterations of ``<results>/<arm>_s<seed>.csv``, value for value. The runs are
deterministic, so a code change that claims to leave the results unchanged must pass this against runs
made before it. Exits 1 on any difference and prints the first ones.

Value for value holds only on the kind of CPU the committed run was made on: matrix products round
differently with other vector units, and training amplifies the last bit. On another machine the check
also says how the rerun's outcome (area under the greedy-return curve, final return, over the evaluations
it made) compares with every committed seed of the arm, so it can still tell whether the result
reproduces in distribution. ``--keep DIR`` keeps the rerun's CSV and record there (as
``super_pursuit.py`` writes them, with its wall time and CPU) instead of discarding it.

    python benchmarks/super_pursuit_check.py --arm quantile --seed 3 [--frames 80000]
        [--results benchmarks/results/super_pursuit_huber_tanh] [--keep DIR] [section.field=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from super_pursuit import ARMS, DEFAULT_OUT, keep_run, machine_cpu, train_command  # noqa: E402  (sibling scripts)
from super_pursuit_table import area_of, evaluations, final_of, load  # noqa: E402

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
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the rerun's CSV and record in")
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
    if args.keep is not None:  # before the rerun, which can take twenty minutes
        if (args.keep / path.name).exists():
            parser.error(f"{args.keep / path.name} exists; --keep needs a folder without this arm and seed's run")
        try:
            args.keep.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--keep {args.keep}: cannot make that folder ({error.strerror}); pass a writable folder")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MARLKIT_THREADS": "1"}
        start = time.perf_counter()
        result = subprocess.run(train_command(args.arm, args.seed, args.frames, run, args.overrides),
                                capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if result.returncode:
            sys.exit(f"the rerun failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        with (run / "metrics.csv").open() as handle:
            rerun = list(csv.DictReader(handle))
        if args.keep is not None:
            keep_run(run, args.keep, args.arm, args.seed, wall, args.overrides, "1")
    columns, diffs = differences(committed, rerun)
    print(f"{args.arm} seed {args.seed}: {len(rerun)} iterations x {len(columns)} metrics against {path.name}: "
          f"{len(diffs)} differing values ({wall:.0f} s rerun{f', kept in {args.keep}' if args.keep else ''})")
    for iteration, column, old, new in diffs[:5]:
        print(f"  iteration {iteration}, {column}: committed {old}, rerun {new}")
    if diffs:
        record = path.with_suffix(".json")
        made_on = json.loads(record.read_text()).get("cpu") if record.is_file() else None
        print(f"  the committed run was made on {made_on or 'a CPU its record does not name'}; this rerun on {machine_cpu()}: "
              "on another kind of CPU products round differently and the runs part from the first update on, "
              "on the same kind a difference is a change in the results")
        for line in outcome_lines(args.arm, args.seed, rerun, args.results):
            print(f"  {line}")
    sys.exit(1 if diffs else 0)


def outcome_lines(arm: str, seed: int, rerun: list[dict[str, str]], results: Path) -> list[str]:
    """How the rerun's area under the curve and final return (over its evaluations) compare with each
    committed seed of ``arm`` over the same evaluations: the rerun's value, the committed seeds' mean, range
    and ``seed``'s own, and where the rerun ranks among them."""
    n_pursuers = json.loads((results / f"{arm}_s{seed}.json").read_text()).get("n_pursuers", 8)
    _, returns = evaluations(rerun, n_pursuers)  # summed as the committed run's record says
    if not returns:
        return ["the rerun made no evaluation: no outcome to compare (raise --frames)"]
    committed = {s: run["returns"][:len(returns)] for s, run in load(results).get(arm, {}).items()
                 if len(run["returns"]) >= len(returns)}
    lines = [f"outcome over the rerun's {len(returns)} evaluations (greedy return summed over the pursuers), "
             f"against the {len(committed)} committed {arm} seeds:"]
    for name, reduce in (("area under the curve", area_of), ("final return", final_of)):
        values = {s: reduce(r) for s, r in sorted(committed.items())}
        mine = reduce(returns)
        if not values:
            lines.append(f"{name}: rerun {mine:.1f}; no committed seed covers as many evaluations")
            continue
        spread = np.array(list(values.values()))
        rank = int((spread < mine).sum())
        own = f", seed {seed} {values[seed]:.1f}" if seed in values else ""
        lines.append(f"{name}: rerun {mine:.1f}; committed mean {spread.mean():.1f}, range {spread.min():.1f} to "
                     f"{spread.max():.1f}{own}; {rank} of {len(spread)} committed seeds below the rerun")
    return lines


if __name__ == "__main__":
    main()
