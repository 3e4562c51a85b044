"""MADDPG / IDDPG / MASAC / ISAC: losses on hand-made batches, exploration, tiny runs, freezing, bad input."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.losses import DDPG_LOSS_TERMS, SAC_LOSS_TERMS
from marlkit.modules import GaussianNoise, make_deterministic_actor
from marlkit.pipelines import maddpg, masac, session

B, N, OBS, ACT = 8, 3, 5, 2
BOX = Bounded(-1.0, 1.0, shape=(B, N, ACT))


def test_gaussian_noise_anneals_and_respects_bounds():
    noise = GaussianNoise(BOX[0], ("agents", "action"), sigma_init=0.8, sigma_end=0.2, annealing_frames=100)
    assert noise.anneal(0) == pytest.approx(0.8)
    assert noise.anneal(50) == pytest.approx(0.5)
    assert noise.anneal(1000) == pytest.approx(0.2)
    td = TensorDict({"agents": {"action": torch.full((B, N, ACT), 0.99)}}, batch_size=(B,))
    noise.anneal(0)
    out = noise(td.clone())["agents", "action"]
    assert out.max() <= 1.0 and out.min() >= -1.0 and not torch.equal(out, td["agents", "action"])
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        assert torch.equal(noise(td.clone())["agents", "action"], td["agents", "action"])
    with pytest.raises(ValueError, match="noise must be >= 0"):
        GaussianNoise(BOX[0], ("agents", "action"), sigma_init=-0.1)


def test_discrete_actions_rejected_with_suggestion(spec_env):
    env = spec_env((OBS,), Categorical(4, shape=(B, N)), batch=B)
    with pytest.raises(ValueError, match="needs continuous actions.*mappo, iql or qmix"):
        make_deterministic_actor(env, "agents")


ENVS = [
    ("vmas/navigation", {"env.n_agents": 2}, ["agents"]),
    ("vmas/simple_tag", {}, ["adversary", "agent"]),
    ("pettingzoo/mpe2/simple_tag_v3", {"env.continuous_actions": True, "env.num_obstacles": 1}, ["adversary", "agent"]),
]
RUNS = [(m, a, *e) for m, algos in ((maddpg, ("maddpg", "iddpg")), (masac, ("masac", "isac")))
        for a in algos for e in ENVS]


@pytest.mark.parametrize("module,algorithm,env,overrides,groups", RUNS,
                         ids=[f"{r[1]}-{r[2]}" for r in RUNS])
def test_train_tiny(module, algorithm, env, overrides, groups, tmp_run_dir, tiny_config, read_metrics):
    result = module.train(tiny_config(algorithm, env, tmp_run_dir, **{"env.max_steps": 10, **overrides}))
    rows = read_metrics(tmp_run_dir)
    assert [int(r["iteration"]) for r in rows] == [0, 1] and result.frames == 200
    terms = DDPG_LOSS_TERMS if module is maddpg else SAC_LOSS_TERMS
    for group in groups:
        assert rows[-1][f"{group}/episode_reward_mean"] != ""
        for term in terms:
            assert rows[-1][f"{group}/{term}"] != "", (group, term)
        # Each group's buffer lives on disk in the run directory.
        files = list((tmp_run_dir / "buffers" / group).rglob("*.memmap"))
        assert {f.stem for f in files} >= {"observation", "action", "reward", "done", "terminated"}
    assert int(rows[-1]["counters/optimiser_steps"]) == 2 * 2 * len(groups)


def test_warmup_delays_learning_and_adds_loss_columns(tmp_run_dir, tiny_config, read_metrics):
    cfg = tiny_config("maddpg", "vmas/navigation", tmp_run_dir, **{"env.max_steps": 10, "env.n_agents": 2, "replay.warmup_frames": 150,
                                                                      "collector.total_frames": 300})
    maddpg.train(cfg)
    rows = read_metrics(tmp_run_dir)
    assert [r["agents/learning"] for r in rows] == ["0.0", "1.0", "1.0"]
    assert rows[0]["agents/loss_actor"] == "" and rows[1]["agents/loss_actor"] != ""


def test_freeze_after_keeps_group_bit_identical(tmp_run_dir, monkeypatch, tiny_config, read_metrics):
    snapshots, agents = [], {}
    build = maddpg.build_group

    def recording_build(env, group, cfg, device, scratch_dir):
        agents[group] = build(env, group, cfg, device, scratch_dir)
        return agents[group]

    make_collector = session.make_collector

    def snapshotting_collector(*args, **kwargs):
        collector = make_collector(*args, **kwargs)
        update = collector.update_policy_weights_

        def update_and_snapshot(*a, **k):
            snapshots.append({g: [p.detach().clone() for p in agent.loss.parameters()] for g, agent in agents.items()})
            return update(*a, **k)

        collector.update_policy_weights_ = update_and_snapshot
        return collector

    monkeypatch.setattr(maddpg, "build_group", recording_build)
    monkeypatch.setattr(session, "make_collector", snapshotting_collector)
    cfg = tiny_config("maddpg", "vmas/simple_tag", tmp_run_dir, **{"env.max_steps": 10, "train.freeze_after": {"agent": 1},
                                                                     "collector.total_frames": 300})
    maddpg.train(cfg)
    assert len(snapshots) == 3
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    # The evader learnt in iteration 0 only; the chasers kept learning.
    assert same(snapshots[0]["agent"], snapshots[1]["agent"]) and same(snapshots[1]["agent"], snapshots[2]["agent"])
    assert not same(snapshots[1]["adversary"], snapshots[2]["adversary"])
    rows = read_metrics(tmp_run_dir)
    assert [r["agent/learning"] for r in rows] == ["1.0", "0.0", "0.0"]
    assert [r["adversary/learning"] for r in rows] == ["1.0", "1.0", "1.0"]


@pytest.mark.parametrize("args,match", [
    (["train", "maddpg", "--env", "gridworld"], "maddpg needs continuous actions; gridworld has discrete actions.*mappo"),
    (["train", "masac", "env.continuous_actions=false"], "masac needs continuous actions"),
    (["train", "iddpg", "--env", "pettingzoo/mpe2/simple_spread_v3", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300", "replay.batch_size=8"], "iddpg needs continuous actions; group 'agent'"),
    (["train", "maddpg", "replay.buffer_size=100", "replay.batch_size=200"], "buffer_size=100 is smaller than replay.batch_size=200"),
    (["train", "maddpg", "loss.tau=0"], r"loss.tau must be in \(0, 1\], got 0.0"),
    (["train", "maddpg", "loss.tau=1.5"], r"loss.tau must be in \(0, 1\], got 1.5"),
    (["train", "maddpg", "exploration.sigma_init=-0.5"], "exploration noise must be >= 0"),
    (["train", "maddpg", "loss.target_update=sometimes"], "target_update='sometimes'; accepted"),
    (["train", "maddpg", "--env", "vmas/simple_tag", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300", "train.freeze_after.nobody=1"], r"unknown groups \['nobody'\].*adversary"),
])
def test_bad_input(args, match, cli_rejects):
    cli_rejects(args, match)


