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
"""

from __future__ import annotations

from tensordict.nn import TensorDictModule
from torchrl.modules import ProbabilisticActor, RunningValueNorm
from torchrl.objectives import ValueEstimators
from torchrl.objectives.multiagent import MAPPOLoss

LOSS_CRITIC_TYPES = ("l1", "l2", "smooth_l1")
# The terms whose sum is minimised; everything else a loss returns is a diagnostic.
PPO_LOSS_TERMS = ("loss_objective", "loss_critic", "loss_entropy")

__all__ = ["LOSS_CRITIC_TYPES", "PPO_LOSS_TERMS", "make_ppo_loss"]


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
) -> MAPPOLoss:
    """Clipped PPO loss with GAE for one group (``MAPPOLoss`` is TorchRL's ``ClipPPOLoss`` subclass).

    ``normalize_advantage`` standardises advantages over the minibatch (agent dim excluded);
    ``normalize_value_target`` scales the critic's regression target and prediction by running
    statistics of the value target (the MAPPO paper's value normalisation).
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
    return loss
