"""Checkpoints (atomic, safe loading), eval.json, rendering a trained run, multi-seed runs."""

from __future__ import annotations

import json

import imageio.v2 as imageio
import pytest
import torch
import yaml

from marlkit.pipelines import checkpoint as ckpt
from marlkit.pipelines import qlearning
from marlkit.pipelines.runs import load_run
from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.config import apply_overrides
from marlkit.pipelines.runs import evaluate_run


def test_checkpoint_restores_the_trained_policy(tmp_run_dir, tiny_gridworld_mappo):
    result = tiny_gridworld_mappo(tmp_run_dir, **{"logger.checkpoint_every": 1})
    state = torch.load(tmp_run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (state["iteration"], state["frames"]) == (2, 120)
    assert set(state["losses"]) == set(state["optimisers"]) == {"agents"}
    loaded = load_run(tmp_run_dir)
    trained = dict(result.policy.named_parameters())
    for name, value in loaded.policy.named_parameters():
        assert torch.equal(value, trained[name]), name


def test_offpolicy_checkpoint_includes_exploration_frames(tmp_run_dir):
    cfg = qlearning.CONFIG(algorithm="iql")
    apply_overrides(cfg, {"env.name": "gridworld", "env.num_envs": 4, "collector.frames_per_batch": 40,
                          "collector.total_frames": 80, "replay.batch_size": 8, "train.optimiser_steps": 1,
                          "model.num_cells": [8], "exploration.annealing_frames": 160, "logger.progress": False,
                          "logger.run_dir": str(tmp_run_dir)})
    qlearning.train(cfg)
    loaded = load_run(tmp_run_dir)
    explore = loaded.policy[0][-1]  # the group's q network, then epsilon-greedy
    assert loaded.state["frames"] == 80 and explore.value == pytest.approx(1.0 + (0.05 - 1.0) * 0.5)
    assert loaded.state["optimiser_steps"] == 2


def test_kill_during_checkpoint_write_keeps_previous(tmp_run_dir, monkeypatch, tiny_gridworld_mappo):
    tiny_gridworld_mappo(tmp_run_dir)
    path = tmp_run_dir / "checkpoints" / "last.pt"
    before = path.read_bytes()

    def dying_save(state, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"format": 1})
    assert path.read_bytes() == before  # the previous checkpoint is intact and still loads
    assert load_run(tmp_run_dir).state["frames"] == 120
    assert not list(path.parent.glob(".*tmp"))


def test_foreign_or_corrupt_checkpoints_are_refused(tmp_path, tiny_gridworld_mappo):
    first, second = tmp_path / "a", tmp_path / "b"
    tiny_gridworld_mappo(first)
    tiny_gridworld_mappo(second, env="matrix/coordination", **{"env.max_steps": None})
    other = second / "checkpoints" / "last.pt"
    with pytest.raises(ValueError, match="written for another configuration"):
        load_run(first, checkpoint=str(other))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_run(first, checkpoint=str(corrupt))
    with pytest.raises(ValueError, match="is not a run directory"):
        load_run(tmp_path)
    config = yaml.safe_load((first / "config.yaml").read_text())
    config["algorithm"] = "ippo"
    (first / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="written by algorithm='mappo', not 'ippo'"):
        load_run(first)


def test_eval_writes_eval_json(tmp_run_dir, capsys, tiny_gridworld_mappo):
    tiny_gridworld_mappo(tmp_run_dir)
    assert cli_main(["eval", str(tmp_run_dir), "--episodes", "6"]) == 0
    result = json.loads((tmp_run_dir / "eval.json").read_text())
    stats = result["groups"]["agents"]
    assert result["episodes"] == 6 and len(stats["returns"]) == 6
    returns = torch.tensor(stats["returns"])  # the interval is mean ± 1.96 standard errors of these
    half = 1.96 * returns.std().item() / 6 ** 0.5
    assert stats["mean"] == pytest.approx(returns.mean().item())
    assert stats["ci95"] == pytest.approx([stats["mean"] - half, stats["mean"] + half])
    assert "agents: mean return" in capsys.readouterr().out


def test_eval_on_non_run_directory_changes_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", str(tmp_path)])
    assert exit_info.value.code == 2 and "is not a run directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_eval_is_deterministic(tmp_run_dir, tiny_gridworld_mappo):
    tiny_gridworld_mappo(tmp_run_dir, env="matrix/climbing", **{"env.max_steps": None})
    assert evaluate_run(tmp_run_dir, episodes=3)["groups"] == evaluate_run(tmp_run_dir, episodes=3)["groups"]


