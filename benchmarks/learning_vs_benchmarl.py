"""Benchmark: marlkit against BenchMARL 1.5.2 with identical settings, task by task, seed by seed.

Each setting is written once below (``SETTINGS``) and handed to both systems in their own words: marlkit
as config overrides, BenchMARL as its Hydra overrides; every scenario keyword is passed explicitly to
both (BenchMARL's task files set some of them, VMAS's defaults differ from BenchMARL's). Runs are
interleaved (seed, task, arm), one at a time, so the machine's slow and fast phases hit every arm alike.

Algorithms: ``mappo`` (the matched configuration of ``../shared/anchors.md``) on navigation, balance,
give_way and dispersion; ``maddpg`` on balance and navigation and ``qmix`` on navigation and balance with
discrete actions, both at BenchMARL's own off-policy defaults (1,000 optimiser steps of 128 transitions per
6,000 frames, lr 5e-5, exploration 0.8 -> 0.01 over the first 100,000 frames) with 60 envs.

Arms: ``benchmarl`` (BenchMARL in its own virtual environment, ``--benchmarl-python``, see
``../shared/anchors.md``), ``marlkit`` (clipping the actor's and the critic's gradients separately,
as BenchMARL does), and ``marlkit-global-clip`` (one gradient norm over both, as TorchRL's scripts do).

Every finished run becomes ``<out>/<algorithm>_<task>/<arm>_seed<seed>.csv`` (frames, time_s, return:
the mean over the iteration's finished episodes of the agents' mean episode return, as both systems
log it); runs whose CSV exists are skipped (``--rerun`` repeats them). The tables and one PNG per task
(mean curve and 95% band over seeds) are made from the CSVs alone (``--table-only``).

    python benchmarks/learning_vs_benchmarl.py [--algorithm mappo] [--tasks balance,give_way]
        [--arms benchmarl,marlkit] [--seeds 3] [--frames N] [--benchmarl-python PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import math
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _child import run_child
from compare_algorithms import interval, plot_curves


@dataclass
class Setting:
    """One algorithm's matched settings: each hyperparameter once, with its name in both systems."""

    marlkit_algorithm: str
    benchmarl_algorithm: str
    matched: dict[str, tuple[Any, str | None, str | None]]
    """Setting -> (value, marlkit field, BenchMARL field); None where a system has no such knob."""
    tasks: list[str]
    frames: int
    discrete: bool = False
    """Discrete actions (VMAS's categorical actions in both)."""


# Scenario keywords: BenchMARL's task files (benchmarl/conf/task/vmas/*.yaml) with n_agents as the issue
# measured balance; passed to both systems, so neither falls back to its own defaults.
TASKS = {
    "navigation": {"max_steps": 100, "n_agents": 3, "collisions": True, "agents_with_same_goal": 1,
                   "split_goals": False, "observe_all_goals": False, "shared_rew": False, "lidar_range": 0.35,
                   "agent_radius": 0.1},
    "balance": {"max_steps": 100, "n_agents": 3, "random_package_pos_on_line": True, "package_mass": 5},
    "give_way": {"max_steps": 100, "mirror_passage": False, "observe_rel_pos": False, "done_on_completion": False,
                 "final_reward": 0.01},
    "dispersion": {"max_steps": 100, "n_agents": 4, "n_food": 4, "share_reward": True, "food_radius": 0.02,
                   "penalise_by_time": False},
}

_BOTH = {  # every algorithm: envs, batch, network, optimiser, evaluation and logging off in BenchMARL
    "num_cells": ([256, 256], "model.num_cells", "model.num_cells"),
    "activation": ("tanh", "model.activation", None),  # BenchMARL's mlp layers: torch.nn.Tanh
    "share_policy_params": (True, "model.share_params", "experiment.share_policy_params"),
    "gamma": (0.99, "loss.gamma", "experiment.gamma"),
    "max_grad_norm": (5.0, "train.max_grad_norm", "experiment.clip_grad_val"),
    "clip_grad_norm": (True, None, "experiment.clip_grad_norm"),
    "evaluation": (False, None, "experiment.evaluation"), "render": (False, None, "experiment.render"),
    "loggers": (["csv"], None, "experiment.loggers"), "sampling_device": ("cpu", None, "experiment.sampling_device"),
    "train_device": ("cpu", None, "experiment.train_device"), "buffer_device": ("cpu", None, "experiment.buffer_device"),
}

