"""Run one training in a fresh process and report its metrics and peak memory (for benchmarks)."""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_child(algorithm: str, preset: str, overrides: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train ``algorithm`` with ``preset`` + ``overrides`` in a subprocess; return its measurements.

    The result holds the summary (frames/s, optimiser steps, ...), every metrics row, the child's
    peak RSS in MiB and its minor page faults, so each run's memory is its own.
    """
    spec = json.dumps({"algorithm": algorithm, "preset": preset, "overrides": overrides, "run_dir": str(run_dir)})
    out = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(spec: dict[str, Any]) -> None:
    from marlkit.pipelines import make_config, pipeline_for

    cfg = make_config(spec["algorithm"], spec["preset"], {**spec["overrides"], "logger.run_dir": spec["run_dir"],
                                                          "logger.progress": False})
    pipeline_for(spec["algorithm"]).train(cfg)
    run_dir = Path(spec["run_dir"])
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((run_dir / "summary.json").read_text())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"summary": summary, "rows": rows, "peak_rss_mib": usage.ru_maxrss / 1024,
                      "minor_page_faults": usage.ru_minflt}))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
