"""The SUPER pursuit table and plot, from the raw CSVs ``benchmarks/super_pursuit.py`` wrote (nothing re-run).

Per arm: the greedy evaluation return summed over the 8 pursuers (every 4,000 env steps, 20 episodes,
as the paper's code measures it), its mean over seeds with a 95% band (a PNG), the area under that
curve (mean over evaluations), the final return (mean of the last 5 evaluations), the paired bootstrap
95% interval of (arm - baseline) over the seeds both have (the baseline: ``none``, and ``none-dqn`` for the
plain-DQN arms, the paper's robustness check), and wall time per run; then the paper's other claims as paired
differences of two arms (``quantile`` against ``all`` and ``random``, ``quantile-dqn`` against ``none-dqn``).

    python benchmarks/super_pursuit_table.py [--out benchmarks/results/super_pursuit_huber_tanh] [--png FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from super_pursuit import ARMS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "super_pursuit_huber_tanh"
EVAL = "eval/pursuer/episode_reward_mean"


def load(out: Path) -> dict[str, dict[int, dict]]:
    """arm -> seed -> {"frames": [...], "returns": [...] (summed over pursuers), "wall_s": ...}."""
    runs: dict[str, dict[int, dict]] = {}
    for file in sorted(out.glob("*_s*.csv")):
        meta = json.loads(file.with_suffix(".json").read_text())
        with file.open(newline="") as handle:
            frames, returns = evaluations(list(csv.DictReader(handle)), meta.get("n_pursuers", 8))
        runs.setdefault(meta["arm"], {})[meta["seed"]] = {"frames": frames, "returns": returns, "wall_s": meta["wall_s"]}
    return runs


def evaluations(rows: list[dict[str, str]], n_pursuers: int) -> tuple[list[int], list[float]]:
    """The frames and greedy returns (summed over the ``n_pursuers``) of a run's rows that evaluated."""
    rows = [r for r in rows if r.get(EVAL, "") != ""]
    return [int(r["frames"]) for r in rows], [float(r[EVAL]) * n_pursuers for r in rows]


