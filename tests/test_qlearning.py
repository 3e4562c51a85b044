"""IQL / VDN / QMIX and SUPER: losses, selection heuristics, sharing, priorities, tiny runs, bad input."""

from __future__ import annotations

import csv

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.modules import EpsilonGreedy
from marlkit.pipelines import qlearning
from marlkit.pipelines.replay import ExperienceSelector, GroupReplay, ProportionalPrioritizedSampler, SharedReplay

B, N, OBS, A = 16, 3, 4, 5
DISCRETE = Categorical(A, shape=(B, N))


def test_epsilon_greedy_anneals_and_honours_masks():
    spec = Categorical(A, shape=(N,))
    explore = EpsilonGreedy(spec, ("agents", "action"), mask_key=("agents", "action_mask"), eps_init=1.0,
                            eps_end=0.0, annealing_frames=10)
    td = TensorDict({"agents": {"action": torch.zeros(1000, N, dtype=torch.long),
                                "action_mask": torch.zeros(1000, N, A, dtype=torch.bool)}}, batch_size=(1000,))
    td["agents", "action_mask"][..., 2:4] = True
    out = explore(td.clone())["agents", "action"]
    assert set(out.unique().tolist()) == {2, 3}  # random actions only among the allowed ones
    assert explore.anneal(5) == pytest.approx(0.5) and explore.anneal(20) == 0.0
    assert (explore(td.clone())["agents", "action"] == 0).all()
    explore.anneal(0)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        assert (explore(td.clone())["agents", "action"] == 0).all()


# |TD errors| of 10 new transitions for 2 agents, by hand.
TD = torch.tensor([[0.1, 5.0], [0.2, 4.0], [0.3, 3.0], [0.4, 2.0], [0.5, 1.0],
                   [0.6, 0.9], [0.7, 0.8], [0.8, 0.7], [0.9, 0.6], [1.0, 0.5]])


def test_quantile_selection_exact_indices():
    selector = ExperienceSelector("quantile", n_agents=2, beta=0.2, window=10)
    mask = selector.select(TD)
    # 0.8-quantile of agent 0's window [0.1..1.0] is 0.82: indices 8, 9; of agent 1's is 3.2: 0, 1.
    assert mask[:, 0].nonzero().flatten().tolist() == [8, 9]
    assert mask[:, 1].nonzero().flatten().tolist() == [0, 1]
    # The window keeps the last k values, so larger past errors raise the bar for new ones: with two
    # earlier 100s in a 12-value window the 0.8-quantiles become 0.98 and 4.8.
    selector = ExperienceSelector("quantile", n_agents=2, beta=0.2, window=12)
    selector.select(torch.full((2, 2), 100.0))
    mask = selector.select(TD)
    assert mask[:, 0].nonzero().flatten().tolist() == [9] and mask[:, 1].nonzero().flatten().tolist() == [0]
    # Older values fall out of a short window.
    selector = ExperienceSelector("quantile", n_agents=2, beta=0.2, window=10)
    selector.select(torch.full((2, 2), 100.0))
    assert torch.equal(selector.select(TD), ExperienceSelector("quantile", 2, beta=0.2, window=10).select(TD))


def test_gaussian_selection_exact_indices():
    selector = ExperienceSelector("gaussian", n_agents=2, beta=0.1, window=1500)
    mask = selector.select(TD)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.9))
    threshold = TD.mean(0) + z * TD.std(0, correction=0)  # agent 0: 0.55 + 1.2816 * 0.287 = 0.918
    assert torch.equal(mask, TD > threshold)             # agent 1: 1.85 + 1.2816 * 1.527 = 3.807
    assert mask[:, 0].nonzero().flatten().tolist() == [9]
    assert mask[:, 1].nonzero().flatten().tolist() == [0, 1]


