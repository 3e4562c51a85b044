"""Actor / critic / Q-network shapes from env specs, and sizes derived from the specs."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import TanhNormal
from torchrl.data import Bounded, Categorical
from torchrl.envs import EnvBase


from marlkit.envs import make_env
from marlkit.modules import make_stochastic_actor, make_value_critic


B, N = 4, 3
CONTINUOUS = Bounded(-1.0, 1.0, shape=(B, N, 3))  # 2 x 3 outputs: neither B nor N
DISCRETE = Categorical(5, shape=(B, N))


def _obs(env: EnvBase) -> TensorDict:
    return env.full_observation_spec.rand()


@pytest.mark.parametrize("share_params", [True, False])
@pytest.mark.parametrize("centralised", [True, False])
@pytest.mark.parametrize(
    "obs_shape,obs_dtype",
    [((8,), torch.float32), ((40, 40, 3), torch.uint8), ((7, 7, 3), torch.float32), ((6, 5), torch.float32)],
    ids=["vector", "pixels-large", "pixels-small", "matrix-obs"],
)
@pytest.mark.parametrize("action_spec", [CONTINUOUS, DISCRETE], ids=["continuous", "discrete"])
def test_actor_critic_shapes(share_params, centralised, obs_shape, obs_dtype, action_spec, spec_env):
    env = spec_env(obs_shape, action_spec, obs_dtype=obs_dtype)
    actor = make_stochastic_actor(env, "agents", num_cells=[16], share_params=share_params)
    critic = make_value_critic(env, "agents", centralised=centralised, num_cells=[16], share_params=share_params)
    td = actor(_obs(env))
    assert td["agents", "action"].shape == action_spec.shape
    assert td["agents", "action_log_prob"].shape == (B, N)
    assert action_spec.is_in(td["agents", "action"])
    td = critic(td)
    assert td["agents", "state_value"].shape == (B, N, 1)
    # Centralised critics react to other agents' observations; local ones do not.
    other = td.clone()
    other["agents", "observation"][:, 1:] = other["agents", "observation"][:, 1:] + 1
    changed = critic(other)["agents", "state_value"][:, 0]
    assert (not torch.allclose(changed, td["agents", "state_value"][:, 0])) == centralised


def test_actor_distribution_follows_action_spec(spec_env):
    env = spec_env((6,), CONTINUOUS)
    actor = make_stochastic_actor(env, "agents", num_cells=[8])
    assert actor.get_dist(actor.module[0](_obs(env))).__class__ is TanhNormal
    env = spec_env((6,), DISCRETE, mask=True)
    actor = make_stochastic_actor(env, "agents", num_cells=[8])
    td = _obs(env)
    td["agents", "action_mask"] = torch.zeros(B, N, 5, dtype=torch.bool)
    td["agents", "action_mask"][..., 3] = True  # only action 3 allowed
    assert (actor(td)["agents", "action"] == 3).all()


def test_sizes_come_from_env_specs():
    env = make_env("vmas/navigation", num_envs=2, n_agents=4)
    actor = make_stochastic_actor(env, "agents", num_cells=[32])
    mlp = actor.module[0].module[1]
    assert (mlp.n_agent_inputs, mlp.n_agent_outputs, mlp.n_agents) == (env.full_observation_spec["agents", "observation"].shape[-1], 4, 4)
    critic = make_value_critic(env, "agents", centralised=True, num_cells=[32])
    assert critic(env.reset())["agents", "state_value"].shape == (2, 4, 1)




@pytest.mark.parametrize("centralised", [False, True])
@pytest.mark.parametrize("num_cells", [[], [64, 64], [256, 256]])
@pytest.mark.parametrize("batch", [(), (32,), (4, 10)])
def test_agent_mlp_matches_torchrl_bit_for_bit(centralised, num_cells, batch):
    """The batched-matmul forward gives TorchRL's vmapped outputs and gradients exactly, with the same
    parameters and state dict (checkpoints of either load into the other)."""
    from torchrl.modules import MultiAgentMLP

    from marlkit.modules.encoders import AgentMLP

    kwargs = dict(n_agent_inputs=147, n_agent_outputs=6, n_agents=8, centralized=centralised, share_params=False,
                  num_cells=num_cells, activation_class=torch.nn.Tanh)
    torchrl_mlp = MultiAgentMLP(**kwargs)
    ours = AgentMLP(**kwargs)
    ours.load_state_dict(torchrl_mlp.state_dict())
    x = torch.randn(*batch, 8, 147)
    expected, got = torchrl_mlp(x), ours(x)
    assert torch.equal(expected, got)
    expected.square().sum().backward()
    got.square().sum().backward()
    for a, b in zip(torchrl_mlp.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="shape"):
        ours(torch.randn(*batch, 7, 147))  # TorchRL's message for a wrong agent count
