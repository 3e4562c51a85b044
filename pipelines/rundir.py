"""The run directory: ``config.yaml``, ``metrics.csv`` (a row per iteration), ``summary.json``, and where
a run starts (afresh, or from its checkpoint on ``--resume``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import checkpoint_path, load_checkpoint
from .config import RunConfig, to_dict


def default_run_dir(algorithm: str, env_name: str, seed: int) -> Path:
    """``runs/<algorithm>-<env>-s<seed>-<timestamp>`` under the current directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{algorithm}-{env_name.replace('/', '_').replace(':', '.')}-s{seed}-{stamp}"


class RunDir:
    """Writes a run directory: ``config.yaml``, ``metrics.csv`` (row per iteration), ``summary.json``.

    Refuses a directory that already holds a run, so nothing a user has is overwritten.
    """

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self._columns: list[str] | None = None
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise ValueError(f"cannot resume {self.path}: it is not a run directory (no config.yaml)")
        elif (self.path / "metrics.csv").exists() or (self.path / "config.yaml").exists():
            raise ValueError(
                f"{self.path} already holds a run (config.yaml / metrics.csv); choose another "
                "--run-dir so the existing results are kept, or continue it with --resume"
            )

    def keep_rows_through(self, iteration: int) -> float:
        """On resume: drop metrics rows after the checkpoint's ``iteration`` (they are run again, so
        none is duplicated); returns the last kept row's ``time_s``."""
        file = self.path / "metrics.csv"
        if not file.exists():
            return 0.0
        with file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if int(row["iteration"]) <= iteration]
        tmp = file.with_name(".metrics.csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(file)
        self._columns = columns
        return float(rows[-1]["time_s"]) if rows else 0.0

    def create(self, config: RunConfig, extra: Mapping[str, Any] | None = None) -> None:
        """Create the directory and write the resolved config (plus derived values in ``extra``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = to_dict(config)
        if extra:
            data["derived"] = dict(extra)
        (self.path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def log(self, row: Mapping[str, float]) -> None:
        """Append one iteration's metrics to ``metrics.csv``.

        A column that first appears later (loss terms once learning starts after a warm-up) widens
        the header; earlier rows get empty cells there.
        """
        file = self.path / "metrics.csv"
        new = [key for key in row if key not in (self._columns or [])]
        if self._columns is None or new:
            old_rows = []
            if self._columns is not None:
                with file.open(newline="") as handle:
                    old_rows = list(csv.DictReader(handle))
            self._columns = [*(self._columns or []), *new]
            with file.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, self._columns, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
        with file.open("a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(c, math.nan)) for c in self._columns])

    def summary(self, data: Mapping[str, Any]) -> None:
        """Write ``summary.json``."""
        (self.path / "summary.json").write_text(json.dumps(dict(data), indent=2, default=str))


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value



@dataclass
class RunStart:
    """Where a run starts: from scratch (all zeros), or where a resumed run's checkpoint left off."""

    state: dict[str, Any] | None = None
    """The checkpoint, or None for a fresh run."""
    iteration: int = 0
    """The first iteration to run."""
    frames: int = 0
    """Frames already collected."""
    optimiser_steps: int = 0
    """Optimiser steps already taken."""
    time_s: float = 0.0
    """Wall seconds of training already spent (metrics.csv's time_s continues from here)."""


def open_run_dir(cfg: RunConfig, resume: bool) -> tuple[RunDir, RunStart]:
    """The run directory, and for ``resume`` its checkpoint (checked against ``cfg``) and counters."""
    path = cfg.logger.run_dir or default_run_dir(cfg.algorithm, cfg.env.name, cfg.seed)
    run = RunDir(path, resume=resume)
    if not resume:
        return run, RunStart()
    state = load_checkpoint(checkpoint_path(run.path), to_dict(cfg))
    if state["frames"] >= cfg.collector.total_frames:
        raise ValueError(
            f"{run.path} already has {state['frames']} frames; pass --frames larger than that to continue"
        )
    time_s = run.keep_rows_through(state["iteration"])
    return run, RunStart(state, state["iteration"] + 1, state["frames"], state["optimiser_steps"], time_s)
