"""Evaluating a policy: one episode per env copy with the deterministic policy, with 95% intervals.

:func:`evaluate_policy` is the measurement (``marlkit eval`` uses it on a loaded run); :class:`Evaluator`
runs it, and records videos, on a schedule during training (``logger.eval_every``, ``logger.video_every``)
and keeps the best mean return, in the training process or, with ``logger.eval_parallel``, in a worker
process (:class:`EvaluationWorker`) while training goes on; :class:`MarlEvalLog` keeps every evaluation's
episode returns as the JSON the marl-eval tools read (``logger.marl_eval``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import pickle
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.envs import device_of, MultiAgentEnv, split_env_name

from .collectors import stop_signals_left_to_the_run
from .config import EnvConfig, ModelConfig, RunConfig
from .environment import build_env
from .precision import apply_matmul_precision
from .render import record_rollout
from .rundir import write_atomically

MARL_EVAL_FILE = "marl_eval.json"

# Episodes that have not ended after this many steps are scored at the cap (they are counted).
MAX_EVAL_STEPS = 10_000


def evaluate_policy(env: Any, policy: Any, *, max_steps: int | None) -> dict[str, Any]:
    """One episode per env copy with the deterministic policy; per group mean return and 95% CI.

    Every copy runs to the end of its own episode (TorchRL's ``break_when_all_done``: copies that end
    early repeat their last step), so episodes of any length count; one still running after
    ``max_steps`` (or 10,000) steps is scored there and left out of ``episodes_ended``.
    """
    cap = max_steps or MAX_EVAL_STEPS
    scored = [("next", "done"), *(("next", group, "episode_reward") for group in env.group_map)]
    # only the scored entries of each step are stacked, not every step's observations
    storing = env.storing_only(scored) if isinstance(env, MultiAgentEnv) else contextlib.nullcontext()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC), storing:
        rollout = env.rollout(cap, policy, break_when_any_done=False, break_when_all_done=True)
    return score_rollout(rollout, env.group_map)


def score_rollout(rollout: Any, group_map: Mapping[str, Any]) -> dict[str, Any]:
    """Per group mean return and 95% CI of a ``[episodes, T]`` rollout in which every copy ran to the end
    of its episode (or to the cap), as :func:`evaluate_policy` returns them."""
    episodes = rollout.batch_size[0]
    done = rollout.get(("next", "done"))[..., 0]  # [episodes, T]
    ended = done.any(-1)
    last = torch.full_like(ended, done.shape[-1] - 1, dtype=torch.long)
    first_end = torch.where(ended, done.float().argmax(-1), last)
    envs = torch.arange(episodes)
    groups = {}
    for group in group_map:
        returns = rollout.get(("next", group, "episode_reward"))[envs, first_end].mean((-2, -1))  # [episodes]
        mean = returns.mean().item()
        half = 1.96 * returns.std().item() / math.sqrt(episodes) if episodes > 1 else 0.0
        groups[group] = {"mean": mean, "ci95": [mean - half, mean + half], "returns": returns.tolist()}
    return {"episodes": episodes, "episodes_ended": int(ended.sum()), "steps": done.shape[-1], "groups": groups}


class MarlEvalLog:
    """``<run-dir>/marl_eval.json``: every evaluation during training in the layout the marl-eval tools
    (and BenchMARL) use, ``{env: {task: {algorithm: {"seed_<k>": {"step_<i>": {...}, "absolute_metrics":
    {...}}}}}}``.

    Step ``i`` is the ``i``-th evaluation: ``step_count`` (frames so far), ``return`` (each episode's
    return, averaged over the groups) and ``<group>_return`` per group; ``absolute_metrics`` holds the
    last evaluation's. A resumed run keeps the steps up to its checkpoint's frames and goes on from there.
    """

    def __init__(self, cfg: RunConfig, run_path: Path, start_frames: int):
        family, task = split_env_name(cfg.env.name)
        keys = (family, task or family, cfg.algorithm, f"seed_{cfg.seed}")  # gridworld: task gridworld
        self.path, self.keys = Path(run_path) / MARL_EVAL_FILE, keys
        self.steps: list[dict[str, Any]] = []
        if self.path.is_file() and start_frames > 0:  # a resumed run: what the checkpoint covers
            run = self._run(json.loads(self.path.read_text()))
            steps = sorted((int(key.removeprefix("step_")), step) for key, step in run.items() if key.startswith("step_"))
            self.steps = [step for _, step in steps if step["step_count"] <= start_frames]

    def _run(self, data: dict[str, Any]) -> dict[str, Any]:
        for key in self.keys:
            data = data.get(key, {})
        return data

    def add(self, frames: int, stats: dict[str, Any]) -> None:
        """Record one evaluation (``stats`` as :func:`evaluate_policy` returns) and rewrite the file."""
        groups = stats["groups"]
        per_episode = torch.tensor([g["returns"] for g in groups.values()]).mean(0).tolist()
        step = {"step_count": frames, "return": per_episode, **{f"{g}_return": s["returns"] for g, s in groups.items()}}
        self.steps.append(step)
        run: dict[str, Any] = {f"step_{i}": s for i, s in enumerate(self.steps)}
        run["absolute_metrics"] = {k: v for k, v in step.items() if k != "step_count"}
        family, task, algorithm, seed = self.keys
        write_atomically(self.path, json.dumps({family: {task: {algorithm: {seed: run}}}}, indent=1))


def _evaluation_worker(conn: Any, env_cfg: EnvConfig, device: torch.device, seed: int, model: ModelConfig,
                       policy: Any, max_steps: int | None, matmul_precision: str = "highest") -> None:
    """:class:`EvaluationWorker`'s process: builds its env as :class:`Evaluator` does, then answers
    ``("evaluate", iteration)`` with :func:`evaluate_policy`'s stats of ``policy`` (whose weights the
    training process writes between evaluations), ``("env", env_cfg)`` by rebuilding its env, ``("close",
    None)`` by ending. A failure is sent back as one line."""
    torch.set_num_threads(1)  # one core beside the training process, not a second pool competing with it
    apply_matmul_precision(matmul_precision)  # the products the training process's own evaluation would compute
    try:
        env = build_env(env_cfg, device=device, seed=seed, model=model)
        while True:
            command, argument = conn.recv()
            if command == "close":
                break
            if command == "env":
                env.close()
                env = build_env(argument, device=device, seed=seed, model=model)
            else:
                env.set_seed(seed + argument)
                conn.send(("stats", evaluate_policy(env, policy, max_steps=max_steps)))
        env.close()
    except Exception as err:  # the training process turns it into its error message
        conn.send(("error", f"{type(err).__name__}: {err}"))


class EvaluationFailed(RuntimeError):
    """The evaluation worker died or its evaluation raised: the run stops; rows and checkpoints so far are kept."""


def _end_process(process: Any) -> None:
    if process.is_alive():
        process.kill()  # it does not take SIGTERM (stop_signals_left_to_the_run)
        process.join()


class EvaluationWorker:
    """A process that evaluates a copy of the policy on its own env while training goes on (RLlib's
    ``evaluation_parallel_to_training``); one evaluation at a time.

    The copy's tensors are in shared memory: :meth:`submit` writes the current weights into them and asks
    for an evaluation, :meth:`result` waits for (or polls) its stats. A process started with ``spawn``,
    as TorchRL's collectors start theirs.
    """

    def __init__(self, env_cfg: EnvConfig, *, device: torch.device, seed: int, model: ModelConfig, policy: Any,
                 max_steps: int | None, matmul_precision: str = "highest"):
        self.policy = copy.deepcopy(policy).share_memory()
        self._weights = list(self.policy.state_dict(keep_vars=True).values())
        context = torch.multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_evaluation_worker, daemon=True, name="marlkit-evaluation",
                                       args=(child, env_cfg, device, seed, model, self.policy, max_steps,
                                             matmul_precision))
        try:
            with stop_signals_left_to_the_run():
                self.process.start()  # pickles the env config and the policy copy for the new process
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise ValueError(f"logger.eval_parallel=true could not hand the policy and env to a worker process "
                             f"({type(err).__name__}: {err}); set logger.eval_parallel=false") from None
        finally:
            child.close()
        self.pending: int | None = None
        # a run that fails mid-way (or a notebook dropping it) does not leave the process behind
        weakref.finalize(self, _end_process, self.process)

    def submit(self, iteration: int, policy: Any) -> None:
        """Evaluate ``policy``'s current weights (their copy), reseeding the env from ``iteration``."""
        if self.pending is not None:
            raise RuntimeError(f"the evaluation of iteration {self.pending} has not been collected")
        with torch.no_grad():
            for mine, theirs in zip(self._weights, policy.state_dict(keep_vars=True).values(), strict=True):
                mine.copy_(theirs)
        if any(w.is_cuda for w in self._weights):  # the worker reads them through CUDA IPC, outside this stream
            torch.cuda.synchronize()
        self._send("evaluate", iteration)
        self.pending = iteration

    def use_env(self, env_cfg: EnvConfig) -> None:
        """Evaluate on ``env_cfg`` from the next submitted evaluation on."""
        self._send("env", env_cfg)

    def result(self, wait: bool) -> tuple[int, dict[str, Any]] | None:
        """``(iteration, stats)`` of the submitted evaluation once it is done (``wait``: block until it is);
        None when none is pending or it is still running."""
        if self.pending is None or not (wait or self._conn.poll()):
            return None
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise EvaluationFailed(f"the evaluation worker died (exit code {self.process.exitcode}) while evaluating "
                                   f"iteration {self.pending}; set logger.eval_parallel=false to evaluate in the "
                                   "training process") from None
        if kind == "error":
            raise EvaluationFailed(f"the evaluation of iteration {self.pending} failed in its worker: {value}")
        iteration, self.pending = self.pending, None
        return iteration, value

    def _send(self, command: str, argument: Any) -> None:
        try:
            self._conn.send((command, argument))
        except (BrokenPipeError, ConnectionResetError):
            raise EvaluationFailed(f"the evaluation worker died (exit code {self.process.exitcode}); set "
                                   "logger.eval_parallel=false to evaluate in the training process") from None

    def close(self) -> None:
        """End the process (after the evaluation under way, if any)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
            self._conn.send(("close", None))
        self.process.join(timeout=30)
        _end_process(self.process)
        self._conn.close()


@dataclass
class Finished:
    """An evaluation that ran in the worker, now back: its iteration, eval/ metrics, whether it set a new
    best, and what :meth:`Evaluator.after` was given to keep with it (the learners' state for best.pt)."""

    iteration: int
    metrics: dict[str, float]
    new_best: bool
    snapshot: Any


class Evaluator:
    """Evaluation and videos during training, on their own env (``logger.eval_episodes`` copies).

    :meth:`after` evaluates every ``logger.eval_every`` iterations (``eval/<group>/episode_reward_mean``)
    and records ``videos/iter_<k>.mp4`` every ``logger.video_every``; ``new_best`` says whether the last
    evaluation beat every earlier one (its checkpoint is then kept as ``best.pt``). Each evaluation
    reseeds its env from the run's seed and the iteration, so its episodes depend on nothing but the
    policy: a resumed run evaluates as the uninterrupted one would, and runs that differ only in
    their algorithm settings are evaluated on the same episodes.

    With ``logger.eval_parallel`` :meth:`after` hands the evaluation to an :class:`EvaluationWorker` and
    :meth:`finished` returns it once it is back, with the same metrics it would have had here.
    """

    def __init__(self, cfg: RunConfig, run_path: Path, best_eval: float = -math.inf, start_frames: int = 0,
                 policy: Any = None):
        self.logger, self.max_steps, self.videos = cfg.logger, cfg.env.max_steps, Path(run_path) / "videos"
        self.best_eval, self.new_best = best_eval, False
        self.marl_eval = MarlEvalLog(cfg, run_path, start_frames) if cfg.logger.marl_eval else None
        self.env, self.seed, self.device, self.model = None, cfg.seed + 10_000, device_of(cfg.device), cfg.model
        self.worker: EvaluationWorker | None = None
        self._in_flight: tuple[int, Any] | None = None  # (frames, snapshot) of the evaluation in the worker
        if self.logger.eval_every or self.logger.video_every:
            # Built now, before a resumed run restores its RNG: env construction may reseed.
            self.use_env(cfg.env)
        if self.logger.eval_parallel and self.logger.eval_every:
            if policy is None:
                raise ValueError("logger.eval_parallel=true needs the policy to copy into its worker")
            self.worker = EvaluationWorker(self._env_config(cfg.env), device=self.device, seed=self.seed,
                                           model=self.model, policy=policy, max_steps=self.max_steps,
                                           matmul_precision=cfg.matmul_precision)

    def _env_config(self, env_cfg: EnvConfig) -> EnvConfig:
        return dataclasses.replace(env_cfg, num_envs=self.logger.eval_episodes)

    def use_env(self, env_cfg: EnvConfig) -> None:
        """Evaluate and film on ``env_cfg`` (``logger.eval_episodes`` copies) from now on: a curriculum's stage."""
        if self.env is not None:
            self.env.close()
        self.env = build_env(self._env_config(env_cfg), device=self.device, seed=self.seed, model=self.model)
        if self.worker is not None:
            self.worker.use_env(self._env_config(env_cfg))

    def after(self, iteration: int, policy: Any, final: bool, frames: int = 0,
              snapshot: Callable[[], Any] | None = None) -> dict[str, float] | None:
        """Evaluate and film what is due after ``iteration`` (``frames`` collected so far); returns the eval
        metrics (or nothing), or None when the evaluation went to the worker: :meth:`finished` returns it
        with ``snapshot()``, taken now."""
        out: dict[str, float] = {}
        self.new_best = False
        evaluate = self.evaluates(iteration, final)
        film = self._due(self.logger.video_every, iteration, final)
        parallel = evaluate and self.worker is not None
        if parallel:
            self.worker.submit(iteration, policy)  # raises if the previous one was not collected
            self._in_flight = (frames, snapshot() if snapshot is not None else None)
        if (evaluate and not parallel) or film:
            self.env.set_seed(self.seed + iteration)
        if evaluate and not parallel:
            out = self._record(frames, evaluate_policy(self.env, policy, max_steps=self.max_steps))
        if film:
            record_rollout(self.env, self.videos / f"iter_{iteration:05d}.mp4", steps=self.logger.video_steps,
                           policy=policy)
        return None if parallel else out

    def finished(self, wait: bool) -> Finished | None:
        """The worker's evaluation once it is back (``wait``: block until it is); None without a worker, or
        while it runs."""
        done = self.worker.result(wait) if self.worker is not None else None
        if done is None:
            return None
        iteration, stats = done
        (frames, snapshot), self._in_flight = self._in_flight, None
        metrics = self._record(frames, stats)
        new_best, self.new_best = self.new_best, False  # best.pt gets the snapshot, not the current state
        return Finished(iteration, metrics, new_best, snapshot)

    def _record(self, frames: int, stats: dict[str, Any]) -> dict[str, float]:
        """The eval/ metrics of one evaluation; marl_eval.json and the best mean return follow it."""
        out = {f"eval/{g}/episode_reward_mean": s["mean"] for g, s in stats["groups"].items()}
        if self.marl_eval is not None:
            self.marl_eval.add(frames, stats)
        score = sum(out.values()) / len(out)
        self.new_best = score > self.best_eval
        self.best_eval = max(self.best_eval, score)
        return out

    @property
    def busy(self) -> bool:
        """Whether the worker is evaluating (or its result waits to be collected)."""
        return self.worker is not None and self.worker.pending is not None

    def evaluates(self, iteration: int, final: bool) -> bool:
        """Whether :meth:`after` evaluates after ``iteration``."""
        return self._due(self.logger.eval_every, iteration, final)

    @staticmethod
    def _due(every: int, iteration: int, final: bool) -> bool:
        return every > 0 and ((iteration + 1) % every == 0 or final)

    def close(self) -> None:
        """Close the evaluation env and end the worker."""
        if self.env is not None:
            self.env.close()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
