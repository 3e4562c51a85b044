"""Checks of the config sections every pipeline shares, run once before anything is built.

Each raises ``ValueError`` naming the bad value and what is accepted; :func:`check_common` runs them
all and returns the number of iterations. Algorithm sections are checked by their pipeline's
``checked_iterations``.
"""

from __future__ import annotations

import importlib.util
import math

from marlkit.envs import device_of, split_env_name
from marlkit.modules import activation_class, COMM_KINDS, GNN_TOPOLOGIES, GRAPH_EXTRA, MODEL_KINDS, RECURRENT_KINDS

from .collectors import check_collector_config
from .config import CollectorConfig, LoggerConfig, ModelConfig, RunConfig
from .environment import check_env_config
from .loggers import check_logger
from .precision import check_matmul_precision


def check_frames(collector: CollectorConfig, num_envs: int) -> int:
    """Check the frame budget splits into whole iterations; return the number of iterations."""
    fpb, total = collector.frames_per_batch, collector.total_frames
    if fpb < 1 or total < 1:
        raise ValueError(f"collector.frames_per_batch ({fpb}) and --frames ({total}) must be >= 1")
    if fpb % num_envs:
        raise ValueError(
            f"collector.frames_per_batch={fpb} is not divisible by env.num_envs={num_envs}; "
            f"use a multiple of {num_envs}, e.g. {max(1, fpb // num_envs) * num_envs}"
        )
    if total % fpb:
        raise ValueError(
            f"--frames {total} is not a multiple of collector.frames_per_batch={fpb}; "
            f"use e.g. {max(1, round(total / fpb)) * fpb}"
        )
    return total // fpb


def check_model_config(model: ModelConfig) -> None:
    """Validate the model section (activation name, layer sizes, network kind)."""
    activation_class(model.activation)
    if not model.num_cells or min(model.num_cells) < 1:
        raise ValueError(f"model.num_cells must be a non-empty list of positive sizes, got {model.num_cells}")
    if model.kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={model.kind!r} is not a network kind; accepted: {', '.join(MODEL_KINDS)}")
    if model.kind in COMM_KINDS:
        if isinstance(model.comm_rounds, bool) or not isinstance(model.comm_rounds, int) or model.comm_rounds < 1:
            raise ValueError(f"model.comm_rounds must be an integer >= 1, got {model.comm_rounds!r}")
        if not model.share_params:
            raise ValueError(f"model.kind={model.kind} shares one network across a group's agents (it is what lets "
                             "them read each other's messages); set model.share_params=true")
    if model.critic_kind not in ("mlp", *RECURRENT_KINDS):
        raise ValueError(f"model.critic_kind={model.critic_kind!r}; accepted: mlp, {', '.join(RECURRENT_KINDS)}")
    if recurrent(model) and (isinstance(model.seq_len, bool) or not isinstance(model.seq_len, int)
                                          or model.seq_len < 1):
        raise ValueError(f"model.seq_len must be an integer >= 1, got {model.seq_len!r}")
    if model.kind == "gnn":
        if importlib.util.find_spec("torch_geometric") is None:
            raise ValueError(f"model.kind=gnn needs the 'torch-geometric' package, which is not installed: {GRAPH_EXTRA}")
        if model.gnn_topology not in GNN_TOPOLOGIES:
            raise ValueError(f"model.gnn_topology={model.gnn_topology!r}; accepted: {', '.join(GNN_TOPOLOGIES)}")
        if not 0 < model.gnn_radius < math.inf:
            raise ValueError(f"model.gnn_radius must be finite and > 0, got {model.gnn_radius}")
        if model.gnn_topology == "radius" and not model.gnn_position_dims:
            raise ValueError("model.gnn_topology=radius links agents by distance: set model.gnn_position_dims to the "
                             "observation entries holding the position (VMAS: [0, 1]), or use model.gnn_topology=full")


RECURRENT_ALGORITHMS = ("mappo", "ippo", "iql", "vdn", "qmix")
RECURRENT_CRITIC_ALGORITHMS = ("mappo", "ippo")
RECURRENT_Q_ALGORITHMS = ("iql", "vdn", "qmix")  # DRQN: sequence replay (replay.seq_len, replay.burn_in)


def recurrent(model: ModelConfig) -> bool:
    """Whether the actor (or Q network) or the value critic carries a state (trains on sequences)."""
    return model.kind in RECURRENT_KINDS or model.critic_kind in RECURRENT_KINDS


