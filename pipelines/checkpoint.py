"""Checkpoints of a run, and loading a trained run back (for ``marlkit eval`` / ``marlkit render``).

``<run-dir>/checkpoints/last.pt`` holds every group's loss state (actor, critic and target networks,
value normalisation, SAC temperature), the optimisers, the frame / iteration / optimiser-step counters
(exploration schedules are a function of frames), the torch / numpy / Python RNG states, the
episodes in flight (simulator state and the collector's carried step) and the resolved config. Writes
are atomic: the file is written beside the old one and renamed over it, so a kill at any moment
leaves the previous checkpoint intact. Loading never runs code from the run directory
(``torch.load(weights_only=True)``, ``yaml.safe_load``) and refuses a checkpoint written for another
algorithm or config.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tensordict.nn import TensorDictSequential

from .collectors import collector_state, load_collector_state
from .config import apply_overrides, to_dict

FORMAT = 2
_READABLE_FORMATS = (1, 2)  # format 1 had no simulator state


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in config.items() if k not in ("logger", "derived", "device")}
    if not data.get("env", {}).get("teams", True):  # runs from before teams: one team per group
        data["env"] = {k: v for k, v in data["env"].items() if k != "teams"}
    if "collector" in data:
        data["collector"] = {k: v for k, v in data["collector"].items() if k != "total_frames"}
    return data


def _simulator_state(env: Any) -> dict[str, Any]:
    """The env's simulator state, or why it cannot be saved (then a resumed run restarts episodes)."""
    try:
        return {"state": env.simulator_state()}
    except NotImplementedError as err:
        return {"unsaved": str(err)}


def checkpoint_state(cfg: Any, *, iteration: int, frames: int, optimiser_steps: int,
                     agents: dict[str, Any], optimisers: dict[str, torch.optim.Optimizer],
                     env: Any, collector: Any) -> dict[str, Any]:
    """Everything needed to rebuild the policy and continue training, as plain tensors and values.

    That includes the episodes in flight: the simulator's state and the collector's carried step, so
    a resumed run continues them instead of starting from a reset. Off-policy replays are flushed in
    place first (their files already live in the run directory).
    """
    replay = {group: agent.replay.dump() for group, agent in agents.items() if agent.replay is not None}
    return {
        "format": FORMAT,
        "algorithm": cfg.algorithm,
        "config": to_dict(cfg),
        "iteration": iteration,
        "frames": frames,
        "optimiser_steps": optimiser_steps,
        "losses": {group: agent.loss.state_dict() for group, agent in agents.items()},
        "optimisers": {group: opt.state_dict() for group, opt in optimisers.items()},
        "rng": _global_rng_state(),
        "simulator": _simulator_state(env),
        "collector": collector_state(collector),
        "replay": replay,
    }