def test_stochastic_selection_frequencies():
    td = torch.tensor([[1.0], [2.0], [3.0], [4.0], [40.0]])  # n = 5, sum = 50
    selector = ExperienceSelector("stochastic", n_agents=1, beta=0.4, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([selector.select(td)[:, 0] for _ in range(4000)]).float().mean(0)
    expected = torch.tensor([0.04, 0.08, 0.12, 0.16, 1.0])  # min(1, 0.4 * 5 * td / 50)
    torch.testing.assert_close(draws, expected, atol=0.02, rtol=0)


def test_random_all_none_selection():
    gen = torch.Generator().manual_seed(0)
    assert ExperienceSelector("random", 2, beta=0.3, generator=gen).select(TD).sum(0).tolist() == [3, 3]
    assert ExperienceSelector("all", 2).select(TD).all() and not ExperienceSelector("none", 2).select(TD).any()


def _collected(n_frames: int = 6) -> TensorDict:
    """A collected [1, T] batch where agent i's observation is filled with i (to trace transitions)."""
    obs = torch.arange(N).float().view(1, 1, N, 1).expand(1, n_frames, N, OBS).clone()
    obs = obs + 10 * torch.arange(n_frames).float().view(1, n_frames, 1, 1)  # frame id in the tens
    done = torch.zeros(1, n_frames, N, 1, dtype=torch.bool)
    return TensorDict({
        "agents": {"observation": obs, "action": torch.zeros(1, n_frames, N, dtype=torch.long)},
        "next": {"agents": {"observation": obs.clone(), "reward": torch.zeros(1, n_frames, N, 1),
                            "done": done, "terminated": done.clone()},
                 "done": done[..., 0, :], "terminated": done[..., 0, :]},
    }, batch_size=(1, n_frames))


def test_shared_transitions_land_only_in_other_agents_buffers():
    # Agent 0 scores frame 1 high and shares it; agent 2 shares frame 4; agent 1 shares nothing.
    scores = torch.zeros(6, N)
    scores[1, 0], scores[4, 2] = 10.0, 10.0
    replay = SharedReplay("agents", N, 100, 4, scratch_dir=None, device=torch.device("cpu"),
                          selector=ExperienceSelector("quantile", N, beta=0.2, window=6), score=lambda d: scores)
    metrics = replay.extend(_collected())
    contents = [buf.storage[: len(buf)]["agents", "observation"][:, 0].tolist() for buf in replay.buffers]
    assert contents[0] == [0, 10, 20, 30, 40, 50, 42]   # its own six, plus agent 2's frame 4
    assert contents[1] == [1, 11, 21, 31, 41, 51, 10, 42]  # its own, agent 0's frame 1, agent 2's frame 4
    assert contents[2] == [2, 12, 22, 32, 42, 52, 10]   # its own, plus agent 0's frame 1 — never its own again
    assert metrics["agents/share_fraction"] == pytest.approx(2 / 18)
    sample = replay.sample()
    assert sample["agents", "observation"].shape == (4, N, OBS)
    assert (sample["agents", "observation"][:, 0, 0] % 10 != 1).all()  # agent 0's column is never agent 1's own


def test_prioritized_priorities_change_after_update():
    replay = GroupReplay("agents", 64, 8, scratch_dir=None, device=torch.device("cpu"), prioritized=True)
    replay.extend(_collected(10))
    before = replay.priorities()[:10].clone()
    assert torch.equal(before, torch.ones(10))  # new transitions get the max priority
    sample = replay.sample()
    assert sample["priority_weight"].shape == (8, N)
    replay.update_priority(sample, torch.full((8, N, 1), 0.25))  # squared TD errors, as the losses write
    after = replay.priorities()[:10]
    changed = sample["index"].unique()
    assert torch.allclose(after[changed], torch.tensor(0.5 + 1e-6))  # priority |TD| = 0.5
    assert not torch.equal(before, after)


def test_independent_prioritized_learners_keep_their_own_priorities(tmp_run_dir, tiny_config):
    """IQL with priorities and no sharing: a buffer per agent, none scored or relayed, and agent i's
    priorities are agent i's |TD| (the SUPER paper's no-sharing baseline), not the group's largest."""
    replay = SharedReplay("agents", N, 64, 8, scratch_dir=None, device=torch.device("cpu"), prioritized=True,
                          selector=ExperienceSelector("none", N), score=lambda d: pytest.fail("scored"))
    assert replay.extend(_collected(10)) == {"agents/share_fraction": 0.0}
    assert [len(buffer) for buffer in replay.buffers] == [10] * N
    sample = replay.sample()
    errors = torch.tensor([0.1, 0.2, 0.3]).expand(8, N)
    replay.update_priority(sample, errors.pow(2).unsqueeze(-1))  # squared, as the losses write them
    for i, buffer in enumerate(replay.buffers):  # agent i's column is agent i's buffer at the drawn slots
        assert torch.equal(sample["agents", "observation"][:, i], buffer.storage[sample["index"][:, i]]["agents", "observation"])
        drawn = sample["index"][:, i].unique()
        torch.testing.assert_close(buffer.sampler.priorities[drawn], torch.full(drawn.shape, errors[0, i] + 1e-6))
    cfg = tiny_config("iql", "gridworld", tmp_run_dir, frames_per_batch=80,
                      **{"env.max_steps": 10, "replay.batch_size": 16, "replay.prioritized": True})
    qlearning.train(cfg)
    assert len(list((tmp_run_dir / "buffers" / "agents").glob("agent_*"))) == 2  # the grid world's two agents


def test_prioritized_sampler_prefers_high_priority():
    sampler = ProportionalPrioritizedSampler(4, alpha=1.0, beta=1.0)
    sampler.extend(torch.arange(4))
    sampler.update_priority(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 97.0]))
    storage = [0, 1, 2, 3]
    index, info = sampler.sample(storage, 2000)
    assert (index == 3).float().mean() > 0.9
    assert info["priority_weight"].max() <= 1.0 + 1e-6


