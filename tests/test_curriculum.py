"""Curricula (``env.curriculum``): stages parsed and refused in one line, the env changing at the right
iteration (frames and plateau triggers), the stage in metrics.csv, exact resume across a stage change,
and the refusal of a stage that would change the networks' input sizes."""

from __future__ import annotations

import math

import pytest

from marlkit.pipelines import session
from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.curriculum import Curriculum, parse_curriculum

BASE = ["--env", "gridworld", "env.num_envs=4", "env.grid_size=5", "env.max_steps=6", "collector.frames_per_batch=40",
        "train.minibatch_size=20", "train.num_epochs=1", "model.num_cells=[8]", "logger.progress=false",
        "logger.checkpoint_every=1", "--seed", "3"]


def test_stages_advance_on_frames_and_on_a_plateau_of_their_own_iterations():
    curriculum = Curriculum(parse_curriculum([{"advance_when": "reward >= 2 over 3", "grid_size": 8},
                                              {"at_frames": 500, "grid_size": 12}]))
    steps = [(100, 1.0), (200, 2.0), (300, math.nan), (400, 2.5), (500, 3.0), (600, 0.0), (700, 9.0)]
    advanced = [curriculum.after_iteration(frames, value) for frames, value in steps]
    # mean(1, 2, 2.5) = 1.83 < 2 (NaN iterations are not counted); mean(2, 2.5, 3) = 2.5 >= 2; then 600 >= 500
    assert advanced == [False, False, False, False, True, True, False]
    assert curriculum.stage == 2 and curriculum.returns == [9.0]
    restored = Curriculum(curriculum.stages)
    restored.load_state_dict(curriculum.state_dict())
    assert restored.state_dict() == curriculum.state_dict()


def _curriculum_arg(stages: str) -> str:
    return f"env.curriculum={stages}"


@pytest.mark.parametrize("stages,match", [
    ("5", r"env.curriculum expects a mapping, got 5"),
    ("[{grid_size: 8}]", r"env.curriculum stage 1 needs exactly one trigger"),
    ("[{at_frames: 40, advance_when: 'reward >= 1 over 2', grid_size: 8}]", r"stage 1 needs exactly one trigger"),
    ("[{at_frames: 80, grid_size: 8}, {at_frames: 40, grid_size: 9}]", r"stage 2: at_frames must be an integer above"),
    ("[{advance_when: 'reward > 1 over 2', grid_size: 8}]", r"stage 1: advance_when must read \"reward >= <number>"),
    ("[{at_frames: 40, num_envs: 8}]", r"stage 1 sets 'num_envs', which cannot change during a run"),
    ("[{at_frames: 40}]", r"stage 1 changes nothing"),
    ("[{at_frames: 40, num_agents: 3}]", r"stage 1 changes group 'agents' \(observation and action specs"),
])
def test_bad_curricula_are_one_line_before_training(stages, match, cli_rejects):
    cli_rejects(["train", "mappo", "--frames", "80", *BASE, _curriculum_arg(stages)], match)


def test_curriculum_with_worker_collectors_is_refused(cli_rejects):
    cli_rejects(["train", "mappo", "--frames", "80", *BASE, "collector=multiprocess", "collector.workers=2",
                 _curriculum_arg("[{at_frames: 40, grid_size: 8}]")], "env.curriculum changes the env between iterations")


def test_the_env_changes_at_the_stage_boundary_and_metrics_say_so(tmp_path, read_metrics, monkeypatch):
    built = []
    real = session.build_env
    monkeypatch.setattr(session, "build_env", lambda cfg, **kw: built.append(cfg.kwargs["grid_size"]) or real(cfg, **kw))
    stages = "[{at_frames: 80, grid_size: 8}, {at_frames: 120, grid_size: 11}]"
    assert cli_main(["train", "mappo", "--frames", "200", "--run-dir", str(tmp_path), *BASE, _curriculum_arg(stages)]) == 0
    rows = read_metrics(tmp_path)
    assert [r["curriculum/stage"] for r in rows] == ["0", "0", "1", "2", "2"]  # 80 frames after iteration 1, ...
    assert built == [5, 8, 11]  # the training env of each stage, built once


@pytest.mark.parametrize("stop", [80, 120], ids=["stop-at-the-boundary", "stop-inside-a-stage"])
def test_resume_continues_the_curriculum_exactly(stop, tmp_path, read_metrics):
    stages = _curriculum_arg("[{at_frames: 80, grid_size: 8}, {advance_when: 'reward >= -1000 over 1', grid_size: 9}]")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli_main(["train", "mappo", "--frames", "200", "--run-dir", str(whole), *BASE, stages]) == 0
    assert cli_main(["train", "mappo", "--frames", str(stop), "--run-dir", str(parts), *BASE, stages]) == 0
    assert cli_main(["train", "--resume", str(parts), "--frames", "200"]) == 0
    uninterrupted, resumed = read_metrics(whole), read_metrics(parts)
    assert len({r["curriculum/stage"] for r in uninterrupted}) == 3
    keys = [k for k in uninterrupted[0] if "reward" in k or "loss" in k or k == "curriculum/stage"]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
