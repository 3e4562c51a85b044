"""marlkit sweep: a grid of runs as Ray tasks (or one after another), its table and plots, skipping
finished runs and resuming unfinished ones, and its one-line refusals."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import signal

import pytest

from marlkit.pipelines.cli import main
from marlkit.pipelines.sweep import parse_seeds

requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason='needs the [distributed] extra (pip install -e ".[distributed]")')
TINY = ["env.num_envs=4", "collector.frames_per_batch=40", "env.max_steps=10", "model.num_cells=[8]",
        "train.minibatch_size=20", "train.num_epochs=2", "logger.checkpoint_every=1"]


def _sweep(tmp_path, *extra):
    return main(["sweep", "--algorithms", "mappo,ippo", "--envs", "gridworld", "--seeds", "0-1", "--frames", "80",
                 "--sweep-dir", str(tmp_path / "sweep"), *TINY, *extra])


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("mode", [pytest.param([], marks=requires_ray), ["--no-ray"]], ids=["ray", "no-ray"])
def test_sweep_trains_the_grid_then_tabulates_and_plots(tmp_path, capsys, mode):
    assert _sweep(tmp_path, *mode) == 0
    sweep = tmp_path / "sweep"
    for algorithm in ("mappo", "ippo"):
        for seed in (0, 1):
            summary = json.loads((sweep / algorithm / "gridworld" / f"seed{seed}" / "summary.json").read_text())
            assert summary["frames"] == 80 and summary["algorithm"] == algorithm
    rows = _rows(sweep / "sweep.csv")
    assert [(r["algorithm"], r["env"], r["seeds"]) for r in rows] == [("mappo", "gridworld", "2"), ("ippo", "gridworld", "2")]
    assert all(float(r["best_return"]) >= float(r["final_return"]) - float(r["final_ci95"]) - 1e-9 for r in rows)
    assert (sweep / "curves_gridworld.png").stat().st_size > 0
    assert "| mappo | gridworld | 2 |" in (sweep / "sweep.md").read_text()
    assert json.loads((sweep / "sweep.json").read_text())["seeds"] == [0, 1]


def test_sweep_again_skips_finished_runs_and_resumes_unfinished_ones(tmp_path, capsys, read_metrics):
    assert _sweep(tmp_path, "--no-ray") == 0
    sweep = tmp_path / "sweep"
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/gridworld/seed*/metrics.csv")}
    capsys.readouterr()
    assert _sweep(tmp_path, "--no-ray") == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 4 and "finished:" not in out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # A larger budget: every run is unfinished now and continues from its checkpoint (no row lost or repeated).
    main(["sweep", "--algorithms", "mappo,ippo", "--envs", "gridworld", "--seeds", "0-1", "--frames", "120",
          "--sweep-dir", str(sweep), "--no-ray", *TINY])
    rows = read_metrics(sweep / "mappo" / "gridworld" / "seed1")
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2] and int(rows[-1]["frames"]) == 120


@pytest.mark.parametrize("stop", ["signal", "ctrl-c"])
def test_a_stopped_sweep_says_how_to_go_on_in_one_line(tmp_path, capsys, monkeypatch, stop):
    from marlkit.pipelines import sweep
    from marlkit.pipelines.session import TrainingStopped

    def stopped(cfg, resume, threads, spare_core=False):  # the signal reached the run training in this process
        if stop == "signal":
            raise TrainingStopped(signal.SIGTERM, cfg.logger.run_dir, 3)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_one", stopped)
    assert _sweep(tmp_path, "--no-ray") == (143 if stop == "signal" else 130)
    err = capsys.readouterr().err.strip().splitlines()
    first = tmp_path / "sweep" / "mappo" / "gridworld" / "seed0"
    what = f"{first} stopped by SIGTERM after iteration 3 (checkpoint saved)" if stop == "signal" else "interrupted"
    assert err == [f"marlkit sweep: {what}; the same command again resumes its unfinished runs from their "
                   f"checkpoints under {tmp_path / 'sweep'}"]


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path, capsys):
    code = main(["sweep", "--algorithms", "iql", "--envs", "gridworld,custom_envs:NeedsArgument", "--frames", "80",
                 "--sweep-dir", str(tmp_path / "sweep"), "--no-ray", "env.num_envs=4",
                 "collector.frames_per_batch=40", "model.num_cells=[8]", "replay.batch_size=8",
                 "replay.warmup_frames=40", "logger.checkpoint_every=1"])
    assert code == 1
    captured = capsys.readouterr()
    assert "failed: " in captured.out and "NeedsArgument" in captured.out
    assert "1 runs failed" in captured.err
    assert [r["env"] for r in _rows(tmp_path / "sweep" / "sweep.csv")] == ["gridworld"]


@pytest.mark.parametrize("args, match", [
    (["--algorithms", "nope", "--envs", "gridworld"], r"unknown algorithm 'nope'"),
    (["--algorithms", "mappo", "--envs", "nowhere/x"], r"mappo on nowhere/x: unknown environment family"),
    (["--algorithms", "mappo", "--envs", "gridworld", "--seeds", "0,0"], r"seeds must list distinct seeds >= 0"),
    (["--algorithms", "mappo", "--envs", "gridworld", "--max-concurrent", "0"], r"--max-concurrent must be >= 1"),
    (["--algorithms", "mappo", "--envs", "gridworld", "train.minibatch_size=10000"],
     r"mappo on gridworld: train.minibatch_size=10000 must be between 1 and"),
    pytest.param(["--algorithms", "mappo", "--envs", "gridworld", "--ray-address", "127.0.0.1:9"],
                 r"--ray-address='127.0.0.1:9': no Ray head answers there", marks=requires_ray),
])
def test_bad_sweeps_are_refused_in_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("marlkit sweep: error: ") and re.search(match, err[0])
    assert not (tmp_path / "sweeps").exists()


def test_sweep_without_ray_names_the_extra_and_no_ray(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["sweep", "--algorithms", "mappo", "--envs", "gridworld"])
    err = capsys.readouterr().err
    assert "marlkit[distributed]" in err and "--no-ray" in err


def test_a_sweep_dir_of_another_grid_is_refused(tmp_path, capsys):
    assert _sweep(tmp_path, "--no-ray") == 0
    with pytest.raises(SystemExit):
        main(["sweep", "--algorithms", "mappo", "--envs", "gridworld", "--sweep-dir", str(tmp_path / "sweep"), "--no-ray"])
    assert "holds a sweep of another grid (it differs in algorithms, overrides)" in capsys.readouterr().err


def test_seed_ranges():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("0,0", "0,-1", "a", "3-1", ""):
        with pytest.raises(ValueError, match="distinct seeds >= 0"):
            parse_seeds(bad)


def test_sweep_merges_the_runs_marl_eval_files(tmp_path, capsys):
    assert _sweep(tmp_path, "--no-ray", "logger.eval_every=1", "logger.eval_episodes=2", "logger.marl_eval=true") == 0
    sweep = tmp_path / "sweep"
    merged = json.loads((sweep / "marl_eval.json").read_text())
    assert set(merged["gridworld"]["gridworld"]) == {"mappo", "ippo"}
    for algorithm in ("mappo", "ippo"):
        assert set(merged["gridworld"]["gridworld"][algorithm]) == {"seed_0", "seed_1"}
        for seed in (0, 1):
            run = json.loads((sweep / algorithm / "gridworld" / f"seed{seed}" / "marl_eval.json").read_text())
            assert merged["gridworld"]["gridworld"][algorithm][f"seed_{seed}"] == run["gridworld"]["gridworld"][algorithm][f"seed_{seed}"]


def test_runs_that_hold_every_core_evaluate_in_process(tmp_path, capsys):
    # one run at a time with every core: a worker process would only slow it; the results are the same
    assert _sweep(tmp_path, "--no-ray", "logger.eval_every=1", "logger.eval_episodes=2",
                  "logger.eval_parallel=true") == 0
    for algorithm in ("mappo", "ippo"):
        for seed in (0, 1):
            config = (tmp_path / "sweep" / algorithm / "gridworld" / f"seed{seed}" / "config.yaml").read_text()
            assert "eval_parallel: false" in config
