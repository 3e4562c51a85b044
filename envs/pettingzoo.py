"""PettingZoo parallel environments (``pettingzoo/<family>/<env>`` or your own ``ParallelEnv``).

PettingZoo envs are single-copy Python simulators; ``num_envs`` copies are stepped one after the
other in a TorchRL ``SerialEnv`` so the pipelines see the same leading ``[num_envs]`` batch dimension
as VMAS. Agents are grouped by name (``adversary_0`` -> group ``adversary``), each group carries a
``mask`` of live agents (agents may die mid-episode, as in knights-archers-zombies) and an
``action_mask`` when the env provides one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite
from torchrl.envs import Transform, TransformedEnv

from ._common import check_choice, finalize, missing_package, MultiAgentEnv

# Families importable as modules; mpe moved out of PettingZoo into the mpe2 package.
PETTINGZOO_FAMILIES: dict[str, str] = {
    "mpe2": "mpe2",
    "mpe": "mpe2",
    "sisl": "pettingzoo.sisl",
    "butterfly": "pettingzoo.butterfly",
    "classic": "pettingzoo.classic",
    "atari": "pettingzoo.atari",
    "magent2": "magent2.environments",  # also as magent2/<env>: MAgent2's PettingZoo-API battles
}
_PIP_NAMES = {
    "mpe2": "mpe2",
    "pettingzoo.sisl": "'pettingzoo[sisl]'",
    "pettingzoo.butterfly": "'pettingzoo[butterfly]'",
    "pettingzoo.classic": "'pettingzoo[classic]'",
    "pettingzoo.atari": "'pettingzoo[atari]'",
    "magent2.environments": "-e '.[magent]' (the magent2 package)",
}
# Names the issue tracker and older code use, resolved to the release PettingZoo 1.27 ships.
_RENAMED = {"knights_archers_zombies_v10": "knights_archers_zombies_v11"}
# Envs that older PettingZoo releases shipped and the installed one no longer does.
_REMOVED = {("sisl", "waterworld"): "SISL waterworld"}


def _import_env_module(family: str, env_id: str):
    check_choice("PettingZoo family", family, PETTINGZOO_FAMILIES)
    package = PETTINGZOO_FAMILIES[family]
    label = "magent2" if family == "magent2" else f"pettingzoo/{family}"
    try:
        family_module = importlib.import_module(package)
    except ImportError as err:
        raise missing_package(package, _PIP_NAMES[package], label) from err
    if env_id in _RENAMED:
        warnings.warn(
            f"pettingzoo/{family}/{env_id} is deprecated in PettingZoo; using {_RENAMED[env_id]}",
            stacklevel=3,
        )
        env_id = _RENAMED[env_id]
    try:
        module = importlib.import_module(f"{package}.{env_id}")
    except ModuleNotFoundError as err:
        if err.name is not None and not err.name.startswith(package):
            raise missing_package(err.name, _PIP_NAMES[package], label) from err
        # Listed from the package itself: dir() would only show submodules imported so far.
        available = sorted(
            info.name for info in pkgutil.iter_modules(family_module.__path__)
            if re.search(r"_v\d+$", info.name)
        )
        removed = _REMOVED.get((family, re.sub(r"_v\d+$", "", env_id)))
        if removed is not None:
            raise ValueError(
                f"pettingzoo/{family}/{env_id}: {removed} was removed upstream and the installed PettingZoo "
                f"{_version('pettingzoo')} does not ship it; available in {family}: {', '.join(available)}"
            ) from None
        raise ValueError(
            f"unknown PettingZoo env {f'pettingzoo/{family}/{env_id}'!r}; available in {family}: "
            f"{', '.join(available)}"
        ) from None
    if not hasattr(module, "parallel_env"):
        raise ValueError(f"pettingzoo/{family}/{env_id} has no parallel API (parallel_env)")
    return module, env_id


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # pragma: no cover - imported yet not installed
        return "?"


class UnnestObservation(Transform):
    """Envs whose observations are dicts of ``observation`` and ``action_mask`` (the PettingZoo convention
    for masked actions): TorchRL's wrapper moves the mask to ``(g, "action_mask")`` and leaves the rest at
    ``(g, "observation", "observation")``; this puts it back at ``(g, "observation")``, where every
    module reads it."""

    def __init__(self, groups: list[str]):
        super().__init__()
        self.groups = groups

    def _unnest(self, tensordict: TensorDictBase) -> TensorDictBase:
        for group in self.groups:
            inner = tensordict.get((group, "observation", "observation"), None)
            if inner is not None:
                tensordict.del_((group, "observation"))
                tensordict.set((group, "observation"), inner)
        return tensordict

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._unnest(next_tensordict)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._unnest(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        for group in self.groups:
            inner = observation_spec[group, "observation"]
            if set(inner.keys()) != {"observation"}:
                raise ValueError(f"group {group!r} observes a dict with {sorted(inner.keys())} besides its action mask; "
                                 "give each agent one observation array (and optionally action_mask)")
            observation_spec[group, "observation"] = inner["observation"].clone()
        return observation_spec


def _wrap_parallel(factory: Callable[[], Any], seed: int | None) -> Any:
    """One PettingZoo copy as a TorchRL env (imported lazily so worker processes can build it)."""
    import pettingzoo
    from torchrl.envs.libs.pettingzoo import PettingZooWrapper

    env = factory()
    if not isinstance(env, pettingzoo.ParallelEnv):
        raise TypeError(
            f"expected a pettingzoo.ParallelEnv, got {type(env).__name__}; AEC envs can be "
            "converted with pettingzoo.utils.conversions.aec_to_parallel"
        )
    # Seeding happens through SerialEnv.set_seed, which gives each copy its own seed.
    return PettingZooWrapper(env, use_mask=True, categorical_actions=True, seed=seed)


# Envs given as objects in this process, by the import path recorded for them (see import_path):
# a class defined in a notebook or script still trains here, though no other process can import it.
_IN_PROCESS: dict[str, Any] = {}


def import_path(source: Any) -> str:
    """The ``"module:qualname"`` name under which a user's env class or factory is recorded.

    The object stays usable in this process under that name (``make_env`` finds it) even when the
    name cannot be imported elsewhere (a class defined in a notebook, a lambda).
    """
    module = getattr(source, "__module__", None) or type(source).__module__
    qualname = getattr(source, "__qualname__", None) or type(source).__qualname__
    path = f"{module}:{qualname}"
    _IN_PROCESS[path] = source
    return path


def importable(path: str) -> str | None:
    """``None`` when ``"module:qualname"`` names an object another process can import, else why not."""
    module_name, _, qualname = path.partition(":")
    if module_name == "__main__":
        return "it is defined in __main__ (a script or notebook), which another process cannot import"
    if "<" in qualname:
        return f"{qualname!r} is a local or anonymous object (a lambda or a class inside a function)"
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        return f"module {module_name!r} cannot be imported ({err})"
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return f"module {module_name!r} has no {qualname!r}"
        obj = getattr(obj, part)
    return None


def resolve_import_path(path: str) -> Any:
    """The env class or factory that ``"module:qualname"`` names (``ValueError`` saying why not)."""
    if path in _IN_PROCESS:
        return _IN_PROCESS[path]
    why = importable(path)
    if why is not None:
        raise ValueError(
            f"env {path!r} cannot be re-created: {why}; keep the env in an importable module "
            "(e.g. my_envs.py on PYTHONPATH) and name it 'my_envs:MyEnv'"
        )
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _checked_custom_env(factory: Callable[[], Any], name: str) -> Any:
    """A user's env wrapped and taken through a reset and one random step, so what does not follow the
    ParallelEnv API (spaces, agent keys, rewards, constructor arguments) is said in one line, here."""
    try:
        probe = _wrap_parallel(factory, seed=None)
        probe.rand_step(probe.reset())
    except Exception as err:  # user code and the wrapper fail in many ways; one line says which
        raise ValueError(f"{name} does not work as a PettingZoo ParallelEnv: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return probe


def _factory_from_user(env: Any) -> tuple[Callable[[], Any], str]:
    """Turn a user's ParallelEnv class, zero-argument factory or instance into a factory."""
    import pettingzoo

    if isinstance(env, pettingzoo.ParallelEnv):
        instance = env

        def single() -> Any:
            return instance

        return single, type(env).__name__
    if isinstance(env, type) and issubclass(env, pettingzoo.ParallelEnv):
        return env, env.__name__
    if callable(env):
        return env, getattr(env, "__name__", type(env).__name__)
    raise TypeError(
        "a custom PettingZoo env must be a ParallelEnv subclass, a zero-argument factory returning "
        f"one, or an instance; got {env!r}"
    )


