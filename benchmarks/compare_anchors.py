"""Benchmark: marlkit's speed against TorchRL's own multi-agent scripts and BenchMARL, interleaved.

Every README speed claim comes from this script: for each algorithm (MAPPO, MADDPG, QMIX) it runs
marlkit, TorchRL's script and BenchMARL on the same matched configuration, one after the other, round
after round, on this machine in one sitting, and prints the median loop frames/s of each, the ratios and
the final returns. A figure taken on another machine or day compares nothing.

Configurations (``../shared/anchors.md``): MAPPO is the matched ``navigation-matched`` setup (120,000
frames); MADDPG and QMIX (discrete actions) are TorchRL's multi-agent script settings on the same VMAS
navigation (3 agents, 60 envs, 100 steps, individual rewards), 30,000 frames: 45 optimiser steps of 4,096
transitions per 6,000 frames, lr 5e-5, Adam eps 1e-8, gamma 0.9, tau 0.005, gradient clip 40, a replay of
the last 6,000 frames in memory (TorchRL's scripts size it to one batch).

How each is timed, the same way for all three: the training loop's wall time from the first collection to
the end of the last update (marlkit: ``summary.json``; BenchMARL: its ``timers/total_time``, which leaves
out its logging; TorchRL's scripts: a wrapper around their collector's iterator, so the scripts run
unmodified; it leaves out nothing of their loop and they run without a logger).

The systems: ``marlkit`` (this checkout), ``marlkit-bf16`` (the same with ``matmul_precision=medium``:
bfloat16 matrix products where the CPU has them, AMX here; everything else float32), ``torchrl`` (the scripts of ``sota-implementations/multiagent``
in ``--torchrl-scripts``, run by ``--torchrl-python``, an environment with torchrl 0.14.1, hydra-core and
vmas; ``../shared/anchors/compare_mappo.sh`` makes one), ``benchmarl`` (BenchMARL 1.5.2 in its own
environment, ``--benchmarl-python``). Every run gets ``OMP_NUM_THREADS=--threads``.

Each finished run is one row of ``<out>/runs.csv``; the tables are made from it (``--table-only``).

    python benchmarks/compare_anchors.py [--algorithms mappo,maddpg,qmix] [--systems marlkit,torchrl,benchmarl]
        [--rounds 3] [--threads 2] [--torchrl-scripts DIR] [--torchrl-python PATH] [--benchmarl-python PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from _child import run_child
from learning_vs_benchmarl import MADDPG, MAPPO, marlkit_overrides, QMIX, run_benchmarl, Setting

HERE = Path(__file__).resolve().parent
SHARED_SCRIPTS = HERE.parent.parent / "shared" / "anchors" / "torchrl_multiagent"

# TorchRL's multi-agent off-policy settings, as each system names them (value, marlkit, BenchMARL).
_TORCHRL_OFF_POLICY = {
    "optimiser_steps": (45, "train.optimiser_steps", "experiment.off_policy_n_optimizer_steps"),
    "batch_size": (4096, "replay.batch_size", "experiment.off_policy_train_batch_size"),
    "buffer_size": (6000, "replay.buffer_size", "experiment.off_policy_memory_size"),
    "buffer_memmap": (False, "replay.memmap", None),
    "lr": (5e-5, "train.lr", "experiment.lr"), "adam_eps": (1e-8, "train.adam_eps", "experiment.adam_eps"),
    "gamma": (0.9, "loss.gamma", "experiment.gamma"), "tau": (0.005, "loss.tau", "experiment.polyak_tau"),
    "max_grad_norm": (40.0, "train.max_grad_norm", "experiment.clip_grad_val"),
}
SETTINGS: dict[str, Setting] = {
    "mappo": replace(MAPPO, frames=120_000),
    "maddpg": replace(MADDPG, frames=30_000, matched={
        **MADDPG.matched, **_TORCHRL_OFF_POLICY,
        # TorchRL's MADDPG script: no parameter sharing (its default: the agents' rewards may differ)
        "share_policy_params": (False, "model.share_params", "experiment.share_policy_params"),
        "share_critic_params": (False, "model.critic_share_params", "algorithm.share_param_critic")}),
    "qmix": replace(QMIX, frames=30_000, matched={**QMIX.matched, **_TORCHRL_OFF_POLICY}),
}
TASK = "navigation"

# TorchRL's script and its Hydra overrides for the same configuration; no logger, so no evaluation either.
_TORCHRL_ENV = ["env.scenario_name=navigation", "env.max_steps=100", "env.scenario.n_agents=3",
                "+env.scenario.shared_rew=False", "collector.frames_per_batch=6000", "logger.backend="]
TORCHRL = {
    "mappo": ("mappo_ippo.py", [*_TORCHRL_ENV, "collector.n_iters=20", "model.shared_parameters=True",
                                "model.centralised_critic=True", "train.num_epochs=10", "train.minibatch_size=400",
                                "train.lr=3e-4", "train.max_grad_norm=5.0", "loss.gamma=0.99", "loss.lmbda=0.9",
                                "loss.clip_epsilon=0.2", "loss.entropy_eps=0.0"]),
    "maddpg": ("maddpg_iddpg.py", [*_TORCHRL_ENV, "collector.n_iters=5", "model.shared_parameters=False",
                                   "model.centralised_critic=True", "train.num_epochs=45", "train.minibatch_size=4096",
                                   "train.lr=5e-5", "train.max_grad_norm=40.0", "loss.gamma=0.9", "loss.tau=0.005"]),
    "qmix": ("qmix_vdn.py", [*_TORCHRL_ENV, "collector.n_iters=5", "model.shared_parameters=True",
                             "loss.mixer_type=qmix", "train.num_epochs=45", "train.minibatch_size=4096",
                             "train.lr=5e-5", "train.max_grad_norm=40.0", "loss.gamma=0.9", "loss.tau=0.005"]),
}

# Runs a TorchRL script unmodified and times its loop: from the first batch asked of its collector to the
# request after the last one (which comes once the last update is done); the mean return of the episodes
# that ended in the last batch, as the scripts log it. One change of behaviour: the scripts' replay sampler
# drops the incomplete last minibatch, so that each of the off-policy scripts' 45 steps takes 4,096
# transitions as configured (their buffer holds one 6,000-frame batch; without it the second sample is
# 1,904 and stacking the losses fails at the first iteration on tensordict 0.14). MAPPO's 6,000 frames are
# 15 whole minibatches of 400, so nothing changes there.
_TIMED_SCRIPT = r"""
import json, runpy, sys, time
from torchrl.collectors import Collector
_iterator = Collector.iterator
def iterator(self):
    start, frames, last = time.perf_counter(), 0, float("nan")
    for batch in _iterator(self):
        frames += batch.numel()
        done = batch.get(("next", "agents", "done"), batch.get(("next", "done"), None))
        ret = batch.get(("next", "agents", "episode_reward"), None)
        if done is not None and ret is not None:
            ended = done.flatten(batch.batch_dims).any(-1)  # steps where an episode ended
            if ended.any():
                last = ret[ended].mean().item()
        yield batch
    print("[timed] " + json.dumps({"frames": frames, "loop_s": time.perf_counter() - start, "final_return": last}), flush=True)
