"""Benchmark: algorithms side by side on one task, several seeds, mean curves with 95% bands.

Tasks and their arms (algorithm, preset, overrides):

* ``speaker-listener`` (MPE speaker-listener: one-agent ``speaker`` and ``listener`` groups sharing a
  reward, so one team; heterogeneous roles): ``mappo`` (team critic), ``ippo`` (local critics),
  ``happo`` (sequential per-agent updates, team critic), ``qmix`` / ``vdn`` (one mixer over both
  groups), ``iql``; presets ``speaker-listener`` / ``speaker-listener-q``.
* ``navigation-discrete`` (VMAS navigation, 3 agents, discrete actions): ``mappo``
  (``navigation-matched``), ``maa2c`` (``navigation-a2c``), ``coma`` (``navigation-coma``).
* ``memory`` (``probe/memory``: each of 2 agents sees a cue of 2 at the first step only and must name it
  ``k`` = 5, 10, 20 steps later; return 1 at best, 0.5 at chance): MAPPO with an ``mlp`` actor (no memory)
  and a ``gru`` actor trained on whole-episode slices; QMIX (``qmix-mlp-k*``, ``qmix-gru-k*``) with MLP and
  recurrent (DRQN) Q networks learnt from replayed whole-episode slices (the MLP arm samples as many
  transitions per step).
* ``reference`` (MPE ``simple_reference``: each of 2 agents must reach the landmark only the other knows,
  told through discrete "say" actions; partially observable): MAPPO with an ``mlp`` and a ``gru`` actor.
* ``gridworld-curriculum`` (MAPPO on the cooperative grid world, 2 agents, 3 targets, 100-step episodes):
  ``curriculum`` trains on 5x5, then 10x10 from 60,000 frames, then 20x20 from 120,000
  (``env.curriculum``), ``scratch`` on 20x20 throughout; both are evaluated every iteration on their
  current stage (20 greedy episodes), so their last iterations compare the same 20x20 task.
* ``precision`` (VMAS navigation, the matched ``navigation-matched`` MAPPO): ``float32`` (the default
  ``matmul_precision=highest``) and ``bf16`` (``matmul_precision=medium``: bfloat16 matrix products where the
  CPU has them), so a speed-up from bfloat16 is only taken with the returns it learns.
* ``communication`` (``probe/communication``: a speaker sees one of 4 symbols each step, a listener must
  name it, 10-step episodes; optimum 10, chance 2.5): MAPPO with an ``mlp`` actor (no way to pass the
  symbol), ``commnet``, ``attention``, ``deepsets`` and ``gnn`` actors (learned messages, 2 rounds).

Every finished run's ``metrics.csv`` is copied to ``<out>/<arm>_seed<seed>.csv``; runs whose CSV is
there already are skipped (``--rerun`` runs them again), and the table and the PNG are made from the
CSVs alone: per arm the final return (mean over the iterations of the last tenth of the frames, those
without a finished episode left out), the mean over the whole curve (area under it, divided by its
length) and frames/s, as mean and 95% interval over seeds.

    python benchmarks/compare_algorithms.py [--task speaker-listener] [--arms mappo,ippo,happo]
        [--seeds 3] [--frames N] [--jobs 2] [--out DIR] [--set section.field=value ...]

With ``--jobs 2`` two runs share the machine (one torch thread each): compare returns, not frames/s.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _child import run_child


@dataclass
class Task:
    """A task's arms (name -> algorithm, preset, overrides), the CSV column plotted and its defaults."""

    arms: dict[str, tuple[str, str | None, dict]]
    key: str
    default_arms: str
    frames: int


DISCRETE = {"env.continuous_actions": False}
COMMUNICATION = {"env.name": "probe/communication", "env.n_symbols": 4, "env.max_steps": 10, "env.num_envs": 100,
                 "collector.frames_per_batch": 2000, "train.minibatch_size": 500, "train.num_epochs": 4,
                 "model.num_cells": [64, 64], "loss.entropy_coef": 0.01, "train.lr": 1e-3}


