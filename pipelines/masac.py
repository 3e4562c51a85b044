"""MASAC and ISAC: soft actor-critic per group with a centralised (MASAC) or local (ISAC) Q critic,
trained off-policy from disk-backed replay.

``marlkit train masac --env vmas/navigation`` or ``python pipelines/masac.py ...``;
``marlkit train isac`` switches to local critics. The loop is in :mod:`marlkit.pipelines.offpolicy`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchrl.envs import EnvBase

from marlkit.losses import check_sac_settings, make_sac_loss, make_target_updater, SAC_LOSS_TERMS
from marlkit.modules import continuous_action_bounds, make_q_critic, make_stochastic_actor
from marlkit.pipelines.common import GroupAgent, TrainResult
from marlkit.pipelines.config import RunConfig
from marlkit.pipelines.offpolicy import (
    build_group_agents,
    check_offpolicy,
    group_replay,
    OffPolicyLossConfig,
    OffPolicyTrainConfig,
    ReplayConfig,
    train_offpolicy,
)
from marlkit.pipelines.teams import team_of

ALGORITHMS = ("masac", "isac")


@dataclass
class SacLossConfig(OffPolicyLossConfig):
    """SAC objective: TD(0) critic target, target networks and the entropy temperature."""

    num_qvalue_nets: int = 2
    """Q networks whose minimum forms the target (clipped double Q)."""
    alpha_init: float = 1.0
    """Initial entropy temperature."""
    fixed_alpha: bool = False
    """Keep the temperature at alpha_init instead of learning it."""
    target_entropy: float | None = None
    """Entropy target per agent; None = -(action dimensions)."""


@dataclass
class MasacConfig(RunConfig):
    """MASAC / ISAC configuration."""

    algorithm: str = "masac"
    """masac (centralised Q critic) or isac (local Q critic)."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay buffers."""
    loss: SacLossConfig = field(default_factory=SacLossConfig)
    """Objective."""
    train: OffPolicyTrainConfig = field(default_factory=OffPolicyTrainConfig)
    """Optimisation."""

    @property
    def centralised_critic(self) -> bool:
        """MASAC's critic sees the observations and actions of its whole team (``env.teams``); ISAC's only its agent's."""
        return self.algorithm == "masac"


CONFIG = MasacConfig


def validate(cfg: MasacConfig) -> int:
    """Every check that needs no env; returns the number of iterations."""
    iterations = check_offpolicy(cfg, ALGORITHMS)
    check_sac_settings(cfg.loss.num_qvalue_nets, cfg.loss.alpha_init, prefix="loss.")
    return iterations


def build_group(env: EnvBase, group: str, cfg: MasacConfig, device: torch.device, scratch_dir: Path | None) -> GroupAgent:
    """TanhNormal actor, Q critics, SAC loss and target updater for one group."""
    m, lc = cfg.model, cfg.loss
    continuous_action_bounds(env, group, cfg.algorithm)
    actor = make_stochastic_actor(env, group, num_cells=m.num_cells, activation=m.activation,
                                  share_params=m.share_params, device=device)
    team = team_of(cfg.env.teams, group) if cfg.centralised_critic else [group]
    critic = make_q_critic(env, group, centralised=cfg.centralised_critic, num_cells=m.num_cells,
                           activation=m.activation, share_params=m.critic_share_params, device=device, team=team)
    loss = make_sac_loss(actor, critic, group, gamma=lc.gamma, loss_function=lc.loss_function,
                         num_qvalue_nets=lc.num_qvalue_nets, alpha_init=lc.alpha_init,
                         fixed_alpha=lc.fixed_alpha, target_entropy=lc.target_entropy,
                         mask_key=env.live_mask_key(group))
    updater = make_target_updater(loss, mode=lc.target_update, tau=lc.tau,
                                  hard_update_interval=lc.hard_update_interval)
    return GroupAgent(actor, loss, updater, SAC_LOSS_TERMS, group_replay(cfg, group, scratch_dir, device, partners=team[1:]))


def build_agents(env: EnvBase, cfg: MasacConfig, device: torch.device, buffers: Path | None) -> dict[str, GroupAgent]:
    """Every group's agent (a team critic's partners linked); replays under ``buffers/<group>``."""
    return build_group_agents(env, cfg, device, buffers, build_group)


def train(cfg: MasacConfig, resume: bool = False) -> TrainResult:
    """Train MASAC / ISAC as configured; write the run directory; return the final metrics."""
    return train_offpolicy(cfg, build_agents, validate, resume)


def main(argv: list[str] | None = None) -> int:
    """``python pipelines/masac.py [masac|isac] [--env ...] [overrides]``: the same arguments as marlkit train."""
    from marlkit.pipelines.cli import script_main

    return script_main(ALGORITHMS, argv)


if __name__ == "__main__":
    sys.exit(main())
