"""The benchmark scripts run end to end on tiny budgets, so they cannot rot (no timing is checked)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ROOT = BENCHMARKS.parent


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_pursuit_speed_prints_its_table():
    out = _run(str(BENCHMARKS / "pursuit_speed.py"), "--seconds", "0.05", "--copies", "1,4", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| pursuit |")]
    assert len(rows) == 4 and all(float(r.split("|")[4].replace(",", "")) > 0 for r in rows), out


def test_super_pursuit_runs_resumes_by_skipping_and_tabulates(tmp_path):
    tiny = ["--seeds", "0,1", "--frames", "160", "--jobs", "2", "--out", str(tmp_path), "env.num_envs=4",
            "collector.frames_per_batch=40", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3", "env.n_evaders=2",
            "replay.warmup_frames=0", "train.optimiser_steps=2", "logger.eval_every=2", "logger.eval_episodes=2"]
    out = _run(str(BENCHMARKS / "super_pursuit.py"), "--arms", "none,quantile", *tiny)
    assert "4 runs to do" in out and "FAILED" not in out, out
    with (tmp_path / "quantile_s1.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[-1]["eval/pursuer/episode_reward_mean"] != ""
    head = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    record = json.loads((tmp_path / "quantile_s1.json").read_text())
    assert record["commit"] == (head.strip() or None)
    assert record["cpu"].endswith(f"({torch.backends.cpu.get_cpu_capability()})"), record  # kernels round per CPU
    assert record["threads"] == "1" and record["thread_policy"] == "fixed"  # two runs at a time: one thread each
    assert "0 runs to do" in _run(str(BENCHMARKS / "super_pursuit.py"), "--arms", "none,quantile", *tiny)
    # the check script retrains a committed run's start and finds it equal; a changed value is caught
    check = [str(BENCHMARKS / "super_pursuit_check.py"), "--arm", "quantile", "--seed", "1", "--frames", "160",
             "--results", str(tmp_path), *tiny[tiny.index("env.num_envs=4"):]]
    same = _run(*check)
    assert ": 4 iterations x" in same and "0 differing values" in same, same
    path = tmp_path / "quantile_s1.csv"
    lines = path.read_text().splitlines()
    header, row = lines[0].split(","), lines[-1].split(",")
    row[header.index("pursuer/epsilon")] = "0.5"
    path.write_text("\n".join([*lines[:-1], ",".join(row)]) + "\n")
    keep = tmp_path / "kept"
    out = subprocess.run([sys.executable, *check, "--keep", str(keep)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "1 differing values" in out.stdout and "pursuer/epsilon" in out.stdout, out.stdout
    # a difference reports the outcome against every committed seed: here the rerun is seed 1 again
    assert "outcome over the rerun's 2 evaluations" in out.stdout and "the 2 committed quantile seeds" in out.stdout
    area = next(line for line in out.stdout.splitlines() if "area under the curve: rerun" in line)
    assert area.split("rerun ")[1].split(";")[0] == area.split("seed 1 ")[1].split(";")[0], area
    with (keep / "quantile_s1.csv").open() as handle:  # the rerun, kept with its record
        kept = list(csv.DictReader(handle))
    assert [r["pursuer/epsilon"] for r in kept] == [r["pursuer/epsilon"] for r in rows], kept
    assert json.loads((keep / "quantile_s1.json").read_text())["wall_s"] > 0
    again = subprocess.run([sys.executable, *check, "--keep", str(keep)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "quantile_s1.csv exists" in again.stderr, again.stderr  # never overwritten
    a_file = [*check, "--keep", str(tmp_path / "quantile_s1.json")]  # refused before retraining
    blocked = subprocess.run([sys.executable, *a_file], capture_output=True, text=True, timeout=600)
    assert blocked.returncode == 2 and "cannot make that folder" in blocked.stderr, blocked.stderr
    table = _run(str(BENCHMARKS / "super_pursuit_table.py"), "--out", str(tmp_path))
    quantile = next(line for line in table.splitlines() if line.startswith("| quantile |"))
    assert "| 2 |" in quantile and "vs none (2 seeds)" in quantile, table
    auc_cell = quantile.split("|")[3]  # the mean, then each seed's value in brackets
    assert "(s0 " in auc_cell and ", s1 " in auc_cell and auc_cell.strip().endswith(")"), table
    assert table.index("| none |") < table.index("| quantile |"), table  # the benchmark's arm order
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_super_pursuit_lone_run_takes_auto_threads_and_refuses_a_bad_count(tmp_path):
    """A lone run (--jobs 1) runs with marlkit's ``auto`` threads, which the run itself reports; a bad --threads
    is refused before any run."""
    tiny = ["--arms", "none", "--seeds", "0", "--frames", "40", "--jobs", "1", "--out", str(tmp_path),
            "env.num_envs=4", "collector.frames_per_batch=40", "env.x_size=7", "env.y_size=7", "env.n_pursuers=2",
            "env.n_evaders=1", "replay.warmup_frames=0", "train.optimiser_steps=1", "logger.eval_every=100"]
    out = _run(str(BENCHMARKS / "super_pursuit.py"), *tiny)
    assert "torch threads auto" in out and "FAILED" not in out, out
    record = json.loads((tmp_path / "none_s0.json").read_text())
    assert record["threads"] == "auto" and record["thread_policy"] == "auto", record
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "super_pursuit.py"), *tiny, "--seeds", "1", "--threads",
                          "two"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--threads 'two' is not a thread count; accepted: auto" in bad.stderr, bad.stderr
    assert not (tmp_path / "none_s1.csv").exists()


def test_super_pursuit_table_pairs_plain_dqn_arms_with_plain_dqn_baseline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from super_pursuit_table import summarise

    def run(level: float) -> dict:
        return {"returns": [level] * 10, "wall_s": 60.0}

    runs = {"none": {0: run(1.0), 1: run(2.0)}, "none-dqn": {0: run(5.0), 1: run(7.0)},
            "quantile": {0: run(4.0), 1: run(5.0)}, "quantile-dqn": {0: run(6.0), 1: run(8.0)}}
    rows = {row["arm"]: row for row in summarise(runs)}
    assert rows["quantile-dqn"]["baseline"] == "none-dqn" and rows["quantile-dqn"]["vs_baseline"] == (1.0, 1.0)
    assert rows["quantile"]["baseline"] == "none" and rows["quantile"]["vs_baseline"] == (3.0, 3.0)
    assert rows["none"]["vs_baseline"] is None and rows["none-dqn"]["vs_baseline"] is None
    from super_pursuit_table import claim_rows

    runs["all"] = {0: run(3.0), 1: run(1.0)}
    claims = {r["other"]: r for r in claim_rows(runs)}
    assert claims["all"]["seeds"] == [0, 1] and claims["all"]["area"][0] == [1.0, 4.0]
    assert claims["random"]["seeds"] == [] and claims["none-dqn"]["final"][0] == [1.0, 1.0]


def _eval_csv(path: Path, per_pursuer: list[float]) -> Path:
    """A metrics CSV with one greedy evaluation per row (returns per pursuer) and a training row between."""
    key = "eval/pursuer/episode_reward_mean"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["iteration", "frames", key])
        writer.writeheader()
        for i, value in enumerate(per_pursuer):
            writer.writerow({"iteration": 2 * i, "frames": 400 * (2 * i + 1), key: ""})
            writer.writerow({"iteration": 2 * i + 1, "frames": 400 * (2 * i + 2), key: value})
    return path


def test_super_compare_runs_bootstraps_each_side_on_its_own(tmp_path):
    # 12 evaluations: 0 for 9, then v for the last 3 (area v/4, last quarter v, final 3v/5), summed over 8 pursuers
    a = [_eval_csv(tmp_path / f"a{i}.csv", [0.0] * 9 + [v] * 3) for i, v in enumerate((2.0, 4.0))]
    b = [_eval_csv(tmp_path / f"b{i}.csv", [0.0] * 9 + [v] * 3) for i, v in enumerate((1.0, 3.0))]
    out = _run(str(BENCHMARKS / "super_compare_runs.py"), "--a", *map(str, a), "--b", *map(str, b),
               "--names", "compiled,eager")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in out.splitlines() if line.startswith("| ") and "measure" not in line}
    # last quarter: A's resampled mean is 16, 24 or 32, B's 8, 16 or 24 (each extreme 1 in 4, both 1 in 16),
    # so the difference's 2.5% and 97.5% points are 16 - 24 and 32 - 8; the area is a quarter of it, the final 3/5
    assert rows["last quarter"] == ["24.0", "16.0", "[-8.0, +24.0]"], out
    assert rows["area"] == ["6.0", "4.0", "[-2.0, +6.0]"], out
    assert rows["final"] == ["14.4", "9.6", "[-4.8, +14.4]"], out
    missing = tmp_path / "nope.csv"
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "super_compare_runs.py"), "--a", str(a[0]),
                              str(missing), "--b", *map(str, b)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip() == f"super_compare_runs: no such CSV: {missing}"


def test_super_pursuit_check_ranks_a_rerun_among_the_committed_seeds(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from super_pursuit_check import outcome_lines

    def write(name: str, seed: int, returns: list[float], n_pursuers: int = 8) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps({"arm": name.split("_s")[0], "seed": seed,
                                                           "n_pursuers": n_pursuers, "wall_s": 1.0}))
        lines = ["frames,eval/pursuer/episode_reward_mean", *(f"{400 * i},{r}" for i, r in enumerate(returns))]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")

    for seed, level in enumerate([1.0, 2.0, 3.0]):  # per pursuer: sums of 8, 16, 24
        write(f"quantile_s{seed}", seed, [level] * 6 + [100.0])  # longer runs: only the first evaluations count
    write("quantile-dqn_s0", 0, [50.0] * 7)  # another arm, left out
    rerun = [{"frames": str(400 * i), "eval/pursuer/episode_reward_mean": "2.5" if i % 2 else ""} for i in range(12)]
    lines = outcome_lines("quantile", 1, rerun, tmp_path)
    assert "rerun's 6 evaluations" in lines[0] and "the 3 committed quantile seeds" in lines[0], lines
    assert lines[1] == ("area under the curve: rerun 20.0; committed mean 16.0, range 8.0 to 24.0, seed 1 16.0; "
                        "2 of 3 committed seeds below the rerun"), lines
    assert lines[2].startswith("final return: rerun 20.0; committed mean 16.0"), lines


def test_eval_cost_times_one_evaluation():
    out = _run(str(BENCHMARKS / "eval_cost.py"), "--rounds", "1", "--repeats", "1", "--episodes", "2",
               "--frames", "1200")
    row = next(line for line in out.splitlines() if line.startswith("| this |"))
    assert float(row.split("|")[3]) > 0, out


def test_parallel_eval_times_both_settings_and_checks_their_results():
    tiny = ["env.num_envs=4", "collector.frames_per_batch=40", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3",
            "env.n_evaders=2", "replay.warmup_frames=0", "train.optimiser_steps=2", "logger.eval_every=2",
            "logger.eval_episodes=2"]
    out = _run(str(BENCHMARKS / "parallel_eval.py"), "--frames", "240", "--rounds", "1", "--threads", "1",
               "--set", *tiny)
    assert "every run logged the same values" in out and "| in-process |" in out and "| worker |" in out, out


def test_super_update_cost_times_both_checkouts(tmp_path):
    package = tmp_path / "pkg" / "marlkit"  # another checkout: here, links to this one's folders
    package.mkdir(parents=True)
    for part in ("envs", "modules", "losses", "pipelines"):
        (package / part).symlink_to(ROOT / part)
    tiny = ["--frames", "360", "--set", "env.num_envs=4", "collector.frames_per_batch=40", "env.x_size=7",
            "env.y_size=7", "env.n_pursuers=3", "env.n_evaders=2", "replay.warmup_frames=0", "train.optimiser_steps=2"]
    out = _run(str(BENCHMARKS / "super_update_cost.py"), "--modes", "quantile", "--rounds", "1",
               "--other", str(tmp_path / "pkg"), *tiny)
    assert "| quantile | this |" in out and "| quantile | other |" in out, out


def test_replay_cost_times_both_checkouts_on_the_same_draws(tmp_path):
    package = tmp_path / "pkg" / "marlkit"  # another checkout: here, links to this one's folders
    package.mkdir(parents=True)
    for part in ("envs", "modules", "losses", "pipelines"):
        (package / part).symlink_to(ROOT / part)
    out = _run(str(BENCHMARKS / "replay_cost.py"), "--rounds", "1", "--updates", "5", "--capacity", "100",
               "--other", str(tmp_path / "pkg"))
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| this |", "| other |"))]
    assert len(rows) == 2 and all(float(row[3]) > 0 for row in rows), out
    assert rows[0][4] == rows[1][4], out  # the same code draws the same slots


def test_scaling_prints_its_collection_table():
    out = _run(str(BENCHMARKS / "scaling.py"), "--parts", "collection", "--rounds", "1", "--seconds", "0.05",
               "--envs", "gym/CartPole-v1", "--policies", "iql", "--backends", "sync,mp2", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| gym/CartPole-v1 | iql | 8 |")]
    assert len(rows) == 1 and "x)" in rows[0], out  # mp2's ratio to sync


def test_scaling_times_its_sweep(tmp_path):
    tiny = [f"--sweep-override={item}" for item in ("env.num_envs=4", "collector.frames_per_batch=40",
                                                    "train.minibatch_size=20", "train.num_epochs=1", "model.num_cells=[8]")]
    out = _run(str(BENCHMARKS / "scaling.py"), "--parts", "sweep", "--rounds", "1", "--sweep-frames", "40", *tiny,
               "--out", str(tmp_path / "table.txt"))
    assert "| --no-ray (one after another) |" in out and (tmp_path / "table.txt").read_text().count("\n| ") >= 2


def test_gpu_benchmark_runs_its_code_on_cpu():
    out = _run(str(BENCHMARKS / "gpu.py"), "--device", "cpu", "--num-envs", "8", "--iterations", "1",
               "--matched-frames", "6000")
    assert "| navigation-matched | 6,000 |" in out and "| navigation, 8 envs | 800 |" in out, out
    assert "collection alone" in out


def test_compare_algorithms_runs_skips_finished_runs_and_tabulates(tmp_path):
    tiny = ["--task", "navigation-discrete", "--arms", "maa2c,coma", "--seeds", "2", "--frames", "80", "--jobs", "2",
            "--out", str(tmp_path), "--set", "env.num_envs=4", "env.max_steps=5", "collector.frames_per_batch=40",
            "model.num_cells=[8]"]
    out = _run(str(BENCHMARKS / "compare_algorithms.py"), *tiny)
    assert "4 runs to do" in out and (tmp_path / "coma_seed1.csv").exists(), out
    rows = [line for line in out.splitlines() if line.startswith(("| maa2c |", "| coma |"))]
    assert len(rows) == 2 and all("±" in row for row in rows), out
    assert "0 runs to do" in _run(str(BENCHMARKS / "compare_algorithms.py"), *tiny)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_matrix_games_prints_greedy_joint_actions(tmp_path):
    out = _run(str(BENCHMARKS / "matrix_games.py"), "--games", "nonmonotonic", "--algorithms", "qtran,coma",
               "--seeds", "1", "--frames", "1000", "--csv", str(tmp_path / "m.csv"))
    rows = [line for line in out.splitlines() if line.startswith(("| qtran |", "| coma |"))]
    assert len(rows) == 2 and all("optimal" in row and "(" in row for row in rows), out
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 3


def test_magent_battle_prints_both_tables(tmp_path):
    pytest.importorskip("magent2", reason='needs the [magent] extra (pip install -e ".[magent]")')
    out = _run(str(BENCHMARKS / "magent_battle.py"), "--seeds", "1", "--frames", "800", "--speed-frames", "800",
               "--out", str(tmp_path))
    assert "| none | 0 |" in out and "| quantile | 0 |" in out and "| multiprocess, 2 workers |" in out, out
    assert (tmp_path / "quantile_s0.csv").exists() and (tmp_path / "curves.png").stat().st_size > 0


FAKE_BENCHMARL = '''#!{python}
"""Writes the scalars BenchMARL's CSV logger writes, from the overrides it is given (no training)."""
import sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
assert sys.argv[1:3] == ["-m", "benchmarl.run"] and args["algorithm"] == "mappo", sys.argv
assert args["task.package_mass"] == "5" and args["experiment.clip_grad_norm"] == "true", args
scalars = Path(args["experiment.save_folder"]) / "exp" / "exp" / "scalars"
scalars.mkdir(parents=True)
batch, total = int(args["experiment.on_policy_collected_frames_per_batch"]), int(args["experiment.max_n_frames"])
steps = range(total // batch)
for name, value in (("counters_total_frames", lambda i: (i + 1) * batch), ("timers_total_time", lambda i: i + 1.0),
                    ("collection_reward_episode_reward_mean", lambda i: -1.0 + i)):
    (scalars / f"{{name}}.csv").write_text("".join(f"{{i}},{{value(i)}}\\n" for i in steps))
'''


def test_learning_vs_benchmarl_runs_skips_and_tabulates(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_BENCHMARL.format(python=sys.executable))
    fake.chmod(0o755)
    args = [str(BENCHMARKS / "learning_vs_benchmarl.py"), "--tasks", "balance", "--seeds", "1", "--frames", "12000",
            "--arms", "benchmarl,marlkit", "--benchmarl-python", str(fake), "--out", str(tmp_path / "out")]
    out = _run(*args)
    assert "2 runs to do" in out, out
    with (tmp_path / "out" / "mappo_balance" / "marlkit_seed0.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["frames"] for r in rows] == ["6000.0", "12000.0"] and all(r["return"] != "" for r in rows)
    benchmarl = (tmp_path / "out" / "mappo_balance" / "benchmarl_seed0.csv").read_text().split()
    assert benchmarl == ["frames,time_s,return", "6000.0,1.0,-1.0", "12000.0,2.0,0.0"]
    again = _run(*args)
    assert "0 runs to do" in again and "| benchmarl | 1 | 0.00 ± 0.00 | -0.50 ± 0.00 | 0.00 ± 0.00 |" in again, again
    assert (tmp_path / "out" / "mappo_balance" / "curves.png").stat().st_size > 0
    assert "marlkit − benchmarl, difference of the means over seeds" in again, again


def test_permutation_p_enumerates_small_samples_and_samples_large_ones(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from learning_vs_benchmarl import permutation_p

    assert permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)  # 2 of the 20 splits
    assert permutation_p([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == 1.0
    assert permutation_p([0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]) == 1.0
    far = permutation_p(list(range(10)), [x + 100.0 for x in range(10)])  # 184,756 splits: sampled
    assert 0 < far < 1e-3
    assert 0.3 < permutation_p(list(range(10)), [x + 1.0 for x in range(10)]) < 0.6


def test_graph_transfer_tabulates_more_agents_and_refusals(tmp_path):
    tiny = ["--seeds", "1", "--frames", "120", "--episodes", "2", "--out", str(tmp_path), "--set", "env.num_envs=4",
            "env.max_steps=5", "collector.frames_per_batch=120", "train.minibatch_size=60", "model.num_cells=[8]"]
    out = _run(str(BENCHMARKS / "graph_transfer.py"), "--arms", "mlp,mlp-separate", *tiny)
    shared = next(line for line in out.splitlines() if line.startswith("| mlp |"))
    separate = next(line for line in out.splitlines() if line.startswith("| mlp-separate |"))
    assert shared.count("±") == 3 and separate.count("cannot act") == 2, out
    assert "0 runs to do" in _run(str(BENCHMARKS / "graph_transfer.py"), "--arms", "mlp,mlp-separate", *tiny)


def test_ppo_versions_compares_two_pythons():
    out = _run(str(BENCHMARKS / "ppo_versions.py"), "--other-python", sys.executable, "--envs", "2", "--steps", "5")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| quantity")]
    assert len(rows) == 6 and all(row.endswith("| 0 |") for row in rows), out  # the same TorchRL: no difference


def test_ppo_versions_checks_marlkits_learner_against_plain_torchrl():
    out = _run(str(BENCHMARKS / "ppo_versions.py"), "--marlkit-task", "dispersion", "--envs", "2", "--steps", "5")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| quantity")]
    assert len(rows) == 6 and all(row.endswith("| 0 |") for row in rows), out


FAKE_TORCHRL_SCRIPT = '''"""Stands in for TorchRL's mappo_ippo.py: takes its Hydra overrides and iterates a Collector."""
import sys
from torchrl.collectors import Collector
from marlkit.envs import make_env
assert "collector.frames_per_batch=6000" in sys.argv and "train.minibatch_size=400" in sys.argv, sys.argv
env = make_env("vmas/navigation", num_envs=2, n_agents=2, max_steps=5)
for batch in Collector(env, None, frames_per_batch=20, total_frames=60):
    pass
'''


def test_compare_anchors_times_both_and_tabulates(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "mappo_ippo.py").write_text(FAKE_TORCHRL_SCRIPT)
    out = _run(str(BENCHMARKS / "compare_anchors.py"), "--algorithms", "mappo", "--systems",
               "marlkit,marlkit-bf16,torchrl", "--rounds", "1", "--threads", "1", "--frames", "6000",
               "--torchrl-scripts", str(scripts), "--torchrl-python", sys.executable, "--out", str(tmp_path / "out"))
    with (tmp_path / "out" / "runs.csv").open() as handle:
        runs = {r["system"]: r for r in csv.DictReader(handle)}
    assert runs["marlkit"]["frames"] == "6000" and runs["torchrl"]["frames"] == "60", runs  # the hook counted them
    assert runs["marlkit-bf16"]["frames"] == "6000", runs
    assert all(float(r["loop_s"]) > 0 and r["final_return"] != "nan" for r in runs.values()), runs
    assert "| mappo | 1 | torchrl | 1 |" in out and "| mappo | 1 | marlkit | 1 |" in out, out
    ratios = next(line for line in out.splitlines() if line.startswith("| mappo | 1 | torchrl |")).split("|")[6:8]
    assert all(float(r) > 0 for r in ratios), out  # both marlkit systems against TorchRL's script
    again = _run(str(BENCHMARKS / "compare_anchors.py"), "--table-only", "--out", str(tmp_path / "out"))
    row = next(line for line in out.splitlines() if line.startswith("| mappo | 1 | torchrl |"))
    assert row in again.splitlines(), again  # the table comes from runs.csv alone
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "compare_anchors.py"), "--systems", "rllib",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown system ['rllib']; accepted: marlkit, marlkit-bf16, torchrl, benchmarl" in bad.stderr


def test_busy_machine_prints_its_table():
    out = _run(str(BENCHMARKS / "busy_machine.py"), "--frames", "6000", "--fixed", "1", "--loads", "idle")
    assert "| default | idle |" in out and "| 1 | idle | 1 |" in out and "1.00x" in out, out


def test_profile_mappo_prints_its_phases():
    out = _run(str(BENCHMARKS / "profile_mappo.py"), "--iterations", "1", "--threads", "1", "--matmul-precision",
               "medium")
    assert "matmul_precision=medium" in out, out
    for phase in ("collection", "GAE", "loss forward", "backward", "optimiser step", "end_iteration"):
        assert f"| {phase}" in out, out
    assert "bare MLPs of the same sizes" in out, out


def test_loss_cost_times_torchrl_and_marlkit_forwards():
    out = _run(str(BENCHMARKS / "loss_cost.py"), "--cases", "iql-pursuit,qmix-128,mappo-matched", "--rounds", "1",
               "--steps", "2")
    cases = ("iql-pursuit", "qmix-128", "mappo-matched")
    rows = [line.split("|") for line in out.splitlines() if line.startswith(tuple(f"| {c} |" for c in cases))]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [(c, arm) for c in cases for arm in ("TorchRL", "marlkit")], out
    assert all(float(r[4]) > 0 for r in rows), out


def test_update_floor_times_eager_and_compiled_updates():
    out = _run(str(BENCHMARKS / "update_floor.py"), "--rounds", "1", "--updates", "5")
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| eager |", "| compiled |"))]
    assert [r[1].strip() for r in rows] == ["eager", "compiled"] and all(float(r[3]) > 0 for r in rows), out


def test_update_floor_with_replay_prints_the_parts_of_an_update():
    out = _run(str(BENCHMARKS / "update_floor.py"), "--rounds", "1", "--updates", "5", "--no-compile", "--replay",
               "--capacity", "256", "--obs-bytes")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| eager |")]
    assert "with draw, gather and re-prioritisation, observations stored as uint8" in out and len(rows) == 1, out
    assert all(float(value) > 0 for value in rows[0][3:7]), out


def test_update_floor_times_the_whole_step_compiled():
    out = _run(str(BENCHMARKS / "update_floor.py"), "--rounds", "1", "--updates", "5", "--whole-step")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r[1].strip() for r in rows] == ["eager", "compiled", "compiled step"], out
    assert all(float(r[3]) > 0 for r in rows), out


@pytest.mark.parametrize("max_grad_norm", [40.0, 1e-3])  # the clip idle, and acting on every step
def test_update_floor_functional_step_is_the_eager_step(monkeypatch, max_grad_norm):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import update_floor
    from update_floor import (ACTIONS, ADAM, AGENTS, BATCH, OBS, fresh_state, functional_step, initial_params,
                              td_loss)

    monkeypatch.setattr(update_floor, "MAX_GRAD_NORM", max_grad_norm)
    g = torch.Generator().manual_seed(0)
    start = initial_params(g)
    target = [p + 0.01 * torch.randn(p.shape, generator=g) for p in start]
    batches = [(torch.rand(AGENTS, BATCH, OBS, generator=g), torch.rand(AGENTS, BATCH, OBS, generator=g),
                torch.randint(0, ACTIONS, (AGENTS, BATCH), generator=g), torch.randn(AGENTS, BATCH, generator=g),
                torch.rand(AGENTS, BATCH, generator=g) < 0.1, torch.rand(AGENTS, BATCH, generator=g)) for _ in range(3)]
    params = [p.clone().requires_grad_() for p in start]
    adam = torch.optim.Adam(params, **ADAM)
    state = fresh_state(start)
    for batch in batches:
        loss, squared = td_loss(params, target, *batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        adam.step()
        adam.zero_grad()
        *state, functional_squared = functional_step(*state, target, *batch)
        torch.testing.assert_close(functional_squared, squared.detach())
    assert not any(torch.equal(mine, first) for mine, first in zip(state[0], start, strict=True))
    for mine, theirs in zip(state[0], params, strict=True):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("obs_bytes", [False, True])
def test_update_floor_replay_gathers_each_agents_slots_and_reprioritises_them(monkeypatch, obs_bytes):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from update_floor import AGENTS, BATCH, OBS, Replay

    replay = Replay(256, torch.Generator().manual_seed(0), obs_bytes=obs_bytes)
    index, (obs, next_obs, action, reward, terminated, weight) = replay.draw()
    assert obs.dtype == next_obs.dtype == torch.float32
    assert index.shape == (AGENTS, BATCH) and obs.shape == next_obs.shape == (AGENTS, BATCH, OBS)
    assert weight.shape == (AGENTS, BATCH) and bool((weight > 0).all() and (weight <= 1).all())
    for i in range(AGENTS):  # agent i's minibatch comes from agent i's own buffer, at its own slots
        assert torch.equal(obs[i], replay.obs[i][index[i]].float())
        assert torch.equal(next_obs[i], replay.next_obs[i][index[i]].float())
        assert torch.equal(action[i], replay.action[i][index[i]]) and torch.equal(reward[i], replay.reward[i][index[i]])
    assert not terminated.any()
    squared = torch.rand(AGENTS, BATCH, generator=torch.Generator().manual_seed(1))
    replay.reprioritise(index, squared)
    given: dict[tuple[int, int], list[float]] = {}
    for i in range(AGENTS):
        for k, slot in enumerate(index[i].tolist()):
            given.setdefault((i, slot), []).append(squared[i, k].item() ** 0.5 + 1e-6)
    for (i, slot), values in given.items():  # a slot drawn twice keeps one of its two errors
        assert any(replay.table.raw[i, slot].item() == pytest.approx(v) for v in values), (i, slot, values)


def test_super_td_stats_records_each_update_and_the_norm_the_clip_sees(monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    from super_td_stats import train_and_record

    clipped: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        norm = clip(params, max_norm, *args, **kwargs)
        clipped.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    td, norms, max_norm = train_and_record(1600, {"env.num_envs": 4, "replay.memmap": False})
    assert max_norm == 40.0 and len(td) == len(norms) == len(clipped) == 200  # two batches of 400 frames train
    assert all(t.shape == (8 * 32,) for t in td) and all(n.shape == (8,) for n in norms)
    # each pursuer's own-loss norm is n_agents times its part of the batched gradient, whose norm the clip sees
    joint = torch.stack(norms).pow(2).sum(1).sqrt() / 8
    assert torch.allclose(joint, torch.tensor(clipped), rtol=1e-4), (joint[:3], clipped[:3])


def test_super_td_stats_prints_its_table():
    out = _run(str(BENCHMARKS / "super_td_stats.py"), "--frames", "1600", "--stretches", "2",
               "--set", "env.num_envs=4", "replay.memmap=false")
    rows = [line for line in out.splitlines() if line.startswith("| 0-") or line.startswith("| 100-")]
    assert len(rows) == 2 and "200 updates" in out, out


def test_compiled_lockstep_finds_the_compiled_step_equal_to_the_eager_one(tmp_path):
    """The eager step made from each checked state agrees with the compiled one to rounding, and the run
    itself is a plain compiled run (its CSV is kept); a bad --arm, a malformed override and a config the
    pipeline refuses each get one line, before training."""
    tiny = ["env.num_envs=4", "collector.frames_per_batch=40", "env.x_size=7", "env.y_size=7", "env.n_pursuers=3",
            "env.n_evaders=2", "replay.warmup_frames=0", "train.optimiser_steps=2", "logger.eval_every=2",
            "logger.eval_episodes=2"]
    out = _run(str(BENCHMARKS / "compiled_lockstep.py"), "--frames", "160", "--every", "2", "--out", str(tmp_path),
               *tiny)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("4 steps checked; worst:") and summary.endswith("random numbers equal in 4"), out
    worst = dict(part.rsplit(" ", 1) for part in summary.split("worst: ")[1].split("; ")[0].split(", "))
    assert all(float(worst[c]) < 1e-4 for c in ("loss", "Adam m", "Adam v", "priorities")), worst
    assert all(float(worst[c]) < 1e-3 for c in ("param change", "eager vs float64", "compiled vs float64")), worst
    with (tmp_path / "lockstep_quantile_s3.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "compiled_lockstep.py"), "--arm", "best"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--arm 'best': choose one of none, quantile" in bad.stderr, bad.stderr
    for wrong, message in [("env.x_size", "write each as section.field=value"), ("replay.batch_size=0", "batch_size")]:
        out = subprocess.run([sys.executable, str(BENCHMARKS / "compiled_lockstep.py"), wrong],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
