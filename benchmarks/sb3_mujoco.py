"""Stable-Baselines3's PPO with rl-baselines3-zoo's tuned hyperparameters on the MuJoCo v5 envs, written where
benchmarks/continuous_returns.py reads runs, so SB3 and ours compare side by side on one machine:

    .venv-bench/bin/python benchmarks/sb3_mujoco.py --envs HalfCheetah-v5 Hopper-v5 --jobs 2
    python benchmarks/continuous_returns.py --compare zoo-halfcheetah sb3-zoo --envs HalfCheetah-v5

Needs the benchmark environment (benchmarks/requirements.txt: stable-baselines3 2.9.2). The settings are
rl-baselines3-zoo's hyperparams/ppo.yml entries for the v4 envs (zoo commit 208b6fd), applied to v5:
VecNormalize on observations and rewards with the zoo's rule (its discount is the algorithm's gamma), one env.
Each finished episode goes to metrics.jsonl as `charts/episodic_return` at `global_step` (the names ours use);
at the end, 10 evaluation episodes with the mean action and frozen statistics give `eval/episodic_return`.
A run checkpoints every 100k steps (model and VecNormalize) and a cut-off run continues from there.
Each run folder gets stamp.json (benchmarks/stamp.py) when it starts, and one more stamp per resumed start.
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
SAVE_EVERY = 100_000

# rl-baselines3-zoo hyperparams/ppo.yml (all `normalize: true`, `n_envs: 1`, 1M steps). Ant-v4 has no tuned entry
# (the zoo's `mujoco-defaults`: SB3's PPO defaults).
BIG_RELU = dict(log_std_init=-2, ortho_init=False, activation_fn="relu", net_arch=dict(pi=[256, 256], vf=[256, 256]))
ZOO = {
    "HalfCheetah-v5": dict(
        batch_size=64, n_steps=512, gamma=0.98, learning_rate=2.0633e-05, ent_coef=0.000401762, clip_range=0.1,
        n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8, vf_coef=0.58096, policy_kwargs=BIG_RELU,
    ),
    "Hopper-v5": dict(
        batch_size=32, n_steps=512, gamma=0.999, learning_rate=9.80828e-05, ent_coef=0.00229519, clip_range=0.2,
        n_epochs=5, gae_lambda=0.99, max_grad_norm=0.7, vf_coef=0.835671, policy_kwargs=BIG_RELU,
    ),
    "Walker2d-v5": dict(
        batch_size=32, n_steps=512, gamma=0.99, learning_rate=5.05041e-05, ent_coef=0.000585045, clip_range=0.1,
        n_epochs=20, gae_lambda=0.95, max_grad_norm=1.0, vf_coef=0.871923,
    ),
    "Ant-v5": dict(),
}  # fmt: skip


def train(env_id: str, seed: int, total_timesteps: int, run_dir: Path) -> None:
    """One SB3 run in this process (the worker side of --worker)."""
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)
    hyper = json.loads(json.dumps(ZOO[env_id]))
    kwargs = hyper.pop("policy_kwargs", {})
    if kwargs.get("activation_fn") == "relu":
        kwargs["activation_fn"] = torch.nn.ReLU
    log_path, model_path, norm_path = run_dir / "metrics.jsonl", run_dir / "model.zip", run_dir / "vecnormalize.pkl"
    venv = DummyVecEnv([lambda: Monitor(gym.make(env_id))])
    if model_path.exists():  # cut off earlier: continue from the last checkpoint, its log cut back to it
        venv = VecNormalize.load(str(norm_path), venv)
        model = PPO.load(str(model_path), env=venv, device="cpu")
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["global_step"] <= model.num_timesteps]
        log_path.write_text("".join(line + "\n" for line in kept))
    else:
        venv = VecNormalize(venv, gamma=hyper.get("gamma", 0.99))
        model = PPO("MlpPolicy", venv, seed=seed, device="cpu", policy_kwargs=kwargs, **hyper)

    class Log(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    record = {"global_step": self.num_timesteps, "charts/episodic_return": float(info["episode"]["r"]),
                              "charts/episodic_length": int(info["episode"]["l"])}  # fmt: skip
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if self.num_timesteps % SAVE_EVERY == 0:
                self.model.save(str(model_path))
                venv.save(str(norm_path))
            return True

    model.learn(total_timesteps - model.num_timesteps, callback=Log(), reset_num_timesteps=False)
    venv.training, venv.norm_reward = False, False
    returns = []
    eval_env = gym.make(env_id)
    for episode in range(10):
        obs, _ = eval_env.reset(seed=10_000 + seed * 100 + episode)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(venv.normalize_obs(obs[None]), deterministic=True)
            obs, reward, terminated, truncated, _ = eval_env.step(action[0])
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    with open(log_path, "a") as f:
        f.write(json.dumps({"global_step": model.num_timesteps, "eval/episodic_return": float(np.mean(returns))}) + "\n")
    log_path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(log_path.read_bytes(), mtime=0))
    for path in (log_path, model_path, norm_path):
        path.unlink(missing_ok=True)


def running_elsewhere(pid_file: Path) -> bool:
    """Whether the worker named in pid_file still runs (two drivers started over one folder never share a run)."""
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def launch(env_id: str, seed: int, total_timesteps: int, out: Path) -> None:
    run_dir = out / env_id / f"seed{seed}" / f"{env_id}__sb3__{seed}"
    if (run_dir / "metrics.jsonl.gz").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if running_elsewhere(run_dir / "worker.pid"):
        print(f"skipped (another process trains it): {run_dir}", flush=True)
        return
    cmd = [sys.executable, __file__, "--worker", env_id, str(seed), str(total_timesteps), str(run_dir)]
    stamp_path = run_dir / "stamp.json"
    starts = json.loads(stamp_path.read_text()) if stamp_path.exists() else []
    stamp_path.write_text(json.dumps([*starts, stamp(__file__)], indent=1) + "\n")  # a resumed run adds one
    with open(run_dir.parent / "stdout.log", "a") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        (run_dir / "worker.pid").write_text(str(proc.pid))
        proc.wait()
    (run_dir / "worker.pid").unlink(missing_ok=True)
    print(f"{'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}: {run_dir}", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        env_id, seed, total, run_dir = sys.argv[2:6]
        return train(env_id, int(seed), int(total), Path(run_dir))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"], choices=list(ZOO))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one CPU core each)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continuous" / "sb3-zoo"))
    args = parser.parse_args()
    jobs = [(env_id, seed) for env_id in args.envs for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: launch(*job, args.total_timesteps, Path(args.out)), jobs))
    out = Path(args.out)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "continuous_returns.py"), "--summary-only", "--out",
                    str(out.parent), "--label", out.name, "--envs", *ZOO, "--seeds", *map(str, sorted(set(args.seeds) | {1, 2, 3}))], check=True)  # every seed run so far  # fmt: skip


if __name__ == "__main__":
    main()
