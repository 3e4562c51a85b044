"""Advantage actor-critic: IAC and MAA2C (a local or centralised state-value critic) and COMA.

Run it as ``marlkit train maa2c --env vmas/navigation`` or ``python pipelines/a2c.py --env ...``;
``algorithm=iac`` switches to local critics. ``algorithm=coma`` (discrete actions) replaces the value
critic by COMA's critic of the joint action, the advantage by its counterfactual baseline and GAE by
TD(lambda) targets from a target critic. Unlike PPO there is no ratio and no clipping, so each batch is
used once: the loop in :func:`train` is collect -> advantages (inside the loss) -> one gradient step on
the whole batch per group (COMA: then the target critic's update) -> weights back to the collector -> log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase

from marlkit.losses import A2C_LOSS_TERMS, COMA_LOSS_TERMS, make_a2c_loss, make_coma_loss, make_target_updater
from marlkit.modules import make_coma_critic, make_stochastic_actor
from marlkit.pipelines.checks import check_common, check_discrete_vmas, check_on_policy, check_optimiser
from marlkit.pipelines.config import RunConfig
from marlkit.pipelines.learners import actor_and_critic, gradient_step, Learner
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run, start_run, start_training

ALGORITHMS = ("maa2c", "iac", "coma")


@dataclass
class A2cLossConfig:
    """Advantage actor-critic objective and GAE."""

    gamma: float = 0.99
    """Discount factor."""
    lmbda: float = 0.95
    """GAE lambda (1.0: Monte-Carlo returns bootstrapped at the batch's end); COMA: the lambda of its
    critic's TD(lambda) targets (0.8 in the COMA paper)."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (0 disables it)."""
    critic_coef: float = 0.5
    """Weight of the critic loss."""
    loss_critic_type: str = "l2"
    """Critic regression loss: l2, l1 or smooth_l1."""
    target_update_interval: int = 20
    """COMA: gradient steps between hard copies of the critic into the target critic its targets use."""


@dataclass
class A2cTrainConfig:
    """Optimisation: one gradient step per group per collected batch."""

    lr: float = 5e-4
    """Adam learning rate."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 10.0
    """Global gradient-norm clip per group."""


@dataclass
class A2cConfig(RunConfig):
    """IAC / MAA2C configuration."""

    algorithm: str = "maa2c"
    """maa2c (centralised critic), iac (local critic) or coma (counterfactual critic of the joint action)."""
    loss: A2cLossConfig = field(default_factory=A2cLossConfig)
    """Objective."""
    train: A2cTrainConfig = field(default_factory=A2cTrainConfig)
    """Optimisation."""

    @property
    def centralised_critic(self) -> bool:
        """MAA2C's and COMA's critics see every agent of the team; IAC's only its own agent."""
        return self.algorithm != "iac"


CONFIG = A2cConfig


def checked_iterations(cfg: A2cConfig) -> int:
    """Every check that needs no env: raises ``ValueError`` naming the bad value; returns iterations."""
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not handled here; accepted: {list(ALGORITHMS)}")
    iterations = check_common(cfg)
    check_on_policy(cfg, "A2C")
    check_optimiser(cfg.train.lr, cfg.train.max_grad_norm)
    if cfg.algorithm == "coma":
        check_discrete_vmas(cfg)
        if cfg.loss.target_update_interval < 1:
            raise ValueError(f"loss.target_update_interval must be >= 1, got {cfg.loss.target_update_interval}")
    return iterations


def build_coma_group(env: EnvBase, group: str, cfg: A2cConfig, device: torch.device) -> Learner:
    """Stochastic actor, COMA critic (reading the env's ``state``, else the group's observations), COMA loss
    and the hard target updater for one group."""
    m, lc = cfg.model, cfg.loss
    actor = make_stochastic_actor(env, group, num_cells=m.num_cells, activation=m.activation,
                                  share_params=m.share_params, device=device, **m.net_options())
    state_key = "state" if "state" in env.full_observation_spec.keys() else (group, "observation")
    critic = make_coma_critic(env, group, state_key=state_key, num_cells=m.num_cells, activation=m.activation,
                              share_params=m.critic_share_params, device=device)
    loss = make_coma_loss(actor, critic, group, gamma=lc.gamma, lmbda=lc.lmbda, entropy_coef=lc.entropy_coef,
                          critic_coef=lc.critic_coef, loss_critic_type=lc.loss_critic_type,
                          mask_key=env.live_mask_key(group))
    updater = make_target_updater(loss, mode="hard", hard_update_interval=lc.target_update_interval)
    return Learner(actor, loss, updater, COMA_LOSS_TERMS)


def build_group(env: EnvBase, group: str, cfg: A2cConfig, device: torch.device) -> Learner:
    """Stochastic actor, value critic (over the team for MAA2C) and A2C loss for one group (COMA's pieces
    for ``algorithm=coma``)."""
    if cfg.algorithm == "coma":
        return build_coma_group(env, group, cfg, device)
    lc = cfg.loss
    actor, critic = actor_and_critic(env, group, cfg, centralised=cfg.centralised_critic, device=device)
    loss = make_a2c_loss(actor, critic, group, gamma=lc.gamma, lmbda=lc.lmbda, entropy_coef=lc.entropy_coef,
                         critic_coef=lc.critic_coef, loss_critic_type=lc.loss_critic_type,
                         mask_key=env.live_mask_key(group))  # agents that died leave the loss
    return Learner(actor, loss, None, A2C_LOSS_TERMS)


def build_learners(env: EnvBase, cfg: A2cConfig, device: torch.device, buffers: Path | None = None) -> dict[str, Learner]:
    """Every group's actor, critic and loss (``buffers`` unused: A2C keeps no replay)."""
    several = {team: groups for team, groups in cfg.env.teams.items() if len(groups) > 1}
    if cfg.algorithm == "coma" and several:
        raise ValueError(f"coma's critic is over one group's joint action; the teams {several} span several groups: "
                         "use maa2c or mappo for them, or set env.teams so that each group is its own team")
    return {group: build_group(env, group, cfg, device) for group in env.group_map}


def train(cfg: A2cConfig, resume: bool = False) -> TrainResult:
    """Train MAA2C / IAC as configured (``resume``: continue the run in ``logger.run_dir`` from its
    checkpoint); write the run directory; return the final metrics."""
    run = start_run(cfg, resume, checked_iterations)
    cfg = run.cfg
    learners = build_learners(run.env, cfg, run.device)
    training = start_training(run, learners, lr=cfg.train.lr, adam_eps=cfg.train.adam_eps,
                              derived={"centralised_critic": cfg.centralised_critic})
    for iteration, batch in training.batches(run):
        terms: dict[str, list[TensorDictBase]] = {}
        for group, learner in learners.items():
            out = learner.loss(batch)  # advantages on the batch (no gradient), then the three terms over all of it
            gradient_step(learner, training.optimisers[group], out, cfg.train.max_grad_norm)  # COMA: + target critic
            terms[group] = [scalar_entries(out)]
        training.collector.update_policy_weights_()
        end_iteration(run, training, learners, iteration, batch, terms)
    return finish_run(run, training)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/a2c.py [maa2c|iac|coma] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
