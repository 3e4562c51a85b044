"""A full or read-only disk, for real (small tmpfs mounts): one line saying where space ran out, the
previous checkpoint intact, and a run that resumes once there is space again."""

from __future__ import annotations

import re

import pytest

from marlkit.pipelines.checkpoint import DiskFull
from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.rundir import RunDir

GRIDWORLD = ["train", "mappo", "--env", "gridworld", "--frames", "400", "env.num_envs=4", "env.max_steps=10",
             "collector.frames_per_batch=40", "train.minibatch_size=20", "model.num_cells=[8]",
             "logger.progress=false", "logger.checkpoint_every=1"]
MADDPG = ["train", "maddpg", "--env", "vmas/navigation", "--frames", "4000", "env.num_envs=4", "env.n_agents=2",
          "collector.frames_per_batch=400", "model.num_cells=[8]", "replay.buffer_size=2000",
          "replay.batch_size=32", "logger.progress=false", "logger.checkpoint_every=3"]


def _exits(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    return exit_info.value.code, capsys.readouterr().err


def _curve(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if "reward" in k or "loss" in k} for row in rows]


def test_checkpoint_that_does_not_fit_keeps_the_previous_one_and_resumes(small_disk, tmp_path, capsys, read_metrics):
    disk = small_disk(100)  # one checkpoint of this run (~58 KiB) fits, a second beside it does not
    run = disk / "run"
    code, err = _exits([*GRIDWORLD, "--run-dir", str(run)], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"marlkit train: error: no space left on {run}/checkpoints while writing last.pt; the "
                        r"previous last.pt is intact: free space there, then resume\n", err), err
    assert not list((run / "checkpoints").glob(".*tmp"))  # the half-written file does not hold the space
    small_disk.grow(disk, 4096)
    cli_main(["train", "--resume", str(run)])
    reference = tmp_path / "reference"
    cli_main([*GRIDWORLD, "--run-dir", str(reference)])
    assert len(read_metrics(run)) == 10
    assert _curve(read_metrics(run)) == _curve(read_metrics(reference))


def test_replay_blocks_are_allocated_before_writing_so_a_full_disk_is_one_line(small_disk, tmp_path, capsys,
                                                                              read_metrics):
    # the buffers (~660 KiB when full) pass the free-space check before training; with a checkpoint
    # (~84 KiB) beside them they do not fit. Memmap files are sparse, so without allocating the next
    # slots before writing them, the write to a page the full disk cannot give kills the run (SIGBUS).
    disk = small_disk(700)
    run = disk / "run"
    code, err = _exits([*MADDPG, "--run-dir", str(run)], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"marlkit train: error: no space left on {run}/buffers/agents/\S+ while writing \w+\.memmap; "
                        r"the last checkpoint is intact: free space there, then resume\n", err), err
    small_disk.grow(disk, 8192)
    cli_main(["train", "--resume", str(run)])
    reference = tmp_path / "reference"
    cli_main([*MADDPG, "--run-dir", str(reference)])
    assert len(read_metrics(run)) == 10
    assert _curve(read_metrics(run)) == _curve(read_metrics(reference))


def test_metrics_row_that_does_not_fit_is_one_line_and_keeps_the_earlier_rows(small_disk):
    run = RunDir(small_disk(8) / "run")
    run.path.mkdir()
    row = {f"group/metric_{i}": 0.125 * i for i in range(40)}
    written = 0
    with pytest.raises(DiskFull, match=r"no space left on .*run while writing metrics.csv; the rows of earlier "
                                       r"iterations are intact"):
        for written in range(1000):  # noqa: B007 - ~1 KiB a row: 8 KiB fill within a few rows
            run.log({"iteration": written, **row})
    lines = (run.path / "metrics.csv").read_text().splitlines()
    assert 1 <= written < 1000 and len(lines) >= written  # the header and every row before the failed one


def test_read_only_run_directory_is_refused_before_anything_is_built(small_disk, cli_rejects):
    disk = small_disk(64, read_only=True)
    cli_rejects([*GRIDWORLD, "--run-dir", str(disk / "run")],
                rf"run directory {disk}/run cannot be written \({disk} is read-only\)")
