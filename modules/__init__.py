"""Actor and critic factories shared by notebooks and pipelines.

Every size comes from the env's specs. For a group ``g``:

* :func:`make_stochastic_actor` reads ``(g, "observation")`` (and ``(g, "action_mask")`` when the env
  gives one) and writes ``(g, "action")`` and ``(g, "action_log_prob")``, plus the distribution
  parameters ``(g, "loc")``/``(g, "scale")`` (continuous) or ``(g, "logits")`` (discrete).
* :func:`make_deterministic_actor` (DDPG) reads ``(g, "observation")`` and writes ``(g, "param")``
  and ``(g, "action")`` (a ``TanhDelta`` within the action bounds).
* :func:`make_value_critic` reads ``(g, "observation")`` and writes ``(g, "state_value")``.
* :func:`make_q_critic` reads ``(g, "observation")`` and ``(g, "action")`` and writes
  ``(g, "state_action_value")``.
* :func:`make_coma_critic` reads the state, ``(g, "observation")`` and ``(g, "action")`` and writes
  ``(g, "action_value")``: each agent's value of each of its actions, the others' actions fixed.
* :func:`make_qtran_joint` builds QTRAN's joint action value and state value (plain tensors in and out).
* :func:`make_q_network` (IQL, VDN, QMIX) reads ``(g, "observation")`` (and ``(g, "action_mask")``)
  and writes ``(g, "action_value")``, the greedy ``(g, "action")`` and ``(g, "chosen_action_value")``.
* The actors' ``kind`` picks their network: ``mlp`` (TorchRL's ``MultiAgentMLP``), or
  :class:`CommNet`, :class:`AttentionComm` (TarMAC-style), :class:`DeepSets` and :class:`GraphNet`
  (GATv2 over a graph of the agents, ``torch-geometric``), whose agents exchange learned messages inside
  the policy and whose weights fit any number of agents (:mod:`.comm`).
* :mod:`marlkit.modules.exploration` holds the exploration modules composed after a policy
  (:class:`GaussianNoise`, :class:`EpsilonGreedy`), annealed explicitly by frame count.

Observations of any shape work (:mod:`.encoders`): vectors go straight to a ``MultiAgentMLP``, images
(``H x W x C`` with ``C <= 4``, as in pistonball or pursuit) go through a ``MultiAgentConvNet`` first,
anything else is flattened. The factories live by topic in :mod:`.actors`, :mod:`.critics`,
:mod:`.qnets` and :mod:`.exploration`; this package re-exports them.
"""

from __future__ import annotations

from .actors import continuous_action_bounds, make_deterministic_actor, make_stochastic_actor
from .comm import (agent_net, AttentionComm, COMM_KINDS, CommNet, DeepSets, GNN_TOPOLOGIES, GRAPH_EXTRA, GraphNet,
                   MODEL_KINDS, require_torch_geometric)
from .recurrent import CRITIC_STATE_KEY, MultiAgentRecurrent, RECURRENT_KINDS, RecurrentModule, state_primer, state_size
from .critics import ComaCritic, make_coma_critic, make_q_critic, make_qtran_joint, make_value_critic, QTranJoint
from .encoders import action_indices, ACTIVATIONS, activation_class, group_spec, make_encoder, reads_agents_first
from .exploration import AnnealedTogether, EpsilonGreedy, GaussianNoise
from .qnets import discrete_actions, make_q_network

__all__ = [
    "ACTIVATIONS",
    "AnnealedTogether",
    "AttentionComm",
    "COMM_KINDS",
    "CommNet",
    "DeepSets",
    "GNN_TOPOLOGIES",
    "GRAPH_EXTRA",
    "GraphNet",
    "MODEL_KINDS",
    "CRITIC_STATE_KEY",
    "MultiAgentRecurrent",
    "RECURRENT_KINDS",
    "RecurrentModule",
    "state_primer",
    "state_size",
    "agent_net",
    "require_torch_geometric",
    "ComaCritic",
    "EpsilonGreedy",
    "GaussianNoise",
    "action_indices",
    "activation_class",
    "continuous_action_bounds",
    "discrete_actions",
    "group_spec",
    "make_deterministic_actor",
    "make_encoder",
    "reads_agents_first",
    "make_q_critic",
    "make_coma_critic",
    "make_q_network",
    "make_qtran_joint",
    "make_stochastic_actor",
    "make_value_critic",
    "QTranJoint",
]