Collector.iterator = iterator
from torchrl.data import SamplerWithoutReplacement
SamplerWithoutReplacement.__init__.__defaults__ = (True, True)  # drop_last, shuffle
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

FIELDS = ["algorithm", "threads", "round", "system", "frames", "loop_s", "frames_per_s", "final_return"]


# marlkit's systems: the config overrides each adds to the matched setting
MARLKIT = {"marlkit": {}, "marlkit-bf16": {"matmul_precision": "medium"}}
SYSTEMS = [*MARLKIT, "torchrl", "benchmarl"]


def run_marlkit(algorithm: str, seed: int, work: Path, system: str = "marlkit") -> dict[str, float]:
    """One marlkit run in a fresh process."""
    setting = SETTINGS[algorithm]
    overrides = {**marlkit_overrides(setting, TASK, seed, setting.frames), **MARLKIT[system]}
    result = run_child(setting.marlkit_algorithm, None, overrides, work)
    summary, rows = result["summary"], result["rows"]
    key = next(k for k in rows[-1] if k.endswith("/episode_reward_mean") and not k.startswith("eval/"))
    returns = [float(r[key]) for r in rows if r[key] != ""]
    return {"frames": summary["frames"], "loop_s": summary["time_s"], "final_return": returns[-1] if returns else math.nan}


