"""Evaluation on every env family: TorchRL's early-stopping rollouts, ``marlkit eval`` with episodes of
different lengths, evaluation during training, and a user's own env coming back from ``config.yaml``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from marlkit.envs import make_env
from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.config import apply_overrides
from marlkit.pipelines.mappo import MappoConfig, train

TESTS = Path(__file__).parent

# Families whose episodes end at different steps in different copies (agents die in KAZ).
VARIABLE_LENGTH = [
    ("vmas/balance", dict(n_agents=2, continuous_actions=False, max_steps=200)),
    ("pettingzoo/butterfly/knights_archers_zombies_v11", dict(max_cycles=150, line_death=True)),
    ("gym/CartPole-v1", {}),
    ("gridworld", dict(grid_size=4, num_agents=2, num_targets=2, max_steps=30)),
    ("custom_envs:Countdown", {}),
]


@pytest.mark.parametrize("name,kwargs", VARIABLE_LENGTH + [("matrix/two_step", {})],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_rollout_until_all_copies_are_done(name, kwargs):
    torch.manual_seed(0)  # the random actions come from torch's global stream: independent of test order
    env = make_env(name, num_envs=4, seed=0, **kwargs)
    td = env.rollout(300, break_when_any_done=False, break_when_all_done=True)
    done = td["next", "done"][..., 0]  # [copies, steps]
    assert done[:, -1].all()  # every copy ended: the rollout stopped when the last one did
    first_end = done.float().argmax(-1)
    if name != "matrix/two_step":  # fixed-length game; every other case has copies ending apart
        assert len(set(first_end.tolist())) > 1, first_end
    for copy, end in enumerate(first_end.tolist()):
        # A finished copy repeats its final step until the rollout stops.
        for group in env.group_map:
            final = td["next", group, "episode_reward"][copy, end]
            assert torch.equal(td["next", group, "episode_reward"][copy, end:], final.expand_as(td["next", group, "episode_reward"][copy, end:]))
    env.close()


def _tiny_run(run_dir: Path, env: str, **overrides) -> Path:
    cfg = apply_overrides(MappoConfig(), {
        "env.name": env, "env.num_envs": 4, "collector.frames_per_batch": 40, "collector.total_frames": 40,
        "train.minibatch_size": 20, "train.num_epochs": 1, "model.num_cells": [8], "logger.progress": False,
        "logger.run_dir": str(run_dir), **overrides})
    train(cfg)
    return run_dir


EVAL_CASES = [
    ("vmas/balance", {"env.n_agents": 2, "env.max_steps": 150}),
    ("pettingzoo/butterfly/knights_archers_zombies_v11", {"env.max_steps": 150, "env.line_death": True}),
    ("pettingzoo/sisl/multiwalker_v9", {"env.max_steps": 60}),
    ("gym/CartPole-v1", {}),
    ("gridworld", {"env.max_steps": 30}),
    ("matrix/climbing", {"env.rounds": 3}),
    ("custom_envs:Countdown", {}),
]


@pytest.mark.parametrize("name,overrides", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_counts_every_episode_whatever_its_length(name, overrides, tmp_path, capsys):
    run = _tiny_run(tmp_path / "run", name, **overrides)
    assert cli_main(["eval", str(run), "--episodes", "5"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["episodes"] == 5 and result["episodes_ended"] == 5
    for group, stats in result["groups"].items():
        returns = torch.tensor(stats["returns"])
        assert returns.shape == (5,) and torch.isfinite(returns).all()
        assert stats["mean"] == pytest.approx(returns.mean().item())
        half = 1.96 * returns.std().item() / 5 ** 0.5
        assert stats["ci95"] == pytest.approx([stats["mean"] - half, stats["mean"] + half])
    assert "mean return" in capsys.readouterr().out


def test_eval_returns_are_the_episodes_own():
    """CartPole pays 1 per step: each evaluated return must equal the length of that copy's episode."""
    from marlkit.pipelines.evaluate import evaluate_policy

    def random_policy(env):
        return lambda td: env.rand_action(td)

    torch.manual_seed(0)
    env = make_env("gym/CartPole-v1", num_envs=6, seed=3)
    stats = evaluate_policy(env, random_policy(env), max_steps=None)
    torch.manual_seed(0)
    replay = make_env("gym/CartPole-v1", num_envs=6, seed=3)
    done = replay.rollout(600, random_policy(replay), break_when_any_done=False,
                          break_when_all_done=True)["next", "done"][..., 0]
    lengths = (done.float().argmax(-1) + 1).tolist()
    assert stats["episodes_ended"] == 6 and len(set(lengths)) > 1
    assert stats["groups"]["agents"]["returns"] == [float(n) for n in lengths]