def make_pettingzoo_env(
    source: str | Any,
    *,
    num_envs: int,
    device: torch.device,
    seed: int | None,
    **env_kwargs: Any,
) -> MultiAgentEnv:
    """Build ``num_envs`` copies of a PettingZoo parallel env batched in a ``SerialEnv``.

    ``source`` is either ``"<family>/<env>"`` (kwargs go to ``parallel_env``) or a user's own
    ``ParallelEnv`` class / factory / instance (kwargs go to the class or factory). An instance can
    only back ``num_envs=1``, since copies must not share state.
    """
    from torchrl.envs import SerialEnv

    if isinstance(source, str) and ":" in source:
        source = resolve_import_path(source)
    if isinstance(source, str):
        family, _, env_id = source.partition("/")
        module, env_id = _import_env_module(family, env_id)
        # rgb_array only draws when render() is called, so stepping stays as fast as without it.
        env_kwargs.setdefault("render_mode", "rgb_array")
        factory = functools.partial(module.parallel_env, **env_kwargs)
        name = f"magent2/{env_id}" if family == "magent2" else f"pettingzoo/{family}/{env_id}"
    else:
        factory, label = _factory_from_user(source)
        import pettingzoo

        if isinstance(source, pettingzoo.ParallelEnv):
            if num_envs != 1:
                raise ValueError(
                    f"num_envs={num_envs} needs independent copies, but a single ParallelEnv "
                    "instance was given; pass its class or a factory instead"
                )
            if env_kwargs:
                raise ValueError(
                    f"keyword arguments {sorted(env_kwargs)} cannot be applied to an env instance"
                )
        elif env_kwargs:
            factory = functools.partial(factory, **env_kwargs)
        name = f"pettingzoo/custom/{label}"

    # Build one copy first: it fails early on bad kwargs and gives the group map.
    if isinstance(source, str):
        probe = _wrap_parallel(factory, seed=None)
    else:
        probe = _checked_custom_env(factory, name)
    group_map = dict(probe.group_map)
    del probe  # not closed: for a user's instance, closing would close the env SerialEnv reuses
    serial = SerialEnv(
        num_envs,
        functools.partial(_wrap_parallel, factory, None),
        device=device,
    )
    nested = [g for g in group_map if isinstance(serial.full_observation_spec[g, "observation"], Composite)]
    base = TransformedEnv(serial, UnnestObservation(nested)) if nested else serial

    def render(env_index: int = 0, **kwargs: Any):
        # Each copy is a separate Python env; render only the requested one.
        if not serial.is_closed:
            inner = serial._envs[env_index]
        else:  # pragma: no cover - render before any reset
            raise RuntimeError("reset the env before rendering")
        frame = inner._env.render()
        if frame is None:
            raise RuntimeError(
                f"{name} returned no frame; create it with env.render_mode='rgb_array'"
            )
        return frame

    env = finalize(
        base, group_map=group_map, name=name, expand_dones=False, render_fn=render, seed=seed
    )
    return env
