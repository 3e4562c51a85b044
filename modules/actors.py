"""Policies per group: stochastic (PPO, SAC) with the distribution chosen from the action spec, and
deterministic (DDPG) within the action bounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule, TensorDictModuleBase
from torch import nn
from torchrl.data import Bounded, Categorical, OneHot
from torchrl.envs import EnvBase
from torchrl.modules import (
    IndependentNormal,
    MaskedCategorical,
    MaskedOneHotCategorical,
    OneHotCategorical,
    ProbabilisticActor,
    TanhDelta,
    TanhNormal,
)

from .comm import agent_net
from .encoders import _observation_encoder, group_spec
from .recurrent import MultiAgentRecurrent, RECURRENT_KINDS, RecurrentModule


def make_stochastic_actor(
    env: EnvBase,
    group: str,
    *,
    num_cells: Sequence[int] = (256, 256),
    activation: str = "tanh",
    share_params: bool = True,
    device: torch.device | str | None = None,
    kind: str = "mlp",
    **net_options: Any,
) -> ProbabilisticActor:
    """Stochastic policy for one group, with the distribution chosen from the action spec.

    ``kind``: the network (``mlp``; ``commnet``, ``attention``, ``deepsets``, ``gnn``, whose agents
    exchange learned messages, ``net_options`` such as ``comm_rounds`` going to :func:`.comm.agent_net`;
    or ``gru`` / ``lstm``, agents with memory, see :mod:`.recurrent`: the env then needs
    :func:`.recurrent.state_primer`).

    Continuous boxes get a ``TanhNormal`` within the action bounds (``IndependentNormal`` when
    unbounded); discrete actions get a categorical over indices or one-hot vectors, whichever the
    env uses, masked by ``(group, "action_mask")`` when the env provides it.
    """
    action_spec = group_spec(env, group, "action")
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    has_mask = (group, "action_mask") in env.full_observation_spec.keys(True, True)

    def body(out_features: int, out_keys: list, post: nn.Module | None = None) -> TensorDictModuleBase:
        """observation -> the distribution's parameters, through the chosen network."""
        if kind in RECURRENT_KINDS:
            net = MultiAgentRecurrent(kind, features, out_features, n_agents, num_cells=num_cells, activation=activation,
                                      share_params=share_params, device=device)
            return RecurrentModule(net, encoder, group, out_keys, post)
        layers = [encoder, agent_net(kind, features, out_features, n_agents, centralised=False, share_params=share_params,
                                     num_cells=num_cells, activation=activation, device=device, **net_options)]
        return TensorDictModule(nn.Sequential(*layers, *([post] if post is not None else [])),
                                in_keys=[(group, "observation")], out_keys=out_keys)

    if isinstance(action_spec, (Categorical, OneHot)):
        one_hot = isinstance(action_spec, OneHot)
        n_actions = action_spec.shape[-1] if one_hot else action_spec.space.n
        if not one_hot and action_spec.shape != torch.Size([n_agents]):
            raise ValueError(
                f"group {group!r}: multi-dimensional discrete actions {tuple(action_spec.shape)} are "
                "not supported; use one discrete action per agent"
            )
        module = body(n_actions, [(group, "logits")])
        in_keys = {"logits": (group, "logits")}
        if has_mask:
            in_keys["mask"] = (group, "action_mask")
            dist = MaskedOneHotCategorical if one_hot else MaskedCategorical
        else:
            dist = OneHotCategorical if one_hot else torch.distributions.Categorical
        dist_kwargs = {}
    elif len(action_spec.shape) == 2:
        action_dim = action_spec.shape[-1]
        module = body(2 * action_dim, [(group, "loc"), (group, "scale")], NormalParamExtractor())
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
    kind: str = "mlp",
    **net_options: Any,
) -> ProbabilisticActor:
    """Deterministic policy for one group: its network (``kind`` as :func:`make_stochastic_actor`) ->
    ``TanhDelta`` within the action bounds."""
    action_spec = continuous_action_bounds(env, group, "a deterministic actor")
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device)
    mlp = agent_net(kind, features, action_spec.shape[-1], n_agents, centralised=False, share_params=share_params,
                    num_cells=num_cells, activation=activation, device=device, **net_options)
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
