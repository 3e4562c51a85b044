"""``marlkit sweep``: a grid of runs (algorithms x envs x seeds) under one sweep directory, then one table
and one plot per env.

Each run is an ordinary run directory, ``<sweep-dir>/<algorithm>/<env>/seed<k>``, trained by its
pipeline's ``train``. The runs go out as Ray tasks (a local instance by default, ``--ray-address`` for
a cluster, at most ``--max-concurrent`` at once, each with ``cores / max-concurrent`` torch threads and
as many Ray CPUs) or, with ``--no-ray``, one after another in this process. ``sweep.json`` records the
grid; the same command again skips finished runs (their ``summary.json`` has the frame budget) and
resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import make_config, pipeline_for
from .config import RunConfig
from .evaluate import MARL_EVAL_FILE
from .plots import mean_return, plot_sweep, read_metrics
from .runs import config_from_dict, read_config
from .session import TrainingStopped

SWEEP_FILE = "sweep.json"
_GRID_KEYS = ("algorithms", "envs", "preset", "overrides")  # what a sweep directory is for; seeds may grow


def parse_seeds(text: str) -> list[int]:
    """``"0-4"``, ``"0,2,5"`` or a mix (``"0-2,7"``) as distinct seeds >= 0, in order."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if part:
                low, dash, high = part.partition("-")
                seeds += list(range(int(low), int(high) + 1)) if dash else [int(part)]
    except ValueError:  # not a number, or a negative one ("-1" reads as an open range)
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must list distinct seeds >= 0, got {text!r} (as 0-4, 0,1,2 or 0-2,7)")
    return seeds


def _slug(env: str) -> str:
    return env.replace("/", "-").replace(":", ".")


def sweep_dir_for(algorithms: list[str], envs: list[str]) -> Path:
    """The default sweep directory: named by the grid, so the same command finds it again."""
    return Path("sweeps") / f"{'+'.join(algorithms)}_{'+'.join(_slug(env) for env in envs)}"


@dataclass
class SweepRun:
    """One run of the grid."""

    algorithm: str
    """Its algorithm."""
    env: str
    """Its env name."""
    seed: int
    """Its seed."""
    cfg: RunConfig
    """Its checked config (``logger.run_dir`` set)."""

    @property
    def run_dir(self) -> Path:
        """Where it writes."""
        return Path(self.cfg.logger.run_dir)

    @property
    def finished(self) -> bool:
        """``summary.json`` says it reached its frame budget."""
        path = self.run_dir / "summary.json"
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("frames", 0) >= self.cfg.collector.total_frames
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False

    @property
    def started(self) -> bool:
        """It has a ``config.yaml``: it resumes (from its checkpoint, or afresh if it had none)."""
        return (self.run_dir / "config.yaml").is_file()


def plan(algorithms: list[str], envs: list[str], seeds: list[int], sweep_dir: Path, *, preset: str | None = None,
         overrides: list[str] | None = None, frames: int | None = None) -> list[SweepRun]:
    """Every run's config, checked by its pipeline before anything runs (``ValueError`` naming the bad one)."""
    if not algorithms or not envs:
        raise ValueError("a sweep needs at least one algorithm (--algorithms) and one env (--envs)")
    runs = []
    for algorithm in algorithms:
        module = pipeline_for(algorithm)
        for env in envs:
            base = make_config(algorithm, preset, list(overrides or []))
            base.env.name = env
            if frames is not None:
                base.collector.total_frames = frames
            base.logger.progress = False  # concurrent bars would overwrite each other; each run prints a line
            for seed in seeds:
                cfg = copy.deepcopy(base)
                cfg.seed = seed
                cfg.logger.run_dir = str(sweep_dir / algorithm / _slug(env) / f"seed{seed}")
                try:
                    module.checked_iterations(cfg)
                except ValueError as err:
                    raise ValueError(f"{algorithm} on {env}: {err}") from None
                runs.append(SweepRun(algorithm, env, seed, cfg))
    return runs


