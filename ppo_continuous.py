"""PPO for continuous actions (MuJoCo and any env with a bounded Box action space) in one file.

    python ppo_continuous.py                                    # HalfCheetah-v5, CleanRL's defaults
    python ppo_continuous.py cleanrl --env-id Hopper-v5 --learning-rate 1e-4
    python ppo_continuous.py zoo-halfcheetah                    # rl-baselines3-zoo's tuned HalfCheetah settings
    python ppo_continuous.py --help                             # the presets; `cleanrl --help` for the flags
    torchrun --nproc_per_node 2 ppo_continuous.py               # data parallel, one set of envs per process

The first word may name a preset of hyperparameters (PRESETS below; `cleanrl` when left out);
every flag after it overrides that preset's value. --capture-video renders offscreen: on a Linux
machine without a display the script then sets MUJOCO_GL=egl (Mesa's libEGL, no GPU needed).
Read top to bottom: arguments and presets, the numerical core (Gaussian policy, GAE, losses, KL
estimators, running normalisers of observations and rewards), environments, the network (and its
numpy copy that runs the rollout), then `main`: 1. rollout, 2. GAE, 3. clipped update, 4. logging
and checkpoints.
References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Huang et al. 2022
("The 37 Implementation Details of PPO").
"""

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
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal, NoReturn, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode


@dataclass
class Args:
    exp_name: str = "ppo_continuous"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (each torchrun process adds its rank)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """torch device: `auto` (cuda, then mps, then cpu) or a device string such as `cpu` or `cuda:1`"""
    num_threads: int = 0
    """torch CPU threads per process (0: torch's default); 1 is often fastest for the small MLP"""
    track: bool = False
    """if toggled, log to Weights and Biases (metrics land in runs/{run_name}/metrics.jsonl either way)"""
    wandb_project_name: str = "ppo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user)"""
    capture_video: bool = False
    """if toggled, record the first evaluation episode to runs/{run_name}/videos/ (headless: MUJOCO_GL=egl)"""
    runs_dir: str = "runs"
    """folder that holds runs/{run_name}/ (metrics, args, checkpoints, videos)"""
    save_every: int = 0
    """write a checkpoint every this many iterations (0: only at the end and on Ctrl-C)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue; hyperparameters come from the checkpoint"""
    eval_episodes: int = 10
    """episodes played by the final policy after training (0: no evaluation)"""
    eval_stochastic: bool = False
    """if toggled, evaluation samples actions; by default it acts with the policy's mean"""
    eval_checkpoint: Optional[str] = None
    """evaluate the policy of this checkpoint for --eval-episodes and exit, without training"""

    # Algorithm specific arguments
    env_id: str = "HalfCheetah-v5"
    """gymnasium id with a bounded 1-D Box action space"""
    total_timesteps: int = 1000000
    """total environment steps, summed over envs and processes"""
    learning_rate: float = 3e-4
    """learning rate of the Adam optimizer"""
    num_envs: int = 1
    """parallel environments per process"""
    num_steps: int = 2048
    """steps per environment per rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
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
    """stop the update epochs early once the approximate KL passes this (None: never)"""

    # Continuous control specific arguments
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the actor and of the critic MLP (each has its own)"""
    activation: Literal["tanh", "relu", "elu"] = "tanh"
    """activation function of the hidden layers"""
    ortho_init: bool = True
    """orthogonal weights (gain sqrt(2); 0.01 on the mean head, 1 on the value head) and zero biases;
    --no-ortho-init keeps torch's default nn.Linear initialisation"""
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
    """bootstrap time-limit truncations from V(final obs); --no-bootstrap-truncation treats them as
    terminations, as CleanRL does"""


