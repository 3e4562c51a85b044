"""A user's own PettingZoo env, importable as ``custom_envs:Countdown`` (tests put this folder on the path)."""

from __future__ import annotations

import os
import random

import numpy as np
import pettingzoo
from gymnasium import spaces


class Countdown(pettingzoo.ParallelEnv):
    """Two agents, episodes of a random length in [2, 9]; each step pays 1 per agent that chose action 1.

    The episode return of a copy therefore depends on its length, so evaluations that cut episodes
    short or mix up copies show up in the returns.
    """

    metadata = {"name": "countdown_v0"}

    def __init__(self, longest: int = 9):
        self.possible_agents = ["runner_0", "runner_1"]
        self.agents = list(self.possible_agents)
        self.longest = longest
        self.rng = np.random.default_rng(0)
        self.left = 0

    def observation_space(self, agent):
        return spaces.Box(0.0, float(self.longest), shape=(1,))

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.left = int(self.rng.integers(2, self.longest + 1))
        return {a: np.array([self.left], dtype=np.float32) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        self.left -= 1
        obs = {a: np.array([self.left], dtype=np.float32) for a in self.agents}
        rew = {a: float(actions[a]) for a in self.agents}
        end = self.left <= 0
        term = {a: end for a in self.agents}
        trunc = {a: False for a in self.agents}
        if end:
            self.agents = []
        return obs, rew, term, trunc, {a: {} for a in self.possible_agents}


class GlobalDice(Countdown):
    """Countdown written the old way: episode lengths from numpy's and Python's global generators, the
    reset seed ignored (so only a run that seeds those generators repeats itself)."""

    def reset(self, seed=None, options=None):
        self.agents = list(self.possible_agents)
        self.left = int(np.random.randint(2, self.longest)) + random.randint(0, 1)  # at most longest
        return {a: np.array([self.left], dtype=np.float32) for a in self.agents}, {a: {} for a in self.agents}


class NanReward(Countdown):
    """Countdown whose rewards turn NaN from global step ``nan_after`` on (every copy counts its own steps)."""

    def __init__(self, longest: int = 9, nan_after: int = 25):
        super().__init__(longest)
        self.nan_after, self.steps = nan_after, 0

    def step(self, actions):
        obs, rew, term, trunc, info = super().step(actions)
        self.steps += 1
        if self.steps > self.nan_after:
            rew = {agent: float("nan") for agent in rew}
        return obs, rew, term, trunc, info


class NeedsArgument(Countdown):
    """A user's env whose constructor needs an argument no one passed."""

    def __init__(self, size: int):
        super().__init__(size)


class StringReward(Countdown):
    """A user's env that pays its rewards as strings."""

    def step(self, actions):
        obs, rew, term, trunc, info = super().step(actions)
        return obs, {agent: "one" for agent in rew}, term, trunc, info


class DiesAfter(Countdown):
    """Countdown whose process exits, as a crashing simulator's would, after ``die_after`` steps of one copy
    (only ever stepped in a collector worker's process)."""

    def __init__(self, longest: int = 9, die_after: int = 15):
        super().__init__(longest)
        self.die_after, self.steps = die_after, 0

    def step(self, actions):
        self.steps += 1
        if self.steps > self.die_after:
            os._exit(3)
        return super().step(actions)


class MaskedPick(pettingzoo.ParallelEnv):
    """Two agents pick one of 4 actions for 6 steps; each observation is a dict of ``observation`` and an
    ``action_mask`` allowing a different pair of actions each step; action 3 pays 1."""
    metadata = {"name": "masked_pick_v0"}
    def __init__(self):
        self.possible_agents = ["picker_0", "picker_1"]; self.agents = list(self.possible_agents); self.t = 0
    def observation_space(self, agent):
        return spaces.Dict({"observation": spaces.Box(0.0, 1.0, shape=(2,)), "action_mask": spaces.Box(0, 1, shape=(4,), dtype=np.int8)})
    def action_space(self, agent):
        return spaces.Discrete(4)
    def _observe(self):
        mask = np.zeros(4, dtype=np.int8); mask[[self.t % 4, (self.t + 1) % 4]] = 1
        return {a: {"observation": np.array([self.t / 6, i], dtype=np.float32), "action_mask": mask} for i, a in enumerate(self.agents)}
    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return self._observe(), {a: {} for a in self.agents}
    def step(self, actions):
        self.t += 1; end = self.t >= 6; obs = self._observe()
        rew = {a: float(actions[a] == 3) for a in self.agents}
        term = {a: end for a in self.agents}
        if end: self.agents = []
        return obs, rew, term, {a: False for a in self.possible_agents}, {a: {} for a in self.possible_agents}
