"""Networks over a group's agents: learned communication, sets and graphs inside a policy. Every agent's
features pass through ``rounds`` rounds of exchange with the other agents before its output head, all
differentiable, so whatever trains the actor trains what the agents say.

* :class:`CommNet` (Sukhbaatar et al., 2016): each round an agent adds the mean of the other agents'
  hidden states, ``h_i <- act(W [h_i, mean_{j != i} h_j])``.
* :class:`AttentionComm` (TarMAC-style, Das et al., 2019): each agent emits a message and a key;
  a receiver's query weighs the other agents' messages by softmax attention,
  ``h_i <- act(W [h_i, sum_{j != i} softmax_j(q_i . k_j / sqrt(d)) v_j])``.
* :class:`DeepSets` (Zaheer et al., 2017): the permutation-invariant baseline, one round of
  ``h_i <- act(W [h_i, mean_j h_j])`` over all agents, itself included.
* :class:`GraphNet`: agents as the nodes of a graph, ``rounds`` GATv2 layers of ``torch-geometric``
  (the ``[graph]`` extra) over edges between every pair (``topology="full"``) or between agents closer
  than ``radius`` (``topology="radius"``, positions read from the observation entries
  ``position_dims``).

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

MODEL_KINDS = ("mlp", "commnet", "attention", "deepsets", "gnn", "gru", "lstm")
COMM_KINDS = ("commnet", "attention", "deepsets", "gnn")
GNN_TOPOLOGIES = ("full", "radius")
GRAPH_EXTRA = 'pip install "marlkit[graph]"'


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


class DeepSets(nn.Module):
    """DeepSets: each agent's features next to the mean over the whole group, then a linear head."""

    def __init__(self, in_features: int, out_features: int, *, num_cells: Sequence[int], activation: str,
                 device=None):
        super().__init__()
        hidden = num_cells[-1]
        self.trunk = _trunk(in_features, num_cells, activation, device)
        self.pool = nn.Linear(2 * hidden, hidden, device=device)
        self.act = activation_class(activation)()
        self.head = nn.Linear(hidden, out_features, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return self.head(self.act(self.pool(torch.cat([h, h.mean(-2, keepdim=True).expand_as(h)], -1))))


def require_torch_geometric():
    """``torch_geometric``, or an ``ImportError`` naming the extra that installs it."""
    try:
        import torch_geometric.nn
    except ImportError as err:
        raise ImportError(f"model.kind=gnn needs the 'torch-geometric' package, which is not installed: "
                          f"{GRAPH_EXTRA}") from err
    return torch_geometric.nn


class GraphNet(nn.Module):
    """Agents as graph nodes: an MLP trunk, ``rounds`` GATv2 message-passing layers, a linear head.

    Each layer, like CommNet's, updates an agent from its own features next to what it received (a lone
    agent receives zeros), so its own observation is never averaged away by its neighbours'. With
    ``position_dims`` each edge carries the sender's position relative to the receiver and their
    distance (translation-invariant, as BenchMARL's GNN does with a position key): ``[]`` for none.
    """

    def __init__(self, in_features: int, out_features: int, *, num_cells: Sequence[int], activation: str,
                 rounds: int, topology: str = "full", radius: float = 0.5, position_dims: Sequence[int] = (0, 1),
                 device=None):
        super().__init__()
        geometric = require_torch_geometric()
        if topology not in GNN_TOPOLOGIES:
            raise ValueError(f"model.gnn_topology={topology!r}; accepted: {', '.join(GNN_TOPOLOGIES)}")
        if any(not 0 <= d < in_features for d in position_dims):
            raise ValueError(f"model.gnn_position_dims={list(position_dims)} are not observation entries "
                             f"(the observation has {in_features})")
        if topology == "radius" and not position_dims:
            raise ValueError("model.gnn_topology=radius links agents by distance: set model.gnn_position_dims to the "
                             "observation entries holding the position (VMAS: [0, 1]), or use model.gnn_topology=full")
        hidden = num_cells[-1]
        self.topology, self.radius, self.position_dims = topology, radius, list(position_dims)
        edge_dim = len(self.position_dims) + 1 if self.position_dims else None
        self.trunk = _trunk(in_features, num_cells, activation, device)
        self.convs = nn.ModuleList(geometric.GATv2Conv(hidden, hidden, add_self_loops=False, edge_dim=edge_dim)
                                   .to(device) for _ in range(rounds))
        self.update = nn.ModuleList(nn.Linear(2 * hidden, hidden, device=device) for _ in range(rounds))
        self.act = activation_class(activation)()
        self.head = nn.Linear(hidden, out_features, device=device)

    def edges(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``edge_index`` (sender, receiver) over ``x`` of shape ``[graphs, n_agents, features]``, node
        ``g * n_agents + i`` being agent ``i`` of graph ``g``, and the edges' features (or None)."""
        graphs, n = x.shape[:2]
        linked = _others_mask(n, x.device).expand(graphs, n, n)
        position = x[..., self.position_dims]
        if self.topology == "radius":
            linked = linked & (torch.cdist(position, position) <= self.radius)
        graph, receiver, sender = linked.nonzero(as_tuple=True)
        index = torch.stack([graph * n + sender, graph * n + receiver])
        if not self.position_dims:
            return index, None
        offset = position[graph, sender] - position[graph, receiver]
        return index, torch.cat([offset, offset.norm(dim=-1, keepdim=True)], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n = x.shape[:-2], x.shape[-2]
        flat = x.reshape(-1, n, x.shape[-1])
        edge_index, edge_attr = self.edges(flat)
        h = self.trunk(flat).reshape(-1, self.head.in_features)
        for conv, update in zip(self.convs, self.update):
            h = self.act(update(torch.cat([h, conv(h, edge_index, edge_attr)], -1)))
        return self.head(h).reshape(*lead, n, -1)


def agent_net(kind: str, in_features: int, out_features: int, n_agents: int, *, centralised: bool,
              share_params: bool, num_cells: Sequence[int], activation: str, device, comm_rounds: int = 2,
              gnn_topology: str = "full", gnn_radius: float = 0.5,
              gnn_position_dims: Sequence[int] = (0, 1)) -> nn.Module:
    """A group's per-agent network ``[*B, n_agents, in] -> [*B, n_agents, out]`` of ``kind``: ``mlp``
    (TorchRL's ``MultiAgentMLP``), or ``commnet``, ``attention``, ``deepsets`` or ``gnn`` (one set of
    weights for all agents, for any number of them)."""
    if kind == "mlp":
        return _mlp(in_features, out_features, n_agents, centralised=centralised, share_params=share_params,
                    num_cells=num_cells, activation=activation, device=device)
    if kind not in COMM_KINDS:
        accepted = ", ".join(k for k in MODEL_KINDS if k == "mlp" or k in COMM_KINDS)
        raise ValueError(f"model.kind={kind!r} is not a feed-forward network kind here; accepted: {accepted}")
    if not share_params:
        raise ValueError(f"model.kind={kind} shares one network across a group's agents (it is what lets "
                         "them read each other's messages); set model.share_params=true")
    if not num_cells:
        raise ValueError(f"model.kind={kind} needs at least one hidden layer (model.num_cells)")
    sizes = dict(num_cells=num_cells, activation=activation, device=device)
    if kind == "deepsets":
        return DeepSets(in_features, out_features, **sizes)
    if kind == "gnn":
        return GraphNet(in_features, out_features, rounds=comm_rounds, topology=gnn_topology, radius=gnn_radius,
                        position_dims=gnn_position_dims, **sizes)
    cls = CommNet if kind == "commnet" else AttentionComm
    return cls(in_features, out_features, rounds=comm_rounds, **sizes)
