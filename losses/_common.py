"""What the loss modules share: accepted settings, the team entry's name and their check."""

from __future__ import annotations

LOSS_CRITIC_TYPES = ("l1", "l2", "smooth_l1")
MIXERS = ("vdn", "qmix")
TEAM = "team"  # root entry holding a mixed group's team-level value, reward and flags


def check_td_settings(loss_function: str, gamma: float, prefix: str = "") -> None:
    """Critic regression loss and discount: ``ValueError`` naming the bad value (``prefix``: its section)."""
    if loss_function not in LOSS_CRITIC_TYPES:
        raise ValueError(
            f"{prefix}loss_function={loss_function!r} is not supported; accepted: {list(LOSS_CRITIC_TYPES)}"
        )
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"{prefix}gamma must be in (0, 1], got {gamma}")
