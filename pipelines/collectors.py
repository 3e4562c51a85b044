"""The one place marlkit imports TorchRL collectors (``torchrl.collectors.Collector`` in torchrl 0.14)."""

from __future__ import annotations

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

from .config import CollectorConfig

__all__ = ["Collector", "make_collector"]


def make_collector(
    env: EnvBase,
    policy: TensorDictModuleBase,
    cfg: CollectorConfig,
    *,
    device: torch.device,
    init_random_frames: int = 0,
    frames_done: int = 0,
) -> Collector:
    """A synchronous collector yielding ``[num_envs, frames_per_batch // num_envs]`` batches on ``device``.

    Policy, env and storage share one device, so nothing moves between CPU and GPU in the loop. The
    first ``init_random_frames`` frames use uniformly random actions (off-policy warm-up); a resumed
    run has ``frames_done`` already.
    """
    return Collector(
        env,
        policy,
        frames_per_batch=cfg.frames_per_batch,
        total_frames=cfg.total_frames - frames_done,  # a resumed run collects only what is left
        device=device,
        storing_device=device,
        init_random_frames=init_random_frames or None,
        reset_at_each_iter=cfg.reset_at_each_iter,
        # make_env owns the env's transforms; feed-forward policies need none added (and a silent
        # default that flips in torchrl 0.15 would change runs between versions).
        auto_register_policy_transforms=False,
    )
