"""Repeated matrix (payoff) games (``matrix/<game>``), natively batched like the grid world.

A stage game is a payoff table ``payoffs[a_1, ..., a_n, i]`` giving player ``i``'s reward for the
joint action ``(a_1, ..., a_n)``. An episode plays the stage game ``rounds`` times (default 1);
the two-step game from the QMIX paper instead has two stages. Every player observes a one-hot of the
current stage and the previous joint action (one-hot per player, zeros at the first move); the root
``state`` is the same vector.

Built-in games (common payoff unless said otherwise):

========================  =====================================================================
``coordination``          ``[[2, 0], [0, 2]]``
``zero_sum``              matching pennies: ``[[1, -1], [-1, 1]]`` for player 0, negated for 1
``mixed``                 ``[[2, -1], [-1, 2]]``: coordination with a penalty for miscoordinating
``climbing``              3x3 climbing game ``[[11, -30, 0], [-30, 7, 6], [0, 0, 5]]``
``nonmonotonic``          ``[[8, -12, -12], [-12, 0, 0], [-12, 0, 0]]``: optimum 8 at (0, 0)
``two_step``              player 0's first action picks state 2A (payoff 7 everywhere) or 2B
                          (``[[0, 1], [1, 8]]``); the reward comes at the second step
``custom``                ``payoffs=`` a table of shape ``[A]*n`` (common payoff) or
                          ``[A]*n + [n]`` (one payoff per player); ``n_agents`` disambiguates
========================  =====================================================================
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Composite
from torchrl.envs import EnvBase

from ._common import check_positive_int, finalize, MultiAgentEnv, native_group_specs, NativeState

GROUP = "agents"

_COMMON = {
    "coordination": [[2.0, 0.0], [0.0, 2.0]],
    "mixed": [[2.0, -1.0], [-1.0, 2.0]],
    "climbing": [[11.0, -30.0, 0.0], [-30.0, 7.0, 6.0], [0.0, 0.0, 5.0]],
    "nonmonotonic": [[8.0, -12.0, -12.0], [-12.0, 0.0, 0.0], [-12.0, 0.0, 0.0]],
}
MATRIX_GAMES = sorted([*_COMMON, "zero_sum", "two_step", "custom"])


def _per_player(table: torch.Tensor, n_agents: int | None) -> torch.Tensor:
    """Normalise a user's table to shape ``[A]*n + [n]``, checking its shape."""
    table = torch.as_tensor(table, dtype=torch.float32)
    if n_agents is None:
        per_player = table.ndim >= 3 and table.shape[-1] == table.ndim - 1
        n_agents = table.ndim - 1 if per_player else table.ndim
    check_positive_int("n_agents", n_agents)
    if table.ndim == n_agents:
        table = table.unsqueeze(-1).expand(*table.shape, n_agents).clone()
    if table.ndim != n_agents + 1 or table.shape[-1] != n_agents:
        raise ValueError(
            f"payoffs of shape {tuple(table.shape)} do not fit {n_agents} players: expected "
            f"[A]*{n_agents} (common payoff) or [A]*{n_agents} + [{n_agents}] (one per player)"
        )
    actions = set(table.shape[:-1])
    if len(actions) != 1 or min(actions) < 1:
        raise ValueError(
            f"payoffs of shape {tuple(table.shape)}: every player needs the same number (>= 1) of "
            "actions, one group shares one action space"
        )
    return table


def game_tables(game: str, payoffs: Any = None, n_agents: int | None = None) -> torch.Tensor:
    """The stage tables of ``game`` as a tensor ``[n_stages, A, ..., A, n]``.

    For ``two_step`` the stages are 1 (payoff 0), 2A and 2B.
    """
    if game != "custom" and payoffs is not None:
        raise ValueError(f"payoffs= is only accepted by matrix/custom, not matrix/{game}")
    if game in _COMMON:
        return _per_player(torch.tensor(_COMMON[game]), 2).unsqueeze(0)
    if game == "zero_sum":
        row = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        return torch.stack([row, -row], -1).unsqueeze(0)
    if game == "two_step":
        first = torch.zeros(2, 2)
        state_a = torch.full((2, 2), 7.0)
        state_b = torch.tensor([[0.0, 1.0], [1.0, 8.0]])
        return torch.stack([_per_player(t, 2) for t in (first, state_a, state_b)])
    if game == "custom":
        if payoffs is None:
            raise ValueError("matrix/custom needs payoffs=<table>")
        return _per_player(payoffs, n_agents).unsqueeze(0)
    raise ValueError(
        f"unknown matrix game {game!r}; available: {', '.join('matrix/' + g for g in MATRIX_GAMES)}"
    )