# Named hyperparameter presets: the first word on the command line, every value overridable.
# zoo-halfcheetah: rl-baselines3-zoo's tuned PPO for HalfCheetah (n_steps 512, batch 64, 20 epochs,
# constant lr, no value clipping); SB3's value loss has no 0.5 factor, so its vf_coef 0.58096 is 1.16192 here.
PRESETS: dict[str, tuple[str, Args]] = {
    "cleanrl": ("CleanRL's ppo_continuous_action.py defaults (the default preset)", Args()),
    "zoo-halfcheetah": (
        "rl-baselines3-zoo's tuned HalfCheetah hyperparameters (256-256 ReLU, log std -2, 512-step rollouts)",
        Args(
            env_id="HalfCheetah-v5", learning_rate=2.0633e-5, anneal_lr=False, num_steps=512, num_minibatches=8,
            update_epochs=20, gamma=0.98, gae_lambda=0.92, clip_coef=0.1, clip_vloss=False, ent_coef=0.000401762,
            vf_coef=1.16192, max_grad_norm=0.8, hidden_sizes=(256, 256), activation="relu", log_std_init=-2.0,
            ortho_init=False,
        ),
    ),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> Args:
    """tyro CLI with one subcommand per preset; no preset word means `cleanrl`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["cleanrl", *argv]
    presets = tyro.extras.subcommand_type_from_defaults(
        {name: args for name, (_, args) in PRESETS.items()}, {name: doc for name, (doc, _) in PRESETS.items()}
    )
    return tyro.cli(presets, args=argv, default=PRESETS["cleanrl"][1], description=__doc__.split("\n\n")[0])


# The numerical core: small functions the tests check against naive reference code.

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_logprob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, diag(exp(log_std)^2)), summed over the action dimensions."""
    return (-0.5 * ((actions - mean) * torch.exp(-log_std)) ** 2 - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, summed over the action dimensions (the mean plays no part)."""
    return (0.5 + LOG_SQRT_2PI + log_std).sum(-1)


def sample_actions(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """One action per row of mean, drawn from the diagonal Gaussian."""
    return mean + log_std.exp() * torch.randn_like(mean)


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_value: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and returns of a [T, N] rollout, step t being the transition obs[t] -> obs[t+1].

    values[t] = V(obs[t]); next_value = V(obs after the last step). A termination cuts both the
    bootstrap and the trace. A truncation cuts only the trace: its target r + gamma * V(s_final)
    bootstraps from the final observation, which under NEXT_STEP autoreset is obs[t+1] itself.
    (numpy: this loop of small ops runs several times faster than in torch.)
    """
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(next_value)
    next_values = np.concatenate([values[1:], next_value[None]])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - np.maximum(terminated[t], truncated[t])) * last
        advantages[t] = last
    return advantages, advantages + values


def policy_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """Per-sample clipped surrogate loss, the negated min of the unclipped and clipped objectives."""
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef))


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_coef: Optional[float]
) -> torch.Tensor:
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
    """Mean and variance of a stream of samples (rows), merged batch by batch with the parallel
    algorithm of Chan et al. (1979). Starts as gymnasium's and SB3's: mean 0, variance 1, count 1e-4."""

    def __init__(self, shape: tuple = (), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        self.update_from_moments(x.mean(0), x.var(0), x.shape[0])

    def update_from_moments(self, mean: np.ndarray, var: np.ndarray, count: float) -> None:
        if count == 0:
            return
        w = count / (self.count + count)  # the batch's weight in the merged statistics
        delta = mean - self.mean
        self.var = self.var * (1 - w) + var * w + delta * delta * (w * (1 - w))
        self.mean = self.mean + delta * w
        self.count += count


class Normalizer:
    """Observation normalisation and reward scaling, with running statistics (the wrappers
    NormalizeObservation and NormalizeReward of gymnasium, VecNormalize of SB3, done in the script so
    the statistics are checkpointed, frozen for evaluation and kept identical across processes).

    Observations: every observation the envs return counts once (the first one of each episode
    included), then obs -> clip((obs - mean) / sqrt(var + 1e-8), +-clip_obs).
    Rewards: a per-env discounted return G = gamma * G + r feeds the statistics, then
    r -> clip(r / sqrt(Var[G] + 1e-8), +-clip_reward). G restarts after a termination and after a
    truncation; the reset steps of NEXT_STEP autoreset (no transition of the policy's) touch
    neither G nor the statistics. Under torchrun each update sums the batch moments of all
    processes (one all-reduce), so every process holds the same statistics.
    """

    def __init__(self, obs_dim: int, num_envs: int, args: Args, distributed: bool = False):
        self.norm_obs, self.clip_obs = args.norm_obs, args.clip_obs
        self.norm_reward, self.clip_reward, self.gamma = args.norm_reward, args.clip_reward, args.gamma
        self.distributed = distributed
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.ret_rms = RunningMeanStd((1,))
        self.returns = np.zeros(num_envs)  # this process's discounted return accumulators

    def update(
        self, obs: np.ndarray, reward: Optional[np.ndarray] = None, valid: Optional[np.ndarray] = None, ended=None
    ) -> None:
        """Add one step of the envs: obs [N, obs_dim] returned by reset or step; with reward, the
        step's rewards, valid (False on reset steps) and ended (terminated or truncated)."""
        batches = []
        if self.norm_obs:
            batches.append((self.obs_rms, obs))
        if self.norm_reward and reward is not None:
            self.returns = self.returns * self.gamma + reward  # on a reset step: 0 * gamma + 0
            batches.append((self.ret_rms, self.returns[valid, None]))
        # Count, sum and sum of squares of the deviations from the running mean (the same on every
        # process): they add up across processes, and the variance suffers little cancellation.
        moments = []
        for rms, x in batches:
            deviation = x - rms.mean
            moments.append((len(x), deviation.sum(0), (deviation * deviation).sum(0)))
        if self.distributed and moments:
            flat = torch.as_tensor(np.concatenate([np.concatenate([[n], s1, s2]) for n, s1, s2 in moments]))
            dist.all_reduce(flat)
            sizes = [rms.mean.size for rms, _ in batches]
            parts = np.split(flat.numpy(), np.cumsum([1 + 2 * d for d in sizes])[:-1])
            moments = [(p[0], p[1 : 1 + d], p[1 + d :]) for p, d in zip(parts, sizes)]
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

    def state_dict(self) -> dict:
        return {name: vars(getattr(self, name)).copy() for name in ("obs_rms", "ret_rms")}

    def load_state_dict(self, state: dict) -> None:
        for name, values in state.items():
            vars(getattr(self, name)).update(values)


# Command line checks: one line naming the flag, exit status 2, as tyro does for a malformed flag.


def fail(message: str) -> NoReturn:
    """Print a one-line usage error and exit with status 2 (as argparse/tyro do)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args, world_size: int) -> tuple[int, int, int]:
    """Validate the flags; return (batch_size, minibatch_size, num_iterations) per process."""
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eval_episodes", "save_every", "num_threads", "ent_coef", "vf_coef"):
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
    if any(h <= 0 for h in args.hidden_sizes):
        fail(f"--hidden-sizes must all be positive, got {' '.join(map(str, args.hidden_sizes))}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        divisors = [d for d in range(1, min(batch_size, 64) + 1) if batch_size % d == 0]
        fail(
            f"--num-minibatches {args.num_minibatches} does not divide the batch "
            f"--num-envs {args.num_envs} x --num-steps {args.num_steps} = {batch_size}; pick one of {divisors}"
        )
    num_iterations = args.total_timesteps // (batch_size * world_size)
    if num_iterations == 0:
        fail(
            f"--total-timesteps {args.total_timesteps} is less than one rollout "
            f"({batch_size * world_size} steps); raise it or lower --num-envs/--num-steps"
        )
    return batch_size, batch_size // args.num_minibatches, num_iterations


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is a torch device string. Under
    torchrun, `auto` and `cuda` mean the GPU of this process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
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
    return device


# Environments. Every vector env autoresets in NEXT_STEP mode: the step that ends an episode
# returns the true final observation, and the next call to step() resets that sub-env, ignores its
# action and returns (first obs, reward 0, no termination). Those reset steps are masked out of
# the loss and the normalisers, and a truncation bootstraps from V(final obs) with no extra forward.


def resolve_env(env_id: str) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Check that env_id exists and has a bounded 1-D Box action space and a Box observation space;
    return (observation space, action space)."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
        fail(f"--env-id {env_id} is an Atari game with a Discrete action space; use ppo_discrete.py")
    try:
        gym.spec(env_id)
    except gym.error.Error:
        fail(f"--env-id {env_id} is not a registered gymnasium id; MuJoCo ids look like HalfCheetah-v5")
    try:
        env = gym.make(env_id)
    except gym.error.DependencyNotInstalled as e:
        fail(f"--env-id {env_id} needs a package that is missing ({str(e).splitlines()[0]})")
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        hint = "; use ppo_discrete.py" if isinstance(action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)) else ""
        fail(f"--env-id {env_id} has a {type(action_space).__name__} action space; ppo_continuous.py needs a Box{hint}")
    if len(action_space.shape) != 1:
        fail(f"--env-id {env_id} has a Box action space of shape {action_space.shape}; ppo_continuous.py needs a 1-D Box")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail(f"--env-id {env_id} has an unbounded Box action space; ppo_continuous.py clips actions to finite bounds")
    if not isinstance(obs_space, gym.spaces.Box):
        fail(f"--env-id {env_id} has a {type(obs_space).__name__} observation space; only Box is supported")
    return obs_space, action_space


def make_envs(env_id: str, num_envs: int, render: bool = False) -> gym.vector.VectorEnv:
    """Synchronous vector env in NEXT_STEP autoreset mode (one process steps its envs in turn:
    MuJoCo steps take microseconds, less than what a subprocess round trip costs)."""
    return gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
        **({"render_mode": "rgb_array"} if render else {}),
    )


class EnvPickler(pickle.Pickler):
    """Pickles MuJoCo envs whole: the full simulation state (MjData) and the RNG. By themselves they
    pickle as their constructor arguments (EzPickle) and would come back with a fresh episode."""

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
    """Pickled sub-envs (MuJoCo state of the episodes in progress, their RNGs, time limits), so a
    resumed run continues the very same episodes."""
    buffer = io.BytesIO()
    EnvPickler(buffer).dump((envs.envs, envs._autoreset_envs))
    return buffer.getvalue()


def restore_env_state(envs: gym.vector.SyncVectorEnv, state: bytes) -> None:
    envs.envs, envs._autoreset_envs = pickle.loads(state)


# The network.

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (implementation detail 2)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(
    in_dim: int, out_dim: int, hidden_sizes: Sequence[int], activation: str, out_std: float, ortho_init: bool
) -> nn.Sequential:
    def linear(fan_in: int, fan_out: int, std: float = np.sqrt(2)) -> nn.Module:
        return layer_init(nn.Linear(fan_in, fan_out), std) if ortho_init else nn.Linear(fan_in, fan_out)

    layers, width = [], in_dim
    for hidden in hidden_sizes:
        layers += [linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    return nn.Sequential(*layers, linear(width, out_dim, std=out_std))


class Agent(nn.Module):
    """Separate actor and critic MLPs; the actor gives the mean of a diagonal Gaussian whose
    log standard deviation is a parameter of its own, the same in every state."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int],
        activation: str,
        log_std_init: float,
        ortho_init: bool = True,
    ):
        super().__init__()
        self.activation = activation
        self.actor_mean = mlp(obs_dim, act_dim, hidden_sizes, activation, 0.01, ortho_init)
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), float(log_std_init)))
        self.critic = mlp(obs_dim, 1, hidden_sizes, activation, 1.0, ortho_init)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action means [B, A] and state values [B]; the log std is self.actor_logstd [1, A]."""
        return self.actor_mean(obs), self.critic(obs).squeeze(-1)


NUMPY_ACTIVATIONS = {
    "tanh": lambda x: np.tanh(x, out=x),
    "relu": lambda x: np.maximum(x, 0, out=x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
}


class NumpyPolicy:
    """A frozen numpy copy of the agent for the rollout, rebuilt after every update. Stepping one
    MuJoCo env at a time makes the forward pass a chain of tiny ops, each of which costs several
    microseconds of dispatch in torch and about one in numpy: several times faster per env step.
    Actions are sampled from rng; their log-probabilities come from the noise, exactly."""

    def __init__(self, agent: Agent):
        def layers(seq: nn.Sequential) -> list:
            linear = [m for m in seq if isinstance(m, nn.Linear)]
            return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()) for m in linear]

        self.actor, self.critic = layers(agent.actor_mean), layers(agent.critic)
        self.log_std = agent.actor_logstd.detach().cpu().numpy()[0].copy()
        self.activation = NUMPY_ACTIVATIONS[agent.activation]

    def mlp(self, layers: list, x: np.ndarray) -> np.ndarray:
        for w, b in layers[:-1]:
            x = self.activation(x @ w + b)
        w, b = layers[-1]
        return x @ w + b

    def value(self, obs: np.ndarray) -> np.ndarray:
        return self.mlp(self.critic, obs)[:, 0]

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sampled actions [N, A], their log-probabilities [N] and the state values [N]."""
        mean = self.mlp(self.actor, obs)
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        logprob = (-0.5 * noise * noise - self.log_std - LOG_SQRT_2PI).sum(-1)
        return mean + np.exp(self.log_std) * noise, logprob, self.value(obs)


