"""Benchmark: MAPPO end to end on a GPU (env, policy, batches and losses all on the device).

Two measurements, each a real training run through ``marlkit.pipelines.mappo.train``:

1. the ``navigation-matched`` preset (60 VMAS envs, 6,000 frames per batch, 120k frames);
2. a large batch: VMAS navigation with ``--num-envs`` copies (default 4,096) and 100 steps per copy
   per batch, minibatches of 1/10 of a batch, ``--iterations`` iterations;

plus the collection alone (TorchRL's collector with the MAPPO actor) at the large batch. It prints
frames/s of the whole loop, of collection and of training.

    python benchmarks/gpu.py [--device cuda] [--num-envs 4096] [--iterations 5] [--matched-frames 120000]

Without a CUDA device it says so and measures nothing (``--device cpu`` runs the same code on CPU,
which the tests use on tiny sizes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_speed(overrides: dict, preset: str | None, device: str, run_dir: Path) -> dict[str, float]:
    """Frames/s of a MAPPO run and its collection / training seconds (from its metrics)."""
    from marlkit.pipelines import make_config
    from marlkit.pipelines.mappo import train
    from marlkit.pipelines.plots import read_metrics

    cfg = make_config("mappo", preset, {**overrides, "device": device, "logger.run_dir": str(run_dir),
                                         "logger.progress": False})
    result = train(cfg)
    metrics = read_metrics(run_dir)
    return {"frames": result.frames, "frames_per_s": result.frames_per_s,
            "collection_s": float(metrics["timers/collection_s"].sum()),
            "training_s": float(metrics["timers/training_s"].sum())}


def collection_speed(num_envs: int, device: str, batches: int = 5) -> float:
    """Frames/s of TorchRL's collector with a MAPPO actor on ``num_envs`` VMAS navigation copies."""
    from marlkit.envs import make_env
    from marlkit.modules import make_stochastic_actor
    from torchrl.collectors import Collector

    env = make_env("vmas/navigation", num_envs=num_envs, device=device, seed=0, max_steps=100)
    actor = make_stochastic_actor(env, "agents", num_cells=[256, 256], activation="tanh", share_params=True,
                                  device=torch.device(device))
    collector = Collector(env, actor, frames_per_batch=num_envs * 100, total_frames=-1, device=device,
                          storing_device=device, auto_register_policy_transforms=False)
    batches_iter = iter(collector)
    next(batches_iter)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, frames = time.perf_counter(), 0
    for _ in range(batches):
        frames += next(batches_iter).numel()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    collector.shutdown()
    return frames / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-envs", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--matched-frames", type=int, default=120_000)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (run this on a GPU machine)")
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), torch {torch.__version__}\n")
    print("| run | frames | loop frames/s | collection s | training s |")
    print("|---|---|---|---|---|")
    big = args.num_envs * 100
    with tempfile.TemporaryDirectory() as scratch:
        matched = train_speed({"collector.total_frames": args.matched_frames}, "navigation-matched", args.device,
                              Path(scratch) / "matched")
        print(f"| navigation-matched | {matched['frames']:,} | {matched['frames_per_s']:,.0f} | "
              f"{matched['collection_s']:.1f} | {matched['training_s']:.1f} |", flush=True)
        large = train_speed({"env.name": "vmas/navigation", "env.num_envs": args.num_envs,
                             "collector.frames_per_batch": big, "collector.total_frames": big * args.iterations,
                             "train.minibatch_size": big // 10}, None, args.device, Path(scratch) / "large")
        print(f"| navigation, {args.num_envs:,} envs | {large['frames']:,} | {large['frames_per_s']:,.0f} | "
              f"{large['collection_s']:.1f} | {large['training_s']:.1f} |", flush=True)
    print(f"\ncollection alone (collector + MAPPO actor), {args.num_envs:,} envs: "
          f"{collection_speed(args.num_envs, args.device):,.0f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
