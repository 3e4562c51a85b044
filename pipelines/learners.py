"""The learner bundle every pipeline builds, and the gradient step every loop takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.objectives import LossModule


@dataclass
class Learner:
    """What learns as one: a group (or, for VDN / QMIX, a team of groups) with its acting policy, loss,
    target updater, replay and exploration; a pipeline's ``build_learners`` makes them, and checkpoints
    and ``load_run`` rebuild them by name."""

    policy: TensorDictModuleBase
    """The module that acts in the env (actor, then exploration when there is one)."""
    loss: LossModule
    """The loss; its parameters are what the optimiser trains."""
    target_updater: Any
    """Keeps the loss's target networks in step (None for on-policy losses)."""
    loss_terms: tuple[str, ...]
    """Keys of the loss output whose sum is minimised."""
    replay: Any = None
    """The replay (``extend``, ``sample``, ``update_priority``), see :mod:`.replay`; None on-policy."""
    exploration: Any = None
    """Annealed exploration module (``anneal(frames)``), or None."""
    priority_key: Any = None
    """Where the loss writes the TD error that updates replay priorities, or None."""
    partners: dict[str, Any] = field(default_factory=dict)
    """Team critics: the other team groups' actors, which give their next actions to the TD target."""


class TrainingDiverged(RuntimeError):
    """A loss term or gradient became NaN or infinite: training stops before the step is taken, so the
    parameters (and every checkpoint) stay finite."""


def gradient_step(learner: Learner, optimiser: torch.optim.Optimizer, loss_out: TensorDictBase,
                  max_grad_norm: float, where: str = "") -> None:
    """Minimise the sum of the learner's loss terms in ``loss_out``: backward, clip the global gradient
    norm, step and clear the optimiser, then move the target networks (when the loss has them).

    Raises :class:`TrainingDiverged` (naming ``where``, e.g. the iteration and group, and the term)
    when a term or the gradient norm is not finite; nothing is updated then.
    """
    terms = {key: loss_out[key] for key in learner.loss_terms if key in loss_out.keys()}
    total = sum(terms.values())
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(learner.loss.parameters(), max_grad_norm)
    if not torch.isfinite(total + norm):  # one host sync per step; the details only when it failed
        optimiser.zero_grad(set_to_none=True)
        bad = [key for key, value in terms.items() if not torch.isfinite(value).all()]
        if bad:
            raise TrainingDiverged(f"{where}: loss terms not finite: {', '.join(bad)} (sum {total.item()})")
        raise TrainingDiverged(f"{where}: the gradient norm is not finite ({norm.item()})")
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    if learner.target_updater is not None:
        learner.target_updater.step()
