"""Finished runs: reading a run directory's config, rebuilding its policy, evaluating it.

:func:`load_run` rebuilds a run's env and policy from ``config.yaml`` and a checkpoint, for
``marlkit eval`` (:func:`evaluate_run`), ``marlkit render`` and notebooks. Nothing here writes to a run
except ``eval.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tensordict.nn import TensorDictSequential

from marlkit.envs import MultiAgentEnv

from . import make_config, pipeline_for
from .checkpoint import checkpoint_path, load_checkpoint, restore_modules
from .config import flatten, RunConfig
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
             device: str = "cpu") -> LoadedRun:
    """Rebuild a run's env and policy from ``config.yaml`` and a checkpoint (nothing is written)."""
    config = read_config(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir, checkpoint), config)
    cfg = config_from_dict(config)
    if num_envs is not None:
        cfg.env.num_envs = num_envs
    torch_device = torch.device(device)
    env = build_env(cfg.env, device=torch_device, seed=cfg.seed)
    learners = pipeline_for(cfg.algorithm).build_learners(env, cfg, torch_device, None)
    restore_modules(state, learners)
    policy = TensorDictSequential(*(learner.policy for learner in learners.values()))
    return LoadedRun(cfg, env, policy, state)


def evaluate_run(run_dir: str | Path, *, episodes: int = 10, checkpoint: str = "last") -> dict[str, Any]:
    """Run ``episodes`` episodes (one per env copy) greedily / with mean actions; write ``eval.json``.

    Returns per group the mean episode return (over the group's agents, then episodes), the 95%
    confidence interval (mean ± 1.96 standard errors) and every episode's return.
    """
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    loaded = load_run(run_dir, checkpoint, num_envs=episodes)
    stats = evaluate_policy(loaded.env, loaded.policy, max_steps=loaded.cfg.env.max_steps)
    loaded.env.close()
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint, "frames": loaded.state["frames"], **stats}
    (Path(run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    return result
