"""Metric loggers (optional ones skipped when their package is absent) and evaluation during training."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from marlkit.pipelines import loggers
from marlkit.pipelines.loggers import namespaced


def test_metric_names_are_namespaced():
    row = {"iteration": 3, "frames": 400, "time_s": 2.0, "frames_per_s": 200.0, "agents/loss_objective": 0.1,
           "agents/episode_reward_mean": float("nan"), "timers/training_s": 1.0, "counters/optimiser_steps": 9,
           "eval/agents/episode_reward_mean": 5.0}
    assert namespaced(row) == {"counters/frames": 400.0, "timers/time_s": 2.0, "timers/frames_per_s": 200.0,
                               "train/agents/loss_objective": 0.1, "timers/training_s": 1.0,
                               "counters/optimiser_steps": 9.0, "eval/agents/episode_reward_mean": 5.0}


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_logger_package_is_reported_before_anything_runs(name, monkeypatch, cli_rejects):
    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    cli_rejects(["train", "mappo", f"logger={name}"], f"logger={name} needs the '{name}' package.*pip install {name}")


def test_unknown_logger(cli_rejects):
    cli_rejects(["train", "mappo", "logger.backend=stdout"], "logger='stdout' is not supported; accepted: csv")


def test_tensorboard_logger_writes_events(tmp_run_dir, tiny_gridworld_mappo):
    pytest.importorskip("tensorboard")
    tiny_gridworld_mappo(tmp_run_dir, **{"logger.backend": "tensorboard"})
    assert list((tmp_run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_logger_offline(tmp_run_dir, monkeypatch, tiny_gridworld_mappo):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_gridworld_mappo(tmp_run_dir, **{"logger.backend": "wandb"})
    assert list((tmp_run_dir / "wandb").glob("offline-run-*"))


def test_mlflow_logger_file_store(tmp_run_dir, tiny_gridworld_mappo):
    pytest.importorskip("mlflow")
    tiny_gridworld_mappo(tmp_run_dir, **{"logger.backend": "mlflow"})
    # The file store keeps one file per metric, "<timestamp> <value> <step>" a line: the frame counter
    # must have been logged every iteration, with the frame count as the step.
    counters = list((tmp_run_dir / "mlruns").glob("*/*/metrics/counters.frames"))  # mlflow names it with "." for "/"
    assert len(counters) == 1
    logged = [line.split() for line in counters[0].read_text().splitlines()]
    assert [(float(value), int(step)) for _, value, step in logged] == [(40.0, 40), (80.0, 80), (120.0, 120)]


def test_evaluation_during_training_writes_best_and_videos(tmp_run_dir, tiny_gridworld_mappo):
    tiny_gridworld_mappo(tmp_run_dir, **{"collector.total_frames": 160, "logger.eval_every": 2, "logger.eval_episodes": 3,
                               "logger.video_every": 4, "logger.video_steps": 5})
    with (tmp_run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    evaluated = [r["iteration"] for r in rows if r.get("eval/agents/episode_reward_mean", "") != ""]
    assert evaluated == ["1", "3"]
    assert (tmp_run_dir / "checkpoints" / "best.pt").is_file()
    assert [p.name for p in (tmp_run_dir / "videos").iterdir()] == ["iter_00003.mp4"]
