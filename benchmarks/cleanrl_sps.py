"""Steps per second of our scripts against CleanRL's, same hyperparameters, alternated runs on one machine:
CartPole-v1 (ppo_discrete.py against CleanRL's ppo.py) and HalfCheetah (ppo_continuous.py on HalfCheetah-v5
against CleanRL's ppo_continuous_action.py on HalfCheetah-v4: CleanRL pins gymnasium 0.29.1, whose MuJoCo tasks
are the v4 ones; same model and physics engine, different gymnasium). CleanRL runs in its own venv, from a checkout
of github.com/vwxyzjn/cleanrl; nothing of CleanRL's lives in this repository.

    git clone https://github.com/vwxyzjn/cleanrl /tmp/cleanrl
    python3 -m venv /tmp/venv-cleanrl && /tmp/venv-cleanrl/bin/pip install -r benchmarks/requirements-cleanrl.txt
    .venv-bench/bin/python benchmarks/cleanrl_sps.py --cleanrl-dir /tmp/cleanrl --cleanrl-python /tmp/venv-cleanrl/bin/python

Every process gets one torch thread (OMP_NUM_THREADS=1; ours also --num-threads 1 --device cpu, CleanRL
--no-cuda). Each pair runs ours, then CleanRL's; the ratio is taken pair by pair, so load on a shared machine hits
both alike. SPS is each script's own figure at its last iteration (environment steps over the time since its loop
started); the whole-process wall time is kept beside it. Each run also records the CPU that other processes used
meanwhile (cores, from /proc/stat less the run's own CPU time): how idle the machine was. Finally the env alone
with random actions, in each venv: the limit of either script. Writes benchmarks/results/cleanrl_sps.{json,md}
and, when matplotlib imports, cleanrl_sps.png.
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Each pair of scripts with CleanRL's default hyperparameters, passed explicitly to both (the flag names are the same).
SUITES = {
    "CartPole-v1": dict(
        ours="ppo_discrete.py", cleanrl="cleanrl/ppo.py", ours_env="CartPole-v1", cleanrl_env="CartPole-v1",
        steps=500_000,  # CleanRL's default run
        hyper=dict(num_envs=4, num_steps=128, num_minibatches=4, update_epochs=4, learning_rate=2.5e-4, gamma=0.99,
                   gae_lambda=0.95, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5),
    ),
    "HalfCheetah": dict(
        ours="ppo_continuous.py", cleanrl="cleanrl/ppo_continuous_action.py", ours_env="HalfCheetah-v5",
        cleanrl_env="HalfCheetah-v4", steps=102_400,
        hyper=dict(num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10, learning_rate=3e-4, gamma=0.99,
                   gae_lambda=0.95, clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5),
    ),
}  # fmt: skip
BOOLS = ("anneal-lr", "norm-adv", "clip-vloss")  # True in both scripts' defaults; passed anyway

VERSIONS = """
import importlib.metadata as m, json
print(json.dumps({p: m.version(p) for p in ("torch", "gymnasium", "mujoco", "numpy")}))
"""

RANDOM = """
import sys, time, numpy as np, gymnasium as gym
env_id, steps, num_envs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * num_envs)
envs.reset(seed=1)
envs.action_space.seed(1)
actions = [envs.action_space.sample() for _ in range(steps // num_envs)]
start = time.perf_counter()
for a in actions:
    envs.step(a)
print(steps / (time.perf_counter() - start))
"""


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O) since boot; nan off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return float("nan")
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list, cwd: str) -> tuple[str, dict]:
    """Run cmd with one torch thread; its stdout, wall seconds and the cores other processes used meanwhile."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, start = busy_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    busy = busy_seconds() - busy
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:2]))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    own = sum(getattr(after_children, f) - getattr(before_children, f) for f in ("ru_utime", "ru_stime"))
    return proc.stdout, {"wall_s": round(wall, 2), "cpu_s": round(own, 2), "other_cores": round(max(busy - own, 0.0) / wall, 2)}


def flags(hyper: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in hyper.items()] + [f"--{b}" for b in BOOLS]


