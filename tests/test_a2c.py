"""IAC / MAA2C: the A2C loss on hand-made batches (its objective is the plain policy gradient), dead agents
left out, the pipeline on tiny configs (one update per batch), resume (tests/test_checkpoint_eval.py) and its
refusals."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical

from marlkit.losses import A2C_LOSS_TERMS, make_a2c_loss
from marlkit.modules import make_stochastic_actor, make_value_critic
from marlkit.pipelines import make_config, pipeline_for

B, N, OBS = 6, 3, 4


def _batch(advantage: torch.Tensor) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    return TensorDict({"agents": {
        "observation": torch.randn(B, N, OBS, generator=g),
        "action": torch.randint(0, 5, (B, N), generator=g),
        "action_log_prob": torch.full((B, N), -1.0),
        "advantage": advantage,
        "value_target": torch.randn(B, N, 1, generator=g),
    }}, batch_size=(B,))


def _loss(spec_env, **kwargs):
    env = spec_env((OBS,), Categorical(5, shape=(B, N)), n_agents=N, batch=B)
    actor = make_stochastic_actor(env, "agents", num_cells=[8])
    critic = make_value_critic(env, "agents", centralised=True, num_cells=[8])
    return actor, make_a2c_loss(actor, critic, "agents", **kwargs)


def test_objective_is_the_plain_policy_gradient(spec_env):
    """-mean(log pi(a|o) * A), with no ratio to the collecting policy (its log-prob is ignored) and no clip."""
    actor, loss = _loss(spec_env, entropy_coef=0.0)
    advantage = torch.randn(B, N, 1, generator=torch.Generator().manual_seed(1)) * 10  # far beyond any clip
    batch = _batch(advantage)
    out = loss(batch.clone())
    dist = actor.get_dist(batch.clone())
    by_hand = -(dist.log_prob(batch["agents", "action"]).unsqueeze(-1) * advantage).mean()
    assert torch.allclose(out["loss_objective"], by_hand, atol=1e-6)
    stale = batch.clone()
    stale["agents", "action_log_prob"] = torch.full((B, N), -5.0)  # PPO's ratio would change; A2C's not
    assert torch.allclose(loss(stale)["loss_objective"], out["loss_objective"])
    assert {"loss_objective", "loss_critic"} <= set(out.keys())  # no entropy term at entropy_coef=0


def test_the_loss_computes_gae_when_the_batch_has_none(spec_env):
    _, loss = _loss(spec_env)
    batch = _batch(torch.zeros(B, N, 1)).exclude(("agents", "advantage"), ("agents", "value_target"))
    batch = torch.stack([batch] * 5, 1)  # [B, T]
    batch["next"] = TensorDict({"agents": {"observation": torch.randn(B, 5, N, OBS), "reward": torch.ones(B, 5, N, 1),
                                           "done": torch.zeros(B, 5, N, 1, dtype=torch.bool),
                                           "terminated": torch.zeros(B, 5, N, 1, dtype=torch.bool)}}, batch_size=(B, 5))
    out = loss(batch.clone())
    explicit = batch.clone()
    with torch.no_grad():
        loss.value_estimator(explicit, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
    assert explicit["agents", "advantage"].shape == (B, 5, N, 1)
    assert torch.allclose(loss(explicit)["loss_objective"], out["loss_objective"])  # the same GAE, computed inside
    total = sum(out[key] for key in A2C_LOSS_TERMS)
    total.backward()
    assert all(p.grad is not None for p in loss.parameters() if p.requires_grad)


def test_dead_agents_leave_the_loss(spec_env):
    _, loss = _loss(spec_env, mask_key=("agents", "mask"))
    batch = _batch(torch.randn(B, N, 1))
    batch["agents", "mask"] = torch.ones(B, N, dtype=torch.bool)
    batch["agents", "mask"][:2, 1] = False
    changed = batch.clone()
    changed["agents", "advantage"][:2, 1] = 1e3
    changed["agents", "value_target"][:2, 1] = -1e3
    for term in ("loss_objective", "loss_critic"):
        assert torch.allclose(loss(batch.clone())[term], loss(changed.clone())[term]), term


@pytest.mark.parametrize("algorithm", ["maa2c", "iac"])
def test_pipeline_takes_one_step_on_each_batch(algorithm, tiny_config, read_metrics, tmp_path):
    cfg = tiny_config(algorithm, "gridworld", tmp_path, frames_per_batch=40, iterations=3, **{"env.max_steps": 10})
    result = pipeline_for(algorithm).train(cfg)
    rows = read_metrics(tmp_path)
    assert result.frames == 120 and len(rows) == 3
    assert all(row[f"agents/{term}"] != "" for row in rows for term in A2C_LOSS_TERMS)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    steps = {float(s["step"]) for s in state["optimisers"]["agents"]["state"].values()}
    assert steps == {3.0}  # one Adam step per batch, never an epoch over it


def test_maa2c_critic_is_centralised_and_iac_critic_local():
    from marlkit.envs import make_env

    env = make_env("vmas/navigation", num_envs=2, n_agents=N, seed=0)
    obs = env.observation_spec["agents", "observation"].shape[-1]
    inputs = {}
    for algorithm in ("maa2c", "iac"):
        cfg = make_config(algorithm, overrides={"model.num_cells": [8]})
        learner = pipeline_for(algorithm).build_group(env, "agents", cfg, torch.device("cpu"))
        weights = [p for key, p in learner.loss.critic_network_params.items(True, True) if key[-1] == "weight"]
        inputs[algorithm] = weights[0].shape[-1]
    assert inputs == {"maa2c": N * obs, "iac": obs}


@pytest.mark.parametrize("args, match", [
    (["collector=multiprocess", "collector.workers=2", "env.num_envs=4", "collector.sync=false"],
     r"A2C needs collector.sync=true"),
    (["train.lr=0"], r"train.lr \(0.0\) and train.max_grad_norm \(10.0\) must be finite and > 0"),
    (["train.num_epochs=3"], r"unknown field 'train.num_epochs'"),
])
def test_bad_a2c_settings_are_refused(cli_rejects, args, match):
    cli_rejects(["train", "maa2c", "--env", "gridworld", *args], match)


def test_bad_a2c_loss_settings(spec_env):
    with pytest.raises(ValueError, match="gamma must be in"):
        _loss(spec_env, gamma=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        _loss(spec_env, entropy_coef=-1.0)
