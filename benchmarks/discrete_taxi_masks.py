"""ppo_discrete.py on Taxi-v4 with and without the env's action mask (--no-action-masks), 3 seeds, one run at a time.

    python benchmarks/discrete_taxi_masks.py            # writes results/discrete_taxi_masks.{json,md,png}

Per run: the mean return of the last 10 training episodes, the greedy evaluation's mean over 10 episodes, and
the learning curve (the 10-episode moving average, every 20th point) for the plot (with matplotlib installed)."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--env-id", "Taxi-v4", "--learning-rate", "1e-3", "--total-timesteps", "200000", "--num-threads", "1", "--device", "cpu"]
SEEDS = (1, 2, 3)


def run(seed: int, masks: bool) -> dict:
    with tempfile.TemporaryDirectory() as runs_dir:
        flags = [*FLAGS, "--seed", str(seed), "--runs-dir", runs_dir] + ([] if masks else ["--no-action-masks"])
        start = time.time()
        subprocess.run([sys.executable, str(ROOT / "ppo_discrete.py"), *flags], check=True, capture_output=True)
        (metrics,) = Path(runs_dir).glob("*/metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    episodes = [(r["global_step"], r["charts/episodic_return"]) for r in records if "charts/episodic_return" in r]
    steps, returns = np.array(episodes).T
    (evaluation,) = [r["eval/episodic_return"] for r in records if "eval/episodic_return" in r]
    smooth = np.convolve(returns, np.ones(10) / 10, mode="valid")
    curve = [[int(s), round(float(r), 2)] for s, r in zip(steps[9:][::20], smooth[::20])]
    return {"seed": seed, "masks": masks, "last10": float(np.mean(returns[-10:])), "eval": evaluation,
            "seconds": round(time.time() - start, 1), "curve": curve}  # fmt: skip


def plot(runs: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(matplotlib is not installed: no plot)")
    for r in runs:
        steps, returns = np.array(r["curve"]).T
        plt.plot(steps, returns, color="C0" if r["masks"] else "C3", label=("mask on" if r["masks"] else "--no-action-masks") if r["seed"] == 1 else None)
    plt.xlabel("global step")
    plt.ylabel("episodic return (10-episode mean)")
    plt.title("Taxi-v4, seeds 1-3")
    plt.legend()
    plt.savefig(path, dpi=100)


def main() -> None:
    started = stamp(__file__)
    runs = [run(seed, masks) for masks in (True, False) for seed in SEEDS]
    command = "python ppo_discrete.py " + " ".join(FLAGS) + " --seed S [--no-action-masks]"
    out = ROOT / "benchmarks" / "results" / "discrete_taxi_masks"
    out.with_suffix(".json").write_text(json.dumps({"stamp": started, "command": command, "runs": runs}, indent=2) + "\n")
    lines = [f"`{command}`, seeds {', '.join(map(str, SEEDS))}", "",
             "| action mask | last 10 training episodes (mean +- sample std over seeds, ddof 1) | greedy evaluation, 10 episodes (mean +- sample std over seeds) |", "|---|---|---|"]  # fmt: skip
    for masks in (True, False):
        mine = [r for r in runs if r["masks"] == masks]
        last, ev = [r["last10"] for r in mine], [r["eval"] for r in mine]
        lines.append(f"| {'on (default)' if masks else 'off (--no-action-masks)'} | {np.mean(last):.1f} +- {np.std(last, ddof=1):.1f} | {np.mean(ev):.1f} +- {np.std(ev, ddof=1):.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(runs, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