def check_recurrent(cfg: RunConfig) -> None:
    """Where a recurrent network (model.kind or model.critic_kind gru|lstm) trains today, and the slices it
    trains on."""
    kind = cfg.model.kind
    if cfg.model.critic_kind in RECURRENT_KINDS and cfg.algorithm not in RECURRENT_CRITIC_ALGORITHMS:
        raise ValueError(f"model.critic_kind={cfg.model.critic_kind} is a recurrent value critic for "
                         f"{' or '.join(RECURRENT_CRITIC_ALGORITHMS)}; {cfg.algorithm} takes model.critic_kind=mlp")
    if kind not in RECURRENT_KINDS:
        kind = f"mlp with model.critic_kind={cfg.model.critic_kind}"
    elif cfg.algorithm not in RECURRENT_ALGORITHMS:
        takes = "mlp" if cfg.algorithm == "qtran" else "mlp, commnet, attention, deepsets or gnn"
        raise ValueError(f"model.kind={kind} trains with {', '.join(RECURRENT_ALGORITHMS)} (learning from whole "
                         f"sequences); {cfg.algorithm} takes model.kind={takes}")
    if cfg.collector.backend != "sync":
        raise ValueError(f"model.kind={kind} keeps each agent's state in this process's collector: use "
                         f"collector.backend=sync (got {cfg.collector.backend})")
    if cfg.algorithm in RECURRENT_Q_ALGORITHMS:
        return  # its slices are the replay's: checked by the Q-learning pipeline
    steps = cfg.collector.frames_per_batch // cfg.env.num_envs
    minibatch = getattr(getattr(cfg, "train", None), "minibatch_size", cfg.collector.frames_per_batch)
    if steps % cfg.model.seq_len or minibatch % cfg.model.seq_len:
        raise ValueError(f"model.seq_len={cfg.model.seq_len} must divide the steps each env copy collects per batch "
                         f"({steps} = collector.frames_per_batch / env.num_envs) and train.minibatch_size ({minibatch})")


def check_logger_config(logger: LoggerConfig) -> None:
    """Validate the logger section (backend and its package, schedules, wandb mode)."""
    check_logger(logger.backend)
    for name in ("checkpoint_every", "eval_every", "video_every"):
        if getattr(logger, name) < 0:
            raise ValueError(f"logger.{name} must be >= 0 (0 = never), got {getattr(logger, name)}")
    for name in ("eval_episodes", "video_steps"):
        if getattr(logger, name) < 1:
            raise ValueError(f"logger.{name} must be >= 1, got {getattr(logger, name)}")
    if logger.marl_eval and logger.eval_every < 1:
        raise ValueError("logger.marl_eval=true records the evaluations during training; set logger.eval_every "
                         "to a number of iterations (e.g. logger.eval_every=10)")
    if logger.wandb_mode not in ("offline", "online"):
        raise ValueError(f"logger.wandb_mode={logger.wandb_mode!r}; accepted: offline, online")


def check_common(cfg: RunConfig) -> int:
    """The checks every pipeline shares (env, frames, collector, model, device, logger); returns the iteration count."""
    if cfg.seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy, Gymnasium and PettingZoo take no negative seeds), got {cfg.seed}")
    check_env_config(cfg.env)
    iterations = check_frames(cfg.collector, cfg.env.num_envs)
    check_collector_config(cfg)
    if cfg.env.curriculum and cfg.collector.backend != "sync":
        raise ValueError(f"env.curriculum changes the env between iterations in this process; collector.backend="
                         f"{cfg.collector.backend} steps copies built once in its workers: use collector.backend=sync")
    check_model_config(cfg.model)
    if recurrent(cfg.model):
        check_recurrent(cfg)
    device_of(cfg.device)
    check_matmul_precision(cfg.matmul_precision)
    check_logger_config(cfg.logger)
    return iterations


def check_on_policy(cfg: RunConfig, family: str) -> None:
    """On-policy algorithms (``family``: PPO, A2C) train on synchronous batches of the current policy."""
    if not cfg.collector.sync:
        raise ValueError(f"collector.sync=false collects while {family} trains, so its batches would come from older "
                         f"policies; {family} needs collector.sync=true (asynchronous collection is for off-policy "
                         "algorithms)")


def check_optimiser(lr: float, max_grad_norm: float) -> None:
    """The learning rate and gradient clip of the ``train`` section: finite and positive."""
    if not (0 < lr < math.inf and 0 < max_grad_norm < math.inf):
        raise ValueError(f"train.lr ({lr}) and train.max_grad_norm ({max_grad_norm}) must be finite and > 0")


def check_discrete_vmas(cfg: RunConfig) -> None:
    """Discrete-action algorithms on VMAS, whose scenarios default to continuous actions: the one-line fix."""
    family, _ = split_env_name(cfg.env.name)
    if family == "vmas" and cfg.env.kwargs.get("continuous_actions", True) is not False:
        raise ValueError(
            f"{cfg.algorithm} needs discrete actions; {cfg.env.name} has continuous actions by default: "
            "set env.continuous_actions=false, or use algorithm=maddpg, masac or mappo"
        )