def test_prioritized_sampler_draws_in_proportion_and_restores_its_state():
    from marlkit.pipelines.replay import ProportionalPrioritizedSampler

    torch.manual_seed(0)
    sampler = ProportionalPrioritizedSampler(3000, alpha=0.6, beta=0.4, new_priority=1.0)
    sampler.extend(torch.arange(1300))  # spans blocks, the last one partly filled
    priority = torch.rand(1300) * 10
    sampler.update_priority(torch.arange(1300), priority)
    index, info = sampler.sample(range(1300), 400_000)
    expected = (priority + 1e-6).double().pow(0.6)
    expected /= expected.sum()
    frequency = torch.bincount(index, minlength=1300).double() / 400_000
    assert index.max() < 1300 and (frequency - expected).abs().max() < 5 * (expected.max() / 400_000) ** 0.5
    weights = (1300 * expected[index]).pow(-0.4) / (1300 * expected.min()).pow(-0.4)
    torch.testing.assert_close(info["priority_weight"].double(), weights, rtol=1e-5, atol=1e-6)
    restored = ProportionalPrioritizedSampler(3000, alpha=0.6, beta=0.4)
    restored.load_state_dict(sampler.state_dict())
    torch.manual_seed(1)
    first = sampler.sample(range(1300), 64)
    torch.manual_seed(1)
    second = restored.sample(range(1300), 64)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["priority_weight"], second[1]["priority_weight"])
    sampler.extend(torch.arange(1300, 1310))
    assert torch.all(sampler.priorities[1300:1310] == 1.0)  # new transitions at the fixed priority


