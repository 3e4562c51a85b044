"""Critics per group: state values (PPO) and Q(observation, action) (DDPG, SAC), local, centralised over
the group, or over every group of a team; COMA's counterfactual critic and QTRAN's joint networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torch import nn
from torchrl.envs import EnvBase

from torchrl.modules import MLP

from .encoders import _mlp, _observation_encoder, action_indices, activation_class, group_spec, make_encoder
from .qnets import discrete_actions
from .recurrent import CRITIC_STATE_KEY, MultiAgentRecurrent, RECURRENT_KINDS, RecurrentModule


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
    kind: str = "mlp",
) -> TensorDictModuleBase:
    """State-value network for one group: ``(group, "observation")`` -> ``(group, "state_value")``.

    ``centralised=True`` (MAPPO) lets every agent's value see all agents' observations of the group;
    ``False`` (IPPO) sees only its own. ``team`` (groups, ``group`` first) widens a centralised critic
    to every group of the team: it then reads ``(g, "observation")`` for each ``g`` of the team.
    ``kind``: ``mlp``, or ``gru`` / ``lstm``: a recurrent critic (:class:`.recurrent.RecurrentModule`) with
    its own state at ``(group, "critic_rnn_state")`` (the env needs its :func:`.recurrent.state_primer`).
    """
    if centralised and team is not None and len(team) > 1:
        if kind != "mlp":
            raise ValueError(f"a recurrent critic ({kind}) reads one group's observations; the team {list(team)} needs "
                             "an MLP team critic: set model.critic_kind=mlp (the actors may stay recurrent)")
        return _team_critic(env, team, (group, "state_value"), with_actions=False, num_cells=num_cells,
                            activation=activation, share_params=share_params, device=device)
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    if kind in RECURRENT_KINDS:
        net = MultiAgentRecurrent(kind, features, 1, n_agents, num_cells=num_cells, activation=activation,
                                  share_params=share_params, device=device, centralised=centralised)
        return RecurrentModule(net, encoder, group, [(group, "state_value")], state_key=CRITIC_STATE_KEY)
    if kind != "mlp":
        raise ValueError(f"critic kind {kind!r}; accepted: mlp, {', '.join(RECURRENT_KINDS)}")
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


def _flat_state(state: torch.Tensor, batch_dims: int) -> torch.Tensor:
    return state.reshape(*state.shape[:batch_dims], -1).to(torch.float32)


class ComaCritic(nn.Module):
    """COMA's critic: for each agent ``a``, the value of every action of ``a`` given the state, ``a``'s
    observation and identity, and the other agents' actions (``a``'s own action is hidden from it, so
    one forward pass gives the counterfactual values the advantage marginalises over)."""

    def __init__(self, mlp: nn.Module, n_agents: int, n_actions: int):
        super().__init__()
        self.mlp, self.n_agents, self.n_actions = mlp, n_agents, n_actions
        self.register_buffer("others", 1.0 - torch.eye(n_agents, device=next(mlp.parameters()).device))

    def forward(self, state: torch.Tensor, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        index = action_indices(action)  # [*B, n]
        batch = index.shape[:-1]
        one_hot = nn.functional.one_hot(index, self.n_actions).to(torch.float32)  # [*B, n, A]
        # row a holds every agent's one-hot action with agent a's own zeroed
        others = one_hot.unsqueeze(-3) * self.others[..., None]  # [*B, n, n, A]
        parts = [
            _flat_state(state, len(batch)).unsqueeze(-2).expand(*batch, self.n_agents, -1),
            observation.reshape(*batch, self.n_agents, -1).to(torch.float32),
            torch.eye(self.n_agents, device=index.device).expand(*batch, self.n_agents, self.n_agents),
            others.flatten(-2),
        ]
        return self.mlp(torch.cat(parts, dim=-1))


def make_coma_critic(
    env: EnvBase,
    group: str,
    *,
    state_key: tuple[str, ...] | str,
    num_cells: Sequence[int] = (128, 128),
    activation: str = "relu",
    share_params: bool = True,
    device: torch.device | str | None = None,
) -> TensorDictModule:
    """COMA's centralised critic for one group (discrete actions): reads ``state_key`` (the env's
    ``"state"``, or the group's observations when it has none), ``(group, "observation")`` and
    ``(group, "action")``; writes ``(group, "action_value")``, ``[*B, n_agents, n_actions]``: Q(s, (u_-a, u))
    for every action ``u`` of each agent ``a``."""
    device = env.device if device is None else device
    n_actions = discrete_actions(env, group, "coma")
    obs_spec = group_spec(env, group, "observation")
    n_agents = obs_spec.shape[0]
    state_spec = env.full_observation_spec[state_key]
    state_dim = int(state_spec.shape[len(env.batch_size):].numel())
    features = state_dim + int(obs_spec.shape[1:].numel()) + n_agents + n_agents * n_actions
    mlp = _mlp(features, n_actions, n_agents, centralised=False, share_params=share_params, num_cells=num_cells,
               activation=activation, device=device)
    return TensorDictModule(ComaCritic(mlp, n_agents, n_actions),
                            in_keys=[state_key, (group, "observation"), (group, "action")],
                            out_keys=[(group, "action_value")])


class QTranJoint(nn.Module):
    """QTRAN-base's joint networks for one group: the joint action value ``Q_jt(s, u)`` and the state
    value ``V(s)``.

    Every agent's (identity, action) pair is embedded by one shared MLP and the embeddings are summed
    (QTRAN's joint-action encoding); ``Q_jt`` reads the state with that sum, ``V`` the state alone.
    """

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, num_cells: Sequence[int], activation: str,
                 device: torch.device | str):
        super().__init__()
        act = activation_class(activation)
        width = num_cells[-1] if num_cells else 64
        self.n_agents, self.n_actions = n_agents, n_actions
        self.embed = MLP(in_features=n_agents + n_actions, out_features=width, num_cells=[width],
                         activation_class=act, device=device)
        self.q = MLP(in_features=state_dim + width, out_features=1, num_cells=list(num_cells), activation_class=act,
                     device=device)
        self.v = MLP(in_features=state_dim, out_features=1, num_cells=list(num_cells), activation_class=act,
                     device=device)

    def joint_value(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``Q_jt(s, u)``, ``[*B, 1]``, for actions ``[*B, n]`` (indices) or ``[*B, n, A]`` (one-hot)."""
        index = action_indices(action)
        batch = index.shape[:-1]
        pairs = torch.cat([torch.eye(self.n_agents, device=index.device).expand(*batch, self.n_agents, self.n_agents),
                           nn.functional.one_hot(index, self.n_actions).to(torch.float32)], dim=-1)
        return self.q(torch.cat([_flat_state(state, len(batch)), self.embed(pairs).sum(-2)], dim=-1))

    def state_value(self, state: torch.Tensor, batch_dims: int) -> torch.Tensor:
        """``V(s)``, ``[*B, 1]``."""
        return self.v(_flat_state(state, batch_dims))


def make_qtran_joint(
    env: EnvBase,
    group: str,
    *,
    state_shape: Sequence[int],
    num_cells: Sequence[int] = (64, 64),
    activation: str = "relu",
    device: torch.device | str | None = None,
) -> QTranJoint:
    """QTRAN's ``Q_jt`` and ``V`` for one group, sized from the env's specs and the state's shape."""
    device = env.device if device is None else device
    n_agents = group_spec(env, group, "observation").shape[0]
    return QTranJoint(int(torch.Size(state_shape).numel()), n_agents, discrete_actions(env, group, "qtran"),
                      num_cells, activation, device)
