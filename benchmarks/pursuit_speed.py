"""Benchmark: env frames/s of SISL pursuit, PettingZoo's simulator against the tensor env, at the SUPER setup.

Random-action rollouts (a frame is one env step of one copy; 8 pursuers act in each) through
``make_env``: PettingZoo's ``sisl/pursuit_v5`` (copies stepped one after another in a ``SerialEnv``)
and ``pursuit`` at 1, 16, 64, 256 and 1,024 copies; then TorchRL's collector with the SUPER preset's
Q-network policy (8 independent MLPs [64, 64] in one batched pass, epsilon-greedy).

    python benchmarks/pursuit_speed.py [--device cpu|cuda] [--threads 2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def rollout_speed(env, seconds: float) -> float:
    """Frames/s of random-action steps (with auto-reset) for about ``seconds``."""
    td = env.reset()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        td = env.rand_action(td)
        _, td = env.step_and_maybe_reset(td)
        steps += 1
    return steps * env.batch_size.numel() / (time.perf_counter() - start)


def collector_speed(copies: int, device: str, seconds: float) -> float:
    """Frames/s of TorchRL's collector with the SUPER Q-network policy on ``copies`` tensor copies."""
    from torchrl.collectors import Collector

    from marlkit.envs import make_env
    from marlkit.modules import EpsilonGreedy, group_spec, make_q_network
    from tensordict.nn import TensorDictSequential

    env = make_env("pursuit", num_envs=copies, device=device, seed=0, shared_reward=False)
    q_net = make_q_network(env, "pursuer", num_cells=[64, 64], activation="relu", share_params=False,
                           dueling=True, flatten_images=True, device=device)
    explore = EpsilonGreedy(group_spec(env, "pursuer", "action"), ("pursuer", "action"), eps_init=0.1,
                            eps_end=0.1, annealing_frames=1).to(device)
    policy = TensorDictSequential(q_net, explore)
    collector = Collector(env, policy, frames_per_batch=copies * 10, total_frames=-1, device=device)
    frames, start = 0, None
    for batch in collector:
        if start is None:  # the first batch pays for start-up
            start = time.perf_counter()
            continue
        frames += batch.numel()
        if time.perf_counter() - start > seconds:
            break
    collector.shutdown()
    return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--copies", default="1,16,64,256,1024")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from marlkit.envs import make_env

    kwargs = {"shared_reward": False}  # the SUPER setup: PettingZoo's defaults otherwise
    rows = []
    for copies in (1, 4):
        env = make_env("pettingzoo/sisl/pursuit_v5", num_envs=copies, seed=0, **kwargs)
        rows.append(("pettingzoo/sisl/pursuit_v5", copies, "random", rollout_speed(env, args.seconds)))
        env.close()
    base = rows[0][3]
    for copies in [int(c) for c in args.copies.split(",")]:
        env = make_env("pursuit", num_envs=copies, device=args.device, seed=0, **kwargs)
        rows.append(("pursuit", copies, "random", rollout_speed(env, args.seconds)))
    for copies in (64, 256):
        rows.append(("pursuit", copies, "collector + Q policy", collector_speed(copies, args.device, args.seconds)))
    print(f"\nSISL pursuit, SUPER setup (8 pursuers, 30 evaders, 16x16), device {args.device}, "
          f"{args.threads} torch threads\n")
    print("| env | copies | actions | frames/s | vs PettingZoo (1 copy) |")
    print("|---|---|---|---|---|")
    for name, copies, how, fps in rows:
        print(f"| {name} | {copies} | {how} | {fps:,.0f} | {fps / base:.0f}x |")


if __name__ == "__main__":
    main()
