"""Checkpoint state: what a checkpoint holds, writing and reading it safely, and putting it back.

``<run-dir>/checkpoints/last.pt`` holds every group's loss state (actor, critic and target networks,
value normalisation, SAC temperature), the optimisers, the hard target updaters' step counts, the
frame / iteration / optimiser-step counters (exploration schedules are a function of frames), the
torch / numpy / Python RNG states, the episodes in flight (simulator state and the collector's carried
step) and the resolved config. Writes are atomic: the file is written beside the old one and renamed
over it, so a kill at any moment leaves the previous checkpoint intact. Loading never runs code from
the run directory (``torch.load(weights_only=True)``, ``yaml.safe_load``) and refuses a checkpoint
written for another algorithm or config.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .collectors import collector_state, load_collector_state, unsaved_episodes
from .config import RunConfig, to_dict

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


def checkpoint_state(cfg: RunConfig, *, iteration: int, frames: int, optimiser_steps: int,
                     agents: dict[str, Any], optimisers: dict[str, torch.optim.Optimizer],
                     env: Any, collector: Any) -> dict[str, Any]:
    """Everything needed to rebuild the policy and continue training, as plain tensors and values.

    That includes the episodes in flight: the simulator's state and the collector's carried step, so
    a resumed run continues them instead of starting from a reset. Off-policy replays are flushed in
    place first (their files already live in the run directory).
    """
    replay = {group: agent.replay.dump() for group, agent in agents.items() if agent.replay is not None}
    unsaved = unsaved_episodes(collector)  # the workers' copies: their episodes restart on resume
    return {
        "format": FORMAT,
        "algorithm": cfg.algorithm,
        "config": to_dict(cfg),
        "iteration": iteration,
        "frames": frames,
        "optimiser_steps": optimiser_steps,
        **learning_state(agents, optimisers),
        "rng": _global_rng_state(),
        "simulator": _simulator_state(env) if unsaved is None else {"unsaved": unsaved},
        "collector": collector_state(collector),
        "replay": replay,
    }


def learning_state(agents: dict[str, Any], optimisers: dict[str, torch.optim.Optimizer],
                   copied: bool = False) -> dict[str, Any]:
    """The checkpoint's networks (each loss's state), target-update counters and optimiser states;
    ``copied``: cloned, so that training on does not change them (a parallel evaluation's best.pt)."""
    state = {
        "losses": {group: agent.loss.state_dict() for group, agent in agents.items()},
        # a hard updater counts steps to its next copy: without the count, a resumed run copies off schedule
        "target_updaters": {group: agent.target_updater.counter for group, agent in agents.items()
                            if hasattr(agent.target_updater, "counter")},
        "optimisers": {group: opt.state_dict() for group, opt in optimisers.items()},
    }
    return copy.deepcopy(state) if copied else state


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


def restore_policies(state: dict[str, Any], agents: dict[str, Any]) -> None:
    """Load only every group's acting network (its loss's actor or Q-network parameters), e.g. on an env
    with another agent count, where centralised critics no longer fit."""
    for group, agent in agents.items():
        saved = state["losses"][group]
        prefix = next((p for p in ("actor_network_params.", "value_network_params.") if any(k.startswith(p) for k in saved)),
                      None)
        if prefix is None:
            raise KeyError(f"no acting network among the saved weights of group {group!r}")
        agent.loss.load_state_dict({k: v for k, v in saved.items() if k.startswith(prefix)}, strict=False)
        if agent.exploration is not None:
            agent.exploration.anneal(state["frames"])


def restore_training(state: dict[str, Any], agents: dict[str, Any],
                     optimisers: dict[str, torch.optim.Optimizer]) -> None:
    """Load modules, exploration schedules, optimisers and replays from a checkpoint."""
    restore_modules(state, agents)
    for name, optimiser in optimisers.items():
        optimiser.load_state_dict(state["optimisers"][name])
        for param_group in optimiser.param_groups:  # checkpoints from before the fused Adam
            param_group.update(fused=True, foreach=None)
    for group, agent in agents.items():
        if agent.replay is not None:
            agent.replay.load(state["replay"].get(group, {}))
        if hasattr(agent.target_updater, "counter"):  # checkpoints from before the count: a fresh schedule
            agent.target_updater.counter = state.get("target_updaters", {}).get(group, 0)


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


class DiskFull(OSError):
    """A run's file could not be written for lack of space (what was there before is intact)."""


def _out_of_space(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch's zip writer reports a short write as a RuntimeError ("unexpected pos", "iostream error")
    return isinstance(err, RuntimeError) and any(s in str(err) for s in ("unexpected pos", "iostream error",
                                                                         "No space left"))


@contextmanager
def space_guarded(path: Path, kept: str) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one :class:`DiskFull` line; ``kept`` says what is intact."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not _out_of_space(err):
            raise
        raise DiskFull(f"no space left on {path.parent} while writing {path.name}; {kept}") from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    kept = (f"the previous {path.name} is intact: free space there, then resume" if path.exists()
            else "no checkpoint was written yet: free space there, then --resume starts the run afresh")
    try:
        with space_guarded(path, kept):
            torch.save(state, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def checkpoint_path(run_dir: str | Path, checkpoint: str = "last") -> Path:
    """``last`` / ``best`` -> ``<run-dir>/checkpoints/last.pt`` / ``best.pt``; anything else is a path to a
    checkpoint file."""
    named = checkpoint in ("last", "best")
    path = Path(run_dir) / "checkpoints" / f"{checkpoint}.pt" if named else Path(checkpoint)
    if not path.is_file():
        if checkpoint == "best":
            raise ValueError(f"no checkpoint at {path}: best.pt is written when evaluations run during training "
                             "(logger.eval_every > 0); use --checkpoint last")
        raise ValueError(f"no checkpoint at {path}; checkpoints are written to <run-dir>/checkpoints/last.pt")
    return path


def load_checkpoint(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint safely and check it belongs to ``config`` (a run's ``config.yaml``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise many kinds of errors
        # torch's own message suggests weights_only=False: never follow it for a file one did not write
        raise ValueError(f"{path} is not a readable checkpoint: not a marlkit checkpoint, or damaged "
                         f"({type(err).__name__}); it was not loaded, and only files marlkit wrote are trusted") from None
    if not isinstance(state, dict) or state.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path} is not a marlkit checkpoint (formats {_READABLE_FORMATS})")
    if state["algorithm"] != config["algorithm"]:
        raise ValueError(
            f"{path} was written by algorithm={state['algorithm']!r}, not {config['algorithm']!r}"
        )
    if _comparable(state["config"]) != _comparable(config):
        raise ValueError(f"{path} was written for another configuration than {config.get('env', {}).get('name')}'s run")
    return state


class Checkpointer:
    """Writes ``checkpoints/last.pt`` every ``every`` iterations (0: only the last) and at the end,
    and ``checkpoints/best.pt`` whenever an evaluation has just set a new best mean return."""

    def __init__(self, run_path: Path, every: int):
        self.folder, self.every = Path(run_path) / "checkpoints", every

    def due(self, iteration: int, final: bool) -> bool:
        """Whether ``last.pt`` is written after ``iteration``."""
        return final or (self.every > 0 and (iteration + 1) % self.every == 0)

    def save(self, cfg: RunConfig, iteration: int, final: bool, *, new_best: bool, best_eval: float, frames: int,
             optimiser_steps: int, learners: dict[str, Any], optimisers: dict[str, torch.optim.Optimizer],
             env: Any, collector: Any, time_s: float = 0.0, extra: dict[str, Any] | None = None,
             best: dict[str, Any] | None = None) -> None:
        """Write what is due after ``iteration`` (nothing when neither checkpoint is); ``extra`` entries
        (e.g. the curriculum's state) go into the checkpoint as they are.

        ``best``: a parallel evaluation's new best, back after training went on: the evaluated iteration's
        counters and :func:`learning_state`, which ``best.pt`` gets instead of the current ones (its replay,
        episodes in flight and random streams are the current ones; a run resumes from ``last.pt`` only).
        Only ``best.pt`` is written then."""
        due = self.due(iteration, final) and best is None
        if not due and not new_best and best is None:
            return
        state = checkpoint_state(cfg, iteration=iteration, frames=frames, optimiser_steps=optimiser_steps,
                                 agents=learners, optimisers=optimisers, env=env, collector=collector)
        state["best_eval"] = best_eval
        state["time_s"] = time_s  # rebuilds metrics.csv's clock if the file is lost
        state.update(extra or {})
        if new_best or best is not None:
            save_checkpoint(self.folder / "best.pt", {**state, **(best or {})})
        if due:
            save_checkpoint(self.folder / "last.pt", state)
