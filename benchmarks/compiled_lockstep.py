"""Benchmark: does ``train.compile`` make the eager update's step all along a real SUPER run?

``tests/test_compiled.py`` compares the compiled and the eager update for four steps on a small pursuit.
This trains the real thing (``--preset pursuit-super``, one arm and seed, ``train.compile=true``, one torch
thread, as ``benchmarks/super_pursuit.py`` runs it) and, at every ``--every``-th update, first makes the
eager update (sample, loss, backward, clip, fused Adam, new priorities) from the same state and random
numbers, keeps its result, puts everything it changed back, then lets the compiled update make the step:
so the run is a plain compiled run, and every checked step is compared from an identical state, wherever
the run is (buffers filling, full and overwriting, after hard target copies, priorities grown over
training).

Per checked step it compares the eager and compiled results: the loss; each parameter's change and Adam's
moments (largest difference over the largest value, per tensor, the worst tensor); the priority table
(every slot; a slot drawn by one and not the other shows as a difference of order 1) and the random
numbers consumed. For scale, the last two columns compare each float32 step's parameter changes with the
same step computed in float64 (the compiled update's loss function run uncompiled on float64 copies, then
Adam's arithmetic): what rounding alone does. A wrong term shows far above rounding (checked: gamma 0.98
instead of 0.99 gives 3e-2 on the parameter changes at the start of a run, an importance exponent of 0.5
instead of 0.4 gives 2e-1, while rounding gives 1e-4 there). It prints a table of the checked steps and
the worst of each column, and writes the run's ``metrics.csv`` to ``--out`` when asked (to compare with a
plain compiled run of the same seed).

    OMP_NUM_THREADS=1 python benchmarks/compiled_lockstep.py [--arm quantile] [--seed 3] [--frames 160000]
        [--every 500] [--out DIR] [section.field=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from marlkit.modules.encoders import _FlattenFeatures
from marlkit.pipelines import make_config, qlearning
from marlkit.pipelines.compiled import adam_values, bias_corrections, clip_scale, CompiledQUpdate
from marlkit.pipelines.learners import gradient_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from super_pursuit import ARMS  # noqa: E402  (sibling script)

COLUMNS = ("loss", "param change", "Adam m", "Adam v", "priorities", "eager vs float64", "compiled vs float64")


def _relative(new: torch.Tensor, old: torch.Tensor) -> float:
    """Largest |new - old| over the largest |old| (0 when both are 0)."""
    scale = old.abs().max().item()
    return (new - old).abs().max().item() / scale if scale else float((new != old).any())


class Flat64(torch.nn.Module):
    """The flattening encoder in float64."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.dims).double()


