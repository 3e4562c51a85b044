"""Teams: agent groups that share a reward and train together.

marlkit groups agents by name, so a heterogeneous cooperative env (``simple_speaker_listener``: one
``speaker``, one ``listener``) has several groups that are one team. ``env.teams`` names the teams;
left empty, :func:`resolve_teams` finds them from the env: groups whose mean reward is the same at
every step of a short random rollout (and not always zero, which would prove nothing) form one team,
and every other group is a team of its own. The resolved map is written to ``config.yaml``.

What a team changes: MAPPO's critic and MADDPG/MASAC's critics see every agent of the team, across
groups; VDN/QMIX mix the Q values of every agent of the team with the team reward. IPPO, IDDPG, ISAC
and IQL stay local.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

from marlkit.envs import MultiAgentEnv

from .config import ConfigError, EnvConfig, RunConfig
from .environment import build_env

# Random steps of the probe rollout that tells which groups share a reward.
PROBE_STEPS = 64
DEFAULT_TEAM = "team"  # the name of the one team of a fully cooperative multi-group env


@contextlib.contextmanager
def _random_state_kept():
    """Run a block without moving the torch, numpy or Python random streams of the caller."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def probe_rewards(make_probe_env: Callable[[], MultiAgentEnv], steps: int = PROBE_STEPS) -> dict[str, torch.Tensor]:
    """Each group's mean reward per step (``[copies * steps]``) under uniformly random actions.

    The env is built by ``make_probe_env`` and rolled out from a reset with every global random
    stream kept as it was, so the run that follows is the same as without the probe.
    """
    with _random_state_kept(), torch.no_grad():
        torch.manual_seed(0)
        env = make_probe_env()
        td = env.rollout(steps, break_when_any_done=False)
        env.close()
    return {group: td.get(("next", group, "reward")).float().mean((-2, -1)).reshape(-1) for group in env.group_map}


def _share(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, atol=1e-6)) and bool(a.abs().max() > 0)


def reward_sharing_teams(rewards: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Teams from probed rewards: groups connected by equal (and not all-zero) rewards."""
    groups = list(rewards)
    teams: list[list[str]] = []
    for group in groups:
        for team in teams:
            if _share(rewards[team[0]], rewards[group]):
                team.append(group)
                break
        else:
            teams.append([group])
    if len(teams) == 1 and len(groups) > 1:
        return {DEFAULT_TEAM: groups}
    return {"+".join(team) if len(team) > 1 else team[0]: team for team in teams}


def check_teams(teams: Mapping[str, list[str]], groups: list[str]) -> dict[str, list[str]]:
    """User-given teams, completed with a team per group left out; ``ConfigError`` on unknown or
    repeated groups."""
    seen: dict[str, str] = {}
    for team, members in teams.items():
        if not isinstance(members, list) or not members:
            raise ConfigError(f"env.teams.{team} must be a non-empty list of groups, got {members!r}")
        for group in members:
            if group not in groups:
                raise ConfigError(f"env.teams.{team} names unknown group {group!r}; this env's groups: {groups}")
            if group in seen:
                raise ConfigError(f"group {group!r} is in two teams ({seen[group]!r} and {team!r})")
            seen[group] = team
        if team in groups and members != [team]:
            raise ConfigError(f"team name {team!r} is also a group name; name the team differently")
    out = {team: list(members) for team, members in teams.items()}
    out.update({group: [group] for group in groups if group not in seen})
    return out


def resolve_teams(env_cfg: EnvConfig, groups: list[str],
                  make_probe_env: Callable[[], MultiAgentEnv]) -> EnvConfig:
    """``env_cfg`` with its teams filled in and checked against the env's ``groups``.

    With several groups, a probe env (``make_probe_env``) is rolled out with random actions to find
    the groups that share a reward; user-given teams whose groups do not share one are kept, with a
    warning that says why it matters.
    """
    if len(groups) <= 1:
        return dataclasses.replace(env_cfg, teams=check_teams(env_cfg.teams, groups))
    teams = check_teams(env_cfg.teams, groups) if env_cfg.teams else None
    if teams is not None and all(len(members) == 1 for members in teams.values()):
        return dataclasses.replace(env_cfg, teams=teams)  # nothing shared: nothing to check
    rewards = probe_rewards(make_probe_env)
    if teams is None:
        return dataclasses.replace(env_cfg, teams=reward_sharing_teams(rewards))
    for team, members in teams.items():
        apart = [g for g in members[1:] if not torch.allclose(rewards[members[0]], rewards[g], atol=1e-6)]
        if apart:
            gap = max((rewards[members[0]] - rewards[g]).abs().mean().item() for g in apart)
            warnings.warn(
                f"env.teams.{team}: groups {[members[0], *apart]} do not share rewards (mean difference {gap:.3g} "
                "on a random rollout); a team critic or mixer still learns each group's own reward (VDN/QMIX: "
                "their mean), which may not be what these groups are paid for", stacklevel=2)
    return dataclasses.replace(env_cfg, teams=teams)


def team_of(teams: Mapping[str, list[str]], group: str) -> list[str]:
    """The groups of ``group``'s team, ``group`` first (just ``[group]`` when it has no team)."""
    for members in teams.values():
        if group in members:
            return [group, *[g for g in members if g != group]]
    return [group]


def with_teams(cfg: RunConfig, env: MultiAgentEnv, device: torch.device) -> RunConfig:
    """``cfg`` with ``env.teams`` resolved for ``env`` (probing a 2-copy env of the same config)."""
    def probe() -> MultiAgentEnv:
        return build_env(dataclasses.replace(cfg.env, num_envs=2), device=device, seed=cfg.seed)

    return dataclasses.replace(cfg, env=resolve_teams(cfg.env, list(env.group_map), probe))
