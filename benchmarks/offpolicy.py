"""Benchmark: MADDPG throughput and memory on VMAS navigation, and competitive learning on simple_tag.

1. ``navigation-offpolicy`` preset for ``--nav-frames`` (30k: the anchors' budget), once with a
   1,000,000-frame replay buffer and once with a 10,000-frame one: loop frames/s, optimiser steps/s,
   mean reward, peak RSS. The buffers are memory-mapped files in the run directory, so peak RSS
   should barely depend on their size. For speed against TorchRL's script and BenchMARL, run
   ``compare_anchors.py`` (interleaved on this machine); figures from another day compare nothing.
2. ``tag-competitive`` preset (3 chasers vs 1 evader, evader frozen halfway) for ``--tag-frames``:
   mean episode reward per group over each quarter of training; the chasers' must rise.

    python benchmarks/offpolicy.py [--nav-frames 30000] [--tag-frames 60000]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from _child import run_child


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _reward(row: dict[str, str], group: str) -> float:
    value = row.get(f"{group}/episode_reward_mean", "")
    return float(value) if value else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nav-frames", type=int, default=30_000)
    parser.add_argument("--tag-frames", type=int, default=60_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        nav = {}
        for size in (1_000_000, 10_000):
            nav[size] = run_child("maddpg", "navigation-offpolicy",
                                  {"collector.total_frames": args.nav_frames, "replay.buffer_size": size},
                                  Path(tmp) / f"nav{size}")
            print(f"navigation, buffer {size:,}: done", file=sys.stderr)
        tag = run_child("maddpg", "tag-competitive", {"collector.total_frames": args.tag_frames}, Path(tmp) / "tag")

    print(f"\nMADDPG, vmas/navigation (navigation-offpolicy), {args.nav_frames:,} frames\n")
    print("| replay buffer | loop frames/s | optimiser steps/s | final mean episode reward | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for size, run in nav.items():
        s = run["summary"]
        training_s = sum(float(r["timers/training_s"]) for r in run["rows"])
        print(f"| {size:,} frames (memmap) | {s['frames_per_s']:,.0f} | {s['optimiser_steps'] / training_s:,.0f} "
              f"| {_reward(run['rows'][-1], 'agents'):.3f} | {run['peak_rss_mib']:.0f} |")

    rows = tag["rows"]
    groups = list(tag["summary"]["episode_reward_mean"])
    quarter = max(1, len(rows) // 4)
    print(f"\nMADDPG, vmas/simple_tag (tag-competitive), {args.tag_frames:,} frames, "
          f"{tag['summary']['frames_per_s']:,.0f} frames/s; mean episode reward per quarter of training\n")
    print("| frames | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for start in range(0, len(rows), quarter):
        chunk = rows[start:start + quarter]
        span = f"{int(chunk[0]['frames']) - int(rows[0]['frames']):,}-{int(chunk[-1]['frames']):,}"
        print(f"| {span} | " + " | ".join(f"{_mean([_reward(r, g) for r in chunk]):.1f}" for g in groups) + " |")


if __name__ == "__main__":
    main()
