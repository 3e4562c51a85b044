"""MAPPO and IPPO: PPO with a centralised (MAPPO) or local (IPPO) critic, one actor/critic/loss per group.

Run it as ``marlkit train mappo --env vmas/navigation`` or ``python pipelines/mappo.py --env ...``;
``algorithm=ippo`` (or ``marlkit train ippo``) switches to local critics. The loop in :func:`train`
is the whole algorithm: collect -> GAE -> minibatches -> loss -> backward -> clip -> step -> weights
back to the collector -> log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import EnvBase

from marlkit.losses import estimate_advantages, make_ppo_loss, minibatch_keys, PPO_LOSS_TERMS
from marlkit.modules import RECURRENT_KINDS
from marlkit.pipelines.checks import check_common, check_on_policy, check_optimiser, recurrent
from marlkit.pipelines.config import RunConfig
from marlkit.pipelines.learners import actor_and_critic, gradient_step, Learner
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run, start_run, start_training

ALGORITHMS = ("mappo", "ippo")
PPO_NETWORKS = ("actor_network_params", "critic_network_params")


@dataclass
class PpoLossConfig:
    """Clipped PPO objective and GAE."""

    gamma: float = 0.99
    """Discount factor."""
    lmbda: float = 0.9
    """GAE lambda."""
    clip_epsilon: float = 0.2
    """PPO ratio clip."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 disables it)."""
    critic_coef: float = 1.0
    """Weight of the critic loss."""
    loss_critic_type: str = "l2"
    """Critic regression loss: l2, l1 or smooth_l1."""
    normalize_advantage: bool = False
    """Standardise advantages per minibatch."""
    normalize_value_target: bool = False
    """Normalise the critic's target by running statistics (MAPPO value normalisation)."""


@dataclass
class PpoTrainConfig:
    """Optimisation."""

    lr: float = 3e-4
    """Adam learning rate."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 5.0
    """Gradient-norm clip per group (see clip_per_network)."""
    clip_per_network: bool = False
    """Clip the actor's and the critic's gradient norms separately, each to max_grad_norm, as BenchMARL
    does (one optimiser per loss term); false: one norm over both, as TorchRL's scripts do. With one norm
    a large critic gradient (large returns) also shrinks the actor's step. HAPPO steps them apart anyway."""
    num_epochs: int = 10
    """Passes over each collected batch."""
    minibatch_size: int = 400
    """Frames per minibatch; each epoch takes frames_per_batch // minibatch_size minibatches."""


@dataclass
class MappoConfig(RunConfig):
    """MAPPO / IPPO configuration."""

    algorithm: str = "mappo"
    """mappo (centralised critic) or ippo (local critic)."""
    loss: PpoLossConfig = field(default_factory=PpoLossConfig)
    """Objective."""
    train: PpoTrainConfig = field(default_factory=PpoTrainConfig)
    """Optimisation."""

    @property
    def centralised_critic(self) -> bool:
        """MAPPO's critic sees every agent of the group; IPPO's only its own agent."""
        return self.algorithm == "mappo"


CONFIG = MappoConfig


def checked_iterations(cfg: MappoConfig) -> int:
    """Every check that needs no env: raises ``ValueError`` naming the bad value; returns iterations."""
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not handled here; accepted: {list(ALGORITHMS)}")
    return check_ppo(cfg)


def check_ppo(cfg: MappoConfig) -> int:
    """The checks every PPO pipeline (MAPPO, IPPO, HAPPO) shares; returns the number of iterations."""
    iterations = check_common(cfg)
    check_on_policy(cfg, "PPO")
    t = cfg.train
    if t.minibatch_size < 1 or t.minibatch_size > cfg.collector.frames_per_batch:
        raise ValueError(
            f"train.minibatch_size={t.minibatch_size} must be between 1 and "
            f"collector.frames_per_batch={cfg.collector.frames_per_batch}"
        )
    if t.num_epochs < 1:
        raise ValueError(f"train.num_epochs must be >= 1, got {t.num_epochs}")
    check_optimiser(t.lr, t.max_grad_norm)
    return iterations


