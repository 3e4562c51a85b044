"""Rollout videos: step an env with a policy (or random actions) and write the frames to .mp4 / .gif.

Video writing uses ``imageio`` with the FFmpeg binary that ``imageio-ffmpeg`` ships, so it works on a
machine without a display or a system FFmpeg.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

VIDEO_EXTENSIONS = (".mp4", ".gif")


def check_video_path(path: str | Path) -> Path:
    """The output path, or ``ValueError`` when its extension is not a video format we write."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise ValueError(
            f"cannot write a video to {str(path)!r}: unknown extension {path.suffix or '(none)'!r}; "
            f"accepted: {', '.join(VIDEO_EXTENSIONS)}"
        )
    return path


def record_rollout(
    env: EnvBase,
    out: str | Path,
    *,
    steps: int = 100,
    env_index: int = 0,
    policy: Any = None,
    fps: int = 20,
) -> Path:
    """Roll ``env`` for ``steps`` steps and write one frame per step (copy ``env_index``) to ``out``.

    ``policy=None`` takes uniformly random actions; a trained policy runs deterministically (greedy
    / mean action). Episodes that end are reset, so the video always has ``steps`` frames.
    """
    out = check_video_path(out)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n_envs = env.batch_size[0] if env.batch_size else 1
    if not 0 <= env_index < n_envs:
        raise ValueError(f"env_index={env_index} is out of range: the env has {n_envs} copies (0..{n_envs - 1})")
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        td = env.reset()
        for _ in range(steps):
            td = policy(td) if policy is not None else env.rand_action(td)
            _, td = env.step_and_maybe_reset(td)
            frames.append(np.asarray(env.render(mode="rgb_array", env_index=env_index), dtype=np.uint8))
    # imageio-ffmpeg's bundled FFmpeg for both formats: Pillow's GIF writer would merge identical
    # consecutive frames, and the frame size stays as rendered (macro_block_size=1, no rescaling).
    import imageio_ffmpeg

    frames = [_even(frame) for frame in frames]
    height, width = frames[0].shape[:2]
    gif = out.suffix.lower() == ".gif"
    writer = imageio_ffmpeg.write_frames(
        str(out), (width, height), fps=fps, macro_block_size=1, ffmpeg_log_level="error",
        codec="gif" if gif else "libx264", pix_fmt_out="pal8" if gif else "yuv420p",
    )
    writer.send(None)  # start FFmpeg
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return out


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: pad an odd one by a black row / column."""
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
    return frame
