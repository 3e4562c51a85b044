"""Actor and critic factories shared by notebooks and pipelines.

Every size comes from the env's specs. For a group ``g``:

* :func:`make_stochastic_actor` reads ``(g, "observation")`` (and ``(g, "action_mask")`` when the env
  gives one) and writes ``(g, "action")`` and ``(g, "action_log_prob")``, plus the distribution
  parameters ``(g, "loc")``/``(g, "scale")`` (continuous) or ``(g, "logits")`` (discrete).
* :func:`make_deterministic_actor` (DDPG) reads ``(g, "observation")`` and writes ``(g, "param")``
  and ``(g, "action")`` (a ``TanhDelta`` within the action bounds).
* :func:`make_value_critic` reads ``(g, "observation")`` and writes ``(g, "state_value")``.
* :func:`make_q_critic` reads ``(g, "observation")`` and ``(g, "action")`` and writes
  ``(g, "state_action_value")``.
* :func:`make_q_network` (IQL, VDN, QMIX) reads ``(g, "observation")`` (and ``(g, "action_mask")``)
  and writes ``(g, "action_value")``, the greedy ``(g, "action")`` and ``(g, "chosen_action_value")``.
* :mod:`marlkit.modules.exploration` holds the exploration modules composed after a policy
  (:class:`GaussianNoise`, :class:`EpsilonGreedy`), annealed explicitly by frame count.

Observations of any shape work: vectors go straight to a ``MultiAgentMLP``, images (``H x W x C``
with ``C <= 4``, as in pistonball or pursuit) go through a ``MultiAgentConvNet`` first, anything else
is flattened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.data import Bounded, Categorical, OneHot, TensorSpec
from torchrl.envs import EnvBase
from torchrl.modules import (
    IndependentNormal,
    TanhDelta,
    MaskedCategorical,
    MaskedOneHotCategorical,
    MultiAgentConvNet,
    MultiAgentMLP,
    OneHotCategorical,
    ProbabilisticActor,
    QValueModule,
    TanhNormal,
)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

__all__ = [
    "ACTIVATIONS",
    "EpsilonGreedy",
    "GaussianNoise",
    "activation_class",
    "continuous_action_bounds",
    "group_spec",
    "make_deterministic_actor",
    "make_encoder",
    "make_q_critic",
    "make_q_network",
    "make_stochastic_actor",
    "make_value_critic",
]


def activation_class(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class for an activation name, or ``ValueError`` listing the accepted ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; accepted: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def group_spec(env: EnvBase, group: str, key: str) -> TensorSpec:
    """The spec of ``(group, key)`` without the env's batch dims: shape ``[n_agents, *feature]``."""
    if key == "action":
        spec = env.full_action_spec[group, key]
    else:
        spec = env.full_observation_spec[group, key]
    for _ in env.batch_size:
        spec = spec[0]
    return spec


def _is_image(shape: torch.Size) -> bool:
    return len(shape) == 3 and shape[-1] <= 4 and shape[0] > 4 and shape[1] > 4


class _ImageToChannelsFirst(nn.Module):
    """``[*B, n_agents, H, W, C]`` (any dtype) -> ``[*B, n_agents, C, H, W]`` floats (uint8 / 255)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, -3).float() * self.scale


class _FlattenFeatures(nn.Module):
    """Flattens everything after the agent dim: ``[*B, n_agents, a, b]`` -> ``[*B, n_agents, a*b]``."""

    def __init__(self, feature_dims: int):
        super().__init__()
        self.feature_dims = feature_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.feature_dims).float()


def make_encoder(
    obs_spec: TensorSpec, n_agents: int, *, share_params: bool, device: torch.device | str = "cpu"
) -> tuple[nn.Module, int]:
    """Per-agent feature extractor for observations of ``obs_spec`` (shape ``[n_agents, *obs]``).

    Returns the module and its per-agent output size. Images get a ``MultiAgentConvNet`` (strided
    Atari-style layers for large frames, 3x3 convolutions for small local views).
    """
    shape = obs_spec.shape[1:]
    if len(shape) == 1:
        return nn.Identity(), shape[0]
    if _is_image(shape):
        height, width, channels = shape
        scale = 1.0 / 255.0 if obs_spec.dtype == torch.uint8 else 1.0
        if min(height, width) >= 36:
            conv_kwargs = dict(num_cells=[32, 64, 64], kernel_sizes=[8, 4, 3], strides=[4, 2, 1])
        else:
            conv_kwargs = dict(num_cells=[32, 32], kernel_sizes=3, strides=1)
        conv = MultiAgentConvNet(
            n_agents=n_agents,
            centralized=False,
            share_params=share_params,
            in_features=channels,
            activation_class=nn.ReLU,
            device=device,
            **conv_kwargs,
        )
        encoder = nn.Sequential(_ImageToChannelsFirst(scale), conv)
        with torch.no_grad():
            probe = torch.zeros(1, n_agents, height, width, channels, device=device)
            out_features = encoder(probe).shape[-1]
        return encoder, out_features
    encoder = _FlattenFeatures(len(shape))
    return encoder, int(torch.Size(shape).numel())


def _observation_encoder(
    env: EnvBase, group: str, share_params: bool, device: torch.device | str | None
) -> tuple[torch.device | str, int, nn.Module, int]:
    """What every factory starts from: the device, the group's agent count and its encoder."""
    device = env.device if device is None else device
    obs_spec = group_spec(env, group, "observation")
    n_agents = obs_spec.shape[0]
    encoder, features = make_encoder(obs_spec, n_agents, share_params=share_params, device=device)
    return device, n_agents, encoder, features


