"""HAPPO: heterogeneous-agent PPO (Kuba et al. 2022), sequential per-agent updates within each team.

Run it as ``marlkit train happo --env pettingzoo/mpe2/simple_speaker_listener_v4`` or ``python
pipelines/happo.py ...``. Each agent has its own policy (no parameter sharing) and its own Adam, so a
step on one agent's objective moves no other agent's weights. Every iteration, for each team (the
groups that share a reward: ``env.teams``), the team's agents are updated one after another in a fresh
random order: agent ``m`` maximises PPO's clipped objective with its advantage weighted by ``M``, the
product of ``pi_new / pi_old`` of the agents updated before it (``M`` starts at 1 and takes each agent's
ratio once that agent is done). Then the centralised critics are trained alone. The loop in
:func:`train` is the whole algorithm: collect -> GAE -> for each agent in a random order: epochs of
minibatches of its weighted objective, then ``M *= its ratio`` -> epochs of critic minibatches ->
weights back to the collector -> log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import EnvBase

from marlkit.losses import make_happo_loss, PPO_LOSS_TERMS
from marlkit.pipelines.config import ModelConfig
from marlkit.pipelines.learners import actor_and_critic, gradient_step, Learner, make_optimiser
from marlkit.pipelines.mappo import check_ppo, MappoConfig
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run, start_run, start_training

ALGORITHMS = ("happo",)
FACTOR = "happo_factor"  # root batch entry: M, the product of the updated agents' ratios, per transition


@dataclass
class HappoConfig(MappoConfig):
    """HAPPO configuration: MAPPO's sections, with one policy per agent."""

    algorithm: str = "happo"
    """happo (sequential per-agent PPO updates with a centralised critic)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(share_params=False))
    """Networks; ``share_params`` must stay false (each agent is updated in turn)."""


CONFIG = HappoConfig


def checked_iterations(cfg: HappoConfig) -> int:
    """Every check that needs no env: raises ``ValueError`` naming the bad value; returns iterations."""
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not handled here; accepted: {list(ALGORITHMS)}")
    if cfg.model.share_params:
        raise ValueError("happo updates each agent's policy in turn, which needs a policy per agent: "
                         "model.share_params=true would move every agent at each step; set model.share_params=false "
                         "(or use mappo for shared parameters)")
    return check_ppo(cfg)


def build_group(env: EnvBase, group: str, cfg: HappoConfig, device: torch.device) -> Learner:
    """One policy per agent, a critic over the group's team and the HAPPO loss for one group."""
    lc = cfg.loss
    actor, critic = actor_and_critic(env, group, cfg, centralised=True, device=device)
    loss = make_happo_loss(actor, critic, group, gamma=lc.gamma, lmbda=lc.lmbda, clip_epsilon=lc.clip_epsilon,
                           entropy_coef=lc.entropy_coef, critic_coef=lc.critic_coef,
                           loss_critic_type=lc.loss_critic_type, normalize_advantage=lc.normalize_advantage,
                           normalize_value_target=lc.normalize_value_target, mask_key=env.live_mask_key(group))
    return Learner(actor, loss, None, PPO_LOSS_TERMS)


def build_learners(env: EnvBase, cfg: HappoConfig, device: torch.device, buffers: Path | None = None) -> dict[str, Learner]:
    """Every group's policies, critic and loss (``buffers`` unused: PPO keeps no replay)."""
    return {group: build_group(env, group, cfg, device) for group in env.group_map}


def agent_optimiser(group: str, agent: int) -> str:
    """The name of ``agent``'s actor optimiser (checkpoints keep it under this name)."""
    return f"{group}/agent_{agent}"


