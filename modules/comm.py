"""Learned communication inside a group's policy: every agent's features pass through ``rounds`` rounds
of message exchange before its output head, all differentiable, so whatever trains the actor trains
what the agents say.

* :class:`CommNet` (Sukhbaatar et al., 2016): each round an agent adds the mean of the other agents'
  hidden states, ``h_i <- act(W [h_i, mean_{j != i} h_j])``.
* :class:`AttentionComm` (TarMAC-style, Das et al., 2019): each agent emits a message and a key;
  a receiver's query weighs the other agents' messages by softmax attention,
  ``h_i <- act(W [h_i, sum_{j != i} softmax_j(q_i . k_j / sqrt(d)) v_j])``.

Both take ``[*B, n_agents, in_features]`` and give ``[*B, n_agents, out_features]`` with one set of
weights for every agent (the agent count is not part of the weights, so a trained net runs on any number
of agents), and are equivariant to the order of the agents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .encoders import _mlp, activation_class

MODEL_KINDS = ("mlp", "commnet", "attention")
COMM_KINDS = ("commnet", "attention")


def _trunk(in_features: int, num_cells: Sequence[int], activation: str, device) -> nn.Sequential:
    layers, width = [], in_features
    for cells in num_cells:
        layers += [nn.Linear(width, cells, device=device), activation_class(activation)()]
        width = cells
    return nn.Sequential(*layers)


def _others_mask(n_agents: int, device) -> torch.Tensor:
    return ~torch.eye(n_agents, dtype=torch.bool, device=device)


class CommNet(nn.Module):
    """CommNet: an MLP trunk, ``rounds`` mean-of-others communication steps, a linear head."""

    def __init__(self, in_features: int, out_features: int, *, num_cells: Sequence[int], activation: str,
                 rounds: int, device=None):
        super().__init__()
        hidden = num_cells[-1]
        self.trunk = _trunk(in_features, num_cells, activation, device)
        self.rounds = nn.ModuleList(nn.Linear(2 * hidden, hidden, device=device) for _ in range(rounds))
        self.act = activation_class(activation)()
        self.head = nn.Linear(hidden, out_features, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        n = h.shape[-2]
        for layer in self.rounds:
            others = (h.sum(-2, keepdim=True) - h) / max(n - 1, 1)  # zeros for a lone agent
            h = self.act(layer(torch.cat([h, others], -1)))
        return self.head(h)


class AttentionComm(nn.Module):
    """TarMAC-style targeted communication: an MLP trunk, ``rounds`` rounds of attention over the other
    agents' messages (query from the receiver, key and message from each sender), a linear head."""

    def __init__(self, in_features: int, out_features: int, *, num_cells: Sequence[int], activation: str,
                 rounds: int, key_size: int = 16, device=None):
        super().__init__()
        hidden = num_cells[-1]
        self.trunk = _trunk(in_features, num_cells, activation, device)
        self.key_size = key_size
        self.query = nn.ModuleList(nn.Linear(hidden, key_size, device=device) for _ in range(rounds))
        self.key = nn.ModuleList(nn.Linear(hidden, key_size, device=device) for _ in range(rounds))
        self.message = nn.ModuleList(nn.Linear(hidden, hidden, device=device) for _ in range(rounds))
        self.update = nn.ModuleList(nn.Linear(2 * hidden, hidden, device=device) for _ in range(rounds))
        self.act = activation_class(activation)()
        self.head = nn.Linear(hidden, out_features, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        n = h.shape[-2]
        others = _others_mask(n, h.device)
        for query, key, message, update in zip(self.query, self.key, self.message, self.update):
            scores = query(h) @ key(h).transpose(-1, -2) / math.sqrt(self.key_size)  # [*B, receiver, sender]
            weights = scores.masked_fill(~others, float("-inf")).softmax(-1)
            received = weights.nan_to_num(0.0) @ message(h)  # a lone agent has no sender: it receives zeros
            h = self.act(update(torch.cat([h, received], -1)))
        return self.head(h)


def agent_net(kind: str, in_features: int, out_features: int, n_agents: int, *, centralised: bool,
              share_params: bool, num_cells: Sequence[int], activation: str, device, comm_rounds: int = 2) -> nn.Module:
    """A group's per-agent network ``[*B, n_agents, in] -> [*B, n_agents, out]`` of ``kind``: ``mlp``
    (TorchRL's ``MultiAgentMLP``), ``commnet`` or ``attention`` (one set of weights for all agents)."""
    if kind == "mlp":
        return _mlp(in_features, out_features, n_agents, centralised=centralised, share_params=share_params,
                    num_cells=num_cells, activation=activation, device=device)
    if kind not in COMM_KINDS:
        raise ValueError(f"model.kind={kind!r} is not a network kind; accepted: {', '.join(MODEL_KINDS)}")
    if not share_params:
        raise ValueError(f"model.kind={kind} shares one network across a group's agents (it is what lets "
                         "them read each other's messages); set model.share_params=true")
    if not num_cells:
        raise ValueError(f"model.kind={kind} needs at least one hidden layer (model.num_cells)")
    cls = CommNet if kind == "commnet" else AttentionComm
    return cls(in_features, out_features, num_cells=num_cells, activation=activation, rounds=comm_rounds,
               device=device)
