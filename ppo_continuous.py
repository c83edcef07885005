"""PPO for continuous actions (MuJoCo, or any env with a bounded 1-D Box action space) in one file.

    python ppo_continuous.py                                    # HalfCheetah-v5 with CleanRL's defaults
    python ppo_continuous.py zoo-halfcheetah --seed 2           # a preset as the first word, then any flag
    python ppo_continuous.py --help                             # every flag (and the presets)

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Huang et al. 2022 ("The 37 Implementation
Details of PPO").
"""

import copy
import ctypes.util
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Literal, NoReturn, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode


@dataclass
class Args:
    env_id: str = "HalfCheetah-v5"
    """gymnasium id with a bounded 1-D Box action space; `module:id` imports the module first (its registrations)"""
    env_kwargs: str = "{}"
    """keyword arguments of gym.make, a JSON object such as '{"ctrl_cost_weight": 0.2}'"""
    total_timesteps: int = 1000000
    """total environment steps, summed over envs and processes"""
    learning_rate: float = 3e-4
    """learning rate of the Adam optimizer"""
    num_envs: int = 1
    """parallel environments per process"""
    num_steps: int = 2048
    """steps per environment per rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly: iteration i of N runs at lr * (N - i + 1) / N, the last at lr / N"""
    gamma: float = 0.99
    """discount factor (also of the return whose running std scales the rewards)"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation"""
    num_minibatches: int = 32
    """minibatches per epoch (the per-process batch num_envs * num_steps must split evenly)"""
    update_epochs: int = 10
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient epsilon"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values, with --clip-coef"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold"""
    target_kl: Optional[float] = None
    """stop the update epochs once an epoch's mean approximate KL passes this (CleanRL: its last minibatch's; None: never)"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the actor and of the critic MLP (each has its own)"""
    activation: Literal["tanh", "relu", "elu"] = "tanh"
    """activation function of the hidden layers"""
    ortho_init: bool = True
    """orthogonal weights (gain sqrt(2); 0.01 on the mean head, 1 on the value head), zero biases; else torch's default"""
    log_std_init: float = 0.0
    """initial log standard deviation of the Gaussian policy (state-independent parameter)"""
    norm_obs: bool = True
    """normalise observations by their running mean and std, then clip to +-clip_obs"""
    clip_obs: float = 10.0
    """clipping range of the normalised observations"""
    norm_reward: bool = True
    """scale rewards by the running std of the discounted return, then clip to +-clip_reward"""
    clip_reward: float = 10.0
    """clipping range of the scaled rewards"""
    bootstrap_truncation: bool = True
    """bootstrap time-limit truncations from V(final obs); --no-bootstrap-truncation: terminations, as in CleanRL"""

    # Run settings: naming and seeding, device, tracking, run folder and checkpoints, evaluation.
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (each torchrun process adds its rank)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """torch device: `auto` (the CPU: an MLP on vector observations runs faster there than on a GPU), `cuda`, `cuda:1`..."""
    num_threads: int = 0
    """torch CPU threads per process; 0 picks from the work: 1 for an MLP (more only add overhead)"""
    track: bool = False  # optional: wandb
    """if toggled, log to Weights and Biases (metrics land in runs/{run_name}/metrics.jsonl either way)"""
    wandb_project_name: str = "ppo"  # optional: wandb
    """the wandb project name (CleanRL's runs: cleanRL)"""
    wandb_entity: Optional[str] = None  # optional: wandb
    """the wandb entity (team or user)"""
    capture_video: bool = False  # optional: video, evaluation
    """if toggled, record the first evaluation episode to runs/{run_name}/videos/ (no display: EGL, MUJOCO_GL=egl)"""
    runs_dir: str = "runs"
    """folder that holds runs/{run_name}/ (metrics, args, checkpoints, videos)"""
    save_every: int = 0
    """write a checkpoint every this many iterations (0: only at the end and on Ctrl-C or SIGTERM)"""
    resume: Optional[str] = None  # optional: resume
    """a checkpoint.pt to continue, in its folder, with its hyperparameters (it unpickles: for your own runs)"""
    eval_episodes: int = 10  # optional: evaluation
    """episodes played by the final policy after training (0: no evaluation)"""
    eval_stochastic: bool = False  # optional: evaluation
    """if toggled, evaluation samples actions; by default it acts with the policy's mean"""
    eval_checkpoint: Optional[str] = None  # optional: evaluation
    """evaluate this checkpoint's policy for --eval-episodes and exit (weights_only=True: safe for shared files)"""
    preset: tyro.conf.Suppress[str] = "cleanrl"
    """the preset this run started from (the first word of the command line; recorded in args.json)"""


# Presets of hyperparameters, named by the optional first word of the command line; every flag overrides.
# zoo-*: rl-baselines3-zoo's hyperparams/ppo.yml for the MuJoCo v4 tasks, on v5 (SB3's n_steps is --num-steps, its
# batch_size the minibatch size, constant lr, no value clipping; its VecNormalize discounts with gamma, as here). SB3's
# value loss has no 0.5 factor, so its vf_coef is doubled (HalfCheetah's 0.58096 is 1.16192). No tuned Ant entry:
# zoo-ant is the zoo's mujoco-defaults (SB3's PPO defaults with normalize: true).
ZOO = dict(anneal_lr=False, num_steps=512, clip_vloss=False)  # what the tuned zoo entries share
ZOO_256_RELU = dict(ZOO, hidden_sizes=(256, 256), activation="relu", log_std_init=-2.0, ortho_init=False)
PRESETS: dict[str, tuple[str, Args]] = {
    "cleanrl": ("CleanRL's ppo_continuous_action.py defaults (the default preset)", Args()),
    "zoo-halfcheetah": ("rl-baselines3-zoo's tuned HalfCheetah (256-256 ReLU, log std -2, 512-step rollouts)", Args(
        env_id="HalfCheetah-v5", learning_rate=2.0633e-5, num_minibatches=8, update_epochs=20, gamma=0.98,
        gae_lambda=0.92, clip_coef=0.1, ent_coef=0.000401762, vf_coef=1.16192, max_grad_norm=0.8, **ZOO_256_RELU)),
    "zoo-hopper": ("rl-baselines3-zoo's tuned Hopper (256-256 ReLU, log std -2, 512-step rollouts)", Args(
        env_id="Hopper-v5", learning_rate=9.80828e-5, num_minibatches=16, update_epochs=5, gamma=0.999,
        gae_lambda=0.99, clip_coef=0.2, ent_coef=0.00229519, vf_coef=1.671342, max_grad_norm=0.7, **ZOO_256_RELU)),
    "zoo-walker2d": ("rl-baselines3-zoo's tuned Walker2d (64-64 tanh, 512-step rollouts, 20 epochs)", Args(
        env_id="Walker2d-v5", learning_rate=5.05041e-5, num_minibatches=16, update_epochs=20, gamma=0.99,
        gae_lambda=0.95, clip_coef=0.1, ent_coef=0.000585045, vf_coef=1.743846, max_grad_norm=1.0, **ZOO)),
    "zoo-ant": ("rl-baselines3-zoo's Ant (SB3's PPO defaults, normalised: constant lr 3e-4, minibatches of 64)", Args(
        env_id="Ant-v5", anneal_lr=False, clip_vloss=False, vf_coef=1.0)),
}  # fmt: skip


# Environment. Vector envs autoreset in NEXT_STEP mode: the step that ends an episode returns the true final
# observation; the next step() resets that sub-env, ignores its action and returns (first obs, reward 0, no
# termination). Those reset steps are masked out of the loss and of the return statistics (their observation, an
# episode's first, counts in the observation statistics).


def make_envs(env_id: str, num_envs: int, env_kwargs: str = "{}", render: bool = False) -> gym.vector.VectorEnv:
    """Synchronous vector env (MuJoCo steps take microseconds, less than a subprocess round trip); what the network sees
    of a Dict or Tuple observation: one vector, gymnasium's flatten_space and flatten (flatten_dict_and_tuple_observations)."""
    kwargs = {**json.loads(env_kwargs), **({"render_mode": "rgb_array"} if render else {})}
    wrappers = [flatten_dict_and_tuple_observations]
    wrappers.append(WithoutStepInfo)  # optional: fast-path
    return gym.make_vec(env_id, num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP}, wrappers=wrappers, **kwargs)


def flat_obs(obs: np.ndarray) -> np.ndarray:
    """[N, *obs_shape] -> [N, obs_dim] float64 (what the normaliser reads)."""
    return obs.reshape(obs.shape[0], -1).astype(np.float64)


