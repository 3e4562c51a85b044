"""The multi-agent grid world (``gridworld``), a natively batched TorchRL environment.

All ``num_envs`` copies live in tensors on one device and step together; there is no Python loop
over copies. Agents move up/down/left/right or stay on a ``grid_size x grid_size`` grid and collect
targets by stepping onto them.

Rewards (every agent also pays -0.1 per step):

* ``cooperative``: +10 to every agent for each target any agent collects, and +20 to every agent when
  the last target is collected (the episode terminates then).
* ``competitive``: +20 to the collector and -5 to every other agent for each target; when several
  agents reach a target at once, the lowest-indexed one collects it. The episode terminates when
  no target remains.

Episodes are truncated after ``max_steps`` steps. Each agent observes, scaled to [0, 1], its own
position, the other agents' positions (in agent order), all target positions, and a 0/1 flag per
target saying whether it remains. The root ``state`` (for mixers) is all positions and flags.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Composite
from torchrl.envs import EnvBase

from ._common import check_choice, check_positive_int, finalize, MultiAgentEnv, native_group_specs, NativeState

GROUP = "agents"
MODES = ("cooperative", "competitive")
ACTIONS = ("up", "down", "left", "right", "stay")
# (row, col) offsets in the order of ACTIONS; row 0 is the top of the rendered grid.
_DELTAS = ((-1, 0), (1, 0), (0, -1), (0, 1), (0, 0))
STEP_PENALTY = -0.1
COLLECT_REWARD = 10.0
ALL_COLLECTED_BONUS = 20.0
COMPETITIVE_COLLECT = 20.0
COMPETITIVE_OTHERS = -5.0


class GridWorldEnv(NativeState, EnvBase):
    """Batched multi-agent target-collection grid world; see the module docstring for the rules."""

    batch_locked = True
    STATE = ("agent_pos", "target_pos", "remaining", "steps", "_rng")

    def __init__(
        self,
        *,
        num_envs: int = 1,
        grid_size: int = 5,
        num_agents: int = 2,
        num_targets: int = 3,
        mode: str = "cooperative",
        max_steps: int = 50,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ):
        check_positive_int("num_envs", num_envs)
        check_positive_int("num_agents", num_agents)
        check_positive_int("num_targets", num_targets)
        check_positive_int("max_steps", max_steps)
        check_choice("mode", mode, MODES)
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
            raise ValueError(f"grid_size must be an integer >= 2, got {grid_size!r}")
        if num_agents + num_targets > grid_size * grid_size:
            raise ValueError(
                f"num_agents + num_targets = {num_agents + num_targets} does not fit on a "
                f"{grid_size}x{grid_size} grid ({grid_size * grid_size} cells); use a larger grid_size"
            )
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.grid_size = grid_size
        self.num_agents = num_agents
        self.num_targets = num_targets
        self.mode = mode
        self.max_steps = max_steps
        self.group_map = {GROUP: [f"agent_{i}" for i in range(num_agents)]}
        self._deltas = torch.tensor(_DELTAS, device=self.device)
        self._others = torch.tensor(
            [[j for j in range(num_agents) if j != i] for i in range(num_agents)],
            dtype=torch.long,
            device=self.device,
        ).reshape(num_agents, num_agents - 1)
        self._rng = torch.Generator(device=self.device)
        self._rng.manual_seed(0 if seed is None else seed)
        self._make_specs()
        b, n, t = num_envs, num_agents, num_targets
        self.agent_pos = torch.zeros(b, n, 2, dtype=torch.long, device=self.device)
        self.target_pos = torch.zeros(b, t, 2, dtype=torch.long, device=self.device)
        self.remaining = torch.ones(b, t, dtype=torch.bool, device=self.device)
        self.steps = torch.zeros(b, dtype=torch.long, device=self.device)

    @property
    def obs_dim(self) -> int:
        """Per-agent observation size: own (2) + others (2(N-1)) + targets (2T) + remaining (T)."""
        return 2 * self.num_agents + 3 * self.num_targets

    def _make_specs(self) -> None:
        b, n = self.batch_size[0], self.num_agents
        dev = self.device
        self.observation_spec = Composite(
            {
                GROUP: Composite(
                    observation=Bounded(0.0, 1.0, shape=(b, n, self.obs_dim), device=dev),
                    shape=(b, n),
                ),
                "state": Bounded(0.0, 1.0, shape=(b, self.obs_dim), device=dev),
            },
            shape=(b,),
        )
        self.action_spec, self.reward_spec, self.done_spec = native_group_specs(GROUP, b, n, len(ACTIONS), dev)

    def set_state(
        self,
        agent_pos: torch.Tensor,
        target_pos: torch.Tensor,
        remaining: torch.Tensor | None = None,
        steps: torch.Tensor | int = 0,
    ) -> TensorDictBase:
        """Place agents and targets by hand (``[num_envs, N, 2]`` / ``[num_envs, T, 2]`` (row, col)).

        Returns the observation TensorDict for the new layout, as ``reset`` would.
        """
        self.agent_pos = torch.as_tensor(agent_pos, dtype=torch.long, device=self.device).clone()
        self.target_pos = torch.as_tensor(target_pos, dtype=torch.long, device=self.device).clone()
        expected = {"agent_pos": (*self.batch_size, self.num_agents, 2),
                    "target_pos": (*self.batch_size, self.num_targets, 2)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        if remaining is None:
            remaining = torch.ones(*self.batch_size, self.num_targets, dtype=torch.bool)
        self.remaining = torch.as_tensor(remaining, dtype=torch.bool, device=self.device).clone()
        self.steps = torch.as_tensor(steps, dtype=torch.long, device=self.device).expand(
            self.batch_size
        ).clone()
        zeros = torch.zeros(*self.batch_size, dtype=torch.bool, device=self.device)
        return self._output(zeros, zeros, None)

    def _observation(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = float(self.grid_size - 1)
        agents = self.agent_pos.float() / scale  # [B, N, 2]
        targets = (self.target_pos.float() / scale).flatten(1)  # [B, 2T]
        remaining = self.remaining.float()  # [B, T]
        others = agents[:, self._others].flatten(2)  # [B, N, 2(N-1)]
        shared = torch.cat([targets, remaining], -1).unsqueeze(1).expand(-1, self.num_agents, -1)
        obs = torch.cat([agents, others, shared], -1)
        state = torch.cat([agents.flatten(1), targets, remaining], -1)
        return obs, state

    def _output(
        self, terminated: torch.Tensor, truncated: torch.Tensor, reward: torch.Tensor | None
    ) -> TensorDictBase:
        obs, state = self._observation()
        b, n = self.batch_size[0], self.num_agents
        done = terminated | truncated
        flags = {"done": done, "terminated": terminated, "truncated": truncated}
        group = {"observation": obs}
        for key, value in flags.items():
            group[key] = value.view(b, 1, 1).expand(b, n, 1)
        if reward is not None:
            group["reward"] = reward.unsqueeze(-1)
        out = {GROUP: TensorDict(group, batch_size=(b, n), device=self.device), "state": state}
        out.update({key: value.view(b, 1) for key, value in flags.items()})
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        b, n, t, g = self.batch_size[0], self.num_agents, self.num_targets, self.grid_size
        reset = None if tensordict is None else tensordict.get("_reset", None)
        mask = (
            torch.ones(b, dtype=torch.bool, device=self.device)
            if reset is None
            else reset.reshape(b, -1).any(-1)
        )
        # Distinct random cells for every agent and target: the first N + T of a random permutation.
        cells = torch.rand(b, g * g, generator=self._rng, device=self.device).argsort(-1)[:, : n + t]
        layout = torch.stack([cells // g, cells % g], -1)
        m3 = mask.view(b, 1, 1)
        self.agent_pos = torch.where(m3, layout[:, :n], self.agent_pos)
        self.target_pos = torch.where(m3, layout[:, n:], self.target_pos)
        self.remaining = self.remaining | mask.view(b, 1)
        self.steps = torch.where(mask, torch.zeros_like(self.steps), self.steps)
        zeros = torch.zeros(b, dtype=torch.bool, device=self.device)
        return self._output(zeros, zeros, None)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get((GROUP, "action")).long()  # [B, N]
        self.agent_pos = (self.agent_pos + self._deltas[action]).clamp(0, self.grid_size - 1)
        self.steps = self.steps + 1
        # on[b, i, k]: agent i stands on target k, which is still there.
        on = (self.agent_pos.unsqueeze(2) == self.target_pos.unsqueeze(1)).all(-1)
        on = on & self.remaining.unsqueeze(1)
        collected = on.any(1)  # [B, T]
        collector = torch.nn.functional.one_hot(on.float().argmax(1), self.num_agents)  # [B, T, N]
        per_agent = (collector * collected.unsqueeze(-1)).sum(1).float()  # [B, N]
        n_collected = collected.sum(-1, keepdim=True).float()  # [B, 1]
        self.remaining = self.remaining & ~collected
        terminated = ~self.remaining.any(-1)
        if self.mode == "cooperative":
            bonus = (terminated & collected.any(-1)).float().unsqueeze(-1) * ALL_COLLECTED_BONUS
            reward = (COLLECT_REWARD * n_collected + bonus).expand(-1, self.num_agents)
        else:
            reward = COMPETITIVE_COLLECT * per_agent + COMPETITIVE_OTHERS * (n_collected - per_agent)
        reward = reward + STEP_PENALTY
        truncated = (self.steps >= self.max_steps) & ~terminated
        return self._output(terminated, truncated, reward)

    def _set_seed(self, seed: int | None) -> None:
        self._rng.manual_seed(0 if seed is None else seed)

    def render_frame(self, env_index: int = 0, cell: int = 32) -> np.ndarray:
        """Draw copy ``env_index``: grid lines, remaining targets (green), agents (coloured)."""
        g = self.grid_size
        img = np.full((g * cell, g * cell, 3), 255, dtype=np.uint8)
        img[::cell, :] = 200
        img[:, ::cell] = 200
        img[-1, :] = 200
        img[:, -1] = 200
        pad = cell // 5
        for (r, c), alive in zip(
            self.target_pos[env_index].tolist(), self.remaining[env_index].tolist(), strict=True
        ):
            if alive:
                img[r * cell + pad : (r + 1) * cell - pad, c * cell + pad : (c + 1) * cell - pad] = (
                    40, 170, 60,
                )
        palette = np.array(
            [[220, 50, 50], [50, 90, 220], [230, 160, 20], [150, 60, 200], [20, 180, 190]],
            dtype=np.uint8,
        )
        inset = cell // 3
        for i, (r, c) in enumerate(self.agent_pos[env_index].tolist()):
            img[r * cell + inset : (r + 1) * cell - inset, c * cell + inset : (c + 1) * cell - inset] = (
                palette[i % len(palette)]
            )
        return img


def make_gridworld_env(
    *, num_envs: int, device: torch.device, seed: int | None, **kwargs: Any
) -> MultiAgentEnv:
    """Build the batched grid world; kwargs: ``grid_size``, ``num_agents``, ``num_targets``, ``mode``,
    ``max_steps``."""
    accepted = {"grid_size", "num_agents", "num_targets", "mode", "max_steps"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"unknown gridworld arguments {unknown}; accepted: {sorted(accepted)}")
    base = GridWorldEnv(num_envs=num_envs, device=device, seed=seed, **kwargs)
    return finalize(
        base,
        group_map=base.group_map,
        name="gridworld",
        expand_dones=False,
        render_fn=base.render_frame,
    )
