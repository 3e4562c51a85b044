"""The off-policy loop shared by MADDPG/IDDPG (``maddpg.py``), MASAC/ISAC (``masac.py``) and IQL/VDN/QMIX
(``qlearning.py``).

Those files say how one group's actor, exploration, critic and loss are built; the loop here is the
whole algorithm: collect -> extend each group's replay buffer -> sample -> loss -> backward -> clip ->
step -> update targets -> weights back to the collector -> log. Every group has its own modules,
optimiser and disk-backed buffer (``LazyMemmapStorage`` under ``<run-dir>/buffers/<group>``), so
teams (chasers and evaders) learn at once; ``train.freeze_after`` stops one group's learning
after some iterations while its policy keeps acting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

from marlkit.envs import split_env_name
from marlkit.losses import add_partner_next_actions, check_target_update, check_td_settings
from marlkit.pipelines.checkpoint import restore_rollout, restore_training
from marlkit.pipelines.collectors import make_collector
from marlkit.pipelines.config import ConfigError
from marlkit.pipelines.replay import GroupReplay
from marlkit.pipelines.teams import team_of, with_teams
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

# Families whose actions are always discrete: rejected by name, before anything is built.
DISCRETE_FAMILIES = ("gridworld", "matrix")


@dataclass
class ReplayConfig:
    """One replay buffer per group, sampled uniformly."""

    buffer_size: int = 1_000_000
    """Transitions (frames) each group's buffer keeps."""
    batch_size: int = 4096
    """Transitions per sampled minibatch."""
    warmup_frames: int = 0
    """Frames collected with uniformly random actions before learning starts."""
    memmap: bool = True
    """Keep the buffers on disk (LazyMemmapStorage in <run-dir>/buffers) rather than in memory."""


@dataclass
class OffPolicyLossConfig:
    """TD(0) critic target and target networks."""

    gamma: float = 0.9
    """Discount factor."""
    loss_function: str = "l2"
    """Critic regression loss: l2, l1 or smooth_l1."""
    target_update: str = "soft"
    """soft (Polyak averaging with tau) or hard (copy every hard_update_interval steps)."""
    tau: float = 0.005
    """Soft-update rate in (0, 1]: target <- (1 - tau) target + tau online."""
    hard_update_interval: int = 1000
    """Optimiser steps between hard target copies."""


@dataclass
class OffPolicyTrainConfig:
    """Optimisation."""

    lr: float = 5e-5
    """Adam learning rate (actor, critic and, for SAC, the temperature)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 40.0
    """Global gradient-norm clip per group."""
    optimiser_steps: int = 45
    """Gradient steps per group for each collected batch."""
    freeze_after: dict[str, int] = field(default_factory=dict)
    """Group -> iterations it learns for; then its parameters freeze while its policy acts (e.g. {agent: 5})."""


def group_replay(cfg: Any, group: str, scratch_dir: Path | None, device: torch.device, **kwargs: Any) -> GroupReplay:
    """A group's buffer as ``cfg.replay`` says (on disk under ``scratch_dir`` when memmap)."""
    return GroupReplay(group, cfg.replay.buffer_size, cfg.replay.batch_size,
                       scratch_dir=scratch_dir if cfg.replay.memmap else None, device=device, **kwargs)


def check_offpolicy(cfg: Any, algorithm_names: tuple[str, ...], discrete: bool = False) -> int:
    """Checks that need no env; raises ``ValueError`` naming the bad value. Returns iterations.

    ``discrete``: the algorithm wants discrete actions (Q-learning) rather than continuous ones.
    """
    if cfg.algorithm not in algorithm_names:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not handled here; accepted: {list(algorithm_names)}")
    family, _ = split_env_name(cfg.env.name)
    if not discrete and (family in DISCRETE_FAMILIES or cfg.env.kwargs.get("continuous_actions") is False):
        raise ValueError(
            f"{cfg.algorithm} needs continuous actions; {cfg.env.name} has discrete actions "
            "(use algorithm=mappo, iql or qmix, or env.continuous_actions=true where supported)"
        )
    iterations = check_common(cfg)
    replay, loss, train = cfg.replay, cfg.loss, cfg.train
    if replay.batch_size < 1:
        raise ValueError(f"replay.batch_size must be >= 1, got {replay.batch_size}")
    if replay.buffer_size < replay.batch_size:
        raise ValueError(
            f"replay.buffer_size={replay.buffer_size} is smaller than replay.batch_size={replay.batch_size}; "
            "the buffer must hold at least one batch"
        )
    if not 0 <= replay.warmup_frames < cfg.collector.total_frames:
        raise ValueError(
            f"replay.warmup_frames={replay.warmup_frames} must be >= 0 and below the total frames "
            f"({cfg.collector.total_frames}), or nothing would be learnt"
        )
    check_target_update(loss.target_update, loss.tau, loss.hard_update_interval, prefix="loss.")
    check_td_settings(loss.loss_function, loss.gamma, prefix="loss.")
    if train.optimiser_steps < 0 or train.lr <= 0 or train.max_grad_norm <= 0:
        raise ValueError(
            f"train.optimiser_steps ({train.optimiser_steps}) must be >= 0, train.lr ({train.lr}) and "
            f"train.max_grad_norm ({train.max_grad_norm}) > 0"
        )
    for group, k in train.freeze_after.items():
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"train.freeze_after[{group!r}] must be an iteration count >= 0, got {k!r}")
    return iterations