def _mlp(
    in_features: int,
    out_features: int,
    n_agents: int,
    *,
    centralised: bool,
    share_params: bool,
    num_cells: Sequence[int],
    activation: str,
    device: torch.device | str,
) -> MultiAgentMLP:
    return MultiAgentMLP(
        n_agent_inputs=in_features,
        n_agent_outputs=out_features,
        n_agents=n_agents,
        centralized=centralised,
        share_params=share_params,
        num_cells=list(num_cells),
        activation_class=activation_class(activation),
        device=device,
    )


def make_stochastic_actor(
    env: EnvBase,
    group: str,
    *,
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    device: torch.device | str | None = None,
) -> ProbabilisticActor:
    """Stochastic policy for one group, with the distribution chosen from the action spec.

    Continuous boxes get a ``TanhNormal`` within the action bounds (``IndependentNormal`` when
    unbounded); discrete actions get a categorical over indices or one-hot vectors, whichever the
    env uses, masked by ``(group, "action_mask")`` when the env provides it.
    """
    action_spec = group_spec(env, group, "action")
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    has_mask = (group, "action_mask") in env.full_observation_spec.keys(True, True)

    def net(out_features: int) -> MultiAgentMLP:
        return _mlp(features, out_features, n_agents, centralised=False, share_params=share_params,
                    num_cells=num_cells, activation=activation, device=device)

    if isinstance(action_spec, (Categorical, OneHot)):
        one_hot = isinstance(action_spec, OneHot)
        n_actions = action_spec.shape[-1] if one_hot else action_spec.space.n
        if not one_hot and action_spec.shape != torch.Size([n_agents]):
            raise ValueError(
                f"group {group!r}: multi-dimensional discrete actions {tuple(action_spec.shape)} are "
                "not supported; use one discrete action per agent"
            )
        module = TensorDictModule(
            nn.Sequential(encoder, net(n_actions)), in_keys=[(group, "observation")],
            out_keys=[(group, "logits")],
        )
        in_keys = {"logits": (group, "logits")}
        if has_mask:
            in_keys["mask"] = (group, "action_mask")
            dist = MaskedOneHotCategorical if one_hot else MaskedCategorical
        else:
            dist = OneHotCategorical if one_hot else torch.distributions.Categorical
        dist_kwargs = {}
    elif len(action_spec.shape) == 2:
        action_dim = action_spec.shape[-1]
        module = TensorDictModule(
            nn.Sequential(encoder, net(2 * action_dim), NormalParamExtractor()),
            in_keys=[(group, "observation")],
            out_keys=[(group, "loc"), (group, "scale")],
        )
        in_keys = {"loc": (group, "loc"), "scale": (group, "scale")}
        if isinstance(action_spec, Bounded):
            dist = TanhNormal
            dist_kwargs = {"low": action_spec.space.low.to(device), "high": action_spec.space.high.to(device)}
        else:
            dist, dist_kwargs = IndependentNormal, {}
    else:
        raise ValueError(
            f"group {group!r}: action spec {type(action_spec).__name__} of shape "
            f"{tuple(action_spec.shape)} is not supported (expected a box or a discrete action)"
        )
    return ProbabilisticActor(
        module=module,
        spec=env.full_action_spec[group, "action"],
        in_keys=in_keys,
        out_keys=[(group, "action")],
        distribution_class=dist,
        distribution_kwargs=dist_kwargs,
        return_log_prob=True,
    )


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


