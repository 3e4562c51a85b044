"""Rollout videos (decoded back) and training-curve plots."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import pytest

from marlkit.envs import make_env
from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.config import apply_overrides
from marlkit.pipelines.mappo import MappoConfig, train
from marlkit.pipelines.render import record_rollout


def decode(path):
    reader = imageio.get_reader(path)
    frames = [frame for frame in reader]
    reader.close()
    return frames


@pytest.mark.parametrize("name,kwargs,size", [
    ("vmas/navigation", {"n_agents": 2}, (700, 700)),
    ("pettingzoo/mpe2/simple_spread_v3", {"N": 2, "max_cycles": 5}, (700, 700)),
    ("gridworld", {"grid_size": 5}, (160, 160)),
])
def test_record_mp4_decodes_to_requested_frames(name, kwargs, size, tmp_path):
    env = make_env(name, num_envs=2, seed=0, **kwargs)
    out = record_rollout(env, tmp_path / "video.mp4", steps=12, env_index=1)
    frames = decode(out)
    assert len(frames) == 12  # episodes that end are reset: always the requested count
    assert frames[0].shape == (*size, 3)


def test_cli_render_gif_and_bad_extension(tmp_path, capsys):
    out = tmp_path / "grid.gif"
    assert cli_main(["render", "--env", "gridworld", "--out", str(out), "--steps", "7", "env.grid_size=4"]) == 0
    frames = decode(out)
    assert len(frames) == 7 and frames[0].shape[:2] == (128, 128)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["render", "--env", "gridworld", "--out", str(tmp_path / "grid.avi")])
    assert exit_info.value.code == 2
    assert "unknown extension '.avi'; accepted: .mp4, .gif" in capsys.readouterr().err
    assert not (tmp_path / "grid.avi").exists()


def test_render_rejects_bad_env_index(tmp_path):
    env = make_env("gridworld", num_envs=2)
    with pytest.raises(ValueError, match="env_index=5 is out of range: the env has 2 copies"):
        record_rollout(env, tmp_path / "v.mp4", env_index=5)


def _tiny_run(run_dir, seed):
    cfg = apply_overrides(MappoConfig(), {
        "env.name": "matrix/coordination", "env.num_envs": 4, "collector.frames_per_batch": 20,
        "collector.total_frames": 60, "train.minibatch_size": 10, "model.num_cells": [8], "seed": seed,
        "logger.progress": False, "logger.run_dir": str(run_dir),
    })
    train(cfg)


def test_training_writes_curves_and_plot_aggregates_seeds(tmp_path):
    runs = [tmp_path / f"seed{s}" for s in range(3)]
    for seed, run in enumerate(runs):
        _tiny_run(run, seed)
        assert (run / "plots" / "curves.png").stat().st_size > 0
    out = tmp_path / "all.png"
    assert cli_main(["plot", *map(str, runs), "--out", str(out)]) == 0
    image = imageio.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_refuses_non_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "is not a run directory: it has no metrics.csv" in capsys.readouterr().err


def test_plot_draws_any_column_against_time_or_iterations(tmp_path, monkeypatch, capsys):
    import matplotlib.axes

    from marlkit.pipelines.plots import read_metrics

    runs = [tmp_path / f"seed{s}" for s in range(2)]
    for seed, run in enumerate(runs):
        _tiny_run(run, seed)
    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, *a, **k: drawn.append((np.asarray(x), np.asarray(y))) or original(self, x, y, *a, **k))
    metrics = [read_metrics(run) for run in runs]
    for axis, column in (("time", "time_s"), ("iterations", "iteration")):
        drawn.clear()
        assert cli_main(["plot", *map(str, runs), "--out", str(tmp_path / f"{axis}.png"), "--x", axis,
                         "--metric", "frames_per_s", "--metric", "timers/training_s"]) == 0
        assert len(drawn) == 2  # one panel per --metric
        assert np.allclose(drawn[0][0], (metrics[0][column] + metrics[1][column]) / 2)
        assert np.allclose(drawn[0][1], (metrics[0]["frames_per_s"] + metrics[1]["frames_per_s"]) / 2)
    for args, match in ((["--x", "epochs"], "--x 'epochs' is not an axis; accepted: frames, time, iterations"),
                        (["--metric", "nope"], "--metric 'nope' is not a column of every run's metrics.csv")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["plot", *map(str, runs), "--out", str(tmp_path / "bad.png"), *args])
        assert exit_info.value.code == 2 and match in capsys.readouterr().err
