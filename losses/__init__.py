"""Loss factories, each binding one group's TensorDict keys next to the objective.

:func:`make_ppo_loss` (MAPPO / IPPO: :class:`GroupPPOLoss`, TorchRL's ``ClipPPOLoss`` computed from the
networks' tensors, with GAE) for group ``g``:

* reads ``(g, "observation")``, ``(g, "action")``, ``(g, "action_log_prob")`` (from the collecting
  policy), ``("next", g, "reward")``, ``("next", g, "done")``, ``("next", g, "terminated")`` and
  ``("next", g, "observation")``;
* its value estimator (GAE, called once per batch) writes ``(g, "state_value")``,
  ``(g, "advantage")`` and ``(g, "value_target")``;
* the loss returns ``loss_objective``, ``loss_critic`` and ``loss_entropy`` (already weighted by
  their coefficients: their sum is the quantity to minimise) plus diagnostics (``entropy``,
  ``clip_fraction``, ``kl_approx``, ``explained_variance``);
* :func:`minibatch_keys` names the entries the losses read once the advantages are written, so
  minibatches gather nothing else.

:func:`make_happo_loss` (HAPPO) is the PPO loss with two more entry points for HAPPO's sequential
update: :meth:`HappoLoss.agent_terms` (one agent's clipped objective, its advantage weighted by the
product of the already-updated agents' ratios) and :meth:`HappoLoss.critic_terms` (the critic alone).

:func:`make_a2c_loss` (IAC / MAA2C, TorchRL's ``A2CLoss`` with GAE) binds the same keys and returns
the same three terms: the plain policy gradient ``-log pi(a|o) * advantage`` (no ratio, no clip).

:func:`make_ddpg_loss` (MADDPG / IDDPG) and :func:`make_sac_loss` (MASAC / ISAC) for group ``g``,
with a TD(0) target from target networks:

* read ``(g, "observation")``, ``(g, "action")``, ``("next", g, "observation")``,
  ``("next", g, "reward")``, ``("next", g, "done")``, ``("next", g, "terminated")``;
* write ``(g, "state_action_value")`` while computing, and return ``loss_actor`` and
  ``loss_value`` (DDPG) or ``loss_actor``, ``loss_qvalue`` and ``loss_alpha`` plus ``alpha`` and
  ``entropy`` (SAC). Each term only reaches its own network's parameters, so one optimiser over the
  loss's parameters on the sum of the terms is exact.

:func:`make_dqn_loss` (IQL: one DQN per agent, double-Q optional) reads ``(g, "observation")``,
``(g, "action")``, ``("next", g, ...)`` reward / done / terminated / observation, writes
``(g, "td_error")`` (per agent, for priorities) and returns ``loss``.

:func:`make_qmixer_loss` (VDN / QMIX) mixes the agents' chosen Q values into one team value at
``("team", "chosen_action_value")`` and learns it from the team reward ``("next", "team", "reward")``
and the episode flags ``("next", "team", "done" / "terminated")``; it returns ``loss`` and writes
``("team", "td_error")``. The mixer reads the global ``state`` when the env has one, else the
group's observations.

:func:`make_team_mixer_loss` does the same over the agents of several groups that form one team
(``env.teams``, e.g. speaker and listener): :class:`TeamValues` puts the groups' values side by side at
``(TEAM, "agent_action_value")`` / ``(TEAM, "agent_chosen_action_value")`` and their observations at
``(TEAM, "observation")``; it reads the actions at ``(TEAM, "agent_action")``. :func:`team_entries`
adds the team reward, flags and actions to a collected batch for both.

:func:`make_qtran_loss` (QTRAN-base) learns a joint action value ``Q_jt(s, u)`` from the team reward
(``L_td``) and ties the agents' summed Q values to it (``L_opt`` at the greedy joint action, ``L_nopt``
at the taken one, both through the state value ``V(s)``); it reads the group's observation and action,
the state, the team reward and flags of :func:`team_entries`, returns ``loss`` and its three parts, and
writes ``(TEAM, "td_error")``.

:func:`make_coma_loss` (COMA, discrete actions, on-policy batches laid out ``[envs, time]``) reads the
group's observation, action (and mask), the state and the next step's entries; it returns
``loss_objective`` (policy gradient with the counterfactual advantage), ``loss_critic`` (to TD(lambda)
targets from the target critic) and ``loss_entropy``, weighted as in A2C.

Team critics (MADDPG / MASAC with a team of several groups) read every team group's observation and
action; :func:`add_partner_next_actions` fills in the partners' next actions their TD target needs.

:func:`make_drqn_loss` (:mod:`.recurrent`) is IQL / VDN / QMIX with recurrent Q networks (DRQN), learnt
from trajectory slices with stored states and burn-in.

:func:`make_target_updater` keeps their target networks in step (soft, Polyak ``tau``, or hard).

Given ``mask_key`` (``env.live_mask_key(g)``, i.e. ``(g, "mask")`` for PettingZoo envs whose agents
can die), the PPO, DDPG, SAC and DQN losses also read that mask and average over live agents only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictParams, TensorDictSequential
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor, RunningValueNorm
from torch import nn
from torchrl.modules import QMixer, QValueModule, VDNMixer
from torchrl.objectives import (A2CLoss, DDPGLoss, DQNLoss, HardUpdate, LossModule, SACLoss, SoftUpdate,
                                 ValueEstimators)
from torchrl.objectives.multiagent import MAPPOLoss, QMixerLoss
from torchrl.objectives.ppo import _broadcast_advantage_to_log_weight, _check_advantage_broadcast
from torchrl.objectives.utils import distance_loss, TargetNetUpdater
from torchrl.objectives.value import TD0Estimator
from torchrl.objectives.value.functional import td_lambda_return_estimate

from marlkit.modules import action_indices, QTranJoint
from marlkit.modules.encoders import AgentMLP

from ._common import check_td_settings, LOSS_CRITIC_TYPES, MIXERS, TEAM
from .recurrent import DRQNLoss, estimate_advantages, make_drqn_loss

# The terms whose sum is minimised; everything else a loss returns is a diagnostic.
PPO_LOSS_TERMS = ("loss_objective", "loss_critic", "loss_entropy")
A2C_LOSS_TERMS = ("loss_objective", "loss_critic", "loss_entropy")
COMA_LOSS_TERMS = ("loss_objective", "loss_critic", "loss_entropy")
DDPG_LOSS_TERMS = ("loss_actor", "loss_value")
SAC_LOSS_TERMS = ("loss_actor", "loss_qvalue", "loss_alpha")
TARGET_UPDATES = ("soft", "hard")

__all__ = [
    "A2C_LOSS_TERMS",
    "COMA_LOSS_TERMS",
    "ComaLoss",
    "GroupPPOLoss",
    "make_coma_loss",
    "HappoLoss",
    "make_happo_loss",
    "make_qtran_loss",
    "minibatch_keys",
    "QTranLoss",
    "check_actor_critic_settings",
    "make_a2c_loss",
    "DDPG_LOSS_TERMS",
    "LOSS_CRITIC_TYPES",
    "PPO_LOSS_TERMS",
    "SAC_LOSS_TERMS",
    "TARGET_UPDATES",
    "check_sac_settings",
    "check_target_update",
    "check_td_settings",
    "MIXERS",
    "TEAM",
    "TeamValues",
    "add_partner_next_actions",
    "make_ddpg_loss",
    "make_dqn_loss",
    "IndependentDQNLoss",
    "run_with",
    "DRQNLoss",
    "make_drqn_loss",
    "estimate_advantages",
    "make_qmixer_loss",
    "make_ppo_loss",
    "make_sac_loss",
    "make_target_updater",
    "make_team_mixer_loss",
    "team_entries",
]


def check_actor_critic_settings(gamma: float, lmbda: float, entropy_coef: float, critic_coef: float,
                                loss_critic_type: str) -> None:
    """What the PPO and A2C losses share: ``ValueError`` naming the bad value."""
    if loss_critic_type not in LOSS_CRITIC_TYPES:
        raise ValueError(
            f"loss_critic_type={loss_critic_type!r} is not supported; accepted: {list(LOSS_CRITIC_TYPES)}"
        )
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
    if not (0.0 <= entropy_coef < math.inf and 0.0 <= critic_coef < math.inf):
        # a negative entropy bonus rewards collapsing the policy: always a sign flip, never a setting
        raise ValueError(f"entropy_coef ({entropy_coef}) and critic_coef ({critic_coef}) must be finite and >= 0")


def check_sac_settings(num_qvalue_nets: int, alpha_init: float, prefix: str = "") -> None:
    """SAC's Q-net count and initial temperature: ``ValueError`` naming the bad value."""
    if num_qvalue_nets < 1:
        raise ValueError(f"{prefix}num_qvalue_nets must be >= 1, got {num_qvalue_nets}")
    if alpha_init <= 0:
        raise ValueError(f"{prefix}alpha_init must be > 0, got {alpha_init}")