BuildGroup = Callable[[EnvBase, str, Any, torch.device, Path | None], GroupAgent]
# env, config, device, the run's buffers folder (None: no on-disk replay) -> learner name -> its agent
BuildAgents = Callable[[EnvBase, Any, torch.device, Path | None], dict[str, GroupAgent]]


def build_group_agents(env: EnvBase, cfg: Any, device: torch.device, buffers: Path | None,
                       build_group: BuildGroup) -> dict[str, GroupAgent]:
    """One agent per group (``buffers/<group>`` for its replay); a centralised team critic also gets
    its partners' actors (see :func:`marlkit.losses.add_partner_next_actions`)."""
    agents = {group: build_group(env, group, cfg, device, buffers / group if buffers else None)
              for group in env.group_map}
    if getattr(cfg, "centralised_critic", False):
        for group, agent in agents.items():
            agent.partners = {other: agents[other].loss.actor_network for other in team_of(cfg.env.teams, group)[1:]}
    return agents


def train_offpolicy(cfg: Any, build_agents: BuildAgents, validate: Callable[[Any], int],
                    resume: bool = False) -> TrainResult:
    """Train with the off-policy loop; ``build_agents`` makes each learner's modules, loss and replay
    (a learner is a group, or for VDN/QMIX a team of groups); ``resume`` continues the run in
    ``logger.run_dir`` from its checkpoint and on-disk buffers."""
    iterations = validate(cfg)
    cfg = dataclasses.replace(cfg, env=resolve_env_config(cfg.env))
    device = resolve_device(cfg.device)
    run, start = start_run(cfg, resume)
    keep_freed_memory()  # large per-step tensors reuse heap memory instead of page-faulting
    torch.manual_seed(cfg.seed)

    env = build_env(cfg.env, device=device, seed=cfg.seed)
    cfg = with_teams(cfg, env, device)  # team critics and mixers span the groups of a team
    groups = list(env.group_map)
    try:
        agents = build_agents(env, cfg, device, run.path / "buffers")
    except ValueError as err:  # e.g. discrete actions, known only from the env's specs
        raise ConfigError(str(err)) from err
    unknown = sorted(set(cfg.train.freeze_after) - set(agents))
    if unknown:
        raise ConfigError(f"train.freeze_after names unknown groups {unknown}; this run's learners: {list(agents)}")
    partner_actions = ExplorationType.RANDOM if cfg.algorithm in ("masac", "isac") else ExplorationType.DETERMINISTIC
    optimisers = {
        group: torch.optim.Adam(agent.loss.parameters(), lr=cfg.train.lr, eps=cfg.train.adam_eps)
        for group, agent in agents.items()
    }
    if start.state is not None:
        restore_training(start.state, agents, optimisers)
    policy = TensorDictSequential(*(agent.policy for agent in agents.values()))
    collector = make_collector(env, policy, cfg.collector, device=device,
                               init_random_frames=max(0, cfg.replay.warmup_frames - start.frames))
    run.create(cfg, extra={"iterations": iterations, "groups": env.group_map})
    progress = Progress(run, groups, cfg, start)
    if start.state is not None:
        # Last: nothing after this consumes random numbers before the first collection.
        restore_rollout(start.state, env, collector)

    frames, steps = start.frames, start.optimiser_steps
    for iteration, batch in zip(range(start.iteration, iterations), collector):
        progress.collected()
        frames += batch.numel()
        extra: dict[str, float] = {}
        for name, agent in agents.items():
            extra.update(agent.replay.extend(batch))
            if agent.exploration is not None:
                agent.exploration.anneal(frames)
        learning = [
            name for name in agents
            if frames >= cfg.replay.warmup_frames and iteration < cfg.train.freeze_after.get(name, math.inf)
        ]
        terms: dict[str, list[TensorDictBase]] = {name: [] for name in agents}
        for _ in range(cfg.train.optimiser_steps if learning else 0):
            for group in learning:
                agent = agents[group]
                minibatch = agent.replay.sample()
                if agent.partners:  # a team critic's TD target needs the partners' next actions
                    add_partner_next_actions(minibatch, agent.partners, partner_actions)
                out = agent.loss(minibatch)
                total = sum(out[key] for key in agent.loss_terms)
                total.backward()
                torch.nn.utils.clip_grad_norm_(agent.loss.parameters(), cfg.train.max_grad_norm)
                optimisers[group].step()
                optimisers[group].zero_grad(set_to_none=True)
                agent.target_updater.step()
                if agent.priority_key is not None:
                    agent.replay.update_priority(minibatch, minibatch.get(agent.priority_key))
                terms[group].append(scalar_entries(out))
                steps += 1
        collector.update_policy_weights_()
        extra.update({f"{name}/learning": float(name in learning) for name in agents})
        extra.update({f"{g}/{a.exploration.name}": a.exploration.value for g, a in agents.items() if a.exploration is not None})
        extra["counters/optimiser_steps"] = steps
        extra.update(progress.evaluate(iteration, policy, iteration == iterations - 1))
        progress.log(iteration, batch, terms, extra)
        progress.checkpoint(cfg, iteration, iteration == iterations - 1, agents=agents, optimisers=optimisers,
                            optimiser_steps=steps, env=env, collector=collector)
    collector.shutdown()  # closes the env too
    return progress.finish(cfg, iterations, policy, optimiser_steps=steps)
