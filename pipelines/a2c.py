"""IAC and MAA2C: synchronous advantage actor-critic with a local (IAC) or centralised (MAA2C) critic.

Run it as ``marlkit train maa2c --env vmas/navigation`` or ``python pipelines/a2c.py --env ...``;
``algorithm=iac`` switches to local critics. Unlike PPO there is no ratio and no clipping, so each
batch is used once: the loop in :func:`train` is collect -> GAE (inside the loss) -> one gradient step
on the whole batch per group -> weights back to the collector -> log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase

from marlkit.losses import A2C_LOSS_TERMS, make_a2c_loss
from marlkit.pipelines.checks import check_common, check_on_policy, check_optimiser
from marlkit.pipelines.config import RunConfig
from marlkit.pipelines.learners import actor_and_critic, gradient_step, Learner
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run, start_run, start_training

ALGORITHMS = ("maa2c", "iac")


@dataclass
class A2cLossConfig:
    """Advantage actor-critic objective and GAE."""

    gamma: float = 0.99
    """Discount factor."""
    lmbda: float = 0.95
    """GAE lambda (1.0: Monte-Carlo returns bootstrapped at the batch's end)."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (0 disables it)."""
    critic_coef: float = 0.5
    """Weight of the critic loss."""
    loss_critic_type: str = "l2"
    """Critic regression loss: l2, l1 or smooth_l1."""


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
    """maa2c (centralised critic) or iac (local critic)."""
    loss: A2cLossConfig = field(default_factory=A2cLossConfig)
    """Objective."""
    train: A2cTrainConfig = field(default_factory=A2cTrainConfig)
    """Optimisation."""

    @property
    def centralised_critic(self) -> bool:
        """MAA2C's critic sees every agent of the team; IAC's only its own agent."""
        return self.algorithm == "maa2c"


CONFIG = A2cConfig


def checked_iterations(cfg: A2cConfig) -> int:
    """Every check that needs no env: raises ``ValueError`` naming the bad value; returns iterations."""
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not handled here; accepted: {list(ALGORITHMS)}")
    iterations = check_common(cfg)
    check_on_policy(cfg, "A2C")
    check_optimiser(cfg.train.lr, cfg.train.max_grad_norm)
    return iterations


def build_group(env: EnvBase, group: str, cfg: A2cConfig, device: torch.device) -> Learner:
    """Stochastic actor, value critic (over the team for MAA2C) and A2C loss for one group."""
    lc = cfg.loss
    actor, critic = actor_and_critic(env, group, cfg, centralised=cfg.centralised_critic, device=device)
    loss = make_a2c_loss(actor, critic, group, gamma=lc.gamma, lmbda=lc.lmbda, entropy_coef=lc.entropy_coef,
                         critic_coef=lc.critic_coef, loss_critic_type=lc.loss_critic_type,
                         mask_key=env.live_mask_key(group))  # agents that died leave the loss
    return Learner(actor, loss, None, A2C_LOSS_TERMS)


def build_learners(env: EnvBase, cfg: A2cConfig, device: torch.device, buffers: Path | None = None) -> dict[str, Learner]:
    """Every group's actor, critic and loss (``buffers`` unused: A2C keeps no replay)."""
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
            out = learner.loss(batch)  # GAE on the batch (no gradient), then the three terms over all of it
            gradient_step(learner, training.optimisers[group], out, cfg.train.max_grad_norm)
            terms[group] = [scalar_entries(out)]
        training.collector.update_policy_weights_()
        end_iteration(run, training, learners, iteration, batch, terms)
    return finish_run(run, training)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/a2c.py [maa2c|iac] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