# Network: separate actor and critic MLPs, a diagonal Gaussian policy with a state-independent log std (Gaussian,
# with the PPO maths below).

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (implementation detail 2)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, out_dim: int, hidden_sizes: Sequence[int], activation: str, out_std: float, ortho_init: bool) -> nn.Sequential:
    def linear(fan_in: int, fan_out: int, std: float = np.sqrt(2)) -> nn.Module:
        return layer_init(nn.Linear(fan_in, fan_out), std) if ortho_init else nn.Linear(fan_in, fan_out)

    layers, width = [], in_dim
    for hidden in hidden_sizes:
        layers += [linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    return nn.Sequential(*layers, linear(width, out_dim, std=out_std))


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_space: gym.spaces.Box, hidden_sizes: Sequence[int], activation: str, log_std_init: float, ortho_init: bool = True):  # fmt: skip
        super().__init__()
        act_dim = action_space.shape[0]
        for bound in ("low", "high"):  # the action bounds, for a bounded distribution
            self.register_buffer(bound, torch.as_tensor(getattr(action_space, bound), dtype=torch.float32), persistent=False)
        self.actor_mean = mlp(obs_dim, act_dim, hidden_sizes, activation, 0.01, ortho_init)
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), float(log_std_init)))
        self.critic = mlp(obs_dim, 1, hidden_sizes, activation, 1.0, ortho_init)

    def distribution(self, obs: torch.Tensor) -> tuple[torch.distributions.Distribution, torch.Tensor]:
        """The policy's one definition: the actions' distribution [B, A] (a torch.distributions object, log_prob and entropy
        summed over the action dimensions) and the values [B]. Rollout, update and evaluation ask it, by the methods below."""
        mean = self.actor_mean(obs)
        return Gaussian(mean, self.actor_logstd), self.critic(obs).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """(action, its log-prob [B], entropy [B], value [B]); samples the action when none is given."""
        dist, value = self.distribution(obs)
        action = dist.sample() if action is None else action
        return action, dist.log_prob(action), dist.entropy(), value

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The distribution's mode, for evaluation."""
        return self.distribution(obs)[0].mode


def build_agent(args: Args, device: torch.device) -> tuple[Agent, int, gym.spaces.Box]:
    """The agent for args.env_id; also the flat observation size and the action space."""
    obs_space, action_space = resolve_env(args.env_id, args.env_kwargs)
    obs_dim = int(np.prod(obs_space.shape))
    agent = Agent(obs_dim, action_space, args.hidden_sizes, args.activation, args.log_std_init, args.ortho_init)
    return agent.to(device), obs_dim, action_space


# PPO maths: small pure functions, checked by the tests against naive reference code.

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class Gaussian(torch.distributions.Distribution):
    """Diagonal Gaussian over the action vector (batch [B], event [A]) from means and log stds, its log-probs and
    entropies summed over the action dimensions. Any torch.distributions object may stand in its place."""

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor):
        self.loc, self.log_std = mean, log_std
        super().__init__(mean.shape[:-1], mean.shape[-1:], validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.loc + self.log_std.exp() * torch.randn_like(self.loc)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return (-0.5 * ((actions - self.loc) * torch.exp(-self.log_std)) ** 2 - self.log_std - LOG_SQRT_2PI).sum(-1)

    def entropy(self) -> torch.Tensor:  # the mean plays no part
        return (0.5 + LOG_SQRT_2PI + self.log_std.expand_as(self.loc)).sum(-1)

    @property
    def mode(self) -> torch.Tensor:
        return self.loc


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, next_value: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
    gamma: float, gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Advantages and returns of a [T, N] rollout, step t being the transition obs[t] -> obs[t+1].

    values[t] = V(obs[t]); next_value = V(obs after the last step). A termination cuts both the bootstrap
    and the trace; a truncation cuts only the trace, its target r + gamma * V(obs[t+1]) bootstrapping
    from the final observation. (In numpy: this loop of small ops runs several times faster than in torch.)
    """
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(next_value)
    next_values = np.concatenate([values[1:], next_value[None]])
    deltas = rewards + gamma * next_values * (1.0 - terminated) - values  # the TD errors, all steps at once
    decays = gamma * gae_lambda * (1.0 - np.maximum(terminated, truncated))
    for t in reversed(range(rewards.shape[0])):
        last = deltas[t] + decays[t] * last
        advantages[t] = last
    return advantages, advantages + values


def policy_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """Per-sample clipped surrogate loss, the negated min of the unclipped and clipped objectives."""
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef))


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_coef: Optional[float]) -> torch.Tensor:
    """Per-sample 0.5 * squared error; with clip_coef, the max of the plain and clipped errors."""
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped
    clipped = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
    return 0.5 * torch.max(unclipped, (clipped - returns) ** 2)


def kl_estimators(logratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample estimators of KL(old || new) from log(new/old) of samples drawn from old:
    k1 = -log r (unbiased, noisy) and k3 = (r - 1) - log r (unbiased, never negative)."""
    ratio = logratio.exp()
    return -logratio, (ratio - 1) - logratio


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    """1 - Var[returns - values] / Var[returns]; nan when the returns do not vary."""
    var_returns = np.var(returns)
    return float("nan") if var_returns == 0 else float(1 - np.var(returns - values) / var_returns)


class RunningMeanStd:
    """Mean and variance of a stream of rows, merged batch by batch (Chan et al., 1979), from gymnasium's and SB3's
    start: mean 0, variance 1, count 1e-4. Shape () holds numpy scalars (cheaper than arrays)."""

    def __init__(self, shape: tuple = (), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)[()]
        self.var = np.ones(shape, np.float64)[()]
        self.count = epsilon

    def update_from_moments(self, mean: np.ndarray, var: np.ndarray, count: float) -> None:
        w = count / (self.count + count)  # the batch's weight in the merged statistics
        delta = mean - self.mean
        self.var = self.var * (1 - w) + var * w + delta * delta * (w * (1 - w))
        self.mean = self.mean + delta * w
        self.count += count


class Normalizer:
    """Running observation normalisation and reward scaling (gymnasium's NormalizeObservation and NormalizeReward),
    here so the statistics are checkpointed and frozen for evaluation. Every observation returned counts once:
    obs -> clip((obs - mean) / sqrt(var + 1e-8), +-clip_obs). A per-env discounted return G = gamma * G + r, restarted
    at every episode end, feeds the reward statistics: r -> clip(r / sqrt(Var[G] + 1e-8), +-clip_reward). A reset
    step adds its observation (an episode's first), not its reward. Under torchrun the batch moments are summed over processes: all hold the same statistics."""

    def __init__(self, obs_dim: int, num_envs: int, args: Args, distributed: bool = False):
        self.norm_obs, self.clip_obs = args.norm_obs, args.clip_obs
        self.norm_reward, self.clip_reward, self.gamma = args.norm_reward, args.clip_reward, args.gamma
        self.distributed = distributed
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.ret_rms = RunningMeanStd()
        self.returns = np.zeros(num_envs)  # this process's discounted returns G

    def update(self, obs: np.ndarray, reward: Optional[np.ndarray] = None, valid: Optional[np.ndarray] = None, ended=None) -> None:
        """Add one step: obs [N, obs_dim] from reset or step; with reward, its rewards, valid (no reset step), ended."""
        batches = []
        if self.norm_obs:
            batches.append((self.obs_rms, obs))
        if self.norm_reward and reward is not None:
            self.returns = self.returns * self.gamma + reward  # on a reset step: 0 * gamma + 0
            batches.append((self.ret_rms, self.returns[valid]))
        # Count, sum and sum of squares of the deviations from the running mean (the same on every process):
        # they add up across processes, and the variance suffers little cancellation.
        moments = []
        for rms, x in batches:
            deviation = x - rms.mean
            moments.append((len(x), deviation.sum(0), (deviation * deviation).sum(0)))
        if self.distributed and moments:
            moments = sum_moments_over_processes(moments)
        for (rms, _), (n, s1, s2) in zip(batches, moments):
            if n:
                shift = s1 / n
                rms.update_from_moments(rms.mean + shift, np.maximum(s2 / n - shift * shift, 0.0), n)
        if ended is not None:
            self.returns[ended] = 0.0

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        if not self.norm_obs:
            return obs.astype(np.float32)
        normalized = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8)
        return np.minimum(np.maximum(normalized, -self.clip_obs), self.clip_obs).astype(np.float32)

    def scale_reward(self, reward: np.ndarray) -> np.ndarray:
        if not self.norm_reward:
            return reward
        scaled = reward / np.sqrt(self.ret_rms.var + 1e-8)
        return np.minimum(np.maximum(scaled, -self.clip_reward), self.clip_reward)


