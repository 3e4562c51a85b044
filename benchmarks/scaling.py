"""Benchmark: collection frames/s for each ``collector.backend``, on Python simulators and on batched VMAS.

For each env and policy (MAPPO's stochastic actor, IQL's epsilon-greedy Q-network, both built by the
pipelines' own ``build_learners`` with their default sizes) it builds the collector of every backend
through ``marlkit.pipelines.collectors.make_collector``: ``sync`` (one process), ``mp1`` / ``mp2``
(``multiprocess`` with 1 / 2 worker processes) and ``ray2`` (``ray`` with 2 workers on a local
instance). It then times batches with ``update_policy_weights_`` after each, as the training loops
do, after one warm-up batch. Rounds are interleaved (every collector of an env and policy once per
round, in turn) and the table shows the median frames/s and the ratio to ``sync``.

``--parts sweep`` times a 2 x 2 x 2 ``marlkit sweep`` (MAPPO and IPPO on VMAS navigation and balance,
seeds 0-1, ``SWEEP_FRAMES`` frames each, the default MAPPO config) run one after another (``--no-ray``,
each run with all the cores' threads) and as Ray tasks (``--max-concurrent 2``, one thread each),
alternating, ``--rounds`` times.

    python benchmarks/scaling.py [--parts collection,sweep] [--rounds 3] [--seconds 4] [--threads 2]
                                 [--envs NAME,...] [--backends sync,mp1,mp2,ray2] [--policies mappo,iql]
                                 [--sweep-frames 12000] [--sweep-override KEY=VALUE ...] [--out FILE]

Run it on an idle machine: a busy core slows the run that waits for it, and the ratios mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# env -> (copies, frames per batch): about a second of sync collection per batch on 2 cores.
ENVS = {
    "pettingzoo/sisl/pursuit_v5": (8, 160),
    "pettingzoo/mpe2/simple_spread_v3": (8, 800),
    "gym/CartPole-v1": (8, 1600),
    "vmas/navigation": (64, 6400),
}
BACKENDS = {"sync": ("sync", 1), "mp1": ("multiprocess", 1), "mp2": ("multiprocess", 2), "ray2": ("ray", 2)}


def build(env_name: str, policy: str, backend: str, scratch: Path):
    """The collector of ``backend`` for ``policy``'s acting policy on ``env_name`` (and the run's env)."""
    from tensordict.nn import TensorDictSequential

    from marlkit.pipelines import make_config, pipeline_for
    from marlkit.pipelines.collectors import make_collector
    from marlkit.pipelines.environment import build_env, resolve_env_config

    copies, frames = ENVS[env_name]
    kind, workers = BACKENDS[backend]
    overrides = {"env.name": env_name, "env.num_envs": copies, "collector.frames_per_batch": frames,
                 "collector.backend": kind, "collector.workers": workers}
    if policy == "iql" and env_name.startswith("vmas/"):
        overrides["env.continuous_actions"] = False  # Q-learning needs discrete actions
    cfg = make_config(policy, overrides=overrides)
    cfg.env = resolve_env_config(cfg.env)
    env = build_env(cfg.env, device="cpu", seed=0)
    learners = pipeline_for(policy).build_learners(env, cfg, torch.device("cpu"), scratch / f"{policy}-{backend}")
    acting = TensorDictSequential(*(learner.policy for learner in learners.values()))
    return make_collector(env, acting, cfg, device=torch.device("cpu")), env


def time_batches(batches, collector, seconds: float) -> float:
    """Frames/s of whole batches (each followed by a weight update) over at least ``seconds``."""
    frames, start = 0, time.perf_counter()
    while frames == 0 or time.perf_counter() - start < seconds:
        frames += next(batches).numel()
        collector.update_policy_weights_()
    return frames / (time.perf_counter() - start)


def time_sweep(mode: list[str], frames: int, folder: Path, overrides: list[str]) -> float:
    """Wall seconds of the benchmark's 2 x 2 x 2 sweep in ``mode`` (``["--no-ray"]`` or Ray options)."""
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "marlkit.pipelines.cli", "sweep", "--algorithms", "mappo,ippo",
               "--envs", "vmas/navigation,vmas/balance", "--seeds", "0-1", "--frames", str(frames),
               "--sweep-dir", str(folder), *mode, *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def sweep_table(rounds: int, frames: int, overrides: list[str]) -> list[str]:
    """Median wall time of the sweep without and with Ray, alternating ``rounds`` times."""
    modes = {"--no-ray (one after another)": ["--no-ray"], "Ray, --max-concurrent 2": ["--max-concurrent", "2"]}
    if importlib.util.find_spec("ray") is None:
        modes.pop("Ray, --max-concurrent 2")
    times: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            for name, mode in modes.items():
                times[name].append(time_sweep(mode, frames, Path(scratch) / "sweep", overrides))
    lines = ["", f"marlkit sweep of 8 runs (mappo,ippo x vmas/navigation,vmas/balance x seeds 0-1, {frames} frames "
             f"each): median wall seconds of {rounds} alternating rounds", "", "| mode | wall s | speed-up |",
             "|---|---|---|"]
    base = statistics.median(times["--no-ray (one after another)"])
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)}) | "
                     f"{base / statistics.median(values):.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="collection,sweep")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per collector per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this (the learner's) process")
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--policies", default="mappo,iql")
    parser.add_argument("--sweep-frames", type=int, default=12000, help="frames per run of the timed sweep")
    parser.add_argument("--sweep-override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="an override for every run of the timed sweep (repeatable)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    envs, backends, policies = args.envs.split(","), args.backends.split(","), args.policies.split(",")
    for name, given, known in (("env", envs, ENVS), ("backend", backends, BACKENDS),
                               ("policy", policies, ("mappo", "iql"))):
        bad = [item for item in given if item not in known]
        if bad:
            parser.error(f"unknown {name} {bad}; accepted: {', '.join(known)}")
    if "ray2" in backends and importlib.util.find_spec("ray") is None:
        print('ray is not installed (pip install -e ".[distributed]"): skipping ray2')
        backends.remove("ray2")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    lines = [f"collection frames/s, median of {args.rounds} interleaved rounds of {args.seconds:g} s; "
             f"learner process {args.threads} threads, workers 1 thread each",
             "", "| env | policy | copies | " + " | ".join(backends) + " |",
             "|---|---|---|" + "---|" * len(backends)]
    print("\n".join(lines), flush=True)
    parts = args.parts.split(",")
    if "collection" not in parts:
        envs = []
    with tempfile.TemporaryDirectory() as scratch:
        for env_name in envs:
            for policy in policies:
                built = {backend: build(env_name, policy, backend, Path(scratch)) for backend in backends}
                iterators = {backend: iter(collector) for backend, (collector, _) in built.items()}
                for backend, batches in iterators.items():
                    next(batches)  # warm-up: worker start-up, first reset, buffers
                speeds: dict[str, list[float]] = {backend: [] for backend in backends}
                for _ in range(args.rounds):
                    for backend in backends:
                        speeds[backend].append(time_batches(iterators[backend], built[backend][0], args.seconds))
                for collector, env in built.values():
                    collector.shutdown()
                    env.close(raise_if_closed=False)
                medians = {backend: statistics.median(values) for backend, values in speeds.items()}
                base = medians.get("sync")
                cells = [f"{medians[b]:,.0f}" + (f" ({medians[b] / base:.2f}x)" if base and b != "sync" else "")
                         for b in backends]
                line = f"| {env_name} | {policy} | {ENVS[env_name][0]} | " + " | ".join(cells) + " |"
                lines.append(line)
                print(line, flush=True)
    if "sweep" in parts:
        sweep_lines = sweep_table(args.rounds, args.sweep_frames, args.sweep_override)
        print("\n".join(sweep_lines), flush=True)
        lines += sweep_lines
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
