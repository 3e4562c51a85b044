"""Loss factories, each binding one group's TensorDict keys next to the objective.

:func:`make_ppo_loss` (MAPPO / IPPO, a TorchRL ``ClipPPOLoss`` with GAE) for group ``g``:

* reads ``(g, "observation")``, ``(g, "action")``, ``(g, "action_log_prob")`` (from the collecting
  policy), ``("next", g, "reward")``, ``("next", g, "done")``, ``("next", g, "terminated")`` and
  ``("next", g, "observation")``;
* its value estimator (GAE, called once per batch) writes ``(g, "state_value")``,
  ``(g, "advantage")`` and ``(g, "value_target")``;
* the loss returns ``loss_objective``, ``loss_critic`` and ``loss_entropy`` (already weighted by
  their coefficients: their sum is the quantity to minimise) plus diagnostics (``entropy``,
  ``clip_fraction``, ``kl_approx``, ``explained_variance``).

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

:func:`make_target_updater` keeps their target networks in step (soft, Polyak ``tau``, or hard).

Given ``mask_key`` (``env.live_mask_key(g)``, i.e. ``(g, "mask")`` for PettingZoo envs whose agents
can die), the PPO, DDPG, SAC and DQN losses also read that mask and average over live agents only.
"""

from __future__ import annotations

from tensordict import NestedKey
from tensordict.nn import TensorDictModule
from torchrl.modules import ProbabilisticActor, RunningValueNorm
from torch import nn
from torchrl.modules import QMixer, VDNMixer
from torchrl.objectives import DDPGLoss, DQNLoss, HardUpdate, LossModule, SACLoss, SoftUpdate, ValueEstimators
from torchrl.objectives.multiagent import MAPPOLoss, QMixerLoss
from torchrl.objectives.utils import TargetNetUpdater

LOSS_CRITIC_TYPES = ("l1", "l2", "smooth_l1")
# The terms whose sum is minimised; everything else a loss returns is a diagnostic.
PPO_LOSS_TERMS = ("loss_objective", "loss_critic", "loss_entropy")
DDPG_LOSS_TERMS = ("loss_actor", "loss_value")
SAC_LOSS_TERMS = ("loss_actor", "loss_qvalue", "loss_alpha")
TARGET_UPDATES = ("soft", "hard")
MIXERS = ("vdn", "qmix")
TEAM = "team"  # root entry holding a mixed group's team-level value, reward and flags

__all__ = [
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
    "make_ddpg_loss",
    "make_dqn_loss",
    "make_qmixer_loss",
    "make_ppo_loss",
    "make_sac_loss",
    "make_target_updater",
]


def check_td_settings(loss_function: str, gamma: float, prefix: str = "") -> None:
    """Critic regression loss and discount: ``ValueError`` naming the bad value (``prefix``: its section)."""
    if loss_function not in LOSS_CRITIC_TYPES:
        raise ValueError(
            f"{prefix}loss_function={loss_function!r} is not supported; accepted: {list(LOSS_CRITIC_TYPES)}"
        )
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"{prefix}gamma must be in (0, 1], got {gamma}")


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
) -> MAPPOLoss:
    """Clipped PPO loss with GAE for one group (``MAPPOLoss`` is TorchRL's ``ClipPPOLoss`` subclass).

    ``normalize_advantage`` standardises advantages over the minibatch (agent dim excluded);
    ``normalize_value_target`` scales the critic's regression target and prediction by running
    statistics of the value target (the MAPPO paper's value normalisation). ``mask_key`` (e.g.
    ``env.live_mask_key(group)``) names the live-agent mask: dead agents' entries leave every term.
    """
    if loss_critic_type not in LOSS_CRITIC_TYPES:
        raise ValueError(
            f"loss_critic_type={loss_critic_type!r} is not supported; accepted: {list(LOSS_CRITIC_TYPES)}"
        )
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
    if clip_epsilon <= 0.0:
        raise ValueError(f"clip_epsilon must be > 0, got {clip_epsilon}")
    loss = MAPPOLoss(
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
    loss = DQNLoss(q_network, loss_function=loss_function, delay_value=True, double_dqn=double_dqn,
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
    check_td_settings(loss_function, gamma)
    if mixer not in MIXERS:
        raise ValueError(f"mixer={mixer!r} is not supported; accepted: {list(MIXERS)}")
    if n_agents < 2:
        raise ValueError(
            f"{mixer} mixes the values of several agents; group {group!r} has {n_agents}: use algorithm=iql"
        )
    device = next(q_network.parameters()).device
    if mixer == "vdn":
        net, in_keys = VDNMixer(n_agents=n_agents, device=device), [(group, "chosen_action_value")]
    else:
        net = QMixer(state_shape=state_shape, mixing_embed_dim=mixing_embed_dim, n_agents=n_agents, device=device)
        in_keys = [(group, "chosen_action_value"), state_key]
    mixer_module = TensorDictModule(net, in_keys=in_keys, out_keys=[(TEAM, "chosen_action_value")])
    loss = QMixerLoss(q_network, mixer_module, loss_function=loss_function, delay_value=True,
                      action_space="categorical")
    loss.set_keys(
        action_value=(group, "action_value"),
        local_value=(group, "chosen_action_value"),
        global_value=(TEAM, "chosen_action_value"),
        action=(group, "action"),
        priority=(TEAM, "td_error"),
        reward=(TEAM, "reward"),
        done=(TEAM, "done"),
        terminated=(TEAM, "terminated"),
    )
    loss.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
    return loss
