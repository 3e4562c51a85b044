"""The one place marlkit imports TorchRL collectors, for the three ``collector.backend`` choices.

- ``sync``: ``torchrl.collectors.Collector`` steps every env copy in this process. Checkpoints carry
  the episodes in flight, so ``--resume`` continues them exactly.
- ``multiprocess``: ``MultiSyncCollector`` (``collector.sync=true``) or ``MultiAsyncCollector``
  (``false``); ``collector.workers`` processes on this machine, each stepping
  ``env.num_envs / workers`` copies.
- ``ray``: ``torchrl.collectors.distributed.RayCollector``; ``collector.workers`` remote collectors on
  a Ray cluster (a local instance unless ``collector.ray_address`` names one).

Worker copies are seeded like the ``sync`` copies (copy ``i`` gets the seed it gets in one process;
each worker's torch / numpy / Python generators get the seed of its first copy), so a run is
reproducible for a given seed and worker count. The episodes in flight live in the workers and are not checkpointed: a
resumed run starts fresh episodes (with new seeds derived from the iteration it resumes at).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import random
import signal
import socket
import threading
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl._utils import seed_generator
from torchrl.collectors import BaseCollector, Collector, MultiAsyncCollector, MultiSyncCollector
from torchrl.envs import EnvBase

from marlkit.envs import importable, MultiAgentEnv, split_env_name

from .config import EnvConfig, RunConfig
from .environment import build_env
from .precision import apply_matmul_precision

__all__ = ["BACKENDS", "check_collector_config", "check_ray_address", "check_ray_installed", "Collector", "CollectorFailed", "collector_state",
           "load_collector_state", "make_collector", "stop_signals_left_to_the_run", "unsaved_episodes", "worker_failure",
           "worker_seeds"]

BACKENDS = ("sync", "multiprocess", "ray")
DISTRIBUTED_EXTRA = 'pip install "marlkit[distributed]"'
_RAY_CONNECT_TIMEOUT_S = 3.0


class CollectorFailed(RuntimeError):
    """A worker process or remote collector died: the run stopped where it was; the last checkpoint is intact."""


def check_collector_config(cfg: RunConfig) -> None:
    """The backend, worker count, device and Ray address, checked before anything is built."""
    c = cfg.collector
    if c.backend not in BACKENDS:
        raise ValueError(f"collector.backend={c.backend!r} is not supported; accepted: {', '.join(BACKENDS)}")
    if isinstance(c.workers, bool) or c.workers < 1:
        raise ValueError(f"collector.workers must be >= 1, got {c.workers}")
    if c.backend == "sync":
        if c.workers != 1 or not c.sync or c.ray_address is not None:
            raise ValueError("collector.workers, collector.sync=false and collector.ray_address need "
                             "collector.backend=multiprocess or ray (sync steps every copy in this process)")
        return
    num_envs = cfg.env.num_envs
    if num_envs % c.workers:
        divisors = [d for d in range(1, num_envs + 1) if num_envs % d == 0]
        raise ValueError(f"collector.workers={c.workers} does not divide env.num_envs={num_envs} (each worker steps "
                         f"num_envs / workers copies); use one of {divisors[:8]} or change env.num_envs")
    if torch.device(cfg.device).type != "cpu":
        raise ValueError(f"collector.backend={c.backend} steps its env copies on CPU workers; use device=cpu, or "
                         f"collector.backend=sync to keep env and training on {cfg.device}")
    family, rest = split_env_name(cfg.env.name)
    if family == "custom" and (why := importable(rest)) is not None:
        raise ValueError(f"collector.backend={c.backend} builds the env in other processes, which cannot import "
                         f"{rest!r}: {why}; move the env into a module, or use collector.backend=sync")
    if c.backend == "multiprocess" and c.ray_address is not None:
        raise ValueError("collector.ray_address is for collector.backend=ray")
    if c.backend == "ray":
        check_ray_installed("collector.backend=ray")
        if c.ray_address not in (None, "auto"):
            check_ray_address(c.ray_address, "collector.ray_address")


def check_ray_installed(who: str, alternative: str = "") -> None:
    """``ValueError`` naming ``who`` needs Ray, the extra that installs it and ``alternative``, when it is missing."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"{who} needs the 'ray' package, which is not installed: {DISTRIBUTED_EXTRA}{alternative}")


