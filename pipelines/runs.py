"""Finished runs: reading a run directory's config, rebuilding its policy, evaluating it.

:func:`load_run` rebuilds a run's env and policy from ``config.yaml`` and a checkpoint, for
``marlkit eval`` (:func:`evaluate_run`), ``marlkit render`` and notebooks. Nothing here writes to a run
except ``eval.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tensordict.nn import TensorDictSequential

from marlkit.envs import check_env_name, MultiAgentEnv

from . import make_config, pipeline_for
from .checkpoint import checkpoint_path, load_checkpoint, restore_modules, restore_policies
from .config import apply_overrides, flatten, RunConfig
from .environment import build_env
from .evaluate import evaluate_policy


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` (``yaml.safe_load``), or ``ValueError`` if it is not a run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as err:  # e.g. !!python/object tags: never loaded
        raise ValueError(f"{path} holds a tag marlkit never writes and does not load ({err.problem}); "
                         "it is not a marlkit config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix or restore it") from None
    if not isinstance(data, dict) or "algorithm" not in data:
        raise ValueError(f"{path} is not a marlkit config (no algorithm)")
    return data


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """The config dataclass of ``data["algorithm"]`` filled from a ``config.yaml`` dict."""
    try:
        return make_config(data["algorithm"], overrides=flatten({k: v for k, v in data.items() if k != "derived"}))
    except ValueError as err:
        raise ValueError(f"config.yaml does not fit algorithm={data['algorithm']!r} (was it edited?): {err}") from None


@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory."""

    cfg: RunConfig
    """The run's config dataclass."""
    env: MultiAgentEnv
    """A fresh env built from the config."""
    policy: TensorDictSequential
    """Every group's acting policy with the checkpoint's weights."""
    state: dict[str, Any]
    """The raw checkpoint."""


def load_run(run_dir: str | Path, checkpoint: str = "last", *, num_envs: int | None = None,
             device: str = "cpu", env_name: str | None = None, env_overrides: Sequence[str] = ()) -> LoadedRun:
    """Rebuild a run's env and policy from ``config.yaml`` and a checkpoint (nothing is written).

    ``env_name`` builds another env with the run's env settings instead (one with the same groups and
    specs, e.g. ``pettingzoo/sisl/pursuit_v5`` for a run trained on ``pursuit``); ``env_overrides``
    (``["env.n_agents=5"]``) change the env's settings. On such an env only the policies need to fit
    (a centralised critic sized for another agent count is left out).
    """
    config = read_config(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir, checkpoint), config)
    cfg = config_from_dict(config)
    if num_envs is not None:
        cfg.env.num_envs = num_envs
    if env_name is not None:
        check_env_name(env_name)
        cfg.env.name = env_name
    if env_overrides:
        other = [item for item in env_overrides if not str(item).startswith("env.")]
        if other:
            raise ValueError(f"only env.* settings change for an evaluation (e.g. env.n_agents=5), got {other}")
        cfg = apply_overrides(cfg, list(env_overrides))
    torch_device = torch.device(device)
    env = build_env(cfg.env, device=torch_device, seed=cfg.seed, model=cfg.model)
    learners = pipeline_for(cfg.algorithm).build_learners(env, cfg, torch_device, None)
    try:
        restore_modules(state, learners)
    except (KeyError, RuntimeError, ValueError):  # other groups, or other observation / action sizes
        if env_name is None and not env_overrides:
            raise
        try:
            restore_policies(state, learners)
        except (KeyError, RuntimeError, ValueError) as err:
            env.close()
            reason = str(err).strip().splitlines()[0][:200]
            if "TensorDict(" in reason or "size mismatch" in reason:
                reason = "its saved weights have other shapes"
            where = " ".join([env_name or config["env"]["name"], *env_overrides])
            raise ValueError(f"the policy of {run_dir} does not fit {where} (trained on {config['env']['name']}): "
                             f"{reason}; use an env with the same groups and specs, and for another agent count "
                             "a policy with shared weights") from None
    policy = TensorDictSequential(*(learner.policy for learner in learners.values()))
    return LoadedRun(cfg, env, policy, state)


def eval_file(run_dir: str | Path, env_name: str | None = None, env_overrides: Sequence[str] = ()) -> Path:
    """Where :func:`evaluate_run` writes: ``eval.json``, or ``eval_<env>[_<setting>...].json`` on another
    env or other env settings."""
    parts = ([env_name.replace("/", "_").replace(":", ".")] if env_name is not None else []) + [
        str(item).removeprefix("env.").replace("/", "_") for item in env_overrides]
    return Path(run_dir) / ("eval.json" if not parts else f"eval_{'_'.join(parts)}.json")


def evaluate_run(run_dir: str | Path, *, episodes: int = 10, checkpoint: str = "last",
                 env_name: str | None = None, env_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``episodes`` episodes (one per env copy) greedily / with mean actions; write :func:`eval_file`.

    Returns per group the mean episode return (over the group's agents, then episodes), the 95%
    confidence interval (mean ± 1.96 standard errors) and every episode's return. ``env_name``
    evaluates on another env with the same specs (see :func:`load_run`).
    """
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    loaded = load_run(run_dir, checkpoint, num_envs=episodes, env_name=env_name, env_overrides=env_overrides)
    stats = evaluate_policy(loaded.env, loaded.policy, max_steps=loaded.cfg.env.max_steps)
    loaded.env.close()
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint, "env": loaded.cfg.env.name,
              "frames": loaded.state["frames"], **stats}
    eval_file(run_dir, env_name, env_overrides).write_text(json.dumps(result, indent=2))
    return result
