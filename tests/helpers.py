"""Helpers shared by the tests."""

from __future__ import annotations

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
