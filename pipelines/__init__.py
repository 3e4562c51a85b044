"""Training pipelines, one file per algorithm family, and the ``marlkit`` command.

Each pipeline module exposes a config dataclass (``CONFIG``) and ``train(cfg) -> result``.
:data:`ALGORITHMS` maps every algorithm name ``marlkit train`` accepts to its pipeline module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# algorithm name -> (pipeline module, the preset trained when no --env / --preset is given)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "mappo": ("marlkit.pipelines.mappo", "navigation-matched"),
    "ippo": ("marlkit.pipelines.mappo", "navigation-matched"),
    "maddpg": ("marlkit.pipelines.maddpg", "navigation-offpolicy"),
    "iddpg": ("marlkit.pipelines.maddpg", "navigation-offpolicy"),
    "masac": ("marlkit.pipelines.masac", "navigation-offpolicy"),
    "isac": ("marlkit.pipelines.masac", "navigation-offpolicy"),
    "iql": ("marlkit.pipelines.qlearning", "navigation-discrete"),
    "vdn": ("marlkit.pipelines.qlearning", "navigation-discrete"),
    "qmix": ("marlkit.pipelines.qlearning", "navigation-discrete"),
}
DEFAULT_ALGORITHM = "mappo"

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "pipeline_for"]


def pipeline_for(algorithm: str) -> ModuleType:
    """The pipeline module that trains ``algorithm``; ``ValueError`` listing the accepted names."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; accepted: {', '.join(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[algorithm][0])
