"""The learner bundle every pipeline builds, and the gradient step every loop takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor
from torchrl.objectives import LossModule

from marlkit.modules import make_stochastic_actor, make_value_critic

from . import threads
from .config import RunConfig
from .teams import team_of


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
    collecting: TensorDictModuleBase | None = None
    """What also runs after the policy while collecting, never when acting (a recurrent value critic,
    whose state must follow each episode), or None."""
    networks: tuple[str, ...] = ()
    """The loss's parameter sets (attribute names such as ``actor_network_params``) that
    :func:`gradient_step` clips one by one when asked to; empty: one norm over all parameters."""
    nonfinite: torch.Tensor | None = None
    """Since the last :func:`check_finite`: which of the loss terms (then the gradient norm) were ever
    not finite, as a device flag per entry (read once per iteration, not per step)."""


def actor_and_critic(env: EnvBase, group: str, cfg: RunConfig, *, centralised: bool,
                     device: torch.device) -> tuple[ProbabilisticActor, TensorDictModule]:
    """An on-policy group's stochastic actor and value critic, sized from the env's specs (a centralised
    critic sees every agent of the group's team)."""
    model = cfg.model
    actor = make_stochastic_actor(env, group, num_cells=model.num_cells, activation=model.activation,
                                  share_params=model.share_params, device=device, **model.net_options())
    critic = make_value_critic(env, group, centralised=centralised, num_cells=model.num_cells,
                               activation=model.activation, share_params=model.critic_share_params, device=device,
                               team=team_of(cfg.env.teams, group), kind=model.critic_kind)
    return actor, critic


class TrainingDiverged(RuntimeError):
    """A loss term or gradient became NaN or infinite: the steps that saw it were skipped, so the
    parameters (and every checkpoint) stay finite, and training stops at the end of the iteration."""


def make_optimiser(parameters: Any, lr: float, eps: float) -> torch.optim.Adam:
    """Adam with the fused kernel, which can skip a step on the device (:func:`gradient_step`)."""
    return torch.optim.Adam(parameters, lr=lr, eps=eps, fused=True)


def parameter_set(loss: LossModule, name: str) -> list[torch.Tensor]:
    """The parameters behind one of ``loss``'s attributes: a functional network's parameters
    (``actor_network_params``) or a single parameter (SAC's ``log_alpha``)."""
    value = getattr(loss, name)
    if isinstance(value, torch.Tensor) and not isinstance(value, TensorDictBase):
        return [value]
    return list(value.values(include_nested=True, leaves_only=True))


def gradient_step(learner: Learner, optimiser: torch.optim.Optimizer, loss_out: TensorDictBase,
                  max_grad_norm: float, per_network: bool = False) -> None:
    """Minimise the sum of the learner's loss terms in ``loss_out``: backward, clip the gradient
    norm, step and clear the optimiser, then move the target networks (when the loss has them).

    The clip is one norm over all the loss's parameters (TorchRL's scripts), or with ``per_network``
    one per set in ``learner.networks`` (BenchMARL's one optimiser per loss term): with a single norm
    a large critic gradient also shrinks the actor's step.

    A step whose terms or gradient norm are not finite is skipped on the device, without a host sync:
    the fused optimiser's ``found_inf`` flag, as AMP's ``GradScaler`` skips steps. The flags collect in
    ``learner.nonfinite`` for :func:`check_finite` to read once per iteration.
    """
    terms = {key: loss_out[key] for key in learner.loss_terms if key in loss_out.keys()}
    total = sum(terms.values())
    total.backward()
    if per_network and learner.networks:
        norm = sum(torch.nn.utils.clip_grad_norm_(parameter_set(learner.loss, name), max_grad_norm)
                   for name in learner.networks)  # a non-finite norm anywhere makes the sum non-finite
    else:
        norm = torch.nn.utils.clip_grad_norm_(learner.loss.parameters(), max_grad_norm)
    # one flag per loss term whether or not this step has it (HAPPO steps train the actor or the critic)
    finite = torch.zeros((), device=norm.device)
    values = torch.stack([*(terms[key].detach().reshape(()) if key in terms else finite for key in learner.loss_terms),
                          norm.detach().reshape(())])
    bad = ~torch.isfinite(values)
    optimiser.found_inf = bad.any().float()  # read by the fused Adam kernel: 1 skips the whole step
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    finish_step(learner, bad)


def finish_step(learner: Learner, bad: torch.Tensor) -> None:
    """After an optimiser step: keep its non-finite flags (one per loss term, then the gradient norm) for
    :func:`check_finite`, move the target networks, let the thread count follow the machine's load."""
    learner.nonfinite = bad if learner.nonfinite is None else learner.nonfinite | bad
    if learner.target_updater is not None:
        learner.target_updater.step()
    threads.poll()  # the thread count follows the machine's load (auto), between steps


def check_finite(learners: dict[str, Learner], iteration: int) -> None:
    """Raise :class:`TrainingDiverged` naming the iteration, the learner and the terms (or the gradient
    norm) that were not finite in any of this iteration's steps; one host sync per learner."""
    for name, learner in learners.items():
        flags, learner.nonfinite = learner.nonfinite, None
        if flags is None or not flags.any():
            continue
        terms = [key for key, flag in zip(learner.loss_terms, flags.tolist()) if flag]
        where = f"iteration {iteration}, group {name}"
        if terms:
            raise TrainingDiverged(f"{where}: loss terms not finite: {', '.join(terms)} (those steps were skipped)")
        raise TrainingDiverged(f"{where}: the gradient norm is not finite (those steps were skipped)")
