"""Benchmark: the cost of one greedy evaluation of a ``pursuit-super`` policy, and the same with another
marlkit checkout.

The SUPER experiment evaluates every 4,000 env steps on 20 episodes of 500 cycles (200 evaluations per
run). This script trains a short ``pursuit-super`` run once (``--frames``, no evaluation inside) and then
times ``marlkit eval`` on it (``evaluate_run``, ``--episodes`` episodes, one torch thread), each timing in a
fresh process, ``--repeats`` evaluations per process (the median is kept). ``--other PATH`` adds the same
evaluations with the marlkit package found at PATH (a folder holding ``marlkit/``), interleaved round by
round, so a change is measured side by side in one sitting; both must score the same mean return.

    python benchmarks/eval_cost.py [--rounds 3] [--repeats 3] [--episodes 20] [--frames 2000] [--other PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAIN = """
import sys
from marlkit.pipelines import make_config, pipeline_for
cfg = make_config("iql", "pursuit-super", {"collector.total_frames": int(sys.argv[1]), "logger.run_dir": sys.argv[2],
                  "logger.progress": False, "logger.eval_every": 10**9})
pipeline_for("iql").train(cfg)
"""
EVALUATE = """
import statistics, sys, time
from marlkit.pipelines.runs import evaluate_run
run_dir, episodes, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds = []
for _ in range(repeats):
    start = time.perf_counter()
    stats = evaluate_run(run_dir, episodes=episodes)
    seconds.append(time.perf_counter() - start)
print(statistics.median(seconds), stats["groups"]["pursuer"]["mean"])
"""


def child(code: str, args: list[str], pythonpath: str | None) -> str:
    """Run ``code`` in a fresh one-thread Python (with ``pythonpath`` first on its path); its last line."""
    env = {**os.environ, "MARLKIT_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="evaluations per process; the median is kept")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--frames", type=int, default=2000, help="env steps of the run whose policy is evaluated")
    parser.add_argument("--other", default=None, help="PYTHONPATH of another marlkit checkout to run beside this one")
    args = parser.parse_args()
    if min(args.rounds, args.repeats, args.episodes, args.frames) < 1:
        parser.error("--rounds, --repeats, --episodes and --frames must be >= 1")
    codes = {"this": None} | ({"other": args.other} if args.other else {})  # None: the marlkit this Python imports
    results: dict[str, list[float]] = {name: [] for name in codes}
    returns: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = str(Path(tmp) / "run")
        child(TRAIN, [str(args.frames), run_dir], None)
        for round_ in range(args.rounds):
            for name, path in codes.items():
                seconds, mean_return = child(EVALUATE, [run_dir, str(args.episodes), str(args.repeats)], path).split()
                results[name].append(float(seconds))
                returns.add(mean_return)
                print(f"round {round_}: {name}: {float(seconds):.3f} s per evaluation, mean return {mean_return}",
                      flush=True)
    print(f"\n| code | s per evaluation of {args.episodes} episodes (each round) | median |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")
    if len(returns) > 1:
        raise SystemExit(f"the checkouts scored different mean returns: {sorted(returns)}")


if __name__ == "__main__":
    main()
