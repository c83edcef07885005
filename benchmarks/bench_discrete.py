"""Benchmark ppo_discrete.py against Stable-Baselines3's PPO with the same hyperparameters.

    python -m venv .venv-bench && .venv-bench/bin/pip install -r benchmarks/requirements.txt
    .venv-bench/bin/python benchmarks/bench_discrete.py --suite classic   # CartPole-v1 and Acrobot-v1, 3 seeds
    .venv-bench/bin/python benchmarks/bench_discrete.py --suite speed     # SPS only: short runs, alternated
    .venv-bench/bin/python benchmarks/bench_discrete.py --suite atari     # Breakout SPS and the raw env limit
    .venv-bench/bin/python benchmarks/bench_discrete.py --suite atari-envs  # C++ vector env vs Python wrappers

Runs alternate (ours, SB3, ours, SB3, ...) so that load on a shared machine hits both alike; every
process is pinned to one torch thread. Writes benchmarks/results/discrete_{classic,atari}.json and
a plot of the 20-episode mean return against environment steps.
"""

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 1

# CleanRL's ppo.py defaults, which are ppo_discrete.py's; SB3 gets the same values below.
HYPER = dict(num_envs=4, num_steps=128, num_minibatches=4, update_epochs=4, learning_rate=2.5e-4, gamma=0.99,
             gae_lambda=0.95, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5)  # fmt: skip

SB3_RUNNER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
env_id, seed, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = json.loads(sys.argv[6])
env = make_vec_env(env_id, n_envs=h["num_envs"], seed=seed, monitor_dir=out)
lr = h["learning_rate"]
model = PPO("MlpPolicy", env, n_steps=h["num_steps"], batch_size=h["num_envs"] * h["num_steps"] // h["num_minibatches"],
            n_epochs=h["update_epochs"], learning_rate=lambda progress: progress * lr, gamma=h["gamma"],
            gae_lambda=h["gae_lambda"], clip_range=h["clip_coef"], clip_range_vf=h["clip_coef"], ent_coef=h["ent_coef"],
            vf_coef=h["vf_coef"], max_grad_norm=h["max_grad_norm"], seed=seed, device="cpu",
            policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), optimizer_kwargs=dict(eps=1e-5)))
start = time.time()
model.learn(steps)
print(json.dumps({"sps": steps / (time.time() - start)}))
"""


def run_ours(env_id: str, seed: int, steps: int, out: Path, extra: list[str]) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in HYPER.items()] + extra
    cmd = [sys.executable, str(ROOT / "ppo_discrete.py"), "--env-id", env_id, "--seed", str(seed),
           "--total-timesteps", str(steps), "--num-threads", str(THREADS), "--runs-dir", str(out), "--eval-episodes", "0", *flags]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (path,) = out.glob("*/metrics.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    episodes = [(r["global_step"], r["charts/episodic_return"]) for r in records if "charts/episodic_return" in r]
    sps = [r["charts/SPS"] for r in records if "charts/SPS" in r][-1]
    return {"episodes": episodes, "sps": sps}


def run_sb3(env_id: str, seed: int, steps: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", SB3_RUNNER, env_id, str(seed), str(steps), str(out), str(THREADS), json.dumps(HYPER)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sps = json.loads(proc.stdout.strip().splitlines()[-1])["sps"]
    # Monitor files, one per env: episode returns and lengths in order. Envs step in lockstep, so an
    # episode that ends after an env's k-th step ends at global step num_envs * k.
    episodes = []
    for monitor in out.glob("*.monitor.csv"):
        rows = np.atleast_2d(np.loadtxt(monitor, delimiter=",", skiprows=2, usecols=(0, 1)))
        episodes += list(zip((np.cumsum(rows[:, 1]) * HYPER["num_envs"]).astype(int).tolist(), rows[:, 0].tolist()))
    return {"episodes": sorted(episodes), "sps": sps}


def summarise(episodes: list, threshold: float) -> dict:
    returns = np.array([r for _, r in episodes])
    steps = np.array([s for s, _ in episodes])
    means = np.convolve(returns, np.ones(20) / 20, mode="valid")
    hit = np.flatnonzero(means >= threshold)
    return {
        "final_return": float(returns[-20:].mean()),
        "steps_to_threshold": int(steps[hit[0] + 19]) if hit.size else None,
        "curve": [steps[19:].tolist(), means.tolist()],
    }


def env_limit(env_id: str, num_envs: int, steps: int = 200_000) -> float:
    """Random-action steps per second of the same vector env: what no agent loop can beat."""
    import gymnasium as gym

    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
    envs.reset(seed=0)
    actions = np.zeros(num_envs, dtype=np.int64)
    start = time.time()
    for _ in range(steps // num_envs):
        envs.step(actions)
    return steps / (time.time() - start)


@dataclass
class Args:
    suite: str = "classic"
    """`classic` (CartPole-v1 and Acrobot-v1 against SB3: learning curves and SPS), `speed` (SPS of
    short CartPole runs, alternated, for a quiet machine), `atari` (Breakout SPS and the env's limit) or
    `atari-envs` (AtariVectorEnv against gymnasium's Python Atari wrappers, random actions)"""
    seeds: int = 3
    """seeds per env and implementation"""
    total_timesteps: int = 500_000
    """environment steps per classic-control run"""
    atari_steps: int = 100_000
    """agent steps of the Breakout run"""
    speed_steps: int = 100_000
    """environment steps of each `speed` run"""
    repeats: int = 3
    """alternated pairs of `speed` runs"""


def classic(args: Args) -> None:
    results = {"threads": THREADS, "hyperparameters": HYPER, "total_timesteps": args.total_timesteps, "envs": {}}
    thresholds = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0}
    work = Path("/tmp") / f"bench_discrete_{int(time.time())}"
    for env_id, threshold in thresholds.items():
        runs = {"ours": [], "sb3": []}
        for seed in range(1, args.seeds + 1):
            for name in ("ours", "sb3"):
                out = work / env_id / name / str(seed)
                run = run_ours(env_id, seed, args.total_timesteps, out, []) if name == "ours" else run_sb3(env_id, seed, args.total_timesteps, out)
                summary = {"seed": seed, "sps": run["sps"], **summarise(run["episodes"], threshold)}
                runs[name].append(summary)
                print(f"{env_id} {name} seed {seed}: SPS {summary['sps']:.0f}, final {summary['final_return']:.1f}, "
                      f"steps to {threshold:g}: {summary['steps_to_threshold']}", flush=True)  # fmt: skip
        results["envs"][env_id] = {"threshold": threshold, "env_limit_sps": env_limit(env_id, HYPER["num_envs"]), **runs}
        save(results, "discrete_classic")
    plot(results)


def compact_json(obj) -> str:
    """JSON indented for reading, with every list of numbers (the learning curves) on one line."""
    text = json.dumps(obj, indent=1)
    for _ in range(2):  # lists of numbers, then lists of such lists
        text = re.sub(r"\[(?:\s*(?:[-+0-9.eE]+|\[[^\[\]]*\]|null)\s*,?)*\s*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    return text + "\n"


def save(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(compact_json({"stamp": STARTED, **results}))


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["envs"]), figsize=(6 * len(results["envs"]), 4))
    for ax, (env_id, res) in zip(np.atleast_1d(axes), results["envs"].items()):
        for name, color in (("ours", "tab:blue"), ("sb3", "tab:orange")):
            for i, run in enumerate(res[name]):
                label = f"{'ppo_discrete.py' if name == 'ours' else 'SB3 PPO'} ({np.mean([r['sps'] for r in res[name]]):.0f} SPS)"
                ax.plot(*run["curve"], color=color, alpha=0.7, label=label if i == 0 else None)
        ax.set(title=env_id, xlabel="environment steps", ylabel="mean return, last 20 episodes")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "discrete_classic.png", dpi=100)