def _memory(delay: int, kind: str) -> tuple[str, None, dict]:
    """MAPPO on probe/memory with cue-to-question ``delay``: 100 copies, about 4,000 frames (whole
    episodes) per batch, slices of one whole episode (seq_len = delay + 1, so the gradient reaches back to
    the cue)."""
    length = delay + 1
    frames = 100 * max(1, 4000 // (100 * length)) * length
    return ("mappo", None, {"env.name": "probe/memory", "env.delay": delay, "env.num_envs": 100,
                            "collector.frames_per_batch": frames, "train.minibatch_size": frames // 5,
                            "train.num_epochs": 4, "model.num_cells": [64, 64], "loss.entropy_coef": 0.01,
                            "train.lr": 1e-3, "model.kind": kind, **({"model.seq_len": length} if kind != "mlp" else {})})


def _memory_q(delay: int, kind: str) -> tuple[str, None, dict]:
    """QMIX on probe/memory with cue-to-question ``delay``: the batches of :func:`_memory`, 50 optimiser steps
    of 32 slices per batch, each slice one whole episode (replay.seq_len = delay + 1), epsilon 1 -> 0.05 over
    the first 50,000 frames, PyMARL's lr 5e-4 and hard target updates every 200 steps."""
    algorithm, _, mappo = _memory(delay, kind)
    frames = mappo["collector.frames_per_batch"]
    return ("qmix", None, {"env.name": "probe/memory", "env.delay": delay, "env.num_envs": 100,
                           "collector.frames_per_batch": frames, "model.num_cells": [64, 64], "model.kind": kind,
                           "train.optimiser_steps": 50, "train.lr": 5e-4, "replay.batch_size": 32,
                           "replay.buffer_size": 100_000, "replay.memmap": False, "loss.gamma": 0.99,
                           "loss.target_update": "hard", "loss.hard_update_interval": 200,
                           "exploration.eps_init": 1.0, "exploration.eps_end": 0.05,
                           "exploration.annealing_frames": 50_000,
                           **({"replay.seq_len": delay + 1} if kind != "mlp" else {"replay.batch_size": 32 * (delay + 1)})})


# MPE simple_reference (2 agents, 3 landmarks: each agent's goal is known only to the other, who can say it
# through its discrete actions), a standard partially observable task, with speaker-listener's MAPPO settings;
# the gru arm trains on whole 25-step episodes (model.seq_len).
REFERENCE = {"env.name": "pettingzoo/mpe2/simple_reference_v3", "env.num_envs": 32, "env.max_steps": 25,
             "collector.frames_per_batch": 3200, "model.num_cells": [64, 64], "loss.gamma": 0.99, "loss.lmbda": 0.95,
             "loss.entropy_coef": 0.01, "train.lr": 7e-4, "train.max_grad_norm": 10.0, "train.num_epochs": 10,
             "train.minibatch_size": 800}


GRIDWORLD = {"env.name": "gridworld", "env.num_envs": 20, "env.max_steps": 100, "collector.frames_per_batch": 4000,
             "train.minibatch_size": 1000, "train.num_epochs": 4, "model.num_cells": [64, 64], "loss.entropy_coef": 0.01,
             "logger.eval_every": 1, "logger.eval_episodes": 20}
TASKS = {
    "speaker-listener": Task(
        arms={"mappo": ("mappo", "speaker-listener", {}), "ippo": ("ippo", "speaker-listener", {}),
              "happo": ("happo", "speaker-listener", {}), "qmix": ("qmix", "speaker-listener-q", {}),
              "vdn": ("vdn", "speaker-listener-q", {}), "iql": ("iql", "speaker-listener-q", {})},
        key="speaker/episode_reward_mean",  # the shared reward: the listener's column is the same
        default_arms="mappo,ippo,happo", frames=153_600),
    "navigation-discrete": Task(
        arms={"mappo": ("mappo", "navigation-matched", DISCRETE), "maa2c": ("maa2c", "navigation-a2c", DISCRETE),
              "coma": ("coma", "navigation-coma", {})},
        key="agents/episode_reward_mean", default_arms="mappo,maa2c,coma", frames=120_000),
    "gridworld-curriculum": Task(
        arms={"curriculum": ("mappo", None, {**GRIDWORLD, "env.grid_size": 5, "env.curriculum": [
                  {"at_frames": 60_000, "grid_size": 10}, {"at_frames": 120_000, "grid_size": 20}]}),
              "scratch": ("mappo", None, {**GRIDWORLD, "env.grid_size": 20})},
        key="eval/agents/episode_reward_mean", default_arms="curriculum,scratch", frames=200_000),
    "precision": Task(
        arms={"float32": ("mappo", "navigation-matched", {}),
              "bf16": ("mappo", "navigation-matched", {"matmul_precision": "medium"})},
        key="agents/episode_reward_mean", default_arms="float32,bf16", frames=120_000),
    "communication": Task(
        arms={kind: ("mappo", None, {**COMMUNICATION, "model.kind": kind})
              for kind in ("mlp", "commnet", "attention", "deepsets", "gnn")},
        key="agents/episode_reward_mean", default_arms="mlp,commnet,attention,deepsets,gnn", frames=60_000),
    "reference": Task(
        arms={"mlp": ("mappo", None, REFERENCE), "gru": ("mappo", None, {**REFERENCE, "model.kind": "gru", "model.seq_len": 25})},
        key="agent/episode_reward_mean", default_arms="mlp,gru", frames=102_400),
    "memory": Task(
        arms={**{f"{kind}-k{k}": _memory(k, kind) for k in (5, 10, 20) for kind in ("mlp", "gru")},
              **{f"qmix-{kind}-k{k}": _memory_q(k, kind) for k in (5, 10, 20) for kind in ("mlp", "gru")}},
        key="agents/episode_reward_mean", default_arms="mlp-k5,gru-k5,mlp-k10,gru-k10,mlp-k20,gru-k20",
        frames=200_000),
}


def interval(values: list[float]) -> str:
    """Mean ± 95% half-width over the finite values (the seeds), as the tables print it."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "no finished episode"
    mean = statistics.mean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {half:.2f}"


def plot_curves(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], out: Path, title: str,
                ylabel: str = "mean episode return") -> None:
    """Each arm's mean curve over its runs with a 95% band, into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, runs in curves.items():
        length = min(len(r) for _, r in runs)
        frames = runs[0][0][:length]
        stacked = np.stack([r[:length] for _, r in runs])
        with warnings.catch_warnings():  # iterations where no run finished an episode are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stacked, 0)
            half = 1.96 * np.nanstd(stacked, 0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0 * mean
        seen = np.isfinite(mean)  # connect the iterations that have a return (short batches end few episodes)
        half = np.nan_to_num(half)
        ax.plot(frames[seen], mean[seen], label=arm)
        ax.fill_between(frames[seen], (mean - half)[seen], (mean + half)[seen], alpha=0.25, linewidth=0)
    ax.set_xlabel("frames")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _parse_set(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.field=value")
        pairs[key] = value
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="speaker-listener", choices=sorted(TASKS))
    parser.add_argument("--arms", default=None, help="comma-separated; default: the task's usual comparison")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=None, help="default: the task's budget")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each with one torch thread)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<task>")
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value for every run (tiny checks)")
    parser.add_argument("--rerun", action="store_true", help="run again even where a CSV exists")
    args = parser.parse_args()
    task = TASKS[args.task]
    arms = (args.arms or task.default_arms).split(",")
    unknown = sorted(set(arms) - set(task.arms))
    if unknown:
        parser.error(f"unknown arms {unknown} for --task {args.task}; accepted: {', '.join(task.arms)}")
    frames = args.frames or task.frames
    extra = _parse_set(args.set)
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # the children inherit it: one thread each, no oversubscription
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.task.replace("-", "_"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms  # seeds interleaved across arms
            if args.rerun or not (out / f"{arm}_seed{seed}.csv").exists()]
    print(f"{len(jobs)} runs to do ({args.jobs} at a time); results in {out}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def run(job: tuple[str, int]) -> None:
            arm, seed = job
            algorithm, preset, overrides = task.arms[arm]
            run_dir = Path(tmp) / f"{arm}_seed{seed}"
            batch = int(extra.get("collector.frames_per_batch", overrides.get("collector.frames_per_batch", 0)))
            total = max(batch, frames // batch * batch) if batch else frames  # whole batches of this arm's size
            run_child(algorithm, preset, {**overrides, "seed": seed, "collector.total_frames": total, **extra}, run_dir)
            shutil.copy(run_dir / "metrics.csv", out / f"{arm}_seed{seed}.csv")
            print(f"{arm} seed {seed}: done", file=sys.stderr, flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, jobs))
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {arm: [] for arm in arms}
    rows = []
    for arm in arms:
        final, auc, fps = [], [], []
        for seed in range(args.seeds):
            with (out / f"{arm}_seed{seed}.csv").open() as handle:
                metrics = list(csv.DictReader(handle))
            steps = np.array([float(r["frames"]) for r in metrics])
            returns = np.array([float(r[task.key]) if r[task.key] != "" else math.nan for r in metrics])
            curves[arm].append((steps, returns))
            last = steps >= min(0.9 * frames, steps[-1])  # the last tenth of the budget, whatever the batch size
            final.append(float(np.nanmean(returns[last])) if np.isfinite(returns[last]).any() else math.nan)
            auc.append(float(np.nanmean(returns)))
            fps.append(steps[-1] / float(metrics[-1]["time_s"]))
        rows.append((arm, final, auc, fps))
    title = f"{args.task}, {frames:,} frames, {args.seeds} seeds: mean and 95% band"
    plot_curves(curves, out / "curves.png", title)
    print(f"\n{title}\n")
    print("| algorithm | final return (last 10% of frames) | mean return over the run | frames/s |")
    print("|---|---|---|---|")
    for arm, final, auc, fps in rows:
        print(f"| {arm} | {interval(final)} | {interval(auc)} | {statistics.mean(fps):.0f} |")
    print(f"\nwrote {out}/*.csv and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
