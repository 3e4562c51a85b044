"""Evaluating a policy: one episode per env copy with the deterministic policy, with 95% intervals.

:func:`evaluate_policy` is the measurement (``marlkit eval`` uses it on a loaded run); :class:`Evaluator`
runs it, and records videos, on a schedule during training (``logger.eval_every``, ``logger.video_every``)
and keeps the best mean return; :class:`MarlEvalLog` keeps every evaluation's episode returns as the JSON
the marl-eval tools read (``logger.marl_eval``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.envs import device_of, MultiAgentEnv, split_env_name

from .config import EnvConfig, RunConfig
from .environment import build_env
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


class Evaluator:
    """Evaluation and videos during training, on their own env (``logger.eval_episodes`` copies).

    :meth:`after` evaluates every ``logger.eval_every`` iterations (``eval/<group>/episode_reward_mean``)
    and records ``videos/iter_<k>.mp4`` every ``logger.video_every``; ``new_best`` says whether the last
    evaluation beat every earlier one (its checkpoint is then kept as ``best.pt``). Each evaluation
    reseeds its env from the run's seed and the iteration, so its episodes depend on nothing but the
    policy: a resumed run evaluates as the uninterrupted one would, and runs that differ only in
    their algorithm settings are evaluated on the same episodes.
    """

    def __init__(self, cfg: RunConfig, run_path: Path, best_eval: float = -math.inf, start_frames: int = 0):
        self.logger, self.max_steps, self.videos = cfg.logger, cfg.env.max_steps, Path(run_path) / "videos"
        self.best_eval, self.new_best = best_eval, False
        self.marl_eval = MarlEvalLog(cfg, run_path, start_frames) if cfg.logger.marl_eval else None
        self.env, self.seed, self.device, self.model = None, cfg.seed + 10_000, device_of(cfg.device), cfg.model
        if self.logger.eval_every or self.logger.video_every:
            # Built now, before a resumed run restores its RNG: env construction may reseed.
            self.use_env(cfg.env)

    def use_env(self, env_cfg: EnvConfig) -> None:
        """Evaluate and film on ``env_cfg`` (``logger.eval_episodes`` copies) from now on: a curriculum's stage."""
        if self.env is not None:
            self.env.close()
        self.env = build_env(dataclasses.replace(env_cfg, num_envs=self.logger.eval_episodes), device=self.device,
                             seed=self.seed, model=self.model)

    def after(self, iteration: int, policy: Any, final: bool, frames: int = 0) -> dict[str, float]:
        """Evaluate and film what is due after ``iteration`` (``frames`` collected so far); returns the eval
        metrics (or nothing)."""
        out: dict[str, float] = {}
        self.new_best = False
        evaluate = self._due(self.logger.eval_every, iteration, final)
        film = self._due(self.logger.video_every, iteration, final)
        if evaluate or film:
            self.env.set_seed(self.seed + iteration)
        if evaluate:
            stats = evaluate_policy(self.env, policy, max_steps=self.max_steps)
            out = {f"eval/{g}/episode_reward_mean": s["mean"] for g, s in stats["groups"].items()}
            if self.marl_eval is not None:
                self.marl_eval.add(frames, stats)
            score = sum(out.values()) / len(out)
            self.new_best = score > self.best_eval
            self.best_eval = max(self.best_eval, score)
        if film:
            record_rollout(self.env, self.videos / f"iter_{iteration:05d}.mp4", steps=self.logger.video_steps,
                           policy=policy)
        return out

    @staticmethod
    def _due(every: int, iteration: int, final: bool) -> bool:
        return every > 0 and ((iteration + 1) % every == 0 or final)

    def close(self) -> None:
        """Close the evaluation env."""
        if self.env is not None:
            self.env.close()