def make_optimisers(env: EnvBase, learners: dict[str, Learner], cfg: HappoConfig) -> dict[str, torch.optim.Optimizer]:
    """An Adam per agent over its group's actor weights and one per critic. An agent's optimiser only
    ever sees gradients of that agent's objective, which are zero on the other agents' slices of the
    stacked weights, so their moments stay zero and its steps leave those slices exactly unchanged."""
    t = cfg.train
    optimisers = {}
    for group, learner in learners.items():
        for agent in range(env.n_agents(group)):
            optimisers[agent_optimiser(group, agent)] = make_optimiser(learner.loss.actor_network_params.values(True, True),
                                                                       t.lr, t.adam_eps)
        optimisers[f"{group}/critic"] = make_optimiser(learner.loss.critic_network_params.values(True, True),
                                                       t.lr, t.adam_eps)
    return optimisers


def update_order(env: EnvBase, groups: list[str]) -> list[tuple[str, int]]:
    """The team's agents, as (group, index), in a fresh random order (the global generator, which
    checkpoints restore, so a resumed run draws the same orders)."""
    agents = [(group, agent) for group in groups for agent in range(env.n_agents(group))]
    return [agents[i] for i in torch.randperm(len(agents)).tolist()]


def _iteration_terms(actor: list[TensorDictBase], critic: list[TensorDictBase]) -> list[TensorDictBase]:
    """One logged row's worth: the actors' and the critic's entries, each averaged over their steps."""
    means = [torch.stack(outs).float().mean(0) for outs in (actor, critic) if outs]
    return [TensorDict({k: v for out in means for k, v in out.items()}, [])]


def train(cfg: HappoConfig, resume: bool = False) -> TrainResult:
    """Train HAPPO as configured (``resume``: continue the run in ``logger.run_dir`` from its checkpoint);
    write the run directory; return the final metrics."""
    run = start_run(cfg, resume, checked_iterations)
    cfg, env = run.cfg, run.env
    learners = build_learners(env, cfg, run.device)
    minibatches = cfg.collector.frames_per_batch // cfg.train.minibatch_size
    optimisers = make_optimisers(env, learners, cfg)
    training = start_training(run, learners, lr=cfg.train.lr, adam_eps=cfg.train.adam_eps, optimisers=optimisers,
                              derived={"minibatches_per_epoch": minibatches, "teams": cfg.env.teams})
    buffer = ReplayBuffer(storage=LazyTensorStorage(cfg.collector.frames_per_batch, device=run.device),
                          sampler=SamplerWithoutReplacement(), batch_size=cfg.train.minibatch_size)
    clip = cfg.train.max_grad_norm
    for iteration, batch in training.batches(run):
        with torch.no_grad():
            for learner in learners.values():  # GAE writes (group, "advantage") and (group, "value_target")
                loss = learner.loss
                loss.value_estimator(batch, params=loss.critic_network_params,
                                     target_params=loss.target_critic_network_params)
        actor_out: dict[str, list[TensorDictBase]] = {group: [] for group in learners}
        critic_out: dict[str, list[TensorDictBase]] = {group: [] for group in learners}
        for groups in cfg.env.teams.values():
            batch.set(FACTOR, torch.ones(batch.shape, device=batch.device))
            for group, agent in update_order(env, groups):
                learner = learners[group]
                buffer.empty()
                buffer.extend(batch.reshape(-1))
                for _ in range(cfg.train.num_epochs):
                    for _ in range(minibatches):
                        out = learner.loss.agent_terms(buffer.sample(), agent, FACTOR)
                        gradient_step(learner, training.optimisers[agent_optimiser(group, agent)], out, clip)
                        actor_out[group].append(scalar_entries(out))
                batch.set(FACTOR, batch.get(FACTOR) * learner.loss.agent_ratio(batch, agent))
        buffer.empty()
        buffer.extend(batch.reshape(-1))
        for _ in range(cfg.train.num_epochs):
            for _ in range(minibatches):
                minibatch = buffer.sample()
                for group, learner in learners.items():
                    out = learner.loss.critic_terms(minibatch)
                    gradient_step(learner, training.optimisers[f"{group}/critic"], out, clip)
                    critic_out[group].append(scalar_entries(out))
        training.collector.update_policy_weights_()
        terms = {group: _iteration_terms(actor_out[group], critic_out[group]) for group in learners}
        end_iteration(run, training, learners, iteration, batch, terms)
    return finish_run(run, training)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/happo.py [happo] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
