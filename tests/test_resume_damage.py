"""Resuming a run directory that lost or damaged part of what it holds: metrics rows cut short or
appended half-way, a deleted metrics.csv, a run killed before its first checkpoint."""

from __future__ import annotations

import shutil

import pytest

from marlkit.pipelines.cli import main as cli_main


def _resume(run, frames=160):
    return cli_main(["train", "--resume", str(run), "--frames", str(frames)])


def test_partial_trailing_row_is_dropped_with_a_warning(tmp_run_dir, tiny_gridworld_mappo, read_metrics):
    tiny_gridworld_mappo(tmp_run_dir)
    with (tmp_run_dir / "metrics.csv").open("a") as handle:
        handle.write("3")  # what `printf 3 >> metrics.csv` leaves
    with pytest.warns(UserWarning, match=r"dropped line 5 \(damaged: '3'\)"):
        assert _resume(tmp_run_dir) == 0
    assert [r["iteration"] for r in read_metrics(tmp_run_dir)] == ["0", "1", "2", "3"]
    assert _resume(tmp_run_dir, 200) == 0  # and it goes on resuming after that


def test_row_cut_mid_field_is_dropped_with_a_warning(tmp_run_dir, tiny_gridworld_mappo, read_metrics):
    tiny_gridworld_mappo(tmp_run_dir)
    text = (tmp_run_dir / "metrics.csv").read_text()
    (tmp_run_dir / "metrics.csv").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    with pytest.warns(UserWarning, match=r"dropped line 4 \(damaged"):
        assert _resume(tmp_run_dir) == 0
    rows = read_metrics(tmp_run_dir)
    assert [r["iteration"] for r in rows] == ["0", "1", "3"]  # iteration 2's row was damaged, not re-run
    assert all(len(r) == len(rows[0]) for r in rows)


def test_missing_metrics_file_is_rebuilt_from_the_checkpoint(tmp_run_dir, tiny_gridworld_mappo, read_metrics):
    tiny_gridworld_mappo(tmp_run_dir)
    time_s = float(read_metrics(tmp_run_dir)[-1]["time_s"])
    (tmp_run_dir / "metrics.csv").unlink()
    with pytest.warns(UserWarning, match="metrics.csv is missing: its rows through iteration 2 are lost"):
        assert _resume(tmp_run_dir) == 0
    rows = read_metrics(tmp_run_dir)
    assert [(r["iteration"], r["frames"]) for r in rows] == [("2", "120"), ("3", "160")]
    assert float(rows[0]["time_s"]) == pytest.approx(time_s) and float(rows[1]["time_s"]) > time_s


def test_run_killed_before_its_first_checkpoint_starts_afresh(tmp_run_dir, tiny_gridworld_mappo, read_metrics):
    tiny_gridworld_mappo(tmp_run_dir)
    shutil.rmtree(tmp_run_dir / "checkpoints")
    with pytest.warns(UserWarning, match="has no checkpoint yet .* starting it afresh from its config.yaml"):
        assert _resume(tmp_run_dir) == 0
    rows = read_metrics(tmp_run_dir)
    assert [(r["iteration"], r["frames"]) for r in rows] == [("0", "40"), ("1", "80"), ("2", "120"), ("3", "160")]