def check_sweep_dir(sweep_dir: Path, grid: dict[str, Any]) -> None:
    """Refuse a sweep directory written for another grid (runs there would resume with their old configs)."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    differ = [key for key in _GRID_KEYS if recorded.get(key) != grid.get(key)]
    if differ:
        raise ValueError(f"{sweep_dir} holds a sweep of another grid (it differs in {', '.join(differ)}); "
                         "use another --sweep-dir, or repeat that sweep's own command")


def run_one(cfg: RunConfig, resume: bool, threads: int, spare_core: bool = False) -> dict[str, Any]:
    """Train (or resume) one run with ``threads`` torch threads (its evaluations in a worker process only
    with a ``spare_core`` for it); a summary of it, or its error."""
    from .threads import ENV_VAR

    os.environ[ENV_VAR] = str(threads)  # fixed: the sweep already split the cores between its runs
    module = pipeline_for(cfg.algorithm)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if resume:
                total = cfg.collector.total_frames
                cfg = config_from_dict(read_config(cfg.logger.run_dir))
                cfg.collector.total_frames = total
            # the same results either way; a worker beside runs that hold every core would slow them all
            cfg.logger.eval_parallel = cfg.logger.eval_parallel and spare_core
            result = module.train(cfg, resume=resume)
    except TrainingStopped:  # Ctrl-C in a sweep run in this process stops the sweep, not just this run
        raise
    except Exception as err:  # noqa: BLE001 - one failed run must not end the others; it is reported
        return {"run_dir": str(cfg.logger.run_dir), "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    return {"run_dir": str(result.run_dir), "frames": result.frames, "frames_per_s": result.frames_per_s}


def run_sweep(runs: list[SweepRun], *, use_ray: bool = True, ray_address: str | None = None,
              max_concurrent: int = 2, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every unfinished run (resuming started ones); ``report`` gets a line per run."""
    cores = os.cpu_count() or 1
    concurrent = max(1, min(max_concurrent, len(runs))) if use_ray else 1
    threads = max(1, cores // concurrent)  # two-thread runs sharing two cores slow each other about 8x
    spare = concurrent * threads < cores  # a core the runs leave free, for evaluation workers
    todo = []
    for run in runs:
        if run.finished:
            report(f"done already: {run.run_dir}")
        else:
            todo.append(run)
    results: list[dict[str, Any]] = []

    def finished(outcome: dict[str, Any]) -> None:
        results.append(outcome)
        if "error" in outcome:
            report(f"failed: {outcome['run_dir']}: {outcome['error']}")
        else:
            report(f"finished: {outcome['run_dir']} ({outcome['frames']} frames, {outcome['frames_per_s']:.0f} frames/s)")

    if not use_ray:
        for run in todo:
            finished(run_one(run.cfg, run.started, threads, spare))
        return results
    import ray

    init: dict[str, Any] = {"address": ray_address} if ray_address else {"num_cpus": cores, "include_dashboard": False}
    ray.init(**init, log_to_driver=False, ignore_reinit_error=True)
    try:
        task = ray.remote(num_cpus=threads)(run_one)
        pending: list[Any] = []
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < concurrent:
                run = queue.pop(0)
                pending.append(task.remote(run.cfg, run.started, threads, spare))
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                finished(ray.get(ref))
    finally:
        ray.shutdown()
    return results


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (1.96 standard errors; 0 for one value)."""
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return float(arr.mean()), 0.0
    return float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(len(arr)))


def summarize(runs: list[SweepRun], sweep_dir: Path) -> list[dict[str, Any]]:
    """``sweep.csv``, ``sweep.md`` and ``curves_<env>.png`` from the finished runs' directories; the table rows."""
    rows, curves = [], {}
    for algorithm in dict.fromkeys(run.algorithm for run in runs):
        for env in dict.fromkeys(run.env for run in runs):
            done = [run for run in runs if run.algorithm == algorithm and run.env == env and run.finished]
            if not done:
                continue
            returns = [mean_return(read_metrics(run.run_dir)) for run in done]
            final = _mean_ci([float(r[~np.isnan(r)][-1]) if (~np.isnan(r)).any() else math.nan for r in returns])
            best = _mean_ci([float(np.nanmax(r)) if (~np.isnan(r)).any() else math.nan for r in returns])
            speed = [json.loads((run.run_dir / "summary.json").read_text())["frames_per_s"] for run in done]
            rows.append({"algorithm": algorithm, "env": env, "seeds": len(done), "final_return": final[0],
                         "final_ci95": final[1], "best_return": best[0], "best_ci95": best[1],
                         "frames_per_s": float(np.mean(speed))})
            curves.setdefault(env, {})[algorithm] = [run.run_dir for run in done]
    header = list(rows[0]) if rows else ["algorithm", "env", "seeds"]
    lines = [",".join(header)] + [",".join(f"{row[key]}" for key in header) for row in rows]
    (sweep_dir / "sweep.csv").write_text("\n".join(lines) + "\n")
    table = ["| algorithm | env | seeds | final return (95% CI) | best return (95% CI) | frames/s |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['algorithm']} | {r['env']} | {r['seeds']} | {r['final_return']:.3f} ± {r['final_ci95']:.3f} | "
              f"{r['best_return']:.3f} ± {r['best_ci95']:.3f} | {r['frames_per_s']:,.0f} |" for r in rows]
    (sweep_dir / "sweep.md").write_text("\n".join(table) + "\n")
    for env, by_algorithm in curves.items():
        plot_sweep(by_algorithm, sweep_dir / f"curves_{_slug(env)}.png", title=env)
    merge_marl_eval([run.run_dir for run in runs if run.finished], sweep_dir)
    return rows


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def merge_marl_eval(run_dirs: list[Path], sweep_dir: Path) -> Path | None:
    """The runs' ``marl_eval.json`` (``logger.marl_eval=true``) merged into one ``<sweep-dir>/marl_eval.json``:
    every env, task, algorithm and seed of the sweep in the marl-eval layout. None when no run wrote one."""
    files = [Path(run_dir) / MARL_EVAL_FILE for run_dir in run_dirs if (Path(run_dir) / MARL_EVAL_FILE).is_file()]
    if not files:
        return None
    merged: dict[str, Any] = {}
    for file in files:
        _merge(merged, json.loads(file.read_text()))
    out = sweep_dir / MARL_EVAL_FILE
    out.write_text(json.dumps(merged, indent=1))
    return out


def write_grid(sweep_dir: Path, grid: dict[str, Any]) -> None:
    """Record the grid in ``sweep.json`` (seeds and frames: the latest command's)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(grid, indent=2))
