"""Nothing silent: a diverging run stops with a message and keeps its last good checkpoint; inputs that
used to be accepted silently are refused in one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marlkit.pipelines import ALGORITHMS, make_config, pipeline_for
from marlkit.pipelines.config import available_presets, load_preset
from marlkit.pipelines.learners import TrainingDiverged
from marlkit.pipelines.mappo import train

TESTS = Path(__file__).parent


def test_nan_reward_stops_training_and_keeps_the_last_good_checkpoint(tmp_run_dir, tiny_config, read_metrics):
    from custom_envs import NanReward

    # 4 copies x 10 steps per iteration: the rewards turn NaN in the third iteration's batch.
    cfg = tiny_config("mappo", "custom_envs:Countdown", tmp_run_dir, frames_per_batch=40, iterations=5,
                      **{"logger.checkpoint_every": 1})
    cfg.env.name = NanReward
    with pytest.raises(TrainingDiverged, match=r"iteration 2, group runner: loss terms not finite: loss_\w+"):
        train(cfg)
    state = torch.load(tmp_run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 1  # the last iteration that finished with finite values
    assert all(torch.isfinite(v).all() for v in state["losses"]["runner"].values() if v.is_floating_point())
    assert [r["iteration"] for r in read_metrics(tmp_run_dir)] == ["0", "1"]


def test_diverging_run_is_one_line_from_the_cli(tmp_path):
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from marlkit.pipelines.cli import main\n"
        "sys.exit(main(['train', 'mappo', '--env', 'custom_envs:NanReward', '--frames', '120', '--run-dir', %r,"
        " 'env.num_envs=4', 'collector.frames_per_batch=40', 'train.minibatch_size=20', 'logger.progress=false',"
        " 'logger.checkpoint_every=1', 'model.num_cells=[8]']))\n"
    ) % (str(TESTS), str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("marlkit train: training stopped: iteration 2, group runner:") and "last good checkpoint" in last
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,match", [
    (["train", "mappo", "train.lr=1e-3", "train.lr=2e-3"], r"train.lr is set twice \('1e-3' and '2e-3'\)"),
    (["train", "mappo", "train.lr=inf"], r"train.lr \(inf\) .* must be finite and > 0"),
    (["train", "qmix", "train.lr=nan"], r"train.lr \(nan\) .* finite and > 0"),
    (["train", "mappo", "--seeds", "0,0"], "--seeds must list distinct seeds >= 0, got '0,0'"),
    (["train", "mappo", "--seeds", "0,-1"], "--seeds must list distinct seeds >= 0, got '0,-1'"),
    (["train", "mappo", "--seed", "-1"], "seed must be >= 0 .* got -1"),
    (["train", "mappo", "--env", "gridworld", "loss.entropy_coef=-0.01"], r"entropy_coef \(-0.01\) .* must be finite and >= 0"),
    (["train", "iql", "--env", "gridworld", "replay.alpha=-1"], r"replay.alpha must be >= 0 .* got -1.0"),
    (["render", "--env", "gridworld", "--fps", "0"], "--fps must be a positive number of frames per second, got 0"),
    (["render", "--env", "gridworld", "--fps", "-5"], "got -5"),
])
def test_silently_accepted_inputs_are_refused(args, match, cli_rejects):
    cli_rejects(args, match)


def test_plot_refuses_runs_of_different_configs(tmp_path, tiny_config, capsys):
    from marlkit.pipelines.cli import main as cli_main

    for name, seed, lr in (("a", 0, 3e-4), ("b", 1, 3e-4), ("c", 0, 1e-3)):
        train(tiny_config("mappo", "matrix/coordination", tmp_path / name, frames_per_batch=20,
                          **{"seed": seed, "train.lr": lr}))
    assert cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab.png")]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not another seed of" in err and "they differ in train" in err
    assert not (tmp_path / "ac.png").exists()


def _signalled_run(run: Path, extra: list[str], signums: list[int], group: bool,
                   read_metrics) -> subprocess.Popen:
    """``marlkit train mappo`` on the grid world into ``run``; once it has written 2 rows, ``signums`` go to
    it (``group``: to its whole process group, workers included), 10 ms apart. The ended process (its
    ``stderr`` read into ``process.err``); a run that hangs is killed with its group, not left behind."""
    args = [sys.executable, "-m", "marlkit.pipelines.cli", "train", "mappo", "--env", "gridworld", "--frames", "400000",
            "--run-dir", str(run), "env.num_envs=4", "collector.frames_per_batch=40", "train.minibatch_size=20",
            "model.num_cells=[8]", "logger.progress=false", "logger.checkpoint_every=1000", *extra]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run.parent,
                               start_new_session=group)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.csv").is_file() and len(read_metrics(run)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        for signum in signums:
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            time.sleep(0.01)
        _, process.err = process.communicate(timeout=120)
    finally:
        if process.poll() is None and group:
            os.killpg(process.pid, signal.SIGKILL)
        elif process.poll() is None:
            process.kill()
    return process


# A terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the whole process group: the run's worker processes
# (parallel evaluations, TorchRL's multi-process collectors) must outlive it until the run has checkpointed.
@pytest.mark.parametrize("signum,code,group,workers", [
    (signal.SIGINT, 130, False, []),
    (signal.SIGTERM, 143, False, []),
    (signal.SIGINT, 130, True, ["logger.eval_parallel=true", "logger.eval_every=1"]),
    (signal.SIGTERM, 143, True, ["collector.backend=multiprocess", "collector.workers=2"]),
], ids=["SIGINT", "SIGTERM", "SIGINT-group-evaluation-worker", "SIGTERM-group-collector-workers"])
def test_stop_signal_finishes_the_iteration_checkpoints_and_says_how_to_resume(signum, code, group, workers, tmp_path,
                                                                              read_metrics):
    run = tmp_path / "run"
    process = _signalled_run(run, workers, [signum], group, read_metrics)
    err = process.err
    assert process.returncode == code, err[-2000:]
    assert "Traceback" not in err
    last_row = int(read_metrics(run)[-1]["iteration"])
    assert err.strip().splitlines()[-1] == (
        f"marlkit train: stopped by {signal.Signals(signum).name} after iteration {last_row}; checkpoint saved, "
        f"continue with: marlkit train --resume {run}")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == last_row  # nothing done is lost: the stopping iteration was checkpointed


def test_a_second_ctrl_c_stops_at_once_and_ends_the_collector_workers(tmp_path, read_metrics):
    # Python's exit used to wait for the workers forever
    process = _signalled_run(tmp_path / "run", ["collector.backend=multiprocess", "collector.workers=2"],
                             [signal.SIGINT, signal.SIGINT], True, read_metrics)
    assert process.returncode == 130, process.err
    assert process.err.strip().splitlines()[-1].startswith("marlkit train: interrupted; "), process.err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # no worker is left in the run's process group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("worker processes outlived the run")


def test_a_stop_signal_after_the_checkpoint_decision_stops_after_the_next_iteration(tmp_run_dir, tiny_config,
                                                                                   read_metrics, monkeypatch):
    from marlkit.pipelines import session
    from marlkit.pipelines.checkpoint import Checkpointer

    trainings, save = [], Checkpointer.save
    monkeypatch.setattr(session.Training, "catch_stop_signals", lambda self: trainings.append(self))

    def save_then_signal(self, cfg, iteration, final, **kwargs):  # lands once iteration 1 decided not to checkpoint
        save(self, cfg, iteration, final, **kwargs)
        if iteration == 1:
            trainings[0].stop_signal = signal.SIGTERM

    monkeypatch.setattr(Checkpointer, "save", save_then_signal)
    cfg = tiny_config("mappo", "gridworld", tmp_run_dir, frames_per_batch=40, iterations=6,
                      **{"logger.checkpoint_every": 1000})
    with pytest.raises(session.TrainingStopped) as stopped:
        train(cfg)
    assert stopped.value.iteration == 2 and int(read_metrics(tmp_run_dir)[-1]["iteration"]) == 2
    assert torch.load(tmp_run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2


def test_a_ctrl_c_a_library_turns_into_its_own_error_is_still_one_line(tmp_path, monkeypatch, capsys):
    from marlkit.pipelines import mappo
    from marlkit.pipelines.cli import main as cli_main

    def interrupted(cfg, resume=False):  # tensordict's to_module does this when it lands in a MultiAgentMLP
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Converting a tensordict to boolean value is not permitted")

    monkeypatch.setattr(mappo, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "mappo", "--env", "gridworld", "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "marlkit train: interrupted; no checkpoint was written before it: run the same command again"]


def test_a_stopped_seed_names_the_seeds_that_did_not_start(tmp_path, monkeypatch, capsys):
    from marlkit.pipelines import mappo
    from marlkit.pipelines.cli import main as cli_main
    from marlkit.pipelines.session import TrainingStopped

    train_one = mappo.train

    def stops_at_seed_1(cfg, resume=False):
        if cfg.seed == 1:
            raise TrainingStopped(signal.SIGINT, Path(cfg.logger.run_dir), 0)
        return train_one(cfg, resume)

    monkeypatch.setattr(mappo, "train", stops_at_seed_1)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "mappo", "--env", "gridworld", "--seeds", "0-3", "--frames", "40", "--run-dir",
                  str(tmp_path / "run"), "env.num_envs=4", "collector.frames_per_batch=40", "train.minibatch_size=20",
                  "model.num_cells=[8]", "logger.progress=false"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"marlkit train: stopped by SIGINT after iteration 0; checkpoint saved, continue with: marlkit train --resume "
        f"{tmp_path / 'run_seed1'}; seeds 2,3 did not start: after this one, run the same command with --seeds 2,3"]


def test_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "marlkit.pipelines.cli", "train", "mappo", "--env", "gridworld",
                                "--run-dir", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(1.5)  # past the interpreter's start, inside the seconds of torch / torchrl imports
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err == "marlkit: stopped by SIGINT while starting\n", err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env,match", [
    ("custom_envs:NeedsArgument", r"does not work as a PettingZoo ParallelEnv: TypeError: .*missing 1 required"),
    ("custom_envs:StringReward", r"StringReward does not work as a PettingZoo ParallelEnv: \w+"),
])
def test_own_env_that_breaks_the_api_is_one_line(env, match, cli_rejects):
    cli_rejects(["train", "mappo", "--env", env, "env.num_envs=2", "collector.frames_per_batch=20", "--frames", "20",
                 "train.minibatch_size=10"], match)


def test_damaged_run_files_are_one_line(tmp_path, tiny_gridworld_mappo, capsys):
    from marlkit.pipelines.cli import main as cli_main

    run = tmp_path / "run"
    tiny_gridworld_mappo(run)
    (tmp_path / "file").write_text("")
    cases = [
        (["train", "mappo", "--run-dir", str(tmp_path / "file")], "run directory .*file is a file"),
        (["train", "--resume", str(run), "train.lr=0.1"], r"only --frames may change it \(got \['train.lr=0.1'\]\)"),
        (["eval", str(run), "--checkpoint", "/etc/passwd"], "not a marlkit checkpoint, or damaged .* only files marlkit wrote"),
    ]
    for args, match in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(match, err), err
    config = (run / "config.yaml").read_text()
    for text, match in [(config.replace("algorithm: mappo", "algorithm: !!python/object:os.system {}"), "holds a tag"),
                        ("algorithm: [mappo\n", "is not valid YAML"),
                        (config.replace("algorithm: mappo", "algorithm: qmix"), "written by algorithm='mappo'")]:
        (run / "config.yaml").write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["eval", str(run)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and re.search(match, err) and "Traceback" not in err, err


def test_replay_that_would_not_fit_on_disk_is_refused_before_training(tmp_path, monkeypatch, cli_rejects):
    import shutil as shutil_module

    from marlkit.pipelines import replay

    real = shutil_module.disk_usage
    monkeypatch.setattr(replay.shutil, "disk_usage", lambda path: real(path)._replace(free=50 * 2**20))
    cli_rejects(["train", "maddpg", "--env", "vmas/navigation", "env.n_agents=2", "env.num_envs=4",
                 "collector.frames_per_batch=40", "--frames", "80", "replay.buffer_size=1000000"],
                r"the replay buffers need \d+\.\d\d GiB under .*buffers/agents when full, but only 0.05 GiB is free")


def test_full_disk_at_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_run_dir, tiny_gridworld_mappo, monkeypatch):
    import errno

    from marlkit.pipelines import checkpoint

    tiny_gridworld_mappo(tmp_run_dir)
    last = tmp_run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def full(state, file, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.DiskFull, match=r"no space left on .*checkpoints while writing last.pt; the previous"):
        checkpoint.save_checkpoint(last, {"format": 2})
    assert last.read_bytes() == before and not list(last.parent.glob(".*tmp"))


def test_threads_option_is_applied_and_recorded(tmp_path, cli_rejects):
    import json

    from marlkit.pipelines.cli import main as cli_main

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli_main(["train", "mappo", "--env", "gridworld", "--threads", "1", "--run-dir", str(tmp_path / "run"),
                         "--frames", "40", "env.num_envs=4", "collector.frames_per_batch=40",
                         "train.minibatch_size=20", "logger.progress=false"]) == 0
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["torch_threads"] == 1
        assert torch.get_num_threads() == 2  # the run gave torch its count back
    finally:
        torch.set_num_threads(before)
    cli_rejects(["train", "mappo", "--threads", "0"],
                "--threads='0' is not a thread count; accepted: auto or a whole number >= 1")


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_passes_its_own_checks(preset):
    """A preset as shipped (its algorithm, frames and sizes) is a valid config: no user meets a refusal
    of a setting they did not choose."""
    defaults = [name for name, (_, default_preset) in ALGORITHMS.items() if default_preset == preset]
    algorithm = load_preset(preset).get("algorithm") or (defaults or ["maddpg"])[0]  # tag-competitive: maddpg
    cfg = make_config(algorithm, preset)
    assert pipeline_for(cfg.algorithm).checked_iterations(cfg) >= 1
