"""Value-based MARL: IQL (independent double DQN, dueling optional), VDN, QMIX, QTRAN, and SUPER.

``marlkit train iql|vdn|qmix|qtran --env vmas/navigation env.continuous_actions=false`` or
``python pipelines/qlearning.py ...``. With ``algorithm=iql`` and ``sharing.mode`` other than ``none``
every agent keeps its own buffer and relays selected experiences to the others (SUPER; ``all`` and
``random`` are its baselines). The loop in :func:`train` is the whole algorithm: collect -> store (SUPER:
each agent's buffer, then the selected transitions relayed to the others; VDN/QMIX/QTRAN: with the team
reward, see :func:`marlkit.losses.team_entries`) -> anneal epsilon -> sample -> TD loss (mixed over the
team for VDN/QMIX; QTRAN's joint value and its two constraints) -> backward -> clip -> step -> update targets -> new priorities -> log.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import NestedKey, TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.envs import EnvBase

from marlkit.losses import (make_dqn_loss, make_drqn_loss, make_qmixer_loss, make_qtran_loss, make_target_updater,
                            make_team_mixer_loss, TEAM)
from marlkit.modules import (EpsilonGreedy, group_spec, make_q_network, make_qtran_joint, reads_agents_first,
                             RECURRENT_KINDS)
from marlkit.modules.exploration import AnnealedTogether, check_epsilon
from marlkit.pipelines.checks import check_discrete_vmas
from marlkit.pipelines.compiled import compile_problem, CompiledQUpdate
from marlkit.pipelines.config import ModelConfig
from marlkit.pipelines.learners import gradient_step, Learner
from marlkit.pipelines.offpolicy import (
    check_offpolicy,
    group_replay,
    learning_now,
    OffPolicyConfig,
    OffPolicyLossConfig,
    OffPolicyTrainConfig,
    ReplayConfig,
    start_offpolicy,
)
from marlkit.pipelines.replay import check_sharing, ExperienceSelector, SequenceReplay, SharedReplay
from marlkit.pipelines.reporting import scalar_entries, TrainResult
from marlkit.pipelines.session import end_iteration, finish_run

ALGORITHMS = ("iql", "vdn", "qmix", "qtran")


@dataclass
class QModelConfig(ModelConfig):
    """Per-agent Q networks (MultiAgentMLP, MultiAgentConvNet in front for images) and the mixer."""

    dueling: bool = False
    """Dueling head: Q = V + A - mean(A)."""
    image_encoder: str = "conv"
    """Image observations (H x W x C): conv (a MultiAgentConvNet first) or flatten (straight into the MLP)."""
    mixing_embed_dim: int = 32
    """QMIX hypernetwork width."""
    joint_num_cells: list[int] = field(default_factory=lambda: [64, 64])
    """QTRAN: hidden sizes of the joint action-value and state-value networks (the joint action is
    embedded at the last size)."""


@dataclass
class EpsilonConfig:
    """Epsilon-greedy exploration, annealed linearly."""

    eps_init: float = 1.0
    """Probability of a random action at the start."""
    eps_end: float = 0.05
    """Probability of a random action after annealing_frames."""
    annealing_frames: int | None = None
    """Frames over which epsilon anneals; None = half the total frames."""


@dataclass
class QReplayConfig(ReplayConfig):
    """Replay buffers (per group; per agent with experience sharing), uniform or prioritized."""

    prioritized: bool = False
    """Prioritized replay: P(i) ~ |TD_i|^alpha, importance weights ^beta."""
    alpha: float = 0.6
    """Priority exponent."""
    beta: float = 0.4
    """Importance-weight exponent."""
    new_priority: float | None = None
    """Priority of newly stored transitions: None = the largest seen so far (Schaul et al.); a number
    fixes it (1.0 as RLlib, which the SUPER paper used)."""
    seq_len: int | None = None
    """Recurrent Q networks (model.kind=gru|lstm, DRQN): trained steps per replayed slice of a trajectory;
    None = model.seq_len. replay.batch_size then counts slices."""
    burn_in: int = 0
    """Recurrent Q networks: steps before each slice's trained ones that only warm its stored state up
    (R2D2's burn-in); slices start every seq_len steps and overlap by burn_in."""


@dataclass
class QLossConfig(OffPolicyLossConfig):
    """TD(0) Q-learning targets and target networks."""

    double_dqn: bool = True
    """IQL (and VDN / QMIX with recurrent Q networks): pick the next action with the online net, value it
    with the target net."""
    lambda_opt: float = 1.0
    """QTRAN: weight of L_opt (the summed agent values match the joint value at the greedy joint action)."""
    lambda_nopt: float = 0.1
    """QTRAN: weight of L_nopt (they do not fall below it at the taken joint action; PyMARL's 0.1)."""


@dataclass
class SharingConfig:
    """SUPER selective experience sharing between IQL agents."""

    mode: str = "none"
    """none, all, random, quantile, gaussian or stochastic."""
    beta: float = 0.1
    """Bandwidth: the fraction of transitions meant to be shared, in (0, 1]."""
    window: int = 1500
    """Number of recent |TD errors| the quantile and gaussian heuristics look at."""


@dataclass
class QTrainConfig(OffPolicyTrainConfig):
    """Optimisation."""

    compile: bool = False
    """IQL with per-agent prioritized replay (SUPER's layout): run each update (draw, loss, gradient, clip,
    Adam, new priorities) as one graph compiled by torch.compile (marlkit.pipelines.compiled): on a CPU a
    small network's update is mostly Python dispatch, which this removes. Compiling takes about 30 s at the
    start (a few seconds once torch's compile cache holds the graph); results agree with the eager update's to
    float precision, not bit for bit."""


@dataclass
class QlearningConfig(OffPolicyConfig):
    """IQL / VDN / QMIX configuration."""

    algorithm: str = "qmix"
    """iql (independent double DQN), vdn (sum mixer), qmix (monotonic mixer) or qtran (QTRAN-base)."""
    model: QModelConfig = field(default_factory=QModelConfig)
    """Networks."""
    exploration: EpsilonConfig = field(default_factory=EpsilonConfig)
    """Exploration."""
    replay: QReplayConfig = field(default_factory=QReplayConfig)
    """Replay buffers."""
    loss: QLossConfig = field(default_factory=QLossConfig)
    """Objective."""
    sharing: SharingConfig = field(default_factory=SharingConfig)
    """Experience sharing (IQL only)."""
    train: QTrainConfig = field(default_factory=QTrainConfig)
    """Optimisation."""


CONFIG = QlearningConfig


def checked_iterations(cfg: QlearningConfig) -> int:
    """Every check that needs no env; returns the number of iterations."""
    check_discrete_vmas(cfg)
    iterations = check_offpolicy(cfg, ALGORITHMS, discrete=True)
    s, x, r = cfg.sharing, cfg.exploration, cfg.replay
    check_sharing(s.mode, s.beta, s.window)
    if s.mode != "none" and cfg.algorithm != "iql":
        raise ValueError(f"sharing.mode={s.mode!r} shares between independent learners: use algorithm=iql")
    check_epsilon(x.eps_init, x.eps_end, x.annealing_frames, prefix="exploration.")
    if cfg.model.kind in RECURRENT_KINDS:
        check_sequences(cfg)
    elif cfg.model.kind != "mlp":
        raise ValueError(f"model.kind={cfg.model.kind} picks an actor's network; {cfg.algorithm}'s Q networks are MLPs "
                         "or recurrent (gru, lstm): use model.kind=mlp, gru or lstm, or an actor-critic (mappo, ippo, "
                         "maa2c, coma, maddpg, masac) to learn a communicating policy")
    if cfg.algorithm == "qtran" and not (0.0 <= cfg.loss.lambda_opt < math.inf and 0.0 <= cfg.loss.lambda_nopt < math.inf):
        raise ValueError(f"loss.lambda_opt ({cfg.loss.lambda_opt}) and loss.lambda_nopt ({cfg.loss.lambda_nopt}) "
                         "must be finite and >= 0")
    if cfg.model.image_encoder not in ("conv", "flatten"):
        raise ValueError(f"model.image_encoder={cfg.model.image_encoder!r}; accepted: conv, flatten")
    if r.new_priority is not None and not 0.0 < r.new_priority < math.inf:
        raise ValueError(f"replay.new_priority must be a positive number or null (the largest seen), got {r.new_priority}")
    if r.alpha < 0 or not 0.0 <= r.beta <= 1.0:
        raise ValueError(f"replay.alpha must be >= 0 and replay.beta in [0, 1], got {r.alpha}, {r.beta}")
    problem = compile_problem(cfg.algorithm, cfg.model.kind, cfg.model.share_params, r.prioritized)
    if cfg.train.compile and problem:
        raise ValueError(problem)
    return iterations


def sequence_length(cfg: QlearningConfig) -> int:
    """The trained steps of each replayed slice (DRQN): replay.seq_len, or model.seq_len when unset."""
    return cfg.model.seq_len if cfg.replay.seq_len is None else cfg.replay.seq_len


def check_sequences(cfg: QlearningConfig) -> None:
    """DRQN's slices: lengths, how they tile a collected batch, and what cannot take them yet."""
    r, seq_len = cfg.replay, sequence_length(cfg)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"replay.seq_len must be an integer >= 1 (or null: model.seq_len), got {seq_len!r}")
    if isinstance(r.burn_in, bool) or not isinstance(r.burn_in, int) or r.burn_in < 0:
        raise ValueError(f"replay.burn_in must be an integer >= 0, got {r.burn_in!r}")
    steps, length = cfg.collector.frames_per_batch // cfg.env.num_envs, r.burn_in + seq_len
    if steps < length or (steps - r.burn_in) % seq_len:
        raise ValueError(f"replay.burn_in + replay.seq_len = {r.burn_in} + {seq_len} must fit the {steps} steps each env "
                         "copy collects per batch (collector.frames_per_batch / env.num_envs), with seq_len dividing "
                         f"the {steps} - burn_in steps after the burn-in: e.g. replay.seq_len={steps - r.burn_in}")
    if r.buffer_size < r.batch_size * length:
        raise ValueError(f"replay.buffer_size={r.buffer_size} transitions hold fewer than replay.batch_size={r.batch_size} "
                         f"slices of {length} steps; raise replay.buffer_size to at least {r.batch_size * length}")
    if cfg.sharing.mode != "none":
        raise ValueError(f"sharing.mode={cfg.sharing.mode} relays single transitions between agents' buffers; recurrent "
                         "Q networks (DRQN) learn from slices of one agent's trajectory and do not share yet: use "
                         "sharing.mode=none, or model.kind=mlp to share")


