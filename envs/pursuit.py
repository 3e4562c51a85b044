"""SISL pursuit on tensors (``pursuit``): the rules of ``pettingzoo.sisl.pursuit_v5``, every copy stepped at once.

PettingZoo's pursuit is a single-copy Python simulator; here all ``num_envs`` copies are tensors on one
device, so thousands of copies step in the time one did. Keyword arguments, defaults, map, observation,
actions, rewards, catch rule and episode end are PettingZoo's, as are the group (``pursuer``), agent
names and TensorDict keys marlkit gives ``pettingzoo/sisl/pursuit_v5`` - presets, trained policies,
``eval`` and ``render`` work with either.

One parallel step, in the order PettingZoo's parallel API runs its AEC cycle:

1. Pursuers move one after another (0, 1, ...). After each move every pursuer earns
   ``tag_reward * (evaders on its 4 neighbouring cells, indices clipped to the map) / n_pursuers``,
   so pursuer ``i`` is counted ``i`` times at its old cell and ``n_pursuers - i`` times at its new one.
2. After the last move, evaders are caught (``surround``: every open neighbouring cell holds a pursuer;
   otherwise: at least ``n_catch`` pursuers on the evader's cell) and removed; each pursuer next to
   (``surround``) or on a caught evader earns ``catch_reward`` once, every pursuer ``urgency_reward``.
3. The remaining evaders each take a uniformly random move (none with ``freeze_evaders``).
4. With ``shared_reward`` every pursuer gets the mean; the episode terminates when no evader is left
   and is truncated after ``max_cycles`` steps.

Rewards are summed in float64 in PettingZoo's order (numpy's pairwise mean included), so they equal
PettingZoo's bit for bit; the equivalence is tested step by step with forced evader moves. One
deliberate difference: a ``constraint_window`` narrower than one cell spawns in that one cell (PettingZoo
raises from ``integers(low, low)`` there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite
from torchrl.envs import EnvBase

from ._common import check_positive_int, finalize, MultiAgentEnv, native_group_specs, NativeState

GROUP = "pursuer"
# (dx, dy) per action, in PettingZoo's order: left, right, up, down, stay (DiscreteAgent.motion_range)
MOVES = ((-1, 0), (1, 0), (0, 1), (0, -1), (0, 0))
STAY = 4
# the neighbours that surround an evader and that tag rewards count (Pursuit.surround_mask)
SURROUND = ((-1, 0), (1, 0), (0, 1), (0, -1))
DEFAULTS: dict[str, Any] = dict(
    x_size=16, y_size=16, max_cycles=500, shared_reward=True, n_evaders=30, n_pursuers=8, obs_range=7,
    n_catch=2, freeze_evaders=False, tag_reward=0.01, catch_reward=5.0, urgency_reward=-0.1, surround=True,
    constraint_window=1.0,
)


def rectangle_map(x_size: int, y_size: int, xb: float = 0.3, yb: float = 0.2) -> torch.Tensor:
    """PettingZoo's map: a building (``True``) in the middle, ``xb`` / ``yb`` of each side left open."""
    fx = torch.arange(x_size, dtype=torch.float64) / x_size
    fy = torch.arange(y_size, dtype=torch.float64) / y_size
    return ((fx > xb) & (fx < 1.0 - xb)).unsqueeze(1) & ((fy > yb) & (fy < 1.0 - yb)).unsqueeze(0)


def _need_to_surround(walls: torch.Tensor) -> torch.Tensor:
    """[X, Y] open neighbours of each cell, as ``Pursuit.need_to_surround`` counts them (its wall test
    skips neighbours in row or column 0, which the rectangle map never walls)."""
    x_size, y_size = walls.shape
    need = torch.full((x_size, y_size), 4, dtype=torch.long)
    need[0] -= 1
    need[-1] -= 1
    need[:, 0] -= 1
    need[:, -1] -= 1
    if x_size == 1:
        need[0] += 1  # x == 0 and x == x_size - 1 is one test in PettingZoo
    if y_size == 1:
        need[:, 0] += 1
    xs, ys = torch.meshgrid(torch.arange(x_size), torch.arange(y_size), indexing="ij")
    for dx, dy in SURROUND:
        xn, yn = xs + dx, ys + dy
        checked = (xn > 0) & (xn < x_size) & (yn > 0) & (yn < y_size)
        need -= (checked & walls[xn.clamp(0, x_size - 1), yn.clamp(0, y_size - 1)]).long()
    return need


