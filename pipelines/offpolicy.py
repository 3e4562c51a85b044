"""What the off-policy pipelines share: MADDPG/IDDPG (``maddpg.py``), MASAC/ISAC (``masac.py``) and
IQL/VDN/QMIX (``qlearning.py``) each own their loop and call these: the replay, loss and optimisation
config sections and their checks, a group's replay, one learner per group, and who learns when.

Every learner has its own modules, optimiser and disk-backed buffer (``LazyMemmapStorage`` under
``<run-dir>/buffers/<name>``), so competing sides (chasers and evaders) learn at once;
``train.freeze_after`` stops one learner after some iterations while its policy keeps acting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchrl.envs import EnvBase

from marlkit.envs import split_env_name
from marlkit.losses import check_target_update, check_td_settings
from marlkit.pipelines.checks import check_common
from marlkit.pipelines.config import RunConfig
from marlkit.pipelines.learners import Learner
from marlkit.pipelines.replay import GroupReplay
from marlkit.pipelines.session import Run, start_run, start_training, Training
from marlkit.pipelines.teams import team_of

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
    """Gradient-norm clip per group (see clip_per_network)."""
    clip_per_network: bool = False
    """MADDPG / MASAC: clip the actor's, the critic's (and SAC's temperature's) gradient norms
    separately, each to max_grad_norm, as BenchMARL does (one optimiser per loss term); false: one norm
    over all, as TorchRL's scripts do. Q-learning trains one objective: one norm either way."""
    optimiser_steps: int = 45
    """Gradient steps per group for each collected batch."""
    freeze_after: dict[str, int] = field(default_factory=dict)
    """Group -> iterations it learns for; then its parameters freeze while its policy acts (e.g. {agent: 5})."""


@dataclass
class OffPolicyConfig(RunConfig):
    """The sections every off-policy pipeline has: replay buffers, the TD objective and optimisation."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay buffers."""
    loss: OffPolicyLossConfig = field(default_factory=OffPolicyLossConfig)
    """Objective."""
    train: OffPolicyTrainConfig = field(default_factory=OffPolicyTrainConfig)
    """Optimisation."""

    @property
    def centralised_critic(self) -> bool:
        """MADDPG / MASAC critics see the observations and actions of their whole team (``env.teams``);
        IDDPG / ISAC critics only their own agent's."""
        return self.algorithm in ("maddpg", "masac")


def group_replay(cfg: OffPolicyConfig, group: str, scratch_dir: Path | None, device: torch.device,
                 **kwargs) -> GroupReplay:
    """A group's buffer as ``cfg.replay`` says (on disk under ``scratch_dir`` when memmap)."""
    return GroupReplay(group, cfg.replay.buffer_size, cfg.replay.batch_size,
                       scratch_dir=scratch_dir if cfg.replay.memmap else None, device=device, **kwargs)


def check_offpolicy(cfg: OffPolicyConfig, algorithm_names: tuple[str, ...], discrete: bool = False) -> int:
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
    if train.optimiser_steps < 0 or not (0 < train.lr < math.inf and 0 < train.max_grad_norm < math.inf):
        raise ValueError(
            f"train.optimiser_steps ({train.optimiser_steps}) must be >= 0, train.lr ({train.lr}) and "
            f"train.max_grad_norm ({train.max_grad_norm}) finite and > 0"
        )
    for group, k in train.freeze_after.items():
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"train.freeze_after[{group!r}] must be an iteration count >= 0, got {k!r}")
    return iterations


BuildGroup = Callable[[EnvBase, str, OffPolicyConfig, torch.device, Path | None], Learner]


def build_group_learners(env: EnvBase, cfg: OffPolicyConfig, device: torch.device, buffers: Path | None,
                         build_group: BuildGroup) -> dict[str, Learner]:
    """One learner per group (``buffers/<group>`` for its replay); a centralised team critic also gets
    its partners' actors (see :func:`marlkit.losses.add_partner_next_actions`)."""
    learners = {group: build_group(env, group, cfg, device, buffers / group if buffers else None)
                for group in env.group_map}
    if cfg.centralised_critic:
        for group, learner in learners.items():
            learner.partners = {other: learners[other].loss.actor_network
                                for other in team_of(cfg.env.teams, group)[1:]}
    return learners


def check_freeze_after(cfg: OffPolicyConfig, learners: Mapping[str, Learner]) -> None:
    """``ValueError`` when ``train.freeze_after`` names no learner of this run."""
    unknown = sorted(set(cfg.train.freeze_after) - set(learners))
    if unknown:
        raise ValueError(f"train.freeze_after names unknown groups {unknown}; this run's learners: {list(learners)}")


def learning_now(cfg: OffPolicyConfig, learners: Mapping[str, Learner], frames: int, iteration: int) -> list[str]:
    """The learners that train this iteration: past the warm-up, and not yet frozen (``freeze_after``)."""
    if frames < cfg.replay.warmup_frames:
        return []
    return [name for name in learners if iteration < cfg.train.freeze_after.get(name, math.inf)]


def start_offpolicy(cfg: OffPolicyConfig, resume: bool, checked_iterations: Callable[[OffPolicyConfig], int],
                    build_learners: Callable[..., dict[str, Learner]]) -> tuple[Run, dict[str, Learner], Training]:
    """Set an off-policy run up: :func:`~marlkit.pipelines.session.start_run`, the learners (replays under
    ``<run-dir>/buffers``), then :func:`~marlkit.pipelines.session.start_training` with the random
    warm-up still due (``replay.warmup_frames`` less what a resumed run already collected)."""
    run = start_run(cfg, resume, checked_iterations)
    learners = build_learners(run.env, run.cfg, run.device, run.buffers)
    check_freeze_after(run.cfg, learners)
    step = run.env.fake_tensordict().unsqueeze(-1)  # one step of every copy, to size the buffers
    for learner in learners.values():
        learner.replay.check_space(step)
    training = start_training(run, learners, lr=run.cfg.train.lr, adam_eps=run.cfg.train.adam_eps,
                              init_random_frames=max(0, run.cfg.replay.warmup_frames - run.start.frames))
    return run, learners, training
