"""Steps per second of ppo_continuous.py against Stable-Baselines3's PPO with the same hyperparameters
(1 env, 2048 steps, 10 epochs, 32 minibatches of 64, 64-64 tanh actor and critic, VecNormalize for
observations and rewards), alternated in one run on one machine, beside the raw env step rate with
random actions (the limit). Each measurement is a fresh process with one torch thread. Writes
benchmarks/results/continuous_sps.json.

    python benchmarks/continuous_sps.py --rounds 3 --steps 20480
    .venv-bench/bin/python benchmarks/continuous_sps.py            # the venv of benchmarks/requirements.txt
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent

SB3 = """
import sys, time, torch, torch.nn as nn
torch.set_num_threads(1)
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
env_id, steps = sys.argv[1], int(sys.argv[2])
env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=1), gamma=0.99)
model = PPO("MlpPolicy", env, n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.99,
            gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=1, device="cpu",
            policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=nn.Tanh))
start = time.perf_counter()
model.learn(total_timesteps=steps)
print(steps / (time.perf_counter() - start))
"""

RANDOM = """
import sys, time, numpy as np, gymnasium as gym
env_id, steps = sys.argv[1], int(sys.argv[2])
envs = gym.make_vec(env_id, num_envs=1, vectorization_mode="sync")
envs.reset(seed=1)
actions = np.random.default_rng(1).uniform(envs.action_space.low, envs.action_space.high, (steps,) + envs.action_space.shape)
start = time.perf_counter()
for a in actions:
    envs.step(a.astype(np.float32))
print(steps / (time.perf_counter() - start))
"""


def run(cmd: list) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def ours(env_id: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as runs:
        run([sys.executable, "ppo_continuous.py", "--env-id", env_id, "--total-timesteps", str(steps),
             "--num-threads", "1", "--eval-episodes", "0", "--runs-dir", runs])  # fmt: skip
        (path,) = Path(runs).glob("*/metrics.jsonl")
        return [r for r in map(json.loads, path.read_text().splitlines()) if "charts/SPS" in r][-1]["charts/SPS"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=20480, help="env steps per measurement (multiple of 2048)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = stamp(__file__)
    results = {"ppo_continuous.py": [], "stable-baselines3": [], "random actions": []}
    for r in range(args.rounds):
        results["ppo_continuous.py"].append(ours(args.env_id, args.steps))
        results["stable-baselines3"].append(float(run([sys.executable, "-c", SB3, args.env_id, str(args.steps)])))
        results["random actions"].append(float(run([sys.executable, "-c", RANDOM, args.env_id, str(args.steps)])))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()), flush=True)
    ratio = [a / b for a, b in zip(results["ppo_continuous.py"], results["stable-baselines3"])]
    print(f"{args.env_id}, {args.steps} steps a measurement, {time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.1f}")
    for k, v in results.items():
        print(f"  {k:20s} SPS {min(v):7.0f} .. {max(v):7.0f} (median {sorted(v)[len(v) // 2]:.0f})")
    print(f"  ours / SB3 per round: {' '.join(f'{x:.2f}' for x in ratio)}")
    out = ROOT / "benchmarks" / "results" / "continuous_sps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stamp": started, "env_id": args.env_id, "steps": args.steps, "threads": 1, **results, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
