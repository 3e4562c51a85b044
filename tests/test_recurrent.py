"""Recurrent actors (``model.kind=gru|lstm``): the state each agent carries, reset at episode starts and
carried across collector batches; step-by-step and sequence runs agreeing to the bit; slices that cross
episode boundaries; the MAPPO / IPPO pipelines, evaluation and bad input."""

from __future__ import annotations

import pytest
import torch
from torchrl.collectors import Collector

from marlkit.envs import make_env
from marlkit.modules import make_stochastic_actor, MultiAgentRecurrent, state_primer
from marlkit.pipelines import pipeline_for
from marlkit.pipelines.cli import main as cli_main

KEY = ("agents", "rnn_state")


def _memory_env(num_envs=6, kind="gru", **kwargs):
    env = make_env("probe/memory", num_envs=num_envs, seed=0, **{"delay": 3, **kwargs})
    env.append_transform(state_primer(env, kind, [8]))
    return env


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("share_params", [True, False])
def test_step_by_step_equals_the_sequence_run_bit_for_bit(kind, share_params):
    torch.manual_seed(0)
    env = _memory_env(kind=kind)
    actor = make_stochastic_actor(env, "agents", num_cells=[8], kind=kind, share_params=share_params)
    with torch.no_grad():
        rollout = env.rollout(11, actor, break_when_any_done=False)  # step mode, episodes of 4 steps
        replay = rollout.clone()
        actor.get_dist(replay)  # sequence mode over [copies, time] from the first state
    assert torch.equal(replay["agents", "logits"], rollout["agents", "logits"])
    assert torch.equal(replay["next", "agents", "rnn_state"], rollout["next", "agents", "rnn_state"])
    assert torch.equal(rollout["agents", "rnn_state"][:, 1:], rollout["next", "agents", "rnn_state"][:, :-1]
                       * (rollout["step_count"][:, 1:] != 0).unsqueeze(-1))  # carried, zeroed at a new episode
    starts = rollout["step_count"].squeeze(-1) == 0
    assert starts[:, 4].all() and rollout["agents", "rnn_state"][starts].abs().sum() == 0


def test_a_slice_that_crosses_an_episode_boundary_restarts_there():
    torch.manual_seed(0)
    env = _memory_env()
    actor = make_stochastic_actor(env, "agents", num_cells=[8], kind="gru")
    with torch.no_grad():
        rollout = env.rollout(8, actor, break_when_any_done=False)  # episodes: steps 0-3 and 4-7
        across, fresh = rollout[:, 2:6].clone(), rollout[:, 4:6].clone()
        actor.get_dist(across)  # a slice from mid-episode into the next, from its stored first state
        actor.get_dist(fresh)  # the second episode on its own
        across, fresh = across["agents", "logits"], fresh["agents", "logits"]
    torch.testing.assert_close(across[:, 2:], fresh, rtol=0, atol=0)
    torch.testing.assert_close(across, rollout["agents", "logits"][:, 2:6], rtol=0, atol=0)


def test_the_state_is_carried_across_collector_batches():
    torch.manual_seed(0)
    env = _memory_env(num_envs=2, delay=9)  # 10-step episodes, 3-step batches: batches cut episodes
    actor = make_stochastic_actor(env, "agents", num_cells=[8], kind="gru")
    collector = Collector(env, actor, frames_per_batch=6, total_frames=12)
    first, second = (batch.clone() for batch in collector)
    collector.shutdown()
    assert torch.equal(second["agents", "rnn_state"][:, 0], first["next", "agents", "rnn_state"][:, -1])
    assert second["agents", "rnn_state"][:, 0].abs().sum() > 0


def test_mlp_memory_check_can_fail():
    """The state checks above fail for a memoryless policy: it writes no state at all."""
    env = make_env("probe/memory", num_envs=2, seed=0, delay=3)
    actor = make_stochastic_actor(env, "agents", num_cells=[8])
    assert "rnn_state" not in env.rollout(3, actor)["agents"].keys()


@pytest.mark.parametrize("algorithm,kind,extra", [("mappo", "gru", {}), ("ippo", "lstm", {}),
                                                   ("mappo", "lstm", {"model.share_params": False}),
                                                   ("mappo", "mlp", {"model.critic_kind": "gru"}),
                                                   ("ippo", "gru", {"model.critic_kind": "lstm"})])
def test_recurrent_actor_trains_and_evaluates(algorithm, kind, extra, tiny_config, tmp_run_dir, read_metrics, capsys):
    cfg = tiny_config(algorithm, "vmas/navigation", tmp_run_dir, **{"env.n_agents": 2, "env.max_steps": 12,
                      "model.kind": kind, "model.seq_len": 5, "logger.eval_every": 1, "logger.eval_episodes": 2, **extra})
    result = pipeline_for(algorithm).train(cfg)
    rows = read_metrics(tmp_run_dir)
    assert result.frames == 200 and rows[-1]["eval/agents/episode_reward_mean"] != ""
    assert cli_main(["eval", str(tmp_run_dir), "--episodes", "3"]) == 0
    assert "agents: mean return" in capsys.readouterr().out
    assert cli_main(["render", str(tmp_run_dir), "--steps", "4", "--out", str(tmp_run_dir / "v.gif")]) == 0


def test_mlp_weights_do_not_fit_a_recurrent_network():
    net = MultiAgentRecurrent("gru", 4, 2, 3, num_cells=[8], activation="tanh", share_params=False)
    assert net.weight_ih.shape == (3, 24, 8) and net.weight_hh.shape == (3, 24, 8)  # one GRU per agent


