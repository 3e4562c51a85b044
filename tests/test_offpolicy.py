"""MADDPG / IDDPG / MASAC / ISAC: losses on hand-made batches, exploration, tiny runs, freezing, bad input."""

from __future__ import annotations

import csv

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical
from torchrl.envs.utils import ExplorationType, set_exploration_type

from helpers import SpecOnlyEnv, assert_cli_rejects
from marlkit.losses import DDPG_LOSS_TERMS, make_ddpg_loss, make_sac_loss, make_target_updater, SAC_LOSS_TERMS
from marlkit.modules import GaussianNoise, make_deterministic_actor, make_q_critic, make_stochastic_actor
from marlkit.pipelines import maddpg, masac, session
from marlkit.pipelines.config import apply_overrides

B, N, OBS, ACT = 8, 3, 5, 2
BOX = Bounded(-1.0, 1.0, shape=(B, N, ACT))


def _transitions() -> TensorDict:
    g = torch.Generator().manual_seed(1)
    done = torch.zeros(B, N, 1, dtype=torch.bool)
    done[: B // 2] = True
    return TensorDict({
        "agents": {"observation": torch.randn(B, N, OBS, generator=g),
                   "action": torch.rand(B, N, ACT, generator=g) * 2 - 1},
        "next": {"agents": {"observation": torch.randn(B, N, OBS, generator=g),
                            "reward": torch.randn(B, N, 1, generator=g),
                            "done": done, "terminated": done.clone()}},
    }, batch_size=(B,))


def _modules(stochastic: bool, centralised: bool = True):
    env = SpecOnlyEnv((OBS,), BOX, batch=B)
    make_actor = make_stochastic_actor if stochastic else make_deterministic_actor
    actor = make_actor(env, "agents", num_cells=[16])
    critic = make_q_critic(env, "agents", centralised=centralised, num_cells=[16])
    return env, actor, critic


def _check_grads(net) -> None:
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("centralised", [True, False])
def test_ddpg_loss_on_hand_made_batch(centralised):
    _, actor, critic = _modules(stochastic=False, centralised=centralised)
    loss = make_ddpg_loss(actor, critic, "agents", gamma=0.9)
    out = loss(_transitions())
    assert all(torch.isfinite(out[k]) for k in DDPG_LOSS_TERMS)
    sum(out[k] for k in DDPG_LOSS_TERMS).backward()
    _check_grads(actor)
    _check_grads(critic)


def test_sac_loss_on_hand_made_batch():
    _, actor, critic = _modules(stochastic=True)
    loss = make_sac_loss(actor, critic, "agents", gamma=0.9)
    assert float(loss.target_entropy) == -ACT  # per-agent heuristic
    out = loss(_transitions())
    assert all(torch.isfinite(out[k]) for k in SAC_LOSS_TERMS)
    sum(out[k] for k in SAC_LOSS_TERMS).backward()
    _check_grads(actor)
    assert loss.log_alpha.grad is not None and loss.log_alpha.grad.abs() > 0
    q_grads = [p.grad for p in loss.qvalue_network_params.values(True, True)]
    assert all(g is not None for g in q_grads) and sum(g.abs().sum() for g in q_grads) > 0


@pytest.mark.parametrize("stochastic", [False, True])
def test_soft_update_moves_targets_by_exactly_tau(stochastic):
    _, actor, critic = _modules(stochastic=stochastic)
    loss = (make_sac_loss if stochastic else make_ddpg_loss)(actor, critic, "agents")
    tau = 0.25
    updater = make_target_updater(loss, mode="soft", tau=tau)
    # Move the online parameters away from the targets so the update has something to do.
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(1.0)
    name = "qvalue_network" if stochastic else "value_network"
    online = getattr(loss, f"{name}_params").clone()
    target_before = getattr(loss, f"target_{name}_params").clone()
    updater.step()
    target_after = getattr(loss, f"target_{name}_params")
    for key, before in target_before.items(True, True):
        expected = (1 - tau) * before + tau * online[key]
        torch.testing.assert_close(target_after[key].data, expected.data, rtol=0, atol=1e-6)
        assert not torch.equal(target_after[key].data, before.data)


def test_hard_update_copies_every_interval():
    _, actor, critic = _modules(stochastic=False)
    loss = make_ddpg_loss(actor, critic, "agents")
    updater = make_target_updater(loss, mode="hard", hard_update_interval=2)
    with torch.no_grad():
        for p in loss.value_network_params.values(True, True):
            p.add_(1.0)
    online = loss.value_network_params.clone()
    updater.step()
    assert not torch.equal(loss.target_value_network_params["module", "mlp", "params", "0", "weight"].data,
                           online["module", "mlp", "params", "0", "weight"].data)
    updater.step()
    for key, value in online.items(True, True):
        torch.testing.assert_close(loss.target_value_network_params[key].data, value.data)


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


def test_discrete_actions_rejected_with_suggestion():
    env = SpecOnlyEnv((OBS,), Categorical(4, shape=(B, N)), batch=B)
    with pytest.raises(ValueError, match="needs continuous actions.*mappo, iql or qmix"):
        make_deterministic_actor(env, "agents")


def tiny(module, algorithm: str, env: str, run_dir, **overrides):
    cfg = module.CONFIG(algorithm=algorithm)
    apply_overrides(cfg, {
        "env.name": env, "env.num_envs": 4, "env.max_steps": 10, "collector.frames_per_batch": 100,
        "collector.total_frames": 200, "replay.batch_size": 32, "replay.buffer_size": 1000,
        "train.optimiser_steps": 2, "model.num_cells": [16], "logger.progress": False,
        "logger.run_dir": str(run_dir), **overrides,
    })
    return cfg


def read_metrics(run_dir):
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


ENVS = [
    ("vmas/navigation", {"env.n_agents": 2}, ["agents"]),
    ("vmas/simple_tag", {}, ["adversary", "agent"]),
    ("pettingzoo/mpe2/simple_tag_v3", {"env.continuous_actions": True, "env.num_obstacles": 1}, ["adversary", "agent"]),
]
RUNS = [(m, a, *e) for m, algos in ((maddpg, ("maddpg", "iddpg")), (masac, ("masac", "isac")))
        for a in algos for e in ENVS]


@pytest.mark.parametrize("module,algorithm,env,overrides,groups", RUNS,
                         ids=[f"{r[1]}-{r[2]}" for r in RUNS])
def test_train_tiny(module, algorithm, env, overrides, groups, tmp_run_dir):
    result = module.train(tiny(module, algorithm, env, tmp_run_dir, **overrides))
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


def test_warmup_delays_learning_and_adds_loss_columns(tmp_run_dir):
    cfg = tiny(maddpg, "maddpg", "vmas/navigation", tmp_run_dir, **{"env.n_agents": 2, "replay.warmup_frames": 150,
                                                                      "collector.total_frames": 300})
    maddpg.train(cfg)
    rows = read_metrics(tmp_run_dir)
    assert [r["agents/learning"] for r in rows] == ["0.0", "1.0", "1.0"]
    assert rows[0]["agents/loss_actor"] == "" and rows[1]["agents/loss_actor"] != ""


def test_freeze_after_keeps_group_bit_identical(tmp_run_dir, monkeypatch):
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
    cfg = tiny(maddpg, "maddpg", "vmas/simple_tag", tmp_run_dir, **{"train.freeze_after": {"agent": 1},
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
def test_bad_input(args, match, capsys, tmp_path, monkeypatch):
    assert_cli_rejects(args, match, capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("algorithm", ["ddpg", "sac"])
def test_losses_leave_dead_agents_out(algorithm):
    _, actor, critic = _modules(stochastic=algorithm == "sac")
    make = make_ddpg_loss if algorithm == "ddpg" else make_sac_loss
    terms = DDPG_LOSS_TERMS if algorithm == "ddpg" else SAC_LOSS_TERMS
    loss = make(actor, critic, "agents", mask_key=("agents", "mask"))
    td = _transitions()
    td["agents", "mask"] = torch.ones(B, N, dtype=torch.bool)
    td["agents", "mask"][:4, 0] = False  # agent 0 died in the first 4 transitions
    changed = td.clone()
    changed["next", "agents", "reward"][:4, 0] = 1000.0

    def value_loss(batch):
        torch.manual_seed(0)  # SAC samples actions
        return loss(batch.clone())[terms[1]]

    assert torch.allclose(value_loss(td), value_loss(changed))
    live = td.clone()
    live["next", "agents", "reward"][:4, 1] = 1000.0
    assert not torch.allclose(value_loss(td), value_loss(live))
