"""The run directory: ``config.yaml``, ``metrics.csv`` (a row per iteration), ``summary.json``, and where
a run starts (afresh, or from its checkpoint on ``--resume``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import checkpoint_path, load_checkpoint, space_guarded
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
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run directory {self.path} is a file; choose another --run-dir")
        existing = next((p for p in [self.path, *self.path.parents] if p.exists()), Path("."))
        if not os.access(existing, os.W_OK):
            raise ValueError(f"run directory {self.path} cannot be written ({existing} is read-only); choose "
                             "another --run-dir")
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise ValueError(f"cannot resume {self.path}: it is not a run directory (no config.yaml)")
        elif (self.path / "metrics.csv").exists() or (self.path / "config.yaml").exists():
            raise ValueError(
                f"{self.path} already holds a run (config.yaml / metrics.csv); choose another "
                "--run-dir so the existing results are kept, or continue it with --resume"
            )

    @property
    def buffers(self) -> Path:
        """Where the off-policy replays keep their memmap files."""
        return self.path / "buffers"

    def keep_rows_through(self, iteration: int, checkpoint: Mapping[str, Any] | None = None) -> float:
        """On resume: keep the metrics rows up to the checkpoint's ``iteration`` and drop the rest (they
        are run again, so none is duplicated), warning about each dropped row, and about rows that are
        damaged (cut short, or not numbers); returns the last kept row's ``time_s``.

        A missing ``metrics.csv`` is rebuilt with one row from what ``checkpoint`` knows (its
        iteration, frames and time), with a warning that the earlier rows are gone.
        """
        file = self.path / "metrics.csv"
        if not file.exists():
            if iteration < 0 or checkpoint is None:
                return 0.0
            time_s = float(checkpoint.get("time_s", 0.0))
            warnings.warn(f"{file} is missing: its rows through iteration {iteration} are lost; it restarts from "
                          "one row rebuilt from the checkpoint", stacklevel=2)
            self._columns = None
            self.log({"iteration": iteration, "frames": checkpoint["frames"], "time_s": time_s})
            return time_s
        columns, rows, dropped = _read_rows(file)
        kept = [row for row in rows if int(row["iteration"]) <= iteration]
        dropped += [f"iteration {row['iteration']} (after the checkpoint)" for row in rows if row not in kept]
        if dropped:
            warnings.warn(f"{file}: dropped {'; '.join(dropped)}", stacklevel=2)
        rows = kept
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
        write_atomically(self.path / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    def log(self, row: Mapping[str, float]) -> None:
        """Append one iteration's metrics to ``metrics.csv``.

        A column that first appears later (loss terms once learning starts after a warm-up) widens
        the header; earlier rows get empty cells there.
        """
        file = self.path / "metrics.csv"
        with space_guarded(file, "the rows of earlier iterations are intact (resume drops a row cut short): "
                                 "free space there, then resume"):
            self._append(file, row)

    def _append(self, file: Path, row: Mapping[str, float]) -> None:
        new = [key for key in row if key not in (self._columns or [])]
        if self._columns is None or new:
            old_rows = []
            if self._columns is not None:
                with file.open(newline="") as handle:
                    old_rows = list(csv.DictReader(handle))
            self._columns = [*(self._columns or []), *new]
            tmp = file.with_name(".metrics.csv.tmp")  # rewritten beside, then renamed: a kill loses no row
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, self._columns, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
            tmp.replace(file)
        with file.open("a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(c, math.nan)) for c in self._columns])

    def summary(self, data: Mapping[str, Any]) -> None:
        """Write ``summary.json``."""
        write_atomically(self.path / "summary.json", json.dumps(dict(data), indent=2, default=str))


def write_atomically(path: Path, text: str) -> None:
    """Write beside, then rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with space_guarded(path, f"the previous {path.name}, if any, is intact: free space there, then resume"):
            tmp.write_text(text)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_rows(file: Path) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """``metrics.csv``'s columns, its sound rows, and a description of each damaged one."""
    try:
        with file.open(newline="") as handle:
            reader = csv.reader(handle)
            columns = next(reader, [])
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{file} is not a metrics file ({err}); move it away to resume without its rows") from None
    if not columns or columns[0] != "iteration":
        raise ValueError(f"{file} is not a metrics file (no iteration column); move it away to resume without it")
    rows, damaged = [], []
    for number, cells in enumerate(raw, start=2):
        sound = len(cells) == len(columns) and all(_is_number(cell) for cell in cells) and cells[0].isdigit()
        if sound:
            rows.append(dict(zip(columns, cells)))
        else:
            damaged.append(f"line {number} (damaged: {','.join(cells)[:40]!r})")
    return columns, rows, damaged


def _is_number(cell: str) -> bool:
    if cell == "":
        return True
    try:
        float(cell)
    except ValueError:
        return False
    return True


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
    if not (run.path / "checkpoints" / "last.pt").is_file():
        # Killed before its first checkpoint: nothing to continue, so it starts over from its config.
        warnings.warn(f"{run.path} has no checkpoint yet (it stopped before its first one): starting it afresh "
                      "from its config.yaml", stacklevel=2)
        run.keep_rows_through(-1)
        # replay files of the first iteration: no checkpoint refers to them, and memmaps refuse to reopen
        shutil.rmtree(run.buffers, ignore_errors=True)
        return run, RunStart()
    state = load_checkpoint(checkpoint_path(run.path), to_dict(cfg))
    if state["frames"] >= cfg.collector.total_frames:
        raise ValueError(
            f"{run.path} already has {state['frames']} frames; pass --frames larger than that to continue"
        )
    time_s = run.keep_rows_through(state["iteration"], state)
    return run, RunStart(state, state["iteration"] + 1, state["frames"], state["optimiser_steps"], time_s)
