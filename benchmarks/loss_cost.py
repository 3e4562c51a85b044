"""Benchmark: one update with TorchRL's loss forward against marlkit's, side by side.

marlkit's ``IndependentDQNLoss`` (IQL, SUPER), ``MixedQLoss`` (VDN / QMIX) and ``GroupPPOLoss`` (MAPPO /
IPPO) compute TorchRL's ``DQNLoss`` / ``QMixerLoss`` / ``ClipPPOLoss`` from the networks' tensors, with the
same results bit for bit (``tests/test_losses.py``). This script builds a real learner (env, networks,
fused Adam) for each case, fills it with one collected batch, and times ``--steps`` updates (loss forward,
backward, gradient clip, Adam step) on one minibatch with each forward, in ``--rounds`` interleaved rounds,
one torch thread. Cases:

* ``iql-pursuit``: the ``pursuit-super`` preset (8 pursuers' dueling double DQN, 32 samples each, priorities);
* ``qmix-128``: QMIX on discrete navigation with BenchMARL's off-policy defaults (minibatch 128);
* ``qmix-4096``: the same with the settings of ``compare_anchors.py`` (TorchRL's script: minibatch 4,096);
* ``mappo-matched``: the ``navigation-matched`` preset (MAPPO, minibatch 400 of 3 agents, GAE computed).

    python benchmarks/loss_cost.py [--cases iql-pursuit,qmix-128,qmix-4096,mappo-matched] [--rounds 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_anchors import SETTINGS as ANCHOR_SETTINGS  # noqa: E402
from learning_vs_benchmarl import marlkit_overrides, QMIX  # noqa: E402


CASES = ("iql-pursuit", "qmix-128", "qmix-4096", "mappo-matched")


def _case(name: str) -> tuple[str, str | None, dict[str, Any]]:
    """(algorithm, preset, overrides) of a case."""
    if name == "mappo-matched":
        return "mappo", "navigation-matched", {}
    if name == "iql-pursuit":
        return "iql", "pursuit-super", {"sharing.mode": "none", "replay.warmup_frames": 0}
    setting = QMIX if name == "qmix-128" else ANCHOR_SETTINGS["qmix"]
    return "qmix", None, marlkit_overrides(setting, "navigation", 0, setting.frames)


def learner_and_batch(name: str, run_dir: Path, extra: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer, Any, float]:
    """A case's learner after one collected batch, its optimiser, a minibatch and the gradient clip."""
    from marlkit.pipelines import make_config, pipeline_for
    from marlkit.pipelines.offpolicy import start_offpolicy

    algorithm, preset, overrides = _case(name)
    overrides = {**overrides, **extra, "logger.run_dir": str(run_dir), "logger.progress": False,
                 "logger.eval_every": 10**9, "logger.checkpoint_every": 10**9}
    module = pipeline_for(algorithm)
    cfg = make_config(algorithm, preset, overrides)
    if algorithm == "mappo":
        return _ppo_learner_and_batch(module, cfg)
    run, learners, training = start_offpolicy(cfg, False, module.checked_iterations, module.build_learners)
    for _, batch in training.batches(run):
        for learner in learners.values():
            learner.replay.extend(batch)
        break
    (group, learner), = learners.items()
    return learner, training.optimisers[group], learner.replay.sample(), cfg.train.max_grad_norm


def _ppo_learner_and_batch(module: Any, cfg: Any) -> tuple[Any, torch.optim.Optimizer, Any, float]:
    """As :func:`learner_and_batch` for MAPPO: the first collected batch with its advantages, and its
    first ``minibatch_size`` steps as the minibatch."""
    from marlkit.losses import estimate_advantages
    from marlkit.pipelines.session import start_run, start_training

    run = start_run(cfg, False, module.checked_iterations)
    learners = module.build_learners(run.env, run.cfg, run.device)
    training = start_training(run, learners, lr=cfg.train.lr, adam_eps=cfg.train.adam_eps, derived={})
    for _, batch in training.batches(run):
        break
    (group, learner), = learners.items()
    with torch.no_grad():
        estimate_advantages(learner.loss, batch)
    return learner, training.optimisers[group], batch.reshape(-1)[:cfg.train.minibatch_size].clone(), \
        cfg.train.max_grad_norm


def time_updates(learner: Any, optimiser: torch.optim.Optimizer, minibatch: Any, clip: float,
                 forward: Callable, steps: int) -> float:
    """Milliseconds per update (forward, backward, clip, Adam) with ``forward``, after a short warm-up."""
    from marlkit.pipelines.learners import gradient_step

    def update() -> None:
        gradient_step(learner, optimiser, forward(learner.loss, minibatch.clone(False)), clip)

    for _ in range(min(steps, 10)):
        update()
    start = time.perf_counter()
    for _ in range(steps):
        update()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value for every case (tiny checks)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; accepted: {', '.join(CASES)}")
    torch.set_num_threads(1)
    extra = dict(item.split("=", 1) for item in args.set)
    print("| case | loss forward | ms per update (each round) | median |\n|---|---|---|---|")
    for name in cases:
        work = Path(tempfile.mkdtemp())
        try:
            learner, optimiser, minibatch, clip = learner_and_batch(name, work / "run", extra)
            torchrl_forward = type(learner.loss).__mro__[1].forward  # DQNLoss / QMixerLoss / MAPPOLoss
            arms = {"TorchRL": torchrl_forward, "marlkit": type(learner.loss).forward}
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for _ in range(args.rounds):
                for arm, forward in arms.items():
                    times[arm].append(time_updates(learner, optimiser, minibatch, clip, forward, args.steps))
            for arm, values in times.items():
                print(f"| {name} | {arm} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |",
                      flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
