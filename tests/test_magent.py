"""MAgent2 (``magent2/<env>``, the ``[magent]`` extra): teams become groups with live-agent masks, every
listed env builds through ``make_env``, IQL trains one team against a frozen one, and a missing package
names the extra."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import torch

from marlkit.envs import MAGENT2_ENVS, make_env

pytest.importorskip("magent2", reason='needs the [magent] extra (pip install -e ".[magent]")')


def test_battle_teams_are_groups_with_masks_of_their_live_agents():
    env = make_env("magent2/battle_v4", num_envs=2, map_size=18, seed=0)
    assert {g: len(agents) for g, agents in env.group_map.items()} == {"red": 6, "blue": 6}
    assert env.observation_spec["red", "observation"].shape == (2, 6, 13, 13, 5)
    assert env.full_action_spec["blue", "action"].space.n == 21
    assert env.live_mask_key("red") == ("red", "mask")
    rollout = env.rollout(20, break_when_any_done=False)
    assert rollout["next", "red", "mask"].dtype == torch.bool and rollout.shape == (2, 20)
    env.close()


@pytest.mark.parametrize("name", MAGENT2_ENVS)
def test_every_listed_magent2_env_builds_and_steps(name):
    takes = inspect.signature(importlib.import_module(f"magent2.environments.{name}").parallel_env).parameters
    kwargs = {"map_size": 20} if "map_size" in takes else {}  # small maps: few agents, a quick test
    env = make_env(f"magent2/{name}", num_envs=1, seed=0, max_cycles=5, **kwargs)
    teams = 1 if name == "gather_v5" else 2  # gather: one team of omnivores; the others: two sides
    assert len(env.group_map) >= teams
    assert env.rollout(3, break_when_any_done=False).shape == (1, 3)
    env.close()


def test_iql_trains_red_against_a_frozen_blue(tmp_path, read_metrics):
    from marlkit.pipelines.cli import main as cli_main

    args = ["train", "iql", "--env", "magent2/battle_v4", "--frames", "80", "--run-dir", str(tmp_path), "env.map_size=18",
            "env.num_envs=2", "env.max_steps=20", "collector.frames_per_batch=40", "replay.batch_size=16",
            "train.optimiser_steps=1", "model.num_cells=[16]", "train.freeze_after.blue=0", "logger.progress=false",
            "replay.buffer_size=1000"]  # the default 1,000,000 would need ~38 GiB free for its memmap files
    assert cli_main(args) == 0
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and rows[-1]["red/loss"] != "" and rows[-1]["blue/learning"] == "0.0"


def test_a_missing_magent2_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "magent2.environments", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"'magent2' environments need .*pip install -e '\.\[magent\]'"):
        make_env("magent2/battle_v4")
