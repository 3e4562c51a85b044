"""What every pipeline does the same way: checks, env construction, the run directory and logging.

The run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per
iteration) and ``summary.json`` (final metrics, time, throughput, versions).
"""

from __future__ import annotations

import copy
import csv
import ctypes
import dataclasses
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.objectives import LossModule
from tqdm.auto import tqdm

from marlkit.envs import check_env_name, device_of, make_env, MultiAgentEnv, split_env_name
from marlkit.envs.pettingzoo import importable

from marlkit.modules import activation_class

from .config import CollectorConfig, EnvConfig, ModelConfig, to_dict

# The keyword each family uses for the episode length limit that env.max_steps sets.
_MAX_STEPS_KEYWORD = {
    "vmas": "max_steps",
    "gridworld": "max_steps",
    "pettingzoo": "max_cycles",
    "gym": "max_episode_steps",
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
    for key in _AGENT_COUNT_KEYWORDS:
        value = env_cfg.kwargs.get(key)
        if isinstance(value, int) and value < 1:
            raise ValueError(
                f"env.{key}={value}: an env without agents cannot be trained; use env.{key} >= 1"
            )


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


def check_model_config(model: ModelConfig) -> None:
    """Validate the model section (activation name, layer sizes)."""
    activation_class(model.activation)
    if not model.num_cells or min(model.num_cells) < 1:
        raise ValueError(f"model.num_cells must be a non-empty list of positive sizes, got {model.num_cells}")


def check_logger_config(logger: Any) -> None:
    """Validate the logger section (backend and its package, schedules, wandb mode)."""
    from .loggers import check_logger

    check_logger(logger.backend)
    for name in ("checkpoint_every", "eval_every", "video_every"):
        if getattr(logger, name) < 0:
            raise ValueError(f"logger.{name} must be >= 0 (0 = never), got {getattr(logger, name)}")
    for name in ("eval_episodes", "video_steps"):
        if getattr(logger, name) < 1:
            raise ValueError(f"logger.{name} must be >= 1, got {getattr(logger, name)}")
    if logger.wandb_mode not in ("offline", "online"):
        raise ValueError(f"logger.wandb_mode={logger.wandb_mode!r}; accepted: offline, online")


def check_common(cfg: Any) -> int:
    """The checks every pipeline shares (env, frames, model, device, logger); returns the iteration count."""
    check_env_config(cfg.env)
    iterations = check_frames(cfg.collector, cfg.env.num_envs)
    check_model_config(cfg.model)
    device_of(cfg.device)
    check_logger_config(cfg.logger)
    return iterations


def build_env(env_cfg: EnvConfig, *, device: str | torch.device, seed: int) -> MultiAgentEnv:
    """``make_env`` from a resolved env section, mapping ``max_steps`` to the family's keyword."""
    family, _ = split_env_name(env_cfg.name)
    kwargs = dict(env_cfg.kwargs)
    max_steps = env_cfg.max_steps
    if max_steps is not None and family in _MAX_STEPS_KEYWORD:
        kwargs.setdefault(_MAX_STEPS_KEYWORD[family], max_steps)
    env = make_env(env_cfg.name, num_envs=env_cfg.num_envs, device=device, seed=seed, **kwargs)
    empty = [group for group, agents in env.group_map.items() if not agents]
    if not env.group_map or empty:
        raise ValueError(f"{env_cfg.name} has no agents to train (groups: {env.group_map})")
    return env


# glibc's largest allowed mmap threshold on 64-bit, and a trim threshold above one step's working set.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS after each step.

    A training step allocates and frees the same large activation tensors (12 MB each in QMIX's
    4096-sample steps) over and over. glibc's defaults return them to the OS, so each step page-faults
    them in afresh: about 13,000 faults and a quarter of the step's time on the benchmark machine.
    Raising the mmap and trim thresholds with ``mallopt`` (the knobs the ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` environment variables set) keeps them; peak memory is unchanged. Applies
    to the whole process, on Linux with glibc only; ``MARLKIT_KEEP_FREED_MEMORY=0`` turns it off.
    Returns whether it was applied.
    """
    if sys.platform != "linux" or os.environ.get("MARLKIT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, _TRIM_THRESHOLD))


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device`` (``cpu``/``cuda``/``cuda:N``), failing early when absent."""
    return device_of(device)


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on (for summary.json)."""
    out = {"python": platform.python_version()}
    for package in ("marlkit", "torch", "torchrl", "tensordict", "vmas", "pettingzoo", "gymnasium"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def default_run_dir(algorithm: str, env_name: str, seed: int) -> Path:
    """``runs/<algorithm>-<env>-s<seed>-<timestamp>`` under the current directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{algorithm}-{env_name.replace('/', '_').replace(':', '.')}-s{seed}-{stamp}"


class RunDir:
    """Writes a run directory: ``config.yaml``, ``metrics.csv`` (row per iteration), ``summary.json``.

    Refuses a directory that already holds a run, so nothing a user has is overwritten.
    """

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self._columns: list[str] | None = None
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise ValueError(f"cannot resume {self.path}: it is not a run directory (no config.yaml)")
        elif (self.path / "metrics.csv").exists() or (self.path / "config.yaml").exists():
            raise ValueError(
                f"{self.path} already holds a run (config.yaml / metrics.csv); choose another "
                "--run-dir so the existing results are kept, or continue it with --resume"
            )

    def keep_rows_through(self, iteration: int) -> float:
        """On resume: drop metrics rows after the checkpoint's ``iteration`` (they are run again, so
        none is duplicated); returns the last kept row's ``time_s``."""
        file = self.path / "metrics.csv"
        if not file.exists():
            return 0.0
        with file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if int(row["iteration"]) <= iteration]
        tmp = file.with_name(".metrics.csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(file)
        self._columns = columns
        return float(rows[-1]["time_s"]) if rows else 0.0

    def create(self, config: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Create the directory and write the resolved config (plus derived values in ``extra``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = to_dict(config)
        if extra:
            data["derived"] = dict(extra)
        (self.path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def log(self, row: Mapping[str, float]) -> None:
        """Append one iteration's metrics to ``metrics.csv``.

        A column that first appears later (loss terms once learning starts after a warm-up) widens
        the header; earlier rows get empty cells there.
        """
        file = self.path / "metrics.csv"
        new = [key for key in row if key not in (self._columns or [])]
        if self._columns is None or new:
            old_rows = []
            if self._columns is not None:
                with file.open(newline="") as handle:
                    old_rows = list(csv.DictReader(handle))
            self._columns = [*(self._columns or []), *new]
            with file.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, self._columns, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
        with file.open("a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(c, math.nan)) for c in self._columns])

    def summary(self, data: Mapping[str, Any]) -> None:
        """Write ``summary.json``."""
        (self.path / "summary.json").write_text(json.dumps(dict(data), indent=2, default=str))


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def scalar_entries(loss_out: TensorDictBase) -> TensorDictBase:
    """The scalar entries of a loss output (terms and diagnostics), detached, for logging."""
    keys = [key for key, value in loss_out.items() if value.numel() == 1]
    return loss_out.select(*keys).detach().reshape(())


def mean_entries(outputs: list[TensorDictBase], prefix: str) -> dict[str, float]:
    """Mean of each logged entry over an iteration's optimiser steps, as ``{prefix/key: value}``."""
    if not outputs:
        return {}
    means = torch.stack(outputs).float().mean(0)  # one device sync per iteration, not per step
    return {f"{prefix}/{key}": value.item() for key, value in means.items()}


def episode_reward_means(batch: TensorDictBase, groups: list[str]) -> dict[str, float]:
    """Mean return of the episodes that ended in ``batch``, per group (NaN when none ended)."""
    out = {}
    for group in groups:
        done = batch.get(("next", group, "done"))
        returns = batch.get(("next", group, "episode_reward"))[done]
        out[group] = returns.mean().item() if returns.numel() else math.nan
    return out


@dataclass
class GroupAgent:
    """What a pipeline builds for one group (``build_group``); checkpoints and eval rebuild it."""

    policy: TensorDictModuleBase
    """The module that acts in the env (actor, then exploration when there is one)."""
    loss: LossModule
    """The group's loss; its parameters are what the optimiser trains."""
    target_updater: Any
    """Keeps the loss's target networks in step (None for on-policy losses)."""
    loss_terms: tuple[str, ...]
    """Keys of the loss output whose sum is minimised."""
    replay: Any = None
    """The group's replay (``extend``, ``sample``, ``update_priority``), see :mod:`.replay`; None on-policy."""
    exploration: Any = None
    """Annealed exploration module (``anneal(frames)``), or None."""
    priority_key: Any = None
    """Where the loss writes the TD error that updates replay priorities, or None."""
    partners: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Team critics: the other team groups' actors, which give their next actions to the TD target."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    """The run directory written."""
    metrics: dict[str, float]
    """The last iteration's metrics row."""
    episode_reward_mean: dict[str, float]
    """Last mean episode return per group."""
    frames: int
    """Frames collected."""
    time_s: float
    """Wall seconds of the training loop."""
    frames_per_s: float
    """frames / time_s."""
    policy: Any = None
    """The trained acting policy; exploration switches off under ExplorationType.DETERMINISTIC."""


class Progress:
    """The bookkeeping every training loop shares, so the loop itself shows only the algorithm.

    Per iteration: call :meth:`collected` when the batch arrives and :meth:`log` after training;
    they time both phases, build the ``metrics.csv`` row (frames, time, frames/s, each group's mean
    episode return and mean loss entries), move the tqdm bar and keep the latest return per group.
    :meth:`finish` writes ``summary.json`` and returns the :class:`TrainResult`.
    """

    def __init__(self, run: RunDir, groups: list[str], cfg: Any, start: Any = None):
        start_frames = start.frames if start is not None else 0
        start_time_s = start.time_s if start is not None else 0.0
        self.run, self.groups, self.cfg = run, groups, cfg
        self.bar = tqdm(total=cfg.collector.total_frames, initial=start_frames, unit="frames",
                        disable=not cfg.logger.progress)
        from .loggers import make_logger

        self.logger = make_logger(cfg.logger.backend, run.path, to_dict(cfg), cfg.logger.wandb_mode)
        self.best_eval = start.state.get("best_eval", -math.inf) if start is not None and start.state else -math.inf
        self._new_best = False
        self._eval_env = None
        if cfg.logger.eval_every or cfg.logger.video_every:
            # Built now, before a resumed run restores its RNG: env construction may reseed.
            self._eval_env = build_env(dataclasses.replace(cfg.env, num_envs=cfg.logger.eval_episodes),
                                       device=device_of(cfg.device), seed=cfg.seed + 10_000)
        self.frames, self.row = start_frames, {}
        self.rewards = {group: math.nan for group in groups}
        self.start = self._iteration_start = self._train_start = time.perf_counter() - start_time_s
        self._collection_s = 0.0

    def collected(self) -> None:
        """The batch has arrived: collection time ends, training time starts."""
        self._train_start = time.perf_counter()
        self._collection_s = self._train_start - self._iteration_start

    def log(
        self,
        iteration: int,
        batch: TensorDictBase,
        terms: Mapping[str, list[TensorDictBase]],
        extra: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Write the iteration's row (``terms``: each group's loss outputs this iteration)."""
        now = time.perf_counter()
        self.frames += batch.numel()
        means = episode_reward_means(batch, self.groups)
        self.rewards.update({g: r for g, r in means.items() if not math.isnan(r)})
        row = {"iteration": iteration, "frames": self.frames, "time_s": now - self.start,
               "frames_per_s": batch.numel() / (now - self._iteration_start)}
        for group in self.groups:
            row[f"{group}/episode_reward_mean"] = means[group]
            row.update(mean_entries(terms.get(group, []), group))
        for learner in terms:  # a team of several groups learns as one (VDN / QMIX mixers)
            if learner not in self.groups:
                row.update(mean_entries(terms[learner], learner))
        row.update(extra or {})
        row.update({"timers/collection_s": self._collection_s, "timers/training_s": now - self._train_start})
        self.run.log(row)
        self.logger.log(row)
        self.bar.update(batch.numel())
        self.bar.set_postfix({f"{g}_return": f"{r:.3f}" for g, r in self.rewards.items()})
        self.row = row
        self._iteration_start = time.perf_counter()
        return row

    def evaluate(self, iteration: int, policy: Any, final: bool) -> dict[str, float]:
        """Every ``logger.eval_every`` iterations: the deterministic policy's mean return per group
        (``eval/<group>/episode_reward_mean``); every ``logger.video_every``: ``videos/iter_<k>.mp4``."""
        logger, out = self.cfg.logger, {}
        due = lambda every: every > 0 and ((iteration + 1) % every == 0 or final)  # noqa: E731
        if due(logger.eval_every):
            from .evaluate import evaluate_policy

            stats = evaluate_policy(self._eval_env, policy, max_steps=self.cfg.env.max_steps)
            out = {f"eval/{g}/episode_reward_mean": s["mean"] for g, s in stats["groups"].items()}
            score = sum(out.values()) / len(out)
            self._new_best = score > self.best_eval
            self.best_eval = max(self.best_eval, score)
        if due(logger.video_every):
            from .render import record_rollout

            record_rollout(self._eval_env, self.run.path / "videos" / f"iter_{iteration:05d}.mp4",
                           steps=logger.video_steps, policy=policy)
        return out

    def checkpoint(self, cfg: Any, iteration: int, final: bool, *, agents: Mapping[str, Any],
                   optimisers: Mapping[str, Any], env: Any, collector: Any, optimiser_steps: int = 0) -> None:
        """Write ``checkpoints/last.pt`` every ``logger.checkpoint_every`` iterations and at the end, and
        ``checkpoints/best.pt`` when an evaluation just set a new best mean return."""
        every = cfg.logger.checkpoint_every
        due = final or (every > 0 and (iteration + 1) % every == 0)
        if not due and not self._new_best:
            return
        from .checkpoint import checkpoint_state, save_checkpoint

        state = checkpoint_state(cfg, iteration=iteration, frames=self.frames, optimiser_steps=optimiser_steps,
                                 agents=dict(agents), optimisers=dict(optimisers), env=env,
                                 collector=collector)
        state["best_eval"] = self.best_eval
        if self._new_best:
            save_checkpoint(self.run.path / "checkpoints" / "best.pt", state)
            self._new_best = False
        if due:
            save_checkpoint(self.run.path / "checkpoints" / "last.pt", state)

    def finish(self, cfg: Any, iterations: int, policy: Any = None, **summary: Any) -> TrainResult:
        """Close the bar, write ``summary.json`` and return the result (with the trained ``policy``)."""
        self.bar.close()
        self.logger.close()
        if self._eval_env is not None:
            self._eval_env.close()
        if self.row:
            from .plots import plot_runs

            plot_runs([self.run.path], self.run.path / "plots" / "curves.png")
        time_s = time.perf_counter() - self.start
        result = TrainResult(self.run.path, self.row, dict(self.rewards), self.frames, time_s,
                             self.frames / time_s, policy)
        self.run.summary({"algorithm": cfg.algorithm, "env": cfg.env.name, "frames": self.frames,
                          "iterations": iterations, "time_s": time_s, "frames_per_s": result.frames_per_s,
                          **summary, "episode_reward_mean": result.episode_reward_mean,
                          "final_metrics": self.row, "versions": versions()})
        return result


@dataclass
class Resume:
    """Where a resumed run picks up (all zeros for a fresh run)."""

    state: dict[str, Any] | None = None
    """The checkpoint, or None for a fresh run."""
    iteration: int = 0
    """The first iteration to run."""
    frames: int = 0
    """Frames already collected."""
    optimiser_steps: int = 0
    """Optimiser steps already taken."""
    time_s: float = 0.0
    """Wall seconds of training already spent (metrics.csv's time_s continues from here)."""


def start_run(cfg: Any, resume: bool) -> tuple[RunDir, Resume]:
    """The run directory, and for ``resume`` its checkpoint (checked against ``cfg``) and counters."""
    path = cfg.logger.run_dir or default_run_dir(cfg.algorithm, cfg.env.name, cfg.seed)
    run = RunDir(path, resume=resume)
    if not resume:
        return run, Resume()
    from .checkpoint import checkpoint_path, load_checkpoint

    state = load_checkpoint(checkpoint_path(run.path), to_dict(cfg))
    if state["frames"] >= cfg.collector.total_frames:
        raise ValueError(
            f"{run.path} already has {state['frames']} frames; pass --frames larger than that to continue"
        )
    time_s = run.keep_rows_through(state["iteration"])
    return run, Resume(state, state["iteration"] + 1, state["frames"], state["optimiser_steps"], time_s)
