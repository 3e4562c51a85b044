"""Recurrent Q-learning on sequences: DRQN (Hausknecht & Stone 2015) for IQL, VDN and QMIX.

:func:`make_drqn_loss` for group ``g`` learns from minibatches of trajectory slices ``[sequences, time]``
(see :class:`marlkit.pipelines.replay.SequenceReplay`), each holding, per step, ``(g, "observation")``,
``(g, "action")``, the agents' state before the step ``(g, "rnn_state")``, ``step_count`` and the
``("next", g, ...)`` observation, reward, done and terminated entries (VDN / QMIX: the team entries of
:func:`marlkit.losses.team_entries` and the mixer's state, the env's ``state`` or the group's
observations).

* The online Q network runs over each slice from the state stored at its first step, restarting from
  zeros where a new episode begins inside the slice (R2D2's stored state, Kapturowski et al. 2019).
* The first ``burn_in`` steps of a slice only warm the state up; the loss covers the rest.
* The TD target of step ``t`` is the next observation's value from the state after step ``t``: the
  target network runs over the same slice from the same stored state, then one more step on each next
  observation. So a slice may cross an episode boundary, a truncated episode bootstraps from its own
  last observation, and the target network sees exactly the history the online one does.
* Double-Q (IQL's ``double_dqn``): the online network, stepped the same way, picks the next action.
* VDN / QMIX mix the agents' chosen values at every step of the slice (TorchRL's ``VDNMixer`` /
  ``QMixer``), the target mixer their next values, against the team reward.

The loss returns ``loss`` and writes the squared TD error at ``(g, "td_error")`` (IQL, per agent) or
``(TEAM, "td_error")`` (VDN / QMIX), zero on burn-in steps, for sequence priorities.
"""

from __future__ import annotations

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, TensorDictParams
from torch import nn
from torchrl.modules import QMixer, VDNMixer
from torchrl.objectives import LossModule
from torchrl.objectives.utils import distance_loss

from marlkit.modules import RecurrentModule
from marlkit.modules.recurrent import STATE_KEY

from ._common import check_td_settings, MIXERS, TEAM