@pytest.mark.parametrize("name,kwargs", VARIABLE_LENGTH + [("pursuit", dict(n_evaders=4, max_cycles=60))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_eval_stores_only_what_it_scores_and_scores_the_same(name, kwargs):
    """The evaluation's rollout stacks only the done flags and returns, and scores exactly what a full
    rollout of the same episodes scores."""
    from marlkit.pipelines.evaluate import evaluate_policy, score_rollout

    def policy(env):
        return lambda td: env.rand_action(td)

    torch.manual_seed(0)
    env = make_env(name, num_envs=4, seed=2, **kwargs)
    stored = []
    original = env.rollout

    def rollout(*args, **options):
        out = original(*args, **options)
        stored.append(sorted(out.keys(True, True)))
        return out

    env.rollout = rollout
    stats = evaluate_policy(env, policy(env), max_steps=None)
    scored = [("next", "done"), *(("next", group, "episode_reward") for group in env.group_map)]
    assert stored == [sorted(scored)]
    torch.manual_seed(0)
    replay = make_env(name, num_envs=4, seed=2, **kwargs)
    with torch.no_grad():
        full = replay.rollout(10_000, policy(replay), break_when_any_done=False, break_when_all_done=True)
    assert len(full.keys(True, True)) > len(scored)
    assert stats == score_rollout(full, replay.group_map)


def test_eval_during_training_on_episodes_of_different_lengths(tmp_path):
    run = _tiny_run(tmp_path / "run", "gym/CartPole-v1", **{
        "collector.frames_per_batch": 400, "collector.total_frames": 800, "train.minibatch_size": 100,
        "logger.eval_every": 1, "logger.eval_episodes": 3})
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("eval/agents/episode_reward_mean")
    values = [float(row.split(",")[column]) for row in rows[1:]]
    assert len(values) == 2 and all(v >= 8 for v in values)  # CartPole: at least 8 steps of reward 1


def test_own_env_comes_back_by_import_path(tmp_path):
    """Trained from a class object, recorded as 'module:qualname', evaluated by a fresh process."""
    from custom_envs import Countdown

    cfg = apply_overrides(MappoConfig(), {
        "env.num_envs": 4, "collector.frames_per_batch": 40, "collector.total_frames": 80,
        "train.minibatch_size": 20, "train.num_epochs": 1, "model.num_cells": [8], "logger.progress": False,
        "logger.run_dir": str(tmp_path / "run"), "logger.checkpoint_every": 1})
    cfg.env.name = Countdown
    train(cfg)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["env"]["name"]
    assert recorded == "custom_envs:Countdown"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    for args in (["eval", str(tmp_path / "run"), "--episodes", "3"], ["train", "--resume", str(tmp_path / "run"),
                                                                      "--frames", "120"]):
        out = subprocess.run([sys.executable, "-m", "marlkit.pipelines.cli", *args], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["episodes_ended"] == 3


def test_env_defined_in_main_is_named_and_refused_elsewhere(tmp_path):
    code = (
        "import pettingzoo, sys\n"
        "sys.path.insert(0, %r)\n"
        "from custom_envs import Countdown\n"
        "class Notebook(Countdown):\n    pass\n"
        "from marlkit.pipelines.config import apply_overrides\n"
        "from marlkit.pipelines.mappo import MappoConfig, train\n"
        "cfg = apply_overrides(MappoConfig(), {'env.num_envs': 2, 'collector.frames_per_batch': 20,"
        " 'collector.total_frames': 20, 'train.minibatch_size': 10, 'model.num_cells': [8],"
        " 'logger.progress': False, 'logger.run_dir': %r})\n"
        "cfg.env.name = Notebook\n"
        "train(cfg)\n"
    ) % (str(TESTS), str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval`, `render` and `--resume` will not find it" in out.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["env"]["name"] == "__main__:Notebook"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", str(tmp_path / "run")])
    assert exit_info.value.code == 2


def test_removed_and_unknown_envs_are_refused_before_building(cli_rejects):
    cli_rejects(["train", "mappo", "--env", "pettingzoo/sisl/waterworld_v4"],
                       "waterworld was removed upstream.*pursuit_v5")
    cli_rejects(["train", "mappo", "--env", "gym/NoSuchEnv-v0"], "unknown Gymnasium env id")
    cli_rejects(["train", "mappo", "--env", "no_such_module:Env"], "cannot be imported")


MARL_EVAL = ["--env", "matrix/two_step", "env.num_envs=4", "collector.frames_per_batch=8", "train.minibatch_size=4",
             "model.num_cells=[8]", "logger.progress=false", "logger.eval_every=1", "logger.eval_episodes=3",
             "logger.marl_eval=true", "logger.checkpoint_every=1", "--seed", "2"]


def test_marl_eval_json_has_the_layout_and_the_evaluations_of_metrics_csv(tmp_path, read_metrics):
    run = tmp_path / "run"
    assert cli_main(["train", "mappo", "--frames", "24", "--run-dir", str(run), *MARL_EVAL]) == 0
    data = json.loads((run / "marl_eval.json").read_text())
    assert list(data) == ["matrix"] and list(data["matrix"]) == ["two_step"]
    assert list(data["matrix"]["two_step"]) == ["mappo"] and list(data["matrix"]["two_step"]["mappo"]) == ["seed_2"]
    steps = data["matrix"]["two_step"]["mappo"]["seed_2"]
    assert list(steps) == ["step_0", "step_1", "step_2", "absolute_metrics"]
    rows = read_metrics(run)
    for i, row in enumerate(rows):
        step = steps[f"step_{i}"]
        assert step["step_count"] == int(row["frames"])
        assert len(step["return"]) == 3 and step["return"] == step["agents_return"]
        assert sum(step["return"]) / 3 == pytest.approx(float(row["eval/agents/episode_reward_mean"]), abs=1e-6)
    assert steps["absolute_metrics"]["return"] == steps["step_2"]["return"]


def test_marl_eval_json_of_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli_main(["train", "mappo", "--frames", "32", "--run-dir", str(whole), *MARL_EVAL]) == 0
    assert cli_main(["train", "mappo", "--frames", "16", "--run-dir", str(parts), *MARL_EVAL]) == 0
    assert cli_main(["train", "--resume", str(parts), "--frames", "32"]) == 0
    assert json.loads((whole / "marl_eval.json").read_text()) == json.loads((parts / "marl_eval.json").read_text())


def test_marl_eval_without_evaluations_is_refused(cli_rejects):
    cli_rejects(["train", "mappo", "logger.marl_eval=true"], "logger.marl_eval=true records the evaluations")


PARALLEL = ["--preset", "pursuit-super", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3", "env.n_evaders=2",
            "env.num_envs=4", "env.max_steps=15", "collector.frames_per_batch=40", "model.num_cells=[16]",
            "replay.warmup_frames=0", "train.optimiser_steps=4", "sharing.mode=quantile", "logger.progress=false",
            "logger.eval_every=1", "logger.eval_episodes=3", "logger.marl_eval=true", "logger.checkpoint_every=4",
            "--seed", "3", "--frames", "320"]


def _checkpoint_part(path: Path, key: str) -> Any:
    return torch.load(path, weights_only=True)[key]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_parallel_evaluation_scores_and_keeps_what_in_process_does(tmp_path, read_metrics):
    here, there = tmp_path / "here", tmp_path / "there"
    assert cli_main(["train", "iql", "--run-dir", str(here), *PARALLEL]) == 0
    assert cli_main(["train", "iql", "--run-dir", str(there), *PARALLEL, "logger.eval_parallel=true"]) == 0
    timing = ("time_s", "frames_per_s", "timers/", "system/")
    rows = [[{k: v for k, v in row.items() if not k.startswith(timing)} for row in read_metrics(run)]
            for run in (here, there)]
    assert [row["iteration"] for row in rows[1]] == [str(i) for i in range(8)]  # every row, in order
    assert all(row["eval/pursuer/episode_reward_mean"] for row in rows[1])
    assert rows[0] == rows[1]
    assert json.loads((here / "marl_eval.json").read_text()) == json.loads((there / "marl_eval.json").read_text())
    # the best evaluation came back while training went on (not at a checkpoint, where the run waits for it):
    # best.pt holds the evaluated iteration's networks, optimisers and counters, as in-process
    best_iteration = _checkpoint_part(here / "checkpoints" / "best.pt", "iteration")
    assert best_iteration not in (3, 7)
    for key in ("iteration", "frames", "optimiser_steps", "best_eval", "losses", "optimisers", "target_updaters"):
        assert _same(_checkpoint_part(here / "checkpoints" / "best.pt", key),
                     _checkpoint_part(there / "checkpoints" / "best.pt", key)), key
    for key in ("losses", "optimisers", "best_eval", "replay"):
        assert _same(_checkpoint_part(here / "checkpoints" / "last.pt", key),
                     _checkpoint_part(there / "checkpoints" / "last.pt", key)), key
    final = json.loads((there / "summary.json").read_text())["final_metrics"]
    assert final["eval/pursuer/episode_reward_mean"] == float(rows[0][-1]["eval/pursuer/episode_reward_mean"])


def test_a_dead_evaluation_worker_is_reported_in_one_line(tmp_path):
    from marlkit.pipelines import make_config
    from marlkit.pipelines.evaluate import EvaluationFailed, Evaluator

    cfg = make_config("mappo", overrides={"env.name": "matrix/two_step", "logger.eval_every": 1,
                                          "logger.eval_parallel": True, "logger.eval_episodes": 2})
    policy = torch.nn.Linear(1, 1)  # the worker only copies it until asked to evaluate
    evaluator = Evaluator(cfg, tmp_path, policy=policy)
    process = evaluator.worker.process
    try:
        process.kill()
        process.join()
        with pytest.raises(EvaluationFailed, match=r"evaluation worker died \(exit code -9\).*eval_parallel=false"):
            evaluator.after(0, policy, final=False)
            evaluator.finished(wait=True)
    finally:
        evaluator.close()
    assert evaluator.worker is None and not process.is_alive()


def test_a_worker_dying_mid_run_stops_it_in_one_line_keeping_every_row(tmp_path, monkeypatch, capsys, read_metrics):
    from marlkit.pipelines.cli import main as cli_main
    from marlkit.pipelines.evaluate import EvaluationWorker

    result = EvaluationWorker.result

    def dies_during_the_second(self, wait):  # the evaluation of iteration 1 is out and its row waits for it
        if self.pending == 1 and wait:
            self.process.kill()
            self.process.join()
        return result(self, wait)

    monkeypatch.setattr(EvaluationWorker, "result", dies_during_the_second)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "mappo", "--env", "gridworld", "--frames", "240", "--run-dir", str(run), "env.num_envs=4",
                  "collector.frames_per_batch=40", "train.minibatch_size=20", "model.num_cells=[8]",
                  "logger.progress=false", "logger.eval_every=1", "logger.eval_parallel=true",
                  "logger.eval_episodes=4", "logger.checkpoint_every=1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("marlkit train: error: the evaluation worker died (exit code -9) while evaluating "
                             "iteration 1") and f"marlkit train --resume {run}" in err[0], err
    rows = read_metrics(run)
    assert [int(r["iteration"]) for r in rows] == [0, 1]  # the row waiting for the lost evaluation is kept
    assert rows[0]["eval/agents/episode_reward_mean"] != "" and rows[1]["eval/agents/episode_reward_mean"] == ""


def test_a_policy_that_cannot_go_to_the_worker_is_refused_in_one_line(tmp_path):
    from marlkit.pipelines import make_config
    from marlkit.pipelines.evaluate import Evaluator

    cfg = make_config("mappo", overrides={"env.name": "matrix/two_step", "logger.eval_every": 1,
                                          "logger.eval_parallel": True, "logger.eval_episodes": 2})
    policy = torch.nn.Linear(1, 1)
    policy.hook = lambda x: x  # a local function does not pickle
    with pytest.raises(ValueError, match=r"could not hand the policy and env to a worker process .*"
                                         r"set logger.eval_parallel=false$"):
        Evaluator(cfg, tmp_path, policy=policy)
