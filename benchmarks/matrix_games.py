"""Benchmark: what each cooperative algorithm learns on the classic matrix games, several seeds each.

Games (``marlkit.envs.matrix``): ``nonmonotonic`` ``[[8, -12, -12], [-12, 0, 0], [-12, 0, 0]]`` (QTRAN
paper: the optimum 8 needs a value that no monotonic mixing of per-agent values represents), ``climbing``
``[[11, -30, 0], [-30, 7, 6], [0, 0, 5]]`` (Claus & Boutilier: the optimum 11 is surrounded by the worst
penalties) and ``two_step`` (QMIX paper: the optimum 8 in state 2B beats the safe 7 of state 2A).

Value-based algorithms (IQL, VDN, QMIX, QTRAN) explore fully (epsilon = 1) as in the QMIX and QTRAN
papers' matrix-game experiments, so what they learn depends on the value they can represent, not on
the data they happened to collect; the actor-critics (COMA, MAA2C) learn on-policy with an entropy bonus.
The table shows the greedy (deterministic) joint action each seed ends with and its return.

    python benchmarks/matrix_games.py [--games nonmonotonic,climbing,two_step]
        [--algorithms iql,vdn,qmix,qtran,coma,maa2c] [--seeds 5] [--frames 20000] [--csv FILE]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.envs import make_env
from marlkit.pipelines import make_config, pipeline_for

GAMES = {"nonmonotonic": 8.0, "climbing": 11.0, "two_step": 8.0}  # game -> optimal return
VALUE_BASED = ("iql", "vdn", "qmix", "qtran")
ACTOR_CRITIC = ("coma", "maa2c")
ENVS = 100


def overrides(algorithm: str, game: str, seed: int, frames: int, run_dir: Path) -> dict:
    """The settings of one run: full exploration for the value-based algorithms, on-policy otherwise."""
    common = {"env.name": f"matrix/{game}", "env.num_envs": ENVS, "seed": seed, "collector.total_frames": frames,
              "model.share_params": True, "logger.progress": False, "logger.run_dir": str(run_dir)}
    if algorithm in VALUE_BASED:
        return {**common, "collector.frames_per_batch": 1000, "replay.buffer_size": 100_000, "replay.batch_size": 256,
                "replay.memmap": False, "train.optimiser_steps": 100, "train.lr": 5e-4, "train.max_grad_norm": 10.0,
                "loss.gamma": 0.99, "loss.target_update": "hard", "loss.hard_update_interval": 100,
                "exploration.eps_init": 1.0, "exploration.eps_end": 1.0, "model.num_cells": [64],
                "model.mixing_embed_dim": 16}
    # one step of every copy per update: 200 updates in 20,000 frames
    return {**common, "collector.frames_per_batch": ENVS, "train.lr": 5e-3, "loss.gamma": 0.99,
            "loss.entropy_coef": 0.01, "model.num_cells": [64], "model.critic_share_params": True}


def greedy_play(game: str, policy) -> tuple[str, float]:
    """The greedy joint action(s) of ``policy`` (one per step, agents' actions joined) and its return."""
    env = make_env(f"matrix/{game}", num_envs=1)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(10, policy)
    actions = rollout["agents", "action"][0]
    if actions.dtype.is_floating_point:
        actions = actions.argmax(-1)
    joint = " ".join("(" + ",".join(str(a) for a in step.tolist()) + ")" for step in actions)
    return joint, rollout["next", "agents", "reward"][0, :, 0, 0].sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", default=",".join(GAMES))
    parser.add_argument("--algorithms", default=",".join(VALUE_BASED + ACTOR_CRITIC))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--csv", type=Path, default=None, help="write one row per run here")
    args = parser.parse_args()
    games, algorithms = args.games.split(","), args.algorithms.split(",")
    for name, known in (("game", GAMES), ("algorithm", VALUE_BASED + ACTOR_CRITIC)):
        bad = [x for x in (games if name == "game" else algorithms) if x not in known]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r}; accepted: {', '.join(known)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for game in games:
            for algorithm in algorithms:
                for seed in range(args.seeds):
                    run_dir = Path(tmp) / f"{game}-{algorithm}-{seed}"
                    cfg = make_config(algorithm, overrides=overrides(algorithm, game, seed, args.frames, run_dir))
                    result = pipeline_for(algorithm).train(cfg)
                    joint, ret = greedy_play(game, result.policy)
                    rows.append({"game": game, "algorithm": algorithm, "seed": seed, "frames": args.frames,
                                 "greedy_joint_action": joint, "greedy_return": ret})
                    print(f"{game} {algorithm} seed {seed}: {joint} -> {ret:g}", flush=True)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    print(f"\nGreedy joint action and return after {args.frames:,} frames, {args.seeds} seeds "
          "(value-based: full exploration; count of seeds per joint action)\n")
    print("| algorithm | " + " | ".join(f"{g} (optimum {GAMES[g]:g})" for g in games) + " |")
    print("|---" * (len(games) + 1) + "|")
    for algorithm in algorithms:
        cells = []
        for game in games:
            runs = [r for r in rows if r["game"] == game and r["algorithm"] == algorithm]
            counts: dict[str, int] = {}
            for r in runs:
                counts[r["greedy_joint_action"]] = counts.get(r["greedy_joint_action"], 0) + 1
            mean = sum(r["greedy_return"] for r in runs) / len(runs)
            optimal = sum(r["greedy_return"] == GAMES[game] for r in runs)
            actions = ", ".join(f"{a} x{n}" for a, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            cells.append(f"{actions}; mean {mean:.2f}, optimal {optimal}/{len(runs)}")
        print(f"| {algorithm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
