"""Recurrent Q networks (DRQN) for IQL / VDN / QMIX: the replayed slices, the loss against a step-by-step
reference (stored states, burn-in, slices across episode boundaries, double-Q, the target network), the
pipelines, and bad input."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from marlkit.envs import make_env
from marlkit.losses import make_drqn_loss
from marlkit.modules import make_q_network, state_primer
from marlkit.pipelines import pipeline_for
from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.replay import SequenceReplay

GAMMA = 0.9


def _memory_rollout(kind="gru", steps=12, num_envs=3):
    """probe/memory (4-step episodes) stepped by an untrained recurrent Q network, greedy."""
    torch.manual_seed(0)
    env = make_env("probe/memory", num_envs=num_envs, seed=0, delay=3)
    env.append_transform(state_primer(env, kind, [8]))
    q_net = make_q_network(env, "agents", num_cells=[8], kind=kind)
    with torch.no_grad():
        rollout = env.rollout(steps, q_net, break_when_any_done=False)
    return env, q_net, rollout


def test_slices_tile_each_copy_trajectory_and_keep_the_stored_state():
    env, _, rollout = _memory_rollout(steps=12)
    replay = SequenceReplay("agents", 1000, 4, seq_len=3, burn_in=1, scratch_dir=None, device=torch.device("cpu"))
    slices = replay.slices(rollout)
    assert slices.shape == (3 * 3, 4)  # per copy: steps 0-3, 3-6 and 6-9 (the last 2 of 12 fit no slice)
    first = rollout[:, [0, 3, 6]].reshape(-1)  # each slice's first step, copy by copy
    assert torch.equal(slices[:, 0]["agents", "rnn_state"], first["agents", "rnn_state"])
    assert slices[1, 0]["agents", "rnn_state"].abs().sum() > 0  # starts mid-episode, from the state it had
    assert torch.equal(slices["agents", "observation"][1], rollout["agents", "observation"][0, 3:7])
    assert torch.equal(slices["step_count"][1].squeeze(-1), torch.tensor([3, 0, 1, 2]))  # crosses an episode


def _reference_loss(q_values, loss, rollout, burn_in, double, mixer):
    """The TD loss step by step: each copy's network run one step at a time from the stored state,
    zeroed at episode starts; each next observation valued from the state after its own step."""
    g, (n, t) = "agents", rollout.shape
    params, target = loss.value_network_params, loss.target_value_network_params

    def step(obs, state, p):
        with p.to_module(q_values):
            out = q_values(TensorDict({g: {"observation": obs, "rnn_state": state}}, batch_size=[obs.shape[0]]))
        return out[g, "action_value"], out["next", g, "rnn_state"]

    state = {"online": rollout[g, "rnn_state"][:, 0], "target": rollout[g, "rnn_state"][:, 0]}
    errors = []
    for i in range(t):
        first = (rollout["step_count"][:, i] == 0).view(n, 1, 1)
        values = {}
        for name, p in (("online", params), ("target", target)):
            state[name] = torch.where(first, torch.zeros_like(state[name]), state[name])
            values[name], state[name] = step(rollout[g, "observation"][:, i], state[name], p)
        next_target, _ = step(rollout["next", g, "observation"][:, i], state["target"], target)
        next_online, _ = step(rollout["next", g, "observation"][:, i], state["online"], params)
        pick = (next_online if double else next_target).argmax(-1, keepdim=True)
        chosen = values["online"].gather(-1, rollout[g, "action"][:, i].long().unsqueeze(-1))
        next_value = next_target.gather(-1, pick)
        reward = rollout["next", g, "reward"][:, i]
        not_done = (~rollout["next", g, "terminated"][:, i]).float()
        if mixer:  # VDN: the team value is the sum, the team reward the agents' mean
            chosen, next_value = chosen.sum(-2), next_value.sum(-2)
            reward, not_done = reward.mean(-2), not_done[:, 0]
        if i >= burn_in:
            errors.append((chosen - (reward + GAMMA * not_done * next_value).detach()).pow(2))
    return torch.stack(errors).mean()


@pytest.mark.parametrize("double,mixer,burn_in", [(True, None, 2), (False, None, 0), (True, "vdn", 3)])
def test_drqn_loss_equals_a_step_by_step_reference(double, mixer, burn_in):
    env, q_net, rollout = _memory_rollout(steps=9)
    q_values = q_net[0]
    loss = make_drqn_loss(q_values, "agents", n_agents=2, mixer=mixer, gamma=GAMMA, double_dqn=double, burn_in=burn_in)
    with torch.no_grad():  # a target network that differs from the online one
        for p in loss.target_value_network_params.values(True, True):
            p.add_(0.3 * torch.randn_like(p))
    data = rollout[:, 1:9].clone()  # from mid-episode across the boundary at step 4
    if mixer:
        from marlkit.losses import team_entries

        team_entries(data, ["agents"])
    out = loss(data)
    expected = _reference_loss(q_values, loss, rollout[:, 1:9], burn_in, double, mixer)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in loss.value_network_params.values(True, True))


def test_burn_in_steps_only_warm_the_state_up():
    _, q_net, rollout = _memory_rollout(steps=8)
    loss = make_drqn_loss(q_net[0], "agents", n_agents=2, gamma=GAMMA, burn_in=3)
    base = loss(rollout.clone())["loss"]
    early, late = rollout.clone(), rollout.clone()
    early["next", "agents", "reward"][:, :3] += 5.0
    late["next", "agents", "reward"][:, 3:] += 5.0
    data = rollout.clone()
    loss(data)
    assert torch.equal(loss(early)["loss"], base) and not torch.equal(loss(late)["loss"], base)
    td_error = data["agents", "td_error"]
    assert (td_error[:, :3] == 0).all() and (td_error[:, 3:] > 0).any()


@pytest.mark.parametrize("algorithm,kind,extra", [
    ("iql", "gru", {"replay.prioritized": True, "replay.burn_in": 2, "replay.seq_len": 4}),
    ("vdn", "lstm", {}),
    ("qmix", "gru", {"replay.burn_in": 1, "replay.seq_len": 3, "model.share_params": False}),
])
def test_recurrent_q_learning_trains_and_evaluates(algorithm, kind, extra, tiny_config, tmp_run_dir, read_metrics, capsys):
    cfg = tiny_config(algorithm, "gridworld", tmp_run_dir, num_envs=4, frames_per_batch=40, iterations=3,
                      **{"env.max_steps": 12, "model.kind": kind, "model.seq_len": 5, "replay.batch_size": 4, "logger.eval_every": 1,
                         "logger.eval_episodes": 2, **extra})
    result = pipeline_for(algorithm).train(cfg)
    rows = read_metrics(tmp_run_dir)
    assert result.frames == 120 and float(rows[-1]["counters/optimiser_steps"]) == 6
    assert rows[-1]["agents/loss"] != "" and rows[-1]["eval/agents/episode_reward_mean"] != ""
    assert cli_main(["eval", str(tmp_run_dir), "--episodes", "3"]) == 0
    assert "agents: mean return" in capsys.readouterr().out
    assert cli_main(["render", str(tmp_run_dir), "--steps", "4", "--out", str(tmp_run_dir / "v.gif")]) == 0
    assert (tmp_run_dir / "v.gif").stat().st_size > 0


@pytest.mark.parametrize("args,match", [
    (["train", "qtran", "--env", "probe/memory", "model.kind=gru"], r"model.kind=gru trains with .*iql.*; qtran takes model.kind=mlp$"),
    (["train", "iql", "--env", "probe/memory", "model.kind=gru", "env.num_envs=10", "collector.frames_per_batch=300",
      "replay.seq_len=7", "replay.burn_in=3"], r"replay.burn_in \+ replay.seq_len = 3 \+ 7 must fit the 30 steps .* e.g. replay.seq_len=27"),
    (["train", "iql", "--env", "probe/memory", "model.kind=gru", "replay.burn_in=-1"], r"replay.burn_in must be an integer >= 0, got -1"),
    (["train", "qmix", "--env", "probe/memory", "model.kind=gru", "replay.buffer_size=100", "replay.batch_size=32"],
     r"replay.buffer_size=100 transitions hold fewer than replay.batch_size=32 slices of 10 steps"),
    (["train", "qmix", "--preset", "speaker-listener-q", "model.kind=gru"],
     r"model.kind=gru \(DRQN\) mixes the agents of one group; .* makes the groups \['speaker', 'listener'\] one team"),
    (["train", "iql", "--env", "pettingzoo/sisl/pursuit_v5", "model.kind=gru", "sharing.mode=quantile"],
     r"sharing.mode=quantile relays single transitions .* use sharing.mode=none, or model.kind=mlp"),
])
def test_recurrent_q_bad_input(args, match, cli_rejects):
    cli_rejects(args, match)
