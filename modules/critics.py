"""Critics per group: state values (PPO) and Q(observation, action) (DDPG, SAC), local, centralised over
the group, or over every group of a team."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import EnvBase

from .encoders import _mlp, _observation_encoder, group_spec, make_encoder


class _TeamCritic(nn.Module):
    """A critic over every agent of every team group, with one value per agent of its own group.

    Takes the observations (and, for Q critics, the actions) of each team group in turn, encodes each
    group's observations with its own encoder, flattens every group over its agents and concatenates
    them; the result ``[*B, features]`` is repeated for each of the ``n_agents`` agents of the group
    the critic belongs to, and the ``MultiAgentMLP`` gives each of them its own value of the team state.
    """

    def __init__(self, encoders: Sequence[nn.Module], mlp: nn.Module, n_agents: int, with_actions: bool):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.mlp = mlp
        self.n_agents, self.with_actions = n_agents, with_actions

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        step = 2 if self.with_actions else 1
        parts = []
        for index, encoder in enumerate(self.encoders):
            features = encoder(inputs[step * index])
            if self.with_actions:
                features = torch.cat([features, inputs[step * index + 1].to(torch.float32)], dim=-1)
            parts.append(features.flatten(-2))
        team = torch.cat(parts, dim=-1)
        return self.mlp(team.unsqueeze(-2).expand(*team.shape[:-1], self.n_agents, team.shape[-1]))


def _team_critic(
    env: EnvBase,
    team: Sequence[str],
    out_key: tuple[str, str],
    *,
    with_actions: bool,
    num_cells: Sequence[int],
    activation: str,
    share_params: bool,
    device: torch.device | str | None,
) -> TensorDictModule:
    """A critic for ``team[0]`` over the observations (and actions) of every group of ``team``."""
    device = env.device if device is None else device
    encoders, features = [], 0
    for member in team:
        obs_spec = group_spec(env, member, "observation")
        n_member = obs_spec.shape[0]
        encoder, member_features = make_encoder(obs_spec, n_member, share_params=share_params, device=device)
        if with_actions:
            member_features += group_spec(env, member, "action").shape[-1]
        encoders.append(encoder)
        features += n_member * member_features
    n_agents = group_spec(env, team[0], "observation").shape[0]
    mlp = _mlp(features, 1, n_agents, centralised=False, share_params=share_params, num_cells=num_cells,
               activation=activation, device=device)
    keys = [(member, key) for member in team for key in (("observation", "action") if with_actions else ("observation",))]
    return TensorDictModule(_TeamCritic(encoders, mlp, n_agents, with_actions), in_keys=keys, out_keys=[out_key])


def make_value_critic(
    env: EnvBase,
    group: str,
    *,
    centralised: bool,
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    device: torch.device | str | None = None,
    team: Sequence[str] | None = None,
) -> TensorDictModule:
    """State-value network for one group: ``(group, "observation")`` -> ``(group, "state_value")``.

    ``centralised=True`` (MAPPO) lets every agent's value see all agents' observations of the group;
    ``False`` (IPPO) sees only its own. ``team`` (groups, ``group`` first) widens a centralised critic
    to every group of the team: it then reads ``(g, "observation")`` for each ``g`` of the team.
    """
    if centralised and team is not None and len(team) > 1:
        return _team_critic(env, team, (group, "state_value"), with_actions=False, num_cells=num_cells,
                            activation=activation, share_params=share_params, device=device)
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    mlp = _mlp(features, 1, n_agents, centralised=centralised, share_params=share_params,
               num_cells=num_cells, activation=activation, device=device)
    return TensorDictModule(
        nn.Sequential(encoder, mlp),
        in_keys=[(group, "observation")],
        out_keys=[(group, "state_value")],
    )


class _ObservationActionNet(nn.Module):
    """Q network body: encode each agent's observation, append its action, then the MLP."""

    def __init__(self, encoder: nn.Module, mlp: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.mlp = mlp

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.encoder(observation), action.to(torch.float32)], dim=-1))


def make_q_critic(
    env: EnvBase,
    group: str,
    *,
    centralised: bool,
    team: Sequence[str] | None = None,
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    device: torch.device | str | None = None,
) -> TensorDictModule:
    """Q(observation, action) for one group -> ``(group, "state_action_value")``.

    ``centralised=True`` (MADDPG, MASAC) gives each agent's Q all the group's observations and
    actions; ``False`` (IDDPG, ISAC) only its own. ``team`` (groups, ``group`` first) widens a
    centralised critic to the observations and actions ``(g, "observation")``, ``(g, "action")`` of
    every group of the team.
    """
    if centralised and team is not None and len(team) > 1:
        return _team_critic(env, team, (group, "state_action_value"), with_actions=True, num_cells=num_cells,
                            activation=activation, share_params=share_params, device=device)
    action_spec = group_spec(env, group, "action")
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    mlp = _mlp(features + action_spec.shape[-1], 1, n_agents, centralised=centralised,
               share_params=share_params, num_cells=num_cells, activation=activation, device=device)
    return TensorDictModule(
        _ObservationActionNet(encoder, mlp),
        in_keys=[(group, "observation"), (group, "action")],
        out_keys=[(group, "state_action_value")],
    )
