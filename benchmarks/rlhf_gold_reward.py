"""ppo_rlhf.py on its built-in task with a verifiable reward: the hidden gold reward as a reward function
(`--builtin-reward gold`), beside the learned reward model of the kl-coef sweep (benchmarks/rlhf_sweep.py).

Runs `python ppo_rlhf.py --builtin-reward gold --kl-coef K --seed S` for every pair (one at a time), with the
sweep's settings otherwise, then writes to --out:
  gold_reward.json   one record per run: gold-score curve on the held-out prompts, KL curve, final values
  gold_reward.md     final gold score and KL per kl_coef, trained on the gold reward and (from the sweep's
                     results.json) on the learned reward model
  gold_reward.png    (only if matplotlib is installed) gold score against episodes, and against KL, both rewards

    python benchmarks/rlhf_gold_reward.py --seeds 1 2 3 --kl-coefs 0 0.05 --total-episodes 4800
"""

import json
import os
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
    kl_coefs: list[float] = field(default_factory=lambda: [0.0, 0.05])
    """KL coefficients; each is compared with the sweep's runs at the same coefficient"""
    total_episodes: int = 4800
    """episodes per run (the sweep's results.json used 4800)"""
    out: str = "benchmarks/results/rlhf"
    """output directory; the sweep's results.json is read from here"""
    python: str = sys.executable
    """the Python that runs ppo_rlhf.py"""
    threads: int = 1
    """torch threads per run (tiny models run fastest on one)"""


def main(args: Args) -> None:
    with open(os.path.join(args.out, "results.json")) as f:
        sweep = json.load(f)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started, records = stamp(__file__), []
    for kl_coef in args.kl_coefs:
        for seed in args.seeds:
            runs_dir = os.path.join(args.out, "runs", f"gold_kl{kl_coef}_seed{seed}")
            shutil.rmtree(runs_dir, ignore_errors=True)
            cmd = [
                args.python, SCRIPT, "--builtin-reward", "gold", "--seed", str(seed), "--kl-coef", str(kl_coef),
                "--total-episodes", str(args.total_episodes), "--runs-dir", runs_dir,
                "--cache-dir", os.path.join(args.out, "cache"), "--num-threads", str(args.threads),
            ]  # fmt: skip
            start = time.time()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - start
            (run,) = os.listdir(runs_dir)
            with open(os.path.join(runs_dir, run, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f]
            train = [m for m in metrics if "objective/kl" in m]
            evals = [m for m in metrics if "objective/gold_score" in m]
            records.append(
                dict(
                    kl_coef=kl_coef, seed=seed, wall_s=wall, sft_gold=evals[0]["objective/gold_score"],
                    gold=evals[-1]["objective/gold_score"], kl=float(np.mean([m["objective/kl"] for m in train[-5:]])),
                    eps=train[-1]["eps"], curve=[(m["episode"], m["objective/gold_score"]) for m in evals],
                    kl_curve=[(m["episode"], m["objective/kl"]) for m in train],
                )
            )  # fmt: skip
            r = records[-1]
            print(f"gold reward, kl_coef {kl_coef} seed {seed}: gold {r['gold']:.3f} (SFT {r['sft_gold']:.3f}) KL {r['kl']:.2f} in {wall:.0f}s")
    with open(os.path.join(args.out, "gold_reward.json"), "w") as f:
        json.dump(dict(stamp=started, settings=vars(args) | {"python": os.path.basename(args.python)}, runs=records), f)

    def cell(rs, key, digits=3):
        values = [r[key] for r in rs]
        return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}" if values else "-"

    lines = [
        "| kl_coef | reward trained on | final gold score | peak gold score (evaluations) | KL (nats, last 5 updates) |",
        "|---|---|---|---|---|",
    ]
    for kl_coef in args.kl_coefs:
        learned = [r for r in sweep["runs"] if r["kl_coef"] == kl_coef]
        gold = [r for r in records if r["kl_coef"] == kl_coef]
        for name, rs in (("learned reward model", learned), ("gold reward (function)", gold)):
            for r in rs:
                r["peak"] = max(g for _, g, *_ in r["curve"])
            lines.append(f"| {kl_coef} | {name} | {cell(rs, 'gold')} | {cell(rs, 'peak')} | {cell(rs, 'kl', 2)} |")
    sft = np.mean([r["sft_gold"] for r in records])
    lines.append(
        f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.total_episodes} episodes each, mean +- sample std (ddof 1) over "
        f"seeds; SFT policy's gold score {sft:.3f}. Learned-reward rows: the kl-coef sweep's results.json."
    )
    with open(os.path.join(args.out, "gold_reward.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(args.kl_coefs, ["tab:red", "tab:blue", "tab:green", "tab:purple"]))
    for kl_coef in args.kl_coefs:
        for name, rs, style in (
            ("learned RM", [r for r in sweep["runs"] if r["kl_coef"] == kl_coef], "--"),
            ("gold reward", [r for r in records if r["kl_coef"] == kl_coef], "-"),
        ):
            episodes = [p[0] for p in rs[0]["curve"]]
            gold = np.mean([[p[1] for p in r["curve"]] for r in rs], 0)
            label = f"{name}, kl_coef {kl_coef}"
            axes[0].plot(episodes, gold, style, color=colours[kl_coef], label=label)
            kl_at = [dict(r["kl_curve"]) for r in rs]
            kl = np.mean([[k.get(e, 0.0) for e in episodes] for k in kl_at], 0)
            axes[1].plot(kl, gold, style, marker=".", color=colours[kl_coef], label=label)
    axes[0].set_xlabel("episode")
    axes[1].set_xlabel("KL to the reference (nats)")
    for ax in axes:
        ax.axhline(sft, color="grey", lw=0.8)
        ax.set_ylabel("gold score, held-out prompts")
        ax.legend(fontsize=8)
    axes[0].set_title("gold score while training (mean of seeds)")
    axes[1].set_title("gold score against KL")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "gold_reward.png"), dpi=100)


if __name__ == "__main__":
    main(tyro.cli(Args))
