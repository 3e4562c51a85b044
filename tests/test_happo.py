"""HAPPO: one agent's step moves only that agent's weights, its objective against the formula, the
ratio product the loop passes from agent to agent, the random order over a team's agents, the pipeline
on tiny configs (one optimiser per agent), and the refusal of shared parameters. Resume:
tests/test_checkpoint_eval.py."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical

from marlkit.losses import HappoLoss, make_happo_loss
from marlkit.modules import make_stochastic_actor, make_value_critic
from marlkit.pipelines import happo, make_config, pipeline_for
from marlkit.pipelines.learners import make_optimiser

B, N, OBS, A = 16, 3, 4, 5


def _loss(spec_env, **kwargs):
    env = spec_env((OBS,), Categorical(A, shape=(B, N)), n_agents=N, batch=B)
    actor = make_stochastic_actor(env, "agents", num_cells=[8], share_params=False)
    critic = make_value_critic(env, "agents", centralised=True, num_cells=[8])
    return actor, make_happo_loss(actor, critic, "agents", clip_epsilon=0.2, **kwargs)


def _batch(actor) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    batch = TensorDict({"agents": {"observation": torch.randn(B, N, OBS, generator=g)}}, batch_size=(B,))
    with torch.no_grad():
        actor(batch)
    batch["agents", "action_log_prob"] = batch["agents", "action_log_prob"] + 0.3 * torch.randn(B, N, generator=g)
    batch["agents", "advantage"] = torch.randn(B, N, 1, generator=g)
    batch["agents", "value_target"] = torch.randn(B, N, 1, generator=g)
    batch["factor"] = torch.rand(B, generator=g) + 0.5
    return batch


def test_an_agents_steps_move_only_its_own_weights(spec_env):
    actor, loss = _loss(spec_env)
    batch = _batch(actor)
    params = list(loss.actor_network_params.values(True, True))
    stacked = [p for p in params if p.shape[0] == N]
    assert stacked and len(stacked) == len(params)  # one slice per agent: no sharing
    optimisers = [make_optimiser(params, 1e-2, 1e-8) for _ in range(N)]
    before = [p.detach().clone() for p in params]
    for agent in (1, 1, 2, 1):  # agent 1's moments must not leak into agent 2's slices, nor 2's into 1's
        loss.agent_terms(batch, agent, "factor")["loss_objective"].backward()
        optimisers[agent].step()
        optimisers[agent].zero_grad(set_to_none=True)
    for p, old in zip(params, before):
        assert torch.equal(p[0], old[0])  # agent 0 never trained
        assert not torch.equal(p[1], old[1]) and not torch.equal(p[2], old[2])


def test_agent_objective_is_the_clipped_surrogate_of_the_weighted_advantage(spec_env):
    actor, loss = _loss(spec_env)
    batch = _batch(actor)
    agent = 2
    out = loss.agent_terms(batch, agent, "factor")
    with torch.no_grad():
        log_prob = actor.get_dist(batch.clone()).log_prob(batch["agents", "action"])
    ratio = (log_prob - batch["agents", "action_log_prob"])[:, agent].exp()
    advantage = batch["agents", "advantage"][:, agent, 0] * batch["factor"]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
    assert torch.allclose(out["loss_objective"], -surrogate.mean(), atol=1e-6)
    assert (ratio - 1).abs().max() > 0.2  # the clip is exercised
    assert torch.allclose(loss.agent_ratio(batch, agent), ratio, atol=1e-6)
    assert "loss_critic" not in out.keys()
    assert set(loss.critic_terms(batch).keys()) == {"loss_critic"}


def test_dead_agents_keep_the_factor_and_leave_the_objective(spec_env):
    actor, loss = _loss(spec_env, mask_key=("agents", "mask"))
    batch = _batch(actor)
    batch["agents", "mask"] = torch.ones(B, N, dtype=torch.bool)
    batch["agents", "mask"][:4, 0] = False
    ratio = loss.agent_ratio(batch, 0)
    assert torch.equal(ratio[:4], torch.ones(4)) and not torch.equal(ratio[4:], torch.ones(B - 4))
    changed = batch.clone()
    changed["agents", "advantage"][:4, 0] = 1e3
    assert torch.allclose(loss.agent_terms(batch, 0, "factor")["loss_objective"],
                          loss.agent_terms(changed, 0, "factor")["loss_objective"])


def test_each_agent_sees_the_product_of_the_earlier_agents_ratios(monkeypatch, tiny_config, tmp_path):
    seen = []
    monkeypatch.setattr(HappoLoss, "agent_ratio", lambda self, td, agent: torch.full(td.shape, 2.0))
    real_terms = HappoLoss.agent_terms

    def recording(self, td, agent, key):
        seen.append((self.group, agent, float(td.get(key).mean())))
        return real_terms(self, td, agent, key)

    monkeypatch.setattr(HappoLoss, "agent_terms", recording)
    cfg = tiny_config("happo", "vmas/navigation", tmp_path, frames_per_batch=40, iterations=1,
                      **{"env.n_agents": 3, "train.num_epochs": 1, "train.minibatch_size": 40})
    happo.train(cfg)
    assert [factor for *_, factor in seen] == [1.0, 2.0, 4.0]  # one minibatch per agent, in turn
    assert sorted(agent for _, agent, _ in seen) == [0, 1, 2]


def test_update_order_is_a_fresh_permutation_of_the_teams_agents():
    from marlkit.envs import make_env

    env = make_env("pettingzoo/mpe2/simple_speaker_listener_v4", num_envs=1, seed=0)
    torch.manual_seed(0)
    orders = {tuple(happo.update_order(env, ["speaker", "listener"])) for _ in range(20)}
    assert orders == {(("speaker", 0), ("listener", 0)), (("listener", 0), ("speaker", 0))}


@pytest.mark.parametrize("env,overrides", [
    ("vmas/navigation", {"env.n_agents": 2, "env.max_steps": 10}),
    ("pettingzoo/mpe2/simple_speaker_listener_v4", {"env.max_steps": 10}),
])
def test_pipeline_steps_each_agent_with_its_own_optimiser(env, overrides, tiny_config, read_metrics, tmp_path):
    cfg = tiny_config("happo", env, tmp_path, frames_per_batch=40, iterations=2, **overrides)
    result = pipeline_for("happo").train(cfg)
    rows = read_metrics(tmp_path)
    assert result.frames == 80 and len(rows) == 2
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["optimisers"]
    groups = {"vmas/navigation": {"agents": 2}}.get(env, {"speaker": 1, "listener": 1})
    expected = {f"{g}/agent_{i}" for g, n in groups.items() for i in range(n)} | {f"{g}/critic" for g in groups}
    assert set(state) == expected
    steps = {name: {float(s["step"]) for s in opt["state"].values()} for name, opt in state.items()}
    assert all(v == {2 * 2 * 2.0} for v in steps.values()), steps  # 2 iterations x 2 epochs x 2 minibatches
    group = next(iter(groups))
    assert all(row[f"{group}/{k}"] != "" for row in rows for k in ("loss_objective", "loss_critic"))


def test_shared_parameters_are_refused(cli_rejects):
    cli_rejects(["train", "happo", "model.share_params=true"], "happo updates each agent's policy in turn.*share_params=false")
    assert make_config("happo").model.share_params is False
