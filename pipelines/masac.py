"""MASAC and ISAC: soft actor-critic per group with a centralised (MASAC) or local (ISAC) Q critic,
trained off-policy from disk-backed replay.

``marlkit train masac --env vmas/navigation`` or ``python pipelines/masac.py ...``;
``marlkit train isac`` switches to local critics. The loop in :func:`train` is the whole algorithm:
collect -> store in each group's replay -> sample -> (team critics: partners' next actions, sampled) ->
actor, critic and temperature losses -> backward -> clip -> step -> update targets -> log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

from marlkit.losses import add_partner_next_actions, check_sac_settings, make_sac_loss, make_target_updater, SAC_LOSS_TERMS
from marlkit.modules import continuous_action_bounds, make_q_critic, make_stochastic_actor
from marlkit.pipelines.learners import gradient_step, Learner
from marlkit.pipelines.offpolicy import (
    build_group_learners,
    check_offpolicy,
    group_replay,
    learning_now,
    OffPolicyConfig,
    OffPolicyLossConfig,
    start_offpolicy,
)
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run
from marlkit.pipelines.teams import team_of

ALGORITHMS = ("masac", "isac")


@dataclass
class SacLossConfig(OffPolicyLossConfig):
    """SAC objective: TD(0) critic target, target networks and the entropy temperature."""

    num_qvalue_nets: int = 2
    """Q networks whose minimum forms the target (clipped double Q)."""
    alpha_init: float = 1.0
    """Initial entropy temperature."""
    fixed_alpha: bool = False
    """Keep the temperature at alpha_init instead of learning it."""
    target_entropy: float | None = None
    """Entropy target per agent; None = -(action dimensions)."""


@dataclass
class MasacConfig(OffPolicyConfig):
    """MASAC / ISAC configuration."""

    algorithm: str = "masac"
    """masac (centralised Q critic) or isac (local Q critic)."""
    loss: SacLossConfig = field(default_factory=SacLossConfig)
    """Objective."""


CONFIG = MasacConfig


def checked_iterations(cfg: MasacConfig) -> int:
    """Every check that needs no env; returns the number of iterations."""
    iterations = check_offpolicy(cfg, ALGORITHMS)
    check_sac_settings(cfg.loss.num_qvalue_nets, cfg.loss.alpha_init, prefix="loss.")
    return iterations


def build_group(env: EnvBase, group: str, cfg: MasacConfig, device: torch.device,
                scratch_dir: Path | None) -> Learner:
    """TanhNormal actor, Q critics, SAC loss and target updater for one group."""
    m, lc = cfg.model, cfg.loss
    continuous_action_bounds(env, group, cfg.algorithm)
    actor = make_stochastic_actor(env, group, num_cells=m.num_cells, activation=m.activation,
                                  share_params=m.share_params, device=device, **m.net_options())
    team = team_of(cfg.env.teams, group) if cfg.centralised_critic else [group]
    critic = make_q_critic(env, group, centralised=cfg.centralised_critic, num_cells=m.num_cells,
                           activation=m.activation, share_params=m.critic_share_params, device=device, team=team)
    loss = make_sac_loss(actor, critic, group, gamma=lc.gamma, loss_function=lc.loss_function,
                         num_qvalue_nets=lc.num_qvalue_nets, alpha_init=lc.alpha_init,
                         fixed_alpha=lc.fixed_alpha, target_entropy=lc.target_entropy,
                         mask_key=env.live_mask_key(group))
    updater = make_target_updater(loss, mode=lc.target_update, tau=lc.tau,
                                  hard_update_interval=lc.hard_update_interval)
    return Learner(actor, loss, updater, SAC_LOSS_TERMS, group_replay(cfg, group, scratch_dir, device, partners=team[1:]),
                   networks=("actor_network_params", "qvalue_network_params", "log_alpha"))


def build_learners(env: EnvBase, cfg: MasacConfig, device: torch.device, buffers: Path | None) -> dict[str, Learner]:
    """Every group's learner (a team critic's partners linked); replays under ``buffers/<group>``."""
    return build_group_learners(env, cfg, device, buffers, build_group)


def train(cfg: MasacConfig, resume: bool = False) -> TrainResult:
    """Train MASAC / ISAC as configured (``resume``: continue the run in ``logger.run_dir`` from its
    checkpoint and on-disk buffers); write the run directory; return the final metrics."""
    run, learners, training = start_offpolicy(cfg, resume, checked_iterations, build_learners)
    cfg, frames, steps = run.cfg, run.start.frames, run.start.optimiser_steps
    for iteration, batch in training.batches(run):
        frames += batch.numel()
        for learner in learners.values():  # SAC explores by sampling its policy: nothing to anneal
            learner.replay.extend(batch)
        learning = learning_now(cfg, learners, frames, iteration)
        terms: dict[str, list[TensorDictBase]] = {name: [] for name in learners}
        for _ in range(cfg.train.optimiser_steps if learning else 0):
            for name in learning:
                minibatch = learners[name].replay.sample()
                if learners[name].partners:  # the team critic's target: partners' next actions, sampled
                    add_partner_next_actions(minibatch, learners[name].partners, ExplorationType.RANDOM)
                out = learners[name].loss(minibatch)  # actor, twin-Q critic and temperature terms
                gradient_step(learners[name], training.optimisers[name], out, cfg.train.max_grad_norm,
                              cfg.train.clip_per_network)
                terms[name].append(scalar_entries(out))
            steps += len(learning)
        training.collector.update_policy_weights_()
        extra = {f"{name}/learning": float(name in learning) for name in learners}
        extra["counters/optimiser_steps"] = steps
        end_iteration(run, training, learners, iteration, batch, terms, extra, optimiser_steps=steps)
    return finish_run(run, training, optimiser_steps=steps)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/masac.py [masac|isac] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
