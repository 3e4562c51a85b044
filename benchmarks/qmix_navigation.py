"""Benchmark: QMIX throughput on VMAS navigation with discrete actions (``navigation-discrete``).

30,000 frames, ``--runs`` times, each in a fresh process: loop frames/s, optimiser steps/s, peak RSS
and minor page faults per optimiser step (a few hundred when freed memory is kept; set
``MARLKIT_KEEP_FREED_MEMORY=0`` to see the ~10,000 of glibc's defaults), then the median.
For speed against TorchRL's script and BenchMARL, run ``compare_anchors.py`` (interleaved on this
machine); figures from another day compare nothing.

    python benchmarks/qmix_navigation.py [--runs 3] [--frames 30000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _child import run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=30_000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            run = run_child("qmix", "navigation-discrete", {"collector.total_frames": args.frames},
                            Path(tmp) / f"run{i}")
            training_s = sum(float(r["timers/training_s"]) for r in run["rows"])
            steps = run["summary"]["optimiser_steps"]
            rows.append((run["summary"]["frames_per_s"], steps / training_s, run["peak_rss_mib"],
                         run["minor_page_faults"] / steps))
    print(f"\nQMIX, vmas/navigation (discrete, navigation-discrete), {args.frames:,} frames\n")
    print("| run | loop frames/s | optimiser steps/s | peak RSS MiB | page faults per optimiser step |")
    print("|---|---|---|---|---|")
    for i, (fps, sps, rss, faults) in enumerate(rows):
        print(f"| {i} | {fps:,.0f} | {sps:.1f} | {rss:.0f} | {faults:,.0f} |")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"| median | {med[0]:,.0f} | {med[1]:.1f} | {med[2]:.0f} | {med[3]:,.0f} |")


if __name__ == "__main__":
    main()
