"""Tensor pursuit (``make_env("pursuit")``) against PettingZoo's ``sisl/pursuit_v5``: step by step with the
same pursuer actions and forced evader moves, every observation, reward, flag and position identical;
statistics where the random streams differ; specs, keys, state round trip and a SUPER run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pettingzoo.sisl import pursuit_v5
from pettingzoo.sisl.pursuit import pursuit_base
from pettingzoo.sisl.pursuit.utils import two_d_maps
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from marlkit.envs import make_env
from marlkit.envs.pursuit import _need_to_surround, numpy_sum, PursuitEnv, rectangle_map

CONFIGS = {
    "super": {},  # the SUPER experiment's setup is PettingZoo's default one
    "local_reward": {"shared_reward": False},
    "no_surround": {"surround": False, "n_catch": 2, "x_size": 8, "y_size": 8, "n_evaders": 6, "n_pursuers": 8},
    "n_catch_1": {"surround": False, "n_catch": 1, "x_size": 8, "y_size": 8, "n_evaders": 5, "n_pursuers": 4,
                  "max_cycles": 200},
    "small_map": {"x_size": 7, "y_size": 5, "n_evaders": 3, "n_pursuers": 4, "max_cycles": 150,
                  "shared_reward": False},
    "obs_range_3": {"obs_range": 3, "x_size": 10, "y_size": 12, "n_evaders": 4, "n_pursuers": 6},
    "obs_range_5": {"obs_range": 5, "n_evaders": 10, "max_cycles": 300},
    "obs_range_4": {"obs_range": 4, "x_size": 9, "y_size": 9, "n_evaders": 5, "n_pursuers": 5, "max_cycles": 200},
    "frozen": {"freeze_evaders": True, "x_size": 8, "y_size": 8, "n_evaders": 4, "n_pursuers": 6,
               "max_cycles": 100},
    "window": {"constraint_window": 0.5, "n_evaders": 6, "n_pursuers": 5, "max_cycles": 120},
}


class ForcedMoves:
    """An evader controller for PettingZoo's pursuit that plays given moves (by evader index)."""

    def __init__(self, sim):
        self.sim, self.moves, self.calls = sim, None, 0

    def act(self, state):  # called once per remaining evader, in index order
        index = np.flatnonzero(~self.sim.evaders_gone)[self.calls]
        self.calls += 1
        return int(self.moves[index])


