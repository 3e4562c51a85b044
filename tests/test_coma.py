"""COMA: the counterfactual critic hides each agent's own action, the advantage and the TD(lambda) critic
targets against hand computations (with a target critic that differs from the online one and episode
ends inside the batch), the target critic's hard updates in the pipeline, tiny runs and refusals.
Resume: tests/test_checkpoint_eval.py."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical

from marlkit.losses import COMA_LOSS_TERMS, make_coma_loss
from marlkit.modules import make_coma_critic, make_stochastic_actor
from marlkit.pipelines import pipeline_for

E, T, N, OBS, A = 2, 4, 3, 4, 5
STATE = ("agents", "observation")


def _loss(spec_env, **kwargs):
    env = spec_env((OBS,), Categorical(A, shape=(E, N)), n_agents=N, batch=E)
    actor = make_stochastic_actor(env, "agents", num_cells=[8])
    critic = make_coma_critic(env, "agents", state_key=STATE, num_cells=[8])
    loss = make_coma_loss(actor, critic, "agents", gamma=0.9, lmbda=0.7, entropy_coef=0.0, critic_coef=1.0, **kwargs)
    with torch.no_grad():
        loss.target_critic_network_params.apply(lambda p: p.add_(0.2))
    return actor, critic, loss


def _batch() -> TensorDict:
    g = torch.Generator().manual_seed(0)
    done = torch.zeros(E, T, 1, dtype=torch.bool)
    terminated = done.clone()
    done[0, 1] = terminated[0, 1] = True  # an episode that ends inside the batch
    done[1, 2] = True  # and one that is cut short (truncated): bootstrapped, not zeroed
    return TensorDict({
        "agents": {"observation": torch.randn(E, T, N, OBS, generator=g), "action": torch.randint(0, A, (E, T, N), generator=g)},
        "next": {"agents": {"observation": torch.randn(E, T, N, OBS, generator=g),
                            "reward": torch.randn(E, T, N, 1, generator=g)},
                 "done": done, "terminated": terminated},
    }, batch_size=(E, T))


def test_critic_hides_each_agents_own_action(spec_env):
    _, critic, _ = _loss(spec_env)
    obs = torch.randn(1, N, OBS)
    action = torch.tensor([[0, 1, 2]])
    values = critic.module(obs, obs, action)
    assert values.shape == (1, N, A)
    own = action.clone()
    own[0, 0] = 4
    changed = critic.module(obs, obs, own)
    assert torch.allclose(changed[0, 0], values[0, 0])  # agent 0's row ignores agent 0's action
    assert not torch.allclose(changed[0, 1:], values[0, 1:])  # the others' rows see it


def _by_hand(actor, critic, loss, batch):
    """Per agent and step: the policy-gradient term, the critic's squared error and the advantage."""
    action = batch["agents", "action"]
    with torch.no_grad():
        dist = actor.get_dist(batch.select(STATE))
        q = critic.module(batch[STATE], batch[STATE], action)
        torch.manual_seed(1)  # the loss samples the next joint action first thing: the same draw
        next_action = actor.get_dist(batch["next"].select(STATE)).sample()
        with loss.target_critic_network_params.to_module(critic, preserve_module_state=False):
            next_q = critic.module(batch["next", *STATE], batch["next", *STATE], next_action)
    q_taken = q.gather(-1, action.unsqueeze(-1)).squeeze(-1)  # [E, T, N]
    advantage = q_taken - (dist.probs * q).sum(-1)
    next_value = next_q.gather(-1, next_action.unsqueeze(-1)).squeeze(-1)
    reward = batch["next", "agents", "reward"].mean(-2)  # the team reward: [E, T, 1]
    done, terminated = batch["next", "done"].float(), batch["next", "terminated"].float()
    target = torch.zeros(E, T, N)
    for t in reversed(range(T)):  # TD(lambda), cut at episode ends and at the batch's end
        bootstrap = next_value[:, t]
        if t < T - 1:
            bootstrap = torch.where(done[:, t].bool(), bootstrap, 0.3 * bootstrap + 0.7 * target[:, t + 1])
        target[:, t] = reward[:, t] + 0.9 * (1 - terminated[:, t]) * bootstrap
    return -advantage * dist.log_prob(action), (q_taken - target) ** 2, advantage


