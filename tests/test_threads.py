"""The thread policy: which setting wins, the one-line refusals, auto's reaction to other programs' load
(on a simulated /proc/stat), and what a run records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from marlkit.pipelines import threads
from marlkit.pipelines.threads import thread_setting, ThreadGovernor

from conftest import make_tiny_config, read_metrics_rows


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_setting_precedence(no_thread_env, monkeypatch):
    assert thread_setting() is None  # nothing set: auto
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert thread_setting() == 3  # OpenMP's outermost level, as torch reads it
    monkeypatch.setenv(threads.ENV_VAR, "auto")
    assert thread_setting() is None  # marlkit's own variable wins over OpenMP's
    monkeypatch.setenv(threads.ENV_VAR, "2")
    assert thread_setting() == 2
    assert thread_setting("auto") is None and thread_setting("5") == 5  # --threads wins over both


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_settings_are_refused_in_one_line(no_thread_env, monkeypatch, value):
    with pytest.raises(ValueError, match=rf"^--threads={value!r} is not a thread count; accepted: auto or a whole number >= 1$"):
        thread_setting(value)
    monkeypatch.setenv(threads.ENV_VAR, value)
    with pytest.raises(ValueError, match=rf"^MARLKIT_THREADS={value!r} is not a thread count"):
        thread_setting()
    monkeypatch.delenv(threads.ENV_VAR)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert thread_setting() is None  # not ours to refuse: torch decides what it makes of it


class FakeMachine:
    """/proc/stat and the clocks of a 4-CPU machine where other programs keep ``others`` cores busy and
    this process ``own`` cores."""

    def __init__(self, monkeypatch, others: float, own: float):
        self.t = self.cpu = self.busy = 0.0
        self.others, self.own = others, own
        monkeypatch.setattr(threads, "_cpu_jiffies", lambda: (round(self.busy * 100), round(self.t * 100 * 4)))
        monkeypatch.setattr(threads, "time", SimpleNamespace(perf_counter=lambda: self.t, process_time=lambda: self.cpu,
                                                             sleep=self.advance))
        monkeypatch.setattr(threads, "os", SimpleNamespace(sched_getaffinity=lambda pid: {0, 1, 2, 3},
                                                           cpu_count=lambda: 4, environ=threads.os.environ))

    def advance(self, seconds: float) -> None:
        """``seconds`` pass at the current loads (100 clock ticks per second per CPU)."""
        self.t += seconds
        self.cpu += seconds * self.own
        self.busy += seconds * (self.others + self.own)


def test_auto_gives_the_idle_cores_and_follows_the_load(monkeypatch, keep_threads):
    machine = FakeMachine(monkeypatch, others=1.0, own=0.0)
    torch.set_num_threads(2)
    before = 2
    governor = ThreadGovernor(None)
    try:
        assert governor.policy == "auto" and torch.get_num_threads() == 3  # one of 4 cores is taken at the start
        machine.own = 3.0
        machine.advance(0.2)
        threads.poll()
        assert torch.get_num_threads() == 3 and governor.changes == 0  # too short a window to judge
        machine.others, machine.own = 3.0, 1.0  # others now keep three cores busy and squeeze this run
        machine.advance(4.0)
        threads.poll()  # what every optimiser step calls
        assert torch.get_num_threads() == 1 and governor.changes == 1
        machine.others = 0.0  # the others finished
        machine.advance(2.0)
        threads.poll()
        assert torch.get_num_threads() == 4 and governor.changes == 2
        machine.own = 4.0
        machine.advance(2.0)
        threads.poll()
        assert torch.get_num_threads() == 4 and governor.changes == 2  # its own threads never count as load
    finally:
        governor.close()
    assert torch.get_num_threads() == before  # a run gives torch back the count it had
    machine.others, machine.own = 3.0, 1.0
    machine.advance(2.0)
    threads.poll()
    assert torch.get_num_threads() == before  # a closed governor no longer adapts


def test_fixed_is_kept_whatever_the_load(monkeypatch, keep_threads):
    machine = FakeMachine(monkeypatch, others=3.0, own=0.0)
    governor = ThreadGovernor(2)
    assert governor.policy == "fixed" and torch.get_num_threads() == 2
    machine.advance(5.0)
    governor.poll()
    threads.poll()
    assert torch.get_num_threads() == 2 and governor.changes == 0
    governor.close()


@pytest.mark.parametrize("setting, policy", [("auto", "auto"), ("1", "fixed")])
def test_a_run_records_its_threads(tmp_path, monkeypatch, keep_threads, setting, policy):
    from marlkit.pipelines.mappo import train

    monkeypatch.setenv(threads.ENV_VAR, setting)
    polls = []
    poll = threads.poll
    monkeypatch.setattr(threads, "poll", lambda: polls.append(1) or poll())
    cfg = make_tiny_config("mappo", "gridworld", tmp_path / "run")
    result = train(cfg)
    # every optimiser step lets the governor look at the load
    assert len(polls) >= cfg.train.num_epochs * (cfg.collector.frames_per_batch // cfg.train.minibatch_size) * 2
    summary = json.loads((result.run_dir / "summary.json").read_text())
    rows = read_metrics_rows(result.run_dir)
    assert summary["thread_policy"] == policy and summary["torch_threads"] >= 1
    assert all(int(row["system/torch_threads"]) >= 1 for row in rows)
    if policy == "fixed":
        assert summary["torch_threads"] == 1 and {row["system/torch_threads"] for row in rows} == {"1"}


def test_a_bad_environment_setting_stops_before_anything_is_written(tmp_path, monkeypatch):
    from marlkit.pipelines.mappo import train

    monkeypatch.setenv(threads.ENV_VAR, "many")
    with pytest.raises(ValueError, match=r"MARLKIT_THREADS='many' is not a thread count"):
        train(make_tiny_config("mappo", "gridworld", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_auto_leaves_a_core_to_the_runs_own_worker_while_it_works(monkeypatch, keep_threads):
    machine = FakeMachine(monkeypatch, others=0.0, own=0.0)
    governor = ThreadGovernor(None)
    try:
        assert torch.get_num_threads() == 4  # an idle machine: every core
        governor.reserve(1)  # a parallel evaluation starts: its core is left to it at once
        assert torch.get_num_threads() == 3 and governor.changes == 1
        machine.others = 1.0  # the worker evaluating is not another program taking a core
        machine.advance(2.0)
        threads.poll()
        assert torch.get_num_threads() == 3
        governor.reserve(0)  # it is back: the run gets the core back at once
        assert torch.get_num_threads() == 4 and governor.changes == 2
        machine.others = 1.0  # now another program keeps a core busy
        machine.advance(2.0)
        threads.poll()
        assert torch.get_num_threads() == 3 and governor.changes == 3
        governor.reserve(1)  # the worker and that program: two cores
        assert torch.get_num_threads() == 2
        machine.others = 2.0
        machine.advance(2.0)
        threads.poll()
        assert torch.get_num_threads() == 2
        machine.others = 0.0
        governor.reserve(0)
        assert torch.get_num_threads() == 3  # the program's load is known from the last window without the worker
        machine.advance(2.0)
        threads.poll()
        assert torch.get_num_threads() == 4
    finally:
        governor.close()
    fixed = ThreadGovernor(4)
    fixed.reserve(1)
    assert torch.get_num_threads() == 4  # a count the user fixed is kept
    fixed.close()


def test_a_resumed_run_keeps_the_fixed_count_it_ran_with(tmp_path, monkeypatch, no_thread_env, keep_threads):
    from marlkit.pipelines.cli import main as cli_main

    run = tmp_path / "run"
    assert cli_main(["train", "mappo", "--env", "gridworld", "--run-dir", str(run), "--frames", "80", "--threads", "3",
                     "env.num_envs=4", "collector.frames_per_batch=40", "train.minibatch_size=20",
                     "model.num_cells=[8]", "logger.progress=false"]) == 0
    monkeypatch.delenv(threads.ENV_VAR)  # the CLI handed --threads on through this process's environment
    assert cli_main(["train", "--resume", str(run), "--frames", "160"]) == 0  # auto would not choose 3 on 2 cores
    assert [row["system/torch_threads"] for row in read_metrics_rows(run)] == ["3"] * 4
    monkeypatch.setenv(threads.ENV_VAR, "1")  # a setting given at the resume wins
    assert cli_main(["train", "--resume", str(run), "--frames", "240"]) == 0
    assert [row["system/torch_threads"] for row in read_metrics_rows(run)][4:] == ["1", "1"]