# The matched on-policy settings of ../shared/anchors.md.
MAPPO = Setting("mappo", "mappo", {
    **_BOTH,
    "num_envs": (60, "env.num_envs", "experiment.on_policy_n_envs_per_worker"),
    "frames_per_batch": (6000, "collector.frames_per_batch", "experiment.on_policy_collected_frames_per_batch"),
    "epochs": (10, "train.num_epochs", "experiment.on_policy_n_minibatch_iters"),
    "minibatch_size": (400, "train.minibatch_size", "experiment.on_policy_minibatch_size"),
    "lr": (3e-4, "train.lr", "experiment.lr"), "adam_eps": (1e-8, "train.adam_eps", "experiment.adam_eps"),
    "lmbda": (0.9, "loss.lmbda", "algorithm.lmbda"), "clip_epsilon": (0.2, "loss.clip_epsilon", "algorithm.clip_epsilon"),
    "entropy_coef": (0.0, "loss.entropy_coef", "algorithm.entropy_coef"),
    "critic_coef": (1.0, "loss.critic_coef", "algorithm.critic_coef"),
    "loss_critic_type": ("l2", "loss.loss_critic_type", "algorithm.loss_critic_type"),
    "share_critic_params": (True, "model.critic_share_params", "algorithm.share_param_critic"),
    "normalize_advantage": (False, "loss.normalize_advantage", None),  # BenchMARL: always False
    "normalize_value_target": (False, "loss.normalize_value_target", None),  # BenchMARL has none
    "scale_mapping": ("biased_softplus_1.0", None, "algorithm.scale_mapping"),  # marlkit's NormalParamExtractor default
    "tanh_normal": (True, None, "algorithm.use_tanh_normal"),  # marlkit: TanhNormal for bounded actions
    "minibatch_advantage": (False, None, "algorithm.minibatch_advantage"),
}, tasks=["navigation", "balance", "give_way", "dispersion"], frames=300_000)

_OFF_POLICY = {  # BenchMARL's off-policy defaults (base_experiment.yaml), but 60 envs as on-policy
    **_BOTH,
    "num_envs": (60, "env.num_envs", "experiment.off_policy_n_envs_per_worker"),
    "frames_per_batch": (6000, "collector.frames_per_batch", "experiment.off_policy_collected_frames_per_batch"),
    "optimiser_steps": (1000, "train.optimiser_steps", "experiment.off_policy_n_optimizer_steps"),
    "batch_size": (128, "replay.batch_size", "experiment.off_policy_train_batch_size"),
    "buffer_size": (1_000_000, "replay.buffer_size", "experiment.off_policy_memory_size"),
    "warmup_frames": (0, "replay.warmup_frames", "experiment.off_policy_init_random_frames"),
    "prioritized": (False, None, "experiment.off_policy_use_prioritized_replay_buffer"),
    "lr": (5e-5, "train.lr", "experiment.lr"), "adam_eps": (1e-6, "train.adam_eps", "experiment.adam_eps"),
    "soft_target_update": (True, None, "experiment.soft_target_update"),
    "target_update": ("soft", "loss.target_update", None), "tau": (0.005, "loss.tau", "experiment.polyak_tau"),
    "loss_function": ("l2", "loss.loss_function", "algorithm.loss_function"),
    "delay_value": (True, None, "algorithm.delay_value"),  # marlkit: always a target critic
    "exploration_init": (0.8, None, "experiment.exploration_eps_init"),
    "exploration_end": (0.01, None, "experiment.exploration_eps_end"),
    "exploration_frames": (100_000, None, "experiment.exploration_anneal_frames"),
}
MADDPG = Setting("maddpg", "maddpg", {
    **_OFF_POLICY,
    "sigma_init": (0.8, "exploration.sigma_init", None), "sigma_end": (0.01, "exploration.sigma_end", None),
    "sigma_frames": (100_000, "exploration.annealing_frames", None),
    "share_critic_params": (True, "model.critic_share_params", "algorithm.share_param_critic"),
    "tanh_mapping": (True, None, "algorithm.use_tanh_mapping"),  # marlkit: TanhDelta actor
    "buffer_memmap": (False, "replay.memmap", None),  # BenchMARL keeps it in memory
}, tasks=["balance", "navigation"], frames=300_000)
QMIX = Setting("qmix", "qmix", {
    **_OFF_POLICY,
    "eps_init": (0.8, "exploration.eps_init", None), "eps_end": (0.01, "exploration.eps_end", None),
    "eps_frames": (100_000, "exploration.annealing_frames", None),
    "mixing_embed_dim": (32, "model.mixing_embed_dim", "algorithm.mixing_embed_dim"),
    "buffer_memmap": (False, "replay.memmap", None),
}, tasks=["navigation", "balance"], frames=300_000, discrete=True)
SETTINGS = {"mappo": MAPPO, "maddpg": MADDPG, "qmix": QMIX}

