"""Benchmark: SUPER selective experience sharing on SISL pursuit (the SUPER paper's benchmark).

Runs IQL (independent double DQN, ``pursuit-super`` preset) with each sharing arm for ``--frames``
frames and ``--seeds`` seeds, and prints per arm the area under the return curve (mean episode
return averaged over iterations) and the final return, as mean ± standard deviation over seeds,
plus the realised share fraction. Pursuit steps slowly (≈130 env steps/s here), so budgets that
separate the arms take hours; the defaults only check that every arm runs end to end.

    python benchmarks/super_pursuit.py [--arms none,quantile,random,all] [--seeds 2] [--frames 10000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

from _child import run_child


def _curve(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key, "") != ""]


def _fmt(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="none,quantile,random,all")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--frames-per-batch", type=int, default=2000)
    args = parser.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms.split(","):
            auc, final, share, fps = [], [], [], []
            for seed in range(args.seeds):
                run = run_child("iql", "pursuit-super", {
                    "sharing.mode": arm, "seed": seed, "collector.total_frames": args.frames,
                    "collector.frames_per_batch": args.frames_per_batch,
                }, Path(tmp) / f"{arm}{seed}")
                curve = _curve(run["rows"], "pursuer/episode_reward_mean")
                auc.append(statistics.mean(curve) if curve else math.nan)
                final.append(curve[-1] if curve else math.nan)
                share.append(statistics.mean(_curve(run["rows"], "pursuer/share_fraction") or [0.0]))
                fps.append(run["summary"]["frames_per_s"])
                print(f"{arm} seed {seed}: done", file=sys.stderr)
            table.append((arm, auc, final, share, fps))
    print(f"\nIQL on pursuit (8 pursuers, 30 evaders, 16x16), {args.frames:,} frames, {args.seeds} seeds\n")
    print("| sharing | area under return curve | final return | share fraction | frames/s |")
    print("|---|---|---|---|---|")
    for arm, auc, final, share, fps in table:
        print(f"| {arm} | {_fmt(auc)} | {_fmt(final)} | {statistics.mean(share):.3f} | {statistics.mean(fps):.0f} |")


if __name__ == "__main__":
    main()
