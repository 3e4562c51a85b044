"""Two sets of SUPER pursuit runs compared from their raw CSVs alone (nothing re-run): unpaired.

For runs whose seeds cannot be paired, e.g. compiled (``train.compile=true``) against eager updates: the two
round differently, so a seed's two runs part like two seeds would. Per set: the area under the greedy-return
curve (mean over the evaluations, summed over the pursuers), the mean over the last quarter of the
evaluations and the final return (mean of the last 5), as ``super_pursuit_table.py`` computes them; then
the bootstrap 95% interval of (mean of A - mean of B), each side's runs resampled on their own.

    python benchmarks/super_compare_runs.py --a FILE.csv [FILE.csv ...] --b FILE.csv [FILE.csv ...]
        [--names compiled,eager]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from super_pursuit_table import area_of, evaluations, final_of

MEASURES = ("area", "last quarter", "final")


def outcome(csv_file: Path) -> dict[str, float]:
    """The three measures of one run (its ``.json`` beside it gives the pursuer count, 8 without one)."""
    meta = csv_file.with_suffix(".json")
    n_pursuers = json.loads(meta.read_text()).get("n_pursuers", 8) if meta.exists() else 8
    with csv_file.open(newline="") as handle:
        returns = evaluations(list(csv.DictReader(handle)), n_pursuers)[1]
    if not returns:
        raise ValueError(f"{csv_file} holds no greedy evaluation ('eval/pursuer/episode_reward_mean')")
    return {"area": area_of(returns), "last quarter": float(np.mean(returns[-max(1, len(returns) // 4):])),
            "final": final_of(returns)}


def unpaired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), resampling each side's runs on its own."""
    rng = np.random.default_rng(seed)
    diffs = a[rng.integers(len(a), size=(n, len(a)))].mean(1) - b[rng.integers(len(b), size=(n, len(b)))].mean(1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="the first set's metrics CSVs")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="the second set's metrics CSVs")
    parser.add_argument("--names", default="A,B", help="the two sets' names in the table, comma-separated")
    args = parser.parse_args(argv)
    names = args.names.split(",")
    missing = [str(f) for f in (*args.a, *args.b) if not f.is_file()]
    if len(names) != 2 or missing or len(args.a) < 2 or len(args.b) < 2:
        problem = (f"--names {args.names!r} needs two names, e.g. compiled,eager" if len(names) != 2 else
                   f"no such CSV: {', '.join(missing)}" if missing else "each set needs at least 2 runs")
        print(f"super_compare_runs: {problem}", file=sys.stderr)
        return 2
    try:
        sets = [[outcome(f) for f in files] for files in (args.a, args.b)]
    except ValueError as err:
        print(f"super_compare_runs: {err}", file=sys.stderr)
        return 2
    for name, files, runs in zip(names, (args.a, args.b), sets):
        print(f"{name}: {len(files)} runs: " + "; ".join(
            f"{f.name} area {r['area']:.1f}, last quarter {r['last quarter']:.1f}, final {r['final']:.1f}"
            for f, r in zip(files, runs)))
    print()
    print(f"| measure | {names[0]} (mean of {len(args.a)}) | {names[1]} (mean of {len(args.b)}) | "
          f"{names[0]} - {names[1]}, unpaired bootstrap 95% |")
    print("|---|---|---|---|")
    for measure in MEASURES:
        a, b = (np.array([r[measure] for r in runs]) for runs in sets)
        low, high = unpaired_bootstrap(a, b)
        print(f"| {measure} | {a.mean():.1f} | {b.mean():.1f} | [{low:+.1f}, {high:+.1f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
