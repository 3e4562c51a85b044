"""MAPPO and IPPO: PPO with a centralised (MAPPO) or local (IPPO) critic, one actor/critic/loss per group.

Run it as ``marlkit train mappo --env vmas/navigation`` or ``python pipelines/mappo.py --env ...``;
``algorithm=ippo`` (or ``marlkit train ippo``) switches to local critics. The loop in :func:`train`
is the whole algorithm: collect -> GAE -> minibatches -> loss -> backward -> clip -> step -> weights
back to the collector -> log.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict.nn import TensorDictSequential
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import EnvBase

from marlkit.losses import make_ppo_loss, PPO_LOSS_TERMS
from marlkit.modules import make_stochastic_actor, make_value_critic
from marlkit.pipelines.checkpoint import restore_rollout, restore_training
from marlkit.pipelines.collectors import make_collector
from marlkit.pipelines.common import (
    build_env,
    check_common,
    GroupAgent,
    keep_freed_memory,
    Progress,
    resolve_device,
    resolve_env_config,
    scalar_entries,
    start_run,
    TrainResult,
)
from marlkit.pipelines.config import RunConfig
from marlkit.pipelines.teams import team_of, with_teams

ALGORITHMS = ("mappo", "ippo")


@dataclass
class LossConfig:
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
class TrainConfig:
    """Optimisation."""

    lr: float = 3e-4
    """Adam learning rate."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 5.0
    """Global gradient-norm clip per group."""
    num_epochs: int = 10
    """Passes over each collected batch."""
    minibatch_size: int = 400
    """Frames per minibatch; each epoch takes frames_per_batch // minibatch_size minibatches."""


@dataclass
class MappoConfig(RunConfig):
    """MAPPO / IPPO configuration."""

    algorithm: str = "mappo"
    """mappo (centralised critic) or ippo (local critic)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""

    @property
    def centralised_critic(self) -> bool:
        """MAPPO's critic sees every agent of the group; IPPO's only its own agent."""
        return self.algorithm == "mappo"


CONFIG = MappoConfig


def validate(cfg: MappoConfig) -> int:
    """Every check that needs no env: raises ``ValueError`` naming the bad value; returns iterations."""
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not handled here; accepted: {list(ALGORITHMS)}")
    iterations = check_common(cfg)
    t = cfg.train
    if t.minibatch_size < 1 or t.minibatch_size > cfg.collector.frames_per_batch:
        raise ValueError(
            f"train.minibatch_size={t.minibatch_size} must be between 1 and "
            f"collector.frames_per_batch={cfg.collector.frames_per_batch}"
        )
    if t.num_epochs < 1:
        raise ValueError(f"train.num_epochs must be >= 1, got {t.num_epochs}")
    if t.lr <= 0 or t.max_grad_norm <= 0:
        raise ValueError(f"train.lr ({t.lr}) and train.max_grad_norm ({t.max_grad_norm}) must be > 0")
    return iterations


def build_group(
    env: EnvBase, group: str, cfg: MappoConfig, device: torch.device, scratch_dir: Path | None = None
) -> GroupAgent:
    """Stochastic actor, value critic and PPO loss for one group (``scratch_dir`` unused: no replay)."""
    model, lc = cfg.model, cfg.loss
    actor = make_stochastic_actor(env, group, num_cells=model.num_cells, activation=model.activation,
                                  share_params=model.share_params, device=device)
    critic = make_value_critic(env, group, centralised=cfg.centralised_critic, num_cells=model.num_cells,
                               activation=model.activation, share_params=model.critic_share_params, device=device,
                               team=team_of(cfg.env.teams, group))
    loss = make_ppo_loss(actor, critic, group, gamma=lc.gamma, lmbda=lc.lmbda, clip_epsilon=lc.clip_epsilon,
                         entropy_coef=lc.entropy_coef, critic_coef=lc.critic_coef,
                         loss_critic_type=lc.loss_critic_type, normalize_advantage=lc.normalize_advantage,
                         normalize_value_target=lc.normalize_value_target,
                         mask_key=env.live_mask_key(group))  # agents that died leave the loss
    return GroupAgent(actor, loss, None, PPO_LOSS_TERMS)


def build_agents(env: EnvBase, cfg: MappoConfig, device: torch.device, buffers: Path | None = None) -> dict[str, GroupAgent]:
    """Every group's actor, critic and loss (``buffers`` unused: PPO keeps no replay)."""
    return {group: build_group(env, group, cfg, device) for group in env.group_map}