def _score_with(loss, group: str):
    """|TD error| of new transitions under each agent's own online and target nets (double-Q)."""

    def score(data: TensorDictBase) -> torch.Tensor:
        data = data.clone(False)
        loss(data)  # writes the squared TD error per agent
        return data.get((group, "td_error")).reshape(data.shape[0], -1).sqrt()

    return score


def _epsilon_greedy(env: EnvBase, group: str, cfg: QlearningConfig, device: torch.device) -> EpsilonGreedy:
    x = cfg.exploration
    has_mask = (group, "action_mask") in env.full_observation_spec.keys(True, True)
    annealing = cfg.collector.total_frames // 2 if x.annealing_frames is None else x.annealing_frames
    return EpsilonGreedy(group_spec(env, group, "action"), (group, "action"),
                         mask_key=(group, "action_mask") if has_mask else None,
                         eps_init=x.eps_init, eps_end=x.eps_end, annealing_frames=annealing).to(device)


def _q_network(env: EnvBase, group: str, cfg: QlearningConfig, device: torch.device) -> TensorDictSequential:
    m = cfg.model
    return make_q_network(env, group, num_cells=m.num_cells, activation=m.activation, share_params=m.share_params,
                          dueling=m.dueling, device=device, algorithm=cfg.algorithm,
                          flatten_images=m.image_encoder == "flatten", kind=m.kind)


