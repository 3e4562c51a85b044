"""Trained policies out of the lab: ``marlkit export`` writes each group's deterministic policy as an ONNX
model or a ``torch.export`` program, with a JSON beside it describing its inputs, outputs and action space.

The exported function is the policy ``marlkit eval`` runs: observation (and action mask, where the env
has one) -> the action of every agent of the group, with mean actions for stochastic continuous policies,
the most likely action for categorical ones and the greedy action for Q networks; the batch dimension is
free. Running it needs ``onnxruntime`` (or ``torch``) only, never marlkit. ONNX needs the ``[export]``
extra (``onnx``, ``onnxruntime``, ``onnxscript``), imported only when chosen.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from tensordict import NestedKey, TensorDict
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.data import Categorical, OneHot
from torchrl.envs.utils import ExplorationType, set_exploration_type

from marlkit.modules import group_spec, RECURRENT_KINDS

from .runs import load_run, LoadedRun

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class GroupPolicy(nn.Module):
    """One group's deterministic policy as a function of plain tensors: ``(observation[, action_mask])
    -> action``, each ``[batch, n_agents, ...]``."""

    def __init__(self, policy: TensorDictModuleBase, group: str, inputs: list[NestedKey]):
        super().__init__()
        self.policy = policy.select_subsequence(out_keys=[(group, "action")])
        self.group, self.inputs = group, inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        td = TensorDict({key: value for key, value in zip(self.inputs, tensors)}, batch_size=tensors[0].shape[:1])
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            return self.policy(td).get((self.group, "action"))


def check_export_format(fmt: str) -> None:
    """``ValueError`` naming an unknown format, or the extra to install for ONNX."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if fmt == "onnx" and missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: pip install -e \".[export]\" (or use --format pt2)")


def _action_space(spec: Any) -> dict[str, Any]:
    if isinstance(spec, OneHot):
        return {"type": "discrete", "n": int(spec.shape[-1]), "encoding": "one_hot"}
    if isinstance(spec, Categorical):
        return {"type": "discrete", "n": int(spec.space.n), "encoding": "index"}
    space = spec.space
    return {"type": "box", "low": space.low[0].tolist(), "high": space.high[0].tolist()}


def _describe(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": ["batch", *tensor.shape[1:]], "dtype": str(tensor.dtype).removeprefix("torch.")}


def description_path(model: Path) -> Path:
    """The JSON that describes an exported model: ``<model file>.json``."""
    return model.with_name(model.name + ".json")


def _outputs_for(out: Path | None, run_dir: Path, group: str, groups: list[str], suffix: str) -> Path:
    if out is None:
        return run_dir / "exported" / f"{group}{suffix}"
    if len(groups) > 1:  # one file per group beside the name given
        return out.with_name(f"{out.stem}.{group}{out.suffix or suffix}")
    return out


def export_run(run_dir: str | Path, *, fmt: str, checkpoint: str = "last", out: str | Path | None = None,
               group: str | None = None) -> list[Path]:
    """Export the deterministic policy of every group of a run (or of ``group``) as ``fmt`` (``onnx`` or
    ``pt2``); returns the written model files (each with a ``.json`` description beside it).

    Files go to ``<run_dir>/exported/<group>.<ext>`` unless ``out`` names one (several groups:
    ``<out stem>.<group>.<ext>``). An existing file is never overwritten.
    """
    check_export_format(fmt)
    run_dir = Path(run_dir)
    loaded = load_run(run_dir, checkpoint, num_envs=2)
    try:
        if loaded.cfg.model.kind in RECURRENT_KINDS:
            raise ValueError(f"{run_dir} has a recurrent policy (model.kind={loaded.cfg.model.kind}); marlkit export "
                             "writes policies of observation -> action only, without the state an agent carries "
                             "from step to step: evaluate it with marlkit eval, or train model.kind=mlp to export")
        groups = list(loaded.env.group_map)
        if group is not None and group not in groups:
            raise ValueError(f"--group {group!r} is not a group of {loaded.cfg.env.name}; its groups: {', '.join(groups)}")
        chosen = [group] if group is not None else groups
        targets = {g: _outputs_for(None if out is None else Path(out), run_dir, g, chosen, FORMATS[fmt]) for g in chosen}
        existing = [str(p) for path in targets.values() for p in (path, description_path(path)) if p.exists()]
        if existing:
            raise ValueError(f"{existing[0]} exists; choose another --out (exports are never overwritten)")
        example = loaded.env.reset()
        return [_export_group(loaded, g, example, fmt, targets[g], checkpoint) for g in chosen]
    finally:
        loaded.env.close()


def _export_group(loaded: LoadedRun, group: str, example: TensorDict, fmt: str, path: Path, checkpoint: str) -> Path:
    names = ["observation"] + (["action_mask"] if (group, "action_mask") in example.keys(True, True) else [])
    inputs = [(group, name) for name in names]
    policy = GroupPolicy(loaded.policy, group, inputs).eval().requires_grad_(False)  # inference only
    args = tuple(example.get(key) for key in inputs)
    with torch.no_grad():
        action = policy(*args)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = (tuple({0: batch} for _ in args),)  # forward(*tensors): one entry, the tuple of them
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        program = torch.export.export(policy, args, dynamic_shapes=dynamic)
        torch.export.save(program, path)
    else:
        torch.onnx.export(policy, args, str(path), dynamo=True, input_names=names, output_names=["action"],
                          dynamic_shapes=dynamic, optimize=True, verbose=False)
    description = {
        "format": fmt,
        "group": group,
        "n_agents": loaded.env.n_agents(group),
        "algorithm": loaded.cfg.algorithm,
        "env": loaded.cfg.env.name,
        "checkpoint": checkpoint,
        "frames": loaded.state["frames"],
        "inputs": [_describe(name, tensor) for name, tensor in zip(names, args)],
        "outputs": [_describe("action", action)],
        "action_space": _action_space(group_spec(loaded.env, group, "action")),
        "deterministic": True,
        "recurrent_state": None,  # marlkit's models are feed-forward: nothing carried between calls
    }
    description_path(path).write_text(json.dumps(description, indent=2))
    return path
