"""Benchmark: QMIX vs VDN on the two-step matrix game of the QMIX paper (Rashid et al. 2018).

Player 0's first action picks state 2A (payoff 7 whatever is played) or 2B (payoffs [[0, 1], [1, 8]]).
The optimal joint policy earns 8; VDN's additive value cannot represent 2B's payoffs well enough and
settles for 7, while QMIX's monotonic mixer, conditioned on the state, finds 8. As in the paper the
agents explore fully (epsilon = 1) and the learnt greedy policy is evaluated.

    python benchmarks/matrix_games.py [--seeds 3] [--frames 20000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.envs import make_env
from marlkit.pipelines import qlearning
from marlkit.pipelines import make_config


def greedy_return(policy) -> float:
    env = make_env("matrix/two_step", num_envs=1)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(2, policy)
    return rollout["next", "agents", "reward"][0, :, 0, 0].sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=20_000)
    args = parser.parse_args()
    returns: dict[str, list[float]] = {"qmix": [], "vdn": []}
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in returns:
            for seed in range(args.seeds):
                cfg = make_config(algorithm, overrides={
                    "env.name": "matrix/two_step", "env.num_envs": 100, "seed": seed,
                    "collector.frames_per_batch": 1000, "collector.total_frames": args.frames,
                    "replay.buffer_size": 100_000, "replay.batch_size": 256, "replay.memmap": False,
                    "train.optimiser_steps": 100, "train.lr": 5e-4, "train.max_grad_norm": 10.0,
                    "loss.gamma": 0.99, "loss.target_update": "hard", "loss.hard_update_interval": 100,
                    "exploration.eps_init": 1.0, "exploration.eps_end": 1.0,
                    "model.num_cells": [64], "model.mixing_embed_dim": 16, "model.share_params": True,
                    "logger.progress": False, "logger.run_dir": str(Path(tmp) / f"{algorithm}{seed}"),
                })
                result = qlearning.train(cfg)
                returns[algorithm].append(greedy_return(result.policy))

    print(f"\nTwo-step game, greedy return after {args.frames:,} frames of full exploration (optimum 8)\n")
    print("| algorithm | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean |")
    print("|---" * (args.seeds + 2) + "|")
    for algorithm, values in returns.items():
        print(f"| {algorithm} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {sum(values) / len(values):.2f} |")


if __name__ == "__main__":
    main()
