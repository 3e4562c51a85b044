"""VMAS scenarios (``vmas/<scenario>``), vectorized natively on the chosen device."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from ._common import check_positive_int, finalize, missing_package, MultiAgentEnv


def vmas_scenarios() -> list[str]:
    """Every scenario VMAS ships (its main, MPE and debug sets)."""
    try:
        import vmas
    except ImportError:
        return []
    return sorted(set(vmas.scenarios) | set(vmas.mpe_scenarios) | set(vmas.debug_scenarios))


def check_scenario(scenario: str) -> None:
    """``ValueError`` listing the scenarios when ``scenario`` is not one VMAS ships (no env is built)."""
    available = vmas_scenarios()
    if not available:
        raise missing_package("vmas", "vmas", "vmas")
    if scenario not in available:
        raise ValueError(
            f"unknown VMAS scenario {scenario!r}; available: {', '.join('vmas/' + s for s in available)}"
        )


def make_vmas_env(
    scenario: str,
    *,
    num_envs: int,
    device: torch.device,
    seed: int | None,
    **scenario_kwargs: Any,
) -> MultiAgentEnv:
    """Build ``vmas/<scenario>``; scenario kwargs (``n_agents``, ``max_steps``, ...) pass through.

    ``max_steps`` follows VMAS/TorchRL: reaching it ends the episode with ``terminated`` set.
    ``continuous_actions=False`` gives categorical (index) actions.
    """
    try:
        from torchrl.envs.libs.vmas import VmasEnv
    except ImportError as err:  # pragma: no cover - vmas is a core dependency
        raise missing_package("vmas", "vmas", "vmas") from err
    check_scenario(scenario)
    for key in ("n_agents", "max_steps"):
        if key in scenario_kwargs and scenario_kwargs[key] is not None:
            check_positive_int(key, scenario_kwargs[key])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = VmasEnv(
            scenario=scenario,
            num_envs=num_envs,
            device=device,
            seed=seed,
            categorical_actions=True,
            **scenario_kwargs,
        )
    for warning in caught:
        unused = re.search(r"Scenario kwargs: (.*) passed but not used", str(warning.message))
        if unused:  # VMAS only warns, and trains the scenario's defaults: a typo would go unnoticed
            raise ValueError(f"vmas/{scenario} does not take the keyword(s) {unused.group(1)}; check their "
                             f"spelling against the scenario's make_world (e.g. n_agents, max_steps)")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    # TorchRL's wrapper reads these from the VMAS env at every step through its __getattr__, which lists
    # every attribute of the module (twice) before forwarding: a tenth of a step's wrapper time. Neither
    # changes after construction, so the instance holds them.
    for attribute in ("n_agents", "continuous_actions"):
        setattr(base, attribute, getattr(base._env, attribute))

    def render(env_index: int = 0, **kwargs: Any):
        return base.render(mode="rgb_array", env_index=env_index, **kwargs)

    return finalize(
        base,
        group_map=base.group_map,
        name=f"vmas/{scenario}",
        expand_dones=True,
        render_fn=render,
        seed=None,  # VmasEnv was seeded at construction
    )
