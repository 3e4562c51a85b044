"""Actor / critic shapes from env specs, and the PPO loss on hand-made TensorDicts."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import TanhNormal
from torchrl.data import Bounded, Categorical
from torchrl.envs import EnvBase

from helpers import SpecOnlyEnv

from marlkit.envs import make_env
from marlkit.losses import make_ppo_loss, PPO_LOSS_TERMS
from marlkit.modules import make_stochastic_actor, make_value_critic


B, N = 4, 3
CONTINUOUS = Bounded(-1.0, 1.0, shape=(B, N, 2))
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
def test_actor_critic_shapes(share_params, centralised, obs_shape, obs_dtype, action_spec):
    env = SpecOnlyEnv(obs_shape, action_spec, obs_dtype=obs_dtype)
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


def test_actor_distribution_follows_action_spec():
    env = SpecOnlyEnv((6,), CONTINUOUS)
    actor = make_stochastic_actor(env, "agents", num_cells=[8])
    assert actor.get_dist(actor.module[0](_obs(env))).__class__ is TanhNormal
    env = SpecOnlyEnv((6,), DISCRETE, mask=True)
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


def _hand_made_batch(action: torch.Tensor, obs_dim: int, steps: int = 6) -> TensorDict:
    """A [B, T] batch of transitions written by hand: rewards, dones, log-probs and observations."""
    g = torch.Generator().manual_seed(0)
    shape = (B, steps, N)
    done = torch.zeros(*shape, 1, dtype=torch.bool)
    done[:, -1] = True
    return TensorDict(
        {
            "agents": {
                "observation": torch.randn(*shape, obs_dim, generator=g),
                "action": action,
                "action_log_prob": torch.full(shape, -1.0),
            },
            "next": {
                "agents": {
                    "observation": torch.randn(*shape, obs_dim, generator=g),
                    "reward": torch.randn(*shape, 1, generator=g),
                    "done": done,
                    "terminated": done.clone(),
                },
            },
        },
        batch_size=(B, steps),
    )


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("normalize_value_target", [False, True])
def test_ppo_loss_on_hand_made_batch(discrete, normalize_value_target):
    obs_dim, steps = 5, 6
    if discrete:
        env = SpecOnlyEnv((obs_dim,), DISCRETE)
        action = torch.randint(0, 5, (B, steps, N))
    else:
        env = SpecOnlyEnv((obs_dim,), CONTINUOUS)
        action = torch.rand(B, steps, N, 2) * 1.8 - 0.9
    actor = make_stochastic_actor(env, "agents", num_cells=[16])
    critic = make_value_critic(env, "agents", centralised=True, num_cells=[16])
    loss = make_ppo_loss(actor, critic, "agents", entropy_coef=0.01, normalize_advantage=True,
                         normalize_value_target=normalize_value_target)
    batch = _hand_made_batch(action, obs_dim, steps)
    with torch.no_grad():
        loss.value_estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
    assert batch["agents", "advantage"].shape == (B, steps, N, 1)
    assert batch["agents", "value_target"].shape == (B, steps, N, 1)
    out = loss(batch.reshape(-1))
    total = sum(out[k] for k in PPO_LOSS_TERMS)
    assert all(torch.isfinite(out[k]).all() for k in PPO_LOSS_TERMS)
    total.backward()
    for name, net in (("actor", actor), ("critic", critic)):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_gae_uses_group_done_flags():
    # With gamma=1 and lambda=1 the value target is the return to the end of each episode.
    env = SpecOnlyEnv((3,), DISCRETE)
    actor = make_stochastic_actor(env, "agents", num_cells=[4])
    critic = make_value_critic(env, "agents", centralised=False, num_cells=[4])
    for p in critic.parameters():
        torch.nn.init.zeros_(p)  # V == 0 everywhere
    loss = make_ppo_loss(actor, critic, "agents", gamma=1.0, lmbda=1.0)
    batch = _hand_made_batch(torch.zeros(B, 4, N, dtype=torch.long), 3, steps=4)
    batch["next", "agents", "reward"] = torch.ones(B, 4, N, 1)
    batch["next", "agents", "done"][:, 1] = True  # episodes end at t=1 and t=3
    batch["next", "agents", "terminated"] = batch["next", "agents", "done"].clone()
    with torch.no_grad():
        loss.value_estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
    target = batch["agents", "value_target"][0, :, 0, 0]
    assert target.tolist() == [2.0, 1.0, 2.0, 1.0]


def test_ppo_loss_leaves_dead_agents_out():
    env = SpecOnlyEnv((5,), DISCRETE)
    actor = make_stochastic_actor(env, "agents", num_cells=[16])
    critic = make_value_critic(env, "agents", centralised=False, num_cells=[16])
    loss = make_ppo_loss(actor, critic, "agents", mask_key=("agents", "mask"))
    batch = _hand_made_batch(torch.randint(0, 5, (B, 6, N)), 5).reshape(-1)
    batch["agents", "advantage"] = torch.randn(B * 6, N, 1)
    batch["agents", "value_target"] = torch.randn(B * 6, N, 1)
    batch["agents", "mask"] = torch.ones(B * 6, N, dtype=torch.bool)
    batch["agents", "mask"][:10, 1] = False  # agent 1 died in the first 10 steps
    changed = batch.clone()
    changed["agents", "advantage"][:10, 1] = 1000.0
    changed["agents", "value_target"][:10, 1] = -1000.0
    for term in ("loss_objective", "loss_critic"):
        assert torch.allclose(loss(batch.clone())[term], loss(changed.clone())[term]), term
    live = batch.clone()
    live["agents", "advantage"][:10, 0] = 1000.0
    assert not torch.allclose(loss(batch.clone())["loss_objective"], loss(live)["loss_objective"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_critic_type="huber"), "loss_critic_type='huber'.*l2"),
    (dict(gamma=1.5), "gamma must be in"),
    (dict(clip_epsilon=0.0), "clip_epsilon must be > 0"),
])
def test_ppo_loss_bad_input(kwargs, match):
    env = SpecOnlyEnv((3,), DISCRETE)
    actor = make_stochastic_actor(env, "agents", num_cells=[4])
    critic = make_value_critic(env, "agents", centralised=False, num_cells=[4])
    with pytest.raises(ValueError, match=match):
        make_ppo_loss(actor, critic, "agents", **kwargs)
