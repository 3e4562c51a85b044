"""Replay for the off-policy pipelines: one buffer per group, or per agent with SUPER experience sharing.

* :class:`GroupReplay` keeps a group's transitions (``[frames]`` entries whose group fields are
  ``[n_agents, ...]``) in one buffer, on disk (``LazyMemmapStorage``) or in memory, sampled
  uniformly or by priority.
* :class:`SharedReplay` gives every agent of a group its own buffer and relays a selected few of each
  agent's new transitions to every *other* agent's buffer (SUPER, Gerstgrasser, Danino & Keren,
  NeurIPS 2023); :class:`ExperienceSelector` implements the selection heuristics.
* :class:`ProportionalPrioritizedSampler` is prioritized replay in plain PyTorch (TorchRL's own
  sampler needs its compiled extension, which does not load against every torch build).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tensordict import is_tensor_collection, TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, RandomSampler, ReplayBuffer
from torchrl.data.replay_buffers.samplers import Sampler

from marlkit.losses import team_entries
from marlkit.modules.recurrent import STATE_KEY

from .checkpoint import space_guarded

SHARING_MODES = ("none", "all", "random", "quantile", "gaussian", "stochastic")


class PriorityBlocks:
    """The priorities of ``rows`` buffers of ``capacity`` slots each, with ``p^alpha`` kept summed and
    minimised per block of ``BLOCK`` slots, so a draw reads the block sums and one block per sample
    instead of the whole buffer (TorchRL's C++ sum tree does not load with this torch build).

    SUPER's per-agent buffers share one table (a row each), so one update draws and re-prioritises
    every agent's minibatch in one pass instead of one per agent (eight on pursuit), with the same
    result as a table per buffer.
    """

    # A draw reads every block sum and one block per sample, an update recomputes the blocks it touched:
    # at SUPER's size (8 buffers of 120,000, 32 samples each) 64 costs about a fifth of what 512 does.
    BLOCK = 64

    def __init__(self, rows: int, capacity: int, alpha: float):
        blocks = -(-capacity // self.BLOCK)
        self.alpha = alpha
        self.raw = torch.zeros(rows, blocks * self.BLOCK)  # the priorities; slots past capacity stay 0
        self.scaled = torch.zeros(rows, blocks, self.BLOCK)  # p^alpha (0 where nothing is stored)
        self.block_sum = torch.zeros(rows, blocks, dtype=torch.float64)
        self.block_min = torch.full((rows, blocks), math.inf)  # over the stored slots (inf: none)

    def refresh(self, rows: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        """Recompute ``p^alpha`` of slots ``index`` of the buffers ``rows`` (same shape; both None: every
        slot), then the sums and minima of the blocks holding them."""
        if index is None:
            raw = self.raw.view(-1, self.BLOCK)
            self.scaled.view(-1, self.BLOCK)[:] = torch.where(raw > 0, raw.pow(self.alpha), 0.0)
            self._sum_blocks(torch.arange(self.block_sum.numel()))
        else:
            self._refresh_slots(rows.reshape(-1).long() * self.raw.shape[1] + index.reshape(-1).long())

    def _refresh_slots(self, slot: torch.Tensor) -> None:
        """:meth:`refresh` for the slots ``slot`` of the flattened table."""
        raw = self.raw.view(-1)[slot]
        # p^alpha in whole 64-number runs: torch's vectorised pow and its scalar loop for a remainder can
        # differ in the last bit, and each slot must get the value a whole block's recomputation gives
        pad = -raw.numel() % self.BLOCK
        scaled = torch.cat([raw, raw.new_ones(pad)]).pow(self.alpha)[:raw.numel()] if pad else raw.pow(self.alpha)
        self.scaled.view(-1)[slot] = torch.where(raw > 0, scaled, 0.0)
        self._sum_blocks(torch.unique(slot // self.BLOCK))

    def _sum_blocks(self, flat: torch.Tensor) -> None:
        """Recompute the sums and minima of the blocks ``flat`` of the flattened table."""
        scaled = self.scaled.view(-1, self.BLOCK).index_select(0, flat)
        self.block_sum.view(-1)[flat] = scaled.double().sum(1)
        self.block_min.view(-1)[flat] = torch.where(scaled > 0, scaled, math.inf).amin(1)

    def set(self, index: torch.Tensor, priority: torch.Tensor) -> None:
        """Slots ``index[r]`` of buffer ``r`` get ``priority[r]`` (both ``[rows, B]``)."""
        slot = (torch.arange(index.shape[0]).unsqueeze(-1) * self.raw.shape[1] + index).reshape(-1)
        self.raw.view(-1)[slot] = priority.reshape(-1)
        self._refresh_slots(slot)

    def draw(self, rows: list[int], lengths: list[int], batch_size: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` slots of each buffer of ``rows`` (holding ``lengths`` transitions, always the
        prefix of its slots) drawn with P(i) ~ p_i^alpha, and their importance weights (N P(i))^-beta
        over the largest possible one: both ``[len(rows), batch_size]``."""
        if min(lengths) == 0:
            raise RuntimeError("cannot sample from an empty buffer")
        uniform = torch.rand(len(rows), batch_size, dtype=torch.float64)
        return self.draw_with(torch.as_tensor(rows), torch.as_tensor(lengths), uniform, beta)

    def draw_with(self, which: torch.Tensor, n: torch.Tensor, uniform: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`draw` from given uniform numbers ``[len(which), batch_size]`` in [0, 1) (float64), the
        buffers' indices ``which`` and their lengths ``n`` as tensors: tensor code only, so it also runs
        inside a compiled update (:mod:`.compiled`)."""
        block_sum, blocks = self.block_sum[which], self.block_sum.shape[1]  # small; the slots are read in place
        cumulative = block_sum.cumsum(1)
        total = cumulative[:, -1:]
        mass = uniform * total
        block = torch.searchsorted(cumulative, mass, right=True).clamp(max=blocks - 1)
        within = (mass - (cumulative.gather(1, block) - block_sum.gather(1, block))).unsqueeze(-1)
        row = which.unsqueeze(-1)
        drawn_blocks = self.scaled.view(-1, self.BLOCK).index_select(0, (row * blocks + block).view(-1))
        slot = torch.searchsorted(drawn_blocks.view(*block.shape, self.BLOCK).double().cumsum(-1), within,
                                  right=True).squeeze(-1)
        # float rounding can step past the last filled slot
        index = torch.minimum(block * self.BLOCK + slot.clamp(max=self.BLOCK - 1), (n - 1).unsqueeze(-1))
        smallest = self.block_min[which].amin(1)  # over stored slots only (an empty one has priority 0)
        probs = self.scaled.view(self.scaled.shape[0], -1)[row, index].double() / total
        largest = (n * smallest.double() / total.squeeze(-1)).pow(-beta).unsqueeze(-1)
        return index, ((n.unsqueeze(-1) * probs).pow(-beta) / largest).float()

    def set_all_rows(self, index: torch.Tensor, priority: torch.Tensor) -> None:
        """:meth:`set` for every buffer at once (``index`` and ``priority`` ``[rows, B]``) in tensor code
        only, for a compiled update (:mod:`.compiled`): blocks touched twice are summed twice, to the same
        value, where :meth:`set` finds the distinct blocks first (a data-dependent size)."""
        slot = (torch.arange(index.shape[0]).unsqueeze(-1) * self.raw.shape[1] + index).reshape(-1)
        raw = priority.reshape(-1)
        self.raw.view(-1).index_copy_(0, slot, raw)
        self.scaled.view(-1).index_copy_(0, slot, torch.where(raw > 0, raw.pow(self.alpha), 0.0))
        flat = slot // self.BLOCK
        scaled = self.scaled.view(-1, self.BLOCK).index_select(0, flat)
        self.block_sum.view(-1).index_copy_(0, flat, scaled.double().sum(1))
        self.block_min.view(-1).index_copy_(0, flat, torch.where(scaled > 0, scaled, math.inf).amin(1))


def td_priority(td_error: torch.Tensor, eps: float) -> torch.Tensor:
    """``|td_error| + eps`` on the host, where the priorities live."""
    priority = torch.as_tensor(td_error, dtype=torch.float32).detach().cpu().abs()
    # a skipped (non-finite) step's TD errors must not poison the sums before the run stops
    return priority.nan_to_num(nan=0.0, posinf=0.0) + eps


class ProportionalPrioritizedSampler(Sampler):
    """Proportional prioritized replay (Schaul et al. 2016): P(i) ~ p_i^alpha, weights (N P(i))^-beta.

    New transitions get ``new_priority``, or when it is ``None`` the largest priority seen so far (as
    the paper); :meth:`update_priority` sets ``p_i = |td_error_i| + eps``. The priorities live in row
    ``row`` of ``table`` (:class:`PriorityBlocks`; its own one-row table when None).
    """

    def __init__(self, max_capacity: int, alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-6,
                 new_priority: float | None = None, *, table: PriorityBlocks | None = None, row: int = 0):
        super().__init__()
        if not 0.0 <= alpha or not 0.0 <= beta <= 1.0:
            raise ValueError(f"need alpha >= 0 and beta in [0, 1], got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.eps, self.new_priority = alpha, beta, eps, new_priority
        self.table = PriorityBlocks(1, max_capacity, alpha) if table is None else table
        self.row = row
        self.priorities = self.table.raw[row, :max_capacity]  # a view: the state, as checkpoints hold it
        self.max_priority = 1.0

    def _refresh(self, index: torch.Tensor | None = None) -> None:
        if index is None:
            index = torch.arange(self.priorities.shape[0])
        index = torch.as_tensor(index).reshape(-1)
        self.table.refresh(torch.full_like(index, self.row), index)

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict]:
        index, weights = self.table.draw([self.row], [len(storage)], batch_size, self.beta)
        return index[0], {"priority_weight": weights[0]}

    def extend(self, index: torch.Tensor) -> None:
        self.priorities[torch.as_tensor(index)] = self._new()
        self._refresh(torch.as_tensor(index))

    def add(self, index: int) -> None:
        self.priorities[index] = self._new()
        self._refresh(torch.tensor([index]))

    def _new(self) -> float:
        return self.max_priority if self.new_priority is None else self.new_priority

    def update_priority(self, index: torch.Tensor, priority: torch.Tensor, *, storage: Any = None) -> None:
        priority = td_priority(priority, self.eps).reshape(-1)
        index = torch.as_tensor(index).cpu().reshape(-1)
        self.priorities[index] = priority
        self.max_priority = max(self.max_priority, float(priority.max()))
        self._refresh(index)

    def _empty(self) -> None:
        self.priorities.zero_()
        self.max_priority = 1.0
        self._refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"priorities": self.priorities.clone(), "max_priority": self.max_priority}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.priorities.copy_(state_dict["priorities"])
        self.max_priority = float(state_dict["max_priority"])
        self._refresh()

    def dumps(self, path: str | Path) -> None:
        torch.save(self.state_dict(), Path(path) / "sampler.pt")

    def loads(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path) / "sampler.pt", weights_only=True))


class MemmapStorage(LazyMemmapStorage):
    """TorchRL's on-disk storage, read through plain-tensor views of its memmap files: indexing a
    ``MemoryMappedTensor`` wraps every result again (file name, offsets), which was a fifth of a SUPER
    update. The views share the files' memory, so writes are seen; a reloaded storage gets new ones."""

    _views: tuple[TensorDictBase, TensorDictBase] | None = None

    def get(self, index: Any) -> Any:
        if not (self.initialized and isinstance(index, torch.Tensor) and is_tensor_collection(self._storage)):
            return super().get(index)
        if self._views is None or self._views[0] is not self._storage:
            self._views = (self._storage, self._storage.apply(lambda t: t.as_subclass(torch.Tensor)))
        return self._views[1][index]


def make_buffer(
    size: int,
    batch_size: int,
    *,
    scratch_dir: Path | None,
    device: torch.device,
    prioritized: bool = False,
    alpha: float = 0.6,
    beta: float = 0.4,
    new_priority: float | None = None,
    table: PriorityBlocks | None = None,
    row: int = 0,
) -> ReplayBuffer:
    """A buffer of ``size`` transitions on disk (``scratch_dir`` given) or in ``device`` memory; with
    priorities, kept in row ``row`` of ``table`` when given (see :class:`PriorityBlocks`)."""
    if scratch_dir is not None:
        storage = MemmapStorage(size, scratch_dir=scratch_dir)
    else:
        storage = LazyTensorStorage(size, device=device)
    sampler = (ProportionalPrioritizedSampler(size, alpha, beta, new_priority=new_priority, table=table, row=row)
               if prioritized else RandomSampler())
    return ReplayBuffer(storage=storage, sampler=sampler, batch_size=batch_size)


_WRITES = "writes.json"  # per buffer folder: how many transitions it will have received, written first


def _mark_writes(buffer: ReplayBuffer, directory: Path | None, count: int) -> None:
    """Before ``count`` more transitions go into ``buffer``: allocate the disk blocks they will land in
    (:func:`_allocate`), then record (atomically) how many it will have received, so a resumed run can
    tell whether data its checkpoint held was overwritten after it."""
    if directory is None:
        return
    written, capacity = buffer.writer._write_count, buffer.storage.max_size
    if buffer.storage.initialized and written < capacity:  # after one pass every block is allocated
        _allocate(directory, written, min(capacity, written + count), capacity)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{_WRITES}.tmp"
    with space_guarded(tmp, "the last checkpoint is intact: free space there, then resume"):
        tmp.write_text(json.dumps({"write_count": written + count}))
        os.replace(tmp, directory / _WRITES)


def _allocate(directory: Path, start: int, stop: int, capacity: int) -> None:
    """Allocate slots ``[start, stop)`` of every memmap file under ``directory``. The files are sparse: a
    write to a page the full disk cannot provide kills the process with SIGBUS; allocated beforehand, a
    full disk is one :class:`DiskFull` line and the last checkpoint stays the state to resume from."""
    for file in directory.rglob("*.memmap"):
        with space_guarded(file, "the last checkpoint is intact: free space there, then resume"), \
                open(file, "r+b") as handle:
            row = os.fstat(handle.fileno()).st_size // capacity
            os.posix_fallocate(handle.fileno(), start * row, (stop - start) * row)


def _overwritten_since(directory: Path, saved: dict[str, Any], capacity: int) -> int:
    """How many of the ``saved["len"]`` transitions held at a checkpoint were overwritten after it."""
    marker = directory / _WRITES
    if not marker.is_file():
        return 0
    written = json.loads(marker.read_text())["write_count"] - saved["writer"]["_write_count"]
    return min(saved["len"], max(0, written - (capacity - saved["len"])))


def transitions(batch: TensorDictBase, groups: list[str], *, partners: list[str] = (), team: bool = False,
                state: bool = False, recurrent: bool = False) -> TensorDictBase:
    """The part of a collected ``[envs, time]`` batch a loss reads, flattened to ``[frames]`` (with
    ``recurrent``, kept ``[envs, time]`` with each group's stored ``rnn_state`` and ``step_count``).

    For each of ``groups``: observations, actions, rewards and flags, action masks and the live-agent
    mask ``(g, "mask")`` when the env has them. For each of ``partners`` (the other groups of a team
    critic's team): observations, next observations and actions. ``team`` adds the entries a mixer
    learns from (:func:`marlkit.losses.team_entries`); ``state`` keeps the global ``state`` and
    ``("next", "state")``.
    """
    present = set(batch.keys(True, True))
    keys = []
    for group in groups:
        keys += [(group, "observation"), (group, "action"), ("next", group, "observation"),
                 ("next", group, "reward"), ("next", group, "done"), ("next", group, "terminated")]
        keys += [key for key in ((group, "action_mask"), ("next", group, "action_mask"), (group, "mask"))
                 if key in present]
    for partner in partners:
        keys += [(partner, "observation"), (partner, "action"), ("next", partner, "observation")]
    if state:
        keys += ["state", ("next", "state")]
    if team:
        keys += [("next", "done"), ("next", "terminated")]
    if recurrent:
        keys += [(group, STATE_KEY) for group in groups] + ["step_count"]
    out = batch.select(*keys)
    if team:
        team_entries(out, groups)
    return out if recurrent else out.reshape(-1)


class GroupReplay:
    """One buffer for a group's transitions; ``sample()`` gives a minibatch on the training device."""

    def __init__(self, group: str, buffer_size: int, batch_size: int, *, scratch_dir: Path | None,
                 device: torch.device, prioritized: bool = False, alpha: float = 0.6, beta: float = 0.4,
                 new_priority: float | None = None, team: bool = False, state: bool = False, groups: list[str] | None = None,
                 partners: list[str] = ()):
        # groups: every group the loss learns (a team of several for VDN/QMIX), partners: the other
        # groups a team critic reads (see transitions)
        self.group, self.device, self.team, self.state = group, device, team, state
        self.groups, self.partners = groups or [group], list(partners)
        self.buffer = make_buffer(buffer_size, batch_size, scratch_dir=scratch_dir, device=device,
                                  prioritized=prioritized, alpha=alpha, beta=beta, new_priority=new_priority)
        self.prioritized = prioritized
        self.scratch_dir = scratch_dir

    def _buffers(self) -> list[tuple[ReplayBuffer, Path | None]]:
        return [(self.buffer, self.scratch_dir)]

    def dump(self) -> dict[str, Any]:
        """The buffers' small state for the checkpoint itself: how much each holds, its writer's cursor
        and count, its sampler's state (priorities). The transitions stay in their memmap files, written
        as they arrive; nothing is rewritten in place, so the checkpoint file alone (renamed atomically)
        says which of them the run had at that point, and a kill at any instant leaves it consistent."""
        return {"buffers": [{"len": len(buffer.storage) if buffer.storage.initialized else 0,
                             "writer": buffer.writer.state_dict(), "sampler": buffer.sampler.state_dict()}
                            for buffer, _ in self._buffers()]}

    def load(self, state: dict[str, Any]) -> None:
        """Reopen the on-disk buffers as :meth:`dump` describes them; warn when transitions they held at
        the checkpoint were overwritten after it (the buffer wrapped), since the resumed run then samples
        other data than the uninterrupted one would have."""
        if "buffers" not in state:  # checkpoints written before the replay state moved into them
            return self._load_flushed()
        for (buffer, directory), saved in zip(self._buffers(), state["buffers"], strict=True):
            if directory is None:
                raise ValueError("resuming an off-policy run needs replay.memmap=true (buffers in the run directory)")
            if saved["len"] == 0:
                continue
            if not (directory / "meta.json").is_file():
                raise ValueError(f"cannot resume the replay: {directory} no longer holds its buffer files")
            storage = buffer.storage
            storage._storage = TensorDict.load_memmap(directory)  # the files, in place
            storage.initialized = True
            storage._len = saved["len"]
            buffer.writer.load_state_dict(saved["writer"])
            buffer.sampler.load_state_dict(saved["sampler"])
            lost = _overwritten_since(directory, saved, storage.max_size)
            if lost:
                warnings.warn(
                    f"{directory}: {lost} of the {saved['len']} transitions the checkpoint's replay held were "
                    "overwritten after it (the buffer wrapped); the resumed run samples newer ones in their "
                    "place, so it will not repeat the uninterrupted run exactly", stacklevel=2)

    def check_space(self, example: TensorDictBase) -> None:
        """``ValueError`` when the on-disk buffers, once full, would not fit in the free space of their
        folder (memmap files grow as they fill; a full disk would kill the run with SIGBUS later).

        ``example`` is one collected step of the env (``[num_envs, 1]``), e.g. from ``env.fake_tensordict()``.
        """
        on_disk = [(buffer, directory) for buffer, directory in self._buffers() if directory is not None]
        if not on_disk:
            return
        # SUPER's per-agent buffers each keep one agent's share of a transition: the same total
        needed = on_disk[0][0].storage.max_size * self.item_bytes(example)
        folder = on_disk[0][1]
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        free = shutil.disk_usage(existing).free
        if needed > free:
            raise ValueError(f"the replay buffers need {needed / 2**30:.2f} GiB under {folder} when full, but only "
                             f"{free / 2**30:.2f} GiB is free; lower replay.buffer_size, free space, or set "
                             "replay.memmap=false (in memory)")

    def item_bytes(self, example: TensorDictBase) -> int:
        """Bytes of one stored item (a transition), from one collected step ``example``."""
        one = transitions(example, self.groups, partners=self.partners, team=self.team, state=self.state)[:1]
        return sum(t.numel() * t.element_size() for t in one.values(True, True))

    def _load_flushed(self) -> None:
        for buffer, directory in self._buffers():
            if directory is None:
                raise ValueError("resuming an off-policy run needs replay.memmap=true (buffers in the run directory)")
            if (directory / "storage_metadata.json").exists():
                buffer.storage.loads(directory)
                buffer.writer.loads(directory / "writer")
                if (directory / "sampler.pt").exists():
                    buffer.sampler.loads(directory)

    def extend(self, batch: TensorDictBase) -> dict[str, float]:
        """Store a collected batch; returns metrics to log (none here)."""
        data = transitions(batch, self.groups, partners=self.partners, team=self.team, state=self.state)
        _mark_writes(self.buffer, self.scratch_dir, data.shape[0])
        self.buffer.extend(data)
        return {}

    def sample(self) -> TensorDictBase:
        """A minibatch; with priorities it carries ``priority_weight`` and ``index``."""
        data, info = self.buffer.sample(return_info=True)
        data = data.to(self.device)
        if self.prioritized:
            data.set("index", torch.as_tensor(info["index"], device=self.device))
            weights = info["priority_weight"].to(self.device)
            if not self.team:  # per-agent losses [B, n_agents] need one weight per entry
                n_agents = data.get((self.group, "action")).shape[1]
                weights = weights.unsqueeze(-1).expand(-1, n_agents)
            data.set("priority_weight", weights)
        return data

    def update_priority(self, minibatch: TensorDictBase, squared_td_error: torch.Tensor) -> None:
        """New priorities |TD| from the squared TD errors TorchRL's Q losses write (per transition:
        the largest over its agents)."""
        if self.prioritized:
            priority = squared_td_error.detach().reshape(minibatch.shape[0], -1).amax(-1).sqrt()
            self.buffer.update_priority(minibatch.get("index"), priority)

    def priorities(self) -> torch.Tensor:
        """The sampler's current priorities (prioritized buffers only)."""
        return self.buffer.sampler.priorities


class SequenceReplay(GroupReplay):
    """A group's replay of trajectory slices for recurrent Q networks (DRQN).

    Each env copy's steps of a collected batch are cut into slices of ``burn_in + seq_len`` steps,
    one starting every ``seq_len`` steps after the first ``burn_in``: the slices overlap by ``burn_in``,
    so every step after a batch's first ``burn_in`` is trained on exactly once, and each slice keeps the
    agents' states stored at its steps (its first one is where the network starts). ``buffer_size``
    counts transitions (``buffer_size // (burn_in + seq_len)`` slices); ``batch_size`` counts slices;
    priorities are per slice, the largest |TD| of its trained steps.
    """

    def __init__(self, group: str, buffer_size: int, batch_size: int, *, seq_len: int, burn_in: int, **kwargs: Any):
        self.seq_len, self.burn_in = seq_len, burn_in
        super().__init__(group, buffer_size // (burn_in + seq_len), batch_size, **kwargs)

    def slices(self, batch: TensorDictBase) -> TensorDictBase:
        """``[envs, time]`` -> ``[slices, burn_in + seq_len]``."""
        data = transitions(batch, self.groups, team=self.team, state=self.state, recurrent=True)
        steps = data.shape[1]
        starts = torch.arange(self.burn_in, steps - self.seq_len + 1, self.seq_len, device=data.device) - self.burn_in
        index = starts.unsqueeze(1) + torch.arange(self.burn_in + self.seq_len, device=data.device)
        return data[:, index].reshape(-1, index.shape[1])

    def item_bytes(self, example: TensorDictBase) -> int:
        """Bytes of one stored slice."""
        one = transitions(example, self.groups, team=self.team, state=self.state, recurrent=True)[:1, :1]
        return (self.burn_in + self.seq_len) * sum(t.numel() * t.element_size() for t in one.values(True, True))

    def extend(self, batch: TensorDictBase) -> dict[str, float]:
        data = self.slices(batch)
        _mark_writes(self.buffer, self.scratch_dir, data.shape[0])
        self.buffer.extend(data)
        return {}

    def sample(self) -> TensorDictBase:
        """A minibatch of slices; with priorities it carries each slice's ``priority_weight`` and ``index``,
        repeated along its steps."""
        data, info = self.buffer.sample(return_info=True)
        data = data.to(self.device)
        if self.prioritized:
            for key, value in (("index", torch.as_tensor(info["index"])), ("priority_weight", info["priority_weight"])):
                data.set(key, value.to(self.device).unsqueeze(1).expand(data.shape))
        return data

    def update_priority(self, minibatch: TensorDictBase, squared_td_error: torch.Tensor) -> None:
        """Each slice's priority: the largest |TD| over its trained steps and agents."""
        if self.prioritized:
            priority = squared_td_error.detach().reshape(minibatch.shape[0], -1).amax(-1).sqrt()
            self.buffer.update_priority(minibatch.get("index")[:, 0], priority)


def check_sharing(mode: str, beta: float, window: int) -> None:
    """SUPER settings: ``ValueError`` naming the bad ``sharing.*`` value and what is accepted."""
    if mode not in SHARING_MODES:
        raise ValueError(f"sharing.mode={mode!r} is not supported; accepted: {list(SHARING_MODES)}")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"sharing.beta must be in (0, 1], got {beta}")
    if window < 1:
        raise ValueError(f"sharing.window must be >= 1, got {window}")


class ExperienceSelector:
    """Chooses which new transitions each agent relays to the others (SUPER's heuristics).

    :meth:`select` takes ``|TD error|`` of shape ``[M, n_agents]`` (M new transitions per agent) and
    returns a boolean mask of the same shape:

    * ``all``: everything; ``none``: nothing;
    * ``random``: ``round(beta * M)`` transitions per agent, uniformly at random;
    * ``quantile``: those above the ``(1 - beta)`` quantile (linear interpolation) of the agent's
      window of its last ``window`` |TD errors|, the new ones included;
    * ``gaussian``: those above ``mean + Phi^-1(1 - beta) * std`` of that window (population std);
    * ``stochastic``: each independently with probability ``min(1, beta * M * |TD_i| / sum_j |TD_j|)``.
    """

    def __init__(self, mode: str, n_agents: int, beta: float = 0.1, window: int = 1500,
                 generator: torch.Generator | None = None):
        check_sharing(mode, beta, window)
        self.mode, self.n_agents, self.beta, self.window = mode, n_agents, beta, window
        self.generator = generator
        self.history = torch.zeros(0, n_agents)

    def select(self, td_error: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[M, n_agents]`` of the transitions to share."""
        td = td_error.detach().abs().float().cpu().reshape(-1, self.n_agents)
        m = td.shape[0]
        if self.mode in ("quantile", "gaussian"):
            self.history = torch.cat([self.history, td])[-self.window:]
        if self.mode == "none":
            return torch.zeros_like(td, dtype=torch.bool)
        if self.mode == "all":
            return torch.ones_like(td, dtype=torch.bool)
        if self.mode == "random":
            k = round(self.beta * m)
            ranks = torch.rand(td.shape, generator=self.generator).argsort(0).argsort(0)
            return ranks < k
        if self.mode == "quantile":
            threshold = torch.quantile(self.history, 1.0 - self.beta, dim=0)
            return td > threshold
        if self.mode == "gaussian":
            z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - self.beta)) if self.beta < 1 else -math.inf
            threshold = self.history.mean(0) + z * self.history.std(0, correction=0)
            return td > threshold
        total = td.sum(0, keepdim=True).clamp_min(1e-12)
        probability = (self.beta * m * td / total).clamp(max=1.0)
        return torch.rand(td.shape, generator=self.generator) < probability


class SharedReplay(GroupReplay):
    """One buffer per agent of a group; each agent's selected new transitions go to the others' (none
    with ``selector.mode == "none"``: independent learners' own buffers and priorities).

    ``score`` maps the new transitions (``[M]`` entries, group fields ``[n_agents, ...]``) to each
    agent's |TD error| ``[M, n_agents]`` under that agent's own online and target networks. With
    ``agent_major``, minibatch observations are ``[B, n_agents, ...]`` views of ``[n_agents, B, ...]`` tensors,
    for networks that read them in that order (:func:`marlkit.modules.reads_agents_first`).
    """

    def __init__(self, group: str, n_agents: int, buffer_size: int, batch_size: int, *,
                 scratch_dir: Path | None, device: torch.device, selector: ExperienceSelector,
                 score: Callable[[TensorDictBase], torch.Tensor], prioritized: bool = False,
                 alpha: float = 0.6, beta: float = 0.4, new_priority: float | None = None, agent_major: bool = False):
        self.group, self.device, self.prioritized, self.agent_major = group, device, prioritized, agent_major
        self.team = self.state = False
        self.groups, self.partners = [group], []
        self.n_agents, self.selector, self.score = n_agents, selector, score
        self.dirs = [None if scratch_dir is None else scratch_dir / f"agent_{i}" for i in range(n_agents)]
        self.batch_size, self.beta = batch_size, beta
        self.table = PriorityBlocks(n_agents, buffer_size, alpha) if prioritized else None  # a row per agent
        self._column_cache: tuple[list[TensorDictBase], list[dict[Any, torch.Tensor]]] | None = None
        self.buffers = [
            make_buffer(buffer_size, batch_size, device=device, prioritized=prioritized, alpha=alpha, beta=beta,
                        new_priority=new_priority, scratch_dir=directory, table=self.table, row=i)
            for i, directory in enumerate(self.dirs)
        ]

    def _buffers(self) -> list[tuple[ReplayBuffer, Path | None]]:
        return list(zip(self.buffers, self.dirs, strict=True))

    def dump(self) -> dict[str, Any]:
        """Every agent's buffer state (see :meth:`GroupReplay.dump`) and the selector's |TD| window."""
        return {**super().dump(), "history": self.selector.history.clone()}

    def load(self, state: dict[str, Any]) -> None:
        super().load(state)
        if "history" in state:
            self.selector.history = state["history"].clone()

    def _per_agent(self, data: TensorDictBase) -> TensorDictBase:
        """``[M]`` group transitions -> ``[M, n_agents]`` so ``[:, i]`` is agent i's own."""
        g = self.group
        return TensorDict({g: data.get(g), "next": {g: data.get(("next", g))}},
                          batch_size=(data.shape[0], self.n_agents))

    def extend(self, batch: TensorDictBase) -> dict[str, float]:
        """Store each agent's transitions in its buffer, then relay the selected ones to the others."""
        data = transitions(batch, [self.group])
        if self.selector.mode == "none":  # per-agent buffers and priorities only: nothing to score
            share = torch.zeros(data.shape[0], self.n_agents, dtype=torch.bool)
        else:
            with torch.no_grad():
                share = self.selector.select(self.score(data.to(self.device)))  # [M, n_agents]
        per_agent = self._per_agent(data)
        chosen_by = share.sum(0).tolist()  # agent i's buffer gets its own and every other agent's chosen
        for i, (buffer, directory) in enumerate(self._buffers()):
            _mark_writes(buffer, directory, data.shape[0] + int(sum(chosen_by)) - int(chosen_by[i]))
        chosen = [per_agent[:, sender][share[:, sender].to(per_agent.device)] if chosen_by[sender] else None
                  for sender in range(self.n_agents)]
        for receiver, buffer in enumerate(self.buffers):
            # one write per buffer (each TorchRL extend costs ~2 ms on memmap files), in the order the
            # transitions arrive: its own, then each other agent's chosen ones by sender
            parts = [per_agent[:, receiver]] + [part for sender, part in enumerate(chosen)
                                                if sender != receiver and part is not None]
            buffer.extend(torch.cat(parts) if len(parts) > 1 else parts[0])
        return {f"{self.group}/share_fraction": share.float().mean().item()}

    def _columns(self) -> list[dict[Any, torch.Tensor]]:
        """Each agent's stored fields as plain tensors viewing its storage (memory or memmap files),
        rebuilt when a storage is replaced (first write, resume)."""
        stored = [buffer.storage._storage for buffer in self.buffers]
        if self._column_cache is None or any(a is not b for a, b in zip(self._column_cache[0], stored, strict=True)):
            columns = [{key: value.as_subclass(torch.Tensor) for key, value in td.items(True, True)} for td in stored]
            self._column_cache = (stored, columns)
        return self._column_cache[1]

    def lengths(self) -> list[int]:
        """How many transitions each agent's buffer holds."""
        return [len(buffer.storage) for buffer in self.buffers]

    def sample(self) -> TensorDictBase:
        """Agent i's column comes from agent i's buffer: one ``[B]`` batch with ``[B, n_agents]`` fields.
        With priorities every agent's slots are drawn in one pass over the shared table."""
        lengths = self.lengths()
        if self.prioritized:
            index, weights = self.table.draw(list(range(self.n_agents)), lengths, self.batch_size, self.beta)
        else:
            index = torch.stack([buffer.sampler.sample(buffer.storage, self.batch_size)[0] for buffer in self.buffers])
        rows = index.unbind(0)
        columns = self._columns()
        out = TensorDict(batch_size=[self.batch_size], device=next(iter(columns[0].values())).device)
        for key in columns[0]:  # one gather per agent and field: no TensorDict indexing per agent
            parts = [fields[key] for fields in columns]
            if self.agent_major and key[-1] == "observation":  # one buffer, no copy in the network
                gathered = parts[0].new_empty((self.n_agents, self.batch_size, *parts[0].shape[1:]))
                for part, i, place in zip(parts, rows, gathered, strict=True):
                    torch.index_select(part, 0, i, out=place)
                out.set(key, gathered.transpose(0, 1))
            else:
                out.set(key, torch.stack([part.index_select(0, i) for part, i in zip(parts, rows, strict=True)], dim=1))
        if out.device != self.device:
            out = out.to(self.device)
        if self.prioritized:
            # contiguous [B, n_agents]: from a strided view the loss would sum its weighted errors in another order
            out.set("index", index.t().contiguous().to(self.device))
            out.set("priority_weight", weights.t().contiguous().to(self.device))  # agent i's own weights
        return out

    def update_priority(self, minibatch: TensorDictBase, squared_td_error: torch.Tensor) -> None:
        """Agent i's buffer gets agent i's |TD| (from the squared TD errors the loss writes), all agents'
        in one pass over the shared table."""
        if not self.prioritized:
            return
        samplers = [buffer.sampler for buffer in self.buffers]
        errors = td_priority(squared_td_error.reshape(minibatch.shape[0], self.n_agents).sqrt(), samplers[0].eps).t()
        self.table.set(minibatch.get("index").cpu().t(), errors)
        for sampler, largest in zip(samplers, errors.amax(1).tolist(), strict=True):
            sampler.max_priority = max(sampler.max_priority, largest)

    def priorities(self) -> torch.Tensor:
        """Agent 0's sampler priorities."""
        return self.buffers[0].sampler.priorities
