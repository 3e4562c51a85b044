"""collector.backend: multiprocess (TorchRL's multi-process collectors) and ray (TorchRL's RayCollector)
beside the in-process sync collector: seeding, weights reaching the workers, resume, dead workers and
the bad inputs. Ray tests use a local instance of 2 CPUs (the [distributed] extra)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from tensordict.nn import TensorDictSequential
from torchrl._utils import seed_generator

from marlkit.pipelines import make_config, pipeline_for
from marlkit.pipelines.checkpoint import load_checkpoint
from marlkit.pipelines.collectors import make_collector, worker_seeds
from marlkit.pipelines.environment import build_env, resolve_env_config
from marlkit.pipelines.runs import config_from_dict, read_config

requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason='needs the [distributed] extra (pip install -e ".[distributed]")')
BACKENDS = ["multiprocess", pytest.param("ray", marks=requires_ray)]
# What differs between two runs of one config besides what was learnt.
TIMING = ("time_s", "frames_per_s", "timers/collection_s", "timers/training_s")


@pytest.mark.parametrize("args, match", [
    (["collector.backend=threads"], r"collector.backend='threads' is not supported; accepted: sync, multiprocess, ray"),
    (["collector=multiprocess", "collector.workers=0"], r"collector.workers must be >= 1, got 0"),
    (["collector=multiprocess", "env.num_envs=4", "collector.workers=3"],
     r"collector.workers=3 does not divide env.num_envs=4 .*use one of \[1, 2, 4\]"),
    (["collector.workers=2"], r"need collector.backend=multiprocess or ray"),
    (["collector.sync=false"], r"need collector.backend=multiprocess or ray"),
    (["collector=multiprocess", "collector.workers=2", "env.num_envs=4", "collector.sync=false"],
     r"PPO needs collector.sync=true"),
    (["collector=multiprocess", "collector.ray_address=auto"], r"collector.ray_address is for collector.backend=ray"),
    (["collector=multiprocess", "--device", "cuda"], r"steps its env copies on CPU workers; use device=cpu"),
    pytest.param(["collector=ray", "collector.ray_address=127.0.0.1:9"], r"'127.0.0.1:9': no Ray head answers there",
                 marks=requires_ray),
    pytest.param(["collector=ray", "collector.ray_address=nowhere"], r"must be auto or host:port", marks=requires_ray),
])
def test_bad_collector_settings_are_refused_in_one_line(cli_rejects, args, match):
    cli_rejects(["train", "mappo", "--env", "gridworld", *args], match)


def test_ray_without_the_package_names_the_extra(cli_rejects, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    cli_rejects(["train", "iql", "--env", "gridworld", "collector=ray"],
                r"collector.backend=ray needs the 'ray' package.*marlkit\[distributed\]")


def test_worker_seeds_follow_the_sync_chain_and_change_on_resume():
    chain = [7]
    for _ in range(11):
        chain.append(seed_generator(chain[-1]))
    assert worker_seeds(7, 3, 4) == [chain[0], chain[4], chain[8]]  # the seeds of copies 0, 4 and 8 in one process
    resumed = worker_seeds(7, 3, 4, start_iteration=5)
    assert resumed == worker_seeds(7, 3, 4, start_iteration=5) and not set(resumed) & set(chain)


def _policy_and_env(tmp_path, env_name, backend, workers, num_envs=4, **overrides):
    cfg = make_config("iql", overrides={
        "env.name": env_name, "env.num_envs": num_envs, "collector.frames_per_batch": 8 * num_envs,
        "collector.backend": backend, "collector.workers": workers, "model.num_cells": [8],
        "exploration.eps_init": 0.0, "exploration.eps_end": 0.0, "logger.run_dir": str(tmp_path), **overrides})
    cfg.env = resolve_env_config(cfg.env)
    env = build_env(cfg.env, device="cpu", seed=cfg.seed)
    learners = pipeline_for("iql").build_learners(env, cfg, torch.device("cpu"), tmp_path / "buffers")
    policy = TensorDictSequential(*(learner.policy for learner in learners.values()))
    return cfg, env, policy


def test_worker_copies_are_seeded_like_the_sync_copies(tmp_path):
    """Each copy starts from the same seeded reset whichever process steps it: the first observation of
    copy i is the same with sync and with 2 workers, and the copies differ from each other."""
    first = {}
    for backend, workers in (("sync", 1), ("multiprocess", 2)):
        cfg, env, policy = _policy_and_env(tmp_path / backend, "pettingzoo/mpe2/simple_spread_v3", backend, workers)
        collector = make_collector(env, policy, cfg, device=torch.device("cpu"))
        batch = next(iter(collector))
        collector.shutdown()
        env.close(raise_if_closed=False)
        assert batch.batch_size == torch.Size([4, 8])
        first[backend] = batch["agent", "observation"][:, 0]
    assert torch.equal(first["sync"], first["multiprocess"])
    assert not torch.equal(first["multiprocess"][0], first["multiprocess"][2])  # workers 0 and 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_act_with_the_newest_weights(tmp_path, backend):
    """Greedy Q-networks whose last bias picks the action: after update_policy_weights_, every worker acts
    with the new bias."""
    cfg, env, policy = _policy_and_env(tmp_path, "matrix/climbing", backend, 2)
    last_bias = [p for name, p in policy.named_parameters() if name.endswith("bias")][-1]
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        last_bias[..., 1] = 1.0
    collector = make_collector(env, policy, cfg, device=torch.device("cpu"))
    try:
        batches = iter(collector)
        for wanted in (1, 2, 0):
            with torch.no_grad():
                last_bias.zero_()
                last_bias[..., wanted] = 1.0
            collector.update_policy_weights_()
            actions = next(batches)["agents", "action"]
            chosen = actions.argmax(-1) if actions.shape[-1] == 3 else actions
            assert (chosen == wanted).all(), (wanted, chosen.unique())
    finally:
        collector.shutdown()
        env.close(raise_if_closed=False)


def _tiny_run(tiny_config, run_dir, backend, iterations=3, **overrides):
    return tiny_config("iql", "pettingzoo/mpe2/simple_spread_v3", run_dir, frames_per_batch=40, iterations=iterations,
                       **{"collector.backend": backend, "collector.workers": 2, "env.max_steps": 10,
                          "logger.checkpoint_every": 1, "replay.warmup_frames": 40, **overrides})


def test_multiprocess_runs_are_reproducible(tiny_config, read_metrics, tmp_path):
    train = pipeline_for("iql").train
    rows = []
    for name in ("a", "b"):
        train(_tiny_run(tiny_config, tmp_path / name, "multiprocess"))
        rows.append([{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(tmp_path / name)])
    assert len(rows[0]) == 3 and rows[0] == rows[1]
    assert read_config(tmp_path / "a")["collector"]["backend"] == "multiprocess"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_starts_fresh_episodes_and_finishes(tiny_config, read_metrics, tmp_path, backend):
    """multiprocess and ray record that their episodes in flight were not saved; resume warns, starts
    fresh episodes and completes the budget with the saved weights and replay."""
    train = pipeline_for("iql").train
    run_dir = tmp_path / "run"
    train(_tiny_run(tiny_config, run_dir, backend, iterations=2))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", read_config(run_dir))
    assert "worker processes" in state["simulator"]["unsaved"] and state["collector"] == {}
    cfg = config_from_dict(read_config(run_dir))  # as marlkit train --resume RUN_DIR --frames 160 does
    cfg.collector.total_frames = 160
    with pytest.warns(UserWarning, match="resumed episodes restart from a reset: the env copies step in worker"):
        result = train(cfg, resume=True)
    assert result.frames == 160
    assert [int(row["iteration"]) for row in read_metrics(run_dir)] == [0, 1, 2, 3]


@pytest.mark.parametrize("sync", [True, False])
def test_off_policy_trains_with_sync_and_async_workers(tiny_config, read_metrics, tmp_path, sync):
    pipeline_for("iql").train(_tiny_run(tiny_config, tmp_path, "multiprocess", **{"collector.sync": sync}))
    rows = read_metrics(tmp_path)
    assert [int(row["frames"]) for row in rows] == [40, 80, 120]  # async: each iteration is one worker's batch


def test_mappo_trains_on_multiprocess_workers(tiny_gridworld_mappo, read_metrics, tmp_path):
    tiny_gridworld_mappo(tmp_path, **{"collector.backend": "multiprocess", "collector.workers": 2})
    rows = read_metrics(tmp_path)
    assert len(rows) == 3 and all(float(row["agents/loss_objective"]) == float(row["agents/loss_objective"])
                                  for row in rows)


@requires_ray
def test_mappo_trains_on_ray_workers(tiny_gridworld_mappo, read_metrics, tmp_path):
    result = tiny_gridworld_mappo(tmp_path, **{"collector.backend": "ray", "collector.workers": 2})
    assert result.frames == 120 and len(read_metrics(tmp_path)) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dead_worker_stops_the_run_in_one_line_with_its_checkpoint_intact(tmp_path, capsys, monkeypatch, backend):
    """A worker whose simulator kills its process in the second iteration: exit 1, one line naming the
    failure and the checkpoint to resume from; that checkpoint is the first iteration's and loads."""
    from marlkit.pipelines.cli import main

    # Ray workers import the env module themselves: from PYTHONPATH, as a user's would have to be.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "iql", "--env", "custom_envs:DiesAfter", "--frames", "120", "--run-dir", str(run_dir),
              "env.num_envs=4", "env.die_after=15", "collector.frames_per_batch=40", f"collector={backend}",
              "collector.workers=2", "model.num_cells=[8]", "replay.batch_size=8", "replay.warmup_frames=40",
              "logger.progress=false", "logger.checkpoint_every=1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a collector worker died" in err[0] and "--resume" in err[0], err
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", read_config(run_dir))
    assert state["iteration"] == 0