def train(cfg: MappoConfig, resume: bool = False) -> TrainResult:
    """Train MAPPO / IPPO as configured (``resume``: continue the run in ``logger.run_dir`` from its
    checkpoint); write the run directory; return the final metrics."""
    iterations = validate(cfg)
    cfg = dataclasses.replace(cfg, env=resolve_env_config(cfg.env))
    device = resolve_device(cfg.device)
    run, start = start_run(cfg, resume)
    keep_freed_memory()  # large per-step tensors reuse heap memory instead of page-faulting
    torch.manual_seed(cfg.seed)

    env = build_env(cfg.env, device=device, seed=cfg.seed)
    cfg = with_teams(cfg, env, device)  # MAPPO's critic sees every group of its team
    groups = list(env.group_map)
    agents = build_agents(env, cfg, device)
    losses = {group: agent.loss for group, agent in agents.items()}
    optimisers = {
        group: torch.optim.Adam(loss.parameters(), lr=cfg.train.lr, eps=cfg.train.adam_eps)
        for group, loss in losses.items()
    }
    if start.state is not None:
        restore_training(start.state, agents, optimisers)
    policy = TensorDictSequential(*(agent.policy for agent in agents.values()))
    collector = make_collector(env, policy, cfg.collector, device=device)
    buffer = ReplayBuffer(
        storage=LazyTensorStorage(cfg.collector.frames_per_batch, device=device),
        sampler=SamplerWithoutReplacement(),
        batch_size=cfg.train.minibatch_size,
    )
    minibatches = cfg.collector.frames_per_batch // cfg.train.minibatch_size

    run.create(cfg, extra={"centralised_critic": cfg.centralised_critic, "iterations": iterations,
                           "groups": env.group_map, "minibatches_per_epoch": minibatches})
    progress = Progress(run, groups, cfg, start)
    if start.state is not None:
        # Last: nothing after this consumes random numbers before the first collection.
        restore_rollout(start.state, env, collector)
    for iteration, batch in zip(range(start.iteration, iterations), collector):
        progress.collected()
        with torch.no_grad():
            for group in groups:  # GAE writes (group, "advantage") and (group, "value_target")
                loss = losses[group]
                loss.value_estimator(
                    batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params
                )
        buffer.empty()  # this batch only; the sampler starts afresh, so a resumed run samples the same
        buffer.extend(batch.reshape(-1))
        terms = {group: [] for group in groups}
        for _ in range(cfg.train.num_epochs):
            for _ in range(minibatches):
                minibatch = buffer.sample()
                for group in groups:
                    out = losses[group](minibatch)
                    total = sum(out[key] for key in PPO_LOSS_TERMS if key in out.keys())
                    total.backward()
                    torch.nn.utils.clip_grad_norm_(losses[group].parameters(), cfg.train.max_grad_norm)
                    optimisers[group].step()
                    optimisers[group].zero_grad(set_to_none=True)
                    terms[group].append(scalar_entries(out))
        collector.update_policy_weights_()
        final = iteration == iterations - 1
        progress.log(iteration, batch, terms, progress.evaluate(iteration, policy, final))
        progress.checkpoint(cfg, iteration, final, agents=agents, optimisers=optimisers, env=env,
                            collector=collector)
    collector.shutdown()  # closes the env too
    return progress.finish(cfg, iterations, policy)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/mappo.py [mappo|ippo] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
