"""Benchmark: MAPPO on the ``navigation-matched`` preset (the anchors' configuration).

Runs the preset ``--runs`` times (seeds 0, 1, ...), each in a fresh process so peak memory is per
run, and prints a table: loop frames/s, collection and training seconds, final mean episode reward
(the last iteration's) and peak RSS, then the medians. For speed against TorchRL's script and BenchMARL,
run ``compare_anchors.py``, which interleaves them on this machine; a figure from another day or
machine compares nothing.

    python benchmarks/mappo_navigation.py [--runs 3] [--frames 120000] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _child import run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=120_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.runs):
            run = run_child("mappo", "navigation-matched",
                            {"seed": seed, "device": args.device, "collector.total_frames": args.frames},
                            Path(tmp) / f"seed{seed}")
            rows = run["rows"]
            results.append({
                "seed": seed,
                "frames_per_s": run["summary"]["frames_per_s"],
                "collection_s": sum(float(r["timers/collection_s"]) for r in rows),
                "training_s": sum(float(r["timers/training_s"]) for r in rows),
                "final_reward": float(rows[-1]["agents/episode_reward_mean"]),
                "peak_rss_mib": run["peak_rss_mib"],
            })
            print(f"run {seed} done: {results[-1]['frames_per_s']:.0f} frames/s", file=sys.stderr)

    print(f"\nMAPPO navigation-matched, {args.frames:,} frames, device {args.device}\n")
    print("| run (seed) | loop frames/s | collection s | training s | final mean episode reward | peak RSS MiB |")
    print("|---" * 6 + "|")
    for r in results:
        print(f"| {r['seed']} | {r['frames_per_s']:,.0f} | {r['collection_s']:.1f} | {r['training_s']:.1f} "
              f"| {r['final_reward']:.3f} | {r['peak_rss_mib']:.0f} |")
    med = {c: statistics.median(r[c] for r in results) for c in results[0] if c != "seed"}
    print(f"| median | {med['frames_per_s']:,.0f} | {med['collection_s']:.1f} | {med['training_s']:.1f} "
          f"| {med['final_reward']:.3f} | {med['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
