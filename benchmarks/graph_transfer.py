"""Benchmark: policies trained with one number of agents, evaluated with more (VMAS navigation).

Each arm trains MAPPO with the ``navigation-matched`` settings on 3 agents, then ``marlkit eval`` runs its
greedy policy with 3, 5 and 7 agents (``env.n_agents=K``; the observation of a navigation agent has the
same size for any agent count). Arms: ``mlp`` (one MLP shared by the agents), ``gnn`` (GATv2 message
passing over all pairs of agents), ``deepsets`` and ``mlp-separate`` (one MLP per agent, which cannot act
for another agent count: its row says so). Every finished run's evaluations are written to
``<out>/<arm>_seed<seed>.json``; runs whose file exists are skipped, and the table is made from the files.

    python benchmarks/graph_transfer.py [--arms mlp,gnn] [--seeds 3] [--frames 120000] [--episodes 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from _child import run_child

ARMS = {"mlp": {}, "gnn": {"model.kind": "gnn"},
        "gnn-radius": {"model.kind": "gnn", "model.gnn_topology": "radius", "model.gnn_radius": 0.5},
        "deepsets": {"model.kind": "deepsets"}, "mlp-separate": {"model.share_params": False}}
AGENTS = (3, 5, 7)


def evaluate(run_dir: Path, agents: int, episodes: int) -> dict:
    """The greedy policy's mean return with ``agents`` agents, or why it cannot act for them."""
    from marlkit.pipelines.runs import evaluate_run

    try:
        result = evaluate_run(run_dir, episodes=episodes, env_overrides=[f"env.n_agents={agents}"])
    except ValueError as err:
        return {"error": str(err).split(": ", 1)[-1]}
    return {"mean": result["groups"]["agents"]["mean"]}


def cell(values: list[dict]) -> str:
    errors = [v["error"] for v in values if "error" in v]
    if errors:
        return f"cannot act ({errors[0].split(';')[0]})"
    means = [v["mean"] for v in values]
    half = 1.96 * statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else 0.0
    return f"{statistics.mean(means):.2f} ± {half:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="mlp,gnn,deepsets,mlp-separate")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=120_000)
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "graph_transfer"))
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value for every run (tiny checks)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; accepted: {', '.join(ARMS)}")
    extra = dict(item.split("=", 1) for item in args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms if not (out / f"{arm}_seed{seed}.json").exists()]
    print(f"{len(jobs)} runs to do; results in {out}", flush=True)
    for arm, seed in jobs:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            run_child("mappo", "navigation-matched", {**ARMS[arm], "seed": seed, "collector.total_frames": args.frames,
                                                      **extra}, run_dir)
            result = {str(k): evaluate(run_dir, k, args.episodes) for k in AGENTS}
        (out / f"{arm}_seed{seed}.json").write_text(json.dumps(result, indent=2))
        print(f"{arm} seed {seed}: {result}", flush=True)
    print(f"\nMAPPO on vmas/navigation, trained with 3 agents ({args.frames:,} frames), greedy return with K agents, "
          f"mean and 95% interval over seeds ({args.episodes} episodes each)\n")
    print("| actor | " + " | ".join(f"K = {k}" for k in AGENTS) + " | seeds |")
    print("|---|" + "---|" * (len(AGENTS) + 1))
    for arm in arms:
        runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{arm}_seed*.json"))][: args.seeds]
        if runs:
            print(f"| {arm} | " + " | ".join(cell([r[str(k)] for r in runs]) for k in AGENTS) + f" | {len(runs)} |")


if __name__ == "__main__":
    main()
