"""Config plumbing every pipeline shares: the common sections, dotted overrides and YAML presets.

A pipeline's config is a dataclass of sections (``env``, ``model``, ``collector``, ``loss``, ``train``,
``logger``); each field carries a one-line docstring (read from the source for ``--help``).
Overrides are ``section.field=value`` strings parsed into the field's type; under ``env.`` any
name that is not an ``EnvConfig`` field is a scenario keyword passed to ``make_env``
(``env.n_agents=3``). Presets are YAML files of the same nested shape, in ``presets/``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A bad configuration found once the env is known (e.g. discrete actions for MADDPG)."""


@dataclass
class EnvConfig:
    """Which environment to train on, and how many copies to step together."""

    name: str = "vmas/navigation"
    """Environment name for make_env, e.g. vmas/navigation, pettingzoo/mpe2/simple_tag_v3, gridworld."""
    num_envs: int = 60
    """Number of env copies stepped together (the leading batch dimension)."""
    max_steps: int | None = None
    """Episode length (max_steps / max_cycles / max_episode_steps per family); None = family default (VMAS: 100)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Scenario keywords passed to make_env; set them as env.<keyword>=value (e.g. env.n_agents=3)."""
    teams: dict[str, list[str]] = field(default_factory=dict)
    """Team name -> agent groups that share a reward and train together (MAPPO/MADDPG/MASAC critics and the VDN/QMIX mixer span the team, e.g. env.teams.team=[speaker,listener]); {} = automatic: groups whose rewards are equal on a short random rollout form one team, every other group is its own team."""
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    """Stages that change the task during training, in order: each {at_frames: N, <keyword>: value, ...} or {advance_when: "reward >= x over k", <keyword>: value, ...} (the mean return of the stage's last k iterations); keywords are scenario keywords or max_steps, applied at iteration boundaries; every stage must keep the groups' observation and action specs. [] = none. See marlkit.pipelines.curriculum."""


@dataclass
class CollectorConfig:
    """How many frames to collect per iteration and in total (a frame is one env step of one copy)."""

    frames_per_batch: int = 6000
    """Frames collected per iteration (env steps x num_envs); must be divisible by env.num_envs."""
    total_frames: int = 120_000
    """Total frame budget (--frames); must be a multiple of frames_per_batch."""
    reset_at_each_iter: bool = False
    """Reset every env at the start of each batch, so episodes never span batches (as TorchRL allows)."""
    backend: str = "sync"
    """Where the env copies step (also as collector=NAME): sync (this process; resumes exactly), multiprocess (TorchRL's MultiSyncCollector / MultiAsyncCollector: collector.workers processes on this machine) or ray (TorchRL's RayCollector: collector.workers remote collectors on a Ray cluster; needs the [distributed] extra). multiprocess and ray resume with fresh episodes."""
    workers: int = 1
    """Worker processes (multiprocess) or remote collectors (ray), each stepping env.num_envs / workers copies on CPU; must divide env.num_envs."""
    sync: bool = True
    """multiprocess / ray: gather one batch from every worker per iteration (on-policy safe). false = take each worker's batch as it comes (asynchronous: each iteration is frames_per_batch frames of one worker, collected while the learner trains; off-policy algorithms only)."""
    ray_address: str | None = None
    """ray: the cluster to join (auto, or host:port of its head node); None starts a local Ray instance with one CPU per worker."""


