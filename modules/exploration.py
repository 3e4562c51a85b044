"""Exploration modules composed after a policy, annealed explicitly by frame count.

They act only when the exploration type is ``RANDOM`` (as in collection), so the same policy runs
greedy / noise-free under ``set_exploration_type(ExplorationType.DETERMINISTIC)`` for evaluation.
The schedule is a closed form of the frames seen (``anneal(frames)``), so resuming a run only needs
that one number.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import Bounded
from torchrl.envs.utils import exploration_type, ExplorationType
from tensordict.utils import NestedKey


def linear_schedule(start: float, end: float, frames: int, annealing_frames: int) -> float:
    """``start`` moving linearly to ``end`` over ``annealing_frames`` frames, then ``end``."""
    if annealing_frames <= 0:
        return end
    fraction = min(1.0, max(0, frames) / annealing_frames)
    return start + (end - start) * fraction


def _explores() -> bool:
    return exploration_type() in (ExplorationType.RANDOM, None)


class GaussianNoise(TensorDictModuleBase):
    """Adds ``N(0, sigma^2)`` noise to a continuous action and clamps it to the action bounds.

    ``sigma`` goes linearly from ``sigma_init`` to ``sigma_end`` over ``annealing_frames`` frames;
    call :meth:`anneal` with the total frames collected so far.
    """

    def __init__(
        self,
        action_spec: Bounded,
        action_key: NestedKey,
        *,
        sigma_init: float = 0.9,
        sigma_end: float = 0.1,
        annealing_frames: int = 100_000,
    ):
        super().__init__()
        if sigma_init < 0 or sigma_end < 0:
            raise ValueError(
                f"exploration noise must be >= 0, got sigma_init={sigma_init}, sigma_end={sigma_end}"
            )
        if annealing_frames < 0:
            raise ValueError(f"annealing_frames must be >= 0, got {annealing_frames}")
        self.in_keys = [action_key]
        self.out_keys = [action_key]
        self.action_key = action_key
        self.sigma_init, self.sigma_end, self.annealing_frames = sigma_init, sigma_end, annealing_frames
        self.register_buffer("low", action_spec.space.low.clone())
        self.register_buffer("high", action_spec.space.high.clone())
        self.register_buffer("sigma", torch.tensor(float(sigma_init), device=self.low.device))

    def anneal(self, frames: int) -> float:
        """Set sigma for ``frames`` collected so far; returns it."""
        value = linear_schedule(self.sigma_init, self.sigma_end, frames, self.annealing_frames)
        self.sigma.fill_(value)
        return value

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if _explores():
            action = tensordict.get(self.action_key)
            noisy = action + torch.randn_like(action) * self.sigma
            tensordict.set(self.action_key, torch.maximum(torch.minimum(noisy, self.high), self.low))
        return tensordict
