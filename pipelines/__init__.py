"""Training pipelines, one file per algorithm family, and the ``marlkit`` command.

Each pipeline module exposes a config dataclass (``CONFIG``) and ``train(cfg) -> result``.
:data:`ALGORITHMS` maps every algorithm name ``marlkit train`` accepts to its pipeline module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .config import apply_overrides, load_preset, RunConfig

# algorithm name -> (pipeline module, the preset trained when no --env / --preset is given)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "mappo": ("marlkit.pipelines.mappo", "navigation-matched"),
    "ippo": ("marlkit.pipelines.mappo", "navigation-matched"),
    "happo": ("marlkit.pipelines.happo", "speaker-listener"),
    "maa2c": ("marlkit.pipelines.a2c", "navigation-a2c"),
    "iac": ("marlkit.pipelines.a2c", "navigation-a2c"),
    "coma": ("marlkit.pipelines.a2c", "navigation-coma"),
    "maddpg": ("marlkit.pipelines.maddpg", "navigation-offpolicy"),
    "iddpg": ("marlkit.pipelines.maddpg", "navigation-offpolicy"),
    "masac": ("marlkit.pipelines.masac", "navigation-offpolicy"),
    "isac": ("marlkit.pipelines.masac", "navigation-offpolicy"),
    "iql": ("marlkit.pipelines.qlearning", "navigation-discrete"),
    "vdn": ("marlkit.pipelines.qlearning", "navigation-discrete"),
    "qmix": ("marlkit.pipelines.qlearning", "navigation-discrete"),
    "qtran": ("marlkit.pipelines.qlearning", "navigation-discrete"),
}
DEFAULT_ALGORITHM = "mappo"

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "make_config", "pipeline_for"]


def pipeline_for(algorithm: str) -> ModuleType:
    """The pipeline module that trains ``algorithm``; ``ValueError`` listing the accepted names."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; accepted: {', '.join(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[algorithm][0])


def make_config(algorithm: str, preset: str | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """``algorithm``'s config: its defaults, then ``preset`` (a YAML in ``presets/``), then ``overrides``
    (``{"section.field": value}`` or ``["section.field=value", ...]``). The one way every entry point
    (the CLI, :func:`marlkit.pipelines.runs.load_run`, the benchmarks) builds a config.

    Raises ``ValueError`` naming an unknown algorithm, preset or field, a bad value, or a preset or
    override that sets another algorithm.
    """
    cfg = pipeline_for(algorithm).CONFIG(algorithm=algorithm)
    if preset is not None:
        values = load_preset(preset)
        written_for = values.get("algorithm", algorithm)
        try:
            apply_overrides(cfg, values)
        except ValueError as error:
            if written_for == algorithm:
                raise
            raise ValueError(f"preset {preset!r} is written for {written_for} and does not fit {algorithm} ({error}); "
                             f"train {written_for} with it, or leave the algorithm out to get its own") from None
        cfg.algorithm = algorithm  # a preset names its usual algorithm; the caller's choice wins
    apply_overrides(cfg, overrides or {})
    if cfg.algorithm != algorithm:
        raise ValueError(f"algorithm={cfg.algorithm!r} in the overrides contradicts the algorithm {algorithm!r}")
    return cfg
