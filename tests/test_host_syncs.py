"""The GPU path, checked without a GPU: marlkit's own code makes no host round trip per env step or per
optimiser step.

Every call that copies a tensor to the host or waits for the device (``item``, ``tolist``, ``numpy``,
``cpu`` and the truth / number conversions) made from marlkit's source files is counted while a
pipeline trains two iterations. Doubling the env steps and the optimiser steps per iteration must not
change the count: what remains is per iteration (the log row, the divergence check) or setup. On a
CUDA machine the same runs also go under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import marlkit.envs
import marlkit.losses
import marlkit.modules
import marlkit.pipelines
from marlkit.pipelines import pipeline_for

SOURCES = tuple(str(Path(package.__path__[0])) for package in (marlkit.envs, marlkit.modules, marlkit.losses,
                                                                 marlkit.pipelines))
HOST_CALLS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


@contextmanager
def host_calls_from(sources: tuple[str, ...] = SOURCES):
    """Count, by call site, the host round trips made from files under ``sources`` while the block runs."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_CALLS}

    def counting(name, original):
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(sources):
                counts[f"{Path(caller.co_filename).name}:{caller.co_name} {name}"] += 1
            return original(self, *args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# algorithm, env, overrides giving (frames per iteration, optimiser steps per iteration) x1; x2 doubles both.
CASES = {
    "mappo": ("gridworld", lambda k: {"collector.frames_per_batch": 40 * k, "train.minibatch_size": 20}),
    "iql": ("gridworld", lambda k: {"collector.frames_per_batch": 40 * k, "train.optimiser_steps": 2 * k}),
    "qmix": ("gridworld", lambda k: {"collector.frames_per_batch": 40 * k, "train.optimiser_steps": 2 * k}),
    "maddpg": ("vmas/navigation", lambda k: {"collector.frames_per_batch": 40 * k, "train.optimiser_steps": 2 * k}),
    "masac": ("vmas/navigation", lambda k: {"collector.frames_per_batch": 40 * k, "train.optimiser_steps": 2 * k}),
}


def _train(tiny_config, tmp_path, algorithm: str, scale: int, device: str = "cpu") -> None:
    env, sizes = CASES[algorithm]
    overrides = {"env.max_steps": 10, "device": device, **sizes(scale)}
    if algorithm != "mappo":
        overrides["replay.warmup_frames"] = 0
    frames = overrides.pop("collector.frames_per_batch")
    cfg = tiny_config(algorithm, env, tmp_path / f"{device}-x{scale}", frames_per_batch=frames, iterations=2, **overrides)
    torch.manual_seed(0)
    pipeline_for(algorithm).train(cfg)


def _count(tiny_config, tmp_path, algorithm: str, scale: int, sources: tuple[str, ...] = SOURCES) -> Counter:
    with host_calls_from(sources) as counts:
        _train(tiny_config, tmp_path, algorithm, scale)
    return counts


def _grown(once: Counter, twice: Counter) -> dict[str, tuple[int, int]]:
    return {site: (once[site], twice[site]) for site in set(once) | set(twice) if once[site] != twice[site]}


@pytest.mark.parametrize("algorithm", list(CASES))
def test_no_host_round_trip_per_env_step_or_optimiser_step(tiny_config, tmp_path, algorithm):
    once, twice = _count(tiny_config, tmp_path, algorithm, 1), _count(tiny_config, tmp_path, algorithm, 2)
    grown = _grown(once, twice)
    assert not grown, f"host round trips that grow with env or optimiser steps (x1, x2): {grown}"
    assert sum(once.values()) > 0  # the counter does see marlkit's per-iteration reads


def test_the_counter_catches_a_per_step_sync(tiny_config, tmp_path, monkeypatch):
    """A gradient step that reads its loss on the host (as a finiteness check with ``if`` would) is caught."""
    from marlkit.pipelines import learners

    def syncing_step(learner, optimiser, loss_out, max_grad_norm):
        float(loss_out["loss"])  # a host read per optimiser step
        return learners.gradient_step(learner, optimiser, loss_out, max_grad_norm)

    monkeypatch.setattr(sys.modules["marlkit.pipelines.qlearning"], "gradient_step", syncing_step)
    sources = (*SOURCES, __file__)
    grown = _grown(_count(tiny_config, tmp_path, "iql", 1, sources), _count(tiny_config, tmp_path, "iql", 2, sources))
    assert list(grown) == ["test_host_syncs.py:syncing_step __float__"], grown


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", list(CASES))
def test_cuda_syncs_do_not_grow_with_steps(tiny_config, tmp_path, algorithm):  # pragma: no cover - GPU machines
    """Under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising CUDA call warns: as many with
    twice the env and optimiser steps per iteration."""
    counts = []
    for scale in (1, 2):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                _train(tiny_config, tmp_path, algorithm, scale, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in record))
    assert counts[0] == counts[1], counts
