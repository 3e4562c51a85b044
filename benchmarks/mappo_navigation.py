"""Benchmark: MAPPO on the ``navigation-matched`` preset (the anchors' configuration).

Runs the preset ``--runs`` times (seeds 0, 1, ...), each in a fresh process so peak memory is per
run, and prints a table: loop frames/s, collection and training seconds, final mean episode reward
(the last iteration's) and peak RSS, then the medians. Compare with shared/anchors.md: TorchRL's
MAPPO script and BenchMARL reach ~1,830 frames/s and a final reward of 0.79-0.86 on this machine.

    python benchmarks/mappo_navigation.py [--runs 3] [--frames 120000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(seed: int, frames: int, device: str, run_dir: str) -> None:
    """One training run; prints its measurements as JSON on the last line."""
    import csv

    from marlkit.pipelines.config import apply_overrides, load_preset
    from marlkit.pipelines.mappo import MappoConfig, train

    cfg = MappoConfig()
    apply_overrides(cfg, load_preset("navigation-matched"))
    apply_overrides(cfg, {"seed": seed, "device": device, "collector.total_frames": frames,
                          "logger.run_dir": run_dir, "logger.progress": False})
    result = train(cfg)
    with (Path(run_dir) / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    print(json.dumps({
        "seed": seed,
        "frames_per_s": result.frames_per_s,
        "collection_s": sum(float(r["timers/collection_s"]) for r in rows),
        "training_s": sum(float(r["timers/training_s"]) for r in rows),
        "final_reward": float(rows[-1]["agents/episode_reward_mean"]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=120_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_seed is not None:
        child(args.child_seed, args.frames, args.device, args.run_dir)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.runs):
            out = subprocess.run(
                [sys.executable, __file__, "--child-seed", str(seed), "--frames", str(args.frames),
                 "--device", args.device, "--run-dir", str(Path(tmp) / f"seed{seed}")],
                capture_output=True, text=True, check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {seed} done: {results[-1]['frames_per_s']:.0f} frames/s", file=sys.stderr)

    columns = ["frames_per_s", "collection_s", "training_s", "final_reward", "peak_rss_mib"]
    header = "| run (seed) | loop frames/s | collection s | training s | final mean episode reward | peak RSS MiB |"
    print(f"\nMAPPO navigation-matched, {args.frames:,} frames, device {args.device}\n")
    print(header)
    print("|---" * 6 + "|")
    for r in results:
        print(f"| {r['seed']} | {r['frames_per_s']:,.0f} | {r['collection_s']:.1f} | {r['training_s']:.1f} "
              f"| {r['final_reward']:.3f} | {r['peak_rss_mib']:.0f} |")
    med = {c: statistics.median(r[c] for r in results) for c in columns}
    print(f"| median | {med['frames_per_s']:,.0f} | {med['collection_s']:.1f} | {med['training_s']:.1f} "
          f"| {med['final_reward']:.3f} | {med['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