# Logging and checkpoints.


class Logger:
    """Appends metrics to runs/{run_name}/metrics.jsonl and, with --track, sends them to wandb."""

    def __init__(self, path: str, wandb_run=None):
        self.file = open(path, "a")
        self.wandb_run = wandb_run

    def log(self, global_step: int, metrics: dict) -> None:
        record = {"global_step": global_step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record)


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def load_checkpoint(path: str, flag: str) -> dict:
    if not os.path.isfile(path):
        fail(f"{flag} {path}: no such file; pass the checkpoint.pt of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"{flag} {path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "normalizer" not in ckpt:
        fail(f"{flag} {path} is not a checkpoint of ppo_continuous.py")
    return ckpt


def write_video(frames: list, path: str, fps: int) -> None:
    from moviepy import ImageSequenceClip

    ImageSequenceClip(frames, fps=fps).write_videofile(path, logger=None)


def flat_obs(obs: np.ndarray) -> np.ndarray:
    """[N, *obs_shape] -> [N, obs_dim] float64 (what the normaliser reads)."""
    return obs.reshape(obs.shape[0], -1).astype(np.float64)


@torch.no_grad()
def evaluate(
    agent: Agent,
    normalizer: Normalizer,
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device,
    stochastic: bool,
    video_path: Optional[str],
) -> list[float]:
    """Play whole episodes with the observation statistics frozen and return their raw returns;
    the policy acts with its mean unless stochastic. With video_path, the first one is recorded."""
    envs = make_envs(env_id, 1, render=video_path is not None)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    obs, _ = envs.reset(seed=seed)
    returns, episode_return, frames = [], 0.0, []
    while len(returns) < episodes:
        if video_path is not None and not returns:
            frames.append(envs.render()[0])
        x = torch.as_tensor(normalizer.normalize_obs(flat_obs(obs)), device=device)
        mean, _ = agent(x)
        action = sample_actions(mean, agent.actor_logstd) if stochastic else mean
        obs, reward, terminated, truncated, _ = envs.step(np.clip(action.cpu().numpy(), low, high))
        episode_return += float(reward[0])
        if terminated[0] or truncated[0]:
            returns.append(episode_return)
            episode_return = 0.0
            obs, _ = envs.reset()
    envs.close()
    if video_path is not None:
        write_video(frames, video_path, fps=envs.metadata.get("render_fps", 30) or 30)
    return returns


def flatten_parameters(module: nn.Module) -> nn.Parameter:
    """Move every parameter of module into one flat tensor, and every gradient into one flat
    gradient, each parameter and gradient becoming a view into them. Adam, the gradient clip and the
    all-reduce then each act on one tensor: with 64-wide MLPs the per-tensor overhead of those three
    cost more than their arithmetic. Returns the flat parameter (its .grad is the flat gradient);
    backward accumulates into the views, so gradients are zeroed in place, never set to None."""
    params = list(module.parameters())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        p.data = flat.data[offset : offset + p.numel()].view_as(p)
        p.grad = flat.grad[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def build_agent(args: Args, device: torch.device) -> tuple[Agent, int, gym.spaces.Box]:
    """The agent for args.env_id; also the flat observation size and the action space."""
    obs_space, action_space = resolve_env(args.env_id)
    obs_dim = int(np.prod(obs_space.shape))
    act_dim = action_space.shape[0]
    agent = Agent(obs_dim, act_dim, args.hidden_sizes, args.activation, args.log_std_init, args.ortho_init)
    return agent.to(device), obs_dim, action_space


def main(args: Args) -> None:
    device = pick_device(args.device)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    if args.eval_checkpoint is not None:
        ckpt = load_checkpoint(args.eval_checkpoint, "--eval-checkpoint")
        trained = Args(**ckpt["args"])
        agent, obs_dim, _ = build_agent(trained, device)
        agent.load_state_dict(ckpt["agent"])
        normalizer = Normalizer(obs_dim, 1, trained)
        normalizer.load_state_dict(ckpt["normalizer"])
        episodes = max(args.eval_episodes, 1)
        returns = evaluate(agent, normalizer, trained.env_id, episodes, args.seed, device, args.eval_stochastic, None)
        print(f"eval {trained.env_id}: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
        return

    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, "--resume")
        # Hyperparameters come from the checkpoint; only where and how this process runs may change.
        keep = {"device", "num_threads", "resume", "save_every", "track"}
        args = Args(**{**ckpt["args"], **{k: v for k, v in asdict(args).items() if k in keep}})
    # Headless Linux has no window system for MuJoCo's default GL backend; EGL renders offscreen
    # (through Mesa when there is no GPU). It must be chosen before mujoco is first imported.
    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if args.capture_video and headless and "MUJOCO_GL" not in os.environ:
        if ctypes.util.find_library("EGL") is None:
            fail("--capture-video without a display needs libEGL: apt install libegl1 libgl1-mesa-dri, or drop the flag")
        os.environ["MUJOCO_GL"] = "egl"
    batch_size, minibatch_size, num_iterations = check_args(args, world_size)
    run_name = ckpt["run_name"] if ckpt else f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)

    # Seeding: each process gets its own env seeds and sampling noise; parameters are broadcast
    # from rank 0 below, so all processes start from the same network.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed + rank)  # action noise and minibatch shuffles

    agent, obs_dim, action_space = build_agent(args, device)
    act_dim, low, high = action_space.shape[0], action_space.low, action_space.high
    flat_params = flatten_parameters(agent)
    optimizer = torch.optim.Adam([flat_params], lr=args.learning_rate, eps=1e-5, fused=device.type in ("cpu", "cuda"))
    if distributed:
        dist.broadcast(flat_params.data, src=0)
    envs = make_envs(args.env_id, args.num_envs)
    normalizer = Normalizer(obs_dim, args.num_envs, args, distributed)

    # Rollout storage; step t is the transition obs[t] -> obs[t+1]. The rollout runs in numpy
    # (NumpyPolicy) and its batch moves to the device once per iteration, not once per step.
    obs = np.zeros((args.num_steps, args.num_envs, obs_dim), dtype=np.float32)
    actions = np.zeros((args.num_steps, args.num_envs, act_dim), dtype=np.float32)
    logprobs, values, rewards, terminated, truncated, valid = (
        np.zeros((args.num_steps, args.num_envs), np.float32) for _ in range(6)
    )

    # State carried from one rollout to the next (and through checkpoints). next_obs is normalised.
    start_iteration, global_step, wandb_id, metrics_offset = 1, 0, None, 0
    raw_obs, _ = envs.reset(seed=args.seed + rank * args.num_envs)
    normalizer.update(flat_obs(raw_obs))
    next_obs = normalizer.normalize_obs(flat_obs(raw_obs))
    next_reset = np.zeros(args.num_envs, dtype=bool)  # True: this sub-env's next step is a reset step
    episode_return = np.zeros(args.num_envs)
    episode_length = np.zeros(args.num_envs, dtype=np.int64)
    if ckpt is not None:
        try:
            agent.load_state_dict(ckpt["agent"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError):  # e.g. per-tensor Adam state, from before the flat parameters
            fail(f"--resume {args.resume}: its network or optimizer state does not fit this version of the script; start a new run")
        normalizer.load_state_dict(ckpt["normalizer"])
        start_iteration, global_step = ckpt["iteration"] + 1, ckpt["global_step"]
        wandb_id, metrics_offset = ckpt["wandb_id"], ckpt["metrics_offset"]
        if len(ckpt["ranks"]) == world_size:
            mine = ckpt["ranks"][rank]
            set_rng_state(mine["rng"])
            rng.bit_generator.state = mine["sample_rng"]
            restore_env_state(envs, mine["envs"])
            next_obs, next_reset, normalizer.returns = mine["next_obs"], mine["next_reset"], mine["returns"]
            episode_return, episode_length = mine["episode_return"], mine["episode_length"]
        else:
            # The fresh episodes' first observations were normalised before the statistics came back.
            next_obs = normalizer.normalize_obs(flat_obs(raw_obs))
            if rank == 0:
                print(f"note: checkpoint has {len(ckpt['ranks'])} processes, this run {world_size}; RNGs and envs start fresh")

    logger = None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if ckpt is not None and os.path.exists(metrics_path):
            # Drop what was logged after the checkpoint, so the resumed log equals an uninterrupted one.
            with open(metrics_path, "r+") as f:
                f.truncate(metrics_offset)
        wandb_run = None
        if args.track:
            import wandb

            wandb_run = wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                config=asdict(args),
                name=run_name,
                id=wandb_id,
                resume="allow",
                dir=run_dir,
                save_code=True,
            )
            wandb_run.define_metric("global_step")
            wandb_run.define_metric("*", step_metric="global_step")
            wandb_id = wandb_run.id
        logger = Logger(metrics_path, wandb_run)
        print(
            f"{run_name}: {num_iterations} iterations of {batch_size} steps x {world_size} process(es), "
            f"{args.num_minibatches} minibatches of {minibatch_size}, {args.update_epochs} epochs, device {device}"
        )

    # Ctrl-C (or a scheduler's SIGTERM) asks to stop: the current iteration finishes, a checkpoint
    # is written, then the process exits. A second Ctrl-C interrupts at once.
    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def checkpoint(iteration: int) -> None:
        mine = {
            "rng": rng_state(),
            "sample_rng": rng.bit_generator.state,
            "envs": env_state(envs),
            "next_obs": next_obs,
            "next_reset": next_reset,
            "returns": normalizer.returns,
            "episode_return": episode_return,
            "episode_length": episode_length,
        }
        ranks = [None] * world_size
        if distributed:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if rank == 0:
            state = {
                "agent": agent.state_dict(),
                "optimizer": optimizer.state_dict(),
                "normalizer": normalizer.state_dict(),  # the same on every process
                "iteration": iteration,
                "global_step": global_step,
                "args": asdict(args),
                "run_name": run_name,
                "wandb_id": wandb_id,
                "metrics_offset": logger.file.tell(),
                "ranks": ranks,
            }
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), state)

    recent_returns = deque(maxlen=20)
    start_time, start_step = time.time(), global_step
    print_every = max(1, num_iterations // 100)
    for iteration in range(start_iteration, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # 1. Rollout: num_steps steps of num_envs envs with the current policy. The sampled action
        # is stored and trained on; the env gets it clipped to the action bounds.
        policy = NumpyPolicy(agent)
        for step in range(args.num_steps):
            global_step += args.num_envs * world_size
            obs[step] = next_obs
            valid[step] = ~next_reset  # a NEXT_STEP reset step is no transition of the policy's
            actions[step], logprobs[step], values[step] = policy.act(next_obs, rng)
            raw_obs, reward, term, trunc, _ = envs.step(np.clip(actions[step], low, high))
            ended = term | trunc
            episode_return += reward
            episode_length += ~next_reset
            raw_flat = flat_obs(raw_obs)
            normalizer.update(raw_flat, reward, ~next_reset, ended)
            next_obs = normalizer.normalize_obs(raw_flat)
            if not args.bootstrap_truncation:
                term = ended
            rewards[step], terminated[step], truncated[step] = normalizer.scale_reward(reward), term, trunc & ~term
            next_reset = ended
            for i in np.flatnonzero(ended):
                recent_returns.append(episode_return[i])
                if logger:
                    logger.log(
                        global_step,
                        {"charts/episodic_return": float(episode_return[i]), "charts/episodic_length": int(episode_length[i])},
                    )
            episode_return[ended], episode_length[ended] = 0.0, 0

        # 2. Generalized advantage estimation, bootstrapped from the observation after the rollout.
        advantages, returns = compute_gae(
            rewards, values, policy.value(next_obs), terminated, truncated, args.gamma, args.gae_lambda
        )

        # 3. The clipped update: update_epochs epochs of shuffled minibatches.
        b_obs = torch.as_tensor(obs, device=device).reshape(-1, obs_dim)
        b_actions = torch.as_tensor(actions, device=device).reshape(-1, act_dim)
        b_logprobs, b_values, b_advantages, b_returns, b_valid = (
            torch.as_tensor(x, device=device).reshape(-1) for x in (logprobs, values, advantages, returns, valid)
        )
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
        for epoch in range(args.update_epochs):
            # The epoch's minibatches in one gather, [num_minibatches, minibatch_size]. A mean over
            # a minibatch's real steps is a sum weighted by mask / count; the advantage normalisation
            # and the diagnostics run for all minibatches at once (a few ops per epoch, not per minibatch).
            perm = torch.as_tensor(rng.permutation(batch_size), device=device).view(args.num_minibatches, minibatch_size)
            mb_obs, mb_actions, mb_logprobs, mb_values, mb_returns, mb_adv, mask = (
                x[perm] for x in (b_obs, b_actions, b_logprobs, b_values, b_returns, b_advantages, b_valid)
            )
            weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
            if args.norm_adv:
                adv_mean = (mb_adv * weights).sum(1, keepdim=True)
                adv_std = ((mb_adv - adv_mean) ** 2 * weights).sum(1, keepdim=True).sqrt()
                mb_adv = (mb_adv - adv_mean) / (adv_std + 1e-8)
            logratios = []
            for i in range(args.num_minibatches):
                mean, new_value = agent(mb_obs[i])
                logratio = gaussian_logprob(mean, agent.actor_logstd, mb_actions[i]) - mb_logprobs[i]
                pg_loss = (policy_loss(logratio.exp(), mb_adv[i], args.clip_coef) * weights[i]).sum()
                v_clip = args.clip_coef if args.clip_vloss else None
                v_loss = (value_loss(new_value, mb_values[i], mb_returns[i], v_clip) * weights[i]).sum()
                entropy = gaussian_entropy(agent.actor_logstd).mean()  # the same in every state
                loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss

                flat_params.grad.zero_()
                loss.backward()
                if distributed:  # the mean gradient over processes
                    dist.all_reduce(flat_params.grad)
                    flat_params.grad /= world_size
                nn.utils.clip_grad_norm_([flat_params], args.max_grad_norm)
                optimizer.step()
                logratios.append(logratio.detach())
                stats["policy_loss"].append(pg_loss.detach())
                stats["value_loss"].append(v_loss.detach())
                stats["entropy"].append(entropy.detach())
            with torch.no_grad():  # per minibatch, from the log-ratios before its optimizer step
                logratio = torch.stack(logratios)
                old_kl, kl = kl_estimators(logratio)
                stats["old_approx_kl"].append((old_kl * weights).sum(1))
                stats["approx_kl"].append((kl * weights).sum(1))
                stats["clipfrac"].append((((logratio.exp() - 1.0).abs() > args.clip_coef).float() * weights).sum(1))

            if args.target_kl is not None:
                epoch_kl = stats["approx_kl"][-1].mean()
                if distributed:
                    dist.all_reduce(epoch_kl)
                    epoch_kl /= world_size
                if epoch_kl > args.target_kl:
                    break

        # 4. Logging, checkpoints, stop requests.
        if logger:
            metrics = {f"losses/{k}": torch.cat([x.reshape(-1) for x in v]).mean().item() for k, v in stats.items()}
            metrics["losses/explained_variance"] = explained_variance(values[valid == 1], returns[valid == 1])
            metrics["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
            metrics["charts/SPS"] = int((global_step - start_step) / (time.time() - start_time))
            logger.log(global_step, metrics)
            if iteration % print_every == 0 or iteration == num_iterations:
                recent = f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a"
                print(
                    f"iter {iteration}/{num_iterations} | step {global_step:,} | SPS {metrics['charts/SPS']:,} "
                    f"| return (last {len(recent_returns)}) {recent}",
                    flush=True,
                )
        if distributed:
            flag = torch.tensor(float(stop_requested))
            dist.all_reduce(flag)
            stop_requested = bool(flag.item())
        if stop_requested or iteration == num_iterations or (args.save_every and iteration % args.save_every == 0):
            checkpoint(iteration)
        if stop_requested:
            if rank == 0:
                print(f"interrupted: checkpoint at step {global_step:,} in {run_dir}/checkpoint.pt; continue with --resume")
            envs.close()
            if distributed:
                dist.destroy_process_group()
            sys.exit(130)
    envs.close()
    if distributed:
        # Every process applied the same averaged gradients and the same normaliser updates, so all
        # must hold the same parameters and statistics.
        statistics = [np.atleast_1d(x) for rms in (normalizer.obs_rms, normalizer.ret_rms) for x in (rms.mean, rms.var, rms.count)]
        parameters = flat_params.detach().double()
        flat = torch.cat([parameters] + [torch.as_tensor(x) for x in statistics])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(g, flat) for g in gathered):
            raise RuntimeError("parameters or normalisation statistics diverged across processes")
        if rank == 0:
            print(f"parameters identical on {world_size} processes (normalisation statistics too)")

    # Evaluation of the final policy: whole episodes, raw rewards, observation statistics frozen.
    if rank == 0 and args.eval_episodes > 0:
        video_path = None
        if args.capture_video:
            os.makedirs(os.path.join(run_dir, "videos"), exist_ok=True)
            video_path = os.path.join(run_dir, "videos", "eval.mp4")
        returns = evaluate(
            agent, normalizer, args.env_id, args.eval_episodes, args.seed + 10_000, device, args.eval_stochastic, video_path
        )
        logger.log(global_step, {"eval/episodic_return": float(np.mean(returns)), "eval/episodic_return_std": float(np.std(returns))})
        print(f"eval: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
        if logger.wandb_run is not None and video_path is not None:
            import wandb

            logger.wandb_run.log({"global_step": global_step, "videos/eval": wandb.Video(video_path, format="mp4")})
    if logger and logger.wandb_run is not None:
        logger.wandb_run.finish()
    if distributed:
        dist.barrier()  # wait for rank 0 to finish evaluating: a rank leaving gloo early once died of SIGABRT
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
