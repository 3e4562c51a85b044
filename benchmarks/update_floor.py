"""Benchmark: the floor under a SUPER (``pursuit-super``) update, and what ``torch.compile`` takes off it.

One update of the 8 pursuers' dueling double DQN, written as plain tensor code with no TensorDict, replay or
loss module around it: the online network on 32 observations per agent (7x7x3, flat), the target and online
networks on the next ones (double Q), the TD target, the importance-weighted squared error, backward, one
gradient-norm clip over all parameters and fused Adam. The networks are one batched matmul per layer for
all agents, as marlkit's ``AgentMLP`` runs them. It is timed eagerly and with the loss compiled
(``torch.compile``, inductor; its backward is compiled with it), interleaved round by round, one thread.
``python benchmarks/super_update_cost.py`` times marlkit's whole update (replay draw and re-prioritisation
included) for comparison.

    python benchmarks/update_floor.py [--rounds 3] [--updates 2000] [--threads 1] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

AGENTS, BATCH, OBS, HIDDEN, ACTIONS = 8, 32, 7 * 7 * 3, 64, 5


def q_values(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Dueling Q values ``[agents, batch, actions]`` of every agent's MLP [64, 64] (ReLU)."""
    w1, b1, w2, b2, w3, b3 = params
    h = torch.relu(torch.bmm(x, w1.transpose(1, 2)) + b1.unsqueeze(1))
    h = torch.relu(torch.bmm(h, w2.transpose(1, 2)) + b2.unsqueeze(1))
    out = torch.bmm(h, w3.transpose(1, 2)) + b3.unsqueeze(1)
    value, advantage = out[..., :1], out[..., 1:]
    return value + advantage - advantage.mean(-1, keepdim=True)


def td_loss(params: list[torch.Tensor], target: list[torch.Tensor], obs: torch.Tensor, next_obs: torch.Tensor,
            action: torch.Tensor, reward: torch.Tensor, terminated: torch.Tensor,
            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted double-DQN loss and the squared TD errors (the new priorities)."""
    chosen = q_values(params, obs).gather(-1, action.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        best = q_values(params, next_obs).argmax(-1, keepdim=True)
        next_value = q_values(target, next_obs).gather(-1, best).squeeze(-1)
        goal = reward + 0.99 * next_value * (~terminated)
    squared = (chosen - goal).pow(2)
    return (squared * weight).mean(), squared.detach()


def timed(loss_fn, rounds_of: int) -> float:
    """Milliseconds per update (median of 5 blocks of ``rounds_of // 5`` updates, after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(AGENTS, HIDDEN, OBS), (AGENTS, HIDDEN), (AGENTS, HIDDEN, HIDDEN), (AGENTS, HIDDEN),
              (AGENTS, ACTIONS + 1, HIDDEN), (AGENTS, ACTIONS + 1)]
    params = [(torch.randn(s, generator=g) * 0.1).requires_grad_() for s in shapes]
    target = [p.detach().clone() for p in params]
    data = (torch.rand(AGENTS, BATCH, OBS, generator=g), torch.rand(AGENTS, BATCH, OBS, generator=g),
            torch.randint(0, ACTIONS, (AGENTS, BATCH), generator=g), torch.randn(AGENTS, BATCH, generator=g),
            torch.zeros(AGENTS, BATCH, dtype=torch.bool), torch.rand(AGENTS, BATCH, generator=g))
    adam = torch.optim.Adam(params, lr=1.6e-4, fused=True)

    def update() -> None:
        loss, _ = loss_fn(params, target, *data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 40.0)
        adam.step()
        adam.zero_grad(set_to_none=True)

    for _ in range(50):
        update()
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds_of // 5):
            update()
        blocks.append((time.perf_counter() - start) / (rounds_of // 5) * 1000)
    return statistics.median(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2000, help="timed updates per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="eager only (no inductor compilation)")
    args = parser.parse_args()
    if args.rounds < 1 or args.updates < 5:
        raise SystemExit(f"--rounds must be >= 1 and --updates >= 5, got {args.rounds} and {args.updates}")
    torch.set_num_threads(args.threads)
    variants = {"eager": td_loss}
    if not args.no_compile:
        start = time.perf_counter()
        compiled = torch.compile(td_loss)
        timed(compiled, 5)  # compiles forward and backward
        print(f"compiling took {time.perf_counter() - start:.1f} s", flush=True)
        variants["compiled"] = compiled
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(timed(fn, args.updates))
            print(f"round {round_}: {name} {results[name][-1]:.3f} ms per update", flush=True)
    print(f"\n| loss | ms per update (each round, {args.threads} thread(s)) | median |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