def check_target_update(mode: str, tau: float, hard_update_interval: int, prefix: str = "") -> None:
    """Target-network settings: ``ValueError`` naming the bad value (``prefix``: its section)."""
    if mode not in TARGET_UPDATES:
        raise ValueError(f"{prefix}target_update={mode!r}; accepted: {list(TARGET_UPDATES)}")
    if hard_update_interval < 1:
        raise ValueError(f"{prefix}hard_update_interval must be >= 1, got {hard_update_interval}")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"{prefix}tau must be in (0, 1], got {tau}")


def _mask_dead_agents(loss: LossModule, mask_key: NestedKey | None) -> None:
    """Average the loss over live agents only: entries where ``mask_key`` is False are left out."""
    if mask_key is not None:
        loss.loss_mask_key = mask_key


def _bind_actor_critic_keys(loss: LossModule, group: str, gamma: float, lmbda: float,
                            mask_key: NestedKey | None) -> None:
    """The keys the PPO and A2C losses of a group read and write, their GAE and the live-agent mask."""
    loss.set_keys(
        reward=(group, "reward"),
        action=(group, "action"),
        sample_log_prob=(group, "action_log_prob"),
        value=(group, "state_value"),
        advantage=(group, "advantage"),
        value_target=(group, "value_target"),
        done=(group, "done"),
        terminated=(group, "terminated"),
    )
    loss.make_value_estimator(ValueEstimators.GAE, gamma=gamma, lmbda=lmbda)
    _mask_dead_agents(loss, mask_key)


def _bind_td_keys(loss: LossModule, group: str, gamma: float) -> None:
    """The keys every off-policy loss of a group shares, and its TD(0) target."""
    loss.set_keys(
        state_action_value=(group, "state_action_value"),
        reward=(group, "reward"),
        done=(group, "done"),
        terminated=(group, "terminated"),
    )
    loss.make_value_estimator(ValueEstimators.TD0, gamma=gamma)


def make_ppo_loss(
    actor: ProbabilisticActor,
    critic: TensorDictModule,
    group: str,
    *,
    gamma: float = 0.99,
    lmbda: float = 0.95,
    clip_epsilon: float = 0.2,
    entropy_coef: float = 0.0,
    critic_coef: float = 1.0,
    loss_critic_type: str = "l2",
    normalize_advantage: bool = False,
    normalize_value_target: bool = False,
    mask_key: NestedKey | None = None,
) -> GroupPPOLoss:
    """Clipped PPO loss with GAE for one group (:class:`GroupPPOLoss`: TorchRL's ``MAPPOLoss``, a
    ``ClipPPOLoss``, computed from the networks' tensors).

    ``normalize_advantage`` standardises advantages over the minibatch (agent dim excluded);
    ``normalize_value_target`` scales the critic's regression target and prediction by running
    statistics of the value target (the MAPPO paper's value normalisation). ``mask_key`` (e.g.
    ``env.live_mask_key(group)``) names the live-agent mask: dead agents' entries leave every term.
    """
    return _clipped_ppo(GroupPPOLoss, actor, critic, group, gamma=gamma, lmbda=lmbda, clip_epsilon=clip_epsilon,
                        entropy_coef=entropy_coef, critic_coef=critic_coef, loss_critic_type=loss_critic_type,
                        normalize_advantage=normalize_advantage, normalize_value_target=normalize_value_target,
                        mask_key=mask_key)


def _clipped_ppo(cls: type[MAPPOLoss], actor: ProbabilisticActor, critic: TensorDictModule, group: str, *,
                 gamma: float, lmbda: float, clip_epsilon: float, entropy_coef: float, critic_coef: float,
                 loss_critic_type: str, normalize_advantage: bool, normalize_value_target: bool,
                 mask_key: NestedKey | None) -> MAPPOLoss:
    """A ``MAPPOLoss`` (or subclass) with the group's keys bound; ``ValueError`` naming a bad setting."""
    check_actor_critic_settings(gamma, lmbda, entropy_coef, critic_coef, loss_critic_type)
    if clip_epsilon <= 0.0:
        raise ValueError(f"clip_epsilon must be > 0, got {clip_epsilon}")
    loss = cls(
        actor_network=actor,
        critic_network=critic,
        clip_epsilon=clip_epsilon,
        entropy_bonus=entropy_coef > 0,
        entropy_coeff=entropy_coef,
        critic_coeff=critic_coef,
        loss_critic_type=loss_critic_type,
        normalize_advantage=normalize_advantage,
        # Variance floor 1e-2 as in the MAPPO paper's ValueNorm: early batches often have nearly
        # constant returns, and a tiny floor would blow the critic loss up by orders of magnitude.
        value_norm=RunningValueNorm(shape=1, epsilon=1e-2) if normalize_value_target else None,
    )
    _bind_actor_critic_keys(loss, group, gamma, lmbda, mask_key)
    return loss


def make_a2c_loss(
    actor: ProbabilisticActor,
    critic: TensorDictModule,
    group: str,
    *,
    gamma: float = 0.99,
    lmbda: float = 0.95,
    entropy_coef: float = 0.01,
    critic_coef: float = 0.5,
    loss_critic_type: str = "l2",
    mask_key: NestedKey | None = None,
) -> A2CLoss:
    """Advantage actor-critic loss with GAE for one group (TorchRL's ``A2CLoss``): the policy gradient
    ``-log pi(a|o) * A`` with no ratio and no clipping, the critic's regression to the GAE return and
    an entropy bonus. Without an advantage in the batch, the loss computes it (no gradient) from the
    critic first. ``mask_key`` names the live-agent mask (dead agents' entries are left out)."""
    check_actor_critic_settings(gamma, lmbda, entropy_coef, critic_coef, loss_critic_type)
    loss = A2CLoss(
        actor_network=actor,
        critic_network=critic,
        entropy_bonus=entropy_coef > 0,
        entropy_coeff=entropy_coef,
        critic_coeff=critic_coef,
        loss_critic_type=loss_critic_type,
    )
    _bind_actor_critic_keys(loss, group, gamma, lmbda, mask_key)
    return loss