def run_torchrl(algorithm: str, seed: int, python: str, scripts: Path, work: Path) -> dict[str, float]:
    """One run of TorchRL's own script, unmodified, in its environment."""
    script, overrides = TORCHRL[algorithm]
    cmd = [python, "-c", _TIMED_SCRIPT, script, f"seed={seed}", *overrides, f"hydra.run.dir={work}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=scripts)
    timed = [line for line in out.stdout.splitlines() if line.startswith("[timed] ")]
    if out.returncode or not timed:
        raise RuntimeError(f"TorchRL's {script} failed ({' '.join(cmd[3:])}):\n{out.stderr[-3000:]}")
    return json.loads(timed[-1][len("[timed] "):])


def run_bench(algorithm: str, seed: int, python: str, work: Path) -> dict[str, float]:
    """One BenchMARL run in its environment."""
    setting = SETTINGS[algorithm]
    rows = run_benchmarl(python, setting, TASK, seed, setting.frames, work)
    returns = [r for _, _, r in rows if not math.isnan(r)]
    return {"frames": rows[-1][0], "loop_s": rows[-1][1], "final_return": returns[-1] if returns else math.nan}


def read_runs(path: Path) -> list[dict[str, Any]]:
    """Every run recorded so far."""
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def table(runs: list[dict[str, Any]]) -> str:
    """Per algorithm and thread count: each system's median frames/s (min-max), each marlkit system's ratio
    to it, and the median final return."""
    columns = ["algorithm", "threads", "system", "rounds", "loop frames/s, median (min-max)",
               *(f"{ours} / system" for ours in MARLKIT), "final return, median"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        groups.setdefault((run["algorithm"], run["threads"]), {}).setdefault(run["system"], []).append(run)
    for (algorithm, threads), systems in sorted(groups.items()):
        fps = {name: [float(r["frames_per_s"]) for r in rr] for name, rr in systems.items()}
        mine = {name: statistics.median(fps[name]) for name in MARLKIT if name in fps}
        for name, values in fps.items():
            median = statistics.median(values)
            ratios = ["" if ours == name or ours not in mine else f"{mine[ours] / median:.2f}" for ours in MARLKIT]
            final = statistics.median(float(r["final_return"]) for r in systems[name])
            lines.append(f"| {algorithm} | {threads} | {name} | {len(values)} | {median:,.0f} ({min(values):,.0f}-"
                         f"{max(values):,.0f}) | {' | '.join(ratios)} | {final:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="mappo,maddpg,qmix", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--systems", default="marlkit,torchrl,benchmarl", help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchrl-scripts", default=str(SHARED_SCRIPTS),
                        help="TorchRL's sota-implementations/multiagent (its scripts and utils/)")
    parser.add_argument("--torchrl-python", default=os.environ.get("ANCHOR_PYTHON", "/tmp/marlkit-anchor-venv/bin/python"))
    parser.add_argument("--benchmarl-python", default=os.environ.get("BENCHMARL_PYTHON", "/tmp/benchmarl-venv/bin/python"))
    parser.add_argument("--frames", type=int, help="override every algorithm's frame budget (for a quick check)")
    parser.add_argument("--out", default=str(HERE / "results" / "compare_anchors"))
    parser.add_argument("--table-only", action="store_true", help="print the table of <out>/runs.csv, run nothing")
    args = parser.parse_args()
    algorithms, systems = args.algorithms.split(","), args.systems.split(",")
    for name, given, accepted in (("algorithm", algorithms, list(SETTINGS)),
                                  ("system", systems, SYSTEMS)):
        bad = [g for g in given if g not in accepted]
        if bad:
            parser.error(f"unknown {name} {bad}; accepted: {', '.join(accepted)}")
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    out = Path(args.out)
    runs_csv = out / "runs.csv"
    if not args.table_only:
        scripts = Path(args.torchrl_scripts)
        for system, python in (("torchrl", args.torchrl_python), ("benchmarl", args.benchmarl_python)):
            if system in systems and not Path(python).exists():
                parser.error(f"--{system}-python {python} does not exist; make its environment as "
                             f"../shared/anchors.md says, or leave {system} out of --systems")
        if "torchrl" in systems:
            missing = [TORCHRL[a][0] for a in algorithms if not (scripts / TORCHRL[a][0]).exists()]
            if missing:
                parser.error(f"--torchrl-scripts {scripts} lacks {', '.join(missing)}; pass a TorchRL checkout's "
                             "sota-implementations/multiagent")
        if args.frames:
            for name in algorithms:
                SETTINGS[name] = replace(SETTINGS[name], frames=args.frames)
                iters = max(1, args.frames // 6000)
                script, overrides = TORCHRL[name]
                TORCHRL[name] = (script, [o if not o.startswith("collector.n_iters=") else f"collector.n_iters={iters}"
                                          for o in overrides])
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every child inherits it
        out.mkdir(parents=True, exist_ok=True)
        new = not runs_csv.exists()
        with runs_csv.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for round_ in range(1, args.rounds + 1):
                for algorithm in algorithms:
                    for system in systems:
                        with tempfile.TemporaryDirectory() as tmp:
                            work = Path(tmp) / "run"
                            if system in MARLKIT:
                                result = run_marlkit(algorithm, args.seed, work, system)
                            elif system == "torchrl":
                                result = run_torchrl(algorithm, args.seed, args.torchrl_python, scripts, work)
                            else:
                                result = run_bench(algorithm, args.seed, args.benchmarl_python, work)
                        row = {"algorithm": algorithm, "threads": args.threads, "round": round_, "system": system,
                               "frames": int(result["frames"]), "loop_s": round(result["loop_s"], 2),
                               "frames_per_s": round(result["frames"] / result["loop_s"], 1),
                               "final_return": round(result["final_return"], 4)}
                        writer.writerow(row)
                        handle.flush()
                        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    text = table(read_runs(runs_csv))
    print(text)
    if not args.table_only:
        (out / "tables.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
