"""Shared test setup and fixtures: one thread per worker (tests run with pytest -n 2 on 2 cores), tiny
configs, metrics rows, spec-only envs for module tests, and the CLI's one-line refusals."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)  # before anything else touches torch's thread pool
os.environ["MARLKIT_THREADS"] = "1"  # runs keep it (no auto policy): two pytest workers share 2 cores
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame-based PettingZoo envs, no display
os.environ.setdefault("PYGLET_HEADLESS", "1")

from torchrl.data import Categorical, Composite, Unbounded  # noqa: E402
from torchrl.envs import EnvBase  # noqa: E402

from marlkit.pipelines import make_config  # noqa: E402

ON_POLICY = ("mappo", "ippo", "happo", "maa2c", "iac", "coma")


def make_tiny_config(algorithm: str, env: str, run_dir: Path | str, *, num_envs: int = 4,
                     frames_per_batch: int = 100, iterations: int = 2, **overrides: Any) -> Any:
    """``iterations`` iterations of ``frames_per_batch`` frames with 16-unit networks and no bar:
    minibatches of half a batch and 2 epochs for PPO, 32-transition minibatches from a 1,000-frame
    buffer and 2 optimiser steps off-policy. ``overrides`` (``{"section.field": value}``) go last."""
    sizes = {"env.name": env, "env.num_envs": num_envs, "collector.frames_per_batch": frames_per_batch,
             "collector.total_frames": iterations * frames_per_batch, "model.num_cells": [16],
             "logger.progress": False, "logger.run_dir": str(run_dir)}
    if algorithm in ("mappo", "ippo", "happo"):
        sizes.update({"train.minibatch_size": frames_per_batch // 2, "train.num_epochs": 2})
    elif algorithm in ON_POLICY:
        pass  # A2C: one step on each whole batch
    else:
        sizes.update({"replay.batch_size": 32, "replay.buffer_size": 1000, "train.optimiser_steps": 2})
    return make_config(algorithm, overrides={**sizes, **overrides})


def read_metrics_rows(run_dir: Path | str) -> list[dict[str, str]]:
    """A run's ``metrics.csv`` rows as dicts of strings."""
    with (Path(run_dir) / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


class SpecOnlyEnv(EnvBase):
    """An env that only carries specs (group ``agents``), so module factories are tested on any shape in ms."""

    def __init__(self, obs_shape, action_spec, n_agents=3, batch=4, obs_dtype=torch.float32, mask=False):
        super().__init__(batch_size=torch.Size([batch]))
        b, n = batch, n_agents
        group = Composite(observation=Unbounded(shape=(b, n, *obs_shape), dtype=obs_dtype), shape=(b, n))
        if mask:
            group["action_mask"] = Categorical(2, shape=(b, n, action_spec.space.n), dtype=torch.bool)
        self.observation_spec = Composite(agents=group, shape=(b,))
        self.action_spec = Composite(agents=Composite(action=action_spec, shape=(b, n)), shape=(b,))
        self.reward_spec = Composite(agents=Composite(reward=Unbounded(shape=(b, n, 1)), shape=(b, n)), shape=(b,))

    def _reset(self, td):  # pragma: no cover - specs only
        raise NotImplementedError

    def _step(self, td):  # pragma: no cover - specs only
        raise NotImplementedError

    def _set_seed(self, seed):  # pragma: no cover - specs only
        return None


@pytest.fixture
def temp_files_in_tmp_path(tmp_path, monkeypatch):
    """What code makes with ``tempfile`` (and never removes) goes to the test's tmp_path instead of /tmp, in
    this process and in the processes it starts (TMPDIR)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def tmp_run_dir(tmp_path):
    """A fresh directory for a run's outputs."""
    return tmp_path / "run"


@pytest.fixture
def tiny_config():
    """:func:`make_tiny_config`: ``tiny_config(algorithm, env, run_dir, **overrides)``."""
    return make_tiny_config


@pytest.fixture
def read_metrics():
    """:func:`read_metrics_rows`: ``read_metrics(run_dir) -> rows``."""
    return read_metrics_rows


@pytest.fixture
def spec_env():
    """:class:`SpecOnlyEnv`, to build spec-only envs of any observation and action shape."""
    return SpecOnlyEnv


@pytest.fixture
def cli_rejects(capsys, tmp_path, monkeypatch):
    """``cli_rejects(args, match)``: ``marlkit <args>`` exits with 2, prints one error line matching
    ``match`` and writes no run (it runs in an empty folder)."""
    from marlkit.pipelines.cli import main as cli_main

    workdir = tmp_path / "cli"
    workdir.mkdir()

    def check(args: list[str], match: str) -> None:
        monkeypatch.chdir(workdir)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
        assert not (workdir / "runs").exists()  # nothing was built or written

    return check


@pytest.fixture
def tiny_gridworld_mappo(tiny_config):
    """``tiny_gridworld_mappo(run_dir, env="gridworld", **overrides)``: trains MAPPO for 3 iterations of
    40 frames (4 copies, 10-step episodes, 8-unit networks) and returns the result."""
    from marlkit.pipelines.mappo import train

    def run(run_dir: Path | str, env: str = "gridworld", **overrides: Any) -> Any:
        return train(tiny_config("mappo", env, run_dir, frames_per_batch=40, iterations=3, **{
            "env.max_steps": 10, "train.minibatch_size": 20, "train.num_epochs": 10, "model.num_cells": [8],
            **overrides}))

    return run


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kib, read_only=False) -> Path``: a tmpfs of that size mounted under ``tmp_path``, and
    ``small_disk.grow(path, kib)`` to enlarge it. A real full (or read-only) filesystem, where a
    monkeypatched ENOSPC cannot show torch's and the memmaps' own failures; skipped where mounting is
    not allowed (it needs root)."""
    mounted: list[Path] = []

    def mount(kib: int, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={kib}k" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("mounting a small tmpfs needs root")
        mounted.append(point)
        return point

    def grow(point: Path, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(point)], check=True)

    mount.grow = grow
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)