def make_ddpg_loss(
    actor: ProbabilisticActor,
    critic: TensorDictModule,
    group: str,
    *,
    gamma: float = 0.9,
    loss_function: str = "l2",
    mask_key: NestedKey | None = None,
) -> DDPGLoss:
    """DDPG loss for one group, with target actor and target critic (as in the MADDPG paper);
    ``mask_key`` names the live-agent mask (dead agents' entries are left out)."""
    check_td_settings(loss_function, gamma)
    loss = DDPGLoss(
        actor_network=actor, value_network=critic, delay_actor=True, delay_value=True,
        loss_function=loss_function,
    )
    _bind_td_keys(loss, group, gamma)
    _mask_dead_agents(loss, mask_key)
    return loss


def make_sac_loss(
    actor: ProbabilisticActor,
    critic: TensorDictModule,
    group: str,
    *,
    gamma: float = 0.9,
    loss_function: str = "l2",
    num_qvalue_nets: int = 2,
    alpha_init: float = 1.0,
    fixed_alpha: bool = False,
    target_entropy: float | None = None,
    mask_key: NestedKey | None = None,
) -> SACLoss:
    """SAC loss (no state-value net, ``num_qvalue_nets`` Q nets) for one group.

    ``target_entropy`` defaults to ``-action_dim`` per agent (the usual SAC heuristic, applied to
    each agent's own action rather than the whole group's). ``mask_key`` names the live-agent mask
    (dead agents' entries are left out).
    """
    check_td_settings(loss_function, gamma)
    check_sac_settings(num_qvalue_nets, alpha_init)
    if target_entropy is None:
        target_entropy = -float(actor.spec[group, "action"].shape[-1])
    loss = SACLoss(
        actor_network=actor,
        qvalue_network=critic,
        num_qvalue_nets=num_qvalue_nets,
        loss_function=loss_function,
        alpha_init=alpha_init,
        fixed_alpha=fixed_alpha,
        target_entropy=target_entropy,
        delay_qvalue=True,
    )
    _bind_td_keys(loss, group, gamma)
    loss.set_keys(action=(group, "action"))
    _mask_dead_agents(loss, mask_key)
    return loss


def make_target_updater(
    loss: LossModule, *, mode: str = "soft", tau: float = 0.005, hard_update_interval: int = 1000
) -> TargetNetUpdater:
    """Soft (Polyak, ``target <- (1 - tau) target + tau online``) or hard (copy every N steps) updates."""
    check_target_update(mode, tau, hard_update_interval)
    if mode == "hard":
        # TorchRL's HardUpdate copies when its counter, which starts at 0, reaches the interval:
        # on step interval + 1. Passing N - 1 makes the copy land on every N-th step.
        return HardUpdate(loss, value_network_update_interval=hard_update_interval - 1)
    return SoftUpdate(loss, tau=tau)


class IndependentDQNLoss(DQNLoss):
    """TorchRL's ``DQNLoss`` for a group of independent learners, computing the same loss, TD errors and
    gradients (bit for bit, tested against ``DQNLoss.forward``) from the Q network's tensors.

    TorchRL's forward runs the whole ``TensorDictSequential`` (values, then the greedy action) three
    times per update, each inside a parameter swap and on cloned TensorDicts; that bookkeeping was most
    of an update of SUPER's 8 small pursuer networks. Here the online network reads the observations and
    the next ones directly, and only the target network's pass swaps parameters in. TorchRL's own value
    estimator (TD(0)), distance loss and reduction (importance weights, loss masks) are reused as they
    are. A Q network of another layout falls back to TorchRL's forward.
    """

    def _tensor_parts(self) -> tuple[nn.Module, NestedKey, NestedKey | None] | None:
        if self.action_space != "categorical":
            return None
        return _q_tensor_parts(self.value_network, self.tensor_keys.action_value)

    def _target_owner(self, values: nn.Module) -> int | None:
        """:func:`_param_owner` for the target network, worked out once (the layout does not change)."""
        if "_target_owner_index" not in self.__dict__:
            self.__dict__["_target_owner_index"] = _param_owner(values, self.target_value_network_params,
                                                                _VALUES_PREFIX)
        return self.__dict__["_target_owner_index"]

    def batched_layout(self) -> tuple[nn.Sequential, int, NestedKey, NestedKey | None] | None:
        """Where the loss is a plain function of tensors, what :mod:`marlkit.pipelines.compiled` compiles:
        the values network, the index of its :class:`AgentMLP` (the parameters' owner), the observation key
        and the live-agent mask key (None: no mask), for categorical actions with no action mask and
        TorchRL's TD(0) estimator without reward standardisation; None otherwise."""
        parts = self._tensor_parts()
        masks = self._loss_mask_keys()
        if parts is None or parts[2] is not None or len(masks) > 1:
            return None
        estimator = self.value_estimator
        owner = self._target_owner(parts[0])
        if owner is None or not isinstance(estimator, TD0Estimator) or estimator.average_rewards:
            return None
        return parts[0], owner, parts[1], (masks[0] if masks else None)

    def target_params(self) -> TensorDictBase:
        """The target network's parameters, laid out as the :class:`AgentMLP`'s own (``batched_layout`` only)."""
        return self.target_value_network_params.get((*_VALUES_PREFIX, str(self.batched_layout()[1]), "params"))

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        """The loss (``loss``), with the squared TD error written at the priority key, as ``DQNLoss``."""
        parts = self._tensor_parts()
        if parts is None or not _plain_td0(self.value_estimator, tensordict):
            return super().forward(tensordict)
        estimator = self.value_estimator
        values, obs_key, mask_key = parts
        keys = self.tensor_keys
        action = tensordict.get(keys.action)
        pred_val = values(tensordict.get(obs_key))
        # TorchRL gathers from values masked by the action mask: equal at the taken (allowed) action
        pred_val_index = torch.gather(pred_val, -1, index=action.unsqueeze(-1)).squeeze(-1)
        next_obs = tensordict.get(_next_key(obs_key))
        next_mask = None if mask_key is None else tensordict.get(_next_key(mask_key))
        with torch.no_grad():
            owner = self._target_owner(values)
            if owner is not None:
                target = self.target_value_network_params.get((*_VALUES_PREFIX, str(owner), "params"))
                next_target = _masked(run_with(values, owner, target, next_obs), next_mask)
            else:
                with self.target_value_network_params.to_module(self.value_network, preserve_module_state=False):
                    next_target = _masked(values(next_obs), next_mask)
            # double Q: the online network picks the next action; plain DQN: the target network does
            chooser = _masked(values(next_obs), next_mask) if self.double_dqn else next_target
            next_action = torch.argmax(chooser, dim=-1).to(torch.long)
            next_value = torch.gather(next_target, -1, index=next_action.unsqueeze(-1))
        target_value = estimator.value_estimate(tensordict, next_value=next_value).squeeze(-1)
        with torch.no_grad():
            priority = (pred_val_index - target_value).pow(2).unsqueeze(-1)
        if tensordict.device is not None:
            priority = priority.to(tensordict.device)
        tensordict.set(keys.priority, priority, inplace=True)
        loss = distance_loss(pred_val_index, target_value, self.loss_function)
        weights = None
        if self.use_prioritized_weights in (True, "auto") and keys.priority_weight in tensordict.keys():
            weights = tensordict.get(keys.priority_weight)
        return TensorDict(loss=self._reduce_loss(loss, tensordict=tensordict, weights=weights))


