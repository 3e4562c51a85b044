"""make_env: specs and short rollouts for every family, exact rewards, seeding, bad input."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pettingzoo
import pytest
import torch
from gymnasium import spaces
from torchrl.envs.utils import check_env_specs

from marlkit.envs import make_env, MultiAgentEnv
from marlkit.envs.gridworld import GridWorldEnv

FAMILY_CASES = [
    ("vmas/navigation", dict(n_agents=3, max_steps=4), {"agents": 3}),
    ("vmas/balance", dict(n_agents=2, continuous_actions=False, max_steps=4), {"agents": 2}),
    ("vmas/simple_tag", dict(num_good_agents=1, num_adversaries=2, max_steps=4),
     {"adversary": 2, "agent": 1}),
    ("pettingzoo/mpe2/simple_spread_v3", dict(N=2, max_cycles=4), {"agent": 2}),
    ("pettingzoo/mpe2/simple_tag_v3", dict(num_good=1, num_adversaries=2, num_obstacles=1, max_cycles=4),
     {"adversary": 2, "agent": 1}),
    ("pettingzoo/sisl/pursuit_v5",
     dict(x_size=6, y_size=6, n_pursuers=2, n_evaders=2, n_catch=1, max_cycles=4), {"pursuer": 2}),
    ("pettingzoo/butterfly/pistonball_v6", dict(n_pistons=2, max_cycles=4), {"piston": 2}),
    ("pettingzoo/butterfly/knights_archers_zombies_v11", dict(max_cycles=6), {"archer": 2, "knight": 2}),
    ("gridworld", dict(grid_size=4, num_agents=2, num_targets=2, max_steps=4), {"agents": 2}),
    ("gridworld", dict(mode="competitive", max_steps=4), {"agents": 2}),
    ("matrix/two_step", {}, {"agents": 2}),
    ("matrix/climbing", dict(rounds=3), {"agents": 2}),
    ("gym/CartPole-v1", {}, {"agents": 1}),
]


@pytest.mark.parametrize("name,kwargs,groups", FAMILY_CASES, ids=[c[0] + str(i) for i, c in enumerate(FAMILY_CASES)])
def test_family_specs_and_rollout(name, kwargs, groups):
    num_envs = 2
    env = make_env(name, num_envs=num_envs, seed=0, **kwargs)
    assert isinstance(env, MultiAgentEnv)
    assert {g: len(a) for g, a in env.group_map.items()} == groups
    check_env_specs(env, seed=0)
    td = env.rollout(10, break_when_any_done=False)
    assert td.batch_size == (num_envs, 10)
    for group, n in groups.items():
        for key in ("observation", "action"):
            assert td[group, key].shape[:3] == (num_envs, 10, n)
        for key in ("reward", "done", "terminated", "episode_reward"):
            assert td["next", group, key].shape == (num_envs, 10, n, 1), (group, key)
    for key in ("done", "terminated", "step_count"):
        assert td["next", key].shape == (num_envs, 10, 1)
    env.close()


def test_group_done_follows_root_and_episode_reward_resets():
    env = make_env("vmas/navigation", num_envs=3, n_agents=2, max_steps=3, seed=1)
    td = env.rollout(7, break_when_any_done=False)
    root = td["next", "done"]
    assert root[:, 2].all() and root[:, 5].all() and not root[:, 3].any()
    assert torch.equal(td["next", "agents", "done"], root.unsqueeze(-2).expand(3, 7, 2, 1))
    # The return accumulates within an episode and restarts after the reset.
    ret = td["next", "agents", "episode_reward"]
    rew = td["next", "agents", "reward"]
    torch.testing.assert_close(ret[:, 2], rew[:, :3].sum(1))
    torch.testing.assert_close(ret[:, 3], rew[:, 3])
    assert td["next", "step_count"][:, 2].eq(3).all() and td["next", "step_count"][:, 3].eq(1).all()


def _grid(mode: str, agent_pos, target_pos, **kwargs) -> GridWorldEnv:
    env = GridWorldEnv(num_envs=1, grid_size=5, num_agents=len(agent_pos),
                       num_targets=len(target_pos), mode=mode, **kwargs)
    env.reset()
    env.set_state(torch.tensor([agent_pos]), torch.tensor([target_pos]))
    return env


def _step(env: GridWorldEnv, actions) -> dict:
    td = env.full_action_spec.zero()
    td["agents", "action"] = torch.tensor([actions])
    out = env.step(td)["next"]
    return {
        "reward": out["agents", "reward"][0, :, 0].tolist(),
        "terminated": bool(out["terminated"]),
        "truncated": bool(out["truncated"]),
        "obs": out["agents", "observation"][0],
    }


UP, DOWN, LEFT, RIGHT, STAY = range(5)


def test_gridworld_cooperative_rewards_exact():
    env = _grid("cooperative", [[0, 0], [4, 4]], [[0, 1], [4, 3]])
    out = _step(env, [RIGHT, STAY])  # agent 0 collects one of two targets
    assert out["reward"] == pytest.approx([9.9, 9.9])
    assert not out["terminated"]
    out = _step(env, [STAY, STAY])  # nothing collected: just the step penalty
    assert out["reward"] == pytest.approx([-0.1, -0.1])
    out = _step(env, [STAY, LEFT])  # the last target: +10 each, +20 each, terminated
    assert out["reward"] == pytest.approx([29.9, 29.9])
    assert out["terminated"] and not out["truncated"]


def test_gridworld_two_targets_in_one_step_and_walls():
    env = _grid("cooperative", [[0, 0], [2, 2]], [[1, 0], [2, 3], [4, 4]])
    out = _step(env, [DOWN, RIGHT])  # both agents collect at once: +20 each
    assert out["reward"] == pytest.approx([19.9, 19.9])
    out = _step(env, [LEFT, STAY])  # moving into a wall keeps the agent in place
    assert env.agent_pos[0, 0].tolist() == [1, 0]


def test_gridworld_competitive_rewards_exact():
    env = _grid("competitive", [[0, 0], [4, 4], [2, 2]], [[0, 1], [3, 3]])
    out = _step(env, [RIGHT, STAY, STAY])
    assert out["reward"] == pytest.approx([19.9, -5.1, -5.1])
    # Two agents reach the last target together: the lower index collects it.
    env = _grid("competitive", [[1, 0], [1, 2]], [[1, 1]])
    out = _step(env, [RIGHT, LEFT])
    assert out["reward"] == pytest.approx([19.9, -5.1])
    assert out["terminated"]


def test_gridworld_truncation_and_observation():
    env = _grid("cooperative", [[0, 0], [4, 4]], [[2, 2]], max_steps=2)
    out = _step(env, [STAY, STAY])
    assert not out["truncated"]
    expected = torch.tensor([0, 0, 1, 1, 0.5, 0.5, 1.0])  # own, other, target, remaining
    torch.testing.assert_close(out["obs"][0], expected)
    out = _step(env, [STAY, STAY])
    assert out["truncated"] and not out["terminated"]


def test_gridworld_batched_and_render():
    env = make_env("gridworld", num_envs=64, grid_size=6, num_agents=3, num_targets=4, seed=3)
    td = env.reset()
    pos = env.base_env.agent_pos
    assert pos.shape == (64, 3, 2) and pos.min() >= 0 and pos.max() <= 5
    frame = env.render(mode="rgb_array", env_index=5)
    assert frame.shape == (6 * 32, 6 * 32, 3) and frame.dtype.name == "uint8"
    assert td["agents", "observation"].shape == (64, 3, 2 * 3 + 3 * 4)


@pytest.mark.parametrize(
    "game,actions,expected",
    [
        ("coordination", [1, 1], [2, 2]),
        ("coordination", [0, 1], [0, 0]),
        ("zero_sum", [0, 1], [-1, 1]),
        ("mixed", [0, 1], [-1, -1]),
        ("climbing", [0, 0], [11, 11]),
        ("climbing", [1, 2], [6, 6]),
        ("nonmonotonic", [0, 0], [8, 8]),
        ("nonmonotonic", [0, 2], [-12, -12]),
        ("nonmonotonic", [2, 1], [0, 0]),
    ],
)
def test_matrix_payoffs(game, actions, expected):
    env = make_env(f"matrix/{game}")
    td = env.reset()
    td["agents", "action"] = torch.tensor([actions])
    out = env.step(td)["next"]
    assert out["agents", "reward"][0, :, 0].tolist() == expected
    assert out["done"].all()


def test_matrix_two_step_game():
    env = make_env("matrix/two_step", num_envs=4)
    td = env.reset()
    # Envs 0, 1 go to 2A (player 0 plays 0); envs 2, 3 go to 2B.
    td["agents", "action"] = torch.tensor([[0, 1], [0, 0], [1, 0], [1, 1]])
    td = env.step(td)
    assert td["next", "agents", "reward"].abs().sum() == 0 and not td["next", "done"].any()
    td = td["next"]
    td["agents", "action"] = torch.tensor([[0, 0], [1, 1], [0, 1], [1, 1]])
    out = env.step(td)["next"]
    assert out["agents", "reward"][:, 0, 0].tolist() == [7, 7, 1, 8]
    assert out["done"].all()


def test_matrix_custom_tables():
    three = torch.zeros(2, 2, 2)
    three[1, 1, 1] = 5.0
    env = make_env("matrix/custom", payoffs=three, n_agents=3)
    td = env.reset()
    td["agents", "action"] = torch.tensor([[1, 1, 1]])
    assert env.step(td)["next", "agents", "reward"][0, :, 0].tolist() == [5, 5, 5]
    per_player = torch.tensor([[[3.0, 3.0], [0.0, 5.0]], [[5.0, 0.0], [1.0, 1.0]]])  # prisoner's dilemma
    env = make_env("matrix/custom", payoffs=per_player)
    td = env.reset()
    td["agents", "action"] = torch.tensor([[0, 1]])
    assert env.step(td)["next", "agents", "reward"][0, :, 0].tolist() == [0, 5]


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vmas/navigation", {}),
        ("gridworld", dict(grid_size=5)),
        ("matrix/climbing", dict(rounds=2)),
        ("pettingzoo/mpe2/simple_spread_v3", dict(N=2, max_cycles=10)),
        ("gym/CartPole-v1", {}),
    ],
)
def test_same_seed_same_rollout(name, kwargs):
    def run(seed):
        env = make_env(name, num_envs=2, seed=seed, **kwargs)
        torch.manual_seed(seed)  # the random policy uses torch's global generator
        return env.rollout(8, break_when_any_done=False)

    first, second = run(7), run(7)
    for key in first.keys(True, True):
        assert torch.equal(first[key], second[key]), key


def _random_steps(env, td, steps, seed):
    torch.manual_seed(seed)
    outputs = []
    for _ in range(steps):
        td, td_next = env.step_and_maybe_reset(env.rand_action(td))
        outputs.append(td["next"].clone())
        td = td_next
    return td, outputs


def _vmas_generators():
    from vmas.simulator.environment.environment import Environment

    return Environment.vmas_random_state


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vmas/navigation", dict(n_agents=2, max_steps=9)),
        ("vmas/balance", dict(n_agents=2, max_steps=9)),  # scenario class from an anonymous module
        ("pettingzoo/mpe2/simple_spread_v3", dict(N=2, max_cycles=9)),
        ("pettingzoo/sisl/pursuit_v5",
         dict(x_size=6, y_size=6, n_pursuers=2, n_evaders=3, n_catch=1, max_cycles=9)),
        ("gridworld", dict(grid_size=4, max_steps=9)),
        ("matrix/climbing", dict(rounds=9)),
        ("gym/CartPole-v1", {}),
    ],
)
def test_simulator_state_continues_episodes_exactly(name, kwargs):
    import copy
    import io

    env = make_env(name, num_envs=3, seed=1, **kwargs)
    td, _ = _random_steps(env, env.reset(), 13, seed=0)  # mid-episode, after some resets
    buffer = io.BytesIO()
    torch.save(env.simulator_state(), buffer)
    vmas_generators = copy.deepcopy(_vmas_generators())
    _, expected = _random_steps(env, td.clone(), 20, seed=3)

    fresh = make_env(name, num_envs=3, seed=2, **kwargs)
    _random_steps(fresh, fresh.reset(), 5, seed=4)  # somewhere else entirely
    buffer.seek(0)
    fresh.load_simulator_state(torch.load(buffer, weights_only=True))
    _vmas_generators()[:] = vmas_generators
    _, got = _random_steps(fresh, td.clone(), 20, seed=3)
    for step, (a, b) in enumerate(zip(expected, got)):
        for key in a.keys(True, True):
            assert torch.equal(a[key], b[key]), (step, key)


@pytest.mark.parametrize("name,kwargs,unsaved", [
    ("pettingzoo/butterfly/pistonball_v6", dict(n_pistons=2), "pymunk"),
    ("pettingzoo/butterfly/knights_archers_zombies_v11", {}, "pygame.rect.Rect"),
])
def test_simulator_state_refused_when_it_cannot_be_complete(name, kwargs, unsaved):
    env = make_env(name, num_envs=1, seed=0, **kwargs)
    env.rollout(2)
    with pytest.raises(NotImplementedError, match=unsaved):
        env.simulator_state()


def test_simulator_state_of_another_env_refused():
    state = make_env("gridworld", num_envs=2, seed=0).simulator_state()
    with pytest.raises(ValueError, match="'gridworld' cannot be loaded into 'matrix/climbing'"):
        make_env("matrix/climbing", num_envs=2).load_simulator_state(state)


class _Item:
    def __init__(self, value):
        self.value = value


_Bounds = collections.namedtuple("_Bounds", "low high")


class _World:
    def __init__(self, n):
        self.items = [_Item(float(i)) for i in range(n)]
        self.first = self.items[0]
        self.index = {item: i for i, item in enumerate(self.items)}
        self.grid = np.zeros((2, 2), dtype=np.int32)
        self.rng = np.random.default_rng(0)
        self.pair = (self.first, "tag")
        self.bounds = _Bounds(0, n)
        self.callback = len  # code: kept as the fresh object has it


def test_snapshot_round_trip_keeps_aliasing_and_recreates_missing_objects():
    from marlkit.envs._snapshot import capture, restore

    world = _World(3)
    world.grid[1, 0] = 7
    world.rng.random()
    world.first.value = 42.0
    snap, unsaved = capture(world)
    assert unsaved == []
    expected_draw = world.rng.random()

    fresh = _World(1)  # fewer items than the snapshot: the others are created
    restore(fresh, torch.load(_saved(snap), weights_only=True))
    assert [item.value for item in fresh.items] == [42.0, 1.0, 2.0]
    assert fresh.first is fresh.items[0] and fresh.pair[0] is fresh.first
    assert fresh.index == {item: i for i, item in enumerate(fresh.items)}
    assert fresh.grid.dtype == np.int32 and fresh.grid[1, 0] == 7
    assert fresh.rng.random() == expected_draw
    assert fresh.callback is len
    assert fresh.bounds == _Bounds(0, 3) and fresh.bounds.high == 3


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


class TinyParallel(pettingzoo.ParallelEnv):
    """A two-agent env where each agent is rewarded for choosing action 1."""

    metadata = {"name": "tiny_v0"}

    def __init__(self, horizon: int = 3):
        self.possible_agents = ["walker_0", "walker_1"]
        self.agents = list(self.possible_agents)
        self.horizon = horizon
        self.t = 0

    def observation_space(self, agent):
        return spaces.Box(0.0, 1.0, shape=(2,))

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return {a: [0.0, 0.0] for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        obs = {a: [self.t / self.horizon, 0.0] for a in self.agents}
        rew = {a: float(actions[a]) for a in self.agents}
        end = self.t >= self.horizon
        trunc = {a: end for a in self.agents}
        term = {a: False for a in self.agents}
        if end:
            self.agents = []
        return obs, rew, term, trunc, {a: {} for a in self.possible_agents}


@pytest.mark.parametrize("source", ["class", "factory", "instance"])
def test_bring_your_own_parallel_env(source):
    env_source = {"class": TinyParallel, "factory": lambda: TinyParallel(horizon=2),
                  "instance": TinyParallel()}[source]
    num_envs = 1 if source == "instance" else 3
    env = make_env(env_source, num_envs=num_envs, seed=0)
    assert env.group_map == {"walker": ["walker_0", "walker_1"]}
    check_env_specs(env)
    td = env.rollout(6, break_when_any_done=False)
    assert td["next", "walker", "reward"].shape == (num_envs, 6, 2, 1)
    assert td["next", "done"].any()


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("nosuchfamily/x", {}, "unknown environment family 'nosuchfamily'.*vmas"),
        ("vmas/not_a_scenario", {}, "unknown VMAS scenario 'not_a_scenario'.*vmas/navigation"),
        ("pettingzoo/mpe2/not_an_env", {}, "unknown PettingZoo env.*simple_spread_v3"),
        ("pettingzoo/nofamily/x_v0", {}, "PettingZoo family='nofamily'.*sisl"),
        ("matrix/nogame", {}, "unknown matrix game 'nogame'.*matrix/climbing"),
        ("gym/NoSuchEnv-v0", {}, "unknown Gymnasium env id 'NoSuchEnv-v0'"),
        ("vmas/navigation", dict(num_envs=0), "num_envs must be a positive integer.*0"),
        ("vmas/navigation", dict(n_agents=0), "n_agents must be a positive integer.*0"),
        ("vmas/navigation", dict(n_agentz=3), r"does not take the keyword\(s\) \{'n_agentz': 3\}"),
        ("gridworld", dict(mode="friendly"), "mode='friendly'.*cooperative.*competitive"),
        ("gridworld", dict(grid_size=2, num_agents=3, num_targets=3), "does not fit"),
        ("gridworld", dict(speed=2), r"unknown gridworld arguments \['speed'\]"),
        ("matrix/custom", dict(payoffs=torch.zeros(2, 3)), "same number"),
        ("matrix/custom", dict(payoffs=torch.zeros(2, 2, 2), n_agents=4), "do not fit 4 players"),
        ("matrix/climbing", dict(payoffs=[[1]]), "only accepted by matrix/custom"),
        ("vmas/navigation", dict(device="tpu9"), "not a valid torch device"),
    ],
)
def test_bad_input(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(name, **kwargs)


def test_import_from_outside_repository(tmp_path):
    code = (
        "import marlkit.envs, marlkit.modules, marlkit.losses, marlkit.pipelines, sys; "
        "import importlib.util as u; "
        "assert u.find_spec('envs') is None and u.find_spec('modules') is None; "
        "print(marlkit.envs.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).name == "__init__.py"


def test_missing_simulator_package_says_what_to_install():
    # PettingZoo's Atari family needs multi_agent_ale_py, which marlkit does not install.
    with pytest.raises(ImportError, match=r"pip install 'pettingzoo\[atari\]'"):
        make_env("pettingzoo/atari/pong_v3")


def test_live_mask_key_only_where_agents_can_die():
    assert make_env("pettingzoo/mpe2/simple_spread_v3", N=2).live_mask_key("agent") == ("agent", "mask")
    assert make_env("vmas/navigation", n_agents=2).live_mask_key("agents") is None
    assert make_env("gridworld").live_mask_key("agents") is None


def test_benchmarl_benchmark_keywords_are_all_taken_by_their_scenarios():
    """Every scenario keyword learning_vs_benchmarl.py passes is one the VMAS scenario reads (make_env
    refuses the ones VMAS would ignore; the second half checks that refusal on one of the benchmark's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from learning_vs_benchmarl import TASKS

    for task, kwargs in TASKS.items():
        env = make_env(f"vmas/{task}", num_envs=2, seed=0, **kwargs)
        assert env.batch_size == (2,)
        discrete = make_env(f"vmas/{task}", num_envs=2, seed=0, continuous_actions=False, **kwargs)  # QMIX's arm
        assert not discrete.full_action_spec[discrete.action_keys[0]].dtype.is_floating_point
    with pytest.raises(ValueError, match=r"does not take the keyword\(s\) \{'shared_rew': False\}"):
        make_env("vmas/balance", num_envs=2, **TASKS["balance"], shared_rew=False)
