"""Benchmark: SUPER's replay alone at the paper's size, and the same with another marlkit checkout.

Builds a ``pursuit-super``-shaped :class:`~marlkit.pipelines.replay.SharedReplay` (8 agents, prioritized,
memmap files under a temporary folder), fills every agent's buffer to ``--capacity`` with random
transitions of pursuit's shapes and random priorities, then times what one update asks of the replay:
``sample()`` (the draw over the shared priority table and the gather of every agent's fields) and
``update_priority()`` (re-prioritising the drawn slots), one torch thread. ``--other PATH`` runs the same in
a process importing the marlkit package found at PATH (a folder holding ``marlkit/``), interleaved round by
round. Every process draws the same slots from the same table, so the checksums printed must agree
between two checkouts that claim to sample the same way.

    python benchmarks/replay_cost.py [--rounds 3] [--updates 2000] [--capacity 120000] [--other PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import inspect, sys, tempfile, time
from pathlib import Path
import torch
from tensordict import TensorDict
from marlkit.pipelines.replay import ExperienceSelector, SharedReplay

capacity, updates = int(sys.argv[1]), int(sys.argv[2])
agents, batch, group = 8, 32, "pursuer"
torch.set_num_threads(1)
torch.manual_seed(0)
# as pursuit-super builds it: observations agent-major for its batched MLPs (older checkouts lack the option)
layout = {"agent_major": True} if "agent_major" in inspect.signature(SharedReplay).parameters else {}
with tempfile.TemporaryDirectory() as tmp:
    replay = SharedReplay(group, agents, capacity, batch, scratch_dir=Path(tmp), device=torch.device("cpu"),
                          selector=ExperienceSelector("none", agents), score=None, prioritized=True,
                          new_priority=1.0, **layout)
    for buffer in replay.buffers:  # one agent's share of pursuit's transitions: 7x7x3 views
        buffer.extend(TensorDict({
            group: {"observation": torch.rand(capacity, 7, 7, 3), "action": torch.randint(0, 5, (capacity,))},
            "next": {group: {"observation": torch.rand(capacity, 7, 7, 3), "reward": torch.rand(capacity, 1),
                             "done": torch.zeros(capacity, 1, dtype=torch.bool),
                             "terminated": torch.zeros(capacity, 1, dtype=torch.bool)}}}, batch_size=[capacity]))
    replay.table.set(torch.arange(capacity).expand(agents, capacity), torch.rand(agents, capacity) * 5 + 1e-6)
    checksum = 0.0

    def update():
        global checksum
        minibatch = replay.sample()
        observation = minibatch[group, "observation"]
        # squared TD errors as the loss would write them, from the drawn data so they vary
        replay.update_priority(minibatch, (observation[..., 0, 0, 0] - 0.5).pow(2).unsqueeze(-1))
        checksum += float(observation.contiguous().sum() + minibatch["priority_weight"].sum())

    for _ in range(min(50, updates)):
        update()
    start = time.perf_counter()
    for _ in range(updates):
        update()
    print((time.perf_counter() - start) / updates * 1e3, repr(checksum))
"""


def run(capacity: int, updates: int, pythonpath: str | None) -> tuple[float, str]:
    """Milliseconds per sample + re-prioritisation, and the run's checksum."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MARLKIT_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", CHILD, str(capacity), str(updates)], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()[-1].split()  # after TorchRL's log lines
    return float(out[0]), out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=120_000, help="transitions per agent's buffer (the paper's)")
    parser.add_argument("--other", default=None, help="PYTHONPATH of another marlkit checkout to run beside this one")
    args = parser.parse_args()
    if args.capacity < 32 or args.updates < 1:
        parser.error(f"need --capacity >= 32 (one minibatch) and --updates >= 1, got {args.capacity}, {args.updates}")
    codes = {"this": None} | ({"other": args.other} if args.other else {})  # None: the marlkit this Python imports
    results: dict[str, list[float]] = {}
    checksums: dict[str, set[str]] = {}
    for round_ in range(args.rounds):
        for name, path in codes.items():
            ms, checksum = run(args.capacity, args.updates, path)
            results.setdefault(name, []).append(ms)
            checksums.setdefault(name, set()).add(checksum)
            print(f"round {round_}: {name}: {ms:.3f} ms per update (checksum {checksum})", flush=True)
    print("\n| code | ms per sample + re-prioritisation (each round) | median | checksum |")
    print("|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} | "
              f"{', '.join(sorted(checksums[name]))} |")


if __name__ == "__main__":
    main()
