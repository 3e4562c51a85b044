"""Benchmark: a team critic across agent groups, on MPE speaker-listener.

Speaker-listener has two one-agent groups (``speaker``, ``listener``) that share one reward, so
marlkit makes them one team. This runs, for ``--seeds`` seeds each:

* ``mappo``: PPO whose critic sees both groups' observations (the team critic),
* ``ippo``: the same PPO with local critics (what MAPPO was before teams),
* ``qmix``: QMIX mixing the speaker's and the listener's Q values (refused before teams: each group
  has one agent),

with the ``speaker-listener`` and ``speaker-listener-q`` presets (``--arms`` also takes ``vdn`` and
``iql``, independent DQNs, for comparison), and prints per algorithm the final
return (mean of the last 5 iterations), the area under the return curve and frames/s, as mean and
95% interval over seeds. It writes every run's ``metrics.csv`` and one PNG of the curves (mean and
95% band) into ``--out``.

    python benchmarks/teams_speaker_listener.py [--seeds 3] [--frames 153600] [--jobs 2] [--out DIR]

With ``--jobs 2`` two runs share the machine (one torch thread each): compare returns, not frames/s.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _child import run_child

ARMS = {"mappo": "speaker-listener", "ippo": "speaker-listener", "qmix": "speaker-listener-q",
        "vdn": "speaker-listener-q", "iql": "speaker-listener-q"}
KEY = "speaker/episode_reward_mean"  # the shared reward: the listener's column is the same


def _interval(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    mean = statistics.mean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {half:.2f}"


def _plot(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, runs in curves.items():
        length = min(len(r) for _, r in runs)
        frames = runs[0][0][:length]
        stacked = np.stack([r[:length] for _, r in runs])
        mean = np.nanmean(stacked, 0)
        half = 1.96 * np.nanstd(stacked, 0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0 * mean
        ax.plot(frames, mean, label=arm)
        ax.fill_between(frames, mean - half, mean + half, alpha=0.25, linewidth=0)
    ax.set_xlabel("frames")
    ax.set_ylabel("mean episode return (shared)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="mappo,ippo,qmix", help=f"any of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=153_600)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each with one torch thread)")
    parser.add_argument("--out", default="benchmarks/results/teams_speaker_listener")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; accepted: {', '.join(ARMS)}")
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # the children inherit it: one thread each, no oversubscription
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]  # seeds interleaved across arms
    with tempfile.TemporaryDirectory() as tmp:
        def run(job: tuple[str, int]) -> dict:
            arm, seed = job
            run_dir = Path(tmp) / f"{arm}_seed{seed}"
            result = run_child(arm, ARMS[arm], {"seed": seed, "collector.total_frames": args.frames}, run_dir)
            shutil.copy(run_dir / "metrics.csv", out / f"{arm}_seed{seed}.csv")
            print(f"{arm} seed {seed}: done", file=sys.stderr, flush=True)
            return result

        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(zip(jobs, pool.map(run, jobs)))
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {arm: [] for arm in arms}
    rows = []
    for arm in arms:
        final, auc, fps = [], [], []
        for seed in range(args.seeds):
            res = results[(arm, seed)]
            frames = np.array([float(r["frames"]) for r in res["rows"]])
            returns = np.array([float(r[KEY]) if r[KEY] != "" else math.nan for r in res["rows"]])
            curves[arm].append((frames, returns))
            final.append(float(np.nanmean(returns[-5:])))
            auc.append(float(np.nanmean(returns)))
            fps.append(res["summary"]["frames_per_s"])
        rows.append((arm, final, auc, fps))
    title = f"speaker-listener, {args.frames:,} frames, {args.seeds} seeds: mean and 95% band"
    _plot(curves, out / "curves.png", title)
    print(f"\n{title}\n")
    print("| algorithm | final return (last 5 iterations) | area under return curve | frames/s |")
    print("|---|---|---|---|")
    for arm, final, auc, fps in rows:
        print(f"| {arm} | {_interval(final)} | {_interval(auc)} | {statistics.mean(fps):.0f} |")
    print(f"\nwrote {out}/*.csv and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
