"""``marlkit eval``: the deterministic policy of a trained run on a fresh env, with 95% intervals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from .checkpoint import load_run

# Episodes that have not ended after this many steps are scored at the cap (they are counted).
MAX_EVAL_STEPS = 10_000


def evaluate_policy(env: Any, policy: Any, *, max_steps: int | None) -> dict[str, Any]:
    """One episode per env copy with the deterministic policy; per group mean return and 95% CI.

    Every copy runs to the end of its own episode (TorchRL's ``break_when_all_done``: copies that end
    early repeat their last step), so episodes of any length count; one still running after
    ``max_steps`` (or 10,000) steps is scored there and left out of ``episodes_ended``.
    """
    episodes = env.batch_size[0]
    cap = max_steps or MAX_EVAL_STEPS
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(cap, policy, break_when_any_done=False, break_when_all_done=True)
    done = rollout.get(("next", "done"))[..., 0]  # [episodes, T]
    ended = done.any(-1)
    last = torch.full_like(ended, done.shape[-1] - 1, dtype=torch.long)
    first_end = torch.where(ended, done.float().argmax(-1), last)
    envs = torch.arange(episodes)
    groups = {}
    for group in env.group_map:
        returns = rollout.get(("next", group, "episode_reward"))[envs, first_end].mean((-2, -1))  # [episodes]
        mean = returns.mean().item()
        half = 1.96 * returns.std().item() / math.sqrt(episodes) if episodes > 1 else 0.0
        groups[group] = {"mean": mean, "ci95": [mean - half, mean + half], "returns": returns.tolist()}
    return {"episodes": episodes, "episodes_ended": int(ended.sum()), "steps": done.shape[-1], "groups": groups}


def evaluate(run_dir: str | Path, *, episodes: int = 10, checkpoint: str = "last") -> dict[str, Any]:
    """Run ``episodes`` episodes (one per env copy) greedily / with mean actions; write ``eval.json``.

    Returns per group the mean episode return (over the group's agents, then episodes), the 95%
    confidence interval (mean ± 1.96 standard errors) and every episode's return.
    """
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    loaded = load_run(run_dir, checkpoint, num_envs=episodes)
    stats = evaluate_policy(loaded.env, loaded.policy, max_steps=loaded.cfg.env.max_steps)
    loaded.env.close()
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint, "frames": loaded.state["frames"], **stats}
    (Path(run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    return result