def test_shared_priority_table_draws_and_updates_as_one_sampler_per_agent(tmp_path):
    """SUPER's agents share one priority table: one pass must give exactly what a sampler per agent gives,
    with buffers of different lengths (enough of them for torch to vectorise across them)."""
    from marlkit.pipelines.replay import PriorityBlocks

    lengths, capacity = [1300, 700, 1029, 512, 1, 2999, 1800, 64, 1024], 3000
    table = PriorityBlocks(len(lengths), capacity, alpha=0.6)
    shared = [ProportionalPrioritizedSampler(capacity, 0.6, 0.4, new_priority=1.0, table=table, row=i)
              for i in range(len(lengths))]
    alone = [ProportionalPrioritizedSampler(capacity, 0.6, 0.4, new_priority=1.0) for _ in lengths]
    torch.manual_seed(0)
    for i, n in enumerate(lengths):
        priority = torch.rand(n) * 10
        for sampler in (shared[i], alone[i]):
            sampler.extend(torch.arange(n))
            sampler.update_priority(torch.arange(n), priority)
    for step in range(5):
        torch.manual_seed(step)
        index, weights = table.draw(list(range(len(lengths))), lengths, 64, 0.4)
        torch.manual_seed(step)
        expected = [sampler.sample(range(n), 64) for sampler, n in zip(alone, lengths)]
        assert torch.equal(index, torch.stack([e[0] for e in expected]))
        assert torch.equal(weights, torch.stack([e[1]["priority_weight"] for e in expected]))
        assert (index < torch.tensor(lengths).unsqueeze(-1)).all()
        errors = torch.rand(len(lengths), 64)
        for i, sampler in enumerate(alone):
            sampler.update_priority(index[i], errors[i])
        table.set(index.t().contiguous().t(), errors + 1e-6)  # a strided view, as SharedReplay hands it over
        for a, b in zip(shared, alone):
            assert torch.equal(a.priorities, b.priorities)
        assert torch.equal(table.block_sum, torch.cat([b.table.block_sum for b in alone]))
        assert torch.equal(table.block_min, torch.cat([b.table.block_min for b in alone]))


def test_priority_table_refreshes_slots_as_a_whole_recomputation_does():
    """Re-prioritising a few slots (not a multiple of the block, drawn twice in places) leaves the table
    exactly as recomputing every slot and block does: torch's vectorised pow and its scalar remainder
    loop differ in the last bit, so a slot's p^alpha must not depend on how many were refreshed with it."""
    from marlkit.pipelines.replay import PriorityBlocks

    torch.manual_seed(0)
    table = PriorityBlocks(3, 1000, alpha=0.6)
    table.set(torch.arange(700).expand(3, 700), torch.rand(3, 700) * 10 + 1e-6)
    for count in (31, 5, 64, 1):
        index = torch.randint(0, 700, (3, count))
        index[:, 0] = index[:, -1]  # a slot drawn twice in one minibatch
        table.set(index, torch.rand(3, count) * 10 + 1e-6)
        after = (table.scaled.clone(), table.block_sum.clone(), table.block_min.clone())
        table.refresh()
        assert all(torch.equal(a, b) for a, b in zip(after, (table.scaled, table.block_sum, table.block_min)))
    # blocks 0-9 full, block 10 holds slots 640-699 (the rest of it is empty: p^alpha 0)
    assert torch.equal(table.block_min[:, :10], table.scaled[:, :10].amin(-1))
    assert torch.equal(table.block_min[:, 10], table.scaled[:, 10, :60].amin(-1))
    assert torch.isinf(table.block_min[:, 11:]).all()  # no stored slot: not the smallest priority


@pytest.mark.parametrize("agent_major", [True, False])
def test_shared_replay_gathers_observations_in_the_layout_asked_for(agent_major):
    """Batched MLPs read observations agent-major: with ``agent_major`` the minibatch's [B, n_agents, ...]
    view must be that layout already, so moving the agent dim first is not a copy; without it (a conv
    encoder, which may round differently on other strides) they stay [B, n_agents, ...] contiguous."""
    replay = SharedReplay("agents", N, 64, 8, scratch_dir=None, device=torch.device("cpu"), prioritized=True,
                          selector=ExperienceSelector("none", N), score=None, agent_major=agent_major)
    replay.extend(_collected(10))
    sample = replay.sample()
    for key in (("agents", "observation"), ("next", "agents", "observation")):
        observation = sample[key]
        assert observation.shape == (8, N, OBS)
        assert observation.movedim(-2, 0).is_contiguous() == agent_major
        assert observation.is_contiguous() != agent_major
        for i, buffer in enumerate(replay.buffers):
            assert torch.equal(observation[:, i], buffer.storage[sample["index"][:, i]][key])


