"""Learning benchmark of ppo_continuous.py: several envs x seeds, then a table of final returns and
SPS and (with matplotlib installed) learning-curve plots. Runs go to --out/{label}/{env}/seed{seed}/;
an existing finished run is reused, so a cut-off benchmark continues where it stopped. Each run's folder gets
stamp.json (benchmarks/stamp.py, for ppo_continuous.py: its commit, the machine, the load, the command) at each start.

    python benchmarks/continuous_returns.py --jobs 6                             # cleanrl preset, 1M steps
    python benchmarks/continuous_returns.py --label no-bootstrap --jobs 6 -- --no-bootstrap-truncation
    python benchmarks/continuous_returns.py --summary-only --label cleanrl        # table and plots again
    python benchmarks/continuous_returns.py --compare cleanrl no-bootstrap --envs HalfCheetah-v5 Hopper-v5

Final return of a seed: the mean of its last 10 training episodes; the table shows the mean and
sample standard deviation (ddof 1) of that over seeds. SPS is not
reported here: runs share the machine (--jobs); benchmarks/continuous_sps.py measures speed.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent


def records(run_dir: Path) -> list:
    """The metrics of the run under run_dir: metrics.jsonl while it runs, metrics.jsonl.gz once finished."""
    paths = list(run_dir.glob("*/metrics.jsonl")) + list(run_dir.glob("*/metrics.jsonl.gz"))
    if not paths:
        return []
    text = gzip.decompress(paths[0].read_bytes()).decode() if paths[0].suffix == ".gz" else paths[0].read_text()
    return [json.loads(line) for line in text.splitlines()]


def episodes(run_dir: Path) -> list:
    """(global_step, episodic return) of every training episode of a run."""
    return [(r["global_step"], r["charts/episodic_return"]) for r in records(run_dir) if "charts/episodic_return" in r]


def smoothed(run: list) -> tuple:
    """Steps and the 10-episode moving average of the returns (raw returns for shorter runs)."""
    import numpy as np

    steps, rets = np.array(run).T
    if len(rets) < 10:
        return steps, rets
    return steps[9:], np.convolve(rets, np.ones(10) / 10, mode="valid")


def write_table(lines: list, path: Path) -> None:
    table = "\n".join(lines)
    print(table)
    path.write_text(table + "\n")


def pyplot():
    """matplotlib.pyplot drawing to files, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots)")
        return None
    return plt


def finished(run_dir: Path) -> bool:
    return any("eval/episodic_return" in r for r in records(run_dir))


def launch(cmd: list, run_dir: Path) -> None:
    if finished(run_dir):
        return
    checkpoints = list(run_dir.glob("*/checkpoint.pt"))
    if checkpoints:  # cut off earlier: continue it (the script saves every 50 iterations here)
        cmd = [sys.executable, "ppo_continuous.py", "--resume", str(checkpoints[0]), "--num-threads", "1"]
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp_path = run_dir / "stamp.json"  # one stamp per start: a resumed run adds one
    starts = json.loads(stamp_path.read_text()) if stamp_path.exists() else []
    stamp_path.write_text(json.dumps([*starts, stamp(str(ROOT / "ppo_continuous.py"), cmd)], indent=1) + "\n")
    with open(run_dir / "stdout.log", "a") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}: {run_dir}", flush=True)
    if finished(run_dir):  # kept compressed: tens of thousands of lines per run
        for path in run_dir.glob("*/metrics.jsonl"):
            path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
            path.unlink()