class MatrixGameEnv(NativeState, EnvBase):
    """Batched repeated matrix game; see the module docstring."""

    batch_locked = True
    STATE = ("stage", "steps", "last_action")

    def __init__(
        self,
        game: str,
        *,
        num_envs: int = 1,
        payoffs: Any = None,
        n_agents: int | None = None,
        rounds: int = 1,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ):
        check_positive_int("num_envs", num_envs)
        check_positive_int("rounds", rounds)
        tables = game_tables(game, payoffs, n_agents)
        if game == "two_step" and rounds != 1:
            raise ValueError("matrix/two_step has a fixed length of 2 steps; rounds must be 1")
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.game = game
        self.tables = tables.to(self.device)
        self.n_agents = tables.shape[-1]
        self.n_actions = tables.shape[1]
        self.n_stages = tables.shape[0]
        self.episode_length = 2 if game == "two_step" else rounds
        self.group_map = {GROUP: [f"player_{i}" for i in range(self.n_agents)]}
        self._make_specs()
        self.stage = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.last_action = torch.zeros(
            num_envs, self.n_agents, self.n_actions, device=self.device
        )

    @property
    def obs_dim(self) -> int:
        """Stage one-hot plus the previous joint action (one-hot per player)."""
        return self.n_stages + self.n_agents * self.n_actions

    def _make_specs(self) -> None:
        b, n, dev = self.batch_size[0], self.n_agents, self.device
        self.observation_spec = Composite(
            {
                GROUP: Composite(
                    observation=Bounded(0.0, 1.0, shape=(b, n, self.obs_dim), device=dev),
                    shape=(b, n),
                ),
                "state": Bounded(0.0, 1.0, shape=(b, self.obs_dim), device=dev),
            },
            shape=(b,),
        )
        self.action_spec, self.reward_spec, self.done_spec = native_group_specs(GROUP, b, n, self.n_actions, dev)

    def _output(self, done: torch.Tensor, reward: torch.Tensor | None) -> TensorDictBase:
        b, n = self.batch_size[0], self.n_agents
        stage = torch.nn.functional.one_hot(self.stage, self.n_stages).float()
        state = torch.cat([stage, self.last_action.flatten(1)], -1)
        no = torch.zeros_like(done)
        group = {"observation": state.unsqueeze(1).expand(b, n, -1)}
        for key, value in {"done": done, "terminated": done, "truncated": no}.items():
            group[key] = value.view(b, 1, 1).expand(b, n, 1)
        if reward is not None:
            group["reward"] = reward.unsqueeze(-1)
        out = {
            GROUP: TensorDict(group, batch_size=(b, n), device=self.device),
            "state": state,
            "done": done.view(b, 1),
            "terminated": done.view(b, 1),
            "truncated": no.view(b, 1),
        }
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        b = self.batch_size[0]
        reset = None if tensordict is None else tensordict.get("_reset", None)
        mask = (
            torch.ones(b, dtype=torch.bool, device=self.device)
            if reset is None
            else reset.reshape(b, -1).any(-1)
        )
        self.stage = torch.where(mask, torch.zeros_like(self.stage), self.stage)
        self.steps = torch.where(mask, torch.zeros_like(self.steps), self.steps)
        self.last_action = torch.where(
            mask.view(b, 1, 1), torch.zeros_like(self.last_action), self.last_action
        )
        return self._output(torch.zeros(b, dtype=torch.bool, device=self.device), None)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get((GROUP, "action")).long()  # [B, N]
        b = self.batch_size[0]
        index = (self.stage, *action.unbind(-1))
        reward = self.tables[index]  # [B, N]
        if self.game == "two_step":
            # Stage 0 pays nothing; player 0's action picks the next stage (0 -> 2A, 1 -> 2B).
            self.stage = torch.where(self.stage == 0, 1 + action[:, 0], self.stage)
        self.steps = self.steps + 1
        self.last_action = torch.nn.functional.one_hot(action, self.n_actions).float()
        done = self.steps >= self.episode_length
        return self._output(done, reward.view(b, self.n_agents))

    def _set_seed(self, seed: int | None) -> None:
        # Deterministic dynamics: nothing to seed.
        return None


def make_matrix_env(
    game: str, *, num_envs: int, device: torch.device, seed: int | None, **kwargs: Any
) -> MultiAgentEnv:
    """Build ``matrix/<game>``; kwargs: ``rounds``, and for ``custom`` ``payoffs`` and ``n_agents``."""
    accepted = {"rounds", "payoffs", "n_agents"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"unknown matrix-game arguments {unknown}; accepted: {sorted(accepted)}")
    base = MatrixGameEnv(game, num_envs=num_envs, device=device, seed=seed, **kwargs)
    return finalize(base, group_map=base.group_map, name=f"matrix/{game}", expand_dones=False)
