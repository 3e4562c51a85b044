"""Training curves from run directories' ``metrics.csv`` (matplotlib, headless).

One panel per group's mean episode return, then one per loss term (or one per chosen column), against
frames, wall time or iterations. Several run directories (seeds of one config) are drawn as their mean
with a shaded 95% interval (mean ± 1.96 standard errors over runs, at each iteration they share).
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import yaml

REWARD_SUFFIX = "/episode_reward_mean"
LOSS_PREFIX = "loss"
X_AXES = {"frames": ("frames", "frames"), "time": ("time_s", "wall time (s)"), "iterations": ("iteration", "iteration")}


def read_metrics(run_dir: str | Path) -> dict[str, np.ndarray]:
    """A run's ``metrics.csv`` as columns of floats (empty cells are NaN)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no metrics.csv")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return {key: np.array([float(r[key]) if r.get(key, "") != "" else math.nan for r in rows])
            for key in rows[0]}


def mean_return(metrics: dict[str, np.ndarray]) -> np.ndarray:
    """Each iteration's mean episode return, averaged over the run's groups (NaN where none ended)."""
    columns = np.stack([values for key, values in metrics.items() if key.endswith(REWARD_SUFFIX)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(columns, axis=0)


def _band(runs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    length = min(len(r) for r in runs)
    stacked = np.stack([r[:length] for r in runs])
    with warnings.catch_warnings():  # iterations where some run finished no episode are NaN there
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stacked, axis=0)
        if len(runs) == 1:
            return mean, np.zeros_like(mean)
        counts = np.maximum(np.sum(~np.isnan(stacked), axis=0), 1)
        sem = np.nan_to_num(np.nanstd(stacked, axis=0, ddof=1)) / np.sqrt(counts)
    return mean, 1.96 * sem


def _config_without_seed(run_dir: str | Path) -> dict | None:
    """A run's ``config.yaml`` less what may differ between seeds of one config (None when absent)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in data.items() if k not in ("seed", "logger", "device", "derived")}


def check_same_config(run_dirs: list[str | Path]) -> None:
    """``ValueError`` unless the runs are seeds of one config: a mean over different algorithms or
    settings, cut to the shortest run, would be drawn as if it were one experiment."""
    configs = [_config_without_seed(d) for d in run_dirs]
    known = [(d, c) for d, c in zip(run_dirs, configs) if c is not None]
    for run_dir, config in known[1:]:
        if config != known[0][1]:
            differ = sorted(k for k in set(config) | set(known[0][1]) if config.get(k) != known[0][1].get(k))
            raise ValueError(
                f"{run_dir} is not another seed of {known[0][0]}'s config (they differ in {', '.join(differ)}); "
                "plot runs of one config together, or each run on its own"
            )


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, x: str = "frames",
              metrics: list[str] | None = None) -> Path:
    """Draw the curves of ``run_dirs`` (one config, several seeds) into the PNG ``out``: every group's
    return and loss terms, or the ``metrics`` columns, against ``x`` (``frames``, ``time`` or
    ``iterations``; several runs' wall times are averaged per iteration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; got {str(out)!r} (use a .png name)")
    if x not in X_AXES:
        raise ValueError(f"--x {x!r} is not an axis; accepted: {', '.join(X_AXES)}")
    check_same_config(run_dirs)
    runs = [read_metrics(d) for d in run_dirs]
    if metrics:
        shared = [k for k in runs[0] if all(k in r for r in runs)]
        missing = [k for k in metrics if k not in shared]
        if missing:
            raise ValueError(f"--metric {missing[0]!r} is not a column of every run's metrics.csv; columns: "
                             f"{', '.join(shared)}")
        keys = list(metrics)
    else:
        keys = [k for k in runs[0] if k.endswith(REWARD_SUFFIX)]
        keys += [k for k in runs[0] if k.split("/")[-1].startswith(LOSS_PREFIX) and "/" in k]
        keys = [k for k in keys if all(k in r for r in runs)]
    if not keys:
        raise ValueError("the runs share no reward or loss columns to plot")
    column, label = X_AXES[x]
    length = min(len(r[column]) for r in runs)
    xs = np.mean(np.stack([r[column][:length] for r in runs]), axis=0)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        mean, half = _band([r[key] for r in runs])
        ax.plot(xs, mean, color="tab:blue")
        if len(runs) > 1:
            ax.fill_between(xs, mean - half, mean + half, color="tab:blue", alpha=0.25, linewidth=0)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    label = f"{len(runs)} runs: mean and 95% interval" if len(runs) > 1 else str(run_dirs[0])
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep(runs_by_label: dict[str, list[Path]], out: str | Path, title: str = "") -> Path:
    """One panel: for each label (an algorithm of a sweep), the mean episode return (averaged over the
    groups) of its runs against frames, with its 95% interval over seeds; written to the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run_dirs in runs_by_label.items():
        runs = [read_metrics(d) for d in run_dirs]
        mean, half = _band([mean_return(run) for run in runs])
        frames = runs[0]["frames"][:len(mean)]
        line, = ax.plot(frames, mean, label=f"{label} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(frames, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("frames")
    ax.set_ylabel("mean episode return")
    ax.set_title(f"{title}: mean and 95% interval over seeds" if title else "mean and 95% interval over seeds",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