def check_ray_address(address: str, name: str) -> None:
    """A ``host:port`` Ray head (``name``: the setting that gave it) that does not answer fails here in
    seconds, not in Ray's minute of retries."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{name}={address!r} must be auto or host:port (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=_RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"{name}={address!r}: no Ray head answers there ({err.strerror or err}); "
                         f"check the address, or leave {name} unset for a local instance") from None


def worker_seeds(seed: int, workers: int, copies_per_worker: int, start_iteration: int = 0) -> list[int]:
    """The seed of each worker's first copy: the seed that copy ``k * copies_per_worker`` gets with
    ``backend=sync`` (TorchRL's batched envs chain each copy's seed from the previous one's), so every
    copy of a Python simulator starts as it would in one process. A resumed run (``start_iteration`` >
    0) starts fresh episodes from seeds derived from ``(seed, start_iteration)`` instead of replaying
    the first ones."""
    current = seed
    if start_iteration > 0:
        current = int(np.random.SeedSequence((seed, start_iteration)).generate_state(1)[0])
    seeds = []
    for copy in range(workers * copies_per_worker):
        if copy % copies_per_worker == 0:
            seeds.append(current)
        current = seed_generator(current)  # the rule EnvBase.set_seed hands the next copy
    return seeds


def seed_generators(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators (a user's env may draw from any of them)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def worker_env(env_cfg: EnvConfig, seed: int, matmul_precision: str = "highest") -> MultiAgentEnv:
    """Build a worker's env copies, seed the worker's generators and set its matmul precision to the run's
    (runs inside the worker, before its policy's first step)."""
    seed_generators(seed)  # the policy's sampling and exploration draw from the worker's own stream
    apply_matmul_precision(matmul_precision)
    return build_env(env_cfg, device="cpu", seed=seed)


def _merge_workers(batch: TensorDictBase) -> TensorDictBase:
    """Ray's synchronous batches stack the workers, ``[workers, copies, time]``: flatten to ``[num_envs, time]``."""
    return batch.reshape(-1, *batch.shape[2:])


@contextlib.contextmanager
def stop_signals_left_to_the_run():
    """Worker processes started inside ignore SIGINT and SIGTERM for their whole life (an ignored signal
    stays ignored through ``spawn``'s exec, and Python then leaves it so). A terminal's Ctrl-C, or a
    scheduler's SIGTERM, reaches every process of the job; the run finishes its iteration and checkpoints
    before it ends its workers, so it needs them alive until then. They end when the run closes them, or
    with their pipe if it dies. A signal landing on this process while inside (while workers start) is
    ignored too: press Ctrl-C again."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change handlers (and the CLI's runs start there)
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def make_collector(env: EnvBase, policy: TensorDictModuleBase, cfg: RunConfig, *, device: torch.device,
                   init_random_frames: int = 0, start_iteration: int = 0) -> BaseCollector:
    """An endless collector for ``cfg.collector.backend`` yielding ``[num_envs, frames_per_batch //
    num_envs]`` batches on ``device`` (asynchronous: one worker's ``frames_per_batch`` frames); the
    training loop decides when to stop.

    ``env`` is the env ``sync`` steps; the other backends build theirs from ``cfg.env`` in their
    workers. The first ``init_random_frames`` frames use uniformly random actions (off-policy warm-up).
    """
    c = cfg.collector
    common = dict(
        frames_per_batch=c.frames_per_batch,
        # Endless: a collector that reaches its budget closes the env before yielding the last batch,
        # and the final checkpoint needs the env's state (the loop counts iterations itself).
        total_frames=-1,
        # Policy, env and storage share one device, so nothing moves between CPU and GPU in the loop.
        device=device,
        storing_device=device,
        init_random_frames=init_random_frames or None,
        reset_at_each_iter=c.reset_at_each_iter,
        # make_env owns the env's transforms; feed-forward policies need none added (and a silent
        # default that flips in torchrl 0.15 would change runs between versions).
        auto_register_policy_transforms=False,
    )
    if c.backend == "sync":
        return Collector(env, policy, **common)
    copies = cfg.env.num_envs // c.workers
    worker_cfg = dataclasses.replace(cfg.env, num_envs=copies)
    makers = [functools.partial(worker_env, worker_cfg, seed, cfg.matmul_precision)
              for seed in worker_seeds(cfg.seed, c.workers, copies, start_iteration)]
    if c.backend == "multiprocess":
        # Synchronous: the workers' batches concatenated along the copies. Asynchronous: each worker's
        # own batch of frames_per_batch frames is a whole iteration.
        cls = MultiSyncCollector if c.sync else MultiAsyncCollector
        with stop_signals_left_to_the_run():
            return cls(
                makers,
                policy,
                **common,
                # TorchRL would take a thread from the learner per worker; keep the run's own count
                # (workers and learner take turns when synchronous) and one thread per worker.
                num_threads=torch.get_num_threads(),
                num_sub_threads=1,
                **({"cat_results": 0} if c.sync else {}),
            )
    return _ray_collector(makers, policy, cfg, device=device, init_random_frames=init_random_frames)


def _ray_collector(makers: list[Any], policy: TensorDictModuleBase, cfg: RunConfig, *, device: torch.device,
                   init_random_frames: int) -> BaseCollector:
    from torchrl.collectors.distributed import RayCollector

    c = cfg.collector
    if c.ray_address is None:
        init: dict[str, Any] = {"num_cpus": c.workers, "include_dashboard": False}
    else:
        init = {"address": c.ray_address}
    init["log_to_driver"] = False  # each remote collector would print its whole policy and env
    try:  # RayCollector starts (or joins) Ray, and shuts a runtime it started down with itself
        collector = RayCollector(
            makers,
            policy,
            # Asynchronous: each remote collector's batch is a whole iteration of frames_per_batch frames.
            frames_per_batch=c.frames_per_batch * (1 if c.sync else c.workers),
            total_frames=math.inf,  # endless (RayCollector reads -1 as "already done")
            device=device,
            storing_device=device,
            init_random_frames=init_random_frames,
            reset_at_each_iter=c.reset_at_each_iter,
            collector_class=Collector,
            collector_kwargs={"auto_register_policy_transforms": False},
            num_collectors=c.workers,
            sync=c.sync,
            remote_configs={"num_cpus": 1},
            postproc=_merge_workers if c.sync else None,
            ray_init_config=init,
        )
    except ConnectionError as err:
        raise ValueError(f"collector.ray_address={c.ray_address!r}: {str(err).splitlines()[0]}; start a cluster "
                         "with `ray start --head`, or leave collector.ray_address unset for a local instance") from None
    except Exception as err:
        if not type(err).__module__.startswith("ray."):
            raise
        raise ValueError(f"collector.backend=ray: a remote collector failed to start ({type(err).__name__}); Ray "
                         f"workers must import {cfg.env.name!r} and marlkit themselves (install them, or put their "
                         "folder on PYTHONPATH before Ray starts)") from None
    collector.update_policy_weights_(policy)  # the remote collectors start from the learner's weights
    return collector


def worker_failure(collector: BaseCollector, err: Exception) -> str | None:
    """What ``err``, raised while ``collector`` collected, says about a worker that died (None: not that)."""
    if unsaved_episodes(collector) is None:
        return None
    if isinstance(err, RuntimeError) and "process failed" in str(err):  # TorchRL's multi-process collectors
        return str(err).splitlines()[0]
    if type(err).__module__.startswith("ray."):  # RayActorError, ActorDiedError, ...
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'remote collector lost'}"
    return None


def unsaved_episodes(collector: BaseCollector) -> str | None:
    """Why the episodes in flight of ``collector`` cannot be checkpointed, or ``None`` when they can."""
    if isinstance(collector, Collector):
        return None
    return ("the env copies step in worker processes (collector.backend=multiprocess or ray), "
            "so their episodes in flight are not checkpointed")


def collector_state(collector: BaseCollector) -> dict[str, Any]:
    """What the collector carries between batches: the last observation of every env copy (with
    its running episode return and step count) and the trajectory counter, as plain tensors; ``{}``
    for the backends whose copies live in workers (:func:`unsaved_episodes`)."""
    if unsaved_episodes(collector) is not None:
        return {}
    # TorchRL's Collector.state_dict has neither: the carrier is the rollout's in-flight step.
    carrier = collector._carrier
    # Tensors only (weights_only loading); a non-tensor entry keeps its freshly reset value on resume.
    tensors = [key for key, value in carrier.items(True, True) if isinstance(value, torch.Tensor)]
    return {"carrier": carrier.select(*tensors).to_dict(), "traj_pool": collector._traj_pool.state_dict()}


def load_collector_state(collector: Collector, state: dict[str, Any]) -> None:
    """Continue from :func:`collector_state` (the env must hold the matching simulator state)."""
    carrier = collector._carrier
    carrier.update(TensorDict(state["carrier"], batch_size=carrier.batch_size, device=carrier.device))
    collector._traj_pool.load_state_dict(state["traj_pool"])
