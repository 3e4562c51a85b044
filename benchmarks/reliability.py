"""Reliability probes: bad inputs and injected faults, run as a user would, with a table of outcomes.

Bad inputs: each command line below must be refused with one line (exit 2, no traceback), before
anything is built where the check needs no env. Faults: for MAPPO, MADDPG and prioritized IQL, an
uninterrupted reference run, then runs SIGKILLed at random instants (checkpoints every iteration, so
kills land in checkpoint, buffer and metrics writes too) and one stopped with SIGINT, each resumed with
``marlkit train --resume`` and compared with the reference (rewards and losses, every row); and a run
whose rewards turn NaN. A full disk is covered by the tests (simulated ENOSPC), not here.

    python benchmarks/reliability.py [--kills 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"  # custom_envs.py: users' own envs
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
TINY = ["env.num_envs=4", "collector.frames_per_batch=40", "--frames", "80", "model.num_cells=[8]",
        "logger.progress=false"]


def marlkit(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marlkit.pipelines.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def bad_inputs(work: Path) -> list[list[str]]:
    run, other = work / "run", work / "other"
    marlkit(["train", "mappo", "--env", "gridworld", "--run-dir", str(run), *TINY, "train.minibatch_size=20"], work)
    marlkit(["train", "mappo", "--env", "gridworld", "--run-dir", str(other), *TINY, "train.minibatch_size=20",
             "train.lr=1e-3"], work)
    (work / "afile").write_text("")
    edited = {}
    for name, change in {"tagged": ("algorithm: mappo", "algorithm: !!python/object:os.system {}"),
                         "badyaml": (None, "algorithm: [mappo\n"), "otheralgo": ("algorithm: mappo", "algorithm: qmix")}.items():
        shutil.copytree(run, work / name)
        text = (run / "config.yaml").read_text()
        (work / name / "config.yaml").write_text(change[1] if change[0] is None else text.replace(*change))
        edited[name] = str(work / name)
    mappo = ["train", "mappo", "--env", "gridworld", *TINY, "train.minibatch_size=20"]
    return [
        [*mappo, "loss.gamma=1.5"], [*mappo, "loss.clip_epsilon=-1"], [*mappo, "env.mode=bogus"],
        ["train", "mappo", "--env", "vmas/navigation", "env.n_agents=abc"],
        ["train", "mappo", "--env", "vmas/navigation", "env.n_agentz=3"],
        ["train", "mappo", "--env", "vmas/navigation", "env.__init__=1"],
        [*mappo, "--run-dir", str(work / "afile")], [*mappo, "--run-dir", str(run)],
        ["train", "--resume", str(run), "train.lr=0.1"], ["train", "--resume", str(work / "afile")],
        ["eval", edited["tagged"]], ["eval", edited["badyaml"]], ["eval", edited["otheralgo"]],
        ["eval", str(run), "--checkpoint", "/etc/passwd"], ["eval", str(run), "--episodes", "0"], ["eval", str(work)],
        ["render", "--env", "gridworld", "--fps", "-5"], ["render", "--env", "gridworld", "--fps", "0"],
        ["render", "--env", "gridworld", "--out", "video.txt"], ["render", str(run), "--env", "gridworld"],
        [*mappo, "train.lr=1e-3", "train.lr=2e-3"], ["train", "mappo", "--seeds", "0,0"],
        [*mappo, "train.lr=inf"], [*mappo, "train.lr=nan"], [*mappo, "train.minibatch_size=0"],
        ["plot", str(run), str(other)], ["train", "mappo", "--env", "pettingzoo/sisl/waterworld_v4"],
        ["train", "mappo", "--env", "nosuch/x"], ["train", "nosuchalgo"], ["train", "mappo", "--frames", "-5"],
        ["train", "mappo", "env.num_envs=0"], ["train", "mappo", "collector.frames_per_batch=7"],
        ["train", "maddpg", "--env", "gridworld"], ["train", "qmix", "--env", "vmas/navigation"],
        ["train", "mappo", "--device", "tpu"], ["train", "mappo", "model.activation=swish"],
        ["train", "mappo", "logger=stdout"], ["train", "mappo", "--preset", "nope"],
        ["train", "iql", "sharing.mode=bogus"], ["train", "mappo", "nonsense"],
        ["train", "mappo", "--env", "pettingzoo/mpe2/simple_speaker_listener_v4", "env.teams.t=[nobody]"],
        ["train", "mappo", "--env", "custom_envs:NeedsArgument"], ["train", "mappo", "--env", "custom_envs:StringReward"],
        ["train", "mappo", "--env", "no_such_module:Env"],
    ]


def classify(result: subprocess.CompletedProcess | None) -> str:
    if result is None:
        return "accepted (still running)"
    err = result.stderr.strip().splitlines()
    if "Traceback" in result.stderr:
        return "refused with a traceback"
    if result.returncode == 2 and err and err[-1].startswith("marlkit") and "error" in err[-1]:
        return "refused cleanly"
    return "accepted" if result.returncode == 0 else f"other (exit {result.returncode})"


ALGORITHMS = {
    "mappo": ["train", "mappo", "--env", "gridworld", "train.minibatch_size=20"],
    "maddpg": ["train", "maddpg", "--env", "vmas/navigation", "env.n_agents=2", "replay.batch_size=16",
               "train.optimiser_steps=2", "exploration.annealing_frames=200"],
    "iql (prioritized)": ["train", "iql", "--env", "gridworld", "replay.batch_size=16", "train.optimiser_steps=2",
                          "replay.prioritized=true", "exploration.annealing_frames=200"],
}
COMMON = ["--seed", "5", "env.max_steps=15", "env.num_envs=4", "collector.frames_per_batch=40", "--frames", "640",
          "model.num_cells=[16]", "logger.progress=false", "logger.checkpoint_every=1"]


def _curve(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if "reward" in k or "loss" in k} for row in csv.DictReader(handle)]


def interrupted(args: list[str], run: Path, work: Path, delay: float, signum: int) -> str:
    """Start ``args``, send ``signum`` after ``delay`` s, then resume until done; how it went."""
    process = subprocess.Popen([sys.executable, "-m", "marlkit.pipelines.cli", *args, "--run-dir", str(run)],
                               cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if process.poll() is not None:
        return "finished before the signal"
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    if signum == signal.SIGINT and process.returncode == 0:
        return "complete (signal while closing)"  # it let the finished run close, then exited 0
    if signum == signal.SIGINT and process.returncode != 130:
        return f"SIGINT gave exit {process.returncode}"
    if not (run / "config.yaml").is_file():
        result = marlkit([*args, "--run-dir", str(run)], work)  # nothing was written: the same command again
        return "restarted" if result.returncode == 0 else "lost"
    result = marlkit(["train", "--resume", str(run)], work)
    if "already has" in result.stderr:  # the last checkpoint was the final one: killed while closing
        return "complete (killed while closing)"
    if result.returncode != 0:
        return "did not resume: " + (result.stderr.strip().splitlines() or ["?"])[-1][:80]
    return "resumed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs per algorithm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        outcomes: dict[str, list[str]] = {}
        for case in bad_inputs(work):
            try:
                result = marlkit(case, work, timeout=60)
            except subprocess.TimeoutExpired:
                result = None
            outcomes.setdefault(classify(result), []).append(" ".join(case[:6]))
        faults = []
        for name, algorithm in ALGORITHMS.items():
            reference = work / f"ref_{name.split()[0]}"
            start = time.perf_counter()
            marlkit([*algorithm, *COMMON, "--run-dir", str(reference)], work)
            duration = time.perf_counter() - start
            for k in range(args.kills + 1):
                signum = signal.SIGKILL if k < args.kills else signal.SIGINT
                run = work / f"{name.split()[0]}_{k}"
                # kills from late start-up to closing (most land in training, checkpoint and buffer
                # writes); the SIGINT while training (a Ctrl-C during Python's own start-up imports
                # still ends in its KeyboardInterrupt traceback)
                delay = rng.uniform(0.3, 1.0) * duration if signum == signal.SIGKILL else rng.uniform(0.6, 0.9) * duration
                how = interrupted([*algorithm, *COMMON], run, work, delay, signum)
                same = how in ("resumed", "restarted", "complete (killed while closing)",
                               "complete (signal while closing)") and _curve(run) == _curve(reference)
                faults.append((name, signal.Signals(signum).name, f"{delay:.1f}", how, same))
        nan_run = work / "nan"
        nan = marlkit(["train", "mappo", "--env", "custom_envs:NanReward", "--run-dir", str(nan_run), *TINY[:2],
                       "--frames", "200", "train.minibatch_size=20", "logger.checkpoint_every=1"], work)
        nan_resumable = (nan_run / "checkpoints" / "last.pt").is_file()
    total = sum(len(v) for v in outcomes.values())
    print(f"\nBad inputs: {total} tried")
    for outcome, cases in sorted(outcomes.items()):
        print(f"- {outcome}: {len(cases)}" + ("" if outcome == "refused cleanly" else f" ({'; '.join(cases)})"))
    print("\n| algorithm | signal | after s | outcome | resumed run equals the uninterrupted one |")
    print("|---|---|---|---|---|")
    for name, sig, delay, how, same in faults:
        print(f"| {name} | {sig} | {delay} | {how} | {'yes' if same else 'no'} |")
    last = nan.stderr.strip().splitlines()[-1] if nan.stderr.strip() else ""
    print(f"\nNaN rewards: exit {nan.returncode}, last good checkpoint kept: {nan_resumable}, last line: {last!r}")


if __name__ == "__main__":
    main()
