"""Benchmark of ppo_rlhf.py on its built-in task: seeds x KL coefficients.

Runs `python ppo_rlhf.py --kl-coef K --seed S` for every pair (one at a time), sharing one cached
SFT/reward model, then writes to --out:
  results.json   one record per run: final gold score, proxy (reward-model) score and KL, the SFT
                 baseline, wall time of the PPO stage; plus the built-in task's own stage times
  results.md     the same as a table (means and standard deviations over seeds)
  curves.png, overoptimisation.png   (only if matplotlib is installed) proxy score, gold score
                 and KL against episodes; gold and proxy score against KL across kl_coef values

    python benchmarks/rlhf_sweep.py --seeds 1 2 3 --kl-coefs 0 0.02 0.05 0.2 --total-episodes 4800
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

from stamp import stamp

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ppo_rlhf.py")


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """PPO seeds (the task itself stays fixed: --task-seed 0)"""
    kl_coefs: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.2])
    """KL coefficients to compare"""
    total_episodes: int = 9600
    """episodes per run"""
    out: str = "benchmarks/results/rlhf"
    """output directory (runs, cache and results)"""
    threads: int = 1
    """OMP/torch threads per run (tiny models run fastest on one)"""



def compact_json(obj) -> str:
    """JSON indented for reading, with every list of numbers (the learning curves) on one line."""
    text = json.dumps(obj, indent=1)
    for _ in range(2):  # lists of numbers, then lists of such lists
        text = re.sub(r"\[(?:\s*(?:[-+0-9.eE]+|\[[^\[\]]*\]|null)\s*,?)*\s*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    return text + "\n"

def main(args: Args) -> None:
    os.makedirs(args.out, exist_ok=True)
    started = stamp(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    records = []
    for kl_coef in args.kl_coefs:
        for seed in args.seeds:
            runs_dir = os.path.join(args.out, "runs", f"kl{kl_coef}_seed{seed}")
            shutil.rmtree(runs_dir, ignore_errors=True)  # a run of an earlier sweep
            cmd = [
                sys.executable, SCRIPT, "--seed", str(seed), "--kl-coef", str(kl_coef),
                "--total-episodes", str(args.total_episodes), "--runs-dir", runs_dir,
                "--cache-dir", os.path.join(args.out, "cache"),
            ]  # fmt: skip
            start = time.time()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - start
            (run,) = [d for d in os.listdir(runs_dir) if d != "builtin_task"]
            with open(os.path.join(runs_dir, run, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f]
            train = [m for m in metrics if "objective/kl" in m]
            evals = [m for m in metrics if "objective/gold_score" in m]
            records.append(
                dict(
                    kl_coef=kl_coef, seed=seed, wall_s=wall,
                    sft_gold=evals[0]["objective/gold_score"], sft_proxy=evals[0]["eval/scores"],
                    gold=evals[-1]["objective/gold_score"], proxy=evals[-1]["eval/scores"],
                    kl=float(np.mean([m["objective/kl"] for m in train[-5:]])),
                    eps=train[-1]["eps"], curve=[(m["episode"], m["objective/gold_score"], m["eval/scores"]) for m in evals],
                    kl_curve=[(m["episode"], m["objective/kl"]) for m in train],
                )
            )  # fmt: skip
            print(f"kl_coef {kl_coef} seed {seed}: gold {records[-1]['gold']:.3f} (SFT {records[-1]['sft_gold']:.3f}) proxy {records[-1]['proxy']:.3f} KL {records[-1]['kl']:.2f} in {wall:.0f}s")
    cache = os.path.join(args.out, "cache")  # the task these runs used: the cache entry they last touched
    task_dir = max(os.listdir(cache), key=lambda d: os.path.getmtime(os.path.join(cache, d)))
    with open(os.path.join(cache, task_dir, "task.json")) as f:
        task = json.load(f)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        f.write(compact_json(dict(stamp=started, task=task, runs=records)))

    lines = [
        f"Built-in task: reward model held-out accuracy {task['rm_accuracy']:.3f}; SFT stage {task['times']['sft_s']:.0f}s, "
        f"reward-model stage {task['times']['reward_model_s']:.0f}s; SFT gold score {task['sft_gold_mean']:.3f} +- {task['sft_gold_std']:.3f} (std over samples).",
        "",
        f"| kl_coef | gold score (SFT {np.mean([r['sft_gold'] for r in records]):.3f}) | proxy score | KL (nats) | run wall time (s) | episodes/s |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for kl_coef in args.kl_coefs:
        rs = [r for r in records if r["kl_coef"] == kl_coef]

        def cell(key, digits=3):
            values = [r[key] for r in rs]
            return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}"

        lines.append(f"| {kl_coef} | {cell('gold')} | {cell('proxy')} | {cell('kl', 2)} | {cell('wall_s', 0)} | {cell('eps', 0)} |")
    lines.append(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.total_episodes} episodes each, mean +- sample std (ddof 1) over seeds; run wall time is the whole process (the first run also built the task).")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kl_coef in args.kl_coefs:
        rs = [r for r in records if r["kl_coef"] == kl_coef]
        episodes = [e for e, _, _ in rs[0]["curve"]]
        axes[0].plot(episodes, np.mean([[p for _, _, p in r["curve"]] for r in rs], 0), label=f"kl_coef {kl_coef}")
        axes[1].plot(episodes, np.mean([[g for _, g, _ in r["curve"]] for r in rs], 0), label=f"kl_coef {kl_coef}")
        axes[2].plot([e for e, _ in rs[0]["kl_curve"]], np.mean([[k for _, k in r["kl_curve"]] for r in rs], 0), label=f"kl_coef {kl_coef}")
    for ax, title in zip(axes, ["proxy (reward-model) score", "gold score", "KL to the reference (nats)"]):
        ax.set_xlabel("episode")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=100)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        kl_at = dict(r["kl_curve"])
        points = [(kl_at.get(e, 0.0), g, p) for e, g, p in r["curve"]]
        ax.scatter([k for k, _, _ in points], [g for _, g, _ in points], s=8, c="tab:green")
        ax.scatter([k for k, _, _ in points], [p for _, _, p in points], s=8, c="tab:blue")
    ax.scatter([], [], c="tab:green", label="gold score")
    ax.scatter([], [], c="tab:blue", label="proxy score")
    ax.set_xlabel("KL to the reference (nats)")
    ax.set_ylabel("score (SFT mean 0, std 1 for the proxy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "overoptimisation.png"), dpi=100)


if __name__ == "__main__":
    main(tyro.cli(Args))