def ppo_update(
    agent: Agent, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], batch: dict[str, torch.Tensor], args: Args,
    rng: np.random.Generator, world_size: int = 1, guard: Optional["NonFiniteGuard"] = None,
) -> dict[str, float]:  # fmt: skip
    """args.update_epochs epochs over the batch (keys obs, actions, logprobs, values, advantages, returns, valid) in
    shuffled minibatches; steps with valid 0 weigh nothing. Returns the losses and diagnostics, each the mean over all
    minibatches, skipped_steps (not stepped: non-finite), first_max_logratio (first minibatch, before any step: ~0)."""
    batch_size, guard = len(batch["obs"]), guard or NonFiniteGuard()
    stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
    for epoch in range(args.update_epochs):
        # The epoch's minibatches in one gather, [num_minibatches, minibatch_size]; a mean over a minibatch's
        # valid steps is a sum weighted by valid / count.
        perm = torch.as_tensor(rng.permutation(batch_size), device=batch["obs"].device).view(args.num_minibatches, -1)
        mb = {k: v[perm] for k, v in batch.items()}
        count = mb["valid"].sum(1, keepdim=True)
        weights = mb["valid"] / count.clamp(min=1)
        advantages = mb["advantages"]
        if args.norm_adv:  # by the unbiased std of the valid steps, as torch.std, CleanRL and SB3
            adv_mean = (advantages * weights).sum(1, keepdim=True)
            adv_std = (((advantages - adv_mean) ** 2 * mb["valid"]).sum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
            advantages = (advantages - adv_mean) / (adv_std + 1e-8)
        logratios = []
        for i in range(args.num_minibatches):
            _, newlogprob, entropy, new_value = agent.get_action_and_value(mb["obs"][i], mb["actions"][i])
            logratio = newlogprob - mb["logprobs"][i]
            pg_loss = (policy_loss(logratio.exp(), advantages[i], args.clip_coef) * weights[i]).sum()
            v_clip = args.clip_coef if args.clip_vloss else None
            v_loss = (value_loss(new_value, mb["values"][i], mb["returns"][i], v_clip) * weights[i]).sum()
            entropy = (entropy * weights[i]).sum()
            loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
            logratios.append(logratio.detach())

            optimizer.zero_grad()
            loss.backward()
            average_gradients(params, world_size)  # the mean gradient over processes  # optional: torchrun
            grad_norm = clip_grad_norm(params, args.max_grad_norm)  # nn.utils.clip_grad_norm_, less overhead
            if guard.skip(loss, grad_norm, optimizer, epoch, i):  # non-finite: no step (counted; 10 in a row stop)
                continue
            optimizer.step()
            stats["policy_loss"].append(pg_loss.detach())
            stats["value_loss"].append(v_loss.detach())
            stats["entropy"].append(entropy.detach())
        guard.check_weights(params, epoch)
        with torch.no_grad():  # per minibatch, from the log-ratios before its optimizer step
            logratio = torch.stack(logratios)
            if epoch == 0:  # before any optimizer step of this update
                first_max_logratio = (logratio[0].abs() * mb["valid"][0]).max()
            old_kl, kl = kl_estimators(logratio)
            stats["old_approx_kl"].append((old_kl * weights).sum(1))
            stats["approx_kl"].append((kl * weights).sum(1))
            stats["clipfrac"].append((((logratio.exp() - 1.0).abs() > args.clip_coef).float() * weights).sum(1))
        if args.target_kl is not None and mean_over_processes(stats["approx_kl"][-1].mean(), world_size) > args.target_kl:
            break
    means = {k: torch.cat([x.reshape(-1) for x in v]).mean().item() if v else float("nan") for k, v in stats.items()}  # skipped steps: none
    return {**means, "skipped_steps": guard.take_count(), "first_max_logratio": first_max_logratio.item()}


def train(args: Args) -> None:
    ckpt, start_iteration, global_step, distributed, rank, world_size = None, 1, 0, False, 0, 1  # a new run, one process
    device, device_reason = pick_device(args.device, gpu_pays=False)
    distributed, rank, world_size = init_distributed(device)  # optional: torchrun
    set_num_threads(args.num_threads, small_network=True)
    if args.eval_checkpoint is not None:  # optional: evaluation
        return evaluate_checkpoint(args, device)
    if args.resume is not None:  # optional: resume
        ckpt = load_checkpoint(args.resume, "--resume")
        args = resumed_args(args, ckpt)
    use_offscreen_rendering(args.capture_video)  # optional: video, evaluation
    batch_size, minibatch_size, num_iterations = check_args(args, world_size)

    # Each process its own env seeds and action noise; all start from rank 0's parameters (broadcast below).
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed + rank)  # action noise and minibatch shuffles

    agent, obs_dim, action_space = build_agent(args, device)
    act_dim, low, high = action_space.shape[0], action_space.low, action_space.high
    params = [flatten_parameters(agent)]  # one tensor: Adam, the gradient clip and the all-reduce act once each
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=device.type in ("cpu", "cuda"))
    broadcast_from_rank0(params, distributed)  # optional: torchrun
    envs = make_envs(args.env_id, args.num_envs, args.env_kwargs)
    normalizer = Normalizer(obs_dim, args.num_envs, args, distributed)
    raw_obs, _ = envs.reset(seed=args.seed + rank * args.num_envs)
    normalizer.update(flat_obs(raw_obs))
    carry = Carry.start(normalizer.normalize_obs(flat_obs(raw_obs)))
    if ckpt is not None:  # optional: resume
        start_iteration, global_step, carry = restore(ckpt, agent, optimizer, normalizer, envs, rng, raw_obs, rank, world_size)
    run = Run(args, ckpt, rank)
    rollout_policies, guard = RolloutPolicies(agent, device, carry.next_obs), NonFiniteGuard(run, start_iteration)
    guard.check_env_step(flat_obs(raw_obs), np.zeros(0), global_step)  # the reset's observations too
    print_plan(run, f"{device} ({device_reason}), {torch.get_num_threads()} torch thread(s)", world_size, batch_size, minibatch_size, num_iterations, ckpt)
    stop_requested = install_stop_handlers()

    # Rollout storage; step t is the transition obs[t] -> obs[t+1]. The rollout runs in numpy and its batch
    # moves to the device once per iteration.
    obs = np.zeros((args.num_steps, args.num_envs, obs_dim), dtype=np.float32)
    actions = np.zeros((args.num_steps, args.num_envs, act_dim), dtype=np.float32)
    logprobs, values, rewards, terminated, truncated, valid = (np.zeros((args.num_steps, args.num_envs), np.float32) for _ in range(6))

    start_time, start_step = time.time(), global_step
    for iteration in range(start_iteration, num_iterations + 1):
        guard.iteration = iteration
        # 1. Anneal the learning rate linearly (iteration i of N at lr * (N - i + 1) / N).
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # 2. Rollout: num_steps steps of num_envs envs with the current policy. The sampled action is stored and
        # trained on; the env gets it clipped to the action bounds (a bounded distribution's actions pass unchanged).
        policy = rollout_policies.pick(carry.next_obs)  # numpy source derived from the agent (checked on it), or the agent
        for step in range(args.num_steps):
            global_step += args.num_envs * world_size
            obs[step] = carry.next_obs
            valid[step] = real = ~carry.next_reset  # a reset step is no transition of the policy's
            actions[step], logprobs[step], values[step] = policy.act(carry.next_obs, rng)
            raw_obs, reward, term, trunc, _ = envs.step(np.clip(actions[step], low, high))
            ended = term | trunc
            carry.episode_return += reward
            carry.episode_length += real
            raw_flat = flat_obs(raw_obs)
            guard.check_env_step(raw_flat, reward, global_step)  # a nan or inf from the simulator stops the run
            normalizer.update(raw_flat, reward, real, ended)
            carry.next_obs = normalizer.normalize_obs(raw_flat)
            if not args.bootstrap_truncation:
                term = ended
            rewards[step], terminated[step], truncated[step] = normalizer.scale_reward(reward), term, trunc & ~term
            carry.next_reset = ended
            for i in np.flatnonzero(ended):
                run.log_episode(global_step, float(carry.episode_return[i]), int(carry.episode_length[i]))
            carry.episode_return[ended], carry.episode_length[ended] = 0.0, 0

        # 3. Generalized advantage estimation, bootstrapped from the observation after the rollout.
        next_value = policy.value(carry.next_obs)
        advantages, returns = compute_gae(rewards, values, next_value, terminated, truncated, args.gamma, args.gae_lambda)

        # 4. The clipped update: update_epochs epochs of shuffled minibatches.
        rollout = dict(obs=obs, actions=actions, logprobs=logprobs, values=values, advantages=advantages, returns=returns, valid=valid)
        batch = {k: torch.as_tensor(v, device=device).flatten(0, 1) for k, v in rollout.items()}
        stats = ppo_update(agent, optimizer, params, batch, args, rng, world_size, guard)
        rollout_policies.check_on_policy(stats.pop("first_max_logratio"), iteration)

        # 5. Log, checkpoint, stop when asked.
        metrics = {f"losses/{k}": v for k, v in stats.items()}
        metrics["losses/explained_variance"] = explained_variance(values[valid == 1], returns[valid == 1])
        metrics["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        metrics["charts/SPS"] = int((global_step - start_step) / (time.time() - start_time))
        run.log(global_step, metrics)
        run.print_progress(iteration, num_iterations, global_step, metrics["charts/SPS"])
        stop = stop_requested()  # a checkpoint each iteration, in memory: on disk when asked, at the end, or on a crash
        write = stop or iteration == num_iterations or (args.save_every and iteration % args.save_every == 0)
        save_checkpoint(run, iteration, global_step, agent, optimizer, normalizer, carry, rng, envs, distributed, write)
        if stop:
            envs.close()
            exit_interrupted(run, global_step, distributed)
    envs.close()
    if distributed:  # optional: torchrun
        check_same_on_all_ranks(params, normalizer, rank, world_size)
    if rank == 0 and args.eval_episodes > 0:  # optional: evaluation
        evaluate_final_policy(agent, normalizer, args, run, global_step, device)
    run.finish()
    leave_process_group(distributed)  # optional: torchrun


# Infrastructure: nothing below changes what PPO computes but what the calls above name: flatten_dict_and_tuple_observations
# (what the network sees); the fast path samples the same policy with other random numbers. Delete a section headed
# `# --- optional: NAME ---` and each line marked `# optional: NAME`: the copy runs.

# --- Run folder and logging ---
class Run:
    """The run folder, metrics.jsonl and wandb (--track), by rank 0 (elsewhere the methods do nothing): {runs_dir}/{run_name}/, or
    for a resumed run the folder of its checkpoint, its metrics cut back to what they held at the checkpoint."""

    def __init__(self, args: Args, ckpt: Optional[dict], rank: int):
        self.args, self.rank = args, rank
        self.run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.run_dir, self.wandb_id = os.path.join(args.runs_dir, self.run_name), None
        if ckpt is not None:  # optional: resume
            self.run_name, self.run_dir, self.wandb_id = ckpt["run_name"], os.path.dirname(os.path.abspath(args.resume)), ckpt["wandb_id"]
        self.file = self.wandb_run = self.last_checkpoint = None
        self.recent_returns = deque(maxlen=20)
        if rank != 0:
            return
        sys.excepthook = self.checkpoint_on_crash
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if ckpt is not None and os.path.exists(metrics_path):  # optional: resume
            with open(metrics_path, "r+") as f:
                f.truncate(ckpt["metrics_offset"])
        if args.track:  # optional: wandb
            import wandb

            self.wandb_run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=self.run_name,
                                        id=self.wandb_id, resume="allow", dir=self.run_dir, save_code=True)  # fmt: skip
            self.wandb_run.define_metric("global_step")
            self.wandb_run.define_metric("*", step_metric="global_step")
            self.wandb_id = self.wandb_run.id
        self.file = open(metrics_path, "a")

    def log(self, global_step: int, metrics: dict) -> None:
        if self.file is None:
            return
        record = {"global_step": global_step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:  # optional: wandb
            self.wandb_run.log(record)

    def log_episode(self, global_step: int, episodic_return: float, episodic_length: int) -> None:
        self.recent_returns.append(episodic_return)
        self.log(global_step, {"charts/episodic_return": episodic_return, "charts/episodic_length": episodic_length})

    def print_progress(self, iteration: int, num_iterations: int, global_step: int, sps: int) -> None:
        if self.file is None or (iteration % max(1, num_iterations // 100) and iteration != num_iterations):
            return
        recent = f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "n/a"
        print(f"iteration {iteration}/{num_iterations} | global_step {global_step:,} | SPS {sps:,} "
              f"| episodic_return (last {len(self.recent_returns)}) {recent}", flush=True)  # fmt: skip

    def checkpoint_on_crash(self, kind: type, error: BaseException, traceback) -> None:
        """An exception out of train() (the env's step or reset, out of memory, a bug): its traceback, then the last
        completed iteration's checkpoint written and named on the last line (exit status 1)."""
        sys.__excepthook__(kind, error, traceback)
        iteration, global_step, path = (self.last_checkpoint or (0, 0, None))[:2] + (self.last_checkpoint and write_checkpoint(self),)
        kept = f"checkpoint of iteration {iteration} (global_step {global_step:,}) in {path}; continue with --resume {path}" if path else "no iteration completed, no checkpoint"
        print(f"error: {kind.__name__}: {str(error).splitlines()[0] if str(error) else ''}; {kept}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.file is None:
            return
        sys.excepthook = sys.__excepthook__
        if self.wandb_run is not None:  # optional: wandb
            self.wandb_run.finish()
        files = ["metrics.jsonl", "args.json", "checkpoint.pt"] + ["videos/"] * os.path.isdir(os.path.join(self.run_dir, "videos"))
        print(f"done: {self.run_dir} ({', '.join(files)})")


def print_plan(run: Run, device: str, world_size: int, batch_size: int, minibatch_size: int, num_iterations: int, ckpt: Optional[dict]) -> None:
    """Rank 0 says what the run will do (a preset: the flags it set), and how many steps when --total-timesteps is no whole number of batches."""
    args, steps, base = run.args, num_iterations * batch_size * world_size, PRESETS["cleanrl"][1]
    if run.rank != 0:
        return
    preset = ", ".join(f"--{f.name.replace('_', '-')} {getattr(args, f.name)}" for f in fields(Args) if f.name != "preset" and getattr(PRESETS[args.preset][1], f.name) != getattr(base, f.name))
    resumed = f"resumed from {args.resume} at iteration {ckpt['iteration']}; " if ckpt else ""
    print(f"{run.run_name}: {resumed}{f'preset {args.preset} ({preset}); ' if args.preset != 'cleanrl' else ''}{num_iterations} iterations of {batch_size} steps x {world_size} process(es), "
          f"{args.num_minibatches} minibatches of {minibatch_size}, {args.update_epochs} epochs, device {device}")  # fmt: skip
    if steps != args.total_timesteps:
        print(f"note: --total-timesteps {args.total_timesteps:,} is not a whole number of batches of "
              f"{batch_size * world_size:,} steps; training {steps:,} steps ({num_iterations} iterations)")  # fmt: skip


@dataclass
class Carry:
    """What one rollout hands to the next; a checkpoint keeps it whole (beside the RNG and env states)."""

    next_obs: np.ndarray  # normalised observations the next step acts on, [N, obs_dim]
    next_reset: np.ndarray  # True: this sub-env's next step is a reset step, no transition of the policy's
    episode_return: np.ndarray  # raw return and length of each env's episode in progress
    episode_length: np.ndarray

    @classmethod
    def start(cls, next_obs: np.ndarray) -> "Carry":
        n = len(next_obs)
        return cls(next_obs, np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n, dtype=np.int64))


# --- Checkpoints ---
CHECKPOINT_KEYS = {"args", "run_name", "iteration", "global_step", "wandb_id", "metrics_offset", "agent", "optimizer", "normalizer", "resume_state"}  # fmt: skip


def save_checkpoint(
    run: Run, iteration: int, global_step: int, agent: Agent, optimizer: torch.optim.Optimizer, normalizer: Normalizer,
    carry: Carry, rng: np.random.Generator, envs: gym.vector.SyncVectorEnv, distributed: bool, write: bool = True,
) -> None:  # fmt: skip
    """Rank 0 serialises the checkpoint, never with a non-finite tensor, keeps it (run.last_checkpoint: a crash writes
    it) and with write writes it to run_dir/checkpoint.pt. Everything but "resume_state" is tensors and plain values;
    "resume_state" holds each process's carried state, RNGs and pickled envs."""
    mine = {"carry": asdict(carry), "rng": rng.bit_generator.state, "global_rngs": global_rng_state(), "envs": env_state(envs), "returns": normalizer.returns}  # fmt: skip
    ranks = [mine]
    if distributed:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if run.rank != 0:
        return
    state = {
        "args": asdict(run.args), "run_name": run.run_name, "iteration": iteration, "global_step": global_step, "wandb_id": run.wandb_id,
        "metrics_offset": run.file.tell(), "agent": agent.state_dict(), "optimizer": optimizer.state_dict(),
        "normalizer": normalizer_state(normalizer), "resume_state": pickle.dumps(ranks),  # normalizer: the same on every process
    }  # fmt: skip
    for name in non_finite_entries(state)[:1]:
        stop_non_finite(run, name, f"iteration {iteration} (the checkpoint it would write)")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    run.last_checkpoint = (iteration, global_step, buffer.getvalue())
    if write:
        write_checkpoint(run)


def write_checkpoint(run: Run) -> str:
    """run.last_checkpoint to run_dir/checkpoint.pt atomically (tmp + fsync + rename); returns the path."""
    path = os.path.join(run.run_dir, "checkpoint.pt")
    with open(f"{path}.tmp", "wb") as f:
        f.write(run.last_checkpoint[2])
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old checkpoint or the new one whole
    os.replace(f"{path}.tmp", path)
    return path


def normalizer_state(normalizer: Normalizer) -> dict:
    """The normalisation statistics as tensors and floats only, so a checkpoint loads with weights_only=True."""
    return {
        name: {"mean": torch.tensor(rms.mean), "var": torch.tensor(rms.var), "count": float(rms.count)}
        for name, rms in (("obs_rms", normalizer.obs_rms), ("ret_rms", normalizer.ret_rms))
    }  # fmt: skip


def global_rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def load_normalizer_state(normalizer: Normalizer, state: dict) -> None:
    for name, values in state.items():
        rms = getattr(normalizer, name)
        rms.mean, rms.var, rms.count = values["mean"].numpy().copy()[()], values["var"].numpy().copy()[()], values["count"]


def load_checkpoint(path: str, flag: str) -> dict:
    """The checkpoint without "resume_state" unpickled: tensors and plain values only (weights_only=True)."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: no such file; pass the checkpoint.pt of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{flag} {path} is not a checkpoint of this version of ppo_continuous.py ({type(e).__name__})")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        fail(f"{flag} {path} is not a checkpoint of this version of ppo_continuous.py")
    try:
        Args(**ckpt["args"])
    except TypeError:
        fail(f"{flag} {path}: its arguments do not fit this version of ppo_continuous.py")
    return ckpt


# --- optional: resume ---
def resumed_args(args: Args, ckpt: dict) -> Args:
    """Hyperparameters come from the checkpoint; only where and how this process runs may change."""
    if set(ckpt["args"]) != {f.name for f in fields(Args)}:  # its carried state is another version's too
        fail(f"--resume {args.resume} was written by another version of {os.path.basename(__file__)}; start anew")
    keep = {"device", "num_threads", "resume", "save_every", "track"}
    return Args(**{**ckpt["args"], **{k: v for k, v in asdict(args).items() if k in keep}})


def restore(
    ckpt: dict, agent: Agent, optimizer: torch.optim.Optimizer, normalizer: Normalizer, envs: gym.vector.SyncVectorEnv,
    rng: np.random.Generator, raw_obs: np.ndarray, rank: int, world_size: int,
) -> tuple[int, int, Carry]:  # fmt: skip
    """Load a --resume checkpoint: (start_iteration, global_step, carry); another number of processes starts RNGs and envs afresh."""
    try:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError):
        fail("--resume: the checkpoint's network or optimizer state does not fit this script's network; start a new run")
    load_normalizer_state(normalizer, ckpt["normalizer"])
    ranks = pickle.loads(ckpt["resume_state"])
    if len(ranks) == world_size:
        mine = ranks[rank]
        set_global_rng_state(mine["global_rngs"])
        rng.bit_generator.state = mine["rng"]
        restore_env_state(envs, mine["envs"])
        normalizer.returns = mine["returns"]
        carry = Carry(**mine["carry"])
    else:
        carry = Carry.start(normalizer.normalize_obs(flat_obs(raw_obs)))  # with the checkpoint's statistics
        if rank == 0:
            print(f"note: checkpoint has {len(ranks)} processes, this run {world_size}; RNGs and envs start fresh")
    return ckpt["iteration"] + 1, ckpt["global_step"], carry


def set_global_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# --- Signals ---
def install_stop_handlers() -> Callable[[], bool]:
    """SIGINT (Ctrl-C) and SIGTERM ask to stop: the iteration finishes, a checkpoint is written, exit 130; a second Ctrl-C
    interrupts at once. Returns stop_requested(): whether any process was asked (a collective under torchrun)."""
    requested = False

    def request_stop(signum, frame):
        nonlocal requested
        requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def stop_requested() -> bool:
        if dist.is_initialized():  # optional: torchrun
            return bool(mean_over_processes(torch.tensor(float(requested)), dist.get_world_size()).item())  # CPU: gloo
        return requested

    return stop_requested


def exit_interrupted(run: Run, global_step: int, distributed: bool) -> NoReturn:
    if run.rank == 0:
        path = os.path.join(run.run_dir, "checkpoint.pt")
        print(f"interrupted: checkpoint at global_step {global_step:,} in {path}; continue with --resume {path}", flush=True)
    leave_process_group(distributed)  # optional: torchrun
    sys.exit(130)


# --- Device and processes ---
def pick_device(name: str, gpu_pays: bool) -> tuple[torch.device, str]:
    """The torch device and why. `auto` takes a GPU (cuda, then mps) only when gpu_pays (a small MLP's launches and copies cost
    more than it saves). Under torchrun, `cuda` means the GPU of this process's local rank."""
    reason = f"--device {name}"
    if name == "auto":
        name, reason = auto_device(gpu_pays, torch.cuda.is_available(), torch.backends.mps.is_available())
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # optional: torchrun
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            fail(
                f"--device {name}: torchrun started local rank {local_rank} but only {torch.cuda.device_count()} GPU(s)"
                " are visible; start one process per GPU or pass --device cpu"
            )
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {name} is not usable here ({str(e).splitlines()[0]}); try --device auto")
    return device, reason


def auto_device(gpu_pays: bool, cuda: bool, mps: bool) -> tuple[str, str]:
    """What `--device auto` picks, given whether a GPU pays off for this network and which GPUs are present."""
    gpu = "cuda" if cuda else "mps" if mps else None
    if gpu is None:
        return "cpu", "auto: no GPU"
    if gpu_pays:
        return gpu, "auto: the network gains from a GPU"
    return "cpu", f"auto: an MLP on vector observations runs faster on the CPU than on {gpu}; --device {gpu} to override"


def set_num_threads(num_threads: int, small_network: bool) -> None:
    """--num-threads, or when 0 one thread for a small network (more add overhead, and stall when a core is busy)."""
    if num_threads or small_network:
        torch.set_num_threads(num_threads or 1)


def mean_over_processes(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """In place: the mean of tensor over the torchrun processes."""
    if world_size > 1:
        dist.all_reduce(tensor)
        tensor /= world_size
    return tensor


def sum_moments_over_processes(moments: list[tuple]) -> list[tuple]:
    """[(count, sum, sum of squares), ...] of this process -> their sums over all processes, in one all-reduce."""
    flat = torch.as_tensor(np.concatenate([np.concatenate([[n], np.ravel(s1), np.ravel(s2)]) for n, s1, s2 in moments]))
    dist.all_reduce(flat)  # a CPU tensor: the gloo half of the process group on a GPU
    shapes = [np.shape(s1) for _, s1, _ in moments]
    parts = np.split(flat.numpy(), np.cumsum([1 + 2 * math.prod(shape) for shape in shapes])[:-1])
    return [(p[0], *(x.reshape(shape)[()] for x in np.split(p[1:], 2))) for p, shape in zip(parts, shapes)]


# --- optional: torchrun ---
def distributed_backend(device: torch.device) -> str:
    """On a GPU, nccl for CUDA tensors and gloo for CPU ones (the normaliser's moments, the stop flag, objects)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> tuple[bool, int, int]:
    """(distributed, rank, world_size): a process group when torchrun started more than one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False, 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(distributed_backend(device))
    return True, dist.get_rank(), dist.get_world_size()


def leave_process_group(distributed: bool) -> None:
    if distributed:
        dist.barrier()  # no rank leaves the group while rank 0 still evaluates or writes
        dist.destroy_process_group()
        # gloo's worker threads release the last collectives' tensors after they complete, which takes the GIL;
        # an interpreter that is already shutting down aborts the process instead.
        time.sleep(0.1)


def broadcast_from_rank0(params: list[torch.Tensor], distributed: bool) -> None:
    for p in params if distributed else []:
        dist.broadcast(p.data, src=0)


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    for p in params:
        mean_over_processes(p.grad, world_size)


def parameters_and_statistics(params: list[torch.Tensor], normalizer: Normalizer) -> torch.Tensor:
    """Every parameter and normalisation statistic in one float64 tensor, on the CPU where the statistics live."""
    statistics = [np.atleast_1d(x) for rms in (normalizer.obs_rms, normalizer.ret_rms) for x in (rms.mean, rms.var, rms.count)]
    return torch.cat([p.detach().cpu().double().reshape(-1) for p in params] + [torch.as_tensor(x) for x in statistics])


def check_same_on_all_ranks(params: list[torch.Tensor], normalizer: Normalizer, rank: int, world_size: int) -> None:
    """Every process applied the same averaged gradients and normaliser updates: all must hold the same numbers."""
    flat = parameters_and_statistics(params, normalizer)
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(g, flat) for g in gathered):
        raise RuntimeError("parameters or normalisation statistics diverged across processes")
    if rank == 0:
        print(f"parameters identical on {world_size} processes (normalisation statistics too)")


# --- optional: evaluation ---
def use_offscreen_rendering(capture_video: bool) -> None:
    """Headless Linux has no window system for MuJoCo's GL: EGL renders offscreen (Mesa without a GPU); set before mujoco imports."""
    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if capture_video and headless and "MUJOCO_GL" not in os.environ:
        if ctypes.util.find_library("EGL") is None:
            fail("--capture-video without a display needs libEGL: apt install libegl1 libgl1-mesa-dri, or drop the flag")
        os.environ["MUJOCO_GL"] = "egl"


@torch.no_grad()
def evaluate(
    agent: Agent, normalizer: Normalizer, env_id: str, env_kwargs: str, episodes: int, seed: int, device: torch.device,
    stochastic: bool, video_path: Optional[str],
) -> list[float]:  # fmt: skip
    """Play whole episodes with the observation statistics frozen and return their raw returns; the policy
    acts with its distribution's mode (greedy_action) unless stochastic. With video_path, the first episode is recorded."""
    envs = make_envs(env_id, 1, env_kwargs, render=video_path is not None)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    obs, _ = envs.reset(seed=seed)
    returns, episode_return, frames = [], 0.0, []
    while len(returns) < episodes:
        if video_path is not None and not returns:  # optional: video
            frames.append(envs.render()[0])
        x = torch.as_tensor(normalizer.normalize_obs(flat_obs(obs)), device=device)
        action = agent.get_action_and_value(x)[0] if stochastic else agent.greedy_action(x)
        obs, reward, terminated, truncated, _ = envs.step(np.clip(action.cpu().numpy(), low, high))
        episode_return += float(reward[0])
        if terminated[0] or truncated[0]:
            returns.append(episode_return)
            episode_return = 0.0
            obs, _ = envs.reset()
    envs.close()
    if video_path is not None:  # optional: video
        from moviepy import ImageSequenceClip

        ImageSequenceClip(frames, fps=envs.metadata.get("render_fps", 30) or 30).write_videofile(video_path, logger=None)
    return returns


def evaluate_final_policy(agent: Agent, normalizer: Normalizer, args: Args, run: Run, global_step: int, device: torch.device) -> None:
    video_path = None
    if args.capture_video:  # optional: video
        os.makedirs(os.path.dirname(video_path := os.path.join(run.run_dir, "videos", "eval.mp4")), exist_ok=True)
    returns = evaluate(agent, normalizer, args.env_id, args.env_kwargs, args.eval_episodes, args.seed + 10_000, device, args.eval_stochastic, video_path)
    run.log(global_step, {"eval/episodic_return": float(np.mean(returns)), "eval/episodic_return_std": float(np.std(returns))})
    print(f"eval: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
    if run.wandb_run is not None and video_path is not None:  # optional: video, wandb
        import wandb

        run.wandb_run.log({"global_step": global_step, "videos/eval": wandb.Video(video_path, format="mp4")})


def evaluate_checkpoint(args: Args, device: torch.device) -> None:
    """--eval-checkpoint: the policy and its frozen statistics, loaded without unpickling "resume_state"."""
    ckpt = load_checkpoint(args.eval_checkpoint, "--eval-checkpoint")
    trained = Args(**ckpt["args"])
    agent, obs_dim, _ = build_agent(trained, device)
    agent.load_state_dict(ckpt["agent"])
    normalizer = Normalizer(obs_dim, 1, trained)
    load_normalizer_state(normalizer, ckpt["normalizer"])
    returns = evaluate(agent, normalizer, trained.env_id, trained.env_kwargs, max(args.eval_episodes, 1), args.seed, device, args.eval_stochastic, None)
    print(f"eval {trained.env_id}: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")


# --- Argument checks ---
def fail(message: str) -> NoReturn:
    """Print a one-line usage error and exit with status 2 (as argparse/tyro do)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: Optional[Sequence[str]] = None) -> Args:
    """An optional first word names a preset (`cleanrl` when left out); the flags after it override its values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = argv.pop(0) if argv and not argv[0].startswith("-") else "cleanrl"
    if preset not in PRESETS:
        fail(f"{preset!r} is no preset; the first word may name one of {', '.join(PRESETS)}, or be left out")
    presets = "\n".join(f"  {name}: {doc}" for name, (doc, _) in PRESETS.items())
    description = f"{__doc__.split(chr(10) * 2)[0]}\n\nPresets, the optional first word (flags after it override its values):\n{presets}"
    return tyro.cli(Args, args=argv, default=replace(PRESETS[preset][1], preset=preset), description=description)


def check_args(args: Args, world_size: int) -> tuple[int, int, int]:
    """Validate the flags; return (batch_size, minibatch_size, num_iterations) per process."""
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("save_every", "num_threads", "ent_coef", "vf_coef"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "clip_obs", "clip_reward"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    if args.target_kl is not None and not args.target_kl > 0:
        fail(f"--target-kl must be > 0 (or left unset), got {args.target_kl}")
    if args.eval_episodes < 0:  # optional: evaluation
        fail(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    try:
        if not isinstance(json.loads(args.env_kwargs), dict):
            raise ValueError("not an object")
    except ValueError as e:
        fail(f"--env-kwargs {args.env_kwargs!r} is not a JSON object ({e}); write e.g. '{{\"ctrl_cost_weight\": 0.2}}'")
    if any(h <= 0 for h in args.hidden_sizes):
        fail(f"--hidden-sizes must all be positive, got {' '.join(map(str, args.hidden_sizes))}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        divisors = [d for d in range(1, min(batch_size, 64) + 1) if batch_size % d == 0]
        fail(f"--num-minibatches {args.num_minibatches} does not divide the batch "
             f"--num-envs {args.num_envs} x --num-steps {args.num_steps} = {batch_size}; pick one of {divisors}")  # fmt: skip
    num_iterations = args.total_timesteps // (batch_size * world_size)
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
             f"({batch_size * world_size} steps); raise it or lower --num-envs/--num-steps")  # fmt: skip
    return batch_size, batch_size // args.num_minibatches, num_iterations


def resolve_env(env_id: str, env_kwargs: str = "{}") -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """(observation space, action space) of env_id, checked: a bounded 1-D Box of actions, Box (or flattened) observations."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
        fail(f"--env-id {env_id} is an Atari game with a Discrete action space; use ppo_discrete.py")
    try:
        with warnings.catch_warnings():  # its warnings come again when the run makes its envs; here only the error
            warnings.simplefilter("ignore")
            envs = make_envs(env_id, 1, env_kwargs)
    except Exception as e:  # a missing module or package, a deprecated version, a keyword the env does not take
        fail(f"--env-id {env_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    obs_space, action_space = envs.single_observation_space, envs.single_action_space
    envs.close()
    if not isinstance(action_space, gym.spaces.Box):
        hint = "; use ppo_discrete.py" if isinstance(action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)) else ""
        fail(f"--env-id {env_id} has a {type(action_space).__name__} action space; ppo_continuous.py needs a Box{hint}")
    if len(action_space.shape) != 1:
        fail(f"--env-id {env_id} has a Box action space of shape {action_space.shape}; ppo_continuous.py needs a 1-D Box")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail(f"--env-id {env_id} has an unbounded Box action space; ppo_continuous.py clips actions to finite bounds")
    if not isinstance(obs_space, gym.spaces.Box):
        fail(f"--env-id {env_id} has a {type(obs_space).__name__} observation space; Box, Dict and Tuple are supported")
    return obs_space, action_space


# --- Env adapters and pickling ---
class EnvPickler(pickle.Pickler):
    """Pickles MuJoCo envs whole, simulation state (MjData) and RNG: by themselves (EzPickle) they restart an episode."""

    def reducer_override(self, obj):
        mujoco_env = sys.modules.get("gymnasium.envs.mujoco.mujoco_env")  # not imported: no MuJoCo env
        if mujoco_env is not None and isinstance(obj, mujoco_env.MujocoEnv) and hasattr(obj, "_ezpickle_args"):
            rng = obj.np_random.bit_generator.state
            return rebuild_mujoco_env, (type(obj), obj._ezpickle_args, obj._ezpickle_kwargs, obj.data, rng)
        return NotImplemented


def rebuild_mujoco_env(cls: type, args: tuple, kwargs: dict, data, rng_state: dict) -> gym.Env:
    import mujoco

    env = cls(*args, **kwargs)
    mujoco.mj_copyData(env.data, env.model, data)
    env.np_random.bit_generator.state = rng_state
    return env


def env_state(envs: gym.vector.SyncVectorEnv) -> bytes:
    """Pickled sub-envs (MuJoCo states, RNGs, time limits): a resumed run continues the very same episodes."""
    buffer = io.BytesIO()
    EnvPickler(buffer).dump((envs.envs, envs._autoreset_envs))
    return buffer.getvalue()


def restore_env_state(envs: gym.vector.SyncVectorEnv, state: bytes) -> None:
    envs.envs, envs._autoreset_envs = pickle.loads(state)


class FlattenObservation(gym.ObservationWrapper):
    """gymnasium's FlattenObservation as a class: gymnasium's holds a lambda, which a checkpoint cannot pickle."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.flatten_space(env.observation_space)

    def observation(self, observation):
        return gym.spaces.flatten(self.env.observation_space, observation)


def flatten_dict_and_tuple_observations(env: gym.Env) -> gym.Env:
    """What the network sees of a Dict or Tuple observation: one vector (FlattenObservation); other envs as they are."""
    return FlattenObservation(env) if isinstance(env.observation_space, (gym.spaces.Dict, gym.spaces.Tuple)) else env


# --- optional: fast-path ---
class WithoutStepInfo(gym.Wrapper):
    """Drops step()'s info dict, which nothing reads: SyncVectorEnv merges it every step, a sixth of a MuJoCo step."""

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return obs, reward, terminated, truncated, {}


# The rollout's fast path, derived from the one definition. Stepping one MuJoCo env at a time makes the policy a chain
# of tiny ops, each costing several microseconds of dispatch in torch and about one in numpy. So get_action_and_value
# is exported once (torch.export, for a batch of num_envs observations) and its aten graph written out as Python
# source, one numpy line per node, by this table (it gets the arguments as source text: v_name for a node, else the
# repr; an argument it does not take refuses the op). The nodes that depend on the weights alone run once per refresh,
# after each update; random ops draw from the run's numpy rng. An op the table lacks: get_action_and_value, one note.
UNARY = {**dict.fromkeys(["clone", "detach", "alias", "contiguous", "lift_fresh_copy", "to", "_to_copy"], ""), "neg": "np.negative",
         "atanh": "np.arctanh", "lgamma": "lgamma", "erf": "erf", "sigmoid": "sigmoid", "silu": "silu", "relu": "relu",
         **{op: f"np.{op}" for op in ("tanh", "exp", "log", "log1p", "expm1", "sqrt", "abs", "square", "reciprocal")}}  # fmt: skip
RESHAPES, BROADCASTS = {"view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "flatten", "view_as", "reshape_as"}, {"expand", "expand_as"}
RANDOM, IGNORED = {"randn_like", "normal", "_standard_gamma", "_sample_dirichlet"}, {"device", "layout", "pin_memory", "memory_format"}
NOISE = "rng.standard_normal({}, dtype=np.float32).astype(DT, copy=False)"  # the draw CleanRL's and the old copy's noise took
NUMPY_OPS: dict[str, Callable[..., Optional[str]]] = {
    **{op: lambda x, dtype="DT", f=f: f"{f}({x})" if dtype == "DT" else None for op, f in UNARY.items()},
    "linear": lambda x, w, b="None": f"{x} @ {w}_T" + (f" + {b}" if b != "None" else ""), "t": lambda x: f"{x}.T",  # w_T: w.T, C order
    "mm": lambda a, b: f"{a} @ {b}", "matmul": lambda a, b: f"{a} @ {b}", "addmm": lambda c, a, b: f"{c} + {a} @ {b}", "mul": lambda a, b: f"{a} * {b}",
    "add": lambda a, b, alpha="1": f"{a} + {b}" if alpha == "1" else None, "sub": lambda a, b, alpha="1": f"{a} - {b}" if alpha == "1" else None,
    "rsub": lambda a, b, alpha="1": f"{b} - {a}" if alpha == "1" else None, "div": lambda a, b: f"{a} / {b}", "pow": lambda a, b: f"{a} ** {b}",
    "maximum": lambda a, b: f"np.maximum({a}, {b})", "minimum": lambda a, b: f"np.minimum({a}, {b})", "where": lambda c, a, b: f"np.where({c}, {a}, {b})",
    "gt": lambda a, b: f"{a} > {b}", "lt": lambda a, b: f"{a} < {b}", "xlogy": lambda a, b: f"xlogy({a}, {b})", "clamp": lambda x, lo="None", hi="None": f"np.clip({x}, {lo}, {hi})",
    "clamp_min": lambda x, lo: f"np.maximum({x}, {lo})", "clamp_max": lambda x, hi: f"np.minimum({x}, {hi})", "gelu": lambda x, approximate="'none'": f"gelu_{approximate[1:-1]}({x})",
    "leaky_relu": lambda x, s="0.01": f"np.where({x} > 0, {x}, {s} * {x})", "softplus": lambda x, beta="1", threshold="20": f"softplus({x}, {beta}, {threshold})",
    "elu": lambda x, alpha="1", scale="1", input_scale="1": f"elu({x}, {alpha})" if scale == input_scale == "1" else None,
    "layer_norm": lambda x, shape, w="None", b="None", eps="1e-05", cudnn_enable="True": f"layer_norm({x}, {len(eval(shape))}, {w}, {b}, {eps})",
    "sum": lambda x, dim="None", keepdim="False": f"{x}.sum({dim}, keepdims={keepdim})", "mean": lambda x, dim="None", keepdim="False": f"{x}.mean({dim}, keepdims={keepdim})",
    "cat": lambda xs, dim="0": f"np.concatenate({xs}, {dim})", "stack": lambda xs, dim="0": f"np.stack({xs}, {dim})", "getitem": lambda x, i: f"{x}[{i}]",
    "broadcast_tensors": lambda xs: f"np.broadcast_arrays(*{xs})", "chunk": lambda x, n, dim="0": f"chunk({x}, {n}, {dim})", "select": lambda x, d, i: f"np.take({x}, {i}, {d})",
    "split": lambda x, size, dim="0": f"np.split({x}, range({size}, {x}.shape[{dim}], {size}), {dim})",
    "slice": lambda x, dim="0", start="None", end="None", step="1": f"{x}[{':, ' * int(dim)}{start}:{end}:{step}]",
    "full": lambda shape, value, dtype="DT": f"np.full({shape}, {value}, {dtype})", "scalar_tensor": lambda v, dtype="DT": f"np.asarray({v}, {dtype})",
    "zeros_like": lambda x, dtype="DT": f"np.zeros_like({x})" if dtype == "DT" else None, "ones_like": lambda x, dtype="DT": f"np.ones_like({x})" if dtype == "DT" else None,
    "randn_like": lambda x, dtype="DT": NOISE.format(f"{x}.shape"), "normal": lambda m, s: f"{m} + {s} * " + NOISE.format(f"np.broadcast_shapes({m}.shape, {s}.shape)"),
    "_standard_gamma": lambda c: f"rng.standard_gamma({c}).astype(DT)", "_sample_dirichlet": lambda c: f"dirichlet(rng.standard_gamma({c}).astype(DT))",
}  # fmt: skip
NUMPY_HELPERS = dict(
    np=np, relu=lambda x: np.maximum(x, 0), sigmoid=lambda x: 1 / (1 + np.exp(-x)), silu=lambda x: x / (1 + np.exp(-x)),
    elu=lambda x, alpha: np.where(x > 0, x, np.expm1(np.minimum(x, 0)) * alpha if alpha != 1 else np.expm1(np.minimum(x, 0))),
    lgamma=lambda x: np.vectorize(math.lgamma, otypes=[np.float64])(x).astype(x.dtype),  # numpy has no lgamma and no erf
    erf=lambda x: np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype), gelu_none=lambda x: x * 0.5 * (1 + NUMPY_HELPERS["erf"](x * math.sqrt(0.5))),
    gelu_tanh=lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))),
    softplus=lambda x, beta, threshold: np.where(x * beta > threshold, x, np.log1p(np.exp(np.minimum(x * beta, threshold))) / beta),
    layer_norm=lambda x, dims, w, b, eps: (lambda c: c / np.sqrt((c * c).mean(tuple(range(-dims, 0)), keepdims=True) + eps))(x - x.mean(tuple(range(-dims, 0)), keepdims=True)) * (1 if w is None else w) + (0 if b is None else b),
    xlogy=lambda a, b: np.where(a == 0, 0, a * np.log(np.where(a == 0, 1, b))).astype(np.result_type(a, b)),
    chunk=lambda x, n, dim: np.split(x, range(-(-x.shape[dim] // n), x.shape[dim], -(-x.shape[dim] // n)), dim), dirichlet=lambda g: g / g.sum(-1, keepdims=True),
)  # fmt: skip


# The derived source is checked in float64 against a float64 copy of the agent: the two run the same ops and differ
# only in the order of their sums and libm's last bits, about 1e-13 relative for these networks, while float32 rounding,
# divided by a small std, reaches 1e-5 in a log-prob. 1e-9, relative beyond magnitude 1, leaves rounding four orders
# of magnitude and lies far below any change of the policy that matters.
FAST_PATH_ATOL = 1e-9


class Sampling(nn.Module):
    """What torch.export traces: the agent's get_action_and_value, sampling."""

    def __init__(self, agent: Agent):
        super().__init__()
        self.agent = agent

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.agent.get_action_and_value(obs)


def source_text(value) -> str:
    """An argument of an aten node as source text: v_name for a node, a tuple of them for a list, DT for a float dtype."""
    if isinstance(value, (list, tuple)):
        return f"({''.join(source_text(v) + ', ' for v in value)})"
    if isinstance(value, torch.dtype):
        return "DT" if value.is_floating_point else f"np.{str(value).split('.')[-1]}"
    return f"v_{value.name}" if isinstance(value, torch.fx.Node) else repr(value)


def numpy_line(node: torch.fx.Node) -> Union[str, NotImplementedError]:
    """`v_name = ...`, one aten node as numpy source, or the error naming what the table cannot translate."""
    op, args = getattr(node.target, "__name__", str(node.target)).split(".")[0], [source_text(a) for a in node.args]
    kwargs = {k: source_text(v) for k, v in node.kwargs.items() if k not in IGNORED}
    shape = tuple(node.meta["val"].shape) if isinstance(node.meta.get("val"), torch.Tensor) else None  # fixed: one batch size
    try:
        line = f"np.{'reshape' if op in RESHAPES else 'broadcast_to'}({args[0]}, {shape})" if op in RESHAPES | BROADCASTS and shape else NUMPY_OPS[op](*args, **kwargs)
    except (KeyError, TypeError):
        line = None
    if line is None or node.op != "call_function":
        return NotImplementedError(f"it has no numpy translation of {node.target}({', '.join(args + [f'{k}={v}' for k, v in kwargs.items()])})")
    return f"v_{node.name} = {line}"


def numpy_source(graph: torch.fx.Graph, functions: dict[str, Sequence[int]]) -> tuple[str, dict[str, NotImplementedError]]:
    """Source of def name(v_obs, rng) for each of functions (the graph outputs it returns), the nodes it needs one line
    each, and of setup(), the nodes on the weights alone; and the functions the table cannot translate, with why."""
    nodes, varying, sources, failed, once = list(graph.nodes), set(), [], {}, []
    lines = {node: numpy_line(node) for node in nodes[:-1] if node.op != "placeholder"}
    for node in nodes:  # what depends on the observations or on a random draw
        if node.name == "obs" or getattr(node.target, "__name__", "").split(".")[0] in RANDOM or varying & set(node.all_input_nodes):
            varying.add(node)
    for name, outputs in functions.items():
        needed, todo = set(), [nodes[-1].args[0][i] for i in outputs]
        while todo:
            needed.add(todo[-1])
            todo += [n for n in todo.pop().all_input_nodes if n not in needed]
        errors = [lines[n] for n in nodes if n in needed and isinstance(lines.get(n), NotImplementedError)]
        if errors:
            failed[name] = errors[0]
            continue
        once += [n for n in nodes if n in needed and n in lines and n not in varying and n not in once]
        body = "".join(f"    {lines[n]}\n" for n in nodes if n in needed & varying and n in lines)
        sources.append(f"def {name}(v_obs, rng=None):\n{body}    return {', '.join(f'v_{nodes[-1].args[0][i].name}' for i in outputs)}\n")
    setup = "".join(f"    global v_{n.name}\n    {lines[n]}\n" for n in once)
    return f"def setup():\n    pass\n{setup}" + "".join(sources), failed


class DerivedPolicy:
    """The rollout's policy, numpy source from get_action_and_value's exported graph on copies of the weights (refresh()
    after an update). Entropies are the update's: checked where the table translates them, never run in the rollout."""

    def __init__(self, agent: Agent, obs: np.ndarray):
        # Under no_grad (a sample() under no_grad would otherwise come as a submodule) and without the distributions'
        # argument checks (data-dependent, they cannot be traced; the update and the float64 check still run them).
        torch.distributions.Distribution.set_default_validate_args(False)
        try:
            with torch.no_grad():
                program = torch.export.export(Sampling(copy.deepcopy(agent).cpu()), (torch.as_tensor(obs),))
        finally:
            torch.distributions.Distribution.set_default_validate_args(__debug__)  # torch's default
        self.agent, self.constants = agent, program.constants
        self.inputs = {s.arg.name: s.target for s in program.graph_signature.input_specs if s.target is not None}
        self.source, failed = numpy_source(program.graph, {"act": (0, 1, 3), "value": (3,), "entropy": (2,)})
        if {"act", "value"} & failed.keys():
            raise failed.get("act", failed.get("value"))
        self.code = compile(self.source, "<numpy source derived from get_action_and_value>", "exec")
        self.refresh()

    def namespace(self, agent: Agent, dtype: type) -> dict:
        """The generated functions over numpy copies of agent's weights (2-D ones also as C-order transposes)."""
        namespace, tensors = dict(NUMPY_HELPERS, DT=dtype), {**dict(agent.named_parameters()), **dict(agent.named_buffers())}
        for name, target in self.inputs.items():
            array = tensors.get(target.removeprefix("agent."), self.constants.get(target)).detach().cpu().numpy().astype(dtype)
            namespace[f"v_{name}"], namespace[f"v_{name}_T"] = array, np.ascontiguousarray(array.T)  # the layout fixes the matmul's sums
        exec(self.code, namespace)
        namespace["setup"]()
        return namespace

    def refresh(self) -> "DerivedPolicy":
        self.float32 = self.namespace(self.agent, np.float32)
        return self

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.float32["act"](obs, rng)

    def value(self, obs: np.ndarray) -> np.ndarray:
        return self.float32["value"](obs)

    def mismatch(self, obs: np.ndarray, device: torch.device) -> Optional[str]:
        """None if the source, run in float64 on obs, samples actions whose log-probs, entropies and values are those of
        get_action_and_value on a float64 copy of the agent, to FAST_PATH_ATOL; else what differs. Draws on no shared RNG."""
        agent, obs = copy.deepcopy(self.agent).double(), obs.astype(np.float64)
        mine = self.namespace(agent, np.float64)
        actions, logprobs, values = mine["act"](obs, np.random.default_rng(0))
        ours = {"log-probs": logprobs, "entropies": mine["entropy"](obs) if "entropy" in mine else None, "values": values}
        with torch.no_grad():
            theirs = agent.get_action_and_value(torch.as_tensor(obs, device=device), torch.as_tensor(actions, device=device))[1:]
        gaps = {k: np.max(np.abs(a - b.cpu().numpy()) / np.maximum(1, np.abs(b.cpu().numpy()))) for (k, a), b in zip(ours.items(), theirs) if a is not None}  # fmt: skip
        differ = [f"{name} by {gap:.1e}" for name, gap in gaps.items() if not gap <= FAST_PATH_ATOL]
        return f"its {', '.join(differ)} differ from get_action_and_value's (tolerance {FAST_PATH_ATOL})" if differ else None


# --- The rollout's policy ---
# |new - old log-prob| at the first minibatch, before any step: 1e-7 to 3e-6 (float32 rounding) when the rollout's
# policy is the trained one (InvertedPendulum, HalfCheetah with the cleanrl and zoo-halfcheetah presets).
ON_POLICY_ATOL = 1e-3


class RolloutPolicies:
    """The rollout's policy each iteration: the derived source while it reproduces get_action_and_value and passes the on-policy
    check; once either fails (or the export or the table cannot follow), itself, the agent's own method, with one note."""

    def __init__(self, agent: Agent, device: torch.device, obs: np.ndarray):
        self.agent, self.device, self.warned, self.derived = agent, device, False, None
        self.derived = self.follow(lambda: DerivedPolicy(agent, obs))  # exported once, before the clock starts  # optional: fast-path

    def follow(self, build: Callable[[], "DerivedPolicy"], obs: Optional[np.ndarray] = None) -> Optional["DerivedPolicy"]:  # optional: fast-path
        """build(), checked on obs when given; None, with one note naming the cause, when it cannot follow the agent."""
        try:
            policy = build()
            cause = None if obs is None else policy.mismatch(obs, self.device)
        except Exception as e:  # an edit the derived path cannot follow must not stop a run the agent can do
            cause = str(e).splitlines()[0] if isinstance(e, NotImplementedError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if cause is None:
            return policy
        print(f"note: the derived numpy rollout steps aside: {cause}; the rollout runs get_action_and_value", flush=True)

    def pick(self, obs: np.ndarray) -> Union["DerivedPolicy", "RolloutPolicies"]:
        self.derived = self.derived and self.follow(self.derived.refresh, obs)  # optional: fast-path
        return self.derived or self

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        action, logprob, _, value = self.agent.get_action_and_value(torch.as_tensor(obs, device=self.device))
        return action.cpu().numpy(), logprob.cpu().numpy(), value.cpu().numpy()

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> np.ndarray:
        return self.agent.distribution(torch.as_tensor(obs, device=self.device))[1].cpu().numpy()

    def check_on_policy(self, max_logratio: float, iteration: int) -> None:
        """The data came from the policy being trained: the first minibatch's max |log-ratio| before any step within ON_POLICY_ATOL.
        The derived path failing it steps aside; the agent's own (random given its input, e.g. dropout) gets one note."""
        if not max_logratio > ON_POLICY_ATOL:
            return
        figure = f"on-policy check: max |log-ratio| {max_logratio:.1e} at the first minibatch of iteration {iteration}"
        if self.derived is not None:
            self.derived = None
            print(f"note: {figure}; the rollout switches to the plain get_action_and_value for the rest of the run", flush=True)
        elif not self.warned:
            self.warned = True
            print(f"note: {figure}, with the plain get_action_and_value (is the policy random given its input?); training goes on", flush=True)  # fmt: skip


# --- Non-finite numbers and flat parameters ---
# A few skipped steps are noise in a long run; ten in a row mean the run has gone bad.
MAX_SKIPPED_STEPS = 10


class NonFiniteGuard:
    """Keeps non-finite numbers out of the weights: a minibatch with a non-finite loss or gradient norm is not stepped, and counted
    (losses/skipped_steps); MAX_SKIPPED_STEPS in a row or a non-finite weight stop the run, one line, exit 1, checkpoint kept."""

    def __init__(self, run: Optional[Run] = None, iteration: int = 0):
        self.run, self.iteration, self.count, self.in_a_row = run, iteration, 0, 0

    def skip(self, loss: torch.Tensor, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, epoch: int, minibatch: int) -> bool:
        loss_ok = math.isfinite(loss.item())
        if loss_ok and math.isfinite(grad_norm.item()):
            self.in_a_row = 0
            return False
        optimizer.zero_grad()
        self.count, self.in_a_row = self.count + 1, self.in_a_row + 1
        if self.in_a_row >= MAX_SKIPPED_STEPS:
            what = f"{'gradient norm' if loss_ok else 'loss'} ({MAX_SKIPPED_STEPS} steps in a row)"
            stop_non_finite(self.run, what, f"iteration {self.iteration} (epoch {epoch + 1}, minibatch {minibatch + 1})")
        return True

    def check_weights(self, params: list[torch.Tensor], epoch: int) -> None:
        """After each epoch (a finite, clipped step moves an Adam weight by about the learning rate at most)."""
        if not all(bool(torch.isfinite(p).all()) for p in params):
            stop_non_finite(self.run, "weights", f"iteration {self.iteration} (epoch {epoch + 1}, after its last minibatch)")

    def check_env_step(self, obs: np.ndarray, reward: np.ndarray, global_step: int) -> None:
        """A simulator that blew up (a nan or an inf in an observation or a reward) stops the run, naming it. Each
        step, on the raw output (about 2 us): the rollout's buffers hold normalised values, in which the statistics
        shared by the envs spread one env's nan to all of them, so a check once per rollout could not name the env."""
        if math.isfinite(obs.sum() + reward.sum()):
            return
        for what, values in (("observation", obs), ("reward", reward)):
            for index in np.argwhere(~np.isfinite(values))[:1]:
                source = f"{what} {values[tuple(index)]} from {self.run.args.env_id} (sub-env {index[0]})"
                stop_non_finite(self.run, source, f"global_step {global_step} (iteration {self.iteration})")

    def take_count(self) -> int:
        """Skipped steps since the last call (one update)."""
        count, self.count = self.count, 0
        return count


def stop_non_finite(run: Optional[Run], what: str, where: str) -> NoReturn:
    path = os.path.join(run.run_dir, "checkpoint.pt") if run is not None else ""
    kept = path if os.path.isfile(path) else "none written"
    print(f"error: non-finite {what} at {where}; stopped, last good checkpoint kept: {kept}", file=sys.stderr, flush=True)
    sys.exit(1)


def non_finite_entries(state, name: str = "") -> list[str]:
    """Names of the floating tensors in a (nested) state dict that hold a nan or an inf."""
    if isinstance(state, torch.Tensor):
        return [name] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return [bad for key, value in items for bad in non_finite_entries(value, f"{name}.{key}" if name else str(key))]


def flatten_parameters(module: nn.Module) -> nn.Parameter:
    """Move the module's parameters into one flat tensor and their gradients into one flat gradient, each a view
    into them, so Adam, the gradient clip and the all-reduce each act on one tensor (with 64-wide MLPs the
    per-tensor overhead costs more than the arithmetic). Returns the flat parameter. zero_grad() sets gradients to
    None, which would cut the views loose: a hook on each parameter zeroes the flat gradient in place and re-links
    the views before backward accumulates, so optimizer.zero_grad() and module.zero_grad() work as usual."""
    params = list(module.parameters())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    grad, views, offset = torch.zeros_like(flat), [], 0
    for p in params:
        p.data = flat.data[offset : offset + p.numel()].view_as(p)
        views.append(grad[offset : offset + p.numel()].view_as(p))
        offset += p.numel()

    def relink() -> None:
        if flat.grad is not grad:  # optimizer.zero_grad() dropped the flat gradient
            grad.zero_()
            flat.grad = grad
        for q, view in zip(params, views):
            if q.grad is not view:  # module.zero_grad() dropped this parameter's gradient
                view.zero_()
                q.grad = view

    for p, view in zip(params, views):
        p.grad = view
        p.register_hook(lambda g, p=p, view=view: relink() if flat.grad is not grad or p.grad is not view else None)
    flat.grad = grad
    return flat


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_(params, max_norm), the norm before clipping: for one flat parameter its arithmetic written straight
    (the same numbers to the bit, tested), without the grouping by device and dtype that costs twice a small MLP's clip."""
    if len(params) != 1:
        return nn.utils.clip_grad_norm_(params, max_norm)
    grad = params[0].grad
    total_norm = torch.linalg.vector_norm(grad)
    grad.mul_(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    return total_norm


if __name__ == "__main__":
    train(parse_args())