def test_only_networks_that_reshape_observations_into_batched_mlps_read_them_agent_major():
    from marlkit.envs import make_env
    from marlkit.modules import make_q_network, reads_agents_first

    env = make_env("pursuit", num_envs=2, n_pursuers=3, n_evaders=2, x_size=7, y_size=7)  # 7x7x3 views

    def values(**kwargs):
        return make_q_network(env, "pursuer", num_cells=[8], **kwargs).module[0].module

    assert reads_agents_first(values(share_params=False, flatten_images=True))
    assert reads_agents_first(values(share_params=False, flatten_images=True, dueling=True))
    assert not reads_agents_first(values(share_params=False))  # the conv encoder
    assert not reads_agents_first(values(share_params=True, flatten_images=True))  # TorchRL's shared forward


def test_pursuit_super_preset_takes_the_paper_codes_loss_and_activation():
    """The authors' RLlib DQN: Huber (delta 1) TD loss, tanh MLP (RLlib's model default), clip 40."""
    from marlkit.pipelines import make_config

    cfg = make_config("iql", "pursuit-super", {})
    assert (cfg.loss.loss_function, cfg.model.activation, cfg.train.max_grad_norm) == ("smooth_l1", "tanh", 40.0)
    assert (cfg.model.num_cells, cfg.model.dueling, cfg.loss.double_dqn) == ([64, 64], True, True)


def test_pursuit_super_replay_hands_observations_over_agent_major(tmp_path):
    from marlkit.pipelines import make_config
    from marlkit.pipelines.session import start_run

    cfg = make_config("iql", "pursuit-super", {"logger.run_dir": str(tmp_path), "replay.memmap": False,
                                               "env.num_envs": 2})
    run = start_run(cfg, False, qlearning.checked_iterations)
    assert qlearning.build_learners(run.env, run.cfg, run.device, None)["pursuer"].replay.agent_major


def test_memmap_storage_reads_what_torchrl_reads_and_sees_later_writes(tmp_path):
    from torchrl.data import LazyMemmapStorage

    from marlkit.pipelines.replay import MemmapStorage

    data = TensorDict({"agents": {"observation": torch.rand(50, N, OBS)}, "reward": torch.rand(50, 1)}, batch_size=[50])
    fast, plain = MemmapStorage(100, scratch_dir=tmp_path / "fast"), LazyMemmapStorage(100, scratch_dir=tmp_path / "plain")
    for storage in (fast, plain):
        storage.set(torch.arange(50), data)
    index = torch.tensor([3, 49, 3, 0])
    assert (fast.get(index) == plain.get(index)).all()
    assert not any(isinstance(t, type(plain._storage["reward"])) for t in fast.get(index).values(True, True))
    fast.set(torch.tensor([3]), data[7:8])  # a write after the views were made
    assert torch.equal(fast.get(torch.tensor([3]))["reward"], data["reward"][7:8])
    fast._storage = TensorDict.load_memmap(tmp_path / "plain")  # a resumed run reopens other files
    assert (fast.get(index) == plain.get(index)).all()


