"""ppo_rlhf.py's two baselines on its built-in task: `--baseline gae` (a value model, GAE over tokens; the default)
against `--baseline group` (no value model: RLOO over k responses per prompt), same flags otherwise.

Runs `python ppo_rlhf.py --seed S [--baseline group --group-size K]` for every setting and seed (one at a time,
--num-threads 1), then writes to --out:
  baselines.json   a stamp (git describe --always --dirty, date, CPU model, load average at start, command) and one
                   record per run: final gold score on the held-out prompts, KL, episodes/s, whole-run seconds
  baselines.md     the table: mean +- std over seeds

    /work/bin/slot python benchmarks/rlhf_baselines.py --seeds 1 2 3 --group-sizes 2 4
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ppo_rlhf.py")


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """PPO seeds (the task itself stays fixed: --task-seed 0)"""
    group_sizes: list[int] = field(default_factory=lambda: [2, 4])
    """--group-size values of the group runs"""
    total_episodes: int = 9600
    """episodes per run (the script's default)"""
    out: str = "benchmarks/results/rlhf"
    """output directory"""
    python: str = sys.executable
    """the Python that runs ppo_rlhf.py"""


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())


def main(args: Args) -> None:
    stamp = dict(
        git=subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), cpu=cpu_model(),
        cpus=os.cpu_count(), load_average_at_start=os.getloadavg(), command=" ".join([os.path.basename(sys.executable), *sys.argv]),
    )  # fmt: skip
    settings = [("gae", [])] + [(f"group k={k}", ["--baseline", "group", "--group-size", str(k)]) for k in args.group_sizes]
    records = []
    for seed in args.seeds:  # the settings alternate, so that a change in the machine's load hits each alike
        for name, flags in settings:
            runs_dir = os.path.join(args.out, "runs", f"baseline_{name.replace(' ', '_')}_seed{seed}")
            shutil.rmtree(runs_dir, ignore_errors=True)
            cmd = [
                args.python, SCRIPT, *flags, "--seed", str(seed), "--total-episodes", str(args.total_episodes),
                "--runs-dir", runs_dir, "--cache-dir", os.path.join(args.out, "cache"), "--num-threads", "1",
            ]  # fmt: skip
            start = time.time()
            subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - start
            (run,) = os.listdir(runs_dir)
            with open(os.path.join(runs_dir, run, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f]
            train = [m for m in metrics if "objective/kl" in m]
            evals = [m for m in metrics if "objective/gold_score" in m]
            records.append(dict(
                setting=name, seed=seed, wall_s=wall, gold=evals[-1]["objective/gold_score"], sft_gold=evals[0]["objective/gold_score"],
                kl=float(np.mean([m["objective/kl"] for m in train[-5:]])), eps=train[-1]["eps"],
                curve=[(m["episode"], m["objective/gold_score"]) for m in evals],
            ))  # fmt: skip
            r = records[-1]
            print(f"{name} seed {seed}: gold {r['gold']:.3f} (SFT {r['sft_gold']:.3f}) KL {r['kl']:.2f} eps {r['eps']:.1f} in {wall:.0f}s", flush=True)
    with open(os.path.join(args.out, "baselines.json"), "w") as f:
        json.dump(dict(stamp=stamp, settings=vars(args) | {"python": os.path.basename(args.python)}, runs=records), f, indent=1)

    def cell(rs, key, digits):
        values = [r[key] for r in rs]
        return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1) if len(values) > 1 else 0.0:.{digits}f}"

    lines = ["| baseline | final gold score | KL (nats, last 5 updates) | episodes/s | whole run (s) |", "|---|---|---|---|---|"]
    for name, _ in settings:
        rs = [r for r in records if r["setting"] == name]
        lines.append(f"| {name} | {cell(rs, 'gold', 3)} | {cell(rs, 'kl', 2)} | {cell(rs, 'eps', 1)} | {cell(rs, 'wall_s', 0)} |")
    lines.append(
        f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.total_episodes} episodes each, mean +- sample std "
        f"over seeds; SFT gold score {np.mean([r['sft_gold'] for r in records]):.3f}. {stamp['git']}, {stamp['date']}, {stamp['cpu']} "
        f"({stamp['cpus']} cores), load average at start {', '.join(f'{x:.1f}' for x in stamp['load_average_at_start'])}; `{stamp['command']}`."
    )
    with open(os.path.join(args.out, "baselines.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
