"""Off-policy checkpoints and their replay are one unit: a run killed after its buffers took new data
but before its next checkpoint resumes exactly, and says so when the buffer wrapped over data the
checkpoint held (then it cannot be exact)."""

from __future__ import annotations

import warnings

import pytest

from marlkit.pipelines import checkpoint
from marlkit.pipelines.cli import main as cli_main

COMMON = ["--seed", "3", "--env", "vmas/navigation", "env.n_agents=2", "env.max_steps=15", "env.num_envs=4",
          "collector.frames_per_batch=40", "replay.batch_size=16", "train.optimiser_steps=2",
          "exploration.annealing_frames=200", "model.num_cells=[16]", "logger.progress=false",
          "logger.checkpoint_every=1"]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs."""


def _killed_at_third_checkpoint(monkeypatch, args: list[str]) -> None:
    """Train until the checkpoint after iteration 2 is being written, and die there (as SIGKILL would:
    nothing after it runs); the buffers already hold iteration 2's transitions."""
    save, calls = checkpoint.save_checkpoint, []

    def dying_save(path, state):
        calls.append(path)
        if len(calls) == 3:
            raise _Killed
        return save(path, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", dying_save)
    with pytest.raises(_Killed):
        cli_main(args)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


def _losses(rows):
    return [{k: v for k, v in row.items() if "loss" in k or "reward" in k} for row in rows]


def test_kill_after_the_buffer_took_new_data_resumes_exactly(tmp_path, monkeypatch, read_metrics):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli_main(["train", "maddpg", "--frames", "200", "--run-dir", str(whole), *COMMON]) == 0
    _killed_at_third_checkpoint(monkeypatch, ["train", "maddpg", "--frames", "200", "--run-dir", str(parts), *COMMON])
    # What an in-place flush killed half-way used to leave behind must not matter any more.
    (parts / "buffers" / "agents" / "storage_metadata.json").write_text('{"metadata": ')
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*overwritten after it")
        assert cli_main(["train", "--resume", str(parts), "--frames", "200"]) == 0
    resumed = read_metrics(parts)
    assert [r["iteration"] for r in resumed] == ["0", "1", "2", "3", "4"]
    assert _losses(resumed) == _losses(read_metrics(whole))


def test_resume_after_the_buffer_wrapped_warns_that_it_is_not_exact(tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    args = ["train", "maddpg", "--frames", "200", "--run-dir", str(parts), *COMMON, "replay.buffer_size=80"]
    _killed_at_third_checkpoint(monkeypatch, args)
    with pytest.warns(UserWarning, match="40 of the 80 transitions the checkpoint's replay held were overwritten"):
        assert cli_main(["train", "--resume", str(parts), "--frames", "200"]) == 0
