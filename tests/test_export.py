"""``marlkit export``: each exported policy, loaded with onnxruntime or ``torch.export.load`` in a fresh
process that never imports marlkit (nor TorchRL), gives the checkpoint's deterministic actions on the same
observations, at batch sizes other than the one it was traced with; its JSON describes it; bad input is
one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.pipelines.cli import main as cli_main
from marlkit.pipelines.runs import load_run

TINY = ["--frames", "40", "env.num_envs=4", "collector.frames_per_batch=40", "model.num_cells=[16]",
        "logger.progress=false"]
RUNS = {
    "vmas-continuous": ("mappo", ["--env", "vmas/navigation", "env.n_agents=2", "train.minibatch_size=20",
                                  "train.num_epochs=1"]),
    "pettingzoo-discrete": ("iql", ["--env", "pettingzoo/mpe2/simple_spread_v3", "env.N=2", "replay.batch_size=16",
                                    "train.optimiser_steps=1"]),
    "gridworld": ("mappo", ["--env", "gridworld", "train.minibatch_size=20", "train.num_epochs=1"]),
    "action-mask": ("iql", ["--env", "custom_envs:MaskedPick", "replay.batch_size=16", "train.optimiser_steps=1"]),
}

LOADER = """
import json, sys
import numpy as np
model, data_path, out_path = sys.argv[1:]
meta = json.load(open(model + ".json"))
data = np.load(data_path)
names = [spec["name"] for spec in meta["inputs"]]
if meta["format"] == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(model)
    action = session.run(None, {name: data[name] for name in names})[0]
else:
    import torch
    program = torch.export.load(model)
    action = program.module()(*[torch.from_numpy(data[name]) for name in names]).numpy()
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("marlkit", "torchrl", "tensordict"))
assert not leaked, leaked
np.save(out_path, action)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run per case, trained once for the module."""
    root = tmp_path_factory.mktemp("export")
    for name, (algorithm, args) in RUNS.items():
        assert cli_main(["train", algorithm, "--run-dir", str(root / name), *args, *TINY]) == 0
    return root


def _observations(run_dir, batch: int):
    """Observations (and masks) of every group after a few random steps, and the checkpoint's
    deterministic actions on them."""
    loaded = load_run(run_dir, num_envs=batch)
    td = loaded.env.rollout(3, break_when_any_done=False)[:, -1]["next"]
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        acted = loaded.policy(td.clone())
    loaded.env.close()
    return td, acted, list(loaded.env.group_map)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("case", list(RUNS))
def test_exported_policy_acts_as_the_checkpoint_without_marlkit(case, fmt, trained, tmp_path):
    run_dir = trained / case
    out = tmp_path / f"policy.{fmt}"
    assert cli_main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    for batch in (5, 1):
        td, acted, groups = _observations(run_dir, batch)
        for group in groups:
            model = out if len(groups) == 1 else out.with_name(f"policy.{group}.{fmt}")
            meta = json.loads(model.with_name(model.name + ".json").read_text())
            assert meta["group"] == group and meta["format"] == fmt and meta["deterministic"] is True
            names = [spec["name"] for spec in meta["inputs"]]
            data = {name: td.get((group, name)).numpy() for name in names}
            assert [spec["shape"][1:] for spec in meta["inputs"]] == [list(a.shape[1:]) for a in data.values()]
            np.savez(tmp_path / "data.npz", **data)
            done = subprocess.run([sys.executable, "-c", LOADER, str(model), str(tmp_path / "data.npz"),
                                   str(tmp_path / "action.npy")], capture_output=True, text=True, timeout=300,
                                  cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-2000:]
            exported = np.load(tmp_path / "action.npy")
            expected = acted.get((group, "action")).numpy()
            assert exported.shape == expected.shape == (batch, *meta["outputs"][0]["shape"][1:])
            if meta["action_space"]["type"] == "box":
                assert np.allclose(exported, expected, atol=1e-5)
                assert np.abs(expected).max() > 0  # a real action, not an all-zero placeholder
            else:
                assert np.array_equal(exported, expected)


def test_exported_policy_obeys_the_action_mask_it_is_given(trained, tmp_path):
    """Only action k allowed -> action k, for every agent, whatever the Q values say."""
    out = tmp_path / "masked.onnx"
    assert cli_main(["export", str(trained / "action-mask"), "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert [spec["name"] for spec in meta["inputs"]] == ["observation", "action_mask"]
    observation = np.random.default_rng(0).random((8, 2, 2), dtype=np.float32)
    for k in range(4):
        mask = np.zeros((8, 2, 4), dtype=bool)
        mask[..., k] = True
        np.savez(tmp_path / "data.npz", observation=observation, action_mask=mask)
        done = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "data.npz"),
                               str(tmp_path / "action.npy")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (np.load(tmp_path / "action.npy") == k).all()


def test_export_writes_every_group_and_never_overwrites(trained, tmp_path, capsys):
    run_dir = trained / "gridworld"
    assert cli_main(["export", str(run_dir), "--format", "pt2"]) == 0
    written = run_dir / "exported" / "agents.pt2"
    assert written.exists() and (run_dir / "exported" / "agents.pt2.json").exists()
    before = written.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(run_dir), "--format", "pt2"])
    assert exit_info.value.code == 2 and "exists; choose another --out" in capsys.readouterr().err
    assert written.read_bytes() == before


@pytest.mark.parametrize("args,match", [
    (["--format", "tflite"], r"invalid choice: 'tflite'"),
    (["--format", "onnx", "--group", "nobody"], r"--group 'nobody' is not a group of gridworld; its groups: agents"),
    (["--format", "onnx", "--checkpoint", "best"], r"best.pt is written when evaluations run during training"),
])
def test_bad_export_input_is_one_line(args, match, trained, cli_rejects):
    cli_rejects(["export", str(trained / "gridworld"), *args], match)


def test_export_of_a_folder_that_is_no_run(tmp_path, cli_rejects):
    cli_rejects(["export", str(tmp_path), "--format", "pt2"], "is not a run directory")
