"""Gymnasium single-agent environments (``gym/<id>``) as a one-agent group named ``agents``.

Exposing a single-agent env through the same group layout lets every pipeline do single-agent RL
unchanged. The Gymnasium env is seen through a one-agent PettingZoo ``ParallelEnv`` adapter and then
batched like any other PettingZoo env.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import missing_package, MultiAgentEnv

AGENT = "agents_0"  # grouped by PettingZoo's "<group>_<i>" convention into the group "agents"


def _gym_as_parallel(env_id: str, **kwargs: Any) -> Any:
    import gymnasium
    import pettingzoo

    class GymAsParallel(pettingzoo.ParallelEnv):
        """A Gymnasium env seen as a PettingZoo parallel env with the single agent ``agents_0``."""

        metadata = {"name": f"gym_{env_id}", "render_modes": ["rgb_array"]}

        def __init__(self) -> None:
            self.env = gymnasium.make(env_id, **kwargs)
            self.possible_agents = [AGENT]
            self.agents = [AGENT]
            self.render_mode = self.env.render_mode

        def observation_space(self, agent: str) -> Any:
            return self.env.observation_space

        def action_space(self, agent: str) -> Any:
            return self.env.action_space

        def reset(self, seed: int | None = None, options: dict | None = None):
            self.agents = [AGENT]
            obs, info = self.env.reset(seed=seed, options=options)
            return {AGENT: obs}, {AGENT: info}

        def step(self, actions: dict[str, Any]):
            obs, rew, term, trunc, info = self.env.step(actions[AGENT])
            if term or trunc:
                self.agents = []
            return {AGENT: obs}, {AGENT: rew}, {AGENT: term}, {AGENT: trunc}, {AGENT: info}

        def render(self) -> Any:
            return self.env.render()

        def close(self) -> None:
            self.env.close()

    return GymAsParallel()


def gym_ids() -> list[str]:
    """Registered Gymnasium environment ids."""
    try:
        import gymnasium
    except ImportError:
        return []
    return sorted(gymnasium.envs.registry.keys())


def check_gym_id(env_id: str) -> None:
    """``ValueError`` (with similar ids) unless Gymnasium has ``env_id`` registered."""
    try:
        import gymnasium
    except ImportError as err:
        raise missing_package("gymnasium", "gymnasium", "gym") from err
    if env_id not in gymnasium.envs.registry:
        close = [i for i in gym_ids() if env_id.lower().split("-")[0] in i.lower()][:10]
        raise ValueError(
            f"unknown Gymnasium env id {env_id!r}; e.g. gym/CartPole-v1, gym/Pendulum-v1"
            + (f"; similar ids: {', '.join(close)}" if close else "")
        )


def make_gym_env(
    env_id: str, *, num_envs: int, device: torch.device, seed: int | None, **env_kwargs: Any
) -> MultiAgentEnv:
    """Build ``num_envs`` copies of Gymnasium env ``env_id`` as the one-agent group ``agents``."""
    check_gym_id(env_id)
    env_kwargs.setdefault("render_mode", "rgb_array")
    from .pettingzoo import make_pettingzoo_env

    env = make_pettingzoo_env(
        lambda: _gym_as_parallel(env_id, **env_kwargs), num_envs=num_envs, device=device, seed=seed
    )
    env._marl_name = f"gym/{env_id}"
    return env
