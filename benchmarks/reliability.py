"""Reliability probes: bad inputs and injected faults, run as a user would, with a table of outcomes.

Bad inputs: each command line below must be refused with one line (exit 2, no traceback), before
anything is built where the check needs no env. Faults: for MAPPO, MADDPG and prioritized IQL, an
uninterrupted reference run, then runs SIGKILLed at random instants (checkpoints every iteration, so
kills land in checkpoint, buffer and metrics writes too) and one stopped with SIGINT, each signal sent to the
run's process group (prioritized IQL also with a parallel evaluation's worker process), each resumed with
``marlkit train --resume`` and compared with the reference (rewards and losses, every row); and a run
whose rewards turn NaN; a run directory on a full filesystem (a small tmpfs, then grown and
resumed) and on a read-only one (both need root to mount).

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
        [*mappo, "train.num_epochs=-1"], [*mappo, "loss.lmbda=2"], [*mappo, "env.max_steps=0"], [*mappo, "--frames", "abc"],
        [*mappo, "replay.buffer_size=10"], [*mappo, "model.num_cells=[0]"], [*mappo, "model.num_cells=abc"],
        [*mappo, "--device", "cuda"], [*mappo, "train.lr=-1"], [*mappo, "--seed", "-1"], [*mappo, "--seed", "abc"],
        [*mappo, "train.max_grad_norm=0"], [*mappo, "loss.entropy_coef=-1"], [*mappo, "model.share_params=maybe"],
        [*mappo, "logger.eval_every=-1"], [*mappo, "logger.video_every=abc"], [*mappo, "env.teams=abc"],
        ["train", "iql", "--env", "gridworld", "replay.buffer_size=0"], ["train", "iql", "--env", "gridworld", "replay.alpha=-1"],
        ["train", "iql", "--env", "gridworld", "exploration.eps_init=2"], ["train", "iql", "--env", "gridworld", "sharing.beta=-1"],
        ["train", "iql", "--env", "gridworld", "replay.batch_size=0"], ["train", "iql", "--env", "gridworld", "loss.gamma=-0.5"],
        ["train", "iql", "--env", "gridworld", "exploration.annealing_frames=-5"], ["train", "masac", "--env", "gridworld"],
        ["train", "maddpg", "--env", "vmas/navigation", "env.n_agents=0"], ["train", "maddpg", "loss.tau=2"],
        ["train", "maddpg", "exploration.sigma_init=-1"], ["train", "mappo", "--env", "vmas/nosuchscenario"],
        ["train", "mappo", "--env", "pettingzoo/sisl/nosuch_v1"], ["train", "mappo", "--env", "gymnasium/NoSuch-v0"],
        ["train", "mappo", "--seeds", "0,-1"],
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
    "iql (prioritized, evaluation worker)": ["train", "iql", "--env", "gridworld", "replay.batch_size=16",
                                             "train.optimiser_steps=2", "replay.prioritized=true",
                                             "exploration.annealing_frames=200", "logger.eval_parallel=true",
                                             "logger.eval_every=1", "logger.eval_episodes=2"],
}
COMMON = ["--seed", "5", "env.max_steps=15", "env.num_envs=4", "collector.frames_per_batch=40", "--frames", "640",
          "model.num_cells=[16]", "logger.progress=false", "logger.checkpoint_every=1"]


def _curve(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if "reward" in k or "loss" in k} for row in csv.DictReader(handle)]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def reference_run(args: list[str], run: Path, work: Path) -> float:
    """Run ``args`` uninterrupted; the seconds from its ``config.yaml`` (env built, training begins) to its end."""
    process = subprocess.Popen([sys.executable, "-m", "marlkit.pipelines.cli", *args, "--run-dir", str(run)],
                               cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run / "config.yaml", process)
    start = time.perf_counter()
    process.wait(timeout=300)
    return time.perf_counter() - start


def interrupted(args: list[str], run: Path, work: Path, delay: float, signum: int) -> str:
    """Start ``args``, send ``signum`` ``delay`` s after training began to its whole process group (as a
    terminal's Ctrl-C or a scheduler does: worker processes get it too), then resume until done; how it went."""
    process = subprocess.Popen([sys.executable, "-m", "marlkit.pipelines.cli", *args, "--run-dir", str(run)],
                               cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    _wait_for(run / "config.yaml", process)
    time.sleep(delay)
    if process.poll() is not None:
        return "finished before the signal"
    os.killpg(process.pid, signum)
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


def _mount(point: Path, options: str) -> bool:
    point.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode == 0


DISK_CASES = [  # (what, command, filesystem KiB): sizes where, unlike in the default runs, the disk fills
    ("mappo: a second checkpoint does not fit", ["train", "mappo", "--env", "gridworld", "train.minibatch_size=20",
                                                "--frames", "400", *COMMON[2:5], "model.num_cells=[16]",
                                                "logger.progress=false", "logger.checkpoint_every=1"], 100),
    ("maddpg: the replay fills the disk", ["train", "maddpg", "--env", "vmas/navigation", "--frames", "4000",
                                           "env.num_envs=4", "env.n_agents=2", "collector.frames_per_batch=400",
                                           "model.num_cells=[8]", "replay.buffer_size=2000", "replay.batch_size=32",
                                           "logger.progress=false", "logger.checkpoint_every=3"], 700),
    ("maddpg: the replay is larger than the disk", [*ALGORITHMS["maddpg"], *COMMON], 400),
]


def full_disk(args: list[str], kib: int, work: Path) -> str:
    """Train on a ``kib`` KiB filesystem until it is full, grow it, resume, compare with the same run on a
    large disk; how it went."""
    point = work / f"disk{kib}"
    if not _mount(point, f"size={kib}k"):
        return "not run (mounting a tmpfs needs root)"
    try:
        first = marlkit([*args, "--run-dir", str(point / "run")], work)
        line = (first.stderr.strip().splitlines() or ["?"])[-1]
        if "Traceback" in first.stderr:
            return f"traceback: {line[:80]}"
        if first.returncode == 2 and "replay buffers need" in line:
            return "refused before training, in one line"
        if first.returncode != 1 or "no space left" not in line:
            return f"exit {first.returncode}: {line[:80]}"
        subprocess.run(["mount", "-o", "remount,size=65536k", str(point)], check=True)
        resumed = marlkit(["train", "--resume", str(point / "run")], work)
        if resumed.returncode != 0:
            return "did not resume: " + (resumed.stderr.strip().splitlines() or ["?"])[-1][:80]
        reference = work / f"disk_reference{kib}"
        marlkit([*args, "--run-dir", str(reference)], work)
        same = _curve(point / "run") == _curve(reference)
        where = line.split(" while writing ")[-1].split(";")[0]
        return f"one line (no space left, writing {where}), resumed after growing: {'equal' if same else 'NOT equal'}"
    finally:
        subprocess.run(["umount", str(point)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs per algorithm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="inputs,faults,disk,nan", help="which probes to run")
    args = parser.parse_args()
    parts = args.parts.split(",")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        outcomes: dict[str, list[str]] = {}
        for case in bad_inputs(work) if "inputs" in parts else []:
            try:
                result = marlkit(case, work, timeout=60)
            except subprocess.TimeoutExpired:
                result = None
            outcomes.setdefault(classify(result), []).append(" ".join(case[:6]))
        read_only = work / "readonly"
        if "inputs" in parts and _mount(read_only, "size=64k,ro"):
            result = marlkit(["train", "mappo", "--env", "gridworld", *TINY, "--run-dir", str(read_only / "run")], work)
            outcomes.setdefault(classify(result), []).append("train --run-dir <read-only filesystem>")
            subprocess.run(["umount", str(read_only)], check=False)
        faults, disks = [], []
        for number, (name, algorithm) in enumerate(ALGORITHMS.items() if "faults" in parts else []):
            reference = work / f"ref_{number}"
            duration = reference_run([*algorithm, *COMMON], reference, work)
            for k in range(args.kills + 1):
                signum = signal.SIGKILL if k < args.kills else signal.SIGINT
                run = work / f"run_{number}_{k}"
                # SIGKILLs anywhere in training and closing (checkpoint, buffer and metrics writes
                # included); the SIGINT while training
                delay = rng.uniform(0.0, 0.9) * duration if signum == signal.SIGKILL else rng.uniform(0.2, 0.8) * duration
                how = interrupted([*algorithm, *COMMON], run, work, delay, signum)
                same = how in ("resumed", "restarted", "complete (killed while closing)",
                               "complete (signal while closing)") and _curve(run) == _curve(reference)
                faults.append((name, signal.Signals(signum).name, f"{delay:.1f}", how, same))
        for what, command, kib in DISK_CASES if "disk" in parts else []:
            disks.append((what, kib, full_disk(command, kib, work)))
        nan_run = work / "nan"
        if "nan" in parts:
            nan = marlkit(["train", "mappo", "--env", "custom_envs:NanReward", "--run-dir", str(nan_run), *TINY[:2],
                           "--frames", "200", "train.minibatch_size=20", "logger.checkpoint_every=1"], work)
            nan_resumable = (nan_run / "checkpoints" / "last.pt").is_file()
    total = sum(len(v) for v in outcomes.values())
    if "inputs" in parts:
        print(f"\nBad inputs: {total} tried")
    for outcome, cases in sorted(outcomes.items()):
        print(f"- {outcome}: {len(cases)}" + ("" if outcome == "refused cleanly" else f" ({'; '.join(cases)})"))
    if faults:
        print("\n| algorithm | signal | after s | outcome | resumed run equals the uninterrupted one |")
        print("|---|---|---|---|---|")
    for name, sig, delay, how, same in faults:
        equal = "n/a (no signal)" if how == "finished before the signal" else "yes" if same else "no"
        print(f"| {name} | {sig} | {delay} | {how} | {equal} |")
    if disks:
        print("\n| full disk | filesystem | outcome |\n|---|---|---|")
    for what, kib, how in disks:
        print(f"| {what} | {kib} KiB tmpfs | {how} |")
    if "nan" in parts:
        last = nan.stderr.strip().splitlines()[-1] if nan.stderr.strip() else ""
        print(f"\nNaN rewards: exit {nan.returncode}, last good checkpoint kept: {nan_resumable}, last line: {last!r}")


if __name__ == "__main__":
    main()