@dataclass
class ModelConfig:
    """Actor and critic networks (MultiAgentMLP, with a MultiAgentConvNet in front for pixels)."""

    num_cells: list[int] = field(default_factory=lambda: [256, 256])
    """Hidden layer sizes of the actor and critic MLPs."""
    activation: str = "tanh"
    """Hidden activation: tanh, relu, elu or leaky_relu."""
    share_params: bool = True
    """Agents of a group share one actor network."""
    critic_share_params: bool = True
    """Agents of a group share one critic network."""
    critic_kind: str = "mlp"
    """Value critic network (MAPPO / IPPO): mlp, or gru / lstm, a recurrent critic with its own state
    at (group, "critic_rnn_state"), run while collecting and trained on the same slices of model.seq_len
    steps as a recurrent actor."""
    kind: str = "mlp"
    """Actor network: mlp (each agent on its own observation), commnet (CommNet: agents exchange the mean
    of the others' hidden states), attention (TarMAC-style: each agent attends over the others'
    messages), deepsets (each agent next to the group's mean) or gnn (GATv2 message passing over a graph
    of the agents; the [graph] extra): all four use one set of weights for any number of agents and
    learn what to exchange through the actor's own loss. gru or lstm: each agent keeps a recurrent state
    across the steps of an episode (MAPPO / IPPO, trained on whole slices of model.seq_len steps; IQL / VDN /
    QMIX: DRQN, replayed slices of replay.seq_len steps)."""
    comm_rounds: int = 2
    """Rounds of message exchange (commnet, attention) or message-passing layers (gnn)."""
    seq_len: int = 10
    """gru / lstm: steps per training sequence (a slice of a trajectory, with its stored initial state);
    it divides the steps each env copy collects per batch, and the minibatch size (DRQN: the default of
    replay.seq_len)."""
    gnn_topology: str = "full"
    """gnn edges: full (every pair of agents) or radius (agents closer than gnn_radius)."""
    gnn_radius: float = 0.5
    """gnn with topology radius: the largest distance between linked agents."""
    gnn_position_dims: list[int] = field(default_factory=lambda: [0, 1])
    """gnn: the observation entries holding the agent's position (VMAS: 0, 1); each edge carries the sender's
    position relative to the receiver and their distance, and topology radius links by it. [] for none."""

    def net_options(self) -> dict[str, Any]:
        """The actor network's kind and options, as the actor factories take them."""
        return {"kind": self.kind, "comm_rounds": self.comm_rounds, "gnn_topology": self.gnn_topology,
                "gnn_radius": self.gnn_radius, "gnn_position_dims": list(self.gnn_position_dims)}


@dataclass
class LoggerConfig:
    """Where and how results are written."""

    run_dir: str | None = None
    """Run directory (--run-dir); default runs/<algorithm>-<env>-<seed>-<timestamp>."""
    progress: bool = True
    """Show a tqdm bar with frames and the current mean return."""
    checkpoint_every: int = 10
    """Iterations between checkpoints/last.pt (always written at the end too); 0 = only at the end."""
    backend: str = "csv"
    """Metric logger (also as logger=NAME): csv, tensorboard, wandb or mlflow; metrics.csv is always written."""
    wandb_mode: str = "offline"
    """wandb mode: offline (no network needed) or online."""
    eval_every: int = 0
    """Iterations between evaluations of the deterministic policy (eval/ metrics, checkpoints/best.pt); 0 = never."""
    eval_episodes: int = 10
    """Episodes per evaluation (one per env copy)."""
    eval_parallel: bool = False
    """Run the evaluations in a worker process (on another core) while training goes on, as RLlib's
    evaluation_parallel_to_training: each gets a copy of the weights of the iteration it evaluates and scores
    what an in-process one would; that iteration's metrics.csv row waits for it (rows stay in order), and
    every checkpoint and the run's end wait for the one under way. No worker when eval_every is 0."""
    video_every: int = 0
    """Iterations between evaluation videos written to <run-dir>/videos/; 0 = never."""
    video_steps: int = 100
    """Frames per evaluation video."""
    marl_eval: bool = False
    """Also write every evaluation's episode returns to <run-dir>/marl_eval.json, in the layout the marl-eval
    tools read (env -> task -> algorithm -> seed_<k> -> step_<i>); needs eval_every > 0."""