def _ci(values: np.ndarray) -> float:
    return 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def paired_bootstrap(diffs: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``diffs`` (one per seed), resampling seeds.

    Each call draws from its own generator, so the same differences give the same interval wherever they
    appear (the arms table and the claims table)."""
    if len(diffs) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(len(diffs), size=(n, len(diffs)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def area_of(returns: list[float]) -> float:
    """Area under the curve: the mean greedy return over the run's evaluations."""
    return float(np.mean(returns))


def final_of(returns: list[float]) -> float:
    """Final return: the mean of the last 5 evaluations."""
    return float(np.mean(returns[-5:]))


def baseline(arm: str) -> str:
    """The no-sharing arm ``arm`` is compared with: the one with the same DQN variant."""
    return "none-dqn" if arm.endswith("-dqn") else "none"


def summarise(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per arm, in the benchmark's arm order: seeds, AUC, final return (each also per seed, by
    seed), paired bootstrap against its baseline, wall time."""
    rows = []
    stats = {arm: {seed: (area_of(r["returns"]), final_of(r["returns"])) for seed, r in sorted(seeds.items())
                   if r["returns"]} for arm, seeds in runs.items()}
    order = list(ARMS)
    for arm in sorted(runs, key=lambda a: (order.index(a) if a in order else len(order), a)):
        seeds = dict(sorted(runs[arm].items()))
        auc = np.array([stats[arm][s][0] for s in stats[arm]])
        final = np.array([stats[arm][s][1] for s in stats[arm]])
        base = baseline(arm)
        paired = sorted(set(stats[arm]) & set(stats.get(base, {})))
        diff = np.array([stats[arm][s][0] - stats[base][s][0] for s in paired])
        rows.append({"arm": arm, "seeds": len(auc), "auc": auc.mean() if len(auc) else float("nan"),
                     "auc_ci": _ci(auc), "final": final.mean() if len(final) else float("nan"),
                     "final_ci": _ci(final), "baseline": base,
                     "vs_baseline": paired_bootstrap(diff) if arm != base else None,
                     "paired": len(paired), "wall_min": np.mean([r["wall_s"] for r in seeds.values()]) / 60,
                     "auc_seeds": dict(zip(stats[arm], auc.tolist())),
                     "final_seeds": dict(zip(stats[arm], final.tolist())),
                     "wall_min_seeds": {seed: r["wall_s"] / 60 for seed, r in seeds.items()}})
    return rows


def _per_seed(values: dict[int, float]) -> str:
    return ", ".join(f"s{seed} {value:.1f}" for seed, value in values.items())


def _pm(mean: float, ci: float, per_seed: dict[int, float] | None = None) -> str:
    text = f"{mean:.1f}" if math.isnan(ci) else f"{mean:.1f} ± {ci:.1f}"
    return text + (f" ({_per_seed(per_seed)})" if per_seed and len(per_seed) > 1 else "")


def plot(runs: dict[str, dict[int, dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, seeds in runs.items():
        length = min(len(r["returns"]) for r in seeds.values())
        if length == 0:
            continue
        curves = np.array([r["returns"][:length] for r in seeds.values()])
        frames = np.array(next(iter(seeds.values()))["frames"][:length])
        mean = curves.mean(0)
        band = 1.96 * curves.std(0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
        ax.plot(frames, mean, label=f"{arm} ({len(curves)} seed{'' if len(curves) == 1 else 's'})")
        ax.fill_between(frames, mean - band, mean + band, alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("greedy return, summed over pursuers")
    ax.set_title("SUPER on pursuit (mean, 95% band over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# The paper's other claims, each a paired comparison of two arms: (claim, arm, against).
CLAIMS = (
    ("few chosen transitions beat sharing all", "quantile", "all"),
    ("the choice of transitions, not the extra data, helps", "quantile", "random"),
    ("robust across DQN variants (plain DQN)", "quantile-dqn", "none-dqn"),
)


def claim_rows(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """Per claim: the seeds both arms have, and per measure (area, final) each seed's difference and the
    paired bootstrap 95% interval of their mean."""
    rows = []
    for claim, arm, other in CLAIMS:
        seeds = sorted(set(runs.get(arm, {})) & set(runs.get(other, {})))
        row = {"claim": claim, "arm": arm, "other": other, "seeds": seeds}
        for measure, reduce in (("area", area_of), ("final", final_of)):
            diffs = np.array([reduce(runs[arm][s]["returns"]) - reduce(runs[other][s]["returns"]) for s in seeds])
            row[measure] = (diffs.tolist(), paired_bootstrap(diffs))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    runs = load(args.out)
    if not runs:
        parser.error(f"no finished runs (<arm>_s<seed>.csv) in {args.out}")
    print("| arm | seeds | area under curve (per seed) | final return (per seed) | AUC - baseline (paired bootstrap 95%) "
          "| wall min/run (per seed) |")
    print("|---|---|---|---|---|---|")
    for r in summarise(runs):
        if r["vs_baseline"] is None:
            vs = "— (baseline)"
        elif r["paired"] < 2:
            vs = f"n/a ({r['paired']} seed paired with {r['baseline']})"
        else:
            vs = f"[{r['vs_baseline'][0]:+.1f}, {r['vs_baseline'][1]:+.1f}] vs {r['baseline']} ({r['paired']} seeds)"
        print(f"| {r['arm']} | {r['seeds']} | {_pm(r['auc'], r['auc_ci'], r['auc_seeds'])} "
              f"| {_pm(r['final'], r['final_ci'], r['final_seeds'])} | {vs} "
              f"| {r['wall_min']:.1f} ({_per_seed(r['wall_min_seeds'])}) |")
    print("\n| claim | arm - other | seeds | area difference per seed | 95% | final difference per seed | 95% |")
    print("|---|---|---|---|---|---|---|")
    for r in claim_rows(runs):
        cells = []
        for measure in ("area", "final"):
            diffs, (low, high) = r[measure]
            cells += [", ".join(f"{d:+.1f}" for d in diffs) or "—",
                      f"[{low:+.1f}, {high:+.1f}]" if len(diffs) > 1 else "n/a"]
        print(f"| {r['claim']} | {r['arm']} - {r['other']} | {len(r['seeds'])} | {' | '.join(cells)} |")
    png = args.png or args.out / "curves.png"
    plot(runs, png)
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
