"""PPO for discrete actions: classic control (MLP) and Atari (Nature CNN) from one file.

    python ppo_discrete.py                                   # CartPole-v1, CleanRL's defaults
    python ppo_discrete.py --env-id ALE/Breakout-v5 --num-envs 8 --clip-coef 0.1 --total-timesteps 10000000
    torchrun --nproc_per_node 2 ppo_discrete.py              # data parallel, one set of envs per process

Read top to bottom: arguments, the numerical core (GAE, losses, KL estimators), environments,
the network, then `main`: 1. rollout, 2. GAE, 3. clipped update, 4. logging and checkpoints.
References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Huang et al. 2022
("The 37 Implementation Details of PPO").
"""

import json
import os
import pickle
import random
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, NoReturn, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.vector import AutoresetMode


@dataclass
class Args:
    exp_name: str = "ppo_discrete"
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
    """if toggled, record the first evaluation episode to runs/{run_name}/videos/"""
    runs_dir: str = "runs"
    """folder that holds runs/{run_name}/ (metrics, args, checkpoints, videos)"""
    save_every: int = 0
    """write a checkpoint every this many iterations (0: only at the end and on Ctrl-C)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue; hyperparameters come from the checkpoint"""
    eval_episodes: int = 10
    """episodes played by the final policy after training (0: no evaluation)"""
    eval_stochastic: bool = False
    """if toggled, evaluation samples actions; by default it takes the most likely action"""
    eval_checkpoint: Optional[str] = None
    """evaluate the policy of this checkpoint for --eval-episodes and exit, without training"""

    # Algorithm specific arguments
    env_id: str = "CartPole-v1"
    """gymnasium id with a Discrete action space; ALE ids (ALE/Breakout-v5) get the Atari pipeline"""
    total_timesteps: int = 500000
    """total environment steps, summed over envs and processes"""
    learning_rate: float = 2.5e-4
    """learning rate of the Adam optimizer"""
    num_envs: int = 4
    """parallel environments per process"""
    num_steps: int = 128
    """steps per environment per rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch (the per-process batch num_envs * num_steps must split evenly)"""
    update_epochs: int = 4
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient epsilon"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values, with --clip-coef"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold"""
    target_kl: Optional[float] = None
    """stop the update epochs early once the approximate KL passes this (None: never)"""


# The numerical core: small functions the tests check against naive reference code.


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


def logprob_and_entropy(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|s) of the given actions and the entropy of pi(.|s), from unnormalised logits."""
    logp = logits.log_softmax(-1)
    return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def sample_categorical(logits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One action per row drawn from softmax(logits) by the Gumbel-max trick, and its log-probability."""
    actions = (logits - np.log(-np.log(rng.random(logits.shape, dtype=np.float32)))).argmax(-1)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return actions, np.take_along_axis(logp, actions[:, None], -1)[:, 0]


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    """1 - Var[returns - values] / Var[returns]; nan when the returns do not vary."""
    var_returns = np.var(returns)
    return float("nan") if var_returns == 0 else float(1 - np.var(returns - values) / var_returns)


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
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    if args.target_kl is not None and not args.target_kl > 0:
        fail(f"--target-kl must be > 0 (or left unset), got {args.target_kl}")
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
# action and returns (first obs, reward 0, no termination). Those reset steps are left out of the
# update, and a truncation bootstraps from V(final obs) with no extra forward pass.


def is_atari(env_id: str) -> bool:
    """True for ids served by ale-py (ALE/Breakout-v5, BreakoutNoFrameskip-v4, ...)."""
    return "ale_py" in str(gym.spec(env_id).entry_point)


def resolve_env(env_id: str) -> gym.Space:
    """Check that env_id exists and has a Discrete action space; return its observation space."""
    import ale_py

    gym.register_envs(ale_py)
    try:
        gym.spec(env_id)
    except gym.error.Error:
        fail(f"--env-id {env_id} is not a registered gymnasium id; Atari ids look like ALE/Breakout-v5")
    if is_atari(env_id):
        return gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)  # what make_envs returns
    env = gym.make(env_id)
    action_space, obs_space = env.action_space, env.observation_space
    env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        hint = "; use ppo_continuous.py" if isinstance(action_space, gym.spaces.Box) else ""
        fail(f"--env-id {env_id} has a {type(action_space).__name__} action space; ppo_discrete.py needs Discrete{hint}")
    if not isinstance(obs_space, (gym.spaces.Box, gym.spaces.Discrete)):
        fail(f"--env-id {env_id} has a {type(obs_space).__name__} observation space; only Box and Discrete are supported")
    return obs_space


def make_envs(env_id: str, num_envs: int, render: bool = False) -> gym.vector.VectorEnv:
    """Vector env in NEXT_STEP autoreset mode. Atari goes through ale-py's C++ AtariVectorEnv
    (noop reset 30, frame skip 4 with max-pool, 84x84 grayscale, 4-frame stack, fire reset);
    its rewards stay raw so the logged return is the game score, and the script clips them to
    their sign and turns life losses into terminations itself."""
    if is_atari(env_id):
        from ale_py.vector_env import AtariVectorEnv

        kwargs = gym.spec(env_id).kwargs
        return AtariVectorEnv(
            game=kwargs["game"],
            num_envs=num_envs,
            repeat_action_probability=kwargs.get("repeat_action_probability", 0.25),
            autoreset_mode=AutoresetMode.NEXT_STEP,
            reward_clipping=False,
            episodic_life=False,
        )
    return gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
        **({"render_mode": "rgb_array"} if render else {}),
    )


def env_state(envs: gym.vector.VectorEnv) -> Optional[bytes]:
    """Pickled sub-envs of a SyncVectorEnv (episodes in progress, their RNGs), so a resumed run
    continues the very same episodes; None for envs that cannot be pickled (ale-py's C++ envs)."""
    if not isinstance(envs, gym.vector.SyncVectorEnv):
        return None
    return pickle.dumps((envs.envs, envs._autoreset_envs))


def restore_env_state(envs: gym.vector.VectorEnv, state: bytes) -> None:
    envs.envs, envs._autoreset_envs = pickle.loads(state)


# The network.


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (implementation detail 2)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, out_dim: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(
        layer_init(nn.Linear(in_dim, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, out_dim), std=out_std),
    )


class Agent(nn.Module):
    """Pixels: the Nature CNN (Mnih et al. 2015) shared by a policy head and a value head.
    Vectors: separate 64-64 tanh MLPs for actor and critic. Discrete observations are one-hot."""

    def __init__(self, obs_space: gym.Space, n_actions: int, pixels: bool):
        super().__init__()
        self.pixels = pixels
        self.obs_onehot = obs_space.n if isinstance(obs_space, gym.spaces.Discrete) else 0
        if pixels:
            self.encoder = nn.Sequential(
                layer_init(nn.Conv2d(obs_space.shape[0], 32, 8, stride=4)),
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)),
                nn.ReLU(),
                nn.Flatten(),
                layer_init(nn.Linear(64 * 7 * 7, 512)),
                nn.ReLU(),
            )
            self.actor = layer_init(nn.Linear(512, n_actions), std=0.01)
            self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        else:
            in_dim = self.obs_onehot or int(np.prod(obs_space.shape))
            self.encoder = nn.Identity()
            self.actor = mlp(in_dim, n_actions, out_std=0.01)
            self.critic = mlp(in_dim, 1, out_std=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits [B, A] and state values [B]."""
        if self.pixels:
            x = obs.float() / 255.0
        elif self.obs_onehot:
            x = F.one_hot(obs.long(), self.obs_onehot).float()
        else:
            x = obs.flatten(1).float()
        hidden = self.encoder(x)
        return self.actor(hidden), self.critic(hidden).squeeze(-1)


class NumpyMLP:
    """A numpy copy of the MLP agent that the rollout acts with, rebuilt after every update. A step
    feeds a handful of observations through small layers: each op costs about a microsecond in
    numpy and several in torch's dispatcher, which makes this several times faster per env step."""

    def __init__(self, agent: Agent):
        def layers(seq: nn.Sequential) -> list:
            linear = [m for m in seq if isinstance(m, nn.Linear)]
            return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()) for m in linear]

        self.actor, self.critic, self.obs_onehot = layers(agent.actor), layers(agent.critic), agent.obs_onehot

    @staticmethod
    def mlp(layers: list, x: np.ndarray) -> np.ndarray:
        for w, b in layers[:-1]:
            x = np.tanh(x @ w + b)
        return x @ layers[-1][0] + layers[-1][1]

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Action logits [N, A] and state values [N], as Agent.forward computes them."""
        if self.obs_onehot:
            x = np.eye(self.obs_onehot, dtype=np.float32)[obs.astype(np.int64)]
        else:
            x = obs.reshape(len(obs), -1).astype(np.float32, copy=False)
        return self.mlp(self.actor, x), self.mlp(self.critic, x)[:, 0]


def rollout_policy(agent: Agent, device: torch.device) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """obs -> (logits, values) in numpy: the numpy copy for MLPs; the CNN runs in torch on the device."""
    if not agent.pixels:
        return NumpyMLP(agent)

    @torch.no_grad()
    def cnn(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, values = agent(torch.as_tensor(obs, device=device))
        return logits.cpu().numpy(), values.cpu().numpy()

    return cnn


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
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"{flag} {path} is not a readable checkpoint ({type(e).__name__})")


def write_video(frames: list, path: str, fps: int) -> None:
    from moviepy import ImageSequenceClip

    frames = [np.repeat(f[..., None], 3, axis=-1) if f.ndim == 2 else f for f in frames]
    ImageSequenceClip(frames, fps=fps).write_videofile(path, logger=None)


def evaluate(
    agent: Agent, env_id: str, episodes: int, seed: int, device: torch.device, stochastic: bool, video_path: Optional[str]
) -> list[float]:
    """Play whole episodes (whole games for Atari) and return their undiscounted, unclipped returns.
    With video_path, the first episode is recorded: rendered frames, or what the agent sees on Atari."""
    envs = make_envs(env_id, 1, render=video_path is not None and not is_atari(env_id))
    policy, rng = rollout_policy(agent, device), np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    returns, episode_return, frames = [], 0.0, []
    while len(returns) < episodes:
        if video_path is not None and not returns:
            frames.append(obs[0, -1] if is_atari(env_id) else envs.render()[0])
        logits, _ = policy(obs)
        action = sample_categorical(logits, rng)[0] if stochastic else logits.argmax(-1)
        obs, reward, terminated, truncated, _ = envs.step(action)
        episode_return += float(reward[0])
        if terminated[0] or truncated[0]:
            returns.append(episode_return)
            episode_return = 0.0
            obs, _ = envs.reset()
    envs.close()
    if video_path is not None:
        write_video(frames, video_path, fps=envs.metadata.get("render_fps", 30) or 30)
    return returns


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
        obs_space = resolve_env(trained.env_id)
        agent = Agent(obs_space, ckpt["n_actions"], is_atari(trained.env_id)).to(device)
        agent.load_state_dict(ckpt["agent"])
        returns = evaluate(agent, trained.env_id, max(args.eval_episodes, 1), args.seed, device, args.eval_stochastic, None)
        print(f"eval {trained.env_id}: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
        return

    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, "--resume")
        # Hyperparameters come from the checkpoint; only where and how this process runs may change.
        keep = {"device", "num_threads", "resume", "save_every", "track"}
        args = Args(**{**ckpt["args"], **{k: v for k, v in asdict(args).items() if k in keep}})
    obs_space = resolve_env(args.env_id)
    batch_size, minibatch_size, num_iterations = check_args(args, world_size)
    atari = is_atari(args.env_id)
    if ckpt is not None:  # continue in the run's own folder, wherever it has been moved
        run_name, run_dir = ckpt["run_name"], os.path.dirname(os.path.abspath(args.resume))
    else:
        run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.runs_dir, run_name)

    # Seeding: each process gets its own env seeds, action noise and minibatch order (all drawn from
    # rng); parameters are broadcast from rank 0 below, so all processes start from the same network.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed + rank)

    envs = make_envs(args.env_id, args.num_envs)
    n_actions = int(envs.single_action_space.n)
    agent = Agent(obs_space, n_actions, atari).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=device.type in ("cpu", "cuda"))
    if distributed:
        for p in agent.parameters():
            dist.broadcast(p.data, src=0)

    # Rollout storage in numpy; step t is the transition obs[t] -> obs[t+1]. It moves to the device
    # once per iteration, not once per step.
    obs = np.zeros((args.num_steps, args.num_envs) + obs_space.shape, dtype=np.uint8 if atari else np.float32)
    rewards, terminated, truncated, valid, logprobs, values = (
        np.zeros((args.num_steps, args.num_envs), np.float32) for _ in range(6)
    )
    actions = np.zeros((args.num_steps, args.num_envs), dtype=np.int64)

    # State carried from one rollout to the next (and through checkpoints).
    start_iteration, global_step, wandb_id, metrics_offset = 1, 0, None, 0
    next_obs, _ = envs.reset(seed=args.seed + rank * args.num_envs)
    next_reset = np.zeros(args.num_envs, dtype=bool)  # True: this sub-env's next step is a reset step
    episode_return = np.zeros(args.num_envs)
    episode_length = np.zeros(args.num_envs, dtype=np.int64)
    lives = np.zeros(args.num_envs, dtype=np.int64)
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iteration, global_step = ckpt["iteration"] + 1, ckpt["global_step"]
        wandb_id, metrics_offset = ckpt["wandb_id"], ckpt["metrics_offset"]
        if len(ckpt["ranks"]) == world_size:
            mine = ckpt["ranks"][rank]
            set_rng_state(mine["global_rngs"])
            rng.bit_generator.state = mine["rng"]
            if mine["envs"] is not None:
                restore_env_state(envs, mine["envs"])
                next_obs, next_reset, lives = mine["next_obs"], mine["next_reset"], mine["lives"]
                episode_return, episode_length = mine["episode_return"], mine["episode_length"]
            elif rank == 0:
                print("note: these envs cannot be saved; resumed training starts fresh episodes")
        elif rank == 0:
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
            "global_rngs": rng_state(),
            "rng": rng.bit_generator.state,
            "envs": env_state(envs),
            "next_obs": next_obs,
            "next_reset": next_reset,
            "lives": lives,
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
                "iteration": iteration,
                "global_step": global_step,
                "args": asdict(args),
                "run_name": run_name,
                "wandb_id": wandb_id,
                "metrics_offset": logger.file.tell(),
                "n_actions": n_actions,
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

        # 1. Rollout: num_steps steps of num_envs envs with the current policy.
        policy = rollout_policy(agent, device)
        for step in range(args.num_steps):
            global_step += args.num_envs * world_size
            obs[step] = next_obs
            valid[step] = ~next_reset  # a NEXT_STEP reset step is no transition of the policy's
            logits, values[step] = policy(next_obs)
            actions[step], logprobs[step] = sample_categorical(logits, rng)
            next_obs, reward, term, trunc, info = envs.step(actions[step])
            ended = term | trunc
            episode_return += reward
            episode_length += ~next_reset
            if atari:
                # Episodic life: a lost life ends the trace for GAE; the game itself goes on.
                life_lost = (info["lives"] < lives) & ~next_reset
                lives = info["lives"]
                term = term | life_lost
                reward = np.sign(reward)
            rewards[step], terminated[step], truncated[step] = reward, term, trunc & ~term
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
            rewards, values, policy(next_obs)[1], terminated, truncated, args.gamma, args.gae_lambda
        )

        # 3. The clipped update: update_epochs epochs of shuffled minibatches. The reset steps of
        # NEXT_STEP autoreset are no decisions of the policy's, so they are left out of the batch.
        keep = np.flatnonzero(valid.reshape(-1))
        b_obs = torch.as_tensor(obs.reshape((-1,) + obs_space.shape)[keep], device=device)
        b_actions, b_logprobs, b_values, b_advantages, b_returns = (
            torch.as_tensor(x.reshape(-1)[keep], device=device) for x in (actions, logprobs, values, advantages, returns)
        )
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
        for epoch in range(args.update_epochs):
            perm = torch.as_tensor(rng.permutation(len(keep)), device=device)
            for mb in perm.tensor_split(args.num_minibatches):
                logits, new_value = agent(b_obs[mb])
                new_logprob, entropy = logprob_and_entropy(logits, b_actions[mb])
                logratio = new_logprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_kl, kl = kl_estimators(logratio)
                    stats["old_approx_kl"].append(old_kl.mean())
                    stats["approx_kl"].append(kl.mean())
                    stats["clipfrac"].append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
                mb_adv = b_advantages[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = policy_loss(ratio, mb_adv, args.clip_coef).mean()
                v_loss = value_loss(new_value, b_values[mb], b_returns[mb], args.clip_coef if args.clip_vloss else None).mean()
                entropy = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss

                optimizer.zero_grad()
                loss.backward()
                if distributed:
                    grads = [p.grad for p in agent.parameters()]
                    flat = torch.cat([g.flatten() for g in grads])
                    dist.all_reduce(flat)
                    for g, reduced in zip(grads, torch.split(flat / world_size, [g.numel() for g in grads])):
                        g.copy_(reduced.view_as(g))
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                stats["policy_loss"].append(pg_loss.detach())
                stats["value_loss"].append(v_loss.detach())
                stats["entropy"].append(entropy.detach())

            if args.target_kl is not None:
                epoch_kl = torch.stack(stats["approx_kl"][-args.num_minibatches :]).mean()
                if distributed:
                    dist.all_reduce(epoch_kl)
                    epoch_kl /= world_size
                if epoch_kl > args.target_kl:
                    break

        # 4. Logging, checkpoints, stop requests.
        if logger:
            metrics = {f"losses/{k}": torch.stack(v).mean().item() for k, v in stats.items()}
            metrics["losses/explained_variance"] = explained_variance(b_values.cpu().numpy(), b_returns.cpu().numpy())
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
            flag = torch.tensor(float(stop_requested), device=device)
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
        # Every process applied the same averaged gradients, so all must hold the same parameters.
        flat = nn.utils.parameters_to_vector(agent.parameters()).detach()
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(g, flat) for g in gathered):
            raise RuntimeError("parameters diverged across processes")
        if rank == 0:
            print(f"parameters identical on {world_size} processes")

    # Evaluation of the final policy: whole episodes, the raw game score on Atari.
    if rank == 0 and args.eval_episodes > 0:
        video_path = None
        if args.capture_video:
            os.makedirs(os.path.join(run_dir, "videos"), exist_ok=True)
            video_path = os.path.join(run_dir, "videos", "eval.mp4")
        returns = evaluate(agent, args.env_id, args.eval_episodes, args.seed + 10_000, device, args.eval_stochastic, video_path)
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
    main(tyro.cli(Args))