def _pack(torch_state: torch.Tensor, numpy_state: tuple, python_state: tuple) -> dict[str, Any]:
    """RNG states as tensors and lists, so ``weights_only`` loading accepts them."""
    kind, keys, pos, has_gauss, gauss = numpy_state
    version, internal, gauss_next = python_state
    return {"torch": torch_state.clone(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _unpack(state: dict[str, Any]) -> tuple[torch.Tensor, tuple, tuple]:
    n, p = state["numpy"], state["python"]
    numpy_state = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    return state["torch"], numpy_state, (p["version"], tuple(p["internal"]), p["gauss_next"])


def _vmas_rng() -> list | None:
    """VMAS keeps its own torch / numpy / Python generator states and swaps them in around its calls."""
    try:
        from vmas.simulator.environment.environment import Environment
    except ImportError:
        return None
    return Environment.vmas_random_state


def _global_rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's global generators, and VMAS's private ones."""
    state = {"global": _pack(torch.get_rng_state(), np.random.get_state(), random.getstate())}
    vmas_state = _vmas_rng()
    if vmas_state is not None:
        state["vmas"] = _pack(*vmas_state)
    return state


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch_state, numpy_state, python_state = _unpack(state["global"])
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    vmas_state = _vmas_rng()
    if vmas_state is not None and "vmas" in state:
        vmas_state[:] = list(_unpack(state["vmas"]))


def restore_modules(state: dict[str, Any], agents: dict[str, Any]) -> None:
    """Load every group's networks and exploration schedule from a checkpoint."""
    missing = sorted(set(agents) - set(state["losses"]))
    if missing:
        raise ValueError(f"checkpoint has no weights for groups {missing}")
    for group, agent in agents.items():
        agent.loss.load_state_dict(state["losses"][group])
        if agent.exploration is not None:
            agent.exploration.anneal(state["frames"])


def restore_training(state: dict[str, Any], agents: dict[str, Any],
                     optimisers: dict[str, torch.optim.Optimizer]) -> None:
    """Load modules, exploration schedules, optimisers and replays from a checkpoint."""
    restore_modules(state, agents)
    for group, agent in agents.items():
        optimisers[group].load_state_dict(state["optimisers"][group])
        if agent.replay is not None:
            agent.replay.load(state["replay"].get(group, {}))


def restore_rollout(state: dict[str, Any], env: Any, collector: Any) -> None:
    """Put the episodes in flight (simulator and collector) and the RNGs back where the checkpoint
    left them.

    Called right before the first collection of a resumed run, after everything that consumes
    random numbers while being built. An env whose state could not be saved (or a format-1
    checkpoint) starts its episodes afresh, with a warning.
    """
    simulator = state.get("simulator", {"unsaved": "the checkpoint predates simulator states"})
    if "state" in simulator:
        env.load_simulator_state(simulator["state"])
        load_collector_state(collector, state["collector"])
    else:
        warnings.warn(f"resumed episodes restart from a reset: {simulator['unsaved']}", stacklevel=2)
    _set_global_rng_state(state["rng"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` (``yaml.safe_load``), or ``ValueError`` if it is not a run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.yaml")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "algorithm" not in data:
        raise ValueError(f"{path} is not a marlkit config (no algorithm)")
    return data


def checkpoint_path(run_dir: str | Path, checkpoint: str = "last") -> Path:
    """``last`` -> ``<run-dir>/checkpoints/last.pt``; anything else is a path to a checkpoint file."""
    path = Path(run_dir) / "checkpoints" / "last.pt" if checkpoint == "last" else Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}; checkpoints are written to <run-dir>/checkpoints/last.pt")
    return path


def load_checkpoint(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint safely and check it belongs to ``config`` (a run's ``config.yaml``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise many kinds of errors
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path} is not a marlkit checkpoint (formats {_READABLE_FORMATS})")
    if state["algorithm"] != config["algorithm"]:
        raise ValueError(
            f"{path} was written by algorithm={state['algorithm']!r}, not {config['algorithm']!r}"
        )
    if _comparable(state["config"]) != _comparable(config):
        raise ValueError(f"{path} was written for another configuration than {config.get('env', {}).get('name')}'s run")
    return state


@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory."""

    cfg: Any
    """The run's config dataclass."""
    env: Any
    """A fresh env built from the config."""
    policy: TensorDictSequential
    """Every group's acting policy with the checkpoint's weights."""
    state: dict[str, Any]
    """The raw checkpoint."""


def config_from_dict(data: dict[str, Any]) -> Any:
    """The config dataclass of ``data["algorithm"]`` filled from a ``config.yaml`` dict."""
    from . import pipeline_for
    from .config import _flatten

    module = pipeline_for(data["algorithm"])
    cfg = module.CONFIG(algorithm=data["algorithm"])
    apply_overrides(cfg, _flatten({k: v for k, v in data.items() if k != "derived"}))
    return cfg


def load_run(run_dir: str | Path, checkpoint: str = "last", *, num_envs: int | None = None,
             device: str = "cpu") -> LoadedRun:
    """Rebuild a run's env and policy from ``config.yaml`` and a checkpoint (nothing is written)."""
    from . import pipeline_for
    from .common import build_env

    config = read_config(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir, checkpoint), config)
    cfg = config_from_dict(config)
    if num_envs is not None:
        cfg.env.num_envs = num_envs
    torch_device = torch.device(device)
    env = build_env(cfg.env, device=torch_device, seed=cfg.seed)
    module = pipeline_for(cfg.algorithm)
    agents = module.build_agents(env, cfg, torch_device, None)
    restore_modules(state, agents)
    policy = TensorDictSequential(*(agent.policy for agent in agents.values()))
    return LoadedRun(cfg, env, policy, state)