def numpy_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in the order numpy's pairwise summation adds (so float64 sums match it)."""
    n = values.shape[-1]
    if n < 8:
        total = torch.full(values.shape[:-1], -0.0, dtype=values.dtype, device=values.device)
        for i in range(n):
            total = total + values[..., i]
        return total
    if n <= 128:
        r = [values[..., j] for j in range(8)]
        i = 8
        while i < n - n % 8:
            r = [r[j] + values[..., i + j] for j in range(8)]
            i += 8
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for k in range(i, n):
            total = total + values[..., k]
        return total
    half = n // 2
    half -= half % 8
    return numpy_sum(values[..., :half]) + numpy_sum(values[..., half:])


class PursuitEnv(NativeState, EnvBase):
    """Batched SISL pursuit; see the module docstring for the rules and their order."""

    batch_locked = True
    STATE = ("pursuer_pos", "evader_pos", "evader_alive", "frames", "_rng")

    def __init__(self, *, num_envs: int = 1, device: torch.device | str = "cpu", seed: int | None = None,
                 **kwargs: Any):
        unknown = sorted(set(kwargs) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown pursuit arguments {unknown}; accepted: {sorted(DEFAULTS)}")
        cfg = {**DEFAULTS, **kwargs}
        for name in ("x_size", "y_size", "max_cycles", "n_evaders", "n_pursuers", "obs_range", "n_catch"):
            check_positive_int(name, cfg[name])
        for name in ("shared_reward", "freeze_evaders", "surround"):
            if not isinstance(cfg[name], bool):
                raise ValueError(f"{name} must be true or false, got {cfg[name]!r}")
        for name in ("tag_reward", "catch_reward", "urgency_reward", "constraint_window"):
            if isinstance(cfg[name], bool) or not isinstance(cfg[name], (int, float)) or not np.isfinite(cfg[name]):
                raise ValueError(f"{name} must be a finite number, got {cfg[name]!r}")
        if not 0.0 <= cfg["constraint_window"] <= 1.0:
            raise ValueError(f"constraint_window must be in [0, 1], got {cfg['constraint_window']}")
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        for name, value in cfg.items():
            setattr(self, name, value)
        self.walls = rectangle_map(self.x_size, self.y_size).to(self.device)
        self.need = _need_to_surround(self.walls.cpu()).to(self.device)
        self.moves = torch.tensor(MOVES, device=self.device)
        self.surround_mask = torch.tensor(SURROUND, device=self.device)
        offset = int((self.obs_range - 1) / 2)
        window = torch.arange(self.obs_range, device=self.device)
        # cells of the observation window beyond 2 * offset (an even obs_range) stay wall-filled
        self._window = torch.where(window <= 2 * offset, window - offset, -(self.x_size + self.y_size + self.obs_range))
        self.group_map = {GROUP: [f"pursuer_{i}" for i in range(self.n_pursuers)]}
        self._rng = torch.Generator(device=self.device)
        self._rng.manual_seed(0 if seed is None else seed)
        self._make_specs()
        b = num_envs
        self.pursuer_pos = torch.zeros(b, self.n_pursuers, 2, dtype=torch.long, device=self.device)
        self.evader_pos = torch.zeros(b, self.n_evaders, 2, dtype=torch.long, device=self.device)
        self.evader_alive = torch.ones(b, self.n_evaders, dtype=torch.bool, device=self.device)
        self.frames = torch.zeros(b, dtype=torch.long, device=self.device)
        self.forced_evader_actions: torch.Tensor | None = None

    def _make_specs(self) -> None:
        b, n, o, dev = self.batch_size[0], self.n_pursuers, self.obs_range, self.device
        high = float(max(self.n_pursuers, self.n_evaders))
        self.observation_spec = Composite(
            {GROUP: Composite(observation=Bounded(0.0, high, shape=(b, n, o, o, 3), device=dev),
                              mask=Categorical(2, shape=(b, n), dtype=torch.bool, device=dev), shape=(b, n))},
            shape=(b,),
        )
        self.action_spec, self.reward_spec, self.done_spec = native_group_specs(GROUP, b, n, len(MOVES), dev)

    # -- the rules ---------------------------------------------------------------------------------------

    def _move(self, pos: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """DiscreteAgent.step: a move off the map or into the building leaves the agent where it was."""
        target = pos + self.moves[action]
        x, y = target[..., 0], target[..., 1]
        inside = (x >= 0) & (x < self.x_size) & (y >= 0) & (y < self.y_size)
        open_cell = inside & ~self.walls[x.clamp(0, self.x_size - 1), y.clamp(0, self.y_size - 1)]
        return torch.where(open_cell.unsqueeze(-1), target, pos)

    def _counts(self, pos: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """[B, X, Y] agents per cell."""
        b = pos.shape[0]
        flat = pos[..., 0] * self.y_size + pos[..., 1]
        ones = torch.ones_like(flat) if alive is None else alive.long()
        counts = torch.zeros(b, self.x_size * self.y_size, dtype=torch.long, device=self.device)
        return counts.scatter_add_(1, flat, ones).view(b, self.x_size, self.y_size)

    def _tagged(self, evaders: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[B, N] evaders on the 4 neighbouring cells of each position, indices clipped to the map."""
        near = pos.unsqueeze(-2) + self.surround_mask  # [B, N, 4, 2]
        x, y = near[..., 0].clamp(0, self.x_size - 1), near[..., 1].clamp(0, self.y_size - 1)
        flat = (x * self.y_size + y).flatten(1)
        return evaders.flatten(1).gather(1, flat).view(*pos.shape[:-1], 4).sum(-1)

    def _caught(self, pursuers: torch.Tensor, occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaders caught by pursuers at ``pursuers`` ([B, P, 2], per-cell counts ``occupied``), and for
        each pursuer whether it took part in a catch."""
        ex, ey = self.evader_pos[..., 0], self.evader_pos[..., 1]
        if self.surround:
            near = self.evader_pos.unsqueeze(-2) + self.surround_mask  # [B, E, 4, 2]
            nx, ny = near[..., 0], near[..., 1]
            inside = (nx >= 0) & (nx < self.x_size) & (ny >= 0) & (ny < self.y_size)
            held = inside & (occupied.flatten(1).gather(
                1, (nx.clamp(0, self.x_size - 1) * self.y_size + ny.clamp(0, self.y_size - 1)).flatten(1)
            ).view(inside.shape) > 0)
            caught = self.evader_alive & (held.sum(-1) == self.need[ex, ey])
            # pursuer p is one of caught evader e's neighbours
            offset = pursuers.unsqueeze(2) - self.evader_pos.unsqueeze(1)  # [B, P, E, 2]
            adjacent = offset.abs().sum(-1) == 1
        else:
            caught = self.evader_alive & (occupied.flatten(1).gather(1, ex * self.y_size + ey) >= self.n_catch)
            adjacent = (pursuers.unsqueeze(2) == self.evader_pos.unsqueeze(1)).all(-1)
        return caught, (adjacent & caught.unsqueeze(1)).any(-1)

    def _rewards(self, old: torch.Tensor, new: torch.Tensor, catchers: torch.Tensor) -> torch.Tensor:
        """[B, P] float64 rewards summed over the AEC cycle's sub-steps in PettingZoo's order."""
        n = self.n_pursuers
        evaders = self._counts(self.evader_pos, self.evader_alive)
        # each pursuer's tag term before and after its own move, as PettingZoo computes it: (r * tags) / n
        before = (self.tag_reward * self._tagged(evaders, old).double()) / n
        after = (self.tag_reward * self._tagged(evaders, new).double()) / n
        index = torch.arange(n, device=self.device)
        total = torch.zeros(old.shape[0], n, dtype=torch.float64, device=self.device)
        for k in range(n):  # sub-step k: pursuers 0..k have moved
            step = torch.where(index <= k, after, before)
            if k == n - 1:
                step = (step + self.catch_reward * catchers.double()) + self.urgency_reward
            if self.shared_reward:
                step = (numpy_sum(step) / n).unsqueeze(-1).expand(-1, n)
            total = total + step
        return total

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get((GROUP, "action"))
        if action.dim() == 3:  # one-hot actions
            action = action.argmax(-1)
        action = action.long()
        old = self.pursuer_pos
        new = self._move(old, action)
        occupied = self._counts(new)
        caught, catchers = self._caught(new, occupied)
        reward = self._rewards(old, new, catchers)
        self.pursuer_pos = new
        self.evader_alive = self.evader_alive & ~caught
        if not self.freeze_evaders:
            if self.forced_evader_actions is not None:
                moves = self.forced_evader_actions.to(self.device).long()
            else:
                moves = torch.randint(len(MOVES), self.evader_alive.shape, generator=self._rng, device=self.device)
            moves = torch.where(self.evader_alive, moves, STAY)
            self.evader_pos = self._move(self.evader_pos, moves)
        self.frames = self.frames + 1
        truncated = self.frames >= self.max_cycles
        terminated = ~truncated & ~self.evader_alive.any(-1)
        return self._output(terminated, truncated, reward.float(), occupied)

    def _observation(self, pursuer_counts: torch.Tensor | None = None) -> torch.Tensor:
        """[B, P, obs_range, obs_range, 3] as PettingZoo's ``observe``: walls (1 off the map too),
        pursuer counts, evader counts around each pursuer, in PettingZoo's (y, x, channel) layout."""
        b = self.batch_size[0]
        pad = self.obs_range
        layers = torch.zeros(b, 3, self.x_size + 2 * pad, self.y_size + 2 * pad, device=self.device)
        layers[:, 0] = 1.0
        inner = (slice(pad, pad + self.x_size), slice(pad, pad + self.y_size))
        layers[:, 0, inner[0], inner[1]] = self.walls.float()
        counts = self._counts(self.pursuer_pos) if pursuer_counts is None else pursuer_counts
        layers[:, 1, inner[0], inner[1]] = counts.float()
        layers[:, 2, inner[0], inner[1]] = self._counts(self.evader_pos, self.evader_alive).float()
        rows = (self.pursuer_pos[..., 0:1] + self._window + pad).clamp(0, self.x_size + 2 * pad - 1)  # [B, P, O]
        cols = (self.pursuer_pos[..., 1:2] + self._window + pad).clamp(0, self.y_size + 2 * pad - 1)
        flat = layers.flatten(2)  # [B, 3, cells]
        index = (rows.unsqueeze(-1) * (self.y_size + 2 * pad) + cols.unsqueeze(-2))  # [B, P, O(x), O(y)]
        obs = flat.unsqueeze(1).expand(-1, self.n_pursuers, -1, -1).gather(
            3, index.flatten(2).unsqueeze(2).expand(-1, -1, 3, -1))  # [B, P, 3, O*O]
        return obs.view(b, self.n_pursuers, 3, self.obs_range, self.obs_range).permute(0, 1, 4, 3, 2)

    def _output(self, terminated: torch.Tensor, truncated: torch.Tensor, reward: torch.Tensor | None,
                pursuer_counts: torch.Tensor | None = None) -> TensorDictBase:
        b, n = self.batch_size[0], self.n_pursuers
        flags = {"done": terminated | truncated, "terminated": terminated, "truncated": truncated}
        group = {"observation": self._observation(pursuer_counts), "mask": torch.ones(b, n, dtype=torch.bool, device=self.device)}
        group.update({key: value.view(b, 1, 1).expand(b, n, 1) for key, value in flags.items()})
        if reward is not None:
            group["reward"] = reward.unsqueeze(-1)
        out = {GROUP: TensorDict(group, batch_size=(b, n), device=self.device)}
        out.update({key: value.view(b, 1) for key, value in flags.items()})
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    # -- episodes ------------------------------------------------------------------------------------------

    def _spawn(self, count: int, window: tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
        """[R, count, 2] cells for copies ``rows``: one after another, each uniform over the open cells of
        the window that are neither taken nor next to a taken one (agent_utils.create_agents)."""
        r = rows.shape[0]
        xlb, xub, ylb, yub = window
        xs = torch.arange(self.x_size, device=self.device)
        ys = torch.arange(self.y_size, device=self.device)
        inside = (((xs >= xlb[:, None]) & (xs < xub[:, None])).unsqueeze(2)
                  & ((ys >= ylb[:, None]) & (ys < yub[:, None])).unsqueeze(1))
        free = inside & ~self.walls
        blocked = torch.zeros(r, self.x_size + 2, self.y_size + 2, dtype=torch.bool, device=self.device)
        out = torch.zeros(r, count, 2, dtype=torch.long, device=self.device)
        for i in range(count):
            allowed = (free & ~blocked[:, 1:-1, 1:-1]).flatten(1)
            if not bool(allowed.any(-1).all()):
                raise ValueError(
                    f"pursuit cannot place {count} agents of a kind on non-adjacent open cells of a "
                    f"{self.x_size}x{self.y_size} map (constraint_window={self.constraint_window}); "
                    "use fewer agents, a larger map or a wider constraint_window")
            score = torch.rand(allowed.shape, generator=self._rng, device=self.device) * allowed
            cell = score.argmax(-1)
            x, y = cell // self.y_size, cell % self.y_size
            out[:, i, 0], out[:, i, 1] = x, y
            for dx, dy in ((0, 0), *SURROUND):
                blocked[torch.arange(r, device=self.device), x + 1 + dx, y + 1 + dy] = True
        return out

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        b = self.batch_size[0]
        reset = None if tensordict is None else tensordict.get("_reset", None)
        mask = torch.ones(b, dtype=torch.bool, device=self.device) if reset is None else reset.reshape(b, -1).any(-1)
        rows = mask.nonzero().squeeze(-1)
        if rows.numel():
            start = torch.rand(rows.numel(), 2, generator=self._rng, device=self.device, dtype=torch.float64)
            start = start * (1.0 - self.constraint_window)
            xlb = (self.x_size * start[:, 0]).long()
            xub = torch.maximum((self.x_size * (start[:, 0] + self.constraint_window)).long(), xlb + 1)
            ylb = (self.y_size * start[:, 1]).long()
            yub = torch.maximum((self.y_size * (start[:, 1] + self.constraint_window)).long(), ylb + 1)
            window = (xlb, xub, ylb, yub)
            self.pursuer_pos = self.pursuer_pos.index_copy(0, rows, self._spawn(self.n_pursuers, window, rows))
            self.evader_pos = self.evader_pos.index_copy(0, rows, self._spawn(self.n_evaders, window, rows))
            self.evader_alive = self.evader_alive | mask.unsqueeze(-1)
            self.frames = torch.where(mask, 0, self.frames)
        zeros = torch.zeros(b, dtype=torch.bool, device=self.device)
        return self._output(zeros, zeros, None)

    def set_state(self, pursuer_pos: Any, evader_pos: Any, evader_alive: Any = None, frames: Any = 0) -> TensorDictBase:
        """Place every agent by hand (``[num_envs, n, 2]`` (x, y) cells; ``evader_alive`` ``[num_envs,
        n_evaders]``); returns the observation TensorDict, as ``reset`` would."""
        b = self.batch_size[0]
        self.pursuer_pos = torch.as_tensor(pursuer_pos, dtype=torch.long, device=self.device).reshape(
            b, self.n_pursuers, 2).clone()
        self.evader_pos = torch.as_tensor(evader_pos, dtype=torch.long, device=self.device).reshape(
            b, self.n_evaders, 2).clone()
        alive = torch.ones(b, self.n_evaders, dtype=torch.bool) if evader_alive is None else evader_alive
        self.evader_alive = torch.as_tensor(alive, dtype=torch.bool, device=self.device).reshape(b, self.n_evaders).clone()
        self.frames = torch.as_tensor(frames, dtype=torch.long, device=self.device).expand(b).clone()
        zeros = torch.zeros(b, dtype=torch.bool, device=self.device)
        return self._output(zeros, zeros, None)

    def _set_seed(self, seed: int | None) -> None:
        self._rng.manual_seed(0 if seed is None else seed)

    def render_frame(self, env_index: int = 0, cell: int = 30) -> np.ndarray:
        """Copy ``env_index`` as PettingZoo draws it: building white, each pursuer's observed window
        orange, evaders blue, pursuers red (rows are y, columns x)."""
        img = np.zeros((self.y_size * cell, self.x_size * cell, 3), dtype=np.float64)
        walls = self.walls.cpu().numpy()
        for x, y in zip(*np.nonzero(walls), strict=True):
            img[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = 255
        half = self.obs_range / 2.0
        for x, y in self.pursuer_pos[env_index].tolist():
            x0, y0 = int(cell * (x - half + 0.5)), int(cell * (y - half + 0.5))
            x1, y1 = x0 + cell * self.obs_range, y0 + cell * self.obs_range
            patch = img[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
            patch[:] = 0.5 * patch + 0.5 * np.array([255, 152, 72])
        radius = cell // 3
        yy, xx = np.mgrid[0:cell, 0:cell]
        disc = (yy - cell // 2) ** 2 + (xx - cell // 2) ** 2 <= radius ** 2
        alive = self.evader_alive[env_index].tolist()
        for (x, y), here in zip(self.evader_pos[env_index].tolist(), alive, strict=True):
            if here:
                img[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell][disc] = (0, 0, 255)
        for x, y in self.pursuer_pos[env_index].tolist():
            img[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell][disc] = (255, 0, 0)
        return img.astype(np.uint8)


def make_pursuit_env(*, num_envs: int, device: torch.device, seed: int | None, **kwargs: Any) -> MultiAgentEnv:
    """Build tensor pursuit; kwargs are ``pursuit_v5``'s (``x_size``, ``n_pursuers``, ``max_cycles``, ...)."""
    base = PursuitEnv(num_envs=num_envs, device=device, seed=seed, **kwargs)
    return finalize(base, group_map=base.group_map, name="pursuit", expand_dones=False, render_fn=base.render_frame)
