"""The ``marlkit`` command.

``marlkit train <algorithm> [--env NAME] [--frames N] [--seed N] [--device cpu|cuda] [--run-dir PATH]
[--preset NAME] [section.field=value ...]``. With no algorithm, env or preset it trains the default
job: MAPPO on ``vmas/navigation`` (the ``navigation-matched`` preset) on CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    sys.stderr.write(f"marlkit: stopped by {signal.Signals(signum).name} while starting\n")
    os._exit(128 + signum)


# Run as the command (console script or ``python -m``), a Ctrl-C during the imports below (seconds of
# torch and torchrl) ends in one line rather than a traceback through them; main() takes over after.
if __name__ == "__main__" or Path(sys.argv[0]).name == "marlkit":
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _interrupted_while_starting)

from . import ALGORITHMS, DEFAULT_ALGORITHM, make_config, pipeline_for  # noqa: E402
from .config import apply_overrides, available_presets, describe, preset_algorithm, RunConfig  # noqa: E402
from .checkpoint import DiskFull  # noqa: E402
from .collectors import CollectorFailed  # noqa: E402
from .evaluate import EvaluationFailed  # noqa: E402
from .learners import TrainingDiverged  # noqa: E402
from .session import TrainingStopped  # noqa: E402
from .rundir import default_run_dir  # noqa: E402


def _train_epilog() -> str:
    lines = [f"algorithms: {', '.join(ALGORITHMS)}", f"presets: {', '.join(available_presets())}", ""]
    seen = set()
    for algorithm in ALGORITHMS:
        module = pipeline_for(algorithm)
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        names = [a for a in ALGORITHMS if ALGORITHMS[a][0] == module.__name__]
        lines.append(f"fields for {'/'.join(names)} (override as section.field=value):")
        lines.append(describe(module.CONFIG))
        lines.append("")
    lines.append("Under env., any other name is a scenario keyword for make_env (env.n_agents=3).")
    return "\n".join(lines)


COMMANDS = {
    "train": "train an algorithm and write a run directory",
    "render": "record a rollout video (.mp4 / .gif) of a trained run or of random actions",
    "plot": "draw training curves of one or more run directories to a PNG",
    "eval": "evaluate a trained run's deterministic policy; writes eval.json",
    "sweep": "train a grid of algorithms x envs x seeds (Ray tasks, or one after another), then tabulate and plot",
    "export": "write each group's deterministic policy as an ONNX model or a torch.export program (+ a JSON)",
}


def _train_parser() -> argparse.ArgumentParser:
    train = argparse.ArgumentParser(
        prog="marlkit train",
        description="Train an algorithm; writes config.yaml, metrics.csv and summary.json.",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("algorithm", nargs="?", default=None,
                       help=f"one of {', '.join(ALGORITHMS)} (default {DEFAULT_ALGORITHM})")
    train.add_argument("--env", help="environment name, e.g. vmas/navigation (env.name)")
    train.add_argument("--frames", type=int, help="total frame budget (collector.total_frames)")
    train.add_argument("--seed", type=int, help="seed (seed)")
    train.add_argument("--device", help="cpu or cuda (device)")
    train.add_argument("--run-dir", help="run directory (logger.run_dir)")
    train.add_argument("--preset", help=f"YAML preset: {', '.join(available_presets())}")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from checkpoints/last.pt with its own config (--frames: new total)")
    train.add_argument("--seeds", help="seeds (0-4, or comma-separated) run one after another into <run-dir>_seed<k>, "
                                       "then plotted together into <run-dir>_seeds.png (marlkit sweep runs them at once)")
    train.add_argument("--threads", help="torch intra-op threads: a number, or auto (the default, unless "
                       "$MARLKIT_THREADS or $OMP_NUM_THREADS says otherwise): one per core other programs leave "
                       "idle, looked at again every half second of training, so runs sharing the cores do not slow "
                       "each other down. Not part of the config; metrics.csv (system/torch_threads) and summary.json record it, "
                       "and --resume keeps a fixed count unless given one")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return train


def _render_parser() -> argparse.ArgumentParser:
    render = argparse.ArgumentParser(
        prog="marlkit render",
        description="Record a rollout to a video: a trained run's deterministic policy (marlkit render RUN_DIR) "
                    "or uniformly random actions on an environment (marlkit render --env NAME).",
    )
    render.add_argument("run_dir", nargs="?", help="run directory whose checkpoint drives the policy")
    render.add_argument("--checkpoint", default="last", help="with RUN_DIR: last, best, or a checkpoint file")
    render.add_argument("--env", help="environment name for a random-policy video, e.g. vmas/navigation")
    render.add_argument("--out", default="rollout.mp4", help="output file: .mp4 or .gif (default rollout.mp4)")
    render.add_argument("--steps", type=int, default=100, help="frames to record, one per env step")
    render.add_argument("--env-index", type=int, default=0, help="which copy of a batched env to film")
    render.add_argument("--num-envs", type=int, default=1, help="copies to build")
    render.add_argument("--seed", type=int, default=0, help="seed")
    render.add_argument("--fps", type=int, default=20, help="frames per second of the video")
    render.add_argument("overrides", nargs="*", help="scenario keywords, env.<name>=value (e.g. env.n_agents=3)")
    return render


def _render(argv: list[str]) -> int:
    from .config import EnvConfig
    from .environment import build_env, resolve_env_config
    from .render import check_video_path, record_rollout

    parser = _render_parser()
    args = parser.parse_intermixed_args(argv)
    if args.run_dir is not None and "=" in args.run_dir:  # an override landed in the run-dir slot
        args.overrides.insert(0, args.run_dir)
        args.run_dir = None
    if (args.run_dir is None) == (args.env is None):
        parser.exit(2, "marlkit render: error: give either a run directory or --env NAME (not both)\n")
    try:
        out = check_video_path(args.out)  # before anything is built
        if args.fps < 1:
            raise ValueError(f"--fps must be a positive number of frames per second, got {args.fps}")
        if args.run_dir is not None:
            from .runs import load_run

            loaded = load_run(args.run_dir, args.checkpoint, num_envs=max(args.num_envs, args.env_index + 1))
            record_rollout(loaded.env, out, steps=args.steps, env_index=args.env_index, policy=loaded.policy,
                           fps=args.fps)
            print(f"wrote {out} ({args.steps} frames)")
            return 0
        env_cfg = apply_overrides(EnvConfig(name=args.env, num_envs=args.num_envs),
                                  {k.removeprefix("env."): v for k, v in
                                   (item.split("=", 1) for item in args.overrides if "=" in item)})
        bad = [item for item in args.overrides if "=" not in item]
        if bad:
            raise ValueError(f"overrides must look like env.<name>=value, got {bad}")
        env = build_env(resolve_env_config(env_cfg), device="cpu", seed=args.seed)
        record_rollout(env, out, steps=args.steps, env_index=args.env_index, fps=args.fps)
    except ValueError as err:
        parser.exit(2, f"marlkit render: error: {err}\n")
    print(f"wrote {out} ({args.steps} frames)")
    return 0


def _plot(argv: list[str]) -> int:
    from .plots import plot_runs

    parser = argparse.ArgumentParser(
        prog="marlkit plot",
        description="Per-group mean return and the loss terms (or any --metric column) vs frames, wall time or "
                    "iterations; several runs of one config are drawn as their mean with a shaded 95% interval over "
                    "seeds.",
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.csv)")
    parser.add_argument("--out", default="curves.png", help="output PNG (default curves.png)")
    parser.add_argument("--x", default="frames", help="horizontal axis: frames (default), time (wall seconds) "
                        "or iterations")
    parser.add_argument("--metric", action="append", default=None,
                        help="a metrics.csv column to plot (repeat for several; default: returns and loss terms)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.out, x=args.x, metrics=args.metric)
    except ValueError as err:
        parser.exit(2, f"marlkit plot: error: {err}\n")
    print(f"wrote {out}")
    return 0


def _eval(argv: list[str]) -> int:
    from .runs import eval_file, evaluate_run

    parser = argparse.ArgumentParser(prog="marlkit eval", description="Evaluate the deterministic (greedy / "
                                     "mean-action) policy of a run on a fresh env; prints and writes eval.json.")
    parser.add_argument("run_dir", help="run directory")
    parser.add_argument("--episodes", type=int, default=10, help="episodes in total (one per env copy, each run to its own end)")
    parser.add_argument("--checkpoint", default="last", help="last, best, or a path to a checkpoint file")
    parser.add_argument("--env", default=None, help="evaluate on another env with the same groups and specs "
                        "(e.g. pettingzoo/sisl/pursuit_v5 for a run trained on pursuit); writes eval_<env>.json")
    parser.add_argument("overrides", nargs="*", help="env.field=value: other env settings, e.g. env.n_agents=5 "
                        "(a policy with shared weights on more agents); writes eval_<settings>.json")
    args = parser.parse_intermixed_args(argv)
    try:
        result = evaluate_run(args.run_dir, episodes=args.episodes, checkpoint=args.checkpoint, env_name=args.env,
                              env_overrides=args.overrides)
    except ValueError as err:
        parser.exit(2, f"marlkit eval: error: {err}\n")
    for group, stats in result["groups"].items():
        low, high = stats["ci95"]
        print(f"{group}: mean return {stats['mean']:.3f} (95% CI {low:.3f} to {high:.3f}) over {args.episodes} episodes")
    if result["episodes_ended"] < result["episodes"]:
        print(f"note: {result['episodes'] - result['episodes_ended']} episodes had not ended after "
              f"{result['steps']} steps; they are scored at that step")
    print(f"wrote {eval_file(args.run_dir, args.env, args.overrides)}")
    return 0


def _export(argv: list[str]) -> int:
    from .export import export_run, FORMATS

    parser = argparse.ArgumentParser(
        prog="marlkit export",
        description="Write the deterministic policy of each group of a run (observation [, action mask] -> action "
                    "of every agent, any batch size) as an ONNX model or a torch.export program, with a JSON beside "
                    "it naming its inputs, outputs, their shapes and dtypes, and the action space. Running it needs "
                    "onnxruntime or torch only, not marlkit.")
    parser.add_argument("run_dir", help="run directory")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="onnx (needs marlkit[export]) or pt2")
    parser.add_argument("--checkpoint", default="last", help="last, best, or a path to a checkpoint file")
    parser.add_argument("--out", default=None, help="output file (default <run_dir>/exported/<group>.<format>; "
                        "with several groups, <out stem>.<group>.<format>)")
    parser.add_argument("--group", default=None, help="export this group only")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run_dir, fmt=args.format, checkpoint=args.checkpoint, out=args.out, group=args.group)
    except ValueError as err:
        parser.exit(2, f"marlkit export: error: {err}\n")
    for path in written:
        print(f"wrote {path} and {path.name}.json")
    return 0


def _sweep(argv: list[str]) -> int:
    from .collectors import check_ray_address, check_ray_installed
    from .sweep import check_sweep_dir, parse_seeds, plan, run_sweep, summarize, sweep_dir_for, write_grid

    parser = argparse.ArgumentParser(
        prog="marlkit sweep",
        description="Train every algorithm on every env with every seed, each run its own run directory "
                    "<sweep-dir>/<algorithm>/<env>/seed<k>; then write sweep.csv, sweep.md (final and best return, "
                    "95%% CI over seeds, frames/s) and curves_<env>.png. The same command again skips finished "
                    "runs and resumes unfinished ones from their checkpoints.")
    parser.add_argument("--algorithms", required=True, help="comma-separated, e.g. mappo,ippo")
    parser.add_argument("--envs", required=True, help="comma-separated, e.g. vmas/balance,vmas/navigation")
    parser.add_argument("--seeds", default="0", help="e.g. 0-4 or 0,1,2 (default 0)")
    parser.add_argument("--frames", type=int, help="frame budget of every run (collector.total_frames)")
    parser.add_argument("--preset", help="YAML preset applied to every run before the overrides")
    parser.add_argument("--sweep-dir", help="default sweeps/<algorithms>_<envs>")
    parser.add_argument("--max-concurrent", type=int, default=2,
                        help="runs at once (each gets cores / max-concurrent torch threads and Ray CPUs; default 2)")
    parser.add_argument("--ray-address", help="join this Ray cluster (auto or host:port); default: a local instance")
    parser.add_argument("--no-ray", action="store_true", help="run one after another in this process")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides for every run")
    args = parser.parse_intermixed_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        if args.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        envs = [e.strip() for e in args.envs.split(",") if e.strip()]
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else sweep_dir_for(algorithms, envs)
        grid = {"algorithms": algorithms, "envs": envs, "seeds": seeds, "preset": args.preset,
                "overrides": list(args.overrides), "frames": args.frames}
        check_sweep_dir(sweep_dir, grid)
        runs = plan(algorithms, envs, seeds, sweep_dir, preset=args.preset, overrides=args.overrides,
                    frames=args.frames)
        if not args.no_ray:
            check_ray_installed("marlkit sweep (its runs are Ray tasks)",
                                " (or --no-ray to run them one after another)")
            if args.ray_address not in (None, "auto"):
                check_ray_address(args.ray_address, "--ray-address")
    except ValueError as err:
        parser.exit(2, f"marlkit sweep: error: {err}\n")
    write_grid(sweep_dir, grid)
    print(f"sweep {sweep_dir}: {len(runs)} runs")
    try:
        results = run_sweep(runs, use_ray=not args.no_ray, ray_address=args.ray_address,
                            max_concurrent=args.max_concurrent)
    except (KeyboardInterrupt, TrainingStopped) as err:  # Ray's runs are cancelled; one in this process checkpoints
        what, code = "interrupted", 130
        if isinstance(err, TrainingStopped):
            what = (f"{err.run_dir} stopped by {signal.Signals(err.signum).name} after iteration {err.iteration} "
                    "(checkpoint saved)")
            code = 128 + err.signum
        sys.stderr.write(f"marlkit sweep: {what}; the same command again resumes its unfinished runs from their "
                         f"checkpoints under {sweep_dir}\n")
        return code
    rows = summarize(runs, sweep_dir)
    print((sweep_dir / "sweep.md").read_text(), end="")
    print(f"wrote {sweep_dir / 'sweep.csv'}, {sweep_dir / 'sweep.md'} and {len({r['env'] for r in rows})} plots")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} runs failed (listed above); the same command again retries them", file=sys.stderr)
    return 1 if failed else 0


def _run(parser: argparse.ArgumentParser, train: Any, run_dir: str, owns_process: bool,
         not_started: list[int] | None = None) -> Any:
    """``train()``, with every way it can stop turned into one line and an exit code.

    ``owns_process`` (the ``marlkit`` command itself, not a call from Python): Ctrl-C before training
    sets its handlers stops where it is, and after a completed run the process ends without a traceback.
    ``not_started``: the seeds of a ``--seeds`` command after this run, which the line then names.
    """
    def stop(code: int, message: str) -> None:
        from tqdm.auto import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):  # an open bar would redraw after the message
            bar.close()
        if not_started:
            rest = ",".join(map(str, not_started))
            message += f"; seeds {rest} did not start: after this one, run the same command with --seeds {rest}"
        parser.exit(code, f"marlkit train: {message}\n")

    if owns_process:  # until training sets its own handlers: stop where it is
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        try:
            result = train()
        except Exception as err:
            if _interrupt_behind(err):  # a library's cleanup turned a second Ctrl-C into its own error
                raise KeyboardInterrupt from None
            raise
        if owns_process:  # the run is complete: a late signal must not end it in a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return result
    except ValueError as err:  # bad config found once the env was built, no checkpoint, ...: nothing changed
        stop(2, f"error: {err}")
    except TrainingDiverged as err:
        stop(1, f"training stopped: {err}; {_last_good(run_dir)}")
    except TrainingStopped as err:  # 128 + the signal's number, as a shell reports it
        stop(128 + err.signum, str(err))
    except DiskFull as err:
        stop(1, f"error: {err}")
    except (CollectorFailed, EvaluationFailed) as err:  # the rows so far are written
        stop(1, f"error: {err}; {_last_good(run_dir)}")
    except KeyboardInterrupt:  # before the first iteration set its handlers up, or a second Ctrl-C
        stop(130, f"interrupted; {_last_good(run_dir) if run_dir else 'nothing was saved'}")


def _interrupt_behind(err: BaseException) -> bool:
    """Whether ``err`` was raised while a KeyboardInterrupt unwound (tensordict's ``to_module`` does so
    when one lands inside TorchRL's MultiAgentMLP)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _last_good(run_dir: str) -> str:
    """Where a stopped run can go on from."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if last.is_file():
        return f"its last good checkpoint is {last} (marlkit train --resume {run_dir})"
    return "no checkpoint was written before it: run the same command again"


def _usage() -> str:
    lines = ["usage: marlkit <command> [...]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "marlkit <command> --help shows a command's options."]
    return "\n".join(lines)


def resume_config(args: argparse.Namespace) -> RunConfig:
    """A resumed run's own config (``config.yaml``), with only the frame budget changeable."""
    from .runs import config_from_dict, read_config

    other = [name for name in ("env", "seed", "device", "run_dir", "preset", "seeds") if getattr(args, name) is not None]
    if args.algorithm is not None:  # a lone override lands in the algorithm slot
        other.insert(0, args.algorithm if "=" in args.algorithm else "algorithm")
    other += list(args.overrides)
    if other:
        raise ValueError(f"--resume continues a run with its own config; only --frames may change it (got {other})")
    cfg = config_from_dict(read_config(args.resume))
    cfg.logger.run_dir = args.resume
    if args.frames is not None:
        cfg.collector.total_frames = args.frames
    return cfg


def build_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < preset < dotted overrides < flags (:func:`marlkit.pipelines.make_config`)."""
    overrides = list(args.overrides)
    if args.algorithm is not None and "=" in args.algorithm:
        # "marlkit train train.lr=1e-3": the first override landed in the algorithm slot.
        overrides.insert(0, args.algorithm)
        args.algorithm = None
    preset = args.preset
    # "marlkit train --preset pursuit-super": the preset's own algorithm, as its file names it
    algorithm = args.algorithm or (preset_algorithm(preset) if preset else None) or DEFAULT_ALGORITHM
    if preset is None and args.env is None:
        preset = ALGORITHMS[algorithm][1] if algorithm in ALGORITHMS else None
    flags = {"env.name": args.env, "collector.total_frames": args.frames, "seed": args.seed,
             "device": args.device, "logger.run_dir": args.run_dir}
    cfg = make_config(algorithm, preset, overrides)
    return apply_overrides(cfg, {key: value for key, value in flags.items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``marlkit`` command."""
    owns_process = argv is None  # run as the command, not called from Python (tests, notebooks)
    if not owns_process:
        return _main(list(argv), owns_process)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return _main(sys.argv[1:], owns_process)
    except (KeyboardInterrupt, Exception) as err:  # eval, render, plot or a config check; train() has its own
        if not _interrupt_behind(err):  # a library's cleanup may turn the Ctrl-C into its own error
            raise
        sys.stderr.write("marlkit: interrupted\n")
        return 130


def _main(argv: list[str], owns_process: bool) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"marlkit: error: unknown command {command!r}; accepted: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    if command == "render":
        return _render(rest)
    if command == "plot":
        return _plot(rest)
    if command == "eval":
        return _eval(rest)
    if command == "sweep":
        return _sweep(rest)
    if command == "export":
        return _export(rest)
    parser = _train_parser()
    # Intermixed: the algorithm and the dotted overrides may come before or after the options.
    args = parser.parse_intermixed_args(rest)
    try:  # every check that needs no env runs in train(), before anything is built or written
        cfg = resume_config(args) if args.resume else build_config(args)
        module = pipeline_for(cfg.algorithm)
    except ValueError as err:
        parser.exit(2, f"marlkit train: error: {err}\n")
    if args.threads is not None:
        from .threads import ENV_VAR, thread_setting

        try:
            thread_setting(args.threads)
        except ValueError as err:
            parser.exit(2, f"marlkit train: error: {err}\n")
        os.environ[ENV_VAR] = args.threads  # every run of this command (--seeds) and its workers
    if args.resume:
        result = _run(parser, lambda: module.train(cfg, resume=True), args.resume, owns_process)
        print(f"resumed {result.run_dir}: {result.frames} frames")
        return 0
    seeds = [cfg.seed]
    if args.seeds:
        from .sweep import parse_seeds

        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as err:
            parser.exit(2, f"marlkit train: error: --{err}\n")
    base = Path(cfg.logger.run_dir or default_run_dir(cfg.algorithm, cfg.env.name, seeds[0]))
    run_dirs = []
    for k, seed in enumerate(seeds):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.seed = seed
        run_cfg.logger.run_dir = str(base.with_name(f"{base.name}_seed{seed}") if args.seeds else base)
        result = _run(parser, lambda: module.train(run_cfg), run_cfg.logger.run_dir, owns_process, seeds[k + 1:])
        run_dirs.append(result.run_dir)
        rewards = ", ".join(f"{g} {r:.3f}" for g, r in result.episode_reward_mean.items())
        print(f"run directory: {result.run_dir}\nframes: {result.frames}  frames/s: "
              f"{result.frames_per_s:.0f}  mean episode return: {rewards}")
    if args.seeds:
        from .plots import plot_runs

        print(f"wrote {plot_runs(run_dirs, base.with_name(f'{base.name}_seeds.png'))}")
    return 0


def script_main(algorithms: tuple[str, ...], argv: list[str] | None = None) -> int:
    """``python pipelines/<file>.py [algorithm] [...]``: ``marlkit train`` with the file's first
    algorithm as the default."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in algorithms:
        args = [algorithms[0], *args]
    return main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())