class DRQNLoss(LossModule):
    """TD(0) loss of a recurrent Q network (and a mixer for VDN / QMIX) over trajectory slices."""

    value_network: RecurrentModule
    value_network_params: TensorDictParams
    target_value_network_params: TensorDictParams
    mixer_network: nn.Module
    mixer_network_params: TensorDictParams
    target_mixer_network_params: TensorDictParams

    def __init__(self, q_values: RecurrentModule, group: str, *, mixer: nn.Module | None, state_key: NestedKey | None,
                 gamma: float, loss_function: str, double_dqn: bool, burn_in: int):
        super().__init__()
        self.group, self.state_key, self.gamma = group, state_key, gamma
        self.loss_function, self.double_dqn, self.burn_in = loss_function, double_dqn, burn_in
        self.convert_to_functional(q_values, "value_network", create_target_params=True)
        self.has_mixer = mixer is not None
        if mixer is not None:
            self.convert_to_functional(mixer, "mixer_network", create_target_params=True)
        self.priority_key = (TEAM, "td_error") if self.has_mixer else (group, "td_error")

    def _unroll(self, data: TensorDictBase, params: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """Action values ``[N, T, n, A]`` over the slices and the states after each step ``[N, T, n, S]``."""
        g = self.group
        td = data.select((g, "observation"), (g, STATE_KEY), "step_count").clone(False)
        with params.to_module(self.value_network):
            self.value_network(td)
        return td.get((g, "action_value")), td.get(("next", g, STATE_KEY))

    def _next_values(self, data: TensorDictBase, states: torch.Tensor, params: TensorDictBase) -> torch.Tensor:
        """Action values of every next observation, each from the state after its own step: one batched step."""
        g, (n, t) = self.group, data.batch_size
        step = TensorDict({g: {"observation": data.get(("next", g, "observation")).flatten(0, 1),
                               STATE_KEY: states.flatten(0, 1)}}, batch_size=[n * t])
        with params.to_module(self.value_network):
            self.value_network(step)
        return step.get((g, "action_value")).unflatten(0, (n, t))

    def _mix(self, chosen: torch.Tensor, data: TensorDictBase, params: TensorDictBase, next_: bool) -> torch.Tensor:
        inputs = [chosen]
        if self.mixer_network.needs_state:
            key = ("next", self.state_key) if isinstance(self.state_key, str) else ("next", *self.state_key)
            inputs.append(data.get(key if next_ else self.state_key))
        with params.to_module(self.mixer_network):
            return self.mixer_network(*inputs)

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        g = self.group
        if tensordict.batch_dims != 2:
            raise ValueError(f"DRQNLoss takes [sequences, time] minibatches, got {tuple(tensordict.batch_size)}")
        q, states = self._unroll(tensordict, self.value_network_params)
        action = tensordict.get((g, "action")).long().unsqueeze(-1)
        chosen = q.gather(-1, action)  # [N, T, n, 1]
        with torch.no_grad():
            _, target_states = self._unroll(tensordict, self.target_value_network_params)
            next_target = self._next_values(tensordict, target_states, self.target_value_network_params)
            chooser = self._next_values(tensordict, states, self.value_network_params) if self.double_dqn else next_target
            mask_key = ("next", g, "action_mask")
            if mask_key in tensordict.keys(True):
                chooser = chooser.masked_fill(~tensordict.get(mask_key), -torch.inf)
            next_value = next_target.gather(-1, chooser.argmax(-1, keepdim=True))  # [N, T, n, 1]
        if self.has_mixer:
            predicted = self._mix(chosen, tensordict, self.mixer_network_params, next_=False)  # [N, T, 1]
            with torch.no_grad():
                next_value = self._mix(next_value, tensordict, self.target_mixer_network_params, next_=True)
            reward, terminated = tensordict.get(("next", TEAM, "reward")), tensordict.get(("next", TEAM, "terminated"))
        else:
            predicted = chosen
            reward, terminated = tensordict.get(("next", g, "reward")), tensordict.get(("next", g, "terminated"))
        target = reward + self.gamma * (~terminated).to(reward.dtype) * next_value
        trained = torch.zeros(tensordict.batch_size, dtype=predicted.dtype, device=predicted.device)
        trained[:, self.burn_in:] = 1.0
        trained = trained.view(*trained.shape, *([1] * (predicted.ndim - 2)))  # over the agent / value dims
        weight = trained
        if "priority_weight" in tensordict.keys():  # importance weights, one per slice ([N] or repeated [N, T])
            importance = tensordict.get("priority_weight")
            weight = weight * importance.reshape(*importance.shape, *([1] * (predicted.ndim - importance.ndim)))
        error = distance_loss(predicted, target.detach(), self.loss_function)
        loss = (error * weight).sum() / trained.expand_as(predicted).sum()
        tensordict.set(self.priority_key, (predicted - target).detach().pow(2) * trained)
        return TensorDict({"loss": loss}, [])


def make_drqn_loss(q_values: RecurrentModule, group: str, *, n_agents: int, mixer: str | None = None,
                   state_key: NestedKey | None = None, state_shape: tuple[int, ...] = (), gamma: float = 0.99,
                   loss_function: str = "l2", double_dqn: bool = True, burn_in: int = 0,
                   mixing_embed_dim: int = 32) -> DRQNLoss:
    """DRQN for one group: independent (``mixer=None``, IQL) or mixed by ``"vdn"`` / ``"qmix"`` (the latter
    reading ``state_key`` of shape ``state_shape``); ``burn_in`` leading steps of each slice only warm up."""
    check_td_settings(loss_function, gamma)
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    net = None
    if mixer is not None:
        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r} is not supported; accepted: {list(MIXERS)}")
        if n_agents < 2:
            raise ValueError(f"{mixer} mixes the values of several agents; group {group!r} has {n_agents}: use algorithm=iql")
        device = next(q_values.parameters()).device
        net = (VDNMixer(n_agents=n_agents, device=device) if mixer == "vdn" else
               QMixer(state_shape=state_shape, mixing_embed_dim=mixing_embed_dim, n_agents=n_agents, device=device))
    return DRQNLoss(q_values, group, mixer=net, state_key=state_key, gamma=gamma, loss_function=loss_function,
                    double_dqn=double_dqn, burn_in=burn_in)