def _positions(sim, n_evaders: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pursuers = np.array([sim.pursuer_layer.get_position(i) for i in range(sim.pursuer_layer.n_agents())])
    alive = ~sim.evaders_gone.copy()
    evaders = np.zeros((n_evaders, 2), dtype=np.int64)
    evaders[alive] = np.array([sim.evader_layer.get_position(i) for i in range(sim.evader_layer.n_agents())]
                              ).reshape(-1, 2)
    return pursuers, evaders, alive


def _chasing(pursuers: np.ndarray, evaders: np.ndarray, alive: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mostly toward the nearest evader, sometimes at random: random pursuers alone almost never
    surround one, and catches are what the test must cover."""
    targets = evaders[alive]
    actions = rng.integers(5, size=len(pursuers))
    for i, (x, y) in enumerate(pursuers):
        if len(targets) and rng.random() < 0.8:
            tx, ty = targets[np.abs(targets - (x, y)).sum(1).argmin()]
            dx, dy = tx - x, ty - y  # actions: 0 x-1, 1 x+1, 2 y+1, 3 y-1, 4 stay
            if abs(dx) >= abs(dy) and dx:
                actions[i] = 0 if dx < 0 else 1
            elif dy:
                actions[i] = 3 if dy < 0 else 2
    return actions


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_equal_pettingzoo(name, monkeypatch):
    kwargs = CONFIGS[name]
    # PettingZoo's constructor places agents with an unseeded generator by rejection sampling, which
    # never ends for some placements in the "window" setup (4 of 100 tries): construct from a fixed seed.
    real = pursuit_base.seeding.np_random
    monkeypatch.setattr(pursuit_base.seeding, "np_random", lambda seed=None: real(11 if seed is None else seed))
    reference = pursuit_v5.parallel_env(**kwargs)
    sim = reference.unwrapped.env
    env = PursuitEnv(num_envs=1, **kwargs)
    n, e = env.n_pursuers, env.n_evaders
    forced = ForcedMoves(sim)
    rng = np.random.default_rng(7)
    episodes = seed = steps = catches = 0
    while steps < 1000 or episodes < 2:
        observations, _ = reference.reset(seed=seed)
        seed += 1
        if not env.freeze_evaders:
            sim.evader_controller = forced
        pursuers, evaders, alive = _positions(sim, e)
        out = env.set_state(pursuers[None], evaders[None], alive[None])
        expected = np.stack([observations[f"pursuer_{i}"] for i in range(n)])
        np.testing.assert_array_equal(out["pursuer", "observation"][0].numpy(), expected)
        while True:
            actions = _chasing(pursuers, evaders, alive, rng)
            forced.moves, forced.calls = rng.integers(5, size=e), 0
            env.forced_evader_actions = torch.as_tensor(forced.moves)[None]
            observations, rewards, terminations, truncations, _ = reference.step(
                {f"pursuer_{i}": int(a) for i, a in enumerate(actions)})
            td = env.step(TensorDict({"pursuer": {"action": torch.as_tensor(actions)[None]}}, batch_size=[1]))["next"]
            steps += 1
            where = f"{name}, step {steps}"
            np.testing.assert_array_equal(td["pursuer", "observation"][0].numpy(),
                                          np.stack([observations[f"pursuer_{i}"] for i in range(n)]), err_msg=where)
            got = td["pursuer", "reward"][0, :, 0].numpy()
            want = np.array([rewards[f"pursuer_{i}"] for i in range(n)], dtype=np.float32)
            np.testing.assert_array_equal(got, want, err_msg=where)
            assert bool(td["terminated"]) == terminations["pursuer_0"], where
            assert bool(td["truncated"]) == truncations["pursuer_0"], where
            remaining = int(alive.sum())
            pursuers, evaders, alive = _positions(sim, e)
            catches += remaining - int(alive.sum())
            np.testing.assert_array_equal(env.pursuer_pos[0].numpy(), pursuers, err_msg=where)
            np.testing.assert_array_equal(env.evader_alive[0].numpy(), alive, err_msg=where)
            np.testing.assert_array_equal(env.evader_pos[0].numpy()[alive], evaders[alive], err_msg=where)
            if terminations["pursuer_0"] or truncations["pursuer_0"]:
                episodes += 1
                break
    assert catches > 0  # the catch rule and its reward were exercised
    return steps, episodes, catches


def test_map_and_surround_counts_equal_pettingzoo():
    for x_size, y_size in [(16, 16), (7, 5), (3, 9), (10, 12)]:
        walls = rectangle_map(x_size, y_size)
        np.testing.assert_array_equal(walls.numpy(), two_d_maps.rectangle_map(x_size, y_size) == -1)
        sim = pursuit_v5.parallel_env(x_size=x_size, y_size=y_size, n_evaders=1, n_pursuers=1).unwrapped.env
        expected = [[sim.need_to_surround(x, y) for y in range(y_size)] for x in range(x_size)]
        np.testing.assert_array_equal(_need_to_surround(walls).numpy(), np.array(expected))


def test_sums_in_numpys_order():
    rng = np.random.default_rng(0)
    for n in [1, 3, 7, 8, 9, 17, 130, 300]:
        values = rng.normal(size=(5, n)) * 10.0 ** rng.integers(-8, 8, size=(5, n))
        expected = np.array([np.sum(row) for row in values])
        np.testing.assert_array_equal(numpy_sum(torch.as_tensor(values)).numpy(), expected)


def test_random_episodes_match_pettingzoo_in_distribution():
    """Where the streams differ (spawns, evader moves): episode lengths under random pursuers, and how
    often evaders move, agree with PettingZoo's within sampling error."""
    kwargs = {"x_size": 6, "y_size": 6, "n_evaders": 2, "n_pursuers": 4, "max_cycles": 60,
              "surround": False, "n_catch": 1}
    rng = np.random.default_rng(1)
    reference = pursuit_v5.parallel_env(**kwargs)
    lengths_pz, moved_pz = [], []
    sim = reference.unwrapped.env
    for seed in range(150):
        reference.reset(seed=seed)
        for t in range(1, 61):
            before = _positions(sim, 2)[1]
            _, _, terminations, truncations, _ = reference.step({a: int(rng.integers(5)) for a in reference.agents})
            _, after, alive = _positions(sim, 2)
            moved_pz.extend((after != before).any(-1)[alive])
            if terminations["pursuer_0"] or truncations["pursuer_0"]:
                break
        lengths_pz.append(t)
    env = PursuitEnv(num_envs=150, seed=3, **kwargs)
    env.reset()
    lengths = torch.zeros(150, dtype=torch.long)
    finished = torch.zeros(150, dtype=torch.bool)
    moved = []
    for t in range(1, 61):
        before = env.evader_pos.clone()
        action = torch.randint(5, (150, 4))
        td = env.step(TensorDict({"pursuer": {"action": action}}, batch_size=[150]))["next"]
        stays_alive = env.evader_alive & ~finished.unsqueeze(-1)
        moved.append((env.evader_pos != before).any(-1)[stays_alive].float())
        done = td["done"].squeeze(-1) & ~finished
        lengths[done] = t
        finished |= done
        if finished.all():
            break
    a, b = np.array(lengths_pz, dtype=float), lengths.double().numpy()
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert 10 < a.mean() < 59  # episodes end by catches, not all by the cycle limit
    # an evader moves unless it drew "stay" or bumped into the edge or the building
    ours, theirs = torch.cat(moved).double().numpy(), np.array(moved_pz, dtype=float)
    se = np.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
    assert abs(ours.mean() - theirs.mean()) < 4 * se, (ours.mean(), theirs.mean(), se)


def test_make_env_gives_the_pettingzoo_keys_and_specs():
    ours = make_env("pursuit", num_envs=2, seed=0)
    theirs = make_env("pettingzoo/sisl/pursuit_v5", num_envs=2, seed=0)
    assert ours.group_map == theirs.group_map
    for spec in ("observation_spec", "action_spec", "reward_spec", "done_spec"):
        a, b = getattr(ours, spec), getattr(theirs, spec)
        assert set(a.keys(True, True)) == set(b.keys(True, True)), spec
        for key in a.keys(True, True):
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, (spec, key)
    assert torch.equal(ours.observation_spec["pursuer", "observation"].space.high,
                       theirs.observation_spec["pursuer", "observation"].space.high)
    td = ours.rollout(20, break_when_any_done=False)
    assert set(td.keys(True, True)) == set(theirs.rollout(2, break_when_any_done=False).keys(True, True))
    check_env_specs(ours)


def test_state_round_trip_resumes_exactly():
    env = make_env("pursuit", num_envs=4, seed=0, n_evaders=6, x_size=8, y_size=8, max_cycles=30)
    td = env.reset()
    for _ in range(7):
        td = env.rand_step(td)["next"]
    saved = env.simulator_state()
    torch.manual_seed(5)
    actions = [env.action_spec.rand() for _ in range(40)]
    first = torch.stack([env.step_and_maybe_reset(td.clone().update(a))[0]["next", "pursuer", "observation"]
                         for a in actions])
    other = make_env("pursuit", num_envs=4, seed=123, n_evaders=6, x_size=8, y_size=8, max_cycles=30)
    other.reset()
    other.load_simulator_state(saved)
    second = torch.stack([other.step_and_maybe_reset(td.clone().update(a))[0]["next", "pursuer", "observation"]
                          for a in actions])
    assert torch.equal(first, second)


@pytest.mark.parametrize("kwargs,match", [
    ({"n_pursuers": 0}, "n_pursuers must be a positive integer"),
    ({"obs_range": "7"}, "obs_range must be a positive integer"),
    ({"constraint_window": 1.5}, r"constraint_window must be in \[0, 1\], got 1.5"),
    ({"surround": "yes"}, "surround must be true or false"),
    ({"n_evader": 3}, r"unknown pursuit arguments \['n_evader'\]; accepted: \['catch_reward'"),
    # PettingZoo's rejection sampling loops forever here
    ({"x_size": 3, "y_size": 3, "n_pursuers": 2}, "cannot place 30 agents of a kind on non-adjacent open cells"),
])
def test_bad_arguments_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env("pursuit", num_envs=2, **kwargs).reset()


def test_pursuit_super_trains_on_either_env_and_its_policy_evaluates_on_the_other(tmp_path, capsys):
    from marlkit.pipelines.cli import main as cli_main

    tiny = ["--frames", "80", "env.num_envs=4", "collector.frames_per_batch=40", "env.x_size=7", "env.y_size=7",
            "env.n_pursuers=3", "env.n_evaders=2", "replay.warmup_frames=0", "train.optimiser_steps=2",
            "logger.eval_every=0", "logger.progress=false", "env.max_steps=10"]
    for env in ("pursuit", "pettingzoo/sisl/pursuit_v5"):
        assert cli_main(["train", "iql", "--preset", "pursuit-super", "--env", env, "--run-dir",
                         str(tmp_path / env.replace("/", "_")), *tiny]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "pursuit"), "--episodes", "2", "--env", "pettingzoo/sisl/pursuit_v5"]) == 0
    out = capsys.readouterr().out
    assert "pursuer: mean return" in out and (tmp_path / "pursuit" / "eval_pettingzoo_sisl_pursuit_v5.json").is_file()
    assert cli_main(["eval", str(tmp_path / "pettingzoo_sisl_pursuit_v5"), "--episodes", "2", "--env", "pursuit"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", str(tmp_path / "pursuit"), "--env", "gridworld"])
    err = capsys.readouterr().err
    # the run's env settings go to the other env: one that does not take them says so in one line
    assert exit_info.value.code == 2 and "unknown gridworld arguments ['catch_reward'" in err, err
    assert len(err.strip().splitlines()) == 1
