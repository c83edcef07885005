"""Is ppo_continuous.py's zoo-* the same algorithm as SB3's PPO with the zoo's settings? Two checks
that need no training, run in the benchmark environment (stable-baselines3 2.9.2):

    .venv-bench/bin/python benchmarks/sb3_equivalence.py

1. The update: SB3's PPO.train() and our ppo_update from the same weights on the same 512-step batch
   (observations, actions from the policy, rewards and an episode end drawn at random), one minibatch so
   that the shuffling plays no part, 1 and 20 epochs: GAE and returns, the losses and the weights after. With
   zoo-halfcheetah's settings (256-256 ReLU, log std -2) and zoo-walker2d's (64-64 tanh, orthogonal init).
2. The normalisation: SB3's VecNormalize and our Normalizer fed the same HalfCheetah-v5 stream (random
   actions, 3 episodes): normalised observations and scaled rewards step by step; then the same on Walker2d-v5
   and Ant-v5 with their presets' gamma, whose random episodes end by terminations (many of them).

Writes benchmarks/results/continuous/sb3_equivalence.json.
"""

import dataclasses
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ppo_continuous as ours  # noqa: E402


def sb3_model(env_id: str, epochs: int):
    from sb3_mujoco import ZOO
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv

    hyper = {**json.loads(json.dumps(ZOO[env_id])), "n_epochs": epochs, "batch_size": 512}
    kwargs = hyper.pop("policy_kwargs", {})
    if kwargs.get("activation_fn") == "relu":
        kwargs["activation_fn"] = torch.nn.ReLU
    model = PPO("MlpPolicy", DummyVecEnv([lambda: gym.make(env_id)]), policy_kwargs=kwargs, seed=0, device="cpu", **hyper)
    model.set_logger(configure(None, [""]))
    return model


def sb3_weights(policy) -> dict:
    """SB3's policy parameters under our Agent's names (the same layers, in the same order)."""
    pi, vf = policy.mlp_extractor.policy_net, policy.mlp_extractor.value_net
    return {
        "actor_mean.0.weight": pi[0].weight, "actor_mean.0.bias": pi[0].bias, "actor_mean.2.weight": pi[2].weight,
        "actor_mean.2.bias": pi[2].bias, "actor_mean.4.weight": policy.action_net.weight,
        "actor_mean.4.bias": policy.action_net.bias, "critic.0.weight": vf[0].weight, "critic.0.bias": vf[0].bias,
        "critic.2.weight": vf[2].weight, "critic.2.bias": vf[2].bias, "critic.4.weight": policy.value_net.weight,
        "critic.4.bias": policy.value_net.bias, "actor_logstd": policy.log_std[None],
    }  # fmt: skip


