"""Learning curves in one style, one figure per task (and one per ablation), from the raw files of benchmarks/results/ (no training):

    .venv-bench/bin/python benchmarks/curves.py        # writes benchmarks/results/curves/{task}.png

Each configuration (ours with a preset, or the peer) is one colour: the line is the mean over seeds of each seed's
moving-average return (10 episodes for MuJoCo, 20 for classic control: the measure the tables use), the band the
range from the lowest to the highest seed, both on a common grid of steps and drawn only where every seed has data.
The legend gives each configuration's seed count and final return (mean ± sample std over seeds, as the tables).
"""

import json
import statistics
from pathlib import Path

import numpy as np

from continuous_returns import episodes, pyplot, smoothed

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "curves"
SEEDS = (1, 2, 3)
OURS, OURS_TOO, PEER = "tab:blue", "tab:green", "tab:orange"

# task -> [(label in the legend, results/continuous/ label, colour)]
MUJOCO = {
    "HalfCheetah-v5": [("ours, cleanrl preset", "cleanrl", OURS), ("ours, zoo-halfcheetah", "zoo-halfcheetah", OURS_TOO), ("SB3 2.9.2, zoo settings", "sb3-zoo", PEER)],
    "Hopper-v5": [("ours, cleanrl preset", "cleanrl", OURS), ("ours, zoo-hopper", "zoo-hopper", OURS_TOO), ("SB3 2.9.2, zoo settings", "sb3-zoo", PEER)],
    "Walker2d-v5": [("ours, cleanrl preset", "cleanrl", OURS), ("ours, zoo-walker2d", "zoo-walker2d", OURS_TOO), ("SB3 2.9.2, zoo settings", "sb3-zoo", PEER)],
    "Ant-v5": [("ours, cleanrl preset", "cleanrl", OURS), ("ours, zoo-ant", "zoo-ant", OURS_TOO), ("SB3 2.9.2, zoo settings", "sb3-zoo", PEER)],
    "InvertedPendulum-v5": [("ours, cleanrl preset", "cleanrl", OURS)],
}  # fmt: skip
# the truncation ablation: (task, file suffix) -> configurations, both runs of 2026-11-25's script
ABLATIONS = {
    (env_id, "truncation"): [("ours, bootstrapping from V(final obs)", "cleanrl-2026-11-25", OURS), ("ours, truncation as termination", "no-bootstrap", PEER)]
    for env_id in ("HalfCheetah-v5", "Hopper-v5")
}  # fmt: skip


def band(curves: list, total: int) -> tuple:
    """Grid, mean and min/max over seeds of curves [(steps, values)], where every seed has a value."""
    grid = np.linspace(0, total, 201)
    ys = np.array([np.interp(grid, s, v, left=np.nan, right=np.nan) for s, v in curves])
    keep = ~np.isnan(ys).any(0)
    return grid[keep], ys[:, keep].mean(0), ys[:, keep].min(0), ys[:, keep].max(0)


def draw(plt, title: str, series: list, total: int, ylabel: str, path: Path) -> None:
    """series: [(label, colour, [(steps, values) per seed], [final return per seed])]."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, colour, curves, finals in series:
        if not curves:
            continue
        x, mean, low, high = band(curves, total)
        final = f"{statistics.mean(finals):.0f} ± {statistics.stdev(finals):.0f}" if len(finals) > 1 else f"{finals[0]:.0f}"
        ax.plot(x, mean, color=colour, lw=1.8, label=f"{label}: {final} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.fill_between(x, low, high, color=colour, alpha=0.2, lw=0)
    ax.set_title(f"{title}\nline: mean of seeds; band: lowest to highest seed", fontsize=10)
    ax.set(xlabel="environment steps", ylabel=ylabel, xlim=(0, total))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x else "0"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path.relative_to(ROOT)}")


def mujoco(plt) -> None:
    for (env_id, suffix), configs in [((env_id, ""), configs) for env_id, configs in MUJOCO.items()] + list(ABLATIONS.items()):
        series = []
        for label, run_label, colour in configs:
            runs = [episodes(RESULTS / "continuous" / run_label / env_id / f"seed{s}") for s in SEEDS]
            finished = [run for s, run in zip(SEEDS, runs) if list((RESULTS / "continuous" / run_label / env_id / f"seed{s}").glob("*/metrics.jsonl.gz"))]
            series.append((label, colour, [smoothed(run) for run in finished], [statistics.mean(r for _, r in run[-10:]) for run in finished]))
        draw(plt, f"{env_id}, 1M steps", series, 1_000_000,
             "episodic return (10-episode moving mean)", OUT / f"{env_id}{suffix and '_' + suffix}.png")  # fmt: skip


def classic(plt) -> None:
    data = json.loads((RESULTS / "discrete_classic.json").read_text())
    for env_id, result in data["envs"].items():
        series = [(label, colour, [tuple(run["curve"]) for run in result[who]], [run["final_return"] for run in result[who]])
                  for label, who, colour in (("ours, ppo_discrete.py", "ours", OURS), ("SB3 2.9.2 PPO", "sb3", PEER))]  # fmt: skip
        draw(plt, f"{env_id}, CleanRL's defaults", series, data["total_timesteps"],
             "episodic return (20-episode moving mean)", OUT / f"{env_id}.png")  # fmt: skip


def taxi(plt) -> None:
    runs = json.loads((RESULTS / "discrete_taxi_masks.json").read_text())["runs"]
    series = [(label, colour, [tuple(np.array(r["curve"]).T) for r in runs if r["masks"] == masks], [r["last10"] for r in runs if r["masks"] == masks])
              for label, masks, colour in (("ours, action mask on (default)", True, OURS), ("ours, --no-action-masks", False, PEER))]  # fmt: skip
    draw(plt, "Taxi-v4, lr 1e-3", series, 200_000, "episodic return (10-episode moving mean)", OUT / "Taxi-v4.png")


def main() -> None:
    plt = pyplot()
    if plt is None:
        raise SystemExit("error: curves.py needs matplotlib (the benchmark environment: benchmarks/requirements.txt)")
    OUT.mkdir(exist_ok=True)
    mujoco(plt)
    classic(plt)
    taxi(plt)


if __name__ == "__main__":
    main()
