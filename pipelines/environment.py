"""The ``env`` config section: its checks, its resolved form and the env it builds.

``check_env_config`` validates the section before anything is built; ``resolve_env_config`` fills in
family defaults (and records a user's env class by import path) so ``config.yaml`` says what ran;
``build_env`` calls :func:`marlkit.envs.make_env` with the family's episode-length keyword.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from marlkit.envs import check_env_name, importable, make_env, MultiAgentEnv, split_env_name
from marlkit.modules import CRITIC_STATE_KEY, RECURRENT_KINDS, state_primer

from .config import EnvConfig, ModelConfig
from .curriculum import parse_curriculum, stage_env_config, stage_seed

# The keyword each family uses for the episode length limit that env.max_steps sets.
_MAX_STEPS_KEYWORD = {
    "vmas": "max_steps",
    "gridworld": "max_steps",
    "pettingzoo": "max_cycles",
    "magent2": "max_cycles",
    "pursuit": "max_cycles",
    "gym": "max_episode_steps",
    "probe": "max_steps",
}
# VMAS scenarios never end on their own; without a limit no episode return would ever be logged.
VMAS_DEFAULT_MAX_STEPS = 100
# Keywords that count agents in the families' scenarios; 0 agents is rejected before building.
_AGENT_COUNT_KEYWORDS = ("n_agents", "num_agents", "N", "n_pursuers", "n_pistons", "num_good")


def check_env_config(env_cfg: EnvConfig) -> None:
    """Validate the env section without building anything (names, counts, sizes)."""
    family, _ = check_env_name(env_cfg.name)
    if isinstance(env_cfg.num_envs, bool) or env_cfg.num_envs < 1:
        raise ValueError(f"env.num_envs must be >= 1, got {env_cfg.num_envs}")
    if env_cfg.max_steps is not None:
        if env_cfg.max_steps < 1:
            raise ValueError(f"env.max_steps must be >= 1 or None, got {env_cfg.max_steps}")
        if family == "matrix":
            raise ValueError(
                "matrix games have a fixed episode length; set env.max_steps=null and use env.rounds"
            )
        if env_cfg.name == "probe/memory":
            raise ValueError("probe/memory lasts delay + 1 steps; set env.max_steps=null and use env.delay")
    if env_cfg.curriculum:
        parse_curriculum(env_cfg.curriculum)
    for key in _AGENT_COUNT_KEYWORDS:
        value = env_cfg.kwargs.get(key)
        if isinstance(value, int) and value < 1:
            raise ValueError(
                f"env.{key}={value}: an env without agents cannot be trained; use env.{key} >= 1"
            )


def resolve_env_config(env_cfg: EnvConfig) -> EnvConfig:
    """A copy with family defaults filled in, so ``config.yaml`` records what actually ran.

    A user's env class or factory is recorded by its import path ``"module:qualname"``; when no other
    process could import it (defined in a notebook), a warning says that eval, render and resume will
    not find it.
    """
    family, rest = split_env_name(env_cfg.name)
    resolved = copy.deepcopy(env_cfg) if isinstance(env_cfg.name, str) else dataclasses.replace(
        env_cfg, name=rest, kwargs=copy.deepcopy(env_cfg.kwargs))
    if family == "custom" and (why := importable(rest)) is not None:
        warnings.warn(
            f"env.name={rest!r} trains here, but `marlkit eval`, `render` and `--resume` will not find it: "
            f"{why}; move it into a module to keep the run reusable", stacklevel=2)
    if resolved.max_steps is None and family == "vmas":
        resolved.max_steps = VMAS_DEFAULT_MAX_STEPS
    return resolved


def build_env(env_cfg: EnvConfig, *, device: str | torch.device, seed: int,
              model: ModelConfig | None = None) -> MultiAgentEnv:
    """``make_env`` from a resolved env section, mapping ``max_steps`` to the family's keyword; with a
    recurrent ``model`` (``gru`` / ``lstm``), a primer gives each group's agents their zero state at resets."""
    family, _ = split_env_name(env_cfg.name)
    kwargs = dict(env_cfg.kwargs)
    max_steps = env_cfg.max_steps
    if max_steps is not None and family in _MAX_STEPS_KEYWORD:
        kwargs.setdefault(_MAX_STEPS_KEYWORD[family], max_steps)
    env = make_env(env_cfg.name, num_envs=env_cfg.num_envs, device=device, seed=seed, **kwargs)
    empty = [group for group, agents in env.group_map.items() if not agents]
    if not env.group_map or empty:
        raise ValueError(f"{env_cfg.name} has no agents to train (groups: {env.group_map})")
    if model is not None and model.kind in RECURRENT_KINDS:
        env.append_transform(state_primer(env, model.kind, model.num_cells))
    if model is not None and model.critic_kind in RECURRENT_KINDS:
        env.append_transform(state_primer(env, model.critic_kind, model.num_cells, key=CRITIC_STATE_KEY))
    return env


def _specs(env: MultiAgentEnv) -> dict[str, tuple]:
    """Each group's observation and action shapes (without the copies' batch dimension) and spec types."""
    specs = {}
    for group in env.group_map:
        obs, act = env.full_observation_spec[group], env.full_action_spec[group, "action"]
        batch = len(env.batch_size)
        specs[group] = ({k: tuple(v.shape[batch:]) for k, v in obs.items(True, True)},
                        type(act).__name__, tuple(act.shape[batch:]))
    return specs


def check_curriculum_specs(env_cfg: EnvConfig, env: MultiAgentEnv, *, seed: int) -> None:
    """Build each curriculum stage's env once (one copy) and refuse, in one line, a stage whose groups'
    observation or action specs differ from ``env``'s: the networks are sized from the first stage."""
    base = _specs(env)
    for stage in range(1, len(env_cfg.curriculum) + 1):
        probe = build_env(dataclasses.replace(stage_env_config(env_cfg, stage), num_envs=1), device="cpu",
                          seed=stage_seed(seed, stage))
        try:
            specs = _specs(probe)
        finally:
            probe.close()
        for group in sorted(set(base) | set(specs)):
            if base.get(group) != specs.get(group):
                raise ValueError(
                    f"env.curriculum stage {stage} changes group {group!r} (observation and action specs "
                    f"{base.get(group)} -> {specs.get(group)}); the networks are sized from the first stage, so every "
                    "stage must keep them: change other keywords, or train the stages as separate runs"
                )