def test_same_seed_repeats_a_run_whose_env_draws_from_global_generators(tmp_path, read_metrics):
    """A user's env that draws from numpy's and Python's global generators (custom_envs:GlobalDice)
    repeats itself under the same seed: the run seeds them as it seeds torch."""
    args = ["--env", "custom_envs:GlobalDice", "--frames", "80", "--seed", "5", "env.num_envs=4",
            "collector.frames_per_batch=40", "train.minibatch_size=20", "model.num_cells=[8]", "logger.progress=false"]
    for name in ("a", "b"):
        assert cli_main(["train", "mappo", "--run-dir", str(tmp_path / name), *args]) == 0
    returns = [[row["runner/episode_reward_mean"] for row in read_metrics(tmp_path / name)] for name in ("a", "b")]
    assert returns[0] == returns[1] and all(value != "" for value in returns[0]), returns


def test_render_trained_run(tmp_run_dir, tmp_path, tiny_gridworld_mappo):
    tiny_gridworld_mappo(tmp_run_dir, **{"env.grid_size": 4})
    out = tmp_path / "trained.mp4"
    assert cli_main(["render", str(tmp_run_dir), "--out", str(out), "--steps", "9"]) == 0
    frames = [frame for frame in imageio.get_reader(out)]  # list() would ask len(): inf for streams
    assert len(frames) == 9 and frames[0].shape == (128, 128, 3)


def test_seeds_run_siblings_and_plot(tmp_path):
    base = tmp_path / "runs" / "coord"
    args = ["train", "ippo", "--env", "matrix/coordination", "--frames", "40", "--seeds", "3,4",
            "--run-dir", str(base), "env.num_envs=4", "collector.frames_per_batch=20",
            "train.minibatch_size=10", "model.num_cells=[8]", "logger.progress=false"]
    assert cli_main(args) == 0
    for seed in (3, 4):
        config = yaml.safe_load((base.parent / f"coord_seed{seed}" / "config.yaml").read_text())
        assert config["seed"] == seed
    assert (base.parent / "coord_seeds.png").stat().st_size > 0


RESUME_CASES = [
    ("mappo", ["--env", "vmas/navigation", "env.n_agents=2", "train.minibatch_size=20", "train.num_epochs=2"]),
    ("maddpg", ["--env", "vmas/navigation", "env.n_agents=2", "replay.batch_size=16", "train.optimiser_steps=2",
                "exploration.annealing_frames=200"]),
    ("iql", ["--env", "gridworld", "replay.batch_size=16", "train.optimiser_steps=2", "replay.prioritized=true",
             "exploration.annealing_frames=200"]),
    ("ippo", ["--env", "pettingzoo/mpe2/simple_spread_v3", "env.N=2", "train.minibatch_size=20"]),
    ("maa2c", ["--env", "gridworld"]),
    ("coma", ["--env", "gridworld", "loss.target_update_interval=3"]),
    ("happo", ["--env", "vmas/navigation", "env.n_agents=2", "train.minibatch_size=20", "train.num_epochs=2"]),
    ("mappo", ["--env", "vmas/navigation", "env.n_agents=2", "train.minibatch_size=20", "train.num_epochs=2",
               "model.kind=gru", "model.seq_len=5"]),  # each agent's state carried through the checkpoint
    ("ippo", ["--env", "vmas/navigation", "env.n_agents=2", "train.minibatch_size=20", "train.num_epochs=2",
              "model.critic_kind=lstm", "model.seq_len=5"]),  # the critic's state too
    ("iql", ["--env", "gridworld", "model.kind=gru", "replay.seq_len=4", "replay.burn_in=2", "replay.batch_size=4",
             "replay.prioritized=true", "train.optimiser_steps=2", "exploration.annealing_frames=200"]),  # DRQN
    ("qtran", ["--env", "gridworld", "replay.batch_size=16", "train.optimiser_steps=2",
               "exploration.annealing_frames=200", "loss.target_update=hard", "loss.hard_update_interval=3"]),
    ("iql", ["--env", "pettingzoo/sisl/pursuit_v5", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3",
             "env.n_evaders=2", "sharing.mode=quantile", "replay.batch_size=16", "train.optimiser_steps=2",
             "exploration.annealing_frames=200"]),
    ("iql", ["--preset", "pursuit-super", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3", "env.n_evaders=2",
             "sharing.mode=quantile", "replay.warmup_frames=0", "train.optimiser_steps=2", "logger.eval_every=2",
             "logger.eval_episodes=2"]),
    ("iql", ["--preset", "pursuit-super", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3", "env.n_evaders=2",
             "sharing.mode=quantile", "replay.warmup_frames=0", "train.optimiser_steps=2", "logger.eval_every=2",
             "logger.eval_episodes=2", "train.compile=true"]),  # the compiled update's state carried through
]