def summarize(out: Path, envs: list, seeds: list) -> None:
    import numpy as np

    lines = ["| env | final return (mean ± sample std over seeds, ddof 1) | per seed | eval (mean action) |", "|---|---|---|---|"]
    curves = {}
    for env_id in envs:
        finals, evals = [], []
        for seed in seeds:
            run = episodes(out / env_id / f"seed{seed}")
            if not run:
                continue
            curves.setdefault(env_id, []).append(run)
            finals.append(float(np.mean([ret for _, ret in run[-10:]])))
            evals += [r["eval/episodic_return"] for r in records(out / env_id / f"seed{seed}") if "eval/episodic_return" in r]
        if finals:
            per_seed = ", ".join(f"{f:.0f}" for f in finals)
            evaluation = f"{np.mean(evals):.0f}" if evals else "-"
            lines.append(f"| {env_id} | {np.mean(finals):.0f} ± {np.std(finals, ddof=1) if len(finals) > 1 else float('nan'):.0f} | {per_seed} | {evaluation} |")
    write_table(lines, out / "summary.md")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (env_id, runs) in zip(axes[0], curves.items()):
        for run in runs:
            ax.plot(*smoothed(run), alpha=0.8)
        ax.set(title=env_id, xlabel="global step", ylabel="episodic return (10-episode mean)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"plots: {out / 'curves.png'}")


def final_returns(run_root: Path, env_id: str, seeds: list) -> list:
    """Per seed: the mean return of its last 10 training episodes."""
    import numpy as np

    out = []
    for seed in seeds:
        rets = [ret for _, ret in episodes(run_root / env_id / f"seed{seed}")]
        if rets:
            out.append(float(np.mean(rets[-10:])))
    return out


def compare(root: Path, labels: list, envs: list, seeds: list) -> None:
    """Final returns of two configurations side by side ({a}_vs_{b}.md) and their curves ({a}_vs_{b}.png)."""
    import numpy as np

    a, b = labels
    lines = [f"| env | {a} | {b} | difference ({a} - {b}) |", "|---|---|---|---|"]
    for env_id in envs:
        fa, fb = final_returns(root / a, env_id, seeds), final_returns(root / b, env_id, seeds)
        if fa and fb:
            cells = [f"{np.mean(f):.0f} ± {np.std(f, ddof=1):.0f} ({', '.join(f'{x:.0f}' for x in f)})" for f in (fa, fb)]
            lines.append(f"| {env_id} | {cells[0]} | {cells[1]} | {np.mean(fa) - np.mean(fb):+.0f} |")
    name = f"{a}_vs_{b}"
    write_table(lines, root / f"{name}.md")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.5), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for label, color in zip(labels, ("tab:blue", "tab:orange")):
            for i, seed in enumerate(seeds):
                run = episodes(root / label / env_id / f"seed{seed}")
                if run:
                    ax.plot(*smoothed(run), color=color, alpha=0.7, label=label if i == 0 else None)
        ax.set(title=env_id, xlabel="global step", ylabel="episodic return (10-episode mean)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / f"{name}.png", dpi=100)
    print(f"plots: {root / f'{name}.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--preset", default="cleanrl")
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one CPU core each)")
    parser.add_argument("--label", default=None, help="name of this configuration (default: the preset)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continuous"))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar="LABEL", help="compare two finished labels instead of running")
    parser.add_argument("extra", nargs="*", help="flags passed on to ppo_continuous.py (after --)")
    args = parser.parse_args()
    if args.compare:
        return compare(Path(args.out), args.compare, args.envs, args.seeds)
    out = Path(args.out) / (args.label or args.preset)
    if not args.summary_only:
        jobs = []
        for env_id in args.envs:
            for seed in args.seeds:
                run_dir = out / env_id / f"seed{seed}"
                cmd = [
                    sys.executable, "ppo_continuous.py", args.preset, "--env-id", env_id, "--seed", str(seed),
                    "--total-timesteps", str(args.total_timesteps), "--num-threads", "1", "--runs-dir", str(run_dir),
                    "--save-every", "50", *args.extra,
                ]  # fmt: skip
                jobs.append((cmd, run_dir))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: launch(*job), jobs))
    summarize(out, args.envs, args.seeds)


if __name__ == "__main__":
    main()