class LockstepUpdate(CompiledQUpdate):
    """The compiled update, which every ``every``-th call first makes the eager step from the same state
    and random numbers, undoes it and compares it with its own (rows in ``checks``)."""

    every = 500
    """Check every this many calls (``--every``); the pipeline builds the update, so a class setting."""
    checks: list[dict[str, float]] = []
    """One row per checked step, from every instance (a run of pursuit has one learner)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def _state(self) -> dict[object, torch.Tensor]:
        """Copies of everything one update changes."""
        first, second, steps = self.adam
        state: dict[object, torch.Tensor] = {}
        for key, p in self.online.items():
            state["param", key], state["m", key], state["v", key] = p.clone(), first[key].clone(), second[key].clone()
            state["step", key] = steps[key].clone()
        for name in ("raw", "scaled", "block_sum", "block_min"):
            state[name] = getattr(self.table, name).clone()
        state["max_priority"] = torch.tensor([b.sampler.max_priority for b in self.replay.buffers], dtype=torch.float64)
        return state

    def _put_back(self, state: dict[object, torch.Tensor]) -> None:
        first, second, steps = self.adam
        for key, p in self.online.items():
            p.copy_(state["param", key])
            first[key].copy_(state["m", key])
            second[key].copy_(state["v", key])
            steps[key].copy_(state["step", key])
        for name in ("raw", "scaled", "block_sum", "block_min"):
            getattr(self.table, name).copy_(state[name])
        for buffer, value in zip(self.replay.buffers, state["max_priority"].tolist(), strict=True):
            buffer.sampler.max_priority = value

    def _eager_step(self) -> torch.Tensor:
        """The eager loop's update (qlearning.train without train.compile), minus the target updater's count."""
        learner = dataclasses.replace(self.learner, target_updater=None, nonfinite=None)
        minibatch = learner.replay.sample()
        out = learner.loss(minibatch)
        gradient_step(learner, self.optimiser, out, self.max_grad_norm)
        learner.replay.update_priority(minibatch, minibatch.get(learner.priority_key))
        return out["loss"].detach()

    def _exact_changes(self, before: dict[object, torch.Tensor]) -> dict[object, torch.Tensor]:
        """The parameter changes of the same step (the same draw) computed in float64, from the state
        ``before``: what both float32 steps approximate. It runs the compiled update's loss function
        uncompiled (the eager loss module keeps float32 buffers), so it calibrates rounding only; the other
        columns compare the two updates' arithmetic."""
        replay = self.replay
        uniform = torch.rand(replay.n_agents, replay.batch_size, dtype=torch.float64)  # as __call__ draws
        lengths = torch.as_tensor(replay.lengths())
        _, batch, weight = self.draw(self._columns[1], lengths, uniform)
        batch = [x.double() if x.is_floating_point() else x for x in batch]
        params = {key: before["param", key].double().requires_grad_() for key in self.online}
        target = {key: value.double() for key, value in self.target.items()}
        network = self.values
        # the flattening encoder casts to float32 (observations may be stored as integers): float64 here
        self.values = torch.nn.Sequential(*[Flat64(m.feature_dims) if isinstance(m, _FlattenFeatures) else m
                                            for m in network])
        try:
            mean, _ = self._loss(params, target, *batch, weight.double())
        finally:
            self.values = network
        grads = dict(zip(params, torch.autograd.grad(mean, list(params.values())), strict=True))
        _, scale = clip_scale(list(grads.values()), self.max_grad_norm)
        group = self.optimiser.param_groups[0]
        step_size, root_correction = torch.tensor(bias_corrections(group["lr"], group["betas"], self.next_count()),
                                                  dtype=torch.float64).unbind()
        changes = {}
        with torch.no_grad():
            for key, p in params.items():
                new, _, _ = adam_values(p, grads[key] * scale, before["m", key].double(), before["v", key].double(),
                                        step_size, root_correction, group["betas"], group["eps"])
                changes[key] = new - p
        return changes

    def __call__(self):
        self.calls += 1
        if self.adam is None or self.calls % self.every:
            return super().__call__()
        with torch.no_grad():
            before, rng = self._state(), torch.get_rng_state()
        eager_loss = self._eager_step()
        with torch.no_grad():
            eager, eager_rng = self._state(), torch.get_rng_state()
            self._put_back(before)
        torch.set_rng_state(rng)
        exact = self._exact_changes(before)
        torch.set_rng_state(rng)
        out = super().__call__()
        with torch.no_grad():
            fused = self._state()
        keys = list(self.online)
        self.checks.append({
            "update": self.calls,
            "stored": min(len(b.storage) for b in self.replay.buffers),
            "loss": _relative(out["loss"], eager_loss),
            "param change": max(_relative(fused["param", k] - before["param", k], eager["param", k] - before["param", k])
                                for k in keys),
            "Adam m": max(_relative(fused["m", k], eager["m", k]) for k in keys),
            "Adam v": max(_relative(fused["v", k], eager["v", k]) for k in keys),
            "priorities": _relative(fused["raw"], eager["raw"]),
            "eager vs float64": max(_relative(eager["param", k] - before["param", k], exact[k].float()) for k in keys),
            "compiled vs float64": max(_relative(fused["param", k] - before["param", k], exact[k].float())
                                       for k in keys),
            "same steps and random numbers": all(torch.equal(fused["step", k], eager["step", k]) for k in keys)
            and torch.equal(torch.get_rng_state(), eager_rng),
        })
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", default="quantile", help=f"one of {', '.join(ARMS)}")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--frames", type=int, default=160_000, help="env steps to train")
    parser.add_argument("--every", type=int, default=500, help="check every this many updates")
    parser.add_argument("--out", type=Path, default=None, help="folder to copy the run's metrics.csv to")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value (tiny budgets)")
    args = parser.parse_args()
    if args.arm not in ARMS:
        parser.error(f"--arm {args.arm!r}: choose one of {', '.join(ARMS)}")
    if args.every < 1:
        parser.error(f"--every {args.every}: need at least 1")
    malformed = [item for item in args.overrides if "=" not in item]
    if malformed:
        parser.error(f"overrides {malformed}: write each as section.field=value")
    torch.set_num_threads(1)
    LockstepUpdate.every = args.every
    qlearning.CompiledQUpdate = LockstepUpdate  # the pipeline's loop, unchanged, with the checking update
    overrides = dict(item.split("=", 1) for item in args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = make_config("iql", "pursuit-super", {**ARMS[args.arm], "logger.eval_parallel": "true", **overrides,
                                                       "train.compile": "true", "seed": str(args.seed),
                                                       "collector.total_frames": str(args.frames),
                                                       "logger.run_dir": tmp, "logger.progress": "false"})
            qlearning.checked_iterations(cfg)  # the pipeline's own checks, before anything is built
        except ValueError as err:  # a config the pipeline refuses: its one-line reason
            parser.error(str(err))
        qlearning.train(cfg)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "metrics.csv", args.out / f"lockstep_{args.arm}_s{args.seed}.csv")
    checks = LockstepUpdate.checks
    if not checks:
        sys.exit("no update was checked: train longer or lower --every")
    print(f"# {args.arm} seed {args.seed}, {args.frames} env steps, every {args.every}th update: eager vs compiled "
          "from the same state (relative differences)")
    print("| update | stored per agent | " + " | ".join(COLUMNS) + " | same steps, random numbers |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for row in checks:
        print(f"| {row['update']} | {row['stored']} | " + " | ".join(f"{row[c]:.1e}" for c in COLUMNS)
              + f" | {'yes' if row['same steps and random numbers'] else 'NO'} |")
    worst = {c: max(row[c] for row in checks) for c in COLUMNS}
    print(f"\n{len(checks)} steps checked; worst: " + ", ".join(f"{c} {v:.1e}" for c, v in worst.items())
          + f"; steps and random numbers equal in {sum(r['same steps and random numbers'] for r in checks)}")


if __name__ == "__main__":
    main()