class MixedQLoss(QMixerLoss):
    """TorchRL's ``QMixerLoss`` (VDN / QMIX over one group), computing the same loss, TD errors and
    gradients (bit for bit, tested against ``QMixerLoss.forward``) from the Q network's and the mixer's
    tensors, as :class:`IndependentDQNLoss` does for DQN: one online pass of the agents' network and the
    mixer, one target pass of both inside one parameter swap, and TorchRL's TD(0) estimator and distance
    loss. Other layouts (the team values of several groups) fall back to TorchRL's forward.
    """

    def _tensor_parts(self) -> tuple[nn.Module, NestedKey, NestedKey | None, nn.Module, list[NestedKey]] | None:
        """The agents' values network, observation and action-mask keys, the mixer and its other inputs."""
        parts = _q_tensor_parts(self.local_value_network, self.tensor_keys.action_value)
        mixer = self.mixer_network
        if (parts is None or self.action_space != "categorical" or type(mixer) is not TensorDictModule  # noqa: E721
                or mixer.in_keys[0] != self.tensor_keys.local_value):
            return None
        return (*parts, mixer.module, list(mixer.in_keys[1:]))

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        """The loss (``loss``), with the squared TD error written at the priority key, as ``QMixerLoss``."""
        parts = self._tensor_parts()
        if parts is None or not _plain_td0(self.value_estimator, tensordict):
            return super().forward(tensordict)
        values, obs_key, mask_key, mixer, state_keys = parts
        action = tensordict.get(self.tensor_keys.action)
        # TorchRL gathers from values masked by the action mask: equal at the taken (allowed) action
        local = torch.gather(values(tensordict.get(obs_key)), -1, index=action.unsqueeze(-1))  # [*B, n_agents, 1]
        pred_val = mixer(local, *(tensordict.get(key) for key in state_keys)).squeeze(-1)
        next_mask = None if mask_key is None else tensordict.get(_next_key(mask_key))
        with torch.no_grad(), \
                self.target_local_value_network_params.to_module(self.local_value_network, preserve_module_state=False), \
                self.target_mixer_network_params.to_module(self.mixer_network, preserve_module_state=False):
            next_values = _masked(values(tensordict.get(_next_key(obs_key))), next_mask)  # the target's greedy action
            next_local = next_values.gather(-1, torch.argmax(next_values, dim=-1).to(torch.long).unsqueeze(-1))
            next_value = mixer(next_local, *(tensordict.get(_next_key(key)) for key in state_keys))
        target_value = self.value_estimator.value_estimate(tensordict, next_value=next_value).squeeze(-1)
        with torch.no_grad():
            priority = (pred_val - target_value).pow(2).unsqueeze(-1)
        if tensordict.device is not None:
            priority = priority.to(tensordict.device)
        tensordict.set(self.tensor_keys.priority, priority, inplace=True)
        return TensorDict({"loss": distance_loss(pred_val, target_value, self.loss_function).mean()}, [])


# Where the values module (the Q network's first TensorDictModule's module) sits in the loss's parameter copies.
_VALUES_PREFIX = ("module", "0", "module")


def _q_tensor_parts(q_network: nn.Module, action_value_key: NestedKey) -> tuple[nn.Module, NestedKey, NestedKey | None] | None:
    """The values network, its observation key and the action-mask key of a Q network made as
    :func:`marlkit.modules.make_q_network` makes it (values module, then the greedy action); None otherwise."""
    if not (isinstance(q_network, TensorDictSequential) and len(q_network.module) == 2):
        return None
    values, greedy = q_network.module
    if not (type(values) is TensorDictModule and isinstance(greedy, QValueModule)  # noqa: E721 (no subclasses)
            and len(values.in_keys) == 1 and values.out_keys == [greedy.action_value_key]
            and greedy.action_space == "categorical" and greedy.action_value_key == action_value_key):
        return None
    return values.module, values.in_keys[0], greedy.action_mask_key


def _param_owner(values: nn.Module, params: TensorDictBase, prefix: tuple[str, ...]) -> int | None:
    """The index of the one :class:`AgentMLP` holding all of ``values``'s parameters when ``values`` is a
    ``Sequential`` and ``params`` (a loss's copy, ``values``'s own under ``prefix``) holds exactly that
    network's; None where the copy must be swapped into the module instead."""
    if not isinstance(values, nn.Sequential):
        return None
    owners = [k for k, module in enumerate(values) if any(True for _ in module.parameters())
              or any(True for _ in module.buffers())]
    if len(owners) != 1 or not isinstance(values[owners[0]], AgentMLP) or not values[owners[0]].takes_params():
        return None
    k = owners[0]
    mine = params.get(prefix, None)
    if mine is None or set(mine.keys()) != {str(k)} or set(mine.get(str(k)).keys()) != {"params"}:
        return None
    return k


def run_with(values: nn.Sequential, owner: int, params: TensorDictBase | Mapping, x: torch.Tensor) -> torch.Tensor:
    """``values(x)`` with module ``owner`` (an :class:`AgentMLP`) running on ``params`` (its parameters'
    layout: a TensorDict, or a dict of its nested keys)."""
    for j, module in enumerate(values):
        x = module.forward_with(params, x) if j == owner else module(x)
    return x


def _plain_td0(estimator: object, tensordict: TensorDictBase) -> bool:
    """Whether the loss's value estimator is TorchRL's TD(0) without reward standardisation or n-step
    gaps, the case the tensor-level losses compute."""
    return (isinstance(estimator, TD0Estimator) and not estimator.average_rewards
            and estimator.tensor_keys.steps_to_next_obs not in tensordict.keys(True))


def _next_key(key: NestedKey) -> tuple[str, ...]:
    return ("next", *((key,) if isinstance(key, str) else key))