def speed(args: Args) -> None:
    work = Path("/tmp") / f"bench_speed_{int(time.time())}"
    sps = {"ours": [], "sb3": []}
    for i in range(args.repeats):
        sps["ours"].append(run_ours("CartPole-v1", 1, args.speed_steps, work / "ours" / str(i), [])["sps"])
        sps["sb3"].append(run_sb3("CartPole-v1", 1, args.speed_steps, work / "sb3" / str(i))["sps"])
        print(f"pair {i}: ours {sps['ours'][-1]:.0f} SPS, SB3 {sps['sb3'][-1]:.0f} SPS", flush=True)
    results = {"threads": THREADS, "steps": args.speed_steps, "hyperparameters": HYPER, **sps,
               "median_ratio": float(np.median(np.array(sps["ours"]) / np.array(sps["sb3"]))),
               "env_limit_sps": env_limit("CartPole-v1", HYPER["num_envs"])}  # fmt: skip
    print(results)
    save(results, "discrete_speed")


def atari_envs(args: Args, steps: int = 20_000) -> None:
    """Random-action throughput of ale-py's C++ AtariVectorEnv against gymnasium's Python wrappers
    (AtariPreprocessing + FrameStackObservation in a SyncVectorEnv), same preprocessing, 8 envs."""
    import ale_py
    import gymnasium as gym
    from ale_py.vector_env import AtariVectorEnv

    gym.register_envs(ale_py)

    def wrapped():
        env = gym.make("BreakoutNoFrameskip-v4")
        return gym.wrappers.FrameStackObservation(gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4), 4)

    pipelines = {
        "AtariVectorEnv (C++)": lambda: AtariVectorEnv(game="breakout", num_envs=8),
        "gymnasium wrappers, SyncVectorEnv": lambda: gym.vector.SyncVectorEnv([wrapped] * 8),
    }
    results = {"steps": steps, "num_envs": 8}
    for name, make in pipelines.items():
        envs = make()
        envs.reset(seed=0)
        start = time.time()
        for _ in range(steps // 8):
            envs.step(envs.action_space.sample())
        results[name] = steps / (time.time() - start)
        envs.close()
        print(f"{name}: {results[name]:.0f} agent steps/s", flush=True)
    save(results, "discrete_atari_envs")


def atari(args: Args) -> None:
    from ale_py.vector_env import AtariVectorEnv

    envs = AtariVectorEnv(game="breakout", num_envs=8)
    envs.reset(seed=0)
    start = time.time()
    for _ in range(args.atari_steps // 8):
        envs.step(envs.action_space.sample())
    limit = args.atari_steps / (time.time() - start)
    envs.close()
    out = Path("/tmp") / f"bench_atari_{int(time.time())}"
    run = run_ours("ALE/Breakout-v5", 1, args.atari_steps, out, ["--clip-coef=0.1", "--num-envs=8"])
    results = {"threads": THREADS, "agent_steps": args.atari_steps, "num_envs": 8, "ours_sps": run["sps"], "env_limit_sps": limit}
    print(results)
    save(results, "discrete_atari")


if __name__ == "__main__":
    args = tyro.cli(Args)
    STARTED = stamp(__file__)  # the stamp save() writes: taken before the suite runs
    {"classic": classic, "speed": speed, "atari": atari, "atari-envs": atari_envs}[args.suite](args)
