"""ppo_discrete.py on Taxi-v4 with and without the env's action mask (--no-action-masks), 3 seeds, one run at a time.

    python benchmarks/discrete_taxi_masks.py            # writes results/discrete_taxi_masks.{json,md}

Per run: the mean return of the last 10 training episodes and the greedy evaluation's mean over 10 episodes."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    returns = [r["charts/episodic_return"] for r in records if "charts/episodic_return" in r]
    (evaluation,) = [r["eval/episodic_return"] for r in records if "eval/episodic_return" in r]
    return {"seed": seed, "masks": masks, "last10": float(np.mean(returns[-10:])), "eval": evaluation, "seconds": round(time.time() - start, 1)}


def main() -> None:
    runs = [run(seed, masks) for masks in (True, False) for seed in SEEDS]
    command = "python ppo_discrete.py " + " ".join(FLAGS) + " --seed S [--no-action-masks]"
    out = ROOT / "benchmarks" / "results" / "discrete_taxi_masks"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=2) + "\n")
    lines = [f"`{command}`, seeds {', '.join(map(str, SEEDS))}", "",
             "| action mask | last 10 training episodes (mean +- std over seeds) | greedy evaluation, 10 episodes (mean +- std) |", "|---|---|---|"]  # fmt: skip
    for masks in (True, False):
        mine = [r for r in runs if r["masks"] == masks]
        last, ev = [r["last10"] for r in mine], [r["eval"] for r in mine]
        lines.append(f"| {'on (default)' if masks else 'off (--no-action-masks)'} | {np.mean(last):.1f} +- {np.std(last):.1f} | {np.mean(ev):.1f} +- {np.std(ev):.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