def run_ours(suite: dict, python: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [python, str(ROOT / suite["ours"]), "--env-id", suite["ours_env"], "--seed", str(seed),
               "--total-timesteps", str(suite["steps"]), "--num-threads", "1", "--device", "cpu",
               "--eval-episodes", "0", "--runs-dir", str(Path(work) / "runs"), *flags(suite["hyper"])]  # fmt: skip
        _, info = timed(cmd, work)
        (path,) = Path(work).glob("runs/*/metrics.jsonl")
        records = [json.loads(line) for line in path.read_text().splitlines()]
    return {"sps": [r["charts/SPS"] for r in records if "charts/SPS" in r][-1], **info}


def run_cleanrl(suite: dict, python: str, cleanrl_dir: Path, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as work:  # CleanRL writes its tensorboard runs/ into the working directory
        cmd = [python, str(cleanrl_dir / suite["cleanrl"]), "--env-id", suite["cleanrl_env"], "--seed", str(seed),
               "--total-timesteps", str(suite["steps"]), "--no-cuda", *flags(suite["hyper"])]  # fmt: skip
        out, info = timed(cmd, work)
    return {"sps": int(re.findall(r"^SPS: (\d+)", out, re.M)[-1]), **info}


def env_alone(python: str, env_id: str, num_envs: int, steps: int = 20_000) -> float:
    out, _ = timed([python, "-c", RANDOM, env_id, str(steps), str(num_envs)], tempfile.gettempdir())
    return round(float(out.strip().splitlines()[-1]))


def describe(python: str) -> dict:
    out, _ = timed([python, "-c", VERSIONS], tempfile.gettempdir())
    return json.loads(out)


def cleanrl_commit(cleanrl_dir: Path, given: str) -> str:
    proc = subprocess.run(["git", "-C", str(cleanrl_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else given or "unknown"


def median(xs: list) -> float:
    return float(statistics.median(xs))


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"# ppo scripts against CleanRL, steps per second ({results['date']})",
        "",
        f"{results['machine']}; one torch thread per process; ours: torch {results['versions']['ours']['torch']}, "
        f"gymnasium {results['versions']['ours']['gymnasium']}; CleanRL: torch {results['versions']['cleanrl']['torch']}, "
        f"gymnasium {results['versions']['cleanrl']['gymnasium']} (CleanRL commit {results['cleanrl_commit'][:12]}).",
        "Per pair: ours then CleanRL's, same hyperparameters and seed; SPS is each script's own figure at its last iteration.",
        "",
        "| env (ours / CleanRL) | steps a run | ours SPS | CleanRL SPS | ratio per pair | median ratio | wall-time ratio (median) | other processes, cores (median) | env alone, random actions (ours / CleanRL's venv) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results["envs"].items():
        pairs = res["pairs"]
        others = [p[k]["other_cores"] for p in pairs for k in ("ours", "cleanrl")]
        ours, theirs = " / ".join(f"{p['ours']['sps']:,}" for p in pairs), " / ".join(f"{p['cleanrl']['sps']:,}" for p in pairs)
        ratios, alone = ", ".join(f"{p['ratio']:.2f}" for p in pairs), res["env_alone_sps"]
        lines.append(
            f"| {res['ours_env']} / {res['cleanrl_env']} | {res['total_timesteps']:,} | {ours} | {theirs} "
            f"| {ratios} | **{res['median_ratio']:.2f}x** | {res['median_wall_ratio']:.2f}x "
            f"| {median(others):.2f} | {alone['ours']:,.0f} / {alone['cleanrl']:,.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results["envs"]), figsize=(5.5 * len(results["envs"]), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], results["envs"].items()):
        pairs = res["pairs"]
        x = range(1, len(pairs) + 1)
        ax.bar([i - 0.2 for i in x], [p["ours"]["sps"] for p in pairs], 0.4, label=f"{res['ours_script']} ({res['ours_env']})")
        ax.bar([i + 0.2 for i in x], [p["cleanrl"]["sps"] for p in pairs], 0.4, label=f"CleanRL {res['cleanrl_script']} ({res['cleanrl_env']})")
        for i, p in zip(x, pairs):
            ax.annotate(f"{p['ratio']:.2f}x", (i, max(p["ours"]["sps"], p["cleanrl"]["sps"])), ha="center", va="bottom")
        ax.set(title=f"{name}: median {res['median_ratio']:.2f}x", xlabel="alternated pair", ylabel="steps per second", xticks=list(x))
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("one torch thread per process", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cleanrl-dir", type=Path, required=True, help="checkout of github.com/vwxyzjn/cleanrl")
    parser.add_argument("--cleanrl-python", required=True, help="python of a venv made from benchmarks/requirements-cleanrl.txt")
    parser.add_argument("--cleanrl-commit", default="", help="the commit CleanRL's files came from, when --cleanrl-dir is no git checkout")
    parser.add_argument("--python", default=sys.executable, help="python for our scripts (default: this one)")
    parser.add_argument("--envs", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs of runs per env")
    parser.add_argument("--steps", type=int, default=None, help="env steps a run (default: 500,000 on CartPole, 102,400 on HalfCheetah)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="cleanrl_sps", help="name of the result files under benchmarks/results/")
    args = parser.parse_args()
    for suite in SUITES.values():
        if not (args.cleanrl_dir / suite["cleanrl"]).is_file():
            sys.exit(f"--cleanrl-dir {args.cleanrl_dir}: no {suite['cleanrl']} there; pass a checkout of github.com/vwxyzjn/cleanrl")

    results = {
        "stamp": stamp(__file__),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, {platform.system()}",
        "threads": 1,
        "versions": {"ours": describe(args.python), "cleanrl": describe(args.cleanrl_python)},
        "cleanrl_commit": cleanrl_commit(args.cleanrl_dir, args.cleanrl_commit),
        "envs": {},
    }
    for name in args.envs:
        suite = dict(SUITES[name], steps=args.steps or SUITES[name]["steps"])
        pairs = []
        for i in range(args.pairs):
            ours = run_ours(suite, args.python, args.seed)
            theirs = run_cleanrl(suite, args.cleanrl_python, args.cleanrl_dir, args.seed)
            pairs.append({"ours": ours, "cleanrl": theirs, "ratio": round(ours["sps"] / theirs["sps"], 3),
                          "wall_ratio": round(theirs["wall_s"] / ours["wall_s"], 3)})  # fmt: skip
            print(f"{name} pair {i + 1}: ours {ours['sps']} SPS ({ours['wall_s']} s), CleanRL {theirs['sps']} SPS "
                  f"({theirs['wall_s']} s), ratio {pairs[-1]['ratio']:.2f}; other processes used "
                  f"{ours['other_cores']} / {theirs['other_cores']} cores", flush=True)  # fmt: skip
        num_envs = suite["hyper"]["num_envs"]
        results["envs"][name] = {
            "ours_script": suite["ours"], "cleanrl_script": suite["cleanrl"].split("/")[-1],
            "ours_env": suite["ours_env"], "cleanrl_env": suite["cleanrl_env"], "total_timesteps": suite["steps"],
            "seed": args.seed, "hyperparameters": suite["hyper"], "pairs": pairs,
            "median_ratio": median([p["ratio"] for p in pairs]), "median_wall_ratio": median([p["wall_ratio"] for p in pairs]),
            "env_alone_sps": {"ours": env_alone(args.python, suite["ours_env"], num_envs),
                              "cleanrl": env_alone(args.cleanrl_python, suite["cleanrl_env"], num_envs)},
        }  # fmt: skip
        print(f"{name}: median ratio {results['envs'][name]['median_ratio']:.2f}, env alone {results['envs'][name]['env_alone_sps']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, RESULTS / f"{args.out}.md")
    plotted = plot(results, RESULTS / f"{args.out}.png")
    print(f"wrote benchmarks/results/{args.out}.json, .md" + (", .png" if plotted else " (no matplotlib here: no plot)"))


if __name__ == "__main__":
    main()
