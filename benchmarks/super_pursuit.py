"""Benchmark: the SUPER paper's pursuit experiment at its full budget, one raw CSV per finished run.

Runs ``marlkit train iql --preset pursuit-super`` (tensor pursuit, the paper's settings: see the preset)
for every arm and seed, ``--jobs`` runs at a time (evaluating in a worker process when the runs leave a core
free: ``logger.eval_parallel``) with ``--threads`` torch threads each (one where runs share the machine;
``auto``, marlkit's default, for a lone run: it takes the worker's core whenever the worker is not
evaluating), and copies each finished
run's ``metrics.csv`` to ``<out>/<arm>_s<seed>.csv`` (plus ``<arm>_s<seed>.json``: wall time, frames/s,
config). Runs whose CSV exists are skipped, so the experiment can be stopped and continued on another day.
``benchmarks/super_pursuit_table.py`` makes the table and the plot from the CSVs alone.

Arms: ``none``, ``quantile``, ``gaussian``, ``stochastic`` (SUPER's three selection rules), ``random``
(10% at random: the control for "more data"), ``all`` (share everything), and ``none-dqn`` /
``quantile-dqn`` (plain DQN: no dueling, no double Q; the paper's robustness check).

    python benchmarks/super_pursuit.py [--arms none,quantile,gaussian,stochastic] [--seeds 0-4]
                                       [--frames 800000] [--jobs 2] [--threads auto|N]
                                       [--out benchmarks/results/super_pursuit_huber_tanh]
                                       [section.field=value ...]

Trailing ``section.field=value`` go to every run, e.g. ``train.compile=true`` (compiled updates, 1.4-2.1x
as fast here; the README's SUPER section says what they learn) with another ``--out``: the committed tables
are of the eager update.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS = {
    "none": {"sharing.mode": "none"},
    "quantile": {"sharing.mode": "quantile"},
    "gaussian": {"sharing.mode": "gaussian"},
    "stochastic": {"sharing.mode": "stochastic"},
    "random": {"sharing.mode": "random"},
    "all": {"sharing.mode": "all"},
    "none-dqn": {"sharing.mode": "none", "model.dueling": "false", "loss.double_dqn": "false"},
    "quantile-dqn": {"sharing.mode": "quantile", "model.dueling": "false", "loss.double_dqn": "false"},
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "super_pursuit_huber_tanh"


def _seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def _commit() -> str | None:
    """The commit of the marlkit checkout running the benchmark (None outside a git checkout), so a run
    can be matched with the code that made it."""
    result = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def machine_cpu() -> str:
    """The processor and the instruction set torch's kernels use on it: matrix products round differently
    on other CPUs, so a run reproduces value for value only on the same kind of machine."""
    import platform

    import torch

    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model or 'unknown'} ({torch.backends.cpu.get_cpu_capability()})"


def train_command(arm: str, seed: int, frames: int, run_dir: Path, extra: list[str]) -> list[str]:
    """The command line that trains one arm and seed into ``run_dir`` (the arm's overrides, then ``extra``)."""
    return [sys.executable, "-m", "marlkit.pipelines.cli", "train", "iql", "--preset", "pursuit-super",
            "--seed", str(seed), "--frames", str(frames), "--run-dir", str(run_dir), "logger.progress=false",
            *arm_overrides(arm), *extra]


def arm_overrides(arm: str) -> list[str]:
    """``section.field=value`` of one arm."""
    return [f"{k}={v}" for k, v in ARMS[arm].items()]


def run_one(arm: str, seed: int, frames: int, out: Path, extra: list[str], threads: str = "1") -> str:
    """Train one arm and seed in a child process with ``threads`` torch threads (``auto`` or a number); copy
    its metrics to ``out``; a line saying how it went."""
    name = f"{arm}_s{seed}"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        overrides = arm_overrides(arm)
        env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
        env["MARLKIT_THREADS"] = threads  # marlkit sets torch's count; OpenMP's variable would fix it
        start = time.perf_counter()
        result = subprocess.run(train_command(arm, seed, frames, run, extra), capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if result.returncode:
            return f"{name}: FAILED ({(result.stderr.strip().splitlines() or ['?'])[-1][:200]})"
        summary = keep_run(run, out, arm, seed, wall, overrides + extra, threads)
    return f"{name}: {wall / 60:.1f} min, {summary['frames_per_s']:.0f} frames/s"


def keep_run(run: Path, out: Path, arm: str, seed: int, wall: float, overrides: list[str], threads: str) -> dict:
    """Copy a finished run's ``metrics.csv`` to ``<out>/<arm>_s<seed>.csv`` with its record
    ``<arm>_s<seed>.json`` (wall time, frames/s, overrides, torch threads, versions, commit, CPU); returns the
    run's summary."""
    name = f"{arm}_s{seed}"
    summary = json.loads((run / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "metrics.csv", out / f".{name}.csv.tmp")
    (out / f"{name}.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "frames": summary["frames"], "wall_s": wall,
        "frames_per_s": summary["frames_per_s"], "overrides": overrides, "threads": threads,
        "thread_policy": summary.get("thread_policy"),  # as the run itself reports it
        "n_pursuers": 8, "versions": summary.get("versions", {}), "commit": _commit(), "cpu": machine_cpu()},
        indent=2))
    os.replace(out / f".{name}.csv.tmp", out / f"{name}.csv")  # the CSV last: it marks the run done
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="none,quantile,gaussian,stochastic,random,all,none-dqn,quantile-dqn")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,1,2")
    parser.add_argument("--frames", type=int, default=800_000, help="env steps per run (paper: 800,000)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", default=None, help="torch threads per run: auto or a number (default: 1, "
                        "so that runs share the cores instead of fighting for them; auto with --jobs 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="extra section.field=value for every run (tiny budgets)")
    args = parser.parse_args()
    threads = args.threads or ("auto" if args.jobs == 1 else "1")
    from marlkit.pipelines.threads import thread_setting

    try:
        thread_setting(threads)
    except ValueError as error:
        parser.error(str(error).replace("--threads=", "--threads "))
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; accepted: {', '.join(ARMS)}")
    # seed-major order: with little time, every arm gets its first seeds before any arm gets more
    todo = [(arm, seed) for seed in _seeds(args.seeds) for arm in arms
            if not (args.out / f"{arm}_s{seed}.csv").exists()]
    print(f"{len(todo)} runs to do ({args.jobs} at a time, torch threads {threads}); results in {args.out}", flush=True)
    # the preset evaluates in a worker process on a core of its own: only where the runs leave one free
    spare = args.jobs < (os.cpu_count() or 1)
    extra = [f"logger.eval_parallel={str(spare).lower()}", *args.overrides]
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda job: run_one(*job, args.frames, args.out, extra, threads), todo):
            print(line, flush=True)


if __name__ == "__main__":
    main()
