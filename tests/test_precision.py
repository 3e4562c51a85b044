"""matmul_precision: the one-line refusal, the precision a run trains with, the one it gives back, and its
worker processes' (evaluation, collectors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from marlkit.pipelines import threads
from marlkit.pipelines.collectors import worker_env
from marlkit.pipelines.config import EnvConfig, ModelConfig
from marlkit.pipelines.evaluate import _evaluation_worker
from marlkit.pipelines.runs import config_from_dict, read_config

from conftest import make_tiny_config


@pytest.fixture
def keep_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def precision_at_steps(monkeypatch):
    """The matmul precision in force at each optimiser step (every step polls the thread governor)."""
    seen = []
    poll = threads.poll
    monkeypatch.setattr(threads, "poll", lambda: seen.append(torch.get_float32_matmul_precision()) or poll())
    return seen


def test_a_bad_precision_is_refused_in_one_line(cli_rejects):
    cli_rejects(["train", "mappo", "matmul_precision=low"],
                r"matmul_precision='low' is not a precision; accepted: highest, high, medium")


@pytest.mark.parametrize("algorithm", ["mappo", "iql"])
def test_a_run_trains_with_its_precision_and_gives_the_process_back_its_own(tmp_path, keep_precision,
                                                                            precision_at_steps, algorithm):
    from marlkit.pipelines import pipeline_for

    torch.set_float32_matmul_precision("high")  # a notebook's own setting
    cfg = make_tiny_config(algorithm, "gridworld", tmp_path / "run", matmul_precision="medium")
    result = pipeline_for(algorithm).train(cfg)
    assert precision_at_steps and set(precision_at_steps) == {"medium"}  # every optimiser step
    assert torch.get_float32_matmul_precision() == "high"
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["matmul_precision"] == "medium"
    assert config_from_dict(read_config(result.run_dir)).matmul_precision == "medium"  # what --resume trains with


def test_the_default_keeps_float32_products(tmp_path, keep_precision, precision_at_steps):
    from marlkit.pipelines.mappo import train

    train(make_tiny_config("mappo", "gridworld", tmp_path / "run"))
    assert precision_at_steps and set(precision_at_steps) == {"highest"}


def test_collector_workers_compute_with_the_runs_precision(keep_precision):
    env = worker_env(dataclasses.replace(EnvConfig(name="gridworld"), num_envs=2), 0, "medium")
    env.close()
    assert torch.get_float32_matmul_precision() == "medium"


class _Closing:
    """The worker's end of the pipe, asked only to close."""

    def recv(self):
        return "close", None

    def send(self, message):  # pragma: no cover - only on failure
        raise AssertionError(message)


def test_the_evaluation_worker_computes_with_the_runs_precision(keep_precision):
    threads_before = torch.get_num_threads()
    try:
        _evaluation_worker(_Closing(), dataclasses.replace(EnvConfig(name="gridworld"), num_envs=2),
                           torch.device("cpu"), 0, ModelConfig(), None, None, "medium")
    finally:
        torch.set_num_threads(threads_before)
    assert torch.get_float32_matmul_precision() == "medium"
