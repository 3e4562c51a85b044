"""Benchmark: a ``pursuit-super`` run with its evaluations in the training process and in a worker process
(``logger.eval_parallel``), interleaved round by round on this machine.

Each run is ``marlkit train iql --preset pursuit-super --frames F`` in a fresh process with the thread setting
of ``--threads`` (``auto``, marlkit's default, or a number). The table gives each setting's loop time
(``time_s`` of the last ``metrics.csv`` row: first collection to last row), its wall time (process start to
end, the worker's start included) and the median seconds of the iterations that evaluate and of those that
do not. The runs must log the same values (everything but the timings): the script stops if they do not.

    python benchmarks/parallel_eval.py [--frames 80000] [--rounds 2] [--mode quantile] [--threads auto]
        [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from super_pursuit_check import NOT_COMPARED  # noqa: E402  (the sibling script: timings and thread count)


def run(parallel: bool, args: argparse.Namespace, run_dir: Path) -> dict:
    """One run; its loop and wall seconds, median iteration seconds with and without an evaluation, and
    its rows without the timings."""
    env = {**os.environ, "MARLKIT_THREADS": args.threads}
    env.pop("OMP_NUM_THREADS", None)  # MARLKIT_THREADS decides
    command = [sys.executable, "-m", "marlkit.pipelines.cli", "train", "iql", "--preset", "pursuit-super",
               "--frames", str(args.frames), "--seed", str(args.seed), "--run-dir", str(run_dir),
               "logger.progress=false", f"sharing.mode={args.mode}", f"logger.eval_parallel={str(parallel).lower()}",
               *args.set]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    evaluating = [float(r["timers/training_s"]) for r in rows if r.get("eval/pursuer/episode_reward_mean")]
    training = [float(r["timers/training_s"]) for r in rows
                if not r.get("eval/pursuer/episode_reward_mean") and float(r["counters/optimiser_steps"]) > 0]
    return {"loop": float(rows[-1]["time_s"]), "wall": wall,
            "eval_iter": statistics.median(evaluating) if evaluating else float("nan"),
            "train_iter": statistics.median(training) if training else float("nan"),
            "rows": [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=80_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", default="quantile", help="sharing.mode of every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="auto", help="MARLKIT_THREADS of every run: auto or a number")
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value for every run (tiny checks)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    results: dict[str, list[dict]] = {"in-process": [], "worker": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in results:
                result = run(name == "worker", args, Path(tmp) / f"{name}_{round_}")
                results[name].append(result)
                print(f"round {round_}: {name}: loop {result['loop']:.1f} s, wall {result['wall']:.1f} s, "
                      f"iteration {result['train_iter']:.3f} s, evaluating {result['eval_iter']:.3f} s", flush=True)
    reference = results["in-process"][0]["rows"]
    if any(r["rows"] != reference for runs in results.values() for r in runs):
        raise SystemExit("the runs logged different values: evaluating in the worker changed a result")
    print(f"\n{args.frames} frames, sharing.mode={args.mode}, threads {args.threads}, {args.rounds} round(s); "
          "every run logged the same values\n")
    print("| evaluations | loop s (each round) | wall s (each round) | iteration s | evaluating iteration s |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        loops = ", ".join(f"{r['loop']:.1f}" for r in runs)
        walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
        print(f"| {name} | {loops} | {walls} | {statistics.median(r['train_iter'] for r in runs):.3f} "
              f"| {statistics.median(r['eval_iter'] for r in runs):.3f} |")
    ratio = statistics.median(r["loop"] for r in results["in-process"]) / statistics.median(
        r["loop"] for r in results["worker"])
    print(f"\nloop time in-process / in the worker (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