def _state(env: EnvBase) -> tuple[bool, tuple[int, ...]]:
    """Whether the env has a global ``state`` (QMIX's hypernetwork input), and its shape."""
    if "state" not in env.full_observation_spec.keys():
        return False, ()
    return True, tuple(env.full_observation_spec["state"].shape[len(env.batch_size):])


def _mixer_state(env: EnvBase, group: str) -> tuple[bool, NestedKey, tuple[int, ...]]:
    """What a one-group mixer reads as the state: the env's ``state``, else the group's observations;
    whether the env has a state, its key and its shape."""
    has_state, state_shape = _state(env)
    if has_state:
        return True, "state", state_shape
    return False, (group, "observation"), tuple(group_spec(env, group, "observation").shape)


def _check_team_size(group: str, n_agents: int) -> None:
    if n_agents < 2:
        raise ValueError(f"qtran factorises the joint value of several agents; group {group!r} has {n_agents}: "
                         "use algorithm=iql")


def build_group(env: EnvBase, group: str, cfg: QlearningConfig, device: torch.device,
                scratch_dir: Path | None) -> Learner:
    """Q network + epsilon-greedy, DQN or mixer loss, target updater and replay for one group."""
    m, lc, r = cfg.model, cfg.loss, cfg.replay
    q_net = _q_network(env, group, cfg, device)
    n_agents = env.n_agents(group)
    explore = _epsilon_greedy(env, group, cfg, device)
    prioritized = {"prioritized": r.prioritized, "alpha": r.alpha, "beta": r.beta, "new_priority": r.new_priority}
    if m.kind in RECURRENT_KINDS:
        return _recurrent_group(env, group, cfg, device, scratch_dir, q_net, explore, prioritized)
    if cfg.algorithm == "iql":
        loss = make_dqn_loss(q_net, group, gamma=lc.gamma, loss_function=lc.loss_function, double_dqn=lc.double_dqn,
                             mask_key=env.live_mask_key(group))
        priority_key = (group, "td_error")
        # SUPER shares within a group (its agents have the same spaces): a team's transitions never reach
        # the other side, and a one-agent group has nobody to share with. Independent learners with
        # priorities keep a buffer each, so each samples by its own |TD| (as the SUPER paper's no-sharing
        # baseline does), not by the largest over the group; uniform replay can share one buffer.
        if n_agents == 1 or (cfg.sharing.mode == "none" and not r.prioritized):
            replay = group_replay(cfg, group, scratch_dir, device, **prioritized)
        else:
            selector = ExperienceSelector(cfg.sharing.mode, n_agents, cfg.sharing.beta, cfg.sharing.window)
            replay = SharedReplay(group, n_agents, r.buffer_size, r.batch_size, device=device,
                                  scratch_dir=scratch_dir if r.memmap else None, selector=selector,
                                  score=_score_with(loss, group), **prioritized,
                                  agent_major=reads_agents_first(q_net.module[0].module))
    else:
        has_state, state_key, state_shape = _mixer_state(env, group)
        if cfg.algorithm == "qtran":
            _check_team_size(group, n_agents)
            joint = make_qtran_joint(env, group, state_shape=state_shape, num_cells=m.joint_num_cells,
                                     activation=m.activation, device=device)
            loss = make_qtran_loss(q_net, joint, group, state_key=state_key, gamma=lc.gamma,
                                   loss_function=lc.loss_function, lambda_opt=lc.lambda_opt, lambda_nopt=lc.lambda_nopt)
        else:
            loss = make_qmixer_loss(q_net, group, mixer=cfg.algorithm, n_agents=n_agents, state_key=state_key,
                                    state_shape=state_shape, gamma=lc.gamma, loss_function=lc.loss_function,
                                    mixing_embed_dim=m.mixing_embed_dim)
        priority_key = (TEAM, "td_error")
        replay = group_replay(cfg, group, scratch_dir, device, team=True, state=has_state, **prioritized)
    updater = make_target_updater(loss, mode=lc.target_update, tau=lc.tau, hard_update_interval=lc.hard_update_interval)
    return Learner(TensorDictSequential(q_net, explore), loss, updater, ("loss",), replay, explore, priority_key)


