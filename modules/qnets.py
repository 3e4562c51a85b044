"""Q networks per group for value-based learning (IQL, VDN, QMIX): action values and the greedy action."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.data import Categorical, OneHot
from torchrl.envs import EnvBase
from torchrl.modules import QValueModule

from .encoders import _mlp, _observation_encoder, group_spec
from .recurrent import MultiAgentRecurrent, RECURRENT_KINDS, RecurrentModule


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
    flatten_images: bool = False,
    kind: str = "mlp",
) -> TensorDictSequential:
    """Per-agent action values and the greedy action for one group (masked when the env gives masks;
    image observations through a conv net, or flat into the MLP with ``flatten_images``).

    ``kind``: ``mlp``, or ``gru`` / ``lstm`` for agents with memory (DRQN: the first module is then a
    :class:`.recurrent.RecurrentModule`, and the env needs :func:`.recurrent.state_primer`)."""
    n_actions = discrete_actions(env, group, algorithm)
    device, n_agents, encoder, features = _observation_encoder(env, group, share_params, device, flatten_images)
    head = _DuelingHead() if dueling else None
    if kind in RECURRENT_KINDS:
        net = MultiAgentRecurrent(kind, features, n_actions + int(dueling), n_agents, num_cells=num_cells,
                                  activation=activation, share_params=share_params, device=device)
        values = RecurrentModule(net, encoder, group, [(group, "action_value")], head)
    elif kind == "mlp":
        mlp = _mlp(features, n_actions + int(dueling), n_agents, centralised=False, share_params=share_params,
                   num_cells=num_cells, activation=activation, device=device)
        values = TensorDictModule(nn.Sequential(encoder, mlp, *([head] if head else [])), in_keys=[(group, "observation")],
                                  out_keys=[(group, "action_value")])
    else:
        raise ValueError(f"Q networks are mlp, gru or lstm; got kind={kind!r}")
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