def test_a_dead_worker_keeps_the_rows_waiting_for_a_parallel_evaluation(tmp_path, capsys, read_metrics):
    from marlkit.pipelines.cli import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "iql", "--env", "custom_envs:DiesAfter", "--frames", "120", "--run-dir", str(run_dir),
              "env.num_envs=4", "env.die_after=15", "collector.frames_per_batch=40", "collector=multiprocess",
              "collector.workers=2", "model.num_cells=[8]", "replay.batch_size=8", "replay.warmup_frames=40",
              "logger.progress=false", "logger.checkpoint_every=1000", "logger.eval_every=1",
              "logger.eval_parallel=true", "logger.eval_episodes=2"])
    assert exit_info.value.code == 1 and "a collector worker died" in capsys.readouterr().err
    assert [row["iteration"] for row in read_metrics(run_dir)] == ["0"]


@requires_ray
def test_ray_workers_that_cannot_import_the_env_fail_in_one_line(tmp_path, capsys, monkeypatch):
    from marlkit.pipelines.cli import main

    monkeypatch.delenv("PYTHONPATH", raising=False)  # custom_envs is on this process's path only
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "iql", "--env", "custom_envs:Countdown", "--frames", "40", "--run-dir", str(tmp_path / "run"),
              "env.num_envs=2", "collector.frames_per_batch=20", "collector=ray", "collector.workers=2",
              "logger.progress=false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Ray workers must import 'custom_envs:Countdown'" in err[0], err


def test_everything_but_ray_works_without_ray(tmp_path):
    """With Ray absent (``import ray`` fails), marlkit imports, trains with sync and multiprocess
    collectors and refuses collector=ray naming the extra: marlkit imports Ray only when it is chosen."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an environment without the package gives
        "import importlib.util; real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'ray' else real(name, *a)\n"
        "from marlkit.pipelines.cli import main\n"
        "for backend in ('sync', 'multiprocess'):\n"
        "    main(['train', 'iql', '--env', 'gridworld', '--frames', '40', '--run-dir', %r + backend, 'env.num_envs=2',\n"
        "          'collector.frames_per_batch=20', 'collector.backend=' + backend, 'collector.workers=' + str(1 + (backend != 'sync')),\n"
        "          'logger.progress=false', 'replay.warmup_frames=20', 'model.num_cells=[8]'])\n"
        "main(['train', 'iql', '--env', 'gridworld', 'collector=ray'])\n"
    ) % str(tmp_path / "run-")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and "marlkit[distributed]" in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert (tmp_path / "run-sync" / "summary.json").is_file() and (tmp_path / "run-multiprocess" / "summary.json").is_file()
