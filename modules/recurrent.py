"""Agents with memory: a per-agent GRU or LSTM between an MLP encoder and a linear head.

The state of every agent lives in the TensorDict at ``(group, "rnn_state")`` (the state *before* the
step's action; an LSTM's hidden and cell states side by side) and the module writes the next one to
``("next", group, "rnn_state")``, so TorchRL's collectors carry it from step to step; the env gets a
``TensorDictPrimer`` for it (:func:`state_primer`), which zeroes it whenever a copy resets.

One module, two modes, told apart by the input's batch dims:

* **step** (``[copies]``, as collectors, evaluation and rendering call it): one cell step from the
  stored state;
* **sequences** (``[sequences, time]``, as a PPO minibatch of trajectory slices): the cell runs over
  time from the state stored at each slice's first step, and restarts from zeros wherever a new
  episode begins inside the slice (``step_count == 0``), so a slice may cross episode boundaries.

Both modes run the same operations on the same shapes step by step, so they agree to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.data import Composite, Unbounded
from torchrl.envs import EnvBase, TensorDictPrimer
from torchrl.modules import MultiAgentMLP

from .encoders import activation_class

RECURRENT_KINDS = ("gru", "lstm")
STATE_KEY = "rnn_state"
CRITIC_STATE_KEY = "critic_rnn_state"  # a recurrent value critic's own state, beside the actor's


def state_size(kind: str, num_cells: Sequence[int]) -> int:
    """Per-agent state width: the last hidden size, twice for an LSTM (hidden and cell state)."""
    return num_cells[-1] * (2 if kind == "lstm" else 1)


class MultiAgentRecurrent(nn.Module):
    """Encoder MLP -> GRU / LSTM cell -> linear head, for ``[*B, n_agents, in]`` inputs; weights shared by
    a group's agents or one set per agent (``share_params``); ``centralised``: every agent's encoder reads
    all the group's inputs (a MAPPO critic)."""

    def __init__(self, kind: str, in_features: int, out_features: int, n_agents: int, *, num_cells: Sequence[int],
                 activation: str, share_params: bool, device: Any = None, centralised: bool = False):
        super().__init__()
        if kind not in RECURRENT_KINDS:
            raise ValueError(f"recurrent kind {kind!r}; accepted: {', '.join(RECURRENT_KINDS)}")
        self.kind, self.hidden = kind, num_cells[-1]
        self.encoder = nn.Sequential(
            MultiAgentMLP(n_agent_inputs=in_features, n_agent_outputs=self.hidden, n_agents=n_agents, centralized=centralised,
                          share_params=share_params, num_cells=list(num_cells[:-1]),
                          activation_class=activation_class(activation), device=device),
            activation_class(activation)())
        gates = (3 if kind == "gru" else 4) * self.hidden
        copies = 1 if share_params else n_agents
        bound = 1.0 / math.sqrt(self.hidden)  # torch.nn.GRU / LSTM's initialisation

        def weight(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(copies, *shape, device=device).uniform_(-bound, bound))

        self.weight_ih, self.weight_hh = weight(gates, self.hidden), weight(gates, self.hidden)
        self.bias_ih, self.bias_hh = weight(gates), weight(gates)
        self.head = MultiAgentMLP(n_agent_inputs=self.hidden, n_agent_outputs=out_features, n_agents=n_agents,
                                  centralized=False, share_params=share_params, num_cells=[], device=device)

    def cell(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One step: features ``[*B, n_agents, hidden]`` and state ``[*B, n_agents, state]`` -> next state."""
        gi = (self.weight_ih @ x.unsqueeze(-1)).squeeze(-1) + self.bias_ih
        if self.kind == "gru":
            gh = (self.weight_hh @ state.unsqueeze(-1)).squeeze(-1) + self.bias_hh
            i_r, i_z, i_n = gi.chunk(3, -1)
            h_r, h_z, h_n = gh.chunk(3, -1)
            reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            new = torch.tanh(i_n + reset * h_n)
            return (1 - update) * new + update * state
        h, c = state.chunk(2, -1)
        gates = gi + (self.weight_hh @ h.unsqueeze(-1)).squeeze(-1) + self.bias_hh
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c), c], -1)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        return self.head(state[..., : self.hidden])

    def forward(self, x: torch.Tensor, state: torch.Tensor, first: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step: ``x [B, n, in]``, ``state [B, n, S]`` -> ``(out [B, n, out], next state)``. Sequences:
        ``x [N, T, n, in]``, ``state [N, n, S]`` (at each sequence's start), ``first [N, T]`` (a new
        episode starts: the state restarts from zeros) -> ``(out [N, T, n, out], next states [N, T, n, S])``."""
        if first is None:
            state = self.cell(self.encoder(x), state)
            return self.output(state), state
        outs, states = [], []
        for t in range(x.shape[1]):  # each step on the same shapes as a step-mode call: the same bits
            state = torch.where(first[:, t].view(-1, 1, 1), torch.zeros_like(state), state)
            state = self.cell(self.encoder(x[:, t]), state)
            outs.append(self.output(state))
            states.append(state)
        return torch.stack(outs, 1), torch.stack(states, 1)


class RecurrentModule(TensorDictModuleBase):
    """A group's recurrent network as a TensorDict module: reads ``(group, "observation")``,
    ``(group, state_key)`` and ``step_count``; writes ``out_keys`` (``post`` splits the head's output,
    e.g. a ``NormalParamExtractor`` into loc and scale) and ``("next", group, state_key)``."""

    def __init__(self, net: MultiAgentRecurrent, encoder: nn.Module, group: str, out_keys: list, post: nn.Module | None = None,
                 state_key: str = STATE_KEY):
        super().__init__()
        self.net, self.obs_encoder, self.post = net, encoder, post
        self.group, self.state_key = group, state_key
        self.in_keys = [(group, "observation"), (group, state_key), "step_count"]
        self.out_keys = [*out_keys, ("next", group, state_key)]
        self._outputs = out_keys

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs = self.obs_encoder(tensordict.get((self.group, "observation")))
        state = tensordict.get((self.group, self.state_key))
        if tensordict.batch_dims == 2:  # [sequences, time]
            first = tensordict.get("step_count").reshape(tensordict.batch_size) == 0
            out, states = self.net(obs, state[:, 0], first)
        elif tensordict.batch_dims == 1:
            out, states = self.net(obs, state)
        else:
            raise ValueError(f"a recurrent actor takes [copies] or [sequences, time] batches, got {tuple(tensordict.batch_size)}")
        values = self.post(out) if self.post is not None else out
        values = values if isinstance(values, tuple) else (values,)
        for key, value in zip(self._outputs, values):
            tensordict.set(key, value)
        tensordict.set(("next", self.group, self.state_key), states)
        return tensordict

    def along_with_next(self, data: TensorDictBase, key: NestedKey) -> tuple[torch.Tensor, torch.Tensor]:
        """Over ``[N, T]`` slices: ``key`` at every step (a sequence run from each slice's stored state) and,
        without gradient, at every step's next observation from the state after that step (one batched
        step), as TD targets need it: right across episode boundaries and for truncated episodes."""
        g, (n, t) = self.group, data.batch_size
        td = data.select((g, "observation"), (g, self.state_key), "step_count").clone(False)
        self(td)
        states = td.get(("next", g, self.state_key))
        step = TensorDict({g: {"observation": data.get(("next", g, "observation")).flatten(0, 1),
                               self.state_key: states.flatten(0, 1)}}, batch_size=[n * t])
        with torch.no_grad():
            self(step)
        return td.get(key), step.get(key).unflatten(0, (n, t))


def state_primer(env: EnvBase, kind: str, num_cells: Sequence[int], key: str = STATE_KEY) -> TensorDictPrimer:
    """The primer that gives every group of ``env`` a zero ``(group, key)`` at each reset."""
    size, batch = state_size(kind, num_cells), tuple(env.batch_size)
    specs = {group: Composite({key: Unbounded(shape=(*batch, len(agents), size), device=env.device)},
                              shape=(*batch, len(agents)))
             for group, agents in env.group_map.items()}
    return TensorDictPrimer(Composite(specs, shape=batch), reset_key="_reset")