ENVS = [
    ("vmas/navigation", {"env.n_agents": 2, "env.continuous_actions": False, "env.max_steps": 10}),
    ("pettingzoo/sisl/pursuit_v5", {"env.x_size": 7, "env.y_size": 7, "env.n_pursuers": 3, "env.n_evaders": 2,
                                    "env.max_steps": 10}),
    ("gridworld", {"env.grid_size": 4, "env.max_steps": 10}),
    ("pursuit", {"env.x_size": 7, "env.y_size": 7, "env.n_pursuers": 3, "env.n_evaders": 2, "env.max_steps": 10}),
]
RUNS = [(a, e, o, {}) for a in ("iql", "vdn", "qmix") for e, o in ENVS]
RUNS += [("iql", e, o, {"sharing.mode": m}) for m in ("all", "random", "quantile", "gaussian", "stochastic")
         for e, o in ENVS]
RUNS += [("iql", "gridworld", {"env.max_steps": 10}, {"replay.prioritized": True, "model.dueling": True}),
         ("qmix", "matrix/two_step", {}, {"replay.prioritized": True})]


@pytest.mark.parametrize("algorithm,env,env_overrides,overrides", RUNS,
                         ids=[f"{r[0]}-{r[1]}-{r[3].get('sharing.mode', '')}" for r in RUNS])
def test_train_tiny(algorithm, env, env_overrides, overrides, tmp_run_dir, tiny_config):
    result = qlearning.train(tiny_config(algorithm, env, tmp_run_dir, frames_per_batch=80, **{"replay.batch_size": 16, **env_overrides, **overrides}))
    with (tmp_run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert result.frames == 160 and len(rows) == 2
    group = next(iter(result.episode_reward_mean))
    assert rows[-1][f"{group}/loss"] != "" and float(rows[-1]["counters/optimiser_steps"]) == 4
    mode = overrides.get("sharing.mode")
    if mode:
        fraction = float(rows[-1][f"{group}/share_fraction"])
        assert fraction == 1.0 if mode == "all" else 0.0 <= fraction < 1.0
        assert len(list((tmp_run_dir / "buffers" / group).glob("agent_*"))) >= 2  # one buffer per agent


@pytest.mark.parametrize("args,match", [
    (["train", "qmix", "--env", "vmas/navigation"], "qmix needs discrete actions.*env.continuous_actions=false.*maddpg"),
    (["train", "iql", "--env", "pettingzoo/mpe2/simple_spread_v3", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300", "env.continuous_actions=true"], "iql needs one discrete action per agent"),
    (["train", "iql", "sharing.beta=0"], r"sharing.beta must be in \(0, 1\], got 0.0"),
    (["train", "iql", "sharing.beta=1.5"], r"sharing.beta must be in \(0, 1\], got 1.5"),
    (["train", "iql", "sharing.window=0"], "sharing.window must be >= 1"),
    (["train", "iql", "sharing.mode=sometimes"], "sharing.mode='sometimes' is not supported; accepted"),
    (["train", "qmix", "sharing.mode=all"], "use algorithm=iql"),
    (["train", "vdn", "--env", "gym/CartPole-v1", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300"], "vdn mixes the values of several agents; group 'agents' has 1"),
    (["train", "iql", "exploration.eps_init=2"], r"exploration.eps_init must be in \[0, 1\]"),
])
def test_bad_input(args, match, cli_rejects):
    cli_rejects(args, match)


def test_super_shares_within_each_group_only(tmp_run_dir, tiny_config, read_metrics):
    """simple_tag: the 3 adversaries relay to each other; the one-agent `agent` group keeps a plain replay."""
    cfg = tiny_config("iql", "vmas/simple_tag", tmp_run_dir, frames_per_batch=80,
                      **{"env.continuous_actions": False, "env.max_steps": 10, "replay.batch_size": 16,
                         "sharing.mode": "all"})
    qlearning.train(cfg)
    row = read_metrics(tmp_run_dir)[-1]
    assert float(row["adversary/share_fraction"]) == 1.0 and "agent/share_fraction" not in row
    assert len(list((tmp_run_dir / "buffers" / "adversary").glob("agent_*"))) == 3
    assert not list((tmp_run_dir / "buffers" / "agent").glob("agent_*"))