def build_group(env: EnvBase, group: str, cfg: MappoConfig, device: torch.device) -> Learner:
    """Stochastic actor, value critic (over the team for MAPPO) and PPO loss for one group."""
    lc = cfg.loss
    actor, critic = actor_and_critic(env, group, cfg, centralised=cfg.centralised_critic, device=device)
    loss = make_ppo_loss(actor, critic, group, gamma=lc.gamma, lmbda=lc.lmbda, clip_epsilon=lc.clip_epsilon,
                         entropy_coef=lc.entropy_coef, critic_coef=lc.critic_coef,
                         loss_critic_type=lc.loss_critic_type, normalize_advantage=lc.normalize_advantage,
                         normalize_value_target=lc.normalize_value_target,
                         mask_key=env.live_mask_key(group))  # agents that died leave the loss
    # A recurrent critic runs while collecting too, so its state follows each episode as the actor's does.
    collecting = critic if cfg.model.critic_kind in RECURRENT_KINDS else None
    return Learner(actor, loss, None, PPO_LOSS_TERMS, networks=PPO_NETWORKS, collecting=collecting)


def build_learners(env: EnvBase, cfg: MappoConfig, device: torch.device, buffers: Path | None = None) -> dict[str, Learner]:
    """Every group's actor, critic and loss (``buffers`` unused: PPO keeps no replay)."""
    return {group: build_group(env, group, cfg, device) for group in env.group_map}


def train(cfg: MappoConfig, resume: bool = False) -> TrainResult:
    """Train MAPPO / IPPO as configured (``resume``: continue the run in ``logger.run_dir`` from its
    checkpoint); write the run directory; return the final metrics."""
    run = start_run(cfg, resume, checked_iterations)
    cfg = run.cfg
    learners = build_learners(run.env, cfg, run.device)
    minibatches = cfg.collector.frames_per_batch // cfg.train.minibatch_size
    training = start_training(run, learners, lr=cfg.train.lr, adam_eps=cfg.train.adam_eps, derived={
        "centralised_critic": cfg.centralised_critic, "minibatches_per_epoch": minibatches})
    # A recurrent actor or critic learns from slices of seq_len steps (each with its stored first state), so
    # a minibatch holds minibatch_size / seq_len whole slices instead of single steps.
    seq_len = cfg.model.seq_len if recurrent(cfg.model) else 1
    buffer = ReplayBuffer(storage=LazyTensorStorage(cfg.collector.frames_per_batch // seq_len, device=run.device),
                          sampler=SamplerWithoutReplacement(), batch_size=cfg.train.minibatch_size // seq_len)
    keys = minibatch_keys([learner.loss for learner in learners.values()])  # None: the losses may read any entry
    for iteration, batch in training.batches(run):
        with torch.no_grad():
            for learner in learners.values():  # GAE writes (group, "advantage") and (group, "value_target")
                estimate_advantages(learner.loss, batch)
        buffer.empty()  # this batch only; the sampler starts afresh, so a resumed run samples the same
        steps = batch if keys is None else batch.select(*keys, strict=False)  # minibatches gather only these
        buffer.extend(steps.reshape(-1) if seq_len == 1 else steps.reshape(-1, seq_len))
        terms: dict[str, list[TensorDictBase]] = {group: [] for group in learners}
        for _ in range(cfg.train.num_epochs):
            for _ in range(minibatches):
                minibatch = buffer.sample()
                for group, learner in learners.items():
                    out = learner.loss(minibatch)
                    gradient_step(learner, training.optimisers[group], out, cfg.train.max_grad_norm,
                                  cfg.train.clip_per_network)
                    terms[group].append(scalar_entries(out))
        training.collector.update_policy_weights_()
        end_iteration(run, training, learners, iteration, batch, terms)
    return finish_run(run, training)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/mappo.py [mappo|ippo] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