def _recurrent_group(env: EnvBase, group: str, cfg: QlearningConfig, device: torch.device, scratch_dir: Path | None,
                     q_net: TensorDictSequential, explore: EpsilonGreedy, prioritized: dict) -> Learner:
    """DRQN for one group: the recurrent Q network's loss over replayed slices (mixed for VDN / QMIX)."""
    m, lc, r = cfg.model, cfg.loss, cfg.replay
    if env.live_mask_key(group) is not None:
        raise ValueError(f"{cfg.env.name}: agents of group {group!r} can leave mid-episode, which recurrent Q networks "
                         "do not handle yet; use model.kind=mlp")
    mixer = None if cfg.algorithm == "iql" else cfg.algorithm
    has_state, state_key, state_shape = _mixer_state(env, group)
    loss = make_drqn_loss(q_net[0], group, n_agents=env.n_agents(group), mixer=mixer,
                          state_key=state_key, state_shape=state_shape,
                          gamma=lc.gamma, loss_function=lc.loss_function, double_dqn=lc.double_dqn,
                          burn_in=r.burn_in, mixing_embed_dim=m.mixing_embed_dim)
    replay = SequenceReplay(group, r.buffer_size, r.batch_size, seq_len=sequence_length(cfg), burn_in=r.burn_in,
                            scratch_dir=scratch_dir if r.memmap else None, device=device, team=mixer is not None,
                            state=has_state, **prioritized)
    updater = make_target_updater(loss, mode=lc.target_update, tau=lc.tau, hard_update_interval=lc.hard_update_interval)
    return Learner(TensorDictSequential(q_net, explore), loss, updater, ("loss",), replay, explore, loss.priority_key)