@pytest.mark.parametrize("args,match", [
    (["train", "maddpg", "--env", "vmas/navigation", "model.kind=gru"],
     r"model.kind=gru trains with mappo, ippo, iql, vdn, qmix \(learning from whole sequences\); maddpg takes model.kind=mlp, commnet"),
    (["train", "mappo", "--env", "probe/memory", "model.kind=gru", "model.seq_len=7", "env.num_envs=10",
      "collector.frames_per_batch=300", "train.minibatch_size=100"],
     r"model.seq_len=7 must divide the steps each env copy collects per batch \(30 .*\) and train.minibatch_size \(100\)"),
    (["train", "mappo", "--env", "probe/memory", "model.kind=gru", "model.seq_len=0"], r"model.seq_len must be an integer >= 1"),
    (["train", "maddpg", "--env", "vmas/navigation", "model.critic_kind=gru"],
     r"model.critic_kind=gru is a recurrent value critic for mappo or ippo; maddpg takes model.critic_kind=mlp"),
    (["train", "mappo", "--preset", "speaker-listener", "model.critic_kind=gru", "model.seq_len=25"],
     r"a recurrent critic \(gru\) reads one group's observations; the team \['speaker', 'listener'\] needs an MLP "
     r"team critic: set model.critic_kind=mlp"),
    (["train", "mappo", "--env", "probe/memory", "model.critic_kind=transformer"],
     r"model.critic_kind='transformer'; accepted: mlp, gru, lstm"),
    (["train", "mappo", "--env", "probe/memory", "model.kind=lstm", "collector.backend=multiprocess",
      "collector.workers=2"], r"model.kind=lstm keeps each agent's state in this process's collector: use collector.backend=sync"),
])
def test_recurrent_bad_input(args, match, cli_rejects):
    cli_rejects(args, match)


def test_export_refuses_a_recurrent_policy(tiny_config, tmp_run_dir, capsys):
    cfg = tiny_config("mappo", "probe/memory", tmp_run_dir, **{"model.kind": "gru", "model.seq_len": 5,
                                                                "train.minibatch_size": 50})
    pipeline_for("mappo").train(cfg)
    with pytest.raises(SystemExit):
        cli_main(["export", str(tmp_run_dir), "--format", "pt2"])
    assert "has a recurrent policy (model.kind=gru)" in capsys.readouterr().err


def _gae_reference(value, next_value, reward, done, terminated, gamma, lmbda):
    """GAE written out step by step backwards over the time dim (dim 1)."""
    advantage, running = torch.zeros_like(value), torch.zeros_like(value[:, 0])
    for t in reversed(range(value.shape[1])):
        delta = reward[:, t] + gamma * (~terminated[:, t]).float() * next_value[:, t] - value[:, t]
        running = delta + gamma * lmbda * (~done[:, t]).float() * running
        advantage[:, t] = running
    return advantage


@pytest.mark.parametrize("centralised", [True, False])
def test_recurrent_critic_values_each_next_observation_from_the_state_after_its_step(centralised):
    from tensordict import TensorDict
    from tensordict.nn import TensorDictSequential

    from marlkit.losses import estimate_advantages, make_ppo_loss
    from marlkit.modules import CRITIC_STATE_KEY, make_value_critic

    torch.manual_seed(0)
    env = _memory_env(num_envs=3)  # 4-step episodes
    env.append_transform(state_primer(env, "lstm", [8], key=CRITIC_STATE_KEY))
    actor = make_stochastic_actor(env, "agents", num_cells=[8], kind="gru")
    critic = make_value_critic(env, "agents", centralised=centralised, num_cells=[8], kind="lstm")
    with torch.no_grad():
        batch = env.rollout(3, TensorDictSequential(actor, critic), break_when_any_done=False)  # 3 steps: fill the state
        batch = env.rollout(9, TensorDictSequential(actor, critic), auto_reset=False, tensordict=batch[:, -1]["next"].clone(),
                            break_when_any_done=False)  # starts mid-episode, with a state, crosses two boundaries
    loss = make_ppo_loss(actor, critic, "agents", gamma=0.9, lmbda=0.8)
    with torch.no_grad():
        estimate_advantages(loss, batch)
    g, key = "agents", CRITIC_STATE_KEY
    state, values, next_values = batch[g, key][:, 0], [], []
    with torch.no_grad():
        for t in range(batch.shape[1]):
            state = torch.where((batch["step_count"][:, t] == 0).view(-1, 1, 1), torch.zeros_like(state), state)
            out = critic(TensorDict({g: {"observation": batch[g, "observation"][:, t], key: state}}, batch_size=[3]))
            values.append(out[g, "state_value"])
            state = out["next", g, key]
            nxt = critic(TensorDict({g: {"observation": batch["next", g, "observation"][:, t], key: state}}, batch_size=[3]))
            next_values.append(nxt[g, "state_value"])
    value, next_value = torch.stack(values, 1), torch.stack(next_values, 1)
    assert batch["step_count"][:, 1:].eq(0).any()  # the batch does cross episode boundaries
    torch.testing.assert_close(batch[g, "state_value"], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["next", g, "state_value"], next_value, rtol=0, atol=1e-6)
    expected = _gae_reference(value, next_value, batch["next", g, "reward"], batch["next", g, "done"],
                              batch["next", g, "terminated"], 0.9, 0.8)
    torch.testing.assert_close(batch[g, "advantage"], expected, rtol=1e-5, atol=1e-6)
