"""MAPPO / IPPO pipeline: tiny in-process runs on every env family, the CLI, determinism, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.config import apply_overrides, load_preset
from marlkit.pipelines.mappo import MappoConfig, train, checked_iterations

REQUIRED_COLUMNS = {"iteration", "frames", "time_s", "frames_per_s"}


def check_run_dir(run_dir: Path, rows: list[dict[str, str]], groups: list[str]) -> list[dict[str, str]]:
    assert [int(r["iteration"]) for r in rows] == [0, 1]
    columns = set(rows[0])
    assert REQUIRED_COLUMNS <= columns
    for group in groups:
        assert {f"{group}/episode_reward_mean", f"{group}/loss_objective", f"{group}/loss_critic"} <= columns
    assert int(rows[-1]["frames"]) > int(rows[0]["frames"]) > 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["derived"]["groups"].keys() == set(groups)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frames"] == int(rows[-1]["frames"]) and summary["versions"]["torchrl"]
    return rows


CASES = [
    ("vmas/navigation", dict(**{"env.n_agents": 2, "env.max_steps": 10}), ["agents"]),
    ("vmas/balance", dict(**{"env.n_agents": 2, "env.continuous_actions": False, "env.max_steps": 10}), ["agents"]),
    ("vmas/simple_tag", dict(**{"env.max_steps": 10}), ["adversary", "agent"]),
    ("pettingzoo/mpe2/simple_spread_v3", dict(**{"env.N": 2, "env.max_steps": 10}), ["agent"]),
    ("pettingzoo/mpe2/simple_tag_v3", dict(**{"env.max_steps": 10, "env.num_obstacles": 1}), ["adversary", "agent"]),
    ("pettingzoo/sisl/pursuit_v5", dict(**{"env.x_size": 7, "env.y_size": 7, "env.n_pursuers": 2, "env.n_evaders": 2,
                                           "env.max_steps": 10}), ["pursuer"]),
    ("pettingzoo/butterfly/knights_archers_zombies_v11", dict(**{"env.max_steps": 20}), ["archer", "knight"]),
    ("gridworld", dict(**{"env.grid_size": 4, "env.max_steps": 10}), ["agents"]),
    ("matrix/climbing", {}, ["agents"]),
    ("gym/CartPole-v1", {}, ["agents"]),
]


@pytest.mark.parametrize("env,overrides,groups", CASES, ids=[c[0] for c in CASES])
def test_train_tiny_every_family(env, overrides, groups, tmp_run_dir, tiny_config, read_metrics):
    result = train(tiny_config("mappo", env, tmp_run_dir, **overrides))
    rows = check_run_dir(tmp_run_dir, read_metrics(tmp_run_dir), groups)
    assert result.frames == 200 and result.run_dir == tmp_run_dir
    for group in groups:
        assert f"{group}/loss_objective" in result.metrics
        assert rows[-1][f"{group}/loss_critic"] != ""


def test_train_pixels_pistonball(tmp_run_dir, tiny_config, read_metrics):
    cfg = tiny_config("mappo", "pettingzoo/butterfly/pistonball_v6", tmp_run_dir, num_envs=2, frames_per_batch=20,
               **{"env.n_pistons": 2, "env.max_steps": 5})
    train(cfg)
    check_run_dir(tmp_run_dir, read_metrics(tmp_run_dir), ["piston"])


def test_ippo_uses_local_critic(tmp_run_dir, tiny_config):
    cfg = tiny_config("ippo", "vmas/navigation", tmp_run_dir, **{"env.n_agents": 2})
    train(cfg)
    config = yaml.safe_load((tmp_run_dir / "config.yaml").read_text())
    assert config["algorithm"] == "ippo" and config["derived"]["centralised_critic"] is False
    assert config["env"]["max_steps"] == 100  # the VMAS default is recorded, not left null


def test_same_seed_same_rewards(tmp_path, tiny_config, read_metrics):
    def rewards(run_dir):
        train(tiny_config("mappo", "vmas/navigation", run_dir, **{"env.n_agents": 2, "env.max_steps": 10, "seed": 3}))
        return [{k: v for k, v in row.items() if "reward" in k or "loss" in k} for row in read_metrics(run_dir)]

    first, second = rewards(tmp_path / "a"), rewards(tmp_path / "b")
    assert first == second and first[0]["agents/episode_reward_mean"] != ""


def test_cli_help_lists_algorithms_presets_and_fields():
    out = subprocess.run([sys.executable, "-m", "marlkit.pipelines.cli", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for text in ("mappo", "ippo", "navigation-matched", "train.minibatch_size", "Frames per minibatch",
                 "env.num_envs", "loss.gamma", "Discount factor", "model.share_params"):
        assert text in out, text


def test_cli_tiny_run_writes_complete_run_dir(tmp_run_dir, read_metrics):
    code = cli_main([
        "train", "ippo", "--env", "gridworld", "--frames", "80", "--seed", "1", "--run-dir", str(tmp_run_dir),
        "env.num_envs=4", "collector.frames_per_batch=40", "train.minibatch_size=20", "train.num_epochs=1",
        "model.num_cells=[8]", "env.mode=competitive", "env.max_steps=10", "logger.progress=false",
    ])
    assert code == 0
    check_run_dir(tmp_run_dir, read_metrics(tmp_run_dir), ["agents"])
    config = yaml.safe_load((tmp_run_dir / "config.yaml").read_text())
    assert config["env"]["kwargs"] == {"mode": "competitive"} and config["seed"] == 1
    assert config["collector"]["total_frames"] == 80


def test_pipeline_script_runs_with_same_arguments(tmp_run_dir, read_metrics):
    script = Path(__file__).resolve().parents[1] / "pipelines" / "mappo.py"
    out = subprocess.run([
        sys.executable, str(script), "--env", "matrix/coordination", "--frames", "40", "--run-dir", str(tmp_run_dir),
        "env.num_envs=4", "collector.frames_per_batch=20", "train.minibatch_size=10", "model.num_cells=[8]",
        "logger.progress=false",
    ], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run directory" in out.stdout
    assert len(read_metrics(tmp_run_dir)) == 2


def test_navigation_matched_preset_matches_anchor_config():
    cfg = MappoConfig()
    apply_overrides(cfg, load_preset("navigation-matched"))
    assert (cfg.env.name, cfg.env.num_envs, cfg.env.max_steps, cfg.env.kwargs) == (
        "vmas/navigation", 60, 100, {"n_agents": 3, "shared_rew": False})
    assert (cfg.collector.frames_per_batch, cfg.collector.total_frames) == (6000, 120_000)
    assert (cfg.train.num_epochs, cfg.train.minibatch_size, cfg.train.lr, cfg.train.max_grad_norm) == (10, 400, 3e-4, 5.0)
    assert (cfg.loss.gamma, cfg.loss.lmbda, cfg.loss.clip_epsilon, cfg.loss.entropy_coef) == (0.99, 0.9, 0.2, 0.0)
    assert cfg.model.num_cells == [256, 256] and cfg.model.activation == "tanh" and cfg.centralised_critic
    assert checked_iterations(cfg) == 20


@pytest.mark.parametrize("args,match", [
    (["train", "qmix9"], "unknown algorithm 'qmix9'; accepted: mappo, ippo"),
    (["train", "--env", "vmas/nowhere"], "unknown VMAS scenario 'nowhere'"),
    (["train", "--env", "atari/pong"], "unknown environment family 'atari'"),
    (["train", "train.learning_rate=1"], "section 'train' has no field 'learning_rate'; accepted: lr"),
    (["train", "optim.lr=1"], "the config has no field 'optim'"),
    (["train", "train.minibatch_size=7000"], "minibatch_size=7000 must be between 1 and collector.frames_per_batch=6000"),
    (["train", "--frames", "10000"], "--frames 10000 is not a multiple of collector.frames_per_batch=6000"),
    (["train", "collector.frames_per_batch=6001"], "not divisible by env.num_envs=60"),
    (["train", "env.n_agents=0"], "env without agents cannot be trained"),
    (["train", "train.lr=abc"], "train.lr expects a number, got 'abc'"),
    (["train", "--preset", "nope"], "unknown preset 'nope'; available: .*navigation-matched"),
    (["train", "mappo", "--preset", "pursuit-super"],
     "preset 'pursuit-super' is written for iql and does not fit mappo .*model.image_encoder.*train iql with it"),
    (["train", "--device", "tpu"], "device='tpu' is not a valid torch device"),
    (["train", "model.activation=swish"], "activation='swish' is not supported"),
])
def test_bad_input_fails_before_building(args, match, cli_rejects):
    cli_rejects(args, match)


def test_a_preset_alone_trains_its_own_algorithm():
    from marlkit.pipelines.cli import _train_parser, build_config

    cfg = build_config(_train_parser().parse_args(["--preset", "pursuit-super"]))
    assert (cfg.algorithm, cfg.env.name, cfg.model.image_encoder) == ("iql", "pursuit", "flatten")
    assert build_config(_train_parser().parse_args(["--preset", "navigation-matched"])).algorithm == "mappo"


def test_existing_run_dir_is_never_overwritten(tmp_run_dir, tiny_config):
    train(tiny_config("mappo", "matrix/coordination", tmp_run_dir, frames_per_batch=20))
    before = (tmp_run_dir / "metrics.csv").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config("mappo", "matrix/coordination", tmp_run_dir, frames_per_batch=20))
    assert (tmp_run_dir / "metrics.csv").read_text() == before


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from marlkit.pipelines.memory import keep_freed_memory

    monkeypatch.setenv("MARLKIT_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MARLKIT_KEEP_FREED_MEMORY")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc


def test_pipelines_mask_dead_agents_where_the_env_says_who_is_alive():
    from marlkit.envs import make_env
    from marlkit.pipelines import mappo

    env = make_env("pettingzoo/sisl/pursuit_v5", x_size=6, y_size=6, n_pursuers=2, n_evaders=2, n_catch=1)
    agent = mappo.build_group(env, "pursuer", mappo.MappoConfig(), torch.device("cpu"))
    assert agent.loss.loss_mask_key == ("pursuer", "mask")
    vmas = make_env("vmas/navigation", n_agents=2)
    assert mappo.build_group(vmas, "agents", mappo.MappoConfig(), torch.device("cpu")).loss.loss_mask_key == "auto"


class _RecordingOptimiser:
    """Stands in for Adam: keeps the actor's and the critic's gradient norms it was asked to step with."""

    def __init__(self, loss):
        self.loss, self.norms = loss, None

    def step(self):
        from marlkit.pipelines.learners import parameter_set
        from marlkit.pipelines.mappo import PPO_NETWORKS

        self.norms = [float(torch.nn.utils.get_total_norm([p.grad for p in parameter_set(self.loss, name)]))
                      for name in PPO_NETWORKS]

    def zero_grad(self, set_to_none=True):
        self.loss.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("per_network", [False, True])
def test_clip_per_network_clips_actor_and_critic_apart(per_network):
    from marlkit.envs import make_env
    from marlkit.pipelines.learners import gradient_step
    from marlkit.pipelines.mappo import build_group

    torch.manual_seed(0)
    env = make_env("vmas/balance", num_envs=4, seed=0, n_agents=2, max_steps=5)
    cfg = MappoConfig()
    cfg.model.num_cells = [16]
    learner = build_group(env, "agents", cfg, torch.device("cpu"))
    with torch.no_grad():
        batch = env.rollout(5, learner.policy, break_when_any_done=False)
        learner.loss.value_estimator(batch, params=learner.loss.critic_network_params,
                                     target_params=learner.loss.target_critic_network_params)
    batch = batch.reshape(-1)

    def loss_out():  # a critic loss a million times larger, as with large unscaled returns
        out = learner.loss(batch)
        out["loss_critic"] = out["loss_critic"] * 1e6
        return out

    loss_out()["loss_objective"].backward()
    actor_alone = float(torch.nn.utils.get_total_norm([p.grad for p in learner.loss.actor_network_params.values(True, True)]))
    learner.loss.zero_grad(set_to_none=True)
    assert actor_alone > 0
    optimiser = _RecordingOptimiser(learner.loss)
    gradient_step(learner, optimiser, loss_out(), max_grad_norm=5.0, per_network=per_network)
    actor, critic = optimiser.norms
    if per_network:  # each network clipped to 5 on its own: the actor keeps its own gradient
        assert actor == pytest.approx(min(actor_alone, 5.0), rel=1e-4) and critic == pytest.approx(5.0, rel=1e-4)
    else:  # one norm over both: the critic's size shrinks the actor's step to almost nothing
        assert (actor**2 + critic**2) ** 0.5 == pytest.approx(5.0, rel=1e-4) and actor < 1e-3 * actor_alone