def _masked(action_values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Disallowed actions at the lowest float, as TorchRL's ``QValueModule`` masks them."""
    if mask is None:
        return action_values
    return torch.where(mask, action_values, torch.finfo(action_values.dtype).min)


def make_dqn_loss(
    q_network: nn.Module,
    group: str,
    *,
    gamma: float = 0.9,
    loss_function: str = "l2",
    double_dqn: bool = True,
    mask_key: NestedKey | None = None,
) -> DQNLoss:
    """Independent DQN for every agent of a group (IQL); double-Q targets when ``double_dqn``;
    ``mask_key`` names the live-agent mask (dead agents' entries are left out)."""
    check_td_settings(loss_function, gamma)
    loss = IndependentDQNLoss(q_network, loss_function=loss_function, delay_value=True, double_dqn=double_dqn,
                              action_space="categorical")
    loss.set_keys(
        action_value=(group, "action_value"),
        action=(group, "action"),
        value=(group, "chosen_action_value"),
        priority=(group, "td_error"),
        reward=(group, "reward"),
        done=(group, "done"),
        terminated=(group, "terminated"),
    )
    loss.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
    _mask_dead_agents(loss, mask_key)
    return loss


def _mixer_loss(
    local_values: nn.Module,
    *,
    keys: dict[str, NestedKey],
    name: str,
    mixer: str,
    n_agents: int,
    state_key: NestedKey,
    state_shape: tuple[int, ...],
    gamma: float,
    loss_function: str,
    mixing_embed_dim: int,
) -> QMixerLoss:
    """A ``QMixerLoss`` mixing ``keys["local_value"]`` (``[*B, n_agents, 1]``) into the team value."""
    check_td_settings(loss_function, gamma)
    if mixer not in MIXERS:
        raise ValueError(f"mixer={mixer!r} is not supported; accepted: {list(MIXERS)}")
    if n_agents < 2:
        raise ValueError(
            f"{mixer} mixes the values of several agents; {name} has {n_agents}: use algorithm=iql, or put "
            "it in a team with other groups (env.teams)"
        )
    device = next(local_values.parameters()).device
    if mixer == "vdn":
        net, in_keys = VDNMixer(n_agents=n_agents, device=device), [keys["local_value"]]
    else:
        net = QMixer(state_shape=state_shape, mixing_embed_dim=mixing_embed_dim, n_agents=n_agents, device=device)
        in_keys = [keys["local_value"], state_key]
    mixer_module = TensorDictModule(net, in_keys=in_keys, out_keys=[(TEAM, "chosen_action_value")])
    loss = MixedQLoss(local_values, mixer_module, loss_function=loss_function, delay_value=True,
                      action_space="categorical")
    loss.set_keys(
        **keys,
        global_value=(TEAM, "chosen_action_value"),
        priority=(TEAM, "td_error"),
        reward=(TEAM, "reward"),
        done=(TEAM, "done"),
        terminated=(TEAM, "terminated"),
    )
    loss.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
    return loss


def make_qmixer_loss(
    q_network: nn.Module,
    group: str,
    *,
    mixer: str,
    n_agents: int,
    state_key: tuple[str, ...] | str,
    state_shape: tuple[int, ...],
    gamma: float = 0.9,
    loss_function: str = "l2",
    mixing_embed_dim: int = 32,
) -> QMixerLoss:
    """VDN (sum) or QMIX (monotonic hypernetwork on ``state_key``) over one group's agents."""
    keys = {"action_value": (group, "action_value"), "local_value": (group, "chosen_action_value"),
            "action": (group, "action")}
    return _mixer_loss(q_network, keys=keys, name=f"group {group!r}", mixer=mixer, n_agents=n_agents,
                       state_key=state_key, state_shape=state_shape, gamma=gamma, loss_function=loss_function,
                       mixing_embed_dim=mixing_embed_dim)


class TeamValues(TensorDictModuleBase):
    """Puts the per-group Q values of a team side by side, as one group of all the team's agents.

    Reads ``(g, "action_value")``, ``(g, "chosen_action_value")`` and ``(g, "observation")`` of every
    team group ``g`` and writes ``(TEAM, "agent_action_value")`` (``[*B, n_team, max_actions]``, groups
    with fewer actions padded with zeros that no taken action ever indexes),
    ``(TEAM, "agent_chosen_action_value")`` (``[*B, n_team, 1]``) and ``(TEAM, "observation")`` (every
    agent's observation flattened and concatenated: QMIX's state when the env has none).
    """

    def __init__(self, groups: Sequence[str]):
        super().__init__()
        self.groups = list(groups)
        self.in_keys = [(g, key) for g in self.groups for key in ("action_value", "chosen_action_value", "observation")]
        self.out_keys = [(TEAM, "agent_action_value"), (TEAM, "agent_chosen_action_value"), (TEAM, "observation")]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch = tensordict.batch_size
        values = [tensordict.get((g, "action_value")) for g in self.groups]
        width = max(v.shape[-1] for v in values)
        padded = [torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in values]
        tensordict.set((TEAM, "agent_action_value"), torch.cat(padded, dim=-2))
        tensordict.set((TEAM, "agent_chosen_action_value"),
                       torch.cat([tensordict.get((g, "chosen_action_value")) for g in self.groups], dim=-2))
        tensordict.set((TEAM, "observation"), torch.cat(
            [tensordict.get((g, "observation")).reshape(*batch, -1).float() for g in self.groups], dim=-1))
        return tensordict


def team_entries(batch: TensorDictBase, groups: Sequence[str]) -> TensorDictBase:
    """The team-level entries a mixer learns from, added to a collected ``batch`` (in place).

    ``("next", TEAM, "reward")`` is the mean reward over every agent of the team's ``groups``;
    ``("next", TEAM, "done" / "terminated")`` are the episode's flags. A team of several groups also
    gets ``(TEAM, "agent_action")``: every agent's action index, groups side by side as in
    :class:`TeamValues`.
    """
    if ("next", "done") not in batch.keys(True):
        raise KeyError("team_entries needs the episode flags ('next', 'done') and ('next', 'terminated') in the batch")
    rewards = torch.cat([batch.get(("next", g, "reward")) for g in groups], dim=-2)
    batch.set(("next", TEAM, "reward"), rewards.mean(-2))
    batch.set(("next", TEAM, "done"), batch.get(("next", "done")))
    batch.set(("next", TEAM, "terminated"), batch.get(("next", "terminated")))
    if len(groups) > 1:
        actions = [batch.get((g, "action")) for g in groups]
        batch.set((TEAM, "agent_action"), torch.cat([action_indices(a) for a in actions], dim=-1))
    return batch


def make_team_mixer_loss(
    q_networks: Mapping[str, nn.Module],
    n_agents: Mapping[str, int],
    *,
    mixer: str,
    state_key: NestedKey,
    state_shape: tuple[int, ...],
    gamma: float = 0.9,
    loss_function: str = "l2",
    mixing_embed_dim: int = 32,
) -> QMixerLoss:
    """VDN or QMIX over the agents of several groups that form one team.

    ``q_networks`` maps each team group to its Q network (as :func:`make_qmixer_loss` takes one) and
    ``n_agents`` to its agent count; the mixer sees every agent's chosen value (:class:`TeamValues`)
    and, for QMIX, ``state_key`` (the env's ``"state"``, or ``(TEAM, "observation")``). The loss reads
    ``(TEAM, "agent_action")`` and the team reward and flags that :func:`team_entries` adds.
    """
    local_values = TensorDictSequential(*q_networks.values(), TeamValues(list(q_networks)))
    keys = {"action_value": (TEAM, "agent_action_value"), "local_value": (TEAM, "agent_chosen_action_value"),
            "action": (TEAM, "agent_action")}
    return _mixer_loss(local_values, keys=keys, name=f"team {list(q_networks)}", mixer=mixer,
                       n_agents=sum(n_agents.values()), state_key=state_key, state_shape=state_shape, gamma=gamma,
                       loss_function=loss_function, mixing_embed_dim=mixing_embed_dim)


def add_partner_next_actions(batch: TensorDictBase, actors: Mapping[str, TensorDictModuleBase],
                             exploration: ExplorationType) -> TensorDictBase:
    """Write ``("next", g, "action")`` for each partner group ``g`` of a team critic (in place).

    A team critic (MADDPG / MASAC with ``env.teams``) reads every team group's action. Its TD target
    needs the partners' actions at the next state, which no transition holds: they come from the
    partners' current actors (``exploration``: ``DETERMINISTIC`` for DDPG's mean action, ``RANDOM``
    for SAC's sample), without gradients.
    """
    next_td = batch.get("next")
    with torch.no_grad(), set_exploration_type(exploration):
        for group, actor in actors.items():
            acted = actor(next_td.select(*actor.in_keys, strict=False).clone(False))
            next_td.set((group, "action"), acted.get((group, "action")))
    return batch


def _actor_dist(loss: LossModule, tensordict: TensorDictBase) -> torch.distributions.Distribution:
    """The policy's distribution on ``tensordict`` under the loss's (trainable) actor parameters."""
    with loss.actor_network_params.to_module(loss.actor_network):
        return loss.actor_network.get_dist(tensordict.select(*loss.actor_network.in_keys, strict=False))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``[*B, n]`` over the entries where ``mask`` (live agents) is True."""
    if mask is None:
        return values.mean()
    mask = mask.reshape(values.shape).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class QTranLoss(LossModule):
    """QTRAN-base (Son et al. 2019) over one group's agents; see :func:`make_qtran_loss`."""

    value_network: TensorDictModule
    value_network_params: TensorDictParams
    target_value_network_params: TensorDictParams
    joint_network: QTranJoint
    joint_network_params: TensorDictParams
    target_joint_network_params: TensorDictParams

    def __init__(self, q_network: nn.Module, joint: QTranJoint, group: str, *, state_key: NestedKey, gamma: float,
                 loss_function: str, lambda_opt: float, lambda_nopt: float):
        super().__init__()
        self.convert_to_functional(q_network, "value_network")
        # the joint networks have a target copy; the agents' greedy actions come from the online nets
        self.convert_to_functional(joint, "joint_network", create_target_params=True)
        self.group, self.state_key, self.gamma = group, state_key, gamma
        self.loss_function, self.lambda_opt, self.lambda_nopt = loss_function, lambda_opt, lambda_nopt

    def _agent_values(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """Each agent's Q values ``[B, n, A]`` and its greedy action ``[B, n]`` (valid actions only)."""
        g = self.group
        with self.value_network_params.to_module(self.value_network):
            values = self.value_network(tensordict.select(*self.value_network.in_keys, strict=False)).get((g, "action_value"))
        masked = values.detach()
        if (g, "action_mask") in tensordict.keys(True):
            masked = masked.masked_fill(~tensordict.get((g, "action_mask")), -math.inf)
        return values, masked.argmax(-1)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        g, batch_dims = self.group, tensordict.ndim
        values, greedy = self._agent_values(tensordict)
        next_td = tensordict.get("next")
        with torch.no_grad():  # only the argmax is used: no graph for the next state's values
            _, next_greedy = self._agent_values(next_td)
        action = action_indices(tensordict.get((g, "action")))
        state = tensordict.get(self.state_key)
        with self.joint_network_params.to_module(self.joint_network):
            joint = self.joint_network.joint_value(state, action)
            joint_greedy = self.joint_network.joint_value(state, greedy)
            state_value = self.joint_network.state_value(state, batch_dims)
        # preserve_module_state=False, as TorchRL's DQNLoss: restoring the module's state would mark
        # the target buffers as requiring gradients, which the target updater refuses
        with torch.no_grad(), self.target_joint_network_params.to_module(self.joint_network,
                                                                          preserve_module_state=False):
            next_joint = self.joint_network.joint_value(next_td.get(self.state_key), next_greedy)
        reward = next_td.get((TEAM, "reward"))
        not_terminal = (~next_td.get((TEAM, "terminated"))).to(reward.dtype)
        target = (reward + self.gamma * not_terminal * next_joint).detach()
        td = distance_loss(joint, target, self.loss_function).squeeze(-1)
        summed = values.gather(-1, action.unsqueeze(-1)).sum(-2)  # [B, 1]
        summed_greedy = values.gather(-1, greedy.unsqueeze(-1)).sum(-2)
        # Q' = sum_i Q_i must equal Q_jt - V at the greedy joint action and not fall below it elsewhere
        opt = (summed_greedy - joint_greedy.detach() + state_value).squeeze(-1).pow(2)
        nopt = (summed - joint.detach() + state_value).clamp(max=0.0).squeeze(-1).pow(2)
        per_sample = td + self.lambda_opt * opt + self.lambda_nopt * nopt
        weight = tensordict.get("priority_weight", None)
        weighted = (lambda x: x) if weight is None else (lambda x: x * weight.reshape(x.shape))
        tensordict.set((TEAM, "td_error"), (joint - target).detach().pow(2))
        return TensorDict({
            "loss": weighted(per_sample).mean(),
            "loss_td": td.mean().detach(),
            "loss_opt": opt.mean().detach(),
            "loss_nopt": nopt.mean().detach(),
        }, [])


def make_qtran_loss(
    q_network: nn.Module,
    joint: QTranJoint,
    group: str,
    *,
    state_key: NestedKey,
    gamma: float = 0.99,
    loss_function: str = "l2",
    lambda_opt: float = 1.0,
    lambda_nopt: float = 0.1,
) -> QTranLoss:
    """QTRAN-base for one group: ``loss = L_td + lambda_opt L_opt + lambda_nopt L_nopt``.

    ``L_td`` regresses ``Q_jt(s, u)`` (``joint``, from :func:`marlkit.modules.make_qtran_joint`) on
    ``r + gamma Q_jt^target(s', u_greedy')`` with the agents' greedy next actions; ``L_opt`` pulls
    ``sum_i Q_i(o_i, u_greedy) - Q_jt(s, u_greedy) + V(s)`` to 0 and ``L_nopt`` pushes
    ``sum_i Q_i(o_i, u) - Q_jt(s, u) + V(s)`` up to at least 0 (``Q_jt`` is held fixed in both).
    The prioritized replay's ``priority_weight`` weights each transition.
    """
    check_td_settings(loss_function, gamma)
    if not (0.0 <= lambda_opt < math.inf and 0.0 <= lambda_nopt < math.inf):
        raise ValueError(f"lambda_opt ({lambda_opt}) and lambda_nopt ({lambda_nopt}) must be finite and >= 0")
    return QTranLoss(q_network, joint, group, state_key=state_key, gamma=gamma, loss_function=loss_function,
                     lambda_opt=lambda_opt, lambda_nopt=lambda_nopt)


class ComaLoss(LossModule):
    """COMA (Foerster et al. 2018) for one group; see :func:`make_coma_loss`."""

    actor_network: ProbabilisticActor
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    critic_network: TensorDictModule
    critic_network_params: TensorDictParams
    target_critic_network_params: TensorDictParams

    def __init__(self, actor: ProbabilisticActor, critic: TensorDictModule, group: str, *, gamma: float,
                 lmbda: float, entropy_coef: float, critic_coef: float, loss_critic_type: str,
                 mask_key: NestedKey | None):
        super().__init__()
        self.convert_to_functional(actor, "actor_network")
        self.convert_to_functional(critic, "critic_network", create_target_params=True)
        self.group, self.gamma, self.lmbda, self.mask_key = group, gamma, lmbda, mask_key
        self.entropy_coef, self.critic_coef, self.loss_critic_type = entropy_coef, critic_coef, loss_critic_type

    def _critic(self, tensordict: TensorDictBase, action: torch.Tensor, params: TensorDictBase) -> torch.Tensor:
        inputs = tensordict.select(*self.critic_network.in_keys[:-1], strict=False)
        inputs.set((self.group, "action"), action)
        target = params is not self.critic_network_params  # see QTranLoss on preserve_module_state
        with params.to_module(self.critic_network, preserve_module_state=not target):
            return self.critic_network(inputs).get((self.group, "action_value"))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        g = self.group
        if tensordict.ndim < 2:
            raise ValueError(f"COMA's TD(lambda) targets need a batch laid out [envs, time]; got shape {tuple(tensordict.shape)}")
        action = tensordict.get((g, "action"))
        index = action_indices(action)
        dist = _actor_dist(self, tensordict)
        q = self._critic(tensordict, action, self.critic_network_params)  # [E, T, n, A]
        q_taken = q.gather(-1, index.unsqueeze(-1))  # [E, T, n, 1]
        baseline = (dist.probs.detach() * q.detach()).sum(-1, keepdim=True)
        advantage = (q_taken.detach() - baseline).squeeze(-1)
        next_td = tensordict.get("next")
        with torch.no_grad():
            next_action = _actor_dist(self, next_td).sample()  # a fresh on-policy joint action at s'
            next_q = self._critic(next_td, next_action, self.target_critic_network_params)
            next_taken = next_q.gather(-1, action_indices(next_action).unsqueeze(-1))
            # agents before time, as TorchRL's estimators take [..., T, 1]
            shape = next_taken.shape
            reward = next_td.get((g, "reward")).mean(-2, keepdim=True).expand(shape)
            flags = [next_td.get(key).unsqueeze(-2).expand(shape) for key in ("done", "terminated")]
            target = td_lambda_return_estimate(
                self.gamma, self.lmbda, *(x.movedim(-2, -3) for x in (next_taken, reward, *flags)), time_dim=-2,
            ).movedim(-3, -2)
        mask = tensordict.get(self.mask_key) if self.mask_key is not None else None
        critic_error = distance_loss(q_taken, target, self.loss_critic_type).squeeze(-1)
        entropy = dist.entropy()
        return TensorDict({
            "loss_objective": -_masked_mean(advantage * dist.log_prob(action), mask),
            "loss_critic": self.critic_coef * _masked_mean(critic_error, mask),
            "loss_entropy": -self.entropy_coef * _masked_mean(entropy, mask),
            "entropy": _masked_mean(entropy.detach(), mask),
            "advantage": _masked_mean(advantage, mask),
        }, [])


def make_coma_loss(
    actor: ProbabilisticActor,
    critic: TensorDictModule,
    group: str,
    *,
    gamma: float = 0.99,
    lmbda: float = 0.8,
    entropy_coef: float = 0.01,
    critic_coef: float = 0.5,
    loss_critic_type: str = "l2",
    mask_key: NestedKey | None = None,
) -> ComaLoss:
    """COMA for one group of discrete-action agents (``critic`` from
    :func:`marlkit.modules.make_coma_critic`).

    Each agent's advantage is ``Q(s, u) - sum_u' pi(u'|o) Q(s, (u_-a, u'))``: the others' actions held
    fixed, its own marginalised under its policy. The critic regresses the taken joint action's value on
    TD(lambda) returns of the team reward (the agents' mean), bootstrapped from the target critic at a
    joint action sampled from the current policy at the next step. ``mask_key`` leaves dead agents out.
    """
    check_actor_critic_settings(gamma, lmbda, entropy_coef, critic_coef, loss_critic_type)
    return ComaLoss(actor, critic, group, gamma=gamma, lmbda=lmbda, entropy_coef=entropy_coef,
                    critic_coef=critic_coef, loss_critic_type=loss_critic_type, mask_key=mask_key)


class GroupPPOLoss(MAPPOLoss):
    """TorchRL's ``MAPPOLoss`` (clipped PPO) for one group, computing the same terms, diagnostics and
    gradients (bit for bit, tested against ``ClipPPOLoss.forward``) from the networks' tensors.

    TorchRL's forward clones the minibatch, runs the actor as a ``TensorDictSequential`` to build the
    distribution, runs the critic on the clone and reduces the output TensorDict entry by entry; on the
    matched MAPPO setup that bookkeeping was about a tenth of an optimiser step (``benchmarks/loss_cost.py``,
    where the rest is the matrix products and ``tanh``). Here the actor's
    network reads the observation, its outputs go straight into the same distribution class with the
    same keyword arguments, and the critic's network reads its inputs; TorchRL's own advantage
    normalisation, entropy, value normalisation, distance loss and masked reduction are reused as they
    are. Settings this path does not compute (a delayed actor, an importance-ratio cap, value clipping,
    separate losses, advantage scaling, per-head entropy coefficients, an advantage computed inside the
    loss) and networks of another layout (recurrent, composite actions) fall back to TorchRL's forward.
    """

    def _tensor_parts(self) -> tuple[nn.Module, NestedKey, tuple[NestedKey, ...], TensorDictModuleBase,
                                     nn.Module, tuple[NestedKey, ...]] | None:
        """(actor network, its input key, its output keys, the distribution module, critic network, its
        input keys), or None when TorchRL's forward must run."""
        if (not self.functional or self.delay_actor or self.max_importance_ratio is not None or self.clip_value
                or self.separate_losses or self.advantage_norm is not None or not self._has_critic
                or (self.entropy_bonus and self._entropy_coeff_map is not None)):
            return None
        actor, critic = self.actor_network, self.critic_network
        if not isinstance(actor, ProbabilisticActor) or actor.return_composite or len(actor.module) != 2:
            return None
        body, head = actor.module
        if (type(body) is not TensorDictModule or len(body.in_keys) != 1  # noqa: E721 (no subclasses)
                or not set(body.out_keys) <= set(head.in_keys)):
            return None
        if type(critic) is not TensorDictModule or critic.out_keys != [self.tensor_keys.value]:  # noqa: E721
            return None
        return body.module, body.in_keys[0], tuple(body.out_keys), head, critic.module, tuple(critic.in_keys)

    def batch_keys(self) -> list[NestedKey] | None:
        """Every entry :meth:`forward` reads from a batch that holds the advantages (a minibatch needs no
        others), or None when TorchRL's forward runs, which may read more."""
        parts = self._tensor_parts()
        if parts is None:
            return None
        _, obs_key, out_keys, head, _, critic_keys = parts
        keys = self.tensor_keys
        return list(dict.fromkeys([
            obs_key, *(key for key in head.in_keys if key not in out_keys), *critic_keys, keys.action,
            keys.sample_log_prob, keys.advantage, keys.value_target, *self._loss_mask_keys(),
            "shifted_valid",  # read by the advantage normalisation when a value estimator wrote it
        ]))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_objective``, ``loss_critic`` (and ``loss_entropy``) with the diagnostics of ``ClipPPOLoss``."""
        keys = self.tensor_keys
        parts = self._tensor_parts()
        if parts is None or keys.advantage not in tensordict.keys(True):
            return super().forward(tensordict)
        body, obs_key, param_keys, head, critic, critic_keys = parts
        advantage = self._maybe_normalize_advantage(tensordict.get(keys.advantage), tensordict, update_norm=False)
        prev_log_prob = tensordict.get(keys.sample_log_prob)
        if prev_log_prob.requires_grad:
            raise RuntimeError(f"tensordict stored {keys.sample_log_prob} requires grad.")
        params = body(tensordict.get(obs_key))
        params = dict(zip(param_keys, params if isinstance(params, tuple) else (params,)))
        # the distribution's other inputs (an action mask) come from the batch, as in get_dist
        dist = head.distribution_class(**{(dist_key[-1] if isinstance(dist_key, tuple) else dist_key):
                                          params[key] if key in params else tensordict.get(key)
                                          for dist_key, key in zip(head.dist_keys, head.in_keys)},
                                       **head.distribution_kwargs)
        log_prob = dist.log_prob(tensordict.get(keys.action))
        log_weight = (log_prob - prev_log_prob).unsqueeze(-1)
        kl_approx = (prev_log_prob - log_prob).unsqueeze(-1)
        advantage = _broadcast_advantage_to_log_weight(advantage, log_weight)
        _check_advantage_broadcast(advantage, log_weight)
        with torch.no_grad():  # TorchRL's effective sample size diagnostic
            lw = log_weight.squeeze(-1)
            ess = (2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp()
        gain1 = log_weight.exp() * advantage
        log_weight_clip = log_weight.clamp(*self._clip_bounds)
        clip_fraction = (log_weight_clip != log_weight).to(log_weight.dtype).mean()
        gain2 = log_weight_clip.exp() * advantage
        gain = torch.stack([gain1, gain2], -1).min(dim=-1).values
        out = {"loss_objective": -gain, "clip_fraction": clip_fraction, "kl_approx": kl_approx.detach().mean()}
        if self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            out["entropy"] = entropy.detach().mean()
            out["loss_entropy"] = self._weighted_loss_entropy(entropy)
        target_return = tensordict.get(keys.value_target)
        state_value = critic(*(tensordict.get(key) for key in critic_keys))
        target_return, state_value, _ = self._critic_loss_inputs(target_return, state_value, None)
        out["loss_critic"] = self.critic_coeff * distance_loss(target_return, state_value,
                                                               loss_function=self.loss_critic_type)
        if self.log_explained_variance:
            with torch.no_grad():
                tgt, pred = target_return.detach(), state_value.detach()
                resid = torch.var(tgt - pred, correction=0, dim=0)
                total = torch.var(tgt, correction=0, dim=0)
                out["explained_variance"] = 1.0 - resid / (total + torch.finfo(tgt.dtype).eps)
        out["ESS"] = ess / log_weight.shape[0]
        with torch.no_grad():
            ratio = log_weight.exp()
            out["max_ratio"], out["mean_ratio"] = ratio.max(), ratio.mean()
        return TensorDict({name: self._reduce_loss(value, tensordict).squeeze(-1) if name.startswith("loss_") else value
                           for name, value in out.items()}, [])


def minibatch_keys(losses: Sequence[LossModule]) -> list[NestedKey] | None:
    """The entries of a batch that ``losses`` read (see :meth:`GroupPPOLoss.batch_keys`), so that
    minibatches gather nothing else; None when any of them may read any entry."""
    needed = [loss.batch_keys() if isinstance(loss, GroupPPOLoss) else None for loss in losses]
    if any(keys is None for keys in needed):
        return None
    return list(dict.fromkeys(key for keys in needed for key in keys))


class HappoLoss(MAPPOLoss):
    """TorchRL's MAPPO loss (GAE, critic, value normalisation) with HAPPO's per-agent objective; see
    :func:`make_happo_loss`."""

    def _bind_happo(self, group: str, clip_epsilon: float, entropy_coef: float, mask_key: NestedKey | None) -> None:
        self.group, self.happo_clip, self.happo_entropy_coef, self.mask_key = group, clip_epsilon, entropy_coef, mask_key

    def _agent_log_ratio(self, tensordict: TensorDictBase, agent: int) -> tuple[torch.Tensor, torch.distributions.Distribution]:
        dist = _actor_dist(self, tensordict)
        log_prob = dist.log_prob(tensordict.get((self.group, "action")))
        return (log_prob - tensordict.get((self.group, "action_log_prob")))[..., agent], dist

    def _agent_mask(self, tensordict: TensorDictBase, agent: int) -> torch.Tensor | None:
        if self.mask_key is None:
            return None
        mask = tensordict.get(self.mask_key)
        return mask.reshape(*tensordict.shape, -1)[..., agent]

    def agent_ratio(self, tensordict: TensorDictBase, agent: int) -> torch.Tensor:
        """pi_new(a|o) / pi_old(a|o) of ``agent``'s taken actions, ``tensordict.shape`` (1 for dead agents)."""
        with torch.no_grad():
            ratio = self._agent_log_ratio(tensordict, agent)[0].exp()
        mask = self._agent_mask(tensordict, agent)
        return ratio if mask is None else torch.where(mask, ratio, torch.ones_like(ratio))

    def agent_terms(self, tensordict: TensorDictBase, agent: int, factor_key: NestedKey) -> TensorDictBase:
        """``loss_objective`` and ``loss_entropy`` of ``agent`` alone: PPO's clipped surrogate of its ratio
        with the advantage times ``tensordict[factor_key]`` (the product of the ratios of the agents
        updated before it this iteration)."""
        log_ratio, dist = self._agent_log_ratio(tensordict, agent)
        ratio = log_ratio.exp()
        advantage = tensordict.get((self.group, "advantage"))[..., agent, 0]
        mask = self._agent_mask(tensordict, agent)
        if self.normalize_advantage:  # MAPPOLoss's own flag
            live = advantage if mask is None else advantage[mask]
            advantage = (advantage - live.mean()) / live.std().clamp_min(1e-6)
        advantage = advantage * tensordict.get(factor_key).reshape(advantage.shape)
        clipped = ratio.clamp(1.0 - self.happo_clip, 1.0 + self.happo_clip)
        surrogate = torch.minimum(ratio * advantage, clipped * advantage)
        try:
            entropy = dist.entropy()[..., agent]
        except NotImplementedError:  # TanhNormal: a one-sample estimate, as TorchRL's PPO falls back to
            sample = dist.rsample()
            entropy = -dist.log_prob(sample)[..., agent]
        out = {
            "loss_objective": -_masked_mean(surrogate, mask),
            "entropy": _masked_mean(entropy.detach(), mask),
            "clip_fraction": _masked_mean(((ratio - 1.0).abs() > self.happo_clip).float().detach(), mask),
        }
        if self.happo_entropy_coef > 0:
            out["loss_entropy"] = -self.happo_entropy_coef * _masked_mean(entropy, mask)
        return TensorDict(out, [])

    def critic_terms(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_critic`` alone (weighted by ``critic_coef``), over every live agent."""
        value, _, _ = self.loss_critic(tensordict)
        value = value.reshape(*tensordict.shape, -1)  # [B, n_agents]
        mask = None if self.mask_key is None else tensordict.get(self.mask_key)
        return TensorDict({"loss_critic": _masked_mean(value, mask)}, [])


def make_happo_loss(
    actor: ProbabilisticActor,
    critic: TensorDictModule,
    group: str,
    *,
    gamma: float = 0.99,
    lmbda: float = 0.95,
    clip_epsilon: float = 0.2,
    entropy_coef: float = 0.0,
    critic_coef: float = 1.0,
    loss_critic_type: str = "l2",
    normalize_advantage: bool = False,
    normalize_value_target: bool = False,
    mask_key: NestedKey | None = None,
) -> HappoLoss:
    """HAPPO (Kuba et al. 2022) for one group: the same keys, GAE and critic as :func:`make_ppo_loss`.

    A HAPPO iteration updates the agents one after another: :meth:`HappoLoss.agent_terms` is agent
    ``m``'s clipped objective with its advantage weighted by ``M``, the product of the ratios
    ``pi_new / pi_old`` of the agents already updated (:meth:`HappoLoss.agent_ratio` gives each one's
    factor), and :meth:`HappoLoss.critic_terms` trains the critic alone. Without parameter sharing, a
    gradient of one agent's objective reaches only that agent's weights.
    """
    loss = _clipped_ppo(HappoLoss, actor, critic, group, gamma=gamma, lmbda=lmbda, clip_epsilon=clip_epsilon,
                        entropy_coef=entropy_coef, critic_coef=critic_coef, loss_critic_type=loss_critic_type,
                        normalize_advantage=normalize_advantage, normalize_value_target=normalize_value_target,
                        mask_key=mask_key)
    loss._bind_happo(group, clip_epsilon, entropy_coef, mask_key)
    return loss
