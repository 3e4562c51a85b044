"""Benchmark: where one MAPPO iteration's time goes, on the matched configuration.

Builds a run exactly as ``pipelines/mappo.py`` does (``start_run``, ``build_learners``, ``start_training``)
and runs the loop body of ``mappo.train`` phase by phase, timing each: collection, GAE, filling the
minibatch buffer, drawing minibatches, the loss's forward pass, ``gradient_step`` split into backward,
gradient clipping and the optimiser step (``gradient_step``'s finite-check flags left out), sending the weights to the collector, and ``end_iteration``
(metrics row, checkpoint when due). The first iteration is a warm-up and is not counted.

It also times the floor under the training phase: the same actor and critic sizes as plain
``torch.nn.Sequential`` MLPs on a 400-sample minibatch, forward, backward, clip and fused Adam, with no
TensorDict, distribution or loss around them; what the loss step takes beyond it is overhead.

    python benchmarks/profile_mappo.py [--iterations 5] [--threads 2] [--matmul-precision medium]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def mlp_floor(steps: int, obs: int, agents: int, actions: int, cells: int) -> float:
    """Milliseconds per step of bare MLPs the matched actor's and centralised critic's sizes."""
    def mlp(n_in: int, n_out: int) -> torch.nn.Sequential:
        return torch.nn.Sequential(torch.nn.Linear(n_in, cells), torch.nn.Tanh(), torch.nn.Linear(cells, cells),
                                   torch.nn.Tanh(), torch.nn.Linear(cells, n_out))
    actor, critic = mlp(obs, 2 * actions), mlp(obs * agents, 1)
    params = [*actor.parameters(), *critic.parameters()]
    adam = torch.optim.Adam(params, lr=3e-4, fused=True)
    x = torch.randn(400, agents, obs)
    for k in range(steps + 10):
        if k == 10:
            start = time.perf_counter()
        (actor(x).sum() + critic(x.reshape(400, -1)).sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        adam.step()
        adam.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--matmul-precision", default="highest", help="the run's matmul_precision (highest, high, "
                        "medium: bfloat16 products where the CPU has them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from marlkit.losses import minibatch_keys
    from marlkit.pipelines import make_config
    from marlkit.pipelines.mappo import build_learners, checked_iterations
    from marlkit.pipelines.precision import apply_matmul_precision
    from marlkit.pipelines.reporting import scalar_entries
    from marlkit.pipelines.session import end_iteration, finish_run, start_run, start_training
    from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement

    os.environ["MARLKIT_THREADS"] = str(torch.get_num_threads())  # fixed, as measured
    times: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config("mappo", "navigation-matched", {
            "logger.run_dir": str(Path(tmp) / "run"), "logger.progress": False,
            "collector.total_frames": 6000 * (args.iterations + 1), "matmul_precision": args.matmul_precision})
        run = start_run(cfg, False, checked_iterations)
        cfg = run.cfg
        learners = build_learners(run.env, cfg, run.device)
        training = start_training(run, learners, lr=cfg.train.lr, adam_eps=cfg.train.adam_eps)
        buffer = ReplayBuffer(storage=LazyTensorStorage(cfg.collector.frames_per_batch, device=run.device),
                              sampler=SamplerWithoutReplacement(), batch_size=cfg.train.minibatch_size)
        minibatches = cfg.collector.frames_per_batch // cfg.train.minibatch_size
        keys = minibatch_keys([learner.loss for learner in learners.values()])
        batches = training.batches(run)
        for it in range(run.iterations):
            lap: dict[str, float] = defaultdict(float)
            t = time.perf_counter()

            def tick(name: str) -> None:
                nonlocal t
                now = time.perf_counter()
                lap[name] += now - t
                t = now

            iteration, batch = next(batches)
            tick("collection")
            with torch.no_grad():
                for learner in learners.values():
                    loss = learner.loss
                    loss.value_estimator(batch, params=loss.critic_network_params,
                                         target_params=loss.target_critic_network_params)
            tick("GAE")
            buffer.empty()
            buffer.extend((batch if keys is None else batch.select(*keys, strict=False)).reshape(-1))
            tick("buffer fill")
            terms = {group: [] for group in learners}
            for _ in range(cfg.train.num_epochs * minibatches):
                minibatch = buffer.sample()
                tick("minibatch draw")
                for group, learner in learners.items():
                    out = learner.loss(minibatch)
                    tick("loss forward")
                    opt = training.optimisers[group]
                    total = sum(out[key] for key in learner.loss_terms if key in out.keys())
                    total.backward()
                    tick("backward")
                    torch.nn.utils.clip_grad_norm_(learner.loss.parameters(), cfg.train.max_grad_norm)
                    tick("gradient clip")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    tick("optimiser step")
                    terms[group].append(scalar_entries(out))
                    tick("loss entries")
            training.collector.update_policy_weights_()
            tick("weights to collector")
            end_iteration(run, training, learners, iteration, batch, terms)
            tick("end_iteration (row, checkpoint)")
            if it > 0:
                for name, seconds in lap.items():
                    times[name].append(seconds)
        finish_run(run, training)
    per_iter = {name: statistics.median(v) for name, v in times.items()}
    total = sum(per_iter.values())
    steps = cfg.train.num_epochs * minibatches
    before = apply_matmul_precision(args.matmul_precision)  # the floor at the run's precision
    floor = mlp_floor(steps, obs=18, agents=3, actions=2, cells=256)
    torch.set_float32_matmul_precision(before)
    print(f"MAPPO navigation-matched, {torch.get_num_threads()} torch threads, matmul_precision={args.matmul_precision}, "
          f"median of {args.iterations} "
          f"iterations ({steps} optimiser steps of {cfg.train.minibatch_size} each)")
    print("| phase | ms per iteration | share |")
    print("|---|---|---|")
    for name, seconds in per_iter.items():
        print(f"| {name} | {seconds * 1000:,.0f} | {seconds / total:.0%} |")
    print(f"| **total** | {total * 1000:,.0f} | {6000 / total:,.0f} frames/s |")
    train_ms = sum(per_iter[k] for k in ("minibatch draw", "loss forward", "backward", "gradient clip",
                                         "optimiser step", "loss entries")) * 1000 / steps
    print(f"\none optimiser step: {train_ms:.1f} ms with marlkit's loss; {floor:.1f} ms for bare MLPs of the same "
          f"sizes (forward, backward, clip, fused Adam): {train_ms - floor:.1f} ms of TensorDict, distribution and loss "
          f"work per step")


if __name__ == "__main__":
    main()
