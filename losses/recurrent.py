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

:func:`estimate_advantages` is GAE for the PPO / A2C losses, exact with a recurrent value critic in the same
way: each next observation valued from the state after its own step.

The loss returns ``loss`` and writes the squared TD error at ``(g, "td_error")`` (IQL, per agent) or
``(TEAM, "td_error")`` (VDN / QMIX), zero on burn-in steps, for sequence priorities.
"""

from __future__ import annotations

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, TensorDictParams
from torch import nn
from torchrl.modules import QMixer, VDNMixer
from torchrl.objectives import LossModule
from torchrl.objectives.value import GAE
from torchrl.objectives.utils import distance_loss

from marlkit.modules import RecurrentModule

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
        key, net = (g, "action_value"), self.value_network
        with self.value_network_params.to_module(net):
            q, next_online = net.along_with_next(tensordict, key)
        chosen = q.gather(-1, tensordict.get((g, "action")).long().unsqueeze(-1))  # [N, T, n, 1]
        with torch.no_grad():
            with self.target_value_network_params.to_module(net):
                _, next_target = net.along_with_next(tensordict, key)
            chooser = next_online if self.double_dqn else next_target
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


def estimate_advantages(loss: LossModule, batch: TensorDictBase) -> None:
    """GAE over a collected ``[envs, time]`` batch with the PPO / A2C ``loss``'s own estimator; a recurrent
    critic's values come from :meth:`RecurrentModule.along_with_next` (each step from the state it had while
    collecting, each next observation from the state after its step), then the same GAE runs on them."""
    critic, estimator = loss.critic_network, loss.value_estimator
    if not isinstance(critic, RecurrentModule):
        estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
        return
    keys = estimator.tensor_keys
    with torch.no_grad(), loss.critic_network_params.to_module(critic):
        value, next_value = critic.along_with_next(batch, keys.value)
    batch.set(keys.value, value)
    batch.set(("next", *keys.value), next_value)
    on_values = GAE(gamma=estimator.gamma, lmbda=estimator.lmbda, value_network=None, average_gae=estimator.average_gae)
    on_values.set_keys(**{name: getattr(keys, name) for name in
                          ("advantage", "value_target", "value", "reward", "done", "terminated")})
    on_values(batch)


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
