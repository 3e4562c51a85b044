"""Helpers shared by the tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase


class SpecOnlyEnv(EnvBase):
    """An env that only carries specs, so module factories can be tested on any shape in ms."""

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


def assert_cli_rejects(args: list[str], match: str, capsys, workdir: Path, monkeypatch) -> None:
    """``marlkit <args>`` exits with 2, prints an error matching ``match`` and writes no run."""
    from marlkit.pipelines.cli import main as cli_main

    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (workdir / "runs").exists()  # nothing was built or written
