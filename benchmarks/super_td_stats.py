"""Benchmark: what the TD loss and the gradient clip see in a SUPER (``pursuit-super``) run.

Trains ``iql --preset pursuit-super`` (one torch thread, no evaluation or checkpoint inside) for ``--frames``
env steps with ``--set`` overrides, and reports, per stretch of updates:

* the share of replayed |TD errors| above 1, where the Huber loss (delta 1, RLlib's DQN loss, the
  preset's ``smooth_l1``) and the squared error (``l2``) differ: the squared error's gradient grows with
  the error there, the Huber loss's stays at 1;
* the gradient norm the clip sees, one over all pursuers (marlkit's ``max_grad_norm``) and each
  pursuer's own (the norm of the gradient of its own mean loss, ``n_agents`` times its part of the
  batched gradient, since the loss averages over every pursuer's samples): RLlib gives every pursuer
  its own policy and optimiser, so it clips the second; and how often each is above ``max_grad_norm``.

It reads the gradients through hooks on the loss's parameters and the TD errors the loss writes for the
replay priorities; the training itself runs unchanged.

    python benchmarks/super_td_stats.py [--frames 100000] [--stretches 8] [--set loss.loss_function=l2 ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def train_and_record(frames: int, overrides: dict[str, str]) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Train with the preset and ``overrides``; per update the replayed |TD errors| and each pursuer's
    own-loss gradient norm (``[n_agents]``); and the clip threshold."""
    from marlkit.pipelines import make_config
    from marlkit.pipelines import qlearning

    td: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    build = qlearning.build_learners

    def instrumented(*args, **kwargs):
        learners = build(*args, **kwargs)
        learner = learners["pursuer"]
        params = list(learner.loss.parameters())
        squares: list[torch.Tensor] = []

        def on_grad(grad: torch.Tensor) -> None:
            squares.append(grad.detach().reshape(grad.shape[0], -1).pow(2).sum(1))  # per pursuer
            if len(squares) == len(params):  # every parameter's gradient of this update
                norms.append(torch.stack(squares).sum(0).sqrt() * grad.shape[0])
                squares.clear()

        for p in params:
            p.register_hook(on_grad)
        replay = learner.replay
        update_priority = replay.update_priority

        def recorded(minibatch, squared_td_error):
            td.append(squared_td_error.detach().sqrt().reshape(-1))
            return update_priority(minibatch, squared_td_error)

        replay.update_priority = recorded
        return learners

    qlearning.build_learners = instrumented
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = make_config("iql", "pursuit-super", {
                "collector.total_frames": frames, "logger.run_dir": str(Path(tmp) / "run"),
                "logger.progress": False, "logger.eval_every": 10**9, "logger.checkpoint_every": 10**9,
                "logger.eval_parallel": False, **overrides})
            qlearning.train(cfg)
    finally:
        qlearning.build_learners = build
    return td, norms, cfg.train.max_grad_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000, help="env steps (updates start after 1,000)")
    parser.add_argument("--stretches", type=int, default=8, help="rows: the updates in this many equal stretches")
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value overrides of the preset")
    args = parser.parse_args()
    bad = [item for item in args.set if "=" not in item]
    if bad:
        raise SystemExit(f"--set takes section.field=value, got {bad}")
    if args.stretches < 1:
        raise SystemExit(f"--stretches must be >= 1, got {args.stretches}")
    os.environ.setdefault("MARLKIT_THREADS", "1")
    torch.set_num_threads(1)
    td, norms, clip = train_and_record(args.frames, dict(item.split("=", 1) for item in args.set))
    n = min(len(td), len(norms))
    if n < args.stretches:
        raise SystemExit(f"--frames {args.frames} made {n} updates, fewer than --stretches {args.stretches}: raise it")
    print(f"pursuit-super {' '.join(args.set) or '(preset as is)'}: {n} updates, clip at {clip}")
    print("\n| updates | share of abs(TD) > 1 | mean abs(TD) | all pursuers' norm: median / max / share > clip "
          "| a pursuer's own norm: median / max / share > clip |")
    print("|---|---|---|---|---|")
    for k in range(args.stretches):
        lo, hi = k * n // args.stretches, (k + 1) * n // args.stretches
        errors = torch.cat(td[lo:hi])
        own = torch.stack(norms[lo:hi])  # [updates, n_agents]
        joint = own.pow(2).sum(1).sqrt() / own.shape[1]  # the norm of the batched gradient itself
        print(f"| {lo}-{hi} | {(errors > 1).float().mean():.3f} | {errors.mean():.3f} "
              f"| {joint.median():.2f} / {joint.max():.2f} / {(joint > clip).float().mean():.4f} "
              f"| {own.median():.2f} / {own.max():.2f} / {(own > clip).float().mean():.4f} |")


if __name__ == "__main__":
    main()
