"""Pieces every environment family shares: argument checks, the common transforms and the env class.

Every env that ``make_env`` returns is a :class:`MultiAgentEnv` whose TensorDicts carry, per group
``g`` with batch shape ``[num_envs, n_agents]``: ``(g, "observation")``, ``(g, "action")``,
``(g, "reward")``, ``(g, "done")``, ``(g, "terminated")`` and ``(g, "episode_reward")``; and at the
root ``done``, ``terminated`` and ``step_count`` with batch shape ``[num_envs]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tensordict import NestedKey, TensorDictBase
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import Compose, EnvBase, RewardSum, StepCounter, Transform, TransformedEnv

from ._snapshot import capture, capture_value, restore, restore_value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` naming the field when it is not >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


def check_choice(name: str, value: Any, accepted: Iterable[Any]) -> Any:
    """Raise ``ValueError`` naming the field and the accepted values when ``value`` is not one of them."""
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {accepted}")
    return value


def missing_package(package: str, pip_name: str, family: str) -> ImportError:
    """The error raised when an optional simulator is not installed, with the command that fixes it."""
    return ImportError(
        f"the {family!r} environments need the {package!r} package, which is not installed; "
        f"fix with: pip install {pip_name}"
    )


class GroupDones(Transform):
    """Copies the root ``done``/``terminated`` (and ``truncated``) flags into every agent group.

    Simulators such as VMAS only report episode-level flags; losses and masks work per agent, so each
    group gets ``(group, flag)`` of shape ``[*batch, n_agents, 1]``, equal to the root flag expanded.
    """

    def __init__(self, group_map: Mapping[str, Sequence[str]]):
        super().__init__()
        self.group_map = {group: list(agents) for group, agents in group_map.items()}

    def _flags(self, done_spec: Composite) -> list[str]:
        return [key for key in ("done", "terminated", "truncated") if key in done_spec.keys()]

    def transform_done_spec(self, done_spec: Composite) -> Composite:
        for group, agents in self.group_map.items():
            group_spec = done_spec.get(group, None) if group in done_spec.keys() else None
            if group_spec is None:
                group_spec = Composite(
                    shape=(*done_spec.shape, len(agents)), device=done_spec.device
                )
                done_spec[group] = group_spec
            for flag in self._flags(done_spec):
                root = done_spec[flag]
                group_spec[flag] = root.unsqueeze(-2).expand(
                    *done_spec.shape, len(agents), *root.shape[len(done_spec.shape) :]
                ).clone()
        return done_spec

    def _expand(self, tensordict: TensorDictBase) -> TensorDictBase:
        for flag in ("done", "terminated", "truncated"):
            root = tensordict.get(flag, None)
            if root is None:
                continue
            for group, agents in self.group_map.items():
                tensordict.set(
                    (group, flag),
                    root.unsqueeze(-2).expand(*root.shape[:-1], len(agents), root.shape[-1]),
                )
        return tensordict

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._expand(next_tensordict)

    def _reset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        return self._expand(tensordict_reset)


# Packages whose objects a Python simulator's snapshot walks (besides the env's own package).
SIMULATOR_PACKAGES = ("vmas", "pettingzoo", "mpe2", "gymnasium", "marlkit")


def native_group_specs(group: str, num_envs: int, n_agents: int, n_actions: int,
                       device: torch.device) -> tuple[Composite, Composite, Composite]:
    """The action, reward and done specs of marlkit's tensor envs: one group of ``n_agents`` agents with
    ``n_actions`` categorical actions, a reward each, and done / terminated / truncated flags at the root
    and per agent."""
    b, n = num_envs, n_agents
    action = Composite({group: Composite(action=Categorical(n_actions, shape=(b, n), device=device), shape=(b, n))},
                       shape=(b,))
    reward = Composite({group: Composite(reward=Unbounded(shape=(b, n, 1), device=device), shape=(b, n))}, shape=(b,))
    flags = ("done", "terminated", "truncated")
    done = Composite(
        {**{f: Categorical(2, shape=(b, 1), dtype=torch.bool, device=device) for f in flags},
         group: Composite({f: Categorical(2, shape=(b, n, 1), dtype=torch.bool, device=device) for f in flags},
                          shape=(b, n))},
        shape=(b,))
    return action, reward, done


class NativeState:
    """Mixin for marlkit's own tensor envs: their state is the attributes named in ``STATE``."""

    STATE: tuple[str, ...] = ()

    def simulator_state(self) -> dict[str, Any]:
        """Every state tensor (and generator) by name, as a snapshot."""
        return capture_value({name: getattr(self, name) for name in self.STATE})

    def load_simulator_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`simulator_state` returned."""
        current = {name: getattr(self, name) for name in self.STATE}
        for name, value in restore_value(state, current).items():
            setattr(self, name, value)


def _python_simulators(base: EnvBase) -> list[Any]:
    """The Python objects that hold a wrapped simulator's state (VMAS world, PettingZoo copies)."""
    from torchrl.envs import SerialEnv
    from torchrl.envs.libs.vmas import VmasEnv

    if isinstance(base, TransformedEnv):  # e.g. PettingZoo copies behind UnnestObservation
        return _python_simulators(base.base_env)
    if isinstance(base, VmasEnv):
        return [base._env]
    if isinstance(base, SerialEnv):
        if base.is_closed:
            raise RuntimeError("the env is closed; its simulator state is gone")
        return [copy._env for copy in base._envs]
    raise NotImplementedError(f"no simulator state for {type(base).__name__}")