def build_team(env: EnvBase, team: str, groups: list[str], cfg: QlearningConfig, device: torch.device,
               scratch_dir: Path | None) -> Learner:
    """VDN / QMIX over the agents of several groups: a Q network and epsilon-greedy per group, one
    mixer and one replay (every group's transitions, the team reward) for the team."""
    m, lc, r = cfg.model, cfg.loss, cfg.replay
    if m.kind in RECURRENT_KINDS:
        raise ValueError(f"model.kind={m.kind} (DRQN) mixes the agents of one group; {cfg.env.name} makes the groups "
                         f"{groups} one team: use model.kind=mlp for a team of groups, or algorithm=iql")
    q_nets = {group: _q_network(env, group, cfg, device) for group in groups}
    explore = AnnealedTogether(*(_epsilon_greedy(env, group, cfg, device) for group in groups))
    has_state, state_shape = _state(env)
    if not has_state:  # the team's observations side by side (TeamValues writes them)
        state_shape = (sum(group_spec(env, g, "observation").shape.numel() for g in groups),)
    loss = make_team_mixer_loss(q_nets, {g: env.n_agents(g) for g in groups}, mixer=cfg.algorithm,
                                state_key="state" if has_state else (TEAM, "observation"), state_shape=state_shape,
                                gamma=lc.gamma, loss_function=lc.loss_function, mixing_embed_dim=m.mixing_embed_dim)
    replay = group_replay(cfg, team, scratch_dir, device, team=True, state=has_state, groups=groups,
                          prioritized=r.prioritized, alpha=r.alpha, beta=r.beta, new_priority=r.new_priority)
    updater = make_target_updater(loss, mode=lc.target_update, tau=lc.tau, hard_update_interval=lc.hard_update_interval)
    policy = TensorDictSequential(*q_nets.values(), explore)
    return Learner(policy, loss, updater, ("loss",), replay, explore, (TEAM, "td_error"))


def build_learners(env: EnvBase, cfg: QlearningConfig, device: torch.device,
                   buffers: Path | None) -> dict[str, Learner]:
    """IQL: one learner per group. VDN / QMIX: one per team (``env.teams``): a team of one group mixes
    that group's agents, a team of several groups mixes all their agents (:func:`build_team`)."""
    shared = {team: members for team, members in cfg.env.teams.items() if len(members) > 1 and cfg.algorithm != "iql"}
    if shared and cfg.algorithm == "qtran":
        raise ValueError(
            f"qtran's joint value is over one group's agents; env.teams joins groups {shared}: use vdn or qmix "
            "for a team of several groups, or leave env.teams empty"
        )
    learners = {group: [group] for group in env.group_map if not any(group in m for m in shared.values())}
    learners.update(shared)
    built = {}
    for name, members in learners.items():
        scratch = buffers / name if buffers else None
        if len(members) == 1:
            built[name] = build_group(env, members[0], cfg, device, scratch)
        else:
            built[name] = build_team(env, name, members, cfg, device, scratch)
    return built


def train(cfg: QlearningConfig, resume: bool = False) -> TrainResult:
    """Train IQL / VDN / QMIX (or SUPER) as configured (``resume``: continue the run in ``logger.run_dir``);
    write the run directory; return the final metrics."""
    run, learners, training = start_offpolicy(cfg, resume, checked_iterations, build_learners)
    cfg, frames, steps = run.cfg, run.start.frames, run.start.optimiser_steps
    compiled = {name: CompiledQUpdate(name, learner, training.optimisers[name], cfg.train.max_grad_norm)
                for name, learner in learners.items()} if cfg.train.compile else {}
    for iteration, batch in training.batches(run):
        frames += batch.numel()
        extra: dict[str, float] = {}
        for learner in learners.values():
            extra.update(learner.replay.extend(batch))  # SUPER relays here; it reports the share fraction
            learner.exploration.anneal(frames)
        learning = learning_now(cfg, learners, frames, iteration)
        terms: dict[str, list[TensorDictBase]] = {name: [] for name in learners}
        for _ in range(cfg.train.optimiser_steps if learning else 0):
            for name in learning:
                learner = learners[name]
                if name in compiled:  # train.compile: the steps below as one compiled graph
                    out = compiled[name]()
                else:
                    minibatch = learner.replay.sample()  # prioritized: with importance weights and indices
                    out = learner.loss(minibatch)  # writes each transition's squared TD error
                    gradient_step(learner, training.optimisers[name], out, cfg.train.max_grad_norm)
                    learner.replay.update_priority(minibatch, minibatch.get(learner.priority_key))
                terms[name].append(scalar_entries(out))
                steps += 1
        training.collector.update_policy_weights_()
        extra.update({f"{name}/learning": float(name in learning) for name in learners})
        extra.update({f"{name}/epsilon": learner.exploration.value for name, learner in learners.items()})
        extra["counters/optimiser_steps"] = steps
        end_iteration(run, training, learners, iteration, batch, terms, extra, optimiser_steps=steps)
    return finish_run(run, training, optimiser_steps=steps)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/qlearning.py [iql|vdn|qmix] [--env ...] [overrides]``: as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
