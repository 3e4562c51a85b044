"""Exploration modules composed after a policy, annealed explicitly by frame count.

They act only when the exploration type is ``RANDOM`` (as in collection), so the same policy runs
greedy / noise-free under ``set_exploration_type(ExplorationType.DETERMINISTIC)`` for evaluation.
The schedule is a closed form of the frames seen (``anneal(frames)``), so resuming a run only needs
that one number.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torchrl.data import Bounded, Categorical, OneHot, TensorSpec
from torchrl.envs.utils import exploration_type, ExplorationType
from tensordict.utils import NestedKey


def linear_schedule(start: float, end: float, frames: int, annealing_frames: int) -> float:
    """``start`` moving linearly to ``end`` over ``annealing_frames`` frames, then ``end``."""
    if annealing_frames <= 0:
        return end
    fraction = min(1.0, max(0, frames) / annealing_frames)
    return start + (end - start) * fraction


def check_sigma(sigma_init: float, sigma_end: float, annealing_frames: int | None, prefix: str = "") -> None:
    """Gaussian-noise schedule: ``ValueError`` naming the bad value (``prefix``: its config section)."""
    if sigma_init < 0 or sigma_end < 0:
        raise ValueError(f"exploration noise must be >= 0, got sigma_init={sigma_init}, sigma_end={sigma_end}")
    if annealing_frames is not None and annealing_frames < 0:
        raise ValueError(f"{prefix}annealing_frames must be >= 0, got {annealing_frames}")


def check_epsilon(eps_init: float, eps_end: float, annealing_frames: int | None, prefix: str = "") -> None:
    """Epsilon-greedy schedule: ``ValueError`` naming the bad value (``prefix``: its config section)."""
    for name, value in (("eps_init", eps_init), ("eps_end", eps_end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{prefix}{name} must be in [0, 1], got {value}")
    if annealing_frames is not None and annealing_frames < 0:
        raise ValueError(f"{prefix}annealing_frames must be >= 0, got {annealing_frames}")


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
        check_sigma(sigma_init, sigma_end, annealing_frames)
        self.in_keys = [action_key]
        self.out_keys = [action_key]
        self.action_key = action_key
        self.sigma_init, self.sigma_end, self.annealing_frames = sigma_init, sigma_end, annealing_frames
        self.register_buffer("low", action_spec.space.low.clone())
        self.register_buffer("high", action_spec.space.high.clone())
        self.register_buffer("sigma", torch.tensor(float(sigma_init), device=self.low.device))

    name = "sigma"  # the metric name of the annealed value

    @property
    def value(self) -> float:
        """Current noise standard deviation."""
        return float(self.sigma)

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


class EpsilonGreedy(TensorDictModuleBase):
    """With probability ``epsilon`` per agent, replaces the greedy action by a uniformly random one.

    Random actions are drawn among the allowed ones when ``mask_key`` is present in the data.
    ``epsilon`` goes linearly from ``eps_init`` to ``eps_end`` over ``annealing_frames`` frames;
    call :meth:`anneal` with the total frames collected so far.
    """

    def __init__(
        self,
        action_spec: TensorSpec,
        action_key: NestedKey,
        *,
        mask_key: NestedKey | None = None,
        eps_init: float = 1.0,
        eps_end: float = 0.05,
        annealing_frames: int = 100_000,
    ):
        super().__init__()
        check_epsilon(eps_init, eps_end, annealing_frames)
        if not isinstance(action_spec, (Categorical, OneHot)):
            raise ValueError(f"epsilon-greedy needs discrete actions, got {type(action_spec).__name__}")
        self.one_hot = isinstance(action_spec, OneHot)
        self.n_actions = action_spec.shape[-1] if self.one_hot else action_spec.space.n
        self.action_key, self.mask_key = action_key, mask_key
        self.in_keys = [action_key] + ([mask_key] if mask_key is not None else [])
        self.out_keys = [action_key]
        self.eps_init, self.eps_end, self.annealing_frames = eps_init, eps_end, annealing_frames
        self.register_buffer("epsilon", torch.tensor(float(eps_init)))

    name = "epsilon"  # the metric name of the annealed value

    @property
    def value(self) -> float:
        """Current exploration probability."""
        return float(self.epsilon)

    def anneal(self, frames: int) -> float:
        """Set epsilon for ``frames`` collected so far; returns it."""
        value = linear_schedule(self.eps_init, self.eps_end, frames, self.annealing_frames)
        self.epsilon.fill_(value)
        return value

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if not _explores():
            return tensordict
        action = tensordict.get(self.action_key)
        index = action.argmax(-1) if self.one_hot else action
        mask = tensordict.get(self.mask_key, None) if self.mask_key is not None else None
        weights = torch.ones(*index.shape, self.n_actions, device=index.device)
        if mask is not None:
            weights = weights * mask.to(weights.dtype)
        random = torch.multinomial(weights.reshape(-1, self.n_actions), 1).reshape(index.shape)
        explore = torch.rand(index.shape, device=index.device) < self.epsilon.to(index.device)
        chosen = torch.where(explore, random, index)
        if self.one_hot:
            chosen = torch.nn.functional.one_hot(chosen, self.n_actions).to(action.dtype)
        tensordict.set(self.action_key, chosen.to(action.dtype))
        return tensordict


class AnnealedTogether(TensorDictSequential):
    """Several groups' exploration modules (one team's), applied in turn and annealed together.

    They follow one schedule, so ``name`` and ``value`` are the first module's.
    """

    def __init__(self, *modules: GaussianNoise | EpsilonGreedy):
        super().__init__(*modules)
        self.name = modules[0].name

    @property
    def value(self) -> float:
        """The shared schedule's current value."""
        return self.module[0].value

    def anneal(self, frames: int) -> float:
        """Anneal every module for ``frames`` collected so far; returns the value."""
        return [module.anneal(frames) for module in self.module][0]