class MultiAgentEnv(TransformedEnv):
    """The env type ``make_env`` returns: a ``TransformedEnv`` that also knows its agent groups.

    ``group_map`` maps each group name to the names of its agents, in the order they are stacked
    along the agent dimension; ``family`` and ``name`` say where the env came from.
    """

    def __init__(
        self,
        base_env: EnvBase,
        transform: Transform,
        *,
        group_map: Mapping[str, Sequence[str]],
        name: str,
        render_fn: Any = None,
    ):
        super().__init__(base_env, transform)
        self._marl_group_map = {group: list(agents) for group, agents in group_map.items()}
        self._marl_name = name
        self._render_fn = render_fn

    @property
    def group_map(self) -> dict[str, list[str]]:
        """Group name -> agent names (the agent dimension of that group's tensors)."""
        return self._marl_group_map

    @property
    def env_name(self) -> str:
        """The name ``make_env`` was called with (e.g. ``"vmas/navigation"``)."""
        return self._marl_name

    def n_agents(self, group: str) -> int:
        """Number of agents in ``group``."""
        return len(self._marl_group_map[group])

    def step(self, tensordict: TensorDictBase) -> TensorDictBase:
        """One step of every copy (see ``EnvBase.step``).

        ``rollout(..., break_when_all_done=True)`` marks finished copies by writing ``"_neg_step"``
        next to *every* done flag, the per-group ones included, but reads back only the root entry.
        The group entries would then ride along into the next stored step, and the stacking of steps
        of copies that ended earlier fails ("Key _neg_step not found"). The episode-level root flag
        already decides which copies step, so the group copies are dropped here.
        """
        for group in self._marl_group_map:
            sub = tensordict.get(group, None)
            if sub is not None:
                sub.pop("_neg_step", None)
        return super().step(tensordict)

    _marl_stored_keys: list[NestedKey] | None = None

    @contextmanager
    def storing_only(self, keys: Iterable[NestedKey]) -> Iterator[None]:
        """Within this block, ``rollout`` keeps only ``keys`` of each step it stacks (the policy still
        reads every entry of the next step); an evaluation that scores returns needs no observations."""
        self._marl_stored_keys = list(keys)
        try:
            yield
        finally:
            self._marl_stored_keys = None

    def _post_step_mdp_hooks(self, tensordict: TensorDictBase,
                             tensordict_: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        # TorchRL calls this after the next step's input is split off and before it stores the step
        tensordict, tensordict_ = super()._post_step_mdp_hooks(tensordict, tensordict_)
        if self._marl_stored_keys is not None:
            tensordict = tensordict.select(*self._marl_stored_keys)
        return tensordict, tensordict_

    def live_mask_key(self, group: str) -> tuple[str, str] | None:
        """``(group, "mask")`` when the env marks which of ``group``'s agents are alive (PettingZoo:
        agents may die mid-episode), else ``None``. Losses use it to leave dead agents' entries out."""
        key = (group, "mask")
        return key if key in self.full_observation_spec.keys(True, True) else None

    def render(self, mode: str = "rgb_array", env_index: int = 0, **kwargs: Any):
        """Draw copy ``env_index`` as an ``H x W x 3`` uint8 array (``mode="rgb_array"`` only)."""
        check_choice("mode", mode, ["rgb_array"])
        if self._render_fn is None:
            raise NotImplementedError(f"{self._marl_name} cannot be rendered")
        return self._render_fn(env_index=env_index, **kwargs)

    def simulator_state(self) -> dict[str, Any]:
        """The simulator's whole state (positions, episode progress, its generators) as tensors and
        plain values that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads.

        With :meth:`load_simulator_state` on a fresh env of the same configuration, episodes in
        flight continue exactly (checkpoints use it to resume mid-episode).

        Raises:
            NotImplementedError: part of the state lives in objects that cannot be saved (Box2D
                bodies, pygame sprites); the message names their types.
        """
        base = self.base_env
        if isinstance(base, NativeState):
            return {"family": self._marl_name, "native": base.simulator_state()}
        snapshots, unsaved = [], set()
        for root in _python_simulators(base):
            snapshot, left_out = capture(root, SIMULATOR_PACKAGES)
            snapshots.append(snapshot)
            unsaved.update(left_out)
        if unsaved:
            raise NotImplementedError(
                f"{self._marl_name} keeps state in objects that cannot be saved: {', '.join(sorted(unsaved))}"
            )
        return {"family": self._marl_name, "objects": snapshots}

    def load_simulator_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`simulator_state` (``ValueError`` if it is another env's)."""
        if state.get("family") != self._marl_name:
            raise ValueError(f"simulator state of {state.get('family')!r} cannot be loaded into {self._marl_name!r}")
        base = self.base_env
        if isinstance(base, NativeState):
            base.load_simulator_state(state["native"])
            return
        roots = _python_simulators(base)
        if len(roots) != len(state["objects"]):
            raise ValueError(f"simulator state has {len(state['objects'])} copies, the env has {len(roots)}")
        for root, snap in zip(roots, state["objects"]):
            restore(root, snap, SIMULATOR_PACKAGES)


def finalize(
    base_env: EnvBase,
    *,
    group_map: Mapping[str, Sequence[str]],
    name: str,
    expand_dones: bool,
    render_fn: Any = None,
    seed: int | None = None,
) -> MultiAgentEnv:
    """Apply the transforms every family shares and wrap the result in :class:`MultiAgentEnv`.

    The transforms are: group-level done flags when the source has root flags only, the per-group
    episode return ``(group, "episode_reward")`` (reset per episode) and a root ``step_count``.
    """
    transforms: list[Transform] = []
    if expand_dones:
        transforms.append(GroupDones(group_map))
    groups = list(group_map)
    transforms.append(
        RewardSum(
            in_keys=[(group, "reward") for group in groups],
            out_keys=[(group, "episode_reward") for group in groups],
            reset_keys=[(group, "_reset") for group in groups],
        )
    )
    transforms.append(StepCounter())
    env = MultiAgentEnv(
        base_env, Compose(*transforms), group_map=group_map, name=name, render_fn=render_fn
    )
    if seed is not None:
        env.set_seed(seed)
    return env


def device_of(device: str | torch.device | None) -> torch.device:
    """Resolve a user-given device (``None`` means CPU), failing early on unknown or absent ones."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a valid torch device; use e.g. 'cpu' or 'cuda'"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} requested but CUDA is not available; use 'cpu'")
    return device