def _run(loss, batch):
    torch.manual_seed(1)
    return loss(batch.clone())


def test_advantage_and_critic_targets_match_the_formulas(spec_env):
    actor, critic, loss = _loss(spec_env)
    batch = _batch()
    out = _run(loss, batch)
    objective, critic_error, advantage = _by_hand(actor, critic, loss, batch)
    assert torch.allclose(out["loss_objective"], objective.mean(), atol=1e-5)
    assert torch.allclose(out["loss_critic"], critic_error.mean(), atol=1e-5)
    assert torch.allclose(out["advantage"], advantage.mean(), atol=1e-5)


def test_dead_agents_leave_the_loss(spec_env):
    actor, critic, loss = _loss(spec_env, mask_key=("agents", "mask"))
    batch = _batch()
    mask = torch.ones(E, T, N, dtype=torch.bool)
    mask[:, :2, 1] = False
    mask[1, :, 2] = False
    batch["agents", "mask"] = mask
    out = _run(loss, batch)
    objective, critic_error, _ = _by_hand(actor, critic, loss, batch)
    assert torch.allclose(out["loss_objective"], objective[mask].mean(), atol=1e-5)
    assert torch.allclose(out["loss_critic"], critic_error[mask].mean(), atol=1e-5)
    assert not torch.allclose(out["loss_critic"], critic_error.mean(), atol=1e-5)


@pytest.mark.parametrize("env,overrides", [
    ("gridworld", {"env.max_steps": 10}),
    ("matrix/nonmonotonic", {}),
    ("vmas/navigation", {"env.n_agents": 2, "env.continuous_actions": False, "env.max_steps": 10}),
])
def test_pipeline_trains_coma_and_copies_the_target_critic(env, overrides, tiny_config, read_metrics, tmp_path):
    runs = {}
    for interval in (2, 3):  # 2 updates: copied at the 2nd with interval 2, never with 3
        run_dir = tmp_path / str(interval)
        cfg = tiny_config("coma", env, run_dir, frames_per_batch=40, iterations=2,
                          **{"loss.target_update_interval": interval, **overrides})
        result = pipeline_for("coma").train(cfg)
        rows = read_metrics(run_dir)
        assert result.frames == 80 and len(rows) == 2
        assert all(row[f"agents/{term}"] != "" for row in rows for term in COMA_LOSS_TERMS)
        state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["losses"]["agents"]
        online = {k[len("critic_network_params."):]: v for k, v in state.items() if k.startswith("critic_network_params.")}
        target = {k[len("target_critic_network_params."):]: v for k, v in state.items()
                  if k.startswith("target_critic_network_params.")}
        assert online and online.keys() == target.keys()
        runs[interval] = all(torch.equal(online[k], target[k]) for k in online)
    assert runs == {2: True, 3: False}


@pytest.mark.parametrize("args,match", [
    (["train", "coma", "--env", "vmas/navigation"], "coma needs discrete actions.*env.continuous_actions=false"),
    (["train", "coma", "--env", "pettingzoo/mpe2/simple_spread_v3", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300", "env.continuous_actions=true"], "coma needs one discrete action per agent"),
    (["train", "coma", "--env", "pettingzoo/mpe2/simple_speaker_listener_v4", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300"], "coma's critic is over one group's joint action"),
    (["train", "coma", "loss.target_update_interval=0"], "loss.target_update_interval must be >= 1, got 0"),
])
def test_bad_coma_input(args, match, cli_rejects):
    cli_rejects(args, match)