@pytest.mark.parametrize("reset", [False, True], ids=["mid-episode", "reset-each-batch"])
@pytest.mark.parametrize("algorithm,args", RESUME_CASES, ids=[f"{c[0]}-{c[1][1]}" for c in RESUME_CASES])
def test_resume_matches_uninterrupted_run(algorithm, args, reset, tmp_path, read_metrics):
    # 15-step episodes and 10 steps per batch: without resets, the stop falls mid-episode.
    common = ["--seed", "5", *args, "env.max_steps=15", "env.num_envs=4", "collector.frames_per_batch=40",
              f"collector.reset_at_each_iter={str(reset).lower()}", "model.num_cells=[16]",
              "logger.progress=false", "logger.checkpoint_every=1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli_main(["train", algorithm, "--frames", "160", "--run-dir", str(whole), *common]) == 0
    assert cli_main(["train", algorithm, "--frames", "80", "--run-dir", str(parts), *common]) == 0
    assert cli_main(["train", "--resume", str(parts), "--frames", "160"]) == 0
    uninterrupted, resumed = read_metrics(whole), read_metrics(parts)
    assert [r["iteration"] for r in resumed] == ["0", "1", "2", "3"]  # no row lost or duplicated
    keys = [k for k in uninterrupted[0] if "reward" in k or "loss" in k]
    assert keys
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_resume_of_an_unsaveable_simulator_restarts_episodes_with_a_warning():
    from marlkit.envs import make_env

    env = make_env("pettingzoo/butterfly/knights_archers_zombies_v11", num_envs=1, seed=0)
    env.rollout(2)
    simulator = ckpt._simulator_state(env)
    assert "pygame" in simulator["unsaved"]
    torch.manual_seed(3)
    state = {"simulator": simulator, "rng": ckpt._global_rng_state()}
    before = torch.rand(1)
    with pytest.warns(UserWarning, match="resumed episodes restart from a reset: .*knights_archers"):
        ckpt.restore_rollout(state, env, collector=None)  # the collector is left as built
    assert torch.equal(torch.rand(1), before)  # the RNGs are still restored


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path, read_metrics):
    run = tmp_path / "run"
    common = ["--env", "matrix/coordination", "env.num_envs=4", "collector.frames_per_batch=20",
              "train.minibatch_size=10", "model.num_cells=[8]", "logger.progress=false", "logger.checkpoint_every=2"]
    assert cli_main(["train", "ippo", "--frames", "60", "--run-dir", str(run), *common]) == 0
    # Checkpoints after iterations 1 and 2 (the end); pretend the run died after a row for iteration 3.
    with (run / "metrics.csv").open("a") as handle:
        handle.write("3,80,1.0,1.0\n")
    assert cli_main(["train", "--resume", str(run), "--frames", "100"]) == 0
    assert [r["iteration"] for r in read_metrics(run)] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("extra,match", [
    (["--frames", "40"], "already has 40 frames; pass --frames larger"),
    (["--frames", "80", "--seed", "2"], "only --frames may change it"),
    (["--frames", "80", "train.lr=1"], "only --frames may change it"),
])
def test_resume_bad_input(extra, match, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "ippo", "--env", "matrix/coordination", "--frames", "40", "--run-dir", str(run),
                     "env.num_envs=4", "collector.frames_per_batch=20", "train.minibatch_size=10",
                     "model.num_cells=[8]", "logger.progress=false"]) == 0
    before = (run / "metrics.csv").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--resume", str(run), *extra])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert (run / "metrics.csv").read_text() == before


def test_resume_non_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--resume", str(tmp_path)])
    assert "is not a run directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
