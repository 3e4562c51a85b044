"""One environment layer for every simulator family: ``make_env``.

>>> from marlkit.envs import make_env
>>> env = make_env("vmas/navigation", num_envs=8, n_agents=3, seed=0)
>>> env.group_map
{'agents': ['agent_0', 'agent_1', 'agent_2']}

Every env is a TorchRL ``EnvBase`` (a :class:`MultiAgentEnv`) whose TensorDicts carry, per group
``g``, ``(g, "observation")``, ``(g, "action")``, ``(g, "reward")``, ``(g, "done")``,
``(g, "terminated")`` and ``(g, "episode_reward")`` with batch shape ``[num_envs, n_agents]``, plus the
root ``done``, ``terminated`` and ``step_count``.

Families: ``vmas/<scenario>``, ``pettingzoo/<family>/<env>`` (or a ``ParallelEnv`` class, factory or
instance of your own, also by its import path ``"my_module:MyEnv"``), ``gridworld``, ``pursuit`` (SISL
pursuit on tensors), ``matrix/<game>``, ``probe/<task>`` (tasks that isolate one capability: memory,
communication) and ``gym/<id>``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import check_positive_int, device_of, MultiAgentEnv
from .pettingzoo import importable

FAMILIES = ("vmas", "pettingzoo", "magent2", "gridworld", "pursuit", "matrix", "probe", "gym")
MAGENT2_ENVS = ("battle_v4", "adversarial_pursuit_v4", "gather_v5", "tiger_deer_v4", "combined_arms_v6")

__all__ = ["FAMILIES", "MultiAgentEnv", "available_envs", "check_env_name", "check_positive_int", "device_of",
           "importable", "make_env", "split_env_name"]


def available_envs() -> dict[str, list[str]]:
    """Names ``make_env`` accepts, per family (Gymnasium ids are too many to list: any registered id)."""
    from .matrix import MATRIX_GAMES
    from .pettingzoo import PETTINGZOO_FAMILIES
    from .probe import PROBE_TASKS
    from .vmas import vmas_scenarios

    return {
        "vmas": [f"vmas/{s}" for s in vmas_scenarios()],
        "pettingzoo": [f"pettingzoo/{f}/<env>" for f in PETTINGZOO_FAMILIES],
        "magent2": [f"magent2/{e}" for e in MAGENT2_ENVS],
        "gridworld": ["gridworld"],
        "pursuit": ["pursuit"],
        "matrix": [f"matrix/{g}" for g in MATRIX_GAMES],
        "probe": [f"probe/{t}" for t in PROBE_TASKS],
        "gym": ["gym/<any registered Gymnasium id, e.g. CartPole-v1>"],
    }


def split_env_name(name: str) -> tuple[str, str]:
    """Split ``"family/rest"`` and check the family, raising ``ValueError`` listing the families.

    A user's own env, given as a ``ParallelEnv`` class or factory or named by its import path
    ``"my_module:MyEnv"``, is family ``"custom"`` with the import path as the rest.
    """
    if not isinstance(name, str) and callable(name):
        from .pettingzoo import import_path

        return "custom", import_path(name)
    if isinstance(name, str) and ":" in name and "/" not in name.partition(":")[0]:
        module, _, qualname = name.partition(":")
        if not module or not qualname:
            raise ValueError(f"a custom env is named 'module:qualname' (e.g. 'my_envs:MyEnv'), got {name!r}")
        return "custom", name
    if not isinstance(name, str) or not name:
        raise ValueError(f"env name must be a non-empty string like 'vmas/navigation', got {name!r}")
    family, _, rest = name.partition("/")
    if family not in FAMILIES:
        raise ValueError(
            f"unknown environment family {family!r} in {name!r}; available families: "
            f"{', '.join(FAMILIES)} (e.g. vmas/navigation, pettingzoo/mpe2/simple_spread_v3, "
            "gridworld, matrix/climbing, gym/CartPole-v1)"
        )
    if family in ("gridworld", "pursuit") and rest:
        raise ValueError(f"{family!r} takes no sub-name, got {name!r}")
    if family == "pettingzoo" and rest.count("/") != 1:
        raise ValueError(f"PettingZoo envs are named 'pettingzoo/<family>/<env>', got {name!r}")
    if family in ("vmas", "matrix", "probe", "gym", "magent2") and not rest:
        raise ValueError(f"{family!r} needs a sub-name, e.g. {available_envs()[family][0]}")
    return family, rest


def check_env_name(name: str | Any) -> tuple[str, str]:
    """Check a whole env name (family, sub-name, the package behind it) without building anything.

    Returns ``(family, rest)`` as :func:`split_env_name`; raises ``ValueError`` naming the bad part and
    what is accepted (an env removed upstream says so), ``ImportError`` naming a missing package.
    """
    family, rest = split_env_name(name)
    if family == "vmas":
        from .vmas import check_scenario

        check_scenario(rest)
    elif family == "pettingzoo":
        from .pettingzoo import _import_env_module

        _import_env_module(*rest.split("/"))
    elif family == "custom":
        from .pettingzoo import resolve_import_path

        resolve_import_path(rest)
    elif family == "matrix":
        from .matrix import MATRIX_GAMES

        if rest not in MATRIX_GAMES:
            raise ValueError(f"unknown matrix game {rest!r}; available: {', '.join('matrix/' + g for g in MATRIX_GAMES)}")
    elif family == "probe":
        from .probe import PROBE_TASKS

        if rest not in PROBE_TASKS:
            raise ValueError(f"unknown probe task {rest!r}; available: {', '.join('probe/' + t for t in PROBE_TASKS)}")
    elif family == "gym":
        from .gym import check_gym_id

        check_gym_id(rest)
    return family, rest


def make_env(
    name: str | Any,
    *,
    num_envs: int = 1,
    device: str | torch.device | None = None,
    seed: int | None = None,
    **task_kwargs: Any,
) -> MultiAgentEnv:
    """Build a batched multi-agent TorchRL env.

    Args:
        name: ``"vmas/<scenario>"``, ``"pettingzoo/<family>/<env>"``, ``"magent2/<env>"``, ``"gridworld"``, ``"pursuit"``,
            ``"matrix/<game>"``, ``"probe/<task>"``, ``"gym/<id>"``; or a PettingZoo ``ParallelEnv`` class, zero-argument
            factory or instance of your own (no registration needed).
        num_envs: number of copies stepped together (the leading batch dimension).
        device: where the TensorDicts live (``"cpu"`` default, ``"cuda"``).
        seed: seeds the env (each copy of a Python simulator gets its own seed, chained from ``seed`` as
            TorchRL's batched envs do).
        **task_kwargs: passed to the scenario / env (``n_agents``, ``max_steps``, ``mode``, ...).

    Raises:
        ValueError: unknown family, scenario or argument, or an invalid value, before anything is built.
        ImportError: an optional simulator package is missing (the message says what to install).
    """
    check_positive_int("num_envs", num_envs)
    dev = device_of(device)
    if not isinstance(name, str):
        from .pettingzoo import make_pettingzoo_env

        return make_pettingzoo_env(name, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    family, rest = split_env_name(name)
    if family == "custom":
        from .pettingzoo import make_pettingzoo_env

        return make_pettingzoo_env(rest, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    if family == "vmas":
        from .vmas import make_vmas_env

        return make_vmas_env(rest, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    if family in ("pettingzoo", "magent2"):  # MAgent2 envs are PettingZoo parallel envs: teams become groups
        from .pettingzoo import make_pettingzoo_env

        source = rest if family == "pettingzoo" else f"magent2/{rest}"
        return make_pettingzoo_env(source, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    if family == "gridworld":
        from .gridworld import make_gridworld_env

        return make_gridworld_env(num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    if family == "pursuit":
        from .pursuit import make_pursuit_env

        return make_pursuit_env(num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    if family == "matrix":
        from .matrix import make_matrix_env

        return make_matrix_env(rest, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    if family == "probe":
        from .probe import make_probe_env

        return make_probe_env(rest, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
    from .gym import make_gym_env

    return make_gym_env(rest, num_envs=num_envs, device=dev, seed=seed, **task_kwargs)