@dataclass
class RunConfig:
    """The fields every pipeline's config starts with; pipelines add their own sections."""

    algorithm: str = ""
    """Algorithm name (see marlkit train --help)."""
    seed: int = 0
    """Seed for torch and the env (--seed)."""
    device: str = "cpu"
    """Device for sampling and training (--device): cpu or cuda."""
    matmul_precision: str = "highest"
    """float32 matrix products: highest (float32; results reproduce bit for bit), high (TF32 on GPUs that have
    it) or medium (bfloat16 products on CPUs with AMX / AVX-512 BF16 and GPUs with tensor cores: faster for
    large minibatches, results differ from the 3rd digit of each product). torch.set_float32_matmul_precision
    for the run's processes; see marlkit.pipelines.precision."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Environment."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Networks."""
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    """Collection."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Outputs."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (attribute docstrings, as in BenchMARL)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(text: str) -> Any:
    """YAML-style parsing, plus numbers YAML 1.1 leaves as strings (``3e-4``)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            pass
    return value


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` (a string from the command line, or a YAML value) to ``annotation``."""
    if isinstance(value, str) and annotation is not str:
        value = _parse_scalar(value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if annotation is Any:
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} expects a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} expects true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{name} expects an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} expects a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def _set_path(cfg: Any, path: str, raw: Any) -> None:
    parts = path.split(".")
    target, section_name = cfg, ""
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        is_last = depth == len(parts) - 1
        if part not in names:
            if isinstance(target, EnvConfig) and is_last:
                # Any other env.<name> is a scenario keyword for make_env.
                target.kwargs[part] = _parse_scalar(raw) if isinstance(raw, str) else raw
                return
            where = f"section {section_name!r}" if section_name else "the config"
            raise ValueError(
                f"unknown field {path!r}: {where} has no field {part!r}; accepted: {', '.join(names)}"
            )
        if is_last:
            annotation = _hints(type(target))[part]
            current = getattr(target, part)
            if dataclasses.is_dataclass(current):
                if isinstance(raw, str) and "backend" in {f.name for f in dataclasses.fields(current)}:
                    current.backend = raw  # logger=tensorboard is logger.backend=tensorboard
                    return
                if not isinstance(raw, dict):
                    raise ValueError(f"{path} is a section; set its fields as {path}.<field>=value")
                for key, value in raw.items():
                    _set_path(current, key, value)
                return
            if part == "kwargs" and isinstance(target, EnvConfig) and isinstance(raw, dict):
                target.kwargs.update(raw)
                return
            setattr(target, part, coerce(raw, annotation, path))
            return
        value = getattr(target, part)
        if isinstance(value, dict) and depth == len(parts) - 2:
            # train.freeze_after.agent=3: one entry of a mapping field.
            (item_type,) = typing.get_args(_hints(type(target))[part])[1:] or (Any,)
            value[parts[-1]] = coerce(raw, item_type, path)
            return
        target = value
        section_name = part
        if not dataclasses.is_dataclass(target):
            raise ValueError(f"{'.'.join(parts[: depth + 1])} is not a section; cannot set {path!r}")


def apply_overrides(cfg: Any, overrides: dict[str, Any] | list[str]) -> Any:
    """Apply ``{"section.field": value}`` or ``["section.field=value", ...]`` to ``cfg`` in place."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like section.field=value")
            if key.strip() in pairs:
                raise ValueError(f"{key.strip()} is set twice ({pairs[key.strip()]!r} and {value!r}); give it once")
            pairs[key.strip()] = value
        overrides = pairs
    for key, value in overrides.items():
        _set_path(cfg, key, value)
    return cfg


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "kwargs":
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def available_presets() -> list[str]:
    """Preset names (YAML files in ``presets/``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """Read preset ``name`` as a flat ``{"section.field": value}`` dict (``yaml.safe_load`` only)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    return flatten(data)


def preset_algorithm(name: str) -> str | None:
    """The algorithm preset ``name`` is written for (its ``algorithm:`` entry), None if it names none."""
    return load_preset(name).get("algorithm")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def describe(cfg_cls: type) -> str:
    """Every field of ``cfg_cls`` and its sections, with types, defaults and docstrings (for --help)."""
    lines: list[str] = []
    default = cfg_cls()

    def walk(obj: Any, prefix: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"  [{prefix}{f.name}] {(type(value).__doc__ or '').strip()}")
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"    {prefix}{f.name} = {value!r}: {docs.get(f.name, '')}")

    walk(default, "")
    return "\n".join(lines)
