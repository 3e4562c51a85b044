"""Benchmark: IQL with and without SUPER on MAgent2 battle (map 18: 6 red vs 6 blue), red learning against
a frozen (random-initialised, greedy) blue, and collection speed with 1 and 2 collector workers.

For each arm (``none``, ``quantile``) and seed, ``marlkit train iql --env magent2/battle_v4`` with
``train.freeze_after.blue=0``; prints red's and blue's mean episode return over the last iterations, the
mean over the run, frames/s (and red's curves, ``curves.png``), and the collection frames/s of the ``none`` arm with ``collector.workers``
1 and 2 (``multiprocess``, synchronous). Raw ``metrics.csv`` copies go to ``--out``.

    python benchmarks/magent_battle.py [--seeds 2] [--frames 6000] [--speed-frames 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
from _child import run_child
from compare_algorithms import plot_curves

COMMON = {"env.name": "magent2/battle_v4", "env.map_size": 18, "env.num_envs": 4, "env.max_steps": 100,
          "collector.frames_per_batch": 400, "replay.batch_size": 64, "replay.buffer_size": 20_000,
          "replay.memmap": False, "train.optimiser_steps": 20, "train.lr": 1e-3, "model.num_cells": [64, 64],
          "model.image_encoder": "flatten", "exploration.eps_init": 1.0, "exploration.eps_end": 0.05,
          "train.freeze_after": {"blue": 0}}
ARMS = {"none": {"sharing.mode": "none"}, "quantile": {"sharing.mode": "quantile"}}


def _summary(rows: list[dict], group: str) -> tuple[float, float]:
    values = [float(r[f"{group}/episode_reward_mean"]) for r in rows if r[f"{group}/episode_reward_mean"] != ""]
    tail = values[-max(1, len(values) // 5):]
    return (statistics.mean(tail), statistics.mean(values)) if values else (float("nan"), float("nan"))


def plot_red(out: Path, seeds: int) -> Path:
    """``<out>/curves.png``: red's mean episode return per arm against frames (mean and 95% band over seeds),
    from the copied CSVs alone."""
    curves = {}
    for arm in ARMS:
        runs = []
        for seed in range(seeds):
            with (out / f"{arm}_s{seed}.csv").open() as handle:
                rows = list(csv.DictReader(handle))
            frames = np.array([float(r["frames"]) for r in rows])
            red = np.array([float(r["red/episode_reward_mean"]) if r["red/episode_reward_mean"] else np.nan for r in rows])
            runs.append((frames, red))
        curves[arm] = runs
    plot_curves(curves, out / "curves.png", f"battle_v4 map 18, red vs frozen blue, {seeds} seeds: mean and 95% band",
                ylabel="red's mean episode return")
    return out / "curves.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--speed-frames", type=int, default=2000, help="frames of each collection-speed run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "magent_battle"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| arm | seed | red return (last fifth) | red return (whole run) | blue return (last fifth) | frames/s |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arm, overrides in ARMS.items():
                run_dir = Path(tmp) / f"{arm}_s{seed}"
                result = run_child("iql", None, {**COMMON, **overrides, "seed": seed,
                                                 "collector.total_frames": args.frames}, run_dir)
                shutil.copy(run_dir / "metrics.csv", out / f"{arm}_s{seed}.csv")
                red, blue = _summary(result["rows"], "red"), _summary(result["rows"], "blue")
                lines.append(f"| {arm} | {seed} | {red[0]:.2f} | {red[1]:.2f} | {blue[0]:.2f} | "
                             f"{result['summary']['frames_per_s']:.0f} |")
        speed = ["| collector | collection frames/s |", "|---|---|"]
        for workers in (1, 2):
            extra = {} if workers == 1 else {"collector.backend": "multiprocess", "collector.workers": 2}
            run_dir = Path(tmp) / f"speed_w{workers}"
            run_child("iql", None, {**COMMON, **extra, "collector.total_frames": args.speed_frames}, run_dir)
            with (run_dir / "metrics.csv").open() as handle:
                rows = list(csv.DictReader(handle))
            timed = rows[1:] or rows  # the first iteration includes the workers' start-up
            collect = sum(float(r["timers/collection_s"]) for r in timed)
            frames = COMMON["collector.frames_per_batch"] * len(timed)
            speed.append(f"| {'sync, 1 process' if workers == 1 else 'multiprocess, 2 workers'} | {frames / collect:,.0f} |")
    print("\n".join(lines))
    print()
    print("\n".join(speed))
    print(f"\nwrote {plot_red(out, args.seeds)}")


if __name__ == "__main__":
    main()
