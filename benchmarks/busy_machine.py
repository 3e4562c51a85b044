"""Benchmark: how much a marlkit run slows down when the machine is busy, per thread setting.

Runs MAPPO's ``navigation-matched`` preset (shortened to ``--frames``) with each thread setting under
each load, and prints loop frames/s and the slowdown against the same setting on an idle machine:

- loads: ``idle``; ``spinner`` (one other CPU-bound process, a Python busy loop); ``two-runs`` (a second,
  identical marlkit run at the same time, as ``--seeds`` in two terminals would do; both are reported);
- settings: marlkit's default, ``auto`` (the cores other programs leave idle, looked at again every half
  second of training; ``MARLKIT_THREADS`` and ``OMP_NUM_THREADS`` are cleared for it), and each
  ``--threads`` value given with ``--fixed`` (``--fixed 2`` on 2 cores is torch's own default).

    python benchmarks/busy_machine.py [--frames 24000] [--fixed 1,2] [--loads idle,spinner,two-runs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "while True: pass"


def train(run_dir: Path, frames: int, threads: int | None) -> subprocess.Popen:
    """Start one marlkit MAPPO run in its own process."""
    cmd = [sys.executable, "-m", "marlkit.pipelines.cli", "train", "mappo", "--preset", "navigation-matched",
           "--run-dir", str(run_dir), "logger.progress=false", f"collector.total_frames={frames}"]
    if threads is not None:
        cmd[5:5] = ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("MARLKIT_THREADS", "OMP_NUM_THREADS")}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finished(proc: subprocess.Popen, run_dir: Path) -> dict:
    """Wait for a run; its summary."""
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"marlkit run failed:\n{err[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def measure(load: str, threads: int | None, frames: int, tmp: Path) -> list[dict]:
    """One run (two for ``two-runs``) under ``load``; each run's frames/s and torch threads."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if load == "spinner" else None
    try:
        if spinner is not None:
            time.sleep(1.0)  # the spinner is running before the run looks for idle cores
        dirs = [tmp / f"{load}_{threads}_{k}_{time.monotonic_ns()}" for k in range(2 if load == "two-runs" else 1)]
        procs = [train(d, frames, threads) for d in dirs]
        return [finished(p, d) for p, d in zip(procs, dirs)]
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24_000)
    parser.add_argument("--fixed", default="1,2", help="comma-separated --threads values to run besides the default")
    parser.add_argument("--loads", default="idle,spinner,two-runs")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every cell, interleaved")
    args = parser.parse_args()
    loads = args.loads.split(",")
    bad = [load for load in loads if load not in ("idle", "spinner", "two-runs")]
    if bad or "idle" not in loads:
        parser.error(f"--loads {args.loads}: accepted idle, spinner, two-runs, and idle must be among them")
    settings: list[int | None] = [None, *(int(t) for t in args.fixed.split(",") if t)]
    results: dict[tuple[str, int | None], list[float]] = {}
    threads_seen: dict[tuple[str, int | None], set[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for load in loads:
                for threads in settings:
                    summaries = measure(load, threads, args.frames, Path(tmp))
                    fps = [s["frames_per_s"] for s in summaries]
                    results.setdefault((load, threads), []).extend(fps)
                    threads_seen.setdefault((load, threads), set()).update(s["torch_threads"] for s in summaries)
                    print(f"round {round_ + 1} load={load} threads={threads or 'default'} frames/s "
                          + " ".join(f"{f:.0f}" for f in fps), flush=True)
    print(f"\nMAPPO navigation-matched, {args.frames:,} frames, {os.cpu_count()} cores")
    print("| threads | load | torch threads used | loop frames/s (median) | slowdown vs idle |")
    print("|---|---|---|---|---|")
    for threads in settings:
        idle = statistics.median(results[("idle", threads)])
        for load in loads:
            fps = statistics.median(results[(load, threads)])
            used = ",".join(map(str, sorted(threads_seen[(load, threads)])))
            print(f"| {threads or 'default'} | {load} | {used} | {fps:,.0f} | {idle / fps:.2f}x |")


if __name__ == "__main__":
    main()
