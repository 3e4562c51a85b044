"""Setting a run up and closing it: what every pipeline's ``train`` does before and after its loop.

``train`` reads as: :func:`start_run` (checks, run directory, env, teams), build the learners,
:func:`start_training` (optimisers, collector, reporting, evaluation, checkpoints, a resumed run's
state), the loop, then :func:`end_iteration` at the end of each iteration and :func:`finish_run`.
"""

from __future__ import annotations

import atexit
import dataclasses
import signal
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.collectors import BaseCollector

from marlkit.envs import device_of, MultiAgentEnv

from .checkpoint import Checkpointer, learning_state, restore_rollout, restore_training
from .collectors import CollectorFailed, make_collector, seed_generators, worker_failure
from .config import RunConfig
from .curriculum import Curriculum, parse_curriculum, stage_env_config, stage_seed
from .environment import build_env, check_curriculum_specs, resolve_env_config
from .evaluate import EvaluationFailed, Evaluator
from .learners import check_finite, Learner, make_optimiser, TrainingDiverged
from .memory import keep_freed_memory
from .precision import apply_matmul_precision
from .reporting import Reporter, TrainResult
from .rundir import open_run_dir, RunDir, RunStart
from .teams import with_teams
from .threads import thread_setting, thread_setting_chosen, ThreadGovernor


@dataclass
class Run:
    """A run being set up: its checked config (env resolved, teams filled in), directory, start and env."""

    cfg: RunConfig
    """The resolved config (what ``config.yaml`` records)."""
    iterations: int
    """Iterations to run in total."""
    device: torch.device
    """Where the env, modules and batches live."""
    dir: RunDir
    """The run directory."""
    start: RunStart
    """Where the run starts (a resumed run's checkpoint and counters)."""
    env: MultiAgentEnv
    """The training env."""
    threads: ThreadGovernor
    """Torch's intra-op thread count: fixed by the user, or adapted to the machine's load (:mod:`.threads`)."""
    precision_before: str = "highest"
    """The process's float32 matmul precision before the run set ``cfg.matmul_precision``; restored at its end."""

    @property
    def buffers(self) -> Path:
        """Where the off-policy replays keep their files."""
        return self.dir.buffers


def start_run(cfg: RunConfig, resume: bool, checked_iterations: Callable[[RunConfig], int]) -> Run:
    """Check ``cfg`` (``checked_iterations`` checks it and returns the iteration count), open the run directory (its checkpoint
    when ``resume``), seed the generators, build the env and resolve the teams."""
    iterations = checked_iterations(cfg)
    fixed = thread_setting()
    cfg = dataclasses.replace(cfg, env=resolve_env_config(cfg.env))
    device = device_of(cfg.device)
    run_dir, start = open_run_dir(cfg, resume)
    if start.state is not None and not thread_setting_chosen():  # sums add in the same order as before the stop
        fixed = start.state.get("threads")
    threads = ThreadGovernor(fixed)
    precision_before = apply_matmul_precision(cfg.matmul_precision)
    keep_freed_memory()  # large per-step tensors reuse heap memory instead of page-faulting
    seed_generators(cfg.seed)
    stage = start.state.get("curriculum", {}).get("env_stage", 0) if start.state else 0
    env = build_env(stage_env_config(cfg.env, stage), device=device, seed=stage_seed(cfg.seed, stage), model=cfg.model)
    if cfg.env.curriculum:
        check_curriculum_specs(cfg.env, env, seed=cfg.seed)
    cfg = with_teams(cfg, env, device)
    return Run(cfg, iterations, device, run_dir, start, env, threads, precision_before)


