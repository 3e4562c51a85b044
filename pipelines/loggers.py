"""Metric loggers: ``csv`` (default; ``metrics.csv`` is always written), ``tensorboard``, ``wandb``, ``mlflow``.

The optional ones are imported only when chosen; a missing package is reported, with the command that
installs it, before anything is built. Names are namespaced for them: a group's metrics go under
``train/<group>/...``, evaluation under ``eval/...``, and ``timers/...`` / ``counters/...`` stay as
they are (``frames`` becomes ``counters/frames``); the step is the frame count.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
# logger -> (module it imports, pip package that provides it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
_TOP_LEVEL = ("timers/", "counters/", "eval/")


def check_logger(name: str) -> None:
    """``ValueError`` for an unknown logger or one whose package is missing (with the fix)."""
    if name not in LOGGERS:
        raise ValueError(f"logger={name!r} is not supported; accepted: {', '.join(LOGGERS)}")
    if name in _PACKAGES:
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"logger={name} needs the {package!r} package, which is not installed: pip install {package}")


def namespaced(row: Mapping[str, float]) -> dict[str, float]:
    """``metrics.csv`` column names -> namespaced metric names (``iteration`` is dropped: it is the step)."""
    out = {}
    for key, value in row.items():
        if key == "iteration":
            continue
        if key == "frames":
            out["counters/frames"] = value
        elif key in ("time_s", "frames_per_s"):
            out[f"timers/{key}"] = value
        elif key.startswith(_TOP_LEVEL):
            out[key] = value
        else:
            out[f"train/{key}"] = value
    return {k: float(v) for k, v in out.items() if v == v}  # NaN (no finished episode) is skipped


class MetricLogger:
    """``csv``: nothing beyond ``metrics.csv``, which the run directory always writes."""

    def log(self, row: Mapping[str, float]) -> None:
        """Record one iteration's metrics."""

    def close(self) -> None:
        """Flush and release resources."""


class TensorboardLogger(MetricLogger):
    """Event files in ``<run-dir>/tensorboard``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: Mapping[str, float]) -> None:
        step = int(row["frames"])
        for key, value in namespaced(row).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    """A wandb run in ``<run-dir>/wandb``; offline unless ``logger.wandb_mode=online``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], mode: str = "offline"):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="marlkit", name=run_dir.name, dir=str(run_dir), mode=mode, config=dict(config))

    def log(self, row: Mapping[str, float]) -> None:
        self.run.log(namespaced(row), step=int(row["frames"]))

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(MetricLogger):
    """An mlflow run in the file store ``<run-dir>/mlruns``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=run_dir.name)
        flat = {}
        for section, values in config.items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                flat[section] = values
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, row: Mapping[str, float]) -> None:
        metrics = {k.replace("/", "."): v for k, v in namespaced(row).items()}
        self.mlflow.log_metrics(metrics, step=int(row["frames"]))

    def close(self) -> None:
        self.mlflow.end_run()


def make_logger(name: str, run_dir: Path, config: Mapping[str, Any], wandb_mode: str = "offline") -> MetricLogger:
    """The logger called ``name`` (see :data:`LOGGERS`) writing into ``run_dir``."""
    check_logger(name)
    if name == "tensorboard":
        return TensorboardLogger(run_dir, config)
    if name == "wandb":
        return WandbLogger(run_dir, config, wandb_mode)
    if name == "mlflow":
        return MlflowLogger(run_dir, config)
    return MetricLogger()
