"""Shared test setup: one thread per worker (tests run with pytest -n 2 on 2 cores)."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame-based PettingZoo envs, no display
os.environ.setdefault("PYGLET_HEADLESS", "1")


@pytest.fixture
def tmp_run_dir(tmp_path):
    """A fresh directory for a run's outputs."""
    return tmp_path / "run"