@dataclass
class Training:
    """What the loop uses besides its learners."""

    optimisers: dict[str, torch.optim.Optimizer]
    """The Adams by name: one per learner over its loss's parameters, or the pipeline's own (HAPPO: one
    per agent and one per critic)."""
    policy: TensorDictSequential
    """Every learner's acting policy, in turn."""
    collecting: TensorDictSequential
    """What the collector runs: each learner's policy, then what it also runs while collecting."""
    collector: BaseCollector
    """Yields one batch per iteration (``collector.backend`` chooses which TorchRL collector)."""
    reporter: Reporter
    """Rows, logger, bar, summary."""
    evaluator: Evaluator
    """Scheduled evaluations and videos."""
    checkpointer: Checkpointer
    """Scheduled checkpoints."""
    curriculum: Curriculum | None = None
    """Where the run is in ``env.curriculum`` (None without one)."""
    stop_signal: int | None = None
    """SIGINT or SIGTERM once one arrived: the iteration under way finishes, is checkpointed, and the loop ends."""
    stopping: bool = False
    """The iteration just ended saw the stop signal when it began its end and was checkpointed for it; a signal
    arriving later than that (while its row or checkpoint was written) stops the run after the next iteration."""
    _previous_handlers: dict[int, Any] = field(default_factory=dict)
    _at_exit: Callable[[], None] | None = None

    def batches(self, run: Run):
        """``(iteration, batch)`` from the run's first iteration to its last, timing each collection; after
        a SIGINT / SIGTERM, none after the iteration under way (which :func:`end_iteration` checkpoints)."""
        batches = iter(self.collector)
        for iteration in range(run.start.iteration, run.iterations):
            if self.curriculum is not None and self.curriculum.stage > self.curriculum.env_stage:
                batches = self._next_stage(run, iteration)
            try:
                batch = next(batches)
            except Exception as err:
                failure = worker_failure(self.collector, err)
                if failure is None:
                    raise
                self.collector.shutdown()
                self.reporter.flush()  # rows waiting for a parallel evaluation are kept
                raise CollectorFailed(f"a collector worker died ({failure}); the run stopped at iteration {iteration}") from None
            self.reporter.collected()
            yield iteration, batch
            if self.stopping:
                return

    def _next_stage(self, run: Run, iteration: int):
        """Swap in the env of the curriculum's stage and a collector over it (episodes start afresh)."""
        stage = self.curriculum.stage
        self.collector.shutdown()  # closes the old env
        run.env = build_env(stage_env_config(run.cfg.env, stage), device=run.device, seed=stage_seed(run.cfg.seed, stage),
                            model=run.cfg.model)
        self.collector = make_collector(run.env, self.collecting, run.cfg, device=run.device, start_iteration=iteration)
        if self.evaluator.env is not None:
            self.evaluator.use_env(stage_env_config(run.cfg.env, stage))
        self.curriculum.env_stage = stage
        return iter(self.collector)

    def catch_stop_signals(self) -> None:
        """SIGINT / SIGTERM end the run after the current iteration instead of wherever they land (a
        second one stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def end_workers_at_exit(self) -> None:
        """If the run dies (a second Ctrl-C, an error), end its collector's worker processes when the
        interpreter exits: Python's exit waits for TorchRL's (non-daemon) workers, which wait for a command
        that never comes, and they ignore stop signals (:func:`stop_signals_left_to_the_run`).
        :func:`finish_run` takes this back."""
        ref = weakref.ref(self)

        def end() -> None:
            training = ref()
            if training is not None:
                training.collector.shutdown()

        self._at_exit = end
        atexit.register(end)  # after multiprocessing's own exit hook, so it runs before it

    def restore_signal_handlers(self) -> None:
        """Put back the handlers :meth:`catch_stop_signals` replaced."""
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers.clear()


class TrainingStopped(Exception):
    """The run was stopped by SIGINT / SIGTERM; its last iteration was checkpointed, so it can resume."""

    def __init__(self, signum: int, run_dir: Path, iteration: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; "
                         f"checkpoint saved, continue with: marlkit train --resume {run_dir}")
        self.signum, self.run_dir, self.iteration = signum, run_dir, iteration


def start_training(run: Run, learners: Mapping[str, Learner], *, lr: float, adam_eps: float,
                   init_random_frames: int = 0, derived: Mapping[str, Any] | None = None,
                   optimisers: Mapping[str, torch.optim.Optimizer] | None = None) -> Training:
    """Optimisers (one per learner over its loss's parameters, unless a pipeline gives its own by name),
    the policy and its collector, ``config.yaml`` (with ``derived`` values), reporting, evaluation and
    checkpoints; a resumed run gets its weights, optimisers, replays, episodes in flight and random
    streams back (the last of these last, so nothing after it draws random numbers)."""
    if optimisers is None:
        optimisers = {name: make_optimiser(learner.loss.parameters(), lr, adam_eps) for name, learner in learners.items()}
    optimisers = dict(optimisers)
    state = run.start.state
    if state is not None:
        restore_training(state, dict(learners), optimisers)
    policy = TensorDictSequential(*(learner.policy for learner in learners.values()))
    collecting = TensorDictSequential(*(module for learner in learners.values()
                                        for module in (learner.policy, learner.collecting) if module is not None))
    collector = make_collector(run.env, collecting, run.cfg, device=run.device, init_random_frames=init_random_frames,
                               start_iteration=run.start.iteration)
    run.dir.create(run.cfg, extra={"iterations": run.iterations, "groups": run.env.group_map, **(derived or {})})
    reporter = Reporter(run.dir, list(run.env.group_map), run.cfg, run.start)
    best = state.get("best_eval", float("-inf")) if state else float("-inf")
    evaluator = Evaluator(run.cfg, run.dir.path, best, start_frames=run.start.frames, policy=policy)
    checkpointer = Checkpointer(run.dir.path, run.cfg.logger.checkpoint_every)
    curriculum = Curriculum(parse_curriculum(run.cfg.env.curriculum)) if run.cfg.env.curriculum else None
    if curriculum is not None and state is not None:
        curriculum.load_state_dict(state["curriculum"])
        if curriculum.env_stage > 0 and evaluator.env is not None:
            evaluator.use_env(stage_env_config(run.cfg.env, curriculum.env_stage))
    if state is not None:
        restore_rollout(state, run.env, collector)
    training = Training(optimisers, policy, collecting, collector, reporter, evaluator, checkpointer, curriculum)
    training.end_workers_at_exit()
    training.catch_stop_signals()
    return training


def mean_return(row: Mapping[str, Any]) -> float:
    """An iteration's mean episode return, averaged over the groups that finished episodes (NaN if none)."""
    values = [float(v) for k, v in row.items() if k.endswith("/episode_reward_mean") and not k.startswith("eval/")
              and v == v]
    return sum(values) / len(values) if values else float("nan")


def end_iteration(run: Run, training: Training, learners: Mapping[str, Learner], iteration: int,
                  batch: TensorDictBase, terms: Mapping[str, list[TensorDictBase]],
                  extra: Mapping[str, float] | None = None, optimiser_steps: int = 0) -> None:
    """After training on a batch: stop if a step was not finite (:func:`check_finite`), evaluate (when
    due), log the row, checkpoint (when due, and always when it is the last iteration or a stop signal
    arrived)."""
    try:
        check_finite(dict(learners), iteration)
    except TrainingDiverged:
        _collect_evaluation(run, training, learners, iteration, wait=True, optimiser_steps=optimiser_steps)
        training.reporter.flush()  # the rows before the failed iteration are kept
        raise
    stopping = training.stop_signal is not None  # read once: the checkpoint below must be the stopping one
    final = iteration == run.iterations - 1 or stopping
    row = dict(extra or {})
    run.threads.poll()
    row["system/torch_threads"] = torch.get_num_threads()
    frames = training.reporter.frames + batch.numel()

    def snapshot() -> dict[str, Any]:  # what best.pt holds if the worker's evaluation sets a new best
        return {"iteration": iteration, "frames": frames, "optimiser_steps": optimiser_steps,
                **learning_state(dict(learners), training.optimisers, copied=True)}

    evaluator = training.evaluator
    if evaluator.evaluates(iteration, final):  # one at a time: the previous one comes back before the next goes out
        _collect_evaluation(run, training, learners, iteration, wait=True, optimiser_steps=optimiser_steps)
    try:
        evaluated = evaluator.after(iteration, training.policy, final, frames, snapshot)
    except EvaluationFailed:
        training.reporter.flush()  # the rows before this iteration are kept
        raise
    run.threads.reserve(int(evaluator.busy))  # the worker evaluates on a core of its own
    row.update(evaluated or {})
    curriculum = training.curriculum
    if curriculum is not None:
        row["curriculum/stage"] = curriculum.env_stage
    training.reporter.log(iteration, batch, terms, row, complete=evaluated is not None)
    if curriculum is not None:  # the next stage's env, if earned, comes before the next collection
        curriculum.after_iteration(training.reporter.frames, mean_return(training.reporter.row))
    # a checkpoint (and the run's end) waits for the evaluation under way: its rows, best mean return and
    # best.pt are complete up to the iteration it saves
    settle = training.checkpointer.due(iteration, final)
    _collect_evaluation(run, training, learners, iteration, wait=settle, optimiser_steps=optimiser_steps)
    training.checkpointer.save(run.cfg, iteration, final, new_best=training.evaluator.new_best,
                               best_eval=training.evaluator.best_eval, frames=training.reporter.frames,
                               optimiser_steps=optimiser_steps, learners=dict(learners),
                               optimisers=training.optimisers, env=run.env, collector=training.collector,
                               time_s=float(training.reporter.row.get("time_s", 0.0)),
                               extra={"threads": run.threads.fixed,  # a resume keeps a fixed count
                                      **({"curriculum": curriculum.state_dict()} if curriculum is not None else {})})
    training.stopping = stopping


def _collect_evaluation(run: Run, training: Training, learners: Mapping[str, Learner], iteration: int, *,
                        wait: bool, optimiser_steps: int) -> None:
    """Fill in the row of the worker's evaluation once it is back (``wait``: block until it is); a new best
    writes best.pt with the evaluated iteration's networks."""
    try:
        done = training.evaluator.finished(wait)
    except EvaluationFailed:
        training.reporter.flush()  # the rows before it are kept, the one it evaluated without its evaluation
        raise
    if done is not None:
        run.threads.reserve(0)  # its core is the run's again
        training.reporter.complete(done.iteration, done.metrics)
        if done.new_best:
            training.checkpointer.save(run.cfg, iteration, False, new_best=False, best=done.snapshot,
                                       best_eval=training.evaluator.best_eval, frames=training.reporter.frames,
                                       optimiser_steps=optimiser_steps, learners=dict(learners),
                                       optimisers=training.optimisers, env=run.env, collector=training.collector,
                                       time_s=float(training.reporter.row.get("time_s", 0.0)))


def finish_run(run: Run, training: Training, **summary: Any) -> TrainResult:
    """Stop the collector (and its env) and the evaluator; write the summary; return the result.

    Raises :class:`TrainingStopped` (after all that) when a SIGINT / SIGTERM ended the run before its
    last iteration; one that arrives while the finished run closes only lets it close.
    """
    try:
        training.collector.shutdown()  # closes the env it steps
        run.env.close(raise_if_closed=False)  # with workers, the run's own env was never stepped
        training.evaluator.close()
        result = training.reporter.finish(run.iterations, training.policy, thread_policy=run.threads.policy,
                                          thread_changes=run.threads.changes, **summary)
    finally:
        run.threads.close()
        torch.set_float32_matmul_precision(run.precision_before)
        training.restore_signal_handlers()
        if training._at_exit is not None:
            atexit.unregister(training._at_exit)
    last = int(result.metrics.get("iteration", -1))
    if training.stop_signal is not None and last < run.iterations - 1:
        raise TrainingStopped(training.stop_signal, run.dir.path, last)
    return result
