"""Teams that span agent groups: finding them, team critics, team mixers, and the pipelines using them."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from torchrl.envs.utils import ExplorationType

from marlkit.envs import make_env
from marlkit.losses import add_partner_next_actions, make_team_mixer_loss, team_entries, TEAM
from marlkit.modules import make_deterministic_actor, make_q_critic, make_q_network, make_value_critic
from marlkit.pipelines import maddpg, mappo, qlearning
from marlkit.pipelines.runs import load_run
from marlkit.pipelines.config import apply_overrides, ConfigError, EnvConfig
from marlkit.pipelines.teams import check_teams, resolve_teams, reward_sharing_teams, team_of

SPEAKER_LISTENER = "pettingzoo/mpe2/simple_speaker_listener_v4"
TAG = "pettingzoo/mpe2/simple_tag_v3"
TAG_KW = dict(num_good=1, num_adversaries=2, num_obstacles=0)


def test_groups_with_equal_rewards_form_a_team():
    shared, other = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    assert reward_sharing_teams({"speaker": shared, "listener": shared.clone()}) == {"team": ["speaker", "listener"]}
    assert reward_sharing_teams({"a": shared, "b": other}) == {"a": ["a"], "b": ["b"]}
    assert reward_sharing_teams({"lead": shared, "adv": shared.clone(), "prey": other}) == {
        "lead+adv": ["lead", "adv"], "prey": ["prey"]}
    zeros = torch.zeros(3)  # never rewarded: proves nothing, so no team
    assert reward_sharing_teams({"a": zeros, "b": zeros.clone()}) == {"a": ["a"], "b": ["b"]}


def _resolve(name, teams=None, **kwargs):
    env_cfg = EnvConfig(name=name, num_envs=2, kwargs=kwargs, teams=teams or {})
    env = make_env(name, num_envs=2, seed=0, **kwargs)
    return resolve_teams(env_cfg, list(env.group_map), lambda: make_env(name, num_envs=2, seed=0, **kwargs)).teams


def test_teams_are_found_from_the_env_and_leave_random_streams_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert _resolve(SPEAKER_LISTENER) == {"team": ["speaker", "listener"]}
    assert torch.equal(torch.rand(3), expected)  # the probe rollout consumed none of the caller's numbers
    assert _resolve(TAG, **TAG_KW) == {"adversary": ["adversary"], "agent": ["agent"]}
    assert _resolve("vmas/navigation", n_agents=2) == {"agents": ["agents"]}


def test_given_teams_are_checked_and_completed():
    assert check_teams({"blue": ["agent"]}, ["adversary", "agent"]) == {"blue": ["agent"], "adversary": ["adversary"]}
    with pytest.raises(ConfigError, match="unknown group 'nobody'.*'adversary', 'agent'"):
        check_teams({"t": ["agent", "nobody"]}, ["adversary", "agent"])
    with pytest.raises(ConfigError, match="group 'agent' is in two teams"):
        check_teams({"t": ["agent"], "u": ["agent", "adversary"]}, ["adversary", "agent"])
    with pytest.warns(UserWarning, match="do not share rewards"):
        assert _resolve(TAG, {"all": ["adversary", "agent"]}, **TAG_KW) == {"all": ["adversary", "agent"]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="env.teams")
        _resolve(SPEAKER_LISTENER, {"team": ["speaker", "listener"]})
    assert team_of({"team": ["speaker", "listener"]}, "listener") == ["listener", "speaker"]
    assert team_of({}, "listener") == ["listener"]


def _speaker_listener(continuous=False):
    return make_env(SPEAKER_LISTENER, num_envs=3, seed=0, continuous_actions=continuous)


def test_team_value_critic_sees_the_other_groups():
    env = _speaker_listener()
    td = env.reset()
    team = make_value_critic(env, "speaker", centralised=True, num_cells=[16], team=["speaker", "listener"])
    local = make_value_critic(env, "speaker", centralised=True, num_cells=[16], team=["speaker"])
    assert team.in_keys == [("speaker", "observation"), ("listener", "observation")]
    before_team, before_local = team(td.clone())["speaker", "state_value"], local(td.clone())["speaker", "state_value"]
    assert before_team.shape == (3, 1, 1)
    td["listener", "observation"] += 1.0
    assert not torch.allclose(team(td.clone())["speaker", "state_value"], before_team)
    assert torch.equal(local(td.clone())["speaker", "state_value"], before_local)


def test_team_q_critic_sees_the_partners_actions():
    env = _speaker_listener(continuous=True)
    td = env.rand_action(env.reset())
    critic = make_q_critic(env, "listener", centralised=True, num_cells=[16], team=["listener", "speaker"])
    assert set(critic.in_keys) == {(g, k) for g in ("listener", "speaker") for k in ("observation", "action")}
    before = critic(td.clone())["listener", "state_action_value"]
    td["speaker", "action"] = 1.0 - td["speaker", "action"]
    assert not torch.allclose(critic(td.clone())["listener", "state_action_value"], before)


def _team_batch(env, steps=4):
    td = env.rollout(steps, break_when_any_done=False)
    return team_entries(td, ["speaker", "listener"]).reshape(-1)


def test_team_entries_mean_reward_and_side_by_side_actions():
    env = _speaker_listener()
    td = env.rollout(4, break_when_any_done=False)
    td["next", "listener", "reward"] += 2.0  # unequal on purpose: the team reward is the mean
    out = team_entries(td.clone(), ["speaker", "listener"])
    expected = (td["next", "speaker", "reward"] + td["next", "listener", "reward"]) / 2
    assert torch.allclose(out["next", TEAM, "reward"], expected[..., 0, :])
    assert torch.equal(out[TEAM, "agent_action"], torch.cat([td["speaker", "action"], td["listener", "action"]], -1))
    assert torch.equal(out["next", TEAM, "done"], td["next", "done"])


def test_vdn_over_a_team_mixes_every_agent_of_every_group():
    env = _speaker_listener()
    torch.manual_seed(0)
    q_nets = {g: make_q_network(env, g, num_cells=[16]) for g in ("speaker", "listener")}
    loss = make_team_mixer_loss(q_nets, {"speaker": 1, "listener": 1}, mixer="vdn", state_key=(TEAM, "observation"),
                                state_shape=(14,), gamma=0.9)
    batch = _team_batch(env)
    out = loss(batch)
    # By hand: Q_tot = Q_speaker(a_s) + Q_listener(a_l); target = r + 0.9 (1 - terminated) sum_g max Q_g(next).
    chosen, best_next = 0.0, 0.0
    for g, net in q_nets.items():
        values = net(batch.clone())[g, "action_value"]
        chosen = chosen + values.gather(-1, batch[g, "action"].unsqueeze(-1)).sum((-2, -1))
        best_next = best_next + net(batch["next"].clone())[g, "action_value"].max(-1).values.sum(-1)
    target = batch["next", TEAM, "reward"][:, 0] + 0.9 * (~batch["next", TEAM, "terminated"][:, 0]) * best_next
    assert out["loss"].item() == pytest.approx(((chosen - target) ** 2).mean().item(), rel=1e-5)
    out["loss"].backward()
    for net in q_nets.values():  # both groups' networks learn from the one team loss
        assert sum(p.grad.abs().sum() for p in net.parameters()) > 0


def test_partner_next_actions_come_from_the_partners_actor():
    env = _speaker_listener(continuous=True)
    actor = make_deterministic_actor(env, "speaker", num_cells=[16])
    batch = env.rollout(3, break_when_any_done=False).reshape(-1)
    batch["next"].exclude(("speaker", "action"), inplace=True)
    add_partner_next_actions(batch, {"speaker": actor}, ExplorationType.DETERMINISTIC)
    expected = actor(batch["next"].clone())["speaker", "action"]
    assert torch.allclose(batch["next", "speaker", "action"], expected)


TINY = {"env.name": SPEAKER_LISTENER, "env.num_envs": 4, "collector.frames_per_batch": 100,
        "collector.total_frames": 200, "model.num_cells": [16], "logger.progress": False}
TINY_OFF = {**TINY, "replay.batch_size": 16, "replay.buffer_size": 400, "train.optimiser_steps": 2}


def test_mappo_critic_spans_the_team_and_ippo_stays_local(tmp_path):
    for algorithm, extra in (("mappo", ("listener", "observation")), ("ippo", None)):
        cfg = apply_overrides(mappo.MappoConfig(algorithm=algorithm),
                              {**TINY, "train.minibatch_size": 50, "logger.run_dir": str(tmp_path / algorithm)})
        mappo.train(cfg)
        assert yaml.safe_load((tmp_path / algorithm / "config.yaml").read_text())["env"]["teams"] == {
            "team": ["speaker", "listener"]}
        critic = load_run(tmp_path / algorithm).state["losses"]["speaker"]
        inputs = {v.shape[-1] for k, v in critic.items() if k.startswith("critic_network_params") and v.dim() >= 2}
        # The speaker observes 3 numbers, the listener 11: a team critic's first layer takes 3 + 11.
        assert (14 in inputs) == (extra is not None) and (3 in inputs) == (extra is None)


@pytest.mark.parametrize("mixer", ["vdn", "qmix"])
def test_mixers_train_a_team_of_one_agent_groups(mixer, tmp_path):
    cfg = apply_overrides(qlearning.CONFIG(algorithm=mixer), {**TINY_OFF, "logger.run_dir": str(tmp_path / "run")})
    qlearning.train(cfg)
    state = load_run(tmp_path / "run").state
    assert set(state["losses"]) == {"team"}  # one learner, both groups' Q networks and one mixer
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "team/loss" in rows[0].split(",") and len(rows) == 3


def test_mixers_without_teams_still_refuse_one_agent_groups(cli_rejects):
    cli_rejects(["train", "qmix", "--env", SPEAKER_LISTENER, "env.teams.speaker=[speaker]",
                        "env.teams.listener=[listener]", "env.num_envs=4", "collector.frames_per_batch=100",
                        "--frames", "200", "replay.buffer_size=400", "replay.batch_size=16"],
                       "group 'speaker' has 1.*env.teams")


def test_maddpg_team_critic_reads_the_partner_from_replay(tmp_path):
    cfg = apply_overrides(maddpg.CONFIG(algorithm="maddpg"),
                          {**TINY_OFF, "env.continuous_actions": True, "logger.run_dir": str(tmp_path / "run")})
    maddpg.train(cfg)
    loaded = load_run(tmp_path / "run")
    agents = maddpg.build_learners(loaded.env, loaded.cfg, torch.device("cpu"), None)
    assert agents["speaker"].partners.keys() == {"listener"}
    assert ("listener", "action") in agents["speaker"].loss.value_network.in_keys
    assert agents["speaker"].replay.partners == ["listener"]


def test_unknown_team_group_is_one_line(cli_rejects):
    cli_rejects(["train", "mappo", "--env", SPEAKER_LISTENER, "env.teams.team=[speaker,nobody]",
                        "env.num_envs=4", "collector.frames_per_batch=100", "--frames", "200",
                        "train.minibatch_size=50"], "unknown group 'nobody'")
