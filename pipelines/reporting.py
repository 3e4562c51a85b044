"""Per-iteration reporting: the ``metrics.csv`` row, the metric logger, the tqdm bar and the summary.

:class:`Reporter` times the collection and training phases of each iteration, builds its row (frames,
time, frames/s, each group's mean episode return and mean loss entries, plus whatever the loop adds),
writes it to ``metrics.csv`` and the chosen logger, moves the bar (frames and the current return) and,
at the end, writes ``summary.json`` and ``plots/curves.png``.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from tqdm.auto import tqdm

from .config import RunConfig, to_dict
from .loggers import make_logger
from .plots import plot_runs
from .checkpoint import space_guarded
from .rundir import RunDir, RunStart


def scalar_entries(loss_out: TensorDictBase) -> TensorDictBase:
    """The scalar entries of a loss output (terms and diagnostics), detached, for logging."""
    keys = [key for key, value in loss_out.items() if value.numel() == 1]
    return loss_out.select(*keys).detach().reshape(())


def mean_entries(outputs: list[TensorDictBase], prefix: str) -> dict[str, float]:
    """Mean of each logged entry over an iteration's optimiser steps, as ``{prefix/key: value}``."""
    if not outputs:
        return {}
    means = torch.stack(outputs).float().mean(0)  # one device sync per iteration, not per step
    return {f"{prefix}/{key}": value.item() for key, value in means.items()}


def episode_reward_means(batch: TensorDictBase, groups: list[str]) -> dict[str, float]:
    """Mean return of the episodes that ended in ``batch``, per group (NaN when none ended)."""
    out = {}
    for group in groups:
        done = batch.get(("next", group, "done"))
        returns = batch.get(("next", group, "episode_reward"))[done]
        out[group] = returns.mean().item() if returns.numel() else math.nan
    return out


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    """The run directory written."""
    metrics: dict[str, float]
    """The last iteration's metrics row."""
    episode_reward_mean: dict[str, float]
    """Last mean episode return per group."""
    frames: int
    """Frames collected."""
    time_s: float
    """Wall seconds of the training loop."""
    frames_per_s: float
    """frames / time_s."""
    policy: Any = None
    """The trained acting policy; exploration switches off under ExplorationType.DETERMINISTIC."""


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on (for summary.json)."""
    out = {"python": platform.python_version()}
    for package in ("marlkit", "torch", "torchrl", "tensordict", "vmas", "pettingzoo", "gymnasium"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out



class Reporter:
    """The per-iteration bookkeeping every training loop shares, so the loop itself shows the algorithm.

    Call :meth:`collected` when a batch arrives and :meth:`log` after training on it; :meth:`finish`
    writes ``summary.json`` and the curves and returns the :class:`TrainResult`.
    """

    def __init__(self, run: RunDir, groups: list[str], cfg: RunConfig, start: RunStart):
        self.run, self.groups, self.cfg = run, groups, cfg
        self.bar = tqdm(total=cfg.collector.total_frames, initial=start.frames, unit="frames",
                        disable=not cfg.logger.progress)
        self.logger = make_logger(cfg.logger.backend, run.path, to_dict(cfg), cfg.logger.wandb_mode)
        self.frames, self.row = start.frames, {}
        self.rewards = {group: math.nan for group in groups}
        self.start = self._iteration_start = self._train_start = time.perf_counter() - start.time_s
        self._collection_s = 0.0
        self._waiting: list[tuple[dict[str, Any], bool]] = []  # rows not yet written, and whether each is complete

    def collected(self) -> None:
        """The batch has arrived: collection time ends, training time starts."""
        self._train_start = time.perf_counter()
        self._collection_s = self._train_start - self._iteration_start

    def log(self, iteration: int, batch: TensorDictBase, terms: Mapping[str, list[TensorDictBase]],
            extra: Mapping[str, float] | None = None, complete: bool = True) -> dict[str, float]:
        """Write the iteration's row (``terms``: each learner's loss outputs this iteration, by group or,
        for a team that learns as one, by team). An incomplete row (its evaluation is still running) and
        every row after it wait until :meth:`complete` fills it in, so rows are written in order."""
        now = time.perf_counter()
        self.frames += batch.numel()
        means = episode_reward_means(batch, self.groups)
        self.rewards.update({g: r for g, r in means.items() if not math.isnan(r)})
        row = {"iteration": iteration, "frames": self.frames, "time_s": now - self.start,
               "frames_per_s": batch.numel() / (now - self._iteration_start)}
        for group in self.groups:
            row[f"{group}/episode_reward_mean"] = means[group]
            row.update(mean_entries(terms.get(group, []), group))
        for learner in terms:  # a team of several groups learns as one (VDN / QMIX mixers)
            if learner not in self.groups:
                row.update(mean_entries(terms[learner], learner))
        row.update(extra or {})
        row.update({"timers/collection_s": self._collection_s, "timers/training_s": now - self._train_start})
        self._waiting.append((row, complete))
        self._write_ready()
        self.bar.update(batch.numel())
        self.bar.set_postfix({f"{g}_return": f"{r:.3f}" for g, r in self.rewards.items()})
        self.row = row
        self._iteration_start = time.perf_counter()
        return row

    def complete(self, iteration: int, entries: Mapping[str, float]) -> None:
        """Add ``entries`` to the waiting row of ``iteration`` and write every row that is then ready."""
        for k, (row, _) in enumerate(self._waiting):
            if row["iteration"] == iteration:
                row.update(entries)
                self._waiting[k] = (row, True)
                self._write_ready()
                return
        raise KeyError(f"no row of iteration {iteration} is waiting")

    def flush(self) -> None:
        """Write every waiting row as it is (a run that stops with an evaluation still out loses no row)."""
        self._waiting = [(row, True) for row, _ in self._waiting]
        self._write_ready()

    def _write_ready(self) -> None:
        while self._waiting and self._waiting[0][1]:
            row, _ = self._waiting.pop(0)
            self.run.log(row)
            self.logger.log(row)

    def finish(self, iterations: int, policy: Any = None, **summary: Any) -> TrainResult:
        """Close the bar and logger, write ``summary.json`` and the curves; return the result."""
        self.flush()
        self.bar.close()
        self.logger.close()
        if self.row:
            curves = self.run.path / "plots" / "curves.png"
            with space_guarded(curves, "metrics.csv and the checkpoints are intact; `marlkit plot` redraws it"):
                plot_runs([self.run.path], curves)
        time_s = time.perf_counter() - self.start
        result = TrainResult(self.run.path, self.row, dict(self.rewards), self.frames, time_s,
                             self.frames / time_s, policy)
        self.run.summary({"algorithm": self.cfg.algorithm, "env": self.cfg.env.name, "frames": self.frames,
                          "iterations": iterations, "time_s": time_s, "frames_per_s": result.frames_per_s,
                          **summary, "episode_reward_mean": result.episode_reward_mean,
                          "final_metrics": self.row, "torch_threads": torch.get_num_threads(),
                          "versions": versions()})
        return result
