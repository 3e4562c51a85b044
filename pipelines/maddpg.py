"""MADDPG and IDDPG: deterministic actors with Gaussian exploration and a centralised (MADDPG) or
local (IDDPG) Q critic per group, trained off-policy from disk-backed replay.

``marlkit train maddpg --env vmas/simple_tag`` or ``python pipelines/maddpg.py ...``;
``marlkit train iddpg`` switches to local critics. The loop in :func:`train` is the whole algorithm:
collect -> store in each group's replay -> anneal the noise -> sample -> (team critics: partners' next
actions) -> loss -> backward -> clip -> step -> update targets -> weights back to the collector -> log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

from marlkit.losses import add_partner_next_actions, DDPG_LOSS_TERMS, make_ddpg_loss, make_target_updater
from marlkit.modules import continuous_action_bounds, GaussianNoise, make_deterministic_actor, make_q_critic
from marlkit.modules.exploration import check_sigma
from marlkit.pipelines.learners import gradient_step, Learner
from marlkit.pipelines.offpolicy import (
    build_group_learners,
    check_offpolicy,
    group_replay,
    learning_now,
    OffPolicyConfig,
    start_offpolicy,
)
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run
from marlkit.pipelines.teams import team_of

ALGORITHMS = ("maddpg", "iddpg")


@dataclass
class NoiseConfig:
    """Additive Gaussian action noise, annealed linearly."""

    sigma_init: float = 0.9
    """Noise standard deviation at the start."""
    sigma_end: float = 0.1
    """Noise standard deviation after annealing_frames."""
    annealing_frames: int | None = None
    """Frames over which sigma anneals; None = half the total frames."""


@dataclass
class MaddpgConfig(OffPolicyConfig):
    """MADDPG / IDDPG configuration."""

    algorithm: str = "maddpg"
    """maddpg (centralised Q critic) or iddpg (local Q critic)."""
    exploration: NoiseConfig = field(default_factory=NoiseConfig)
    """Exploration noise."""


CONFIG = MaddpgConfig


def checked_iterations(cfg: MaddpgConfig) -> int:
    """Every check that needs no env; returns the number of iterations."""
    iterations = check_offpolicy(cfg, ALGORITHMS)
    x = cfg.exploration
    check_sigma(x.sigma_init, x.sigma_end, x.annealing_frames, prefix="exploration.")
    return iterations


def build_group(env: EnvBase, group: str, cfg: MaddpgConfig, device: torch.device,
                scratch_dir: Path | None) -> Learner:
    """Deterministic actor + Gaussian noise, Q critic, DDPG loss and target updater for one group."""
    m, x, lc = cfg.model, cfg.exploration, cfg.loss
    action_spec = continuous_action_bounds(env, group, cfg.algorithm)
    actor = make_deterministic_actor(env, group, num_cells=m.num_cells, activation=m.activation,
                                     share_params=m.share_params, device=device, **m.net_options())
    team = team_of(cfg.env.teams, group) if cfg.centralised_critic else [group]
    critic = make_q_critic(env, group, centralised=cfg.centralised_critic, num_cells=m.num_cells,
                           activation=m.activation, share_params=m.critic_share_params, device=device, team=team)
    annealing = cfg.collector.total_frames // 2 if x.annealing_frames is None else x.annealing_frames
    noise = GaussianNoise(action_spec.to(device), (group, "action"), sigma_init=x.sigma_init,
                          sigma_end=x.sigma_end, annealing_frames=annealing)
    loss = make_ddpg_loss(actor, critic, group, gamma=lc.gamma, loss_function=lc.loss_function,
                          mask_key=env.live_mask_key(group))
    updater = make_target_updater(loss, mode=lc.target_update, tau=lc.tau,
                                  hard_update_interval=lc.hard_update_interval)
    replay = group_replay(cfg, group, scratch_dir, device, partners=team[1:])
    return Learner(TensorDictSequential(actor, noise), loss, updater, DDPG_LOSS_TERMS, replay, noise,
                   networks=("actor_network_params", "value_network_params"))


def build_learners(env: EnvBase, cfg: MaddpgConfig, device: torch.device, buffers: Path | None) -> dict[str, Learner]:
    """Every group's learner (a team critic's partners linked); replays under ``buffers/<group>``."""
    return build_group_learners(env, cfg, device, buffers, build_group)


def train(cfg: MaddpgConfig, resume: bool = False) -> TrainResult:
    """Train MADDPG / IDDPG as configured (``resume``: continue the run in ``logger.run_dir`` from its
    checkpoint and on-disk buffers); write the run directory; return the final metrics."""
    run, learners, training = start_offpolicy(cfg, resume, checked_iterations, build_learners)
    cfg, frames, steps = run.cfg, run.start.frames, run.start.optimiser_steps
    for iteration, batch in training.batches(run):
        frames += batch.numel()
        for learner in learners.values():
            learner.replay.extend(batch)
            learner.exploration.anneal(frames)  # the noise's sigma follows the frame count
        learning = learning_now(cfg, learners, frames, iteration)
        terms: dict[str, list[TensorDictBase]] = {name: [] for name in learners}
        for _ in range(cfg.train.optimiser_steps if learning else 0):
            for name in learning:
                learner = learners[name]
                minibatch = learner.replay.sample()
                if learner.partners:  # a team critic's target needs the partners' next (mean) actions
                    add_partner_next_actions(minibatch, learner.partners, ExplorationType.DETERMINISTIC)
                out = learner.loss(minibatch)
                gradient_step(learner, training.optimisers[name], out, cfg.train.max_grad_norm,
                              cfg.train.clip_per_network)
                terms[name].append(scalar_entries(out))
                steps += 1
        training.collector.update_policy_weights_()
        extra = {f"{name}/learning": float(name in learning) for name in learners}
        extra.update({f"{name}/sigma": learner.exploration.value for name, learner in learners.items()})
        extra["counters/optimiser_steps"] = steps
        end_iteration(run, training, learners, iteration, batch, terms, extra, optimiser_steps=steps)
    return finish_run(run, training, optimiser_steps=steps)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/maddpg.py [maddpg|iddpg] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
