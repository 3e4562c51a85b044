"""The one place marlkit imports TorchRL collectors (``torchrl.collectors.Collector`` in torchrl 0.14)."""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

from .config import CollectorConfig

__all__ = ["Collector", "collector_state", "load_collector_state", "make_collector"]


def make_collector(
    env: EnvBase,
    policy: TensorDictModuleBase,
    cfg: CollectorConfig,
    *,
    device: torch.device,
    init_random_frames: int = 0,
) -> Collector:
    """An endless synchronous collector yielding ``[num_envs, frames_per_batch // num_envs]`` batches
    on ``device``; the training loop decides when to stop.

    Policy, env and storage share one device, so nothing moves between CPU and GPU in the loop. The
    first ``init_random_frames`` frames use uniformly random actions (off-policy warm-up).
    """
    return Collector(
        env,
        policy,
        frames_per_batch=cfg.frames_per_batch,
        # Endless: a collector that reaches its budget closes the env before yielding the last batch,
        # and the final checkpoint needs the env's state (the loop counts iterations itself).
        total_frames=-1,
        device=device,
        storing_device=device,
        init_random_frames=init_random_frames or None,
        reset_at_each_iter=cfg.reset_at_each_iter,
        # make_env owns the env's transforms; feed-forward policies need none added (and a silent
        # default that flips in torchrl 0.15 would change runs between versions).
        auto_register_policy_transforms=False,
    )


def collector_state(collector: Collector) -> dict[str, Any]:
    """What the collector carries between batches: the last observation of every env copy (with
    its running episode return and step count) and the trajectory counter, as plain tensors."""
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
