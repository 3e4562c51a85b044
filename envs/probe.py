"""Probe tasks (``probe/<task>``): tiny envs, batched on tensors like the matrix games, each isolating one
capability a model needs, with a known chance level and optimum.

``probe/communication`` (``n_agents`` 2, ``n_symbols`` 4, ``max_steps`` 10)
    Agent 0 (the speaker) privately sees a random symbol each step; every other agent (a listener)
    sees only its own identity and must choose that symbol. The env has no message channel, so a
    listener's only way to know the symbol is a communicating policy. Team reward per step: the
    fraction of listeners that chose the symbol (the speaker's action does not count). Episode return:
    ``max_steps`` at best, ``max_steps / n_symbols`` expected at chance.

``probe/memory`` (``n_agents`` 2, ``n_cues`` 2, ``delay`` 5)
    Each agent sees its own random cue at the first step only; ``delay`` steps later a flag asks it
    to choose the cue, and it is rewarded 1 if it does (0 at every other step). The episode then ends
    (``delay + 1`` steps). A memoryless policy is at chance, ``1 / n_cues`` per agent.

Observations (group ``agents``): the agent's one-hot identity followed by the task's features; the
root ``state`` is every agent's observation, concatenated.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Composite
from torchrl.envs import EnvBase

from ._common import check_positive_int, finalize, MultiAgentEnv, native_group_specs, NativeState

GROUP = "agents"
PROBE_TASKS = ("communication", "memory")
_ACCEPTED = {"communication": ("n_agents", "n_symbols", "max_steps"), "memory": ("n_agents", "n_cues", "delay")}


class _ProbeEnv(NativeState, EnvBase):
    """What both probes share: one group of agents, categorical actions, a shared flag set, seeding."""

    batch_locked = True

    def __init__(self, *, num_envs: int, n_agents: int, n_actions: int, features: int, device: Any,
                 seed: int | None):
        check_positive_int("num_envs", num_envs)
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.n_agents, self.n_actions = n_agents, n_actions
        self.group_map = {GROUP: [f"agent_{i}" for i in range(n_agents)]}
        self.obs_dim = n_agents + features
        self._identity = torch.eye(n_agents, device=self.device)
        self._rng = torch.Generator(device=self.device)
        self._rng.manual_seed(0 if seed is None else seed)
        self.steps = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        b, n, dev = num_envs, n_agents, self.device
        self.observation_spec = Composite(
            {GROUP: Composite(observation=Bounded(0.0, 1.0, shape=(b, n, self.obs_dim), device=dev), shape=(b, n)),
             "state": Bounded(0.0, 1.0, shape=(b, n * self.obs_dim), device=dev)},
            shape=(b,),
        )
        self.action_spec, self.reward_spec, self.done_spec = native_group_specs(GROUP, b, n, n_actions, dev)

    def _features(self) -> torch.Tensor:
        raise NotImplementedError

    def _output(self, done: torch.Tensor, reward: torch.Tensor | None) -> TensorDictBase:
        b, n = self.batch_size[0], self.n_agents
        obs = torch.cat([self._identity.expand(b, n, n), self._features()], -1)
        no = torch.zeros_like(done)
        group = {"observation": obs}
        for key, value in {"done": done, "terminated": done, "truncated": no}.items():
            group[key] = value.view(b, 1, 1).expand(b, n, 1)
        if reward is not None:
            group["reward"] = reward.view(b, n, 1)
        return TensorDict({GROUP: TensorDict(group, batch_size=(b, n), device=self.device),
                           "state": obs.reshape(b, -1), "done": done.view(b, 1), "terminated": done.view(b, 1),
                           "truncated": no.view(b, 1)}, batch_size=self.batch_size, device=self.device)

    def _reset_mask(self, tensordict: TensorDictBase | None) -> torch.Tensor:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        b = self.batch_size[0]
        return torch.ones(b, dtype=torch.bool, device=self.device) if reset is None else reset.reshape(b, -1).any(-1)

    def _draw(self, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(high, shape, generator=self._rng, device=self.device)

    def _set_seed(self, seed: int | None) -> None:
        self._rng.manual_seed(0 if seed is None else seed)


class CommunicationEnv(_ProbeEnv):
    """``probe/communication``; see the module docstring."""

    STATE = ("symbol", "steps", "_rng")

    def __init__(self, *, num_envs: int = 1, n_agents: int = 2, n_symbols: int = 4, max_steps: int = 10,
                 device: Any = "cpu", seed: int | None = None):
        check_positive_int("n_symbols", n_symbols)
        check_positive_int("max_steps", max_steps)
        if isinstance(n_agents, bool) or not isinstance(n_agents, int) or n_agents < 2:
            raise ValueError(f"probe/communication needs n_agents >= 2 (a speaker and a listener), got {n_agents!r}")
        super().__init__(num_envs=num_envs, n_agents=n_agents, n_actions=n_symbols, features=n_symbols,
                         device=device, seed=seed)
        self.n_symbols, self.max_steps = n_symbols, max_steps
        self.symbol = torch.zeros(num_envs, dtype=torch.long, device=self.device)

    def _features(self) -> torch.Tensor:
        b, n = self.batch_size[0], self.n_agents
        seen = torch.zeros(b, n, self.n_symbols, device=self.device)
        seen[:, 0] = torch.nn.functional.one_hot(self.symbol, self.n_symbols).float()  # the speaker only
        return seen

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        mask = self._reset_mask(tensordict)
        self.steps = torch.where(mask, torch.zeros_like(self.steps), self.steps)
        self.symbol = torch.where(mask, self._draw(self.n_symbols, self.symbol.shape), self.symbol)
        return self._output(torch.zeros_like(mask), None)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get((GROUP, "action")).long()  # [B, N]
        right = (action[:, 1:] == self.symbol.unsqueeze(-1)).float().mean(-1)  # listeners only
        reward = right.unsqueeze(-1).expand(-1, self.n_agents)
        self.steps = self.steps + 1
        self.symbol = self._draw(self.n_symbols, self.symbol.shape)
        return self._output(self.steps >= self.max_steps, reward)


class MemoryEnv(_ProbeEnv):
    """``probe/memory``; see the module docstring."""

    STATE = ("cue", "steps", "_rng")

    def __init__(self, *, num_envs: int = 1, n_agents: int = 2, n_cues: int = 2, delay: int = 5,
                 device: Any = "cpu", seed: int | None = None):
        check_positive_int("n_agents", n_agents)
        check_positive_int("delay", delay)
        if isinstance(n_cues, bool) or not isinstance(n_cues, int) or n_cues < 2:
            raise ValueError(f"probe/memory needs n_cues >= 2 (one cue is nothing to remember), got {n_cues!r}")
        super().__init__(num_envs=num_envs, n_agents=n_agents, n_actions=n_cues, features=n_cues + 1,
                         device=device, seed=seed)
        self.n_cues, self.delay = n_cues, delay
        self.cue = torch.zeros(num_envs, n_agents, dtype=torch.long, device=self.device)

    def _features(self) -> torch.Tensor:
        first = (self.steps == 0).view(-1, 1, 1).float()
        cue = torch.nn.functional.one_hot(self.cue, self.n_cues).float() * first
        asked = (self.steps == self.delay).view(-1, 1, 1).float().expand(-1, self.n_agents, 1)
        return torch.cat([cue, asked], -1)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        mask = self._reset_mask(tensordict)
        self.steps = torch.where(mask, torch.zeros_like(self.steps), self.steps)
        self.cue = torch.where(mask.unsqueeze(-1), self._draw(self.n_cues, self.cue.shape), self.cue)
        return self._output(torch.zeros_like(mask), None)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get((GROUP, "action")).long()  # [B, N]
        asked = (self.steps == self.delay).unsqueeze(-1)
        reward = ((action == self.cue) & asked).float()
        self.steps = self.steps + 1
        return self._output(self.steps > self.delay, reward)


def make_probe_env(task: str, *, num_envs: int, device: torch.device, seed: int | None,
                   **kwargs: Any) -> MultiAgentEnv:
    """Build ``probe/<task>``; kwargs as the module docstring lists per task."""
    if task not in PROBE_TASKS:
        raise ValueError(f"unknown probe task {task!r}; available: {', '.join('probe/' + t for t in PROBE_TASKS)}")
    unknown = sorted(set(kwargs) - set(_ACCEPTED[task]))
    if unknown:
        raise ValueError(f"unknown probe/{task} arguments {unknown}; accepted: {list(_ACCEPTED[task])}")
    cls = CommunicationEnv if task == "communication" else MemoryEnv
    base = cls(num_envs=num_envs, device=device, seed=seed, **kwargs)
    return finalize(base, group_map=base.group_map, name=f"probe/{task}", expand_dones=False)