ARMS = {"benchmarl": {}, "marlkit": {"train.clip_per_network": True},
        "marlkit-global-clip": {"train.clip_per_network": False}}


def marlkit_overrides(setting: Setting, task: str, seed: int, frames: int) -> dict[str, Any]:
    """The setting and task as marlkit config overrides."""
    kwargs = dict(TASKS[task])
    if setting.discrete:
        kwargs["continuous_actions"] = False
    overrides = {"seed": seed, "env.name": f"vmas/{task}", "env.max_steps": kwargs.pop("max_steps"),
                 "env.kwargs": kwargs, "collector.total_frames": frames}
    overrides.update({field_: value for value, field_, _ in setting.matched.values() if field_})
    return overrides


def _hydra(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    return str(value)


def benchmarl_overrides(setting: Setting, task: str, seed: int, frames: int, save_folder: Path) -> list[str]:
    """The setting and task as BenchMARL's Hydra overrides."""
    pairs = {"seed": seed, "experiment.max_n_frames": frames, "experiment.save_folder": save_folder,
             "experiment.prefer_continuous_actions": not setting.discrete}
    pairs.update({field_: value for value, _, field_ in setting.matched.values() if field_})
    pairs.update({f"task.{key}": value for key, value in TASKS[task].items()})
    return ([f"algorithm={setting.benchmarl_algorithm}", f"task=vmas/{task}"]
            + [f"{key}={_hydra(value)}" for key, value in pairs.items()])


def run_benchmarl(python: str, setting: Setting, task: str, seed: int, frames: int, work: Path) -> list[tuple]:
    """One BenchMARL run in its own environment; its curve as (frames, time_s, return) rows."""
    work.mkdir(parents=True)
    cmd = [python, "-m", "benchmarl.run", *benchmarl_overrides(setting, task, seed, frames, work)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if out.returncode:
        raise RuntimeError(f"BenchMARL run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    scalars = Path(glob.glob(str(work / "*" / "*" / "scalars"))[0])

    def column(name: str) -> dict[int, float]:
        rows = (line.split(",") for line in (scalars / f"{name}.csv").read_text().split())
        return {int(step): float(value) for step, value in rows}

    frames_at, time_at = column("counters_total_frames"), column("timers_total_time")
    returns = column("collection_reward_episode_reward_mean")
    return [(frames_at[i], time_at[i], returns.get(i, math.nan)) for i in sorted(frames_at)]


def run_marlkit(setting: Setting, arm: str, task: str, seed: int, frames: int, work: Path) -> list[tuple]:
    """One marlkit run in a fresh process; its curve as (frames, time_s, return) rows."""
    overrides = {**marlkit_overrides(setting, task, seed, frames), **ARMS[arm]}
    result = run_child(setting.marlkit_algorithm, None, overrides, work)
    key = next(k for k in result["rows"][0] if k.endswith("/episode_reward_mean") and not k.startswith("eval/"))
    return [(float(r["frames"]), float(r["time_s"]), float(r[key]) if r[key] != "" else math.nan)
            for r in result["rows"]]


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A run's CSV as arrays of frames, wall time and return."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return tuple(np.array([float(r[k]) if r[k] != "" else math.nan for r in rows]) for k in ("frames", "time_s", "return"))


def permutation_p(a: list[float], b: list[float], rounds: int = 20_000, seed: int = 0) -> float:
    """Two-sided permutation p-value of mean(b) - mean(a) over the seeds: every relabelling of the pooled
    values when there are at most ``rounds`` of them (3 seeds a side give 20: p is never below 0.1),
    ``rounds`` random ones otherwise."""
    pooled, n = np.array(a + b, dtype=float), len(a)
    observed = abs(pooled[n:].mean() - pooled[:n].mean())
    exact = math.comb(len(pooled), n) <= rounds
    if exact:
        splits = [list(c) for c in itertools.combinations(range(len(pooled)), n)]
    else:
        rng = np.random.default_rng(seed)
        splits = [rng.permutation(len(pooled))[:n] for _ in range(rounds)]
    total = pooled.sum()
    diffs = np.array([abs((total - pooled[s].sum()) / len(b) - pooled[s].mean()) for s in splits])
    hits = int((diffs >= observed - 1e-12).sum())
    # sampled: the observed labelling counts as one of the draws, so p is never 0 (Phipson & Smyth 2010)
    return hits / len(splits) if exact else (hits + 1) / (rounds + 1)


def table(out: Path, task: str, arms: list[str], seeds: int, frames: int) -> str:
    """The task's markdown table and curves.png from its CSVs alone ("best iteration": each run's highest
    return, which shows what an unstable off-policy run reached before it fell back).

    Threshold: 80% of the way from the first iteration's return (mean over every run) to the best arm's
    final return; "frames to threshold" is the first iteration at or above it, mean over the seeds that
    reach it (how many did is shown).
    """
    runs = {arm: [read_curve(out / f"{arm}_seed{s}.csv") for s in range(seeds) if (out / f"{arm}_seed{s}.csv").exists()]
            for arm in arms}
    runs = {arm: r for arm, r in runs.items() if r}
    if not runs:
        return f"{task}: no finished runs\n"

    def final(ret: np.ndarray, f: np.ndarray) -> float:
        last = f >= min(0.9 * frames, f[-1])
        return float(np.nanmean(ret[last])) if np.isfinite(ret[last]).any() else math.nan

    finals = {arm: [final(r, f) for f, _, r in rr] for arm, rr in runs.items()}
    start = float(np.nanmean([r[0] for rr in runs.values() for _, _, r in rr]))
    best = max(statistics.mean([v for v in vs if not math.isnan(v)] or [start]) for vs in finals.values())
    threshold = start + 0.8 * (best - start)
    lines = [f"**{task}** ({frames:,} frames; threshold {threshold:.2f})", "",
             "| arm | seeds | final return (last 10% of frames) | mean return over the run | best iteration "
             "| frames to threshold | frames/s |",
             "|---|---|---|---|---|---|---|"]
    per_seed = {}
    for arm, rr in runs.items():
        hits = [f[np.argmax(r >= threshold)] for f, _, r in rr if (r >= threshold).any()]
        reach = f"{statistics.mean(hits):,.0f} ({len(hits)}/{len(rr)})" if hits else f"not reached (0/{len(rr)})"
        fps = statistics.mean(f[-1] / t[-1] for f, t, _ in rr)
        means = [float(np.nanmean(r)) for _, _, r in rr]
        peaks = [float(np.nanmax(r)) if np.isfinite(r).any() else math.nan for _, _, r in rr]
        per_seed[arm] = {"final": finals[arm], "over the run": means, "best iteration": peaks,
                         "frames to threshold": hits if len(hits) == len(rr) else None}
        lines.append(f"| {arm} | {len(rr)} | {interval(finals[arm])} | {interval(means)} | {interval(peaks)} | {reach} "
                     f"| {fps:,.0f} |")
    reference = next(iter(per_seed))
    for arm in list(per_seed)[1:]:
        parts = []
        for measure, values in per_seed[arm].items():
            base = per_seed[reference][measure]
            if values is None or base is None or any(map(math.isnan, values + base)):
                continue  # a seed that never reached the threshold, or one without a finished episode
            digits = 0 if measure == "frames to threshold" else 2
            parts.append(f"{measure} {statistics.mean(values) - statistics.mean(base):+,.{digits}f} "
                         f"(p = {permutation_p(base, values):.2f})")
        lines.append(f"\n{arm} − {reference}, difference of the means over seeds (two-sided permutation p): "
                     + "; ".join(parts))
    plot_curves({arm: [(f, r) for f, _, r in rr] for arm, rr in runs.items()}, out / "curves.png",
                f"{task}: mean and 95% band over seeds")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="mappo", choices=sorted(SETTINGS))
    parser.add_argument("--tasks", default=None, help="comma-separated; default: every task of the algorithm")
    parser.add_argument("--arms", default="benchmarl,marlkit", help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=None, help="default: the algorithm's budget")
    parser.add_argument("--benchmarl-python", default=os.environ.get("BENCHMARL_PYTHON", "/tmp/benchmarl-venv/bin/python"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "learning_vs_benchmarl"))
    parser.add_argument("--rerun", action="store_true", help="run again even where a CSV exists")
    parser.add_argument("--table-only", action="store_true", help="make the tables from the CSVs, run nothing")
    args = parser.parse_args()
    setting = SETTINGS[args.algorithm]
    tasks = args.tasks.split(",") if args.tasks else setting.tasks
    arms = args.arms.split(",")
    for name, accepted in (("tasks", TASKS), ("arms", ARMS)):
        bad = sorted(set(tasks if name == "tasks" else arms) - set(accepted))
        if bad:
            parser.error(f"unknown {name} {bad}; accepted: {', '.join(accepted)}")
    if "benchmarl" in arms and not args.table_only and not Path(args.benchmarl_python).exists():
        parser.error(f"--benchmarl-python {args.benchmarl_python} does not exist; make BenchMARL's environment "
                     "as ../shared/anchors.md says, or leave the benchmarl arm out")
    frames = args.frames or setting.frames
    root = Path(args.out)
    jobs = [(seed, task, arm) for seed in range(args.seeds) for task in tasks for arm in arms
            if args.rerun or not (root / f"{args.algorithm}_{task}" / f"{arm}_seed{seed}.csv").exists()]
    if not args.table_only:
        print(f"{len(jobs)} runs to do, one at a time; results in {root}", flush=True)
        for seed, task, arm in jobs:
            out = root / f"{args.algorithm}_{task}"
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                if arm == "benchmarl":
                    rows = run_benchmarl(args.benchmarl_python, setting, task, seed, frames, Path(tmp) / "run")
                else:
                    rows = run_marlkit(setting, arm, task, seed, frames, Path(tmp) / "run")
            with (out / f"{arm}_seed{seed}.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["frames", "time_s", "return"])
                writer.writerows(rows)
            print(f"{task} {arm} seed {seed}: final {rows[-1][2]:.2f}, {rows[-1][0] / rows[-1][1]:.0f} frames/s",
                  flush=True)
    for task in tasks:
        print(table(root / f"{args.algorithm}_{task}", task, arms, args.seeds, frames))


if __name__ == "__main__":
    main()
