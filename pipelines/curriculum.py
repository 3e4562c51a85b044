"""Curricula: the task changes as learning proceeds (``env.curriculum``).

``env.curriculum`` is a list of stages, each a trigger and the scenario keywords (or ``max_steps``) it
sets, applied on top of the env section and of the stages before it::

    env:
      name: gridworld
      kwargs: {grid_size: 5}
      curriculum:
        - {at_frames: 40000, grid_size: 10}                    # from 40,000 frames on
        - {advance_when: "reward >= 0.8 over 3", grid_size: 20}  # once the mean return of the last 3 iterations is >= 0.8

Stages are taken in order, at iteration boundaries: after an iteration, the next stage's trigger is
checked (``at_frames``: the frames collected so far; ``advance_when``: the mean of the last k iterations'
mean episode returns, averaged over the groups, counted within the current stage); the env changes
before the next collection. Every stage's env must give each group the observation and action specs
of the first one (the networks are sized from them): a stage that would change them is refused before
training starts. The stage of each iteration is ``curriculum/stage`` in ``metrics.csv``; checkpoints
keep the stage and the plateau window, so a resumed run continues the curriculum exactly.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .config import EnvConfig

_PLATEAU = re.compile(r"^\s*reward\s*>=\s*(?P<x>[-+0-9.eE]+)\s+over\s+(?P<k>\d+)\s*$")
FIXED = ("name", "num_envs", "teams", "curriculum", "kwargs")  # env fields a stage cannot set


@dataclass
class Stage:
    """One stage: when it starts (frames, or a plateau of the return) and what it sets."""

    at_frames: int | None
    """Starts once this many frames have been collected (or None: a plateau rule)."""
    threshold: float | None
    """Plateau rule: starts once the mean return over the last ``window`` iterations is >= this."""
    window: int | None
    """Plateau rule: iterations averaged."""
    settings: dict[str, Any]
    """Scenario keywords (and ``max_steps``) it sets."""


def parse_curriculum(stages: Any) -> list[Stage]:
    """The stages of ``env.curriculum``; ``ValueError`` naming the stage and what is wrong with it."""
    if not isinstance(stages, list):
        raise ValueError(f"env.curriculum must be a list of stages ({{at_frames: N, <keyword>: value}}), got {stages!r}")
    parsed, last_frames = [], -1
    for index, stage in enumerate(stages, start=1):
        where = f"env.curriculum stage {index}"
        if not isinstance(stage, dict):
            raise ValueError(f"{where} must be a mapping like {{at_frames: 40000, grid_size: 10}}, got {stage!r}")
        triggers = [key for key in ("at_frames", "advance_when") if key in stage]
        if len(triggers) != 1:
            raise ValueError(f"{where} needs exactly one trigger, at_frames: N or advance_when: \"reward >= x over k\"; "
                             f"got {sorted(stage)}")
        settings = {k: v for k, v in stage.items() if k not in ("at_frames", "advance_when")}
        fixed = [k for k in settings if k in FIXED]
        if fixed:
            raise ValueError(f"{where} sets {fixed[0]!r}, which cannot change during a run; a stage sets scenario "
                             "keywords and max_steps")
        if not settings:
            raise ValueError(f"{where} changes nothing; give the scenario keywords it sets (e.g. grid_size: 10)")
        if "at_frames" in stage:
            frames = stage["at_frames"]
            if isinstance(frames, bool) or not isinstance(frames, int) or frames <= last_frames:
                raise ValueError(f"{where}: at_frames must be an integer above the previous stage's "
                                 f"({max(last_frames, 0)}), got {frames!r}")
            last_frames = frames
            parsed.append(Stage(frames, None, None, settings))
            continue
        match = _PLATEAU.match(str(stage["advance_when"]))
        if match is None or int(match["k"]) < 1 or not math.isfinite(float(match["x"])):
            raise ValueError(f"{where}: advance_when must read \"reward >= <number> over <iterations >= 1>\", got "
                             f"{stage['advance_when']!r}")
        parsed.append(Stage(None, float(match["x"]), int(match["k"]), settings))
    return parsed


def stage_env_config(env_cfg: EnvConfig, stage: int) -> EnvConfig:
    """The env section with the settings of stages 1..``stage`` applied, in order (stage 0: as configured)."""
    cfg = copy.deepcopy(env_cfg)
    for s in parse_curriculum(env_cfg.curriculum)[:stage]:
        for key, value in s.settings.items():
            if key == "max_steps":
                cfg.max_steps = value
            else:
                cfg.kwargs[key] = value
    return cfg


def stage_seed(seed: int, stage: int) -> int:
    """The seed a stage's env is built with (stage 0: the run's seed)."""
    return seed + 7919 * stage


@dataclass
class Curriculum:
    """Where a run is in its curriculum: the stage its env is at, the stage it has earned, the returns
    of the current stage's iterations (for plateau rules)."""

    stages: list[Stage]
    """The parsed ``env.curriculum``."""
    env_stage: int = 0
    """The stage of the env being collected from (0: the env section as configured)."""
    stage: int = 0
    """The stage reached: when above ``env_stage``, the env changes before the next collection."""
    returns: list[float] = field(default_factory=list)
    """This stage's per-iteration mean returns (NaN-free), newest last."""

    def after_iteration(self, frames: int, mean_return: float) -> bool:
        """Record an iteration's return and move to the next stage if its trigger holds; returns whether it did."""
        if not math.isnan(mean_return):
            self.returns.append(mean_return)
        if self.stage >= len(self.stages):
            return False
        nxt = self.stages[self.stage]
        if nxt.at_frames is not None:
            due = frames >= nxt.at_frames
        else:
            recent = self.returns[-nxt.window:]
            due = len(recent) == nxt.window and sum(recent) / len(recent) >= nxt.threshold
        if due:
            self.stage += 1
            self.returns = []
        return due

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps."""
        return {"env_stage": self.env_stage, "stage": self.stage, "returns": list(self.returns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        self.env_stage, self.stage, self.returns = state["env_stage"], state["stage"], list(state["returns"])