def compare_update(preset: str, epochs: int) -> dict:
    args = dataclasses.replace(ours.PRESETS[preset][1], update_epochs=epochs, num_minibatches=1)
    model = sb3_model(args.env_id, epochs)
    agent = ours.build_agent(args, torch.device("cpu"))[0]
    theirs = sb3_weights(model.policy)
    agent.load_state_dict({k: v.detach().clone() for k, v in theirs.items()})
    rng = np.random.default_rng(0)
    obs = torch.tensor(rng.normal(size=(512, *model.observation_space.shape)), dtype=torch.float32)
    with torch.no_grad():
        action, logprob, _, value = agent.get_action_and_value(obs)
    rewards = rng.normal(size=512).astype(np.float32)
    ends = np.zeros(512, np.float32)
    ends[200] = 1  # an episode ends (terminates) at step 200
    buffer = model.rollout_buffer
    buffer.reset()
    for t in range(512):
        start = np.array([t == 0 or ends[t - 1] == 1])
        buffer.add(obs[t : t + 1].numpy(), action[t : t + 1].numpy(), rewards[t : t + 1], start, value[t : t + 1, None], logprob[t : t + 1])
    buffer.compute_returns_and_advantage(last_values=torch.tensor([[0.3]]), dones=np.array([False]))
    advantages, returns = ours.compute_gae(
        rewards[:, None], value.numpy()[:, None], np.array([0.3], np.float32), ends[:, None], np.zeros((512, 1), np.float32), args.gamma, args.gae_lambda
    )  # fmt: skip
    batch = dict(obs=obs, actions=action, logprobs=logprob, values=value, valid=torch.ones(512),
                 advantages=torch.tensor(buffer.advantages[:, 0]), returns=torch.tensor(buffer.returns[:, 0]))  # fmt: skip
    params = [ours.flatten_parameters(agent)]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)
    model.train()
    stats = ours.ppo_update(agent, optimizer, params, batch, args, np.random.default_rng(1))
    mine = agent.state_dict()
    logged = model.logger.name_to_value
    return {
        "preset": preset,
        "epochs": epochs,
        "gae_max_abs_diff": float(np.abs(advantages[:, 0] - buffer.advantages[:, 0]).max()),
        "returns_max_abs_diff": float(np.abs(returns[:, 0] - buffer.returns[:, 0]).max()),
        "weights_max_rel_diff": max(
            ((mine[k] - v.detach().reshape(mine[k].shape)).abs().max() / v.detach().abs().max()).item() for k, v in theirs.items()
        ),
        "policy_loss": [stats["policy_loss"], logged["train/policy_gradient_loss"]],
        "value_loss_ours_x2_vs_sb3": [2 * stats["value_loss"], logged["train/value_loss"]],  # SB3's has no 0.5
    }


def compare_normalisation(preset: str = "zoo-halfcheetah", steps: int = 3500) -> dict:
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    args = ours.PRESETS[preset][1]
    theirs = VecNormalize(DummyVecEnv([lambda: gym.make(args.env_id)]), gamma=args.gamma)
    theirs.seed(5)
    their_obs = theirs.reset()
    envs = ours.make_envs(args.env_id, 1)
    norm = ours.Normalizer(envs.single_observation_space.shape[0], 1, args)
    act_dim, episodes = envs.single_action_space.shape[0], 0
    raw, _ = envs.reset(seed=5)
    norm.update(ours.flat_obs(raw))
    obs_diffs = [np.abs(their_obs - norm.normalize_obs(ours.flat_obs(raw))).max()]
    reward_diffs = []
    rng = np.random.default_rng(0)
    for _ in range(steps):
        action = rng.uniform(-1, 1, (1, act_dim)).astype(np.float32)
        their_obs, their_reward, done, info = theirs.step(action)
        raw, reward, term, trunc, _ = envs.step(action)
        norm.update(ours.flat_obs(raw), reward, np.ones(1, bool), term | trunc)
        my_obs, my_reward = norm.normalize_obs(ours.flat_obs(raw)), norm.scale_reward(reward)
        reward_diffs.append(abs(their_reward[0] - my_reward[0]))
        if done[0]:  # SB3 returns the next episode's first observation, the final one in info; ours steps once more
            episodes += 1
            obs_diffs.append(np.abs(info[0]["terminal_observation"] - my_obs).max())
            raw, reward, term, trunc, _ = envs.step(action)
            norm.update(ours.flat_obs(raw), reward, np.zeros(1, bool), term | trunc)
            my_obs = norm.normalize_obs(ours.flat_obs(raw))
        obs_diffs.append(np.abs(their_obs - my_obs).max())
    return {"env_id": args.env_id, "preset": preset, "steps": steps, "episodes": episodes,
            "obs_max_abs_diff": float(max(obs_diffs)), "reward_max_abs_diff": float(max(reward_diffs))}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    results = {"stamp": stamp(__file__), "update": [compare_update(p, e) for p in ("zoo-halfcheetah", "zoo-walker2d") for e in (1, 20)], "normalisation": compare_normalisation(),
               # Walker2d and Ant terminate (HalfCheetah never does): the reward scaling across terminations
               "normalisation_terminating": [compare_normalisation(p) for p in ("zoo-walker2d", "zoo-ant")]}  # fmt: skip
    print(json.dumps(results, indent=1))
    path = ROOT / "benchmarks" / "results" / "continuous" / "sb3_equivalence.json"
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