def continuous_action_bounds(env: EnvBase, group: str, algorithm: str) -> Bounded:
    """The group's bounded continuous action spec, or a ``ValueError`` saying which algorithms fit."""
    spec = group_spec(env, group, "action")
    if isinstance(spec, (Categorical, OneHot)):
        raise ValueError(
            f"{algorithm} needs continuous actions; group {group!r} of {getattr(env, 'env_name', 'this env')} "
            "has discrete actions: use algorithm=mappo, iql or qmix, or set env.continuous_actions=true "
            "where the env supports it"
        )
    if not isinstance(spec, Bounded):
        raise ValueError(f"{algorithm} needs bounded continuous actions; group {group!r} has {type(spec).__name__}")
    return spec


def make_deterministic_actor(
    env: EnvBase,
    group: str,
    *,
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    device: torch.device | str | None = None,
) -> ProbabilisticActor:
    """Deterministic policy for one group: ``MultiAgentMLP`` -> ``TanhDelta`` within the action bounds."""
    action_spec = continuous_action_bounds(env, group, "a deterministic actor")
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    mlp = _mlp(features, action_spec.shape[-1], n_agents, centralised=False, share_params=share_params,
               num_cells=num_cells, activation=activation, device=device)
    module = TensorDictModule(
        nn.Sequential(encoder, mlp), in_keys=[(group, "observation")], out_keys=[(group, "param")]
    )
    return ProbabilisticActor(
        module=module,
        spec=env.full_action_spec[group, "action"],
        in_keys=[(group, "param")],
        out_keys=[(group, "action")],
        distribution_class=TanhDelta,
        distribution_kwargs={"low": action_spec.space.low.to(device), "high": action_spec.space.high.to(device)},
        return_log_prob=False,
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
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    device: torch.device | str | None = None,
    team: Sequence[str] | None = None,
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


def discrete_actions(env: EnvBase, group: str, algorithm: str) -> int:
    """The group's number of discrete actions, or a ``ValueError`` saying which algorithms fit."""
    spec = group_spec(env, group, "action")
    if isinstance(spec, OneHot):
        return spec.shape[-1]
    if isinstance(spec, Categorical) and spec.shape == spec.shape[:1]:
        return spec.space.n
    raise ValueError(
        f"{algorithm} needs one discrete action per agent; group {group!r} of "
        f"{getattr(env, 'env_name', 'this env')} has {type(spec).__name__} actions of shape "
        f"{tuple(spec.shape)}: use algorithm=maddpg, masac or mappo, or set env.continuous_actions=false "
        "where the env supports it"
    )


class _DuelingHead(nn.Module):
    """Q = V + A - mean(A) from an MLP output of size ``n_actions + 1`` (value first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, advantage = x[..., :1], x[..., 1:]
        return value + advantage - advantage.mean(-1, keepdim=True)


def make_q_network(
    env: EnvBase,
    group: str,
    *,
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    dueling: bool = False,
    device: torch.device | str | None = None,
    algorithm: str = "Q-learning",
) -> TensorDictSequential:
    """Per-agent action values and the greedy action for one group (masked when the env gives masks)."""
    n_actions = discrete_actions(env, group, algorithm)
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    mlp = _mlp(features, n_actions + int(dueling), n_agents, centralised=False, share_params=share_params,
               num_cells=num_cells, activation=activation, device=device)
    layers = [encoder, mlp, _DuelingHead()] if dueling else [encoder, mlp]
    values = TensorDictModule(nn.Sequential(*layers), in_keys=[(group, "observation")],
                              out_keys=[(group, "action_value")])
    has_mask = (group, "action_mask") in env.full_observation_spec.keys(True, True)
    one_hot = isinstance(group_spec(env, group, "action"), OneHot)
    greedy = QValueModule(
        action_space="one_hot" if one_hot else "categorical",
        action_value_key=(group, "action_value"),
        action_mask_key=(group, "action_mask") if has_mask else None,
        out_keys=[(group, "action"), (group, "action_value"), (group, "chosen_action_value")],
        spec=group_spec(env, group, "action")[0],  # one agent's: checked against the group's batch
    )
    return TensorDictSequential(values, greedy)


from .exploration import EpsilonGreedy, GaussianNoise  # noqa: E402  (kept last: needs nothing above)
