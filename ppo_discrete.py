"""PPO for discrete actions: classic control (MLP) and Atari (Nature CNN) from one file.

    python ppo_discrete.py                                   # CartPole-v1, CleanRL's defaults
    python ppo_discrete.py --env-id ALE/Breakout-v5 --num-envs 8 --clip-coef 0.1 --total-timesteps 10000000
    torchrun --nproc_per_node 2 ppo_discrete.py              # data parallel, one set of envs per process

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Huang et al. 2022 ("The 37 Implementation
Details of PPO").
"""

import functools
import inspect
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
from dataclasses import asdict, dataclass, fields
from typing import Callable, NoReturn, Optional, Union

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from ale_py.vector_env import AtariVectorEnv
from gymnasium.vector import AutoresetMode


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """gymnasium id with a Discrete or MultiDiscrete action space, `module:id` imports the module first; ALE ids get the Atari pipeline"""
    env_kwargs: str = "{}"
    """keyword arguments of gym.make as JSON, e.g. '{"map_name": "8x8"}' (Atari: of ale-py's AtariVectorEnv)"""
    action_masks: bool = True
    """act only among the actions the env's action mask allows (info["action_mask"], or a Dict observation's key)"""
    total_timesteps: int = 500000
    """total environment steps, summed over envs and processes"""
    learning_rate: float = 2.5e-4
    """learning rate of the Adam optimizer"""
    num_envs: int = 4
    """parallel environments per process"""
    num_steps: int = 128
    """steps per environment per rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly: iteration i of N at lr * (N - i + 1) / N, the last at lr / N"""
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
    """stop the update epochs once an epoch's mean approximate KL passes this (CleanRL: its last minibatch's; None: never)"""

    # Run settings: naming, seeding, device, tracking, checkpoints, evaluation.
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (each torchrun process adds its rank)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """torch device: `auto` (a GPU for the Atari CNN, the CPU for an MLP: faster there) or e.g. `cpu`, `cuda:1`"""
    num_threads: int = 0
    """torch CPU threads per process; 0 picks 1, for the MLP and the CNN alike (more stall beside a busy core)"""
    track: bool = False  # optional: wandb
    """if toggled, log to Weights and Biases (metrics land in runs/{run_name}/metrics.jsonl either way)"""
    wandb_project_name: str = "ppo"  # optional: wandb
    """the wandb project name (CleanRL's runs: cleanRL)"""
    wandb_entity: Optional[str] = None  # optional: wandb
    """the wandb entity (team or user)"""
    capture_video: bool = False  # optional: video, evaluation
    """if toggled, record the first evaluation episode to runs/{run_name}/videos/"""
    runs_dir: str = "runs"
    """folder that holds runs/{run_name}/ (metrics, args, checkpoints, videos)"""
    save_every: int = 0
    """write a checkpoint every this many iterations (0: only at the end and on Ctrl-C/SIGTERM)"""
    resume: Optional[str] = None  # optional: resume
    """checkpoint.pt of your own run to continue (hyperparameters come from it); unpickles env/RNG state, which can run code"""
    eval_episodes: int = 10  # optional: evaluation
    """episodes played by the final policy after training (0: no evaluation)"""
    eval_stochastic: bool = False  # optional: evaluation
    """if toggled, evaluation samples actions; by default it takes the most likely action"""
    eval_checkpoint: Optional[str] = None  # optional: evaluation
    """evaluate this checkpoint's policy for --eval-episodes and exit; reads weights only (weights_only=True)"""


# Environments. Every vector env autoresets in NEXT_STEP mode: the step that ends an episode
# returns the true final observation, and the next call to step() resets that sub-env, ignores its
# action and returns (first obs, reward 0, no termination). Those reset steps are left out of the
# update, and a truncation bootstraps from V(final obs) with no extra forward pass.

gym.register_envs(ale_py)


def is_atari(env_id: str) -> bool:
    """True for ids served by ale-py (ALE/Breakout-v5, BreakoutNoFrameskip-v4, ...); a module:id once check_env's
    gym.make imported its module (gym.spec imports nothing)."""
    return "ale_py" in str(gym.spec(env_id.split(":")[-1]).entry_point)


def make_envs(env_id: str, num_envs: int, env_kwargs: dict, render: bool = False) -> gym.vector.VectorEnv:
    """Vector env in NEXT_STEP autoreset mode. Atari goes through ale-py's C++ AtariVectorEnv
    (noop reset 30, frame skip 4 with max-pool, 84x84 grayscale, 4-frame stack, fire reset),
    as AtariLostLivesAndFire: FIRE after a lost life too; its rewards stay raw so the logged return is the
    game score, and the rollout clips them to their sign and turns life losses into terminations."""
    if is_atari(env_id):
        kwargs = {"repeat_action_probability": gym.spec(env_id).kwargs.get("repeat_action_probability", 0.25), **env_kwargs}
        return AtariLostLivesAndFire(gym.spec(env_id).kwargs["game"], num_envs, autoreset_mode=AutoresetMode.NEXT_STEP,
                          reward_clipping=False, episodic_life=False, **kwargs)  # fmt: skip
    kwargs = {"vectorization_mode": "sync", "vector_kwargs": {"autoreset_mode": AutoresetMode.NEXT_STEP}, **env_kwargs}
    return gym.make_vec(env_id, num_envs, wrappers=[flat_observations], **kwargs, **({"render_mode": "rgb_array"} if render else {}))


# The network, and the policy's distribution. An invalid action's logit becomes MASKED_LOGIT (sb3-contrib's
# MaskablePPO): its probability is 0 (never sampled, never greedy) and it adds nothing to the entropy.
MASKED_LOGIT = -1e8


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
    Vectors: separate 64-64 tanh MLPs for actor and critic. Discrete observations are one-hot.
    n_actions: a Discrete space's n, or a MultiDiscrete space's nvec: one categorical per dimension, their logits
    side by side in the one policy head; actions are [B] for Discrete (one dimension), [B, D] for MultiDiscrete."""

    def __init__(self, obs_space: gym.Space, n_actions: Union[int, list[int]], pixels: bool):
        super().__init__()
        self.pixels, self.nvec = pixels, [n_actions] if isinstance(n_actions, int) else list(n_actions)
        self.action_shape = () if isinstance(n_actions, int) else (len(self.nvec),)
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + self.nvec[:-1])), persistent=False)  # of each dimension's logits
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
            self.actor = layer_init(nn.Linear(512, sum(self.nvec)), std=0.01)
            self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        else:
            in_dim = self.obs_onehot or int(np.prod(obs_space.shape))
            self.encoder = nn.Identity()
            self.actor = mlp(in_dim, sum(self.nvec), out_std=0.01)
            self.critic = mlp(in_dim, 1, out_std=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits [B, sum(nvec)] and state values [B]."""
        if self.pixels:
            x = obs.float() / 255.0
        elif self.obs_onehot:
            x = F.one_hot(obs.long(), self.obs_onehot).float()
        else:
            x = obs.flatten(1).float()
        hidden = self.encoder(x)
        return self.actor(hidden), self.critic(hidden).squeeze(-1)

    # The policy, defined once: the rollout, the update and evaluation all act through the methods below.

    def distribution(self, obs: torch.Tensor, action_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(.|obs) [B, sum(nvec)] (each dimension's log-softmax of its logits; actions the mask rules out get
        MASKED_LOGIT) and V(obs) [B]."""
        logits, value = self(obs)
        if action_mask is not None:
            logits = logits.masked_fill(~action_mask, MASKED_LOGIT)
        return torch.cat([x.log_softmax(-1) for x in logits.split(self.nvec, -1)], -1), value

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.distribution(obs)[1]

    def get_action_and_value(
        self, obs: torch.Tensor, action: Optional[torch.Tensor] = None, action_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """(action, log pi(action|obs), entropy of pi(.|obs), V(obs)); the action is sampled when not given. The
        dimensions are independent: their log-probs and entropies add up."""
        logp, value = self.distribution(obs, action_mask)
        if action is None:
            action = torch.cat([torch.multinomial(x.exp(), 1) for x in logp.split(self.nvec, -1)], -1).view(-1, *self.action_shape)
        logprob = logp.gather(-1, action.view(len(logp), -1) + self.offsets).sum(-1)
        return action, logprob, -(logp.exp() * logp).sum(-1), value

    def greedy_action(self, obs: torch.Tensor, action_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        logp = self.distribution(obs, action_mask)[0]
        return torch.stack([x.argmax(-1) for x in logp.split(self.nvec, -1)], -1).view(-1, *self.action_shape)


# PPO maths: small functions the tests check against naive reference code.


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, next_value: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
    gamma: float, gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Advantages and returns of a [T, N] rollout, step t being the transition obs[t] -> obs[t+1], in numpy
    (this loop of small ops is faster there). values[t] = V(obs[t]); next_value = V(obs after the last step).
    A termination cuts both the bootstrap and the trace. A truncation cuts only the trace: its target
    r + gamma * V(s_final) bootstraps from the final observation, under NEXT_STEP autoreset obs[t+1] itself."""
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


def ppo_update(
    agent: Agent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], args: Args, rng: np.random.Generator,
    guard: "NonFiniteGuard",
) -> tuple[dict[str, float], float]:  # fmt: skip
    """One PPO update: args.update_epochs epochs of args.num_minibatches shuffled minibatches over the batch (keys
    obs, actions, logprobs, values, advantages, returns; action_mask where the rollout met masks). Returns the
    losses/* stats, means over the minibatches, and max |log-ratio| of the first minibatch before any step: ~0 when
    the rollout acted with this very policy."""
    stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
    for epoch in range(args.update_epochs):
        perm = torch.as_tensor(rng.permutation(len(batch["actions"])), device=batch["actions"].device)
        for m, mb in enumerate(perm.tensor_split(args.num_minibatches)):
            mask = batch["action_mask"][mb] if "action_mask" in batch else None  # only rollouts that met masks have one
            _, new_logprob, entropy, new_value = agent.get_action_and_value(batch["obs"][mb], batch["actions"][mb], mask)
            logratio = new_logprob - batch["logprobs"][mb]
            ratio = logratio.exp()
            with torch.no_grad():
                if epoch == m == 0:
                    first_logratio = logratio.abs().max().item()
                old_kl, kl = kl_estimators(logratio)
                stats["old_approx_kl"].append(old_kl.mean())
                stats["approx_kl"].append(kl.mean())
                stats["clipfrac"].append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
            mb_adv = batch["advantages"][mb]
            if args.norm_adv:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = policy_loss(ratio, mb_adv, args.clip_coef).mean()
            v_clip = args.clip_coef if args.clip_vloss else None
            v_loss = value_loss(new_value, batch["values"][mb], batch["returns"][mb], v_clip).mean()
            entropy = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss

            optimizer.zero_grad()
            loss.backward()
            average_gradients(agent)  # every process applies the mean gradient  # optional: torchrun
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            if guard.skip(loss, grad_norm, agent, epoch, m):  # a non-finite loss or gradient is never stepped
                continue
            optimizer.step()
            stats["policy_loss"].append(pg_loss.detach())
            stats["value_loss"].append(v_loss.detach())
            stats["entropy"].append(entropy.detach())

        if args.target_kl is not None:
            epoch_kl = torch.stack(stats["approx_kl"][-args.num_minibatches :]).mean()
            epoch_kl = mean_across_ranks(epoch_kl)  # optional: torchrun
            if epoch_kl > args.target_kl:
                break
    guard.check_weights(agent, epoch, m)
    means = {f"losses/{k}": torch.stack(v).mean().item() if v else float("nan") for k, v in stats.items()}
    return {**means, "losses/skipped_steps": guard.skipped}, first_logratio


# Training.


@dataclass
class Carry:
    """What one rollout hands to the next; a checkpoint saves it (with the RNGs and envs) to resume mid-episode."""

    next_obs: np.ndarray
    next_reset: np.ndarray  # True: this sub-env's next step is no decision of the policy's (autoreset; Atari's FIRE)
    next_mask: np.ndarray  # the actions valid in next_obs: info["action_mask"], or all
    episode_return: np.ndarray
    episode_length: np.ndarray

    @classmethod
    def start(cls, envs: gym.vector.VectorEnv, seed: int, use_masks: bool, global_step: int = 0) -> "Carry":
        """Fresh episodes: the envs reset with seeds seed, seed + 1, ..."""
        next_obs, info = envs.reset(seed=seed)
        n, next_mask = len(next_obs), valid_actions(info, len(next_obs), action_counts(envs.single_action_space), global_step, use_masks)
        return cls(next_obs, np.zeros(n, dtype=bool), next_mask, np.zeros(n), np.zeros(n, dtype=np.int64))


def train(args: Args) -> None:
    ckpt, start_iteration, global_step, rank, world_size = None, 1, 0, 0, 1  # a new run in one process
    ckpt, args = load_resume(args)  # the checkpoint, and the run's own hyperparameters  # optional: resume
    env_kwargs = check_env(args.env_id, args.env_kwargs)
    atari = is_atari(args.env_id)
    device, device_reason = pick_device(args.device, gpu_pays=atari)
    rank, world_size = init_distributed(device)  # optional: torchrun
    set_num_threads(args.num_threads)
    batch_size, minibatch_size, num_iterations = check_args(args, world_size)

    # Per-process env seeds, action noise and minibatch order (rng); rank 0's parameters are broadcast below.
    rng = seed_everything(args.seed + rank, args.torch_deterministic)

    envs = make_envs(args.env_id, args.num_envs, env_kwargs)
    obs_space, n_actions = envs.single_observation_space, action_counts(envs.single_action_space)
    agent = Agent(obs_space, n_actions, atari).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=device.type in ("cpu", "cuda"))
    broadcast_parameters(agent)  # optional: torchrun

    # Rollout storage in numpy; step t is the transition obs[t] -> obs[t+1]. It moves to the device
    # once per iteration, not once per step.
    obs = np.zeros((args.num_steps, args.num_envs) + obs_space.shape, dtype=np.uint8 if atari else np.float32)
    rewards, terminated, truncated, valid, logprobs, values = (np.zeros((args.num_steps, args.num_envs), np.float32) for _ in range(6))
    actions = np.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape, dtype=np.int64)
    masks = np.ones((args.num_steps, args.num_envs, sum(agent.nvec)), dtype=bool)

    carry = Carry.start(envs, args.seed + rank * args.num_envs, args.action_masks)
    start_iteration, global_step, carry = restore_checkpoint(ckpt, agent, optimizer, envs, rng, carry, rank, world_size)  # optional: resume
    policy, logger = RolloutPolicy(agent, device, rng, carry.next_obs, carry.next_mask), Logger(args, ckpt, rank)
    guard = NonFiniteGuard(logger.checkpoint_path)
    print0(f"{logger.run_name}: {f'resumed from {args.resume} at iteration {start_iteration - 1}; ' if ckpt else ''}{num_iterations} iterations of {batch_size} steps x {world_size} "
           f"process(es), {args.num_minibatches} minibatches of {minibatch_size}, {args.update_epochs} epochs, device {device} ({device_reason}), {torch.get_num_threads()} torch thread(s)")  # fmt: skip
    stop_requested = install_stop_handlers(device)

    with CrashCheckpoint(logger, args, agent, optimizer, carry, rng, envs, guard):  # an exception: the last update kept
        for iteration in range(start_iteration, num_iterations + 1):
            # 1. Anneal the learning rate linearly (iteration i of N at lr * (N - i + 1) / N).
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            # 2. Rollout: num_steps steps of num_envs envs with the current policy (Agent.get_action_and_value).
            policy.refresh(carry.next_obs, carry.next_mask)  # optional: fast-path
            for step in range(args.num_steps):
                global_step += args.num_envs * world_size
                obs[step], masks[step] = carry.next_obs, carry.next_mask
                valid[step] = ~carry.next_reset  # an autoreset step (or Atari's FIRE) is no decision of the policy's
                actions[step], logprobs[step], values[step] = policy.act(carry.next_obs, carry.next_mask, global_step)
                carry.next_obs, reward, term, trunc, info = envs.step(actions[step])
                ended = term | trunc  # an episode's last observation: its mask goes unused (the next step resets)
                carry.next_mask = valid_actions(info, args.num_envs, n_actions, global_step, args.action_masks, ended)
                logger.episodes(global_step, carry, reward, ended)
                carry.next_reset = ended
                if atari:  # a lost life ends the trace for GAE; the game goes on, relaunched by FIRE (no decision of the policy's)
                    term, reward, carry.next_reset = term | info["life_lost"], np.sign(reward), ended | info["fire_next"]
                rewards[step], terminated[step], truncated[step] = reward, term, trunc & ~term

            check_env_output(args.env_id, obs, rewards, carry.next_obs, global_step, args.num_envs * world_size, logger.checkpoint_path)

            # 3. Generalized advantage estimation, bootstrapped from the observation after the rollout.
            next_value = policy.value(carry.next_obs)
            advantages, returns = compute_gae(rewards, values, next_value, terminated, truncated, args.gamma, args.gae_lambda)

            # 4. The clipped update on the batch, without the autoreset and FIRE steps (no decisions of the policy's).
            keep = np.flatnonzero(valid.reshape(-1))
            rollout = dict(obs=obs, actions=actions, logprobs=logprobs, values=values, advantages=advantages, returns=returns)
            if not masks.all():  # only a rollout that met masks pays for masking in the update
                rollout["action_mask"] = masks
            batch = {k: torch.as_tensor(x.reshape((-1,) + x.shape[2:])[keep], device=device) for k, x in rollout.items()}
            stats, first_logratio = ppo_update(agent, optimizer, batch, args, rng, guard.at(iteration))
            policy.check_on_policy(first_logratio, iteration)

            # 5. Log; checkpoint every --save-every iterations, at the end and when asked to stop.
            stats["losses/explained_variance"] = explained_variance(values.reshape(-1)[keep], returns.reshape(-1)[keep])
            stats["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
            logger.iteration(iteration, num_iterations, global_step, stats)
            stop = stop_requested()
            if stop or iteration == num_iterations or (args.save_every and iteration % args.save_every == 0):
                save_checkpoint(logger, args, agent, optimizer, iteration, global_step, carry, rng, envs)
            if stop:
                exit_interrupted(logger, global_step, envs)

    finish(agent, args, device, logger, envs, global_step)


# Infrastructure: nothing below changes what PPO computes but what the calls above name: flat_observations (what the network
# sees), valid_actions (the masks), AtariLostLivesAndFire (lost lives, FIRE); the fast path samples the same policy with other
# random numbers. Delete a section headed `# --- optional: NAME ---` and each line marked `# optional: NAME`: the copy runs.

# --- Run folder and logging ---
def print0(*values, file=None) -> None:
    """print on rank 0 only: under torchrun every process runs the same code."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*values, file=file, flush=True)


NOTED: set[str] = set()


def note(message: str) -> None:
    """A one-line `note:` on rank 0, each message once per process."""
    if message not in NOTED:
        NOTED.add(message)
        print0(f"note: {message}")


class Logger:
    """The run folder. Rank 0 writes args.json and metrics.jsonl (wandb with --track), prints the progress line; others log nothing."""

    def __init__(self, args: Args, ckpt: Optional[dict], rank: int):
        self.run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.run_dir, self.wandb_id, self.start_step = os.path.join(args.runs_dir, self.run_name), None, 0
        if ckpt is not None:  # continues in the folder that holds its checkpoint, wherever it moved  # optional: resume
            self.run_name, self.run_dir, self.wandb_id, self.start_step = ckpt["run_name"], os.path.dirname(os.path.abspath(args.resume)), ckpt["wandb_id"], ckpt["global_step"]  # fmt: skip
        self.checkpoint_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.rank, self.recent_returns, self.last = rank, deque(maxlen=20), None  # last: the last update's (iteration, step, log size)
        self.wandb_run, self.file, self.start_time = None, None, time.time()
        if rank != 0:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if ckpt is not None and os.path.exists(metrics_path):  # so the resumed log equals an uninterrupted one  # optional: resume
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

    def episodes(self, global_step: int, carry: "Carry", reward: np.ndarray, ended: np.ndarray) -> None:
        """Count a step into each env's episode (its raw reward; an autoreset step adds no length); log those that ended."""
        carry.episode_return += reward
        carry.episode_length += ~carry.next_reset
        for i in np.flatnonzero(ended):
            self.recent_returns.append(carry.episode_return[i])
            self.log(global_step, {"charts/episodic_return": float(carry.episode_return[i]), "charts/episodic_length": int(carry.episode_length[i])})
        carry.episode_return[ended], carry.episode_length[ended] = 0.0, 0

    def iteration(self, iteration: int, num_iterations: int, global_step: int, metrics: dict) -> None:
        """Log an iteration's metrics and the throughput; print the progress line about 100 times a run."""
        if self.file is None:
            return
        sps = int((global_step - self.start_step) / (time.time() - self.start_time))
        self.log(global_step, {**metrics, "charts/SPS": sps})
        self.last = (iteration, global_step, self.file.tell())
        if iteration % max(1, num_iterations // 100) == 0 or iteration == num_iterations:
            recent = f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "n/a"
            print(f"iteration {iteration}/{num_iterations} | global_step {global_step:,} | SPS {sps:,} "
                  f"| episodic_return (last {len(self.recent_returns)}) {recent}", flush=True)  # fmt: skip

    def finish(self) -> None:
        if self.wandb_run is not None:  # optional: wandb
            self.wandb_run.finish()
        if self.rank == 0:
            print(f"done: {self.run_dir} ({', '.join(n for n in ('metrics.jsonl', 'args.json', 'checkpoint.pt', 'videos/') if os.path.exists(os.path.join(self.run_dir, n)))})")


# --- Checkpoints ---
# One checkpoint.pt per run. Everything but "resume_state" loads with weights_only=True (a policy can be evaluated
# without running pickled code); "resume_state" holds pickled per-rank state (RNGs, envs, Carry) that only --resume reads.
CHECKPOINT_KEYS = ("args", "run_name", "iteration", "global_step", "wandb_id", "metrics_offset", "agent", "optimizer", "n_actions", "resume_state")


def save_checkpoint(
    logger: Logger, args: Args, agent: Agent, optimizer: torch.optim.Optimizer, iteration: int, global_step: int,
    carry: Carry, rng: np.random.Generator, envs: gym.vector.VectorEnv, crash: bool = False,
) -> None:  # fmt: skip
    """Every rank hands in its resume state (a crash's: no envs); rank 0 writes it atomically; non-finite tensors stop the run."""
    for name, tensors in (("weight", agent.state_dict().items()), ("optimizer state", [(f"{i}.{k}", t) for i, st in optimizer.state_dict()["state"].items() for k, t in st.items()])):
        bad = first_nonfinite(tensors)
        if bad is not None:
            stop_nonfinite(f"{name} {bad}", iteration, "at the checkpoint, not written", logger.checkpoint_path)
    global_rngs = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    mine = {"carry": vars(carry), "rng": rng.bit_generator.state, "global_rngs": global_rngs, "envs": None if crash else env_state(envs), "crash": crash}
    ranks = [mine]
    if dist.is_initialized():  # optional: torchrun
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if logger.rank != 0:
        return
    state = {"args": asdict(args), "run_name": logger.run_name, "iteration": iteration, "global_step": global_step,
             "wandb_id": logger.wandb_id, "metrics_offset": logger.file.tell(), "agent": agent.state_dict(),
             "optimizer": optimizer.state_dict(), "n_actions": action_counts(envs.single_action_space), "resume_state": pickle.dumps(ranks)}  # fmt: skip
    tmp = f"{logger.checkpoint_path}.tmp"
    with open(tmp, "wb") as f:  # on disk before the rename, so a crash leaves the old or the new checkpoint whole
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, logger.checkpoint_path)


def load_checkpoint(path: str, flag: str, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """The checkpoint loaded with weights_only=True (no pickled code runs), or a one-line error."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: no such file; pass the checkpoint.pt of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{flag} {path} is not a checkpoint of this script ({type(e).__name__}); pass the checkpoint.pt of a run")
    if not isinstance(ckpt, dict) or set(keys) - set(ckpt) or set(ckpt["args"]) - {f.name for f in fields(Args)}:
        fail(f"{flag} {path} is not a checkpoint of this script (other keys); pass the checkpoint.pt of a run")
    return ckpt


# --- optional: resume ---
def load_resume(args: Args) -> tuple[Optional[dict], Args]:
    """(None, args) for a new run; for --resume, the checkpoint and its hyperparameters (only where and how it runs may change)."""
    if args.resume is None:
        return None, args
    ckpt = load_checkpoint(args.resume, "--resume")
    try:
        ckpt["ranks"] = pickle.loads(ckpt["resume_state"])  # the per-rank RNGs, envs and Carry
    except Exception as e:
        fail(f"--resume {args.resume}: its resume_state does not unpickle ({type(e).__name__}); pass a whole checkpoint.pt")
    if set(ckpt["args"]) != {f.name for f in fields(Args)}:  # its Carry and env state are another version's too
        fail(f"--resume {args.resume} was written by another version of {os.path.basename(__file__)}; start anew")
    keep = {"device", "num_threads", "resume", "save_every", "track"}
    return ckpt, Args(**{**ckpt["args"], **{k: v for k, v in asdict(args).items() if k in keep}})


def restore_checkpoint(ckpt: Optional[dict], agent: Agent, optimizer: torch.optim.Optimizer, envs: gym.vector.VectorEnv,
                       rng: np.random.Generator, carry: Carry, rank: int, world_size: int) -> tuple[int, int, Carry]:  # fmt: skip
    """(start_iteration, global_step, carry) of a new run, or of the checkpoint after loading its weights, optimizer,
    RNGs and envs. Envs not saved (Atari's, a crash's) start fresh episodes seeded from the iteration, not the first games."""
    if ckpt is None:
        return 1, 0, carry
    agent.load_state_dict(ckpt["agent"])
    optimizer.load_state_dict(ckpt["optimizer"])
    ranks, iteration, global_step = ckpt["ranks"], ckpt["iteration"], ckpt["global_step"]
    mine = ranks[rank] if len(ranks) == world_size else None
    if mine is None:
        note(f"checkpoint has {len(ranks)} processes, this run {world_size}; RNGs and envs start fresh")
    else:
        random.setstate(mine["global_rngs"]["python"])
        np.random.set_state(mine["global_rngs"]["numpy"])
        torch.set_rng_state(mine["global_rngs"]["torch"])
        rng.bit_generator.state = mine["rng"]
    if mine is not None and mine["envs"] is not None:
        vars(envs).update(pickle.loads(mine["envs"]))
        carry = Carry(**mine["carry"])
    else:
        if mine is not None:
            note("the checkpoint of a crash: resumed training starts fresh episodes" if mine.get("crash") else "these envs cannot be saved; resumed training starts fresh episodes")
        seed = int(np.random.SeedSequence([ckpt["args"]["seed"], rank, iteration]).generate_state(1)[0]) % 2**30  # ale: int32
        carry = Carry.start(envs, seed, ckpt["args"]["action_masks"], global_step)
    return iteration + 1, global_step, carry


# --- Signals ---
def install_stop_handlers(device: torch.device) -> Callable[[], bool]:
    """SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends) ask to stop: the current iteration finishes and checkpoints,
    then the process exits 130; a second Ctrl-C interrupts at once. stop_requested() is a collective (all ranks call it)."""
    requested = False

    def request_stop(signum, frame):
        nonlocal requested
        requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def stop_requested() -> bool:
        if dist.is_initialized():  # optional: torchrun
            return bool(mean_across_ranks(torch.tensor(float(requested), device=device)).item())
        return requested

    return stop_requested


def exit_interrupted(logger: Logger, global_step: int, envs: gym.vector.VectorEnv) -> NoReturn:
    print0(f"interrupted: checkpoint at global_step {global_step:,} in {logger.checkpoint_path}; continue with --resume {logger.checkpoint_path}")
    envs.close()
    leave_process_group()  # optional: torchrun
    sys.exit(130)


# --- Device and seeds ---
def pick_device(name: str, gpu_pays: bool) -> tuple[torch.device, str]:
    """The torch device and why. `auto` takes a GPU (cuda, then mps) only when gpu_pays: for a small MLP the GPU's per-op
    launch and copy costs exceed the arithmetic it saves. Under torchrun, `cuda` is the GPU of the local rank."""
    reason = f"--device {name}"
    if name == "auto":
        name, reason = auto_device(gpu_pays, torch.cuda.is_available(), torch.backends.mps.is_available())
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # optional: torchrun
        if (local_rank := int(os.environ["LOCAL_RANK"])) >= torch.cuda.device_count():
            fail(f"--device {name}: torchrun started local rank {local_rank} but only {torch.cuda.device_count()} GPU(s)"
                 " are visible; start one process per GPU or pass --device cpu")  # fmt: skip
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


def set_num_threads(num_threads: int) -> None:
    """--num-threads, or 1 when 0: more only slow the MLP, and the CNN beside busy cores (Breakout, 2 cores, 2 threads: 1.9-3.5x)."""
    torch.set_num_threads(num_threads or 1)


def seed_everything(seed: int, torch_deterministic: bool) -> np.random.Generator:
    """Seed python, numpy and torch; return the run's own numpy generator (action noise, minibatch order)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    return np.random.default_rng(seed)


# --- optional: torchrun ---
# Every collective gets tensors on the training device or objects (through the CPU): the group serves both.
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join torchrun's process group if any (on cuda: nccl for cuda tensors, gloo for the rest); (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def broadcast_parameters(agent: nn.Module) -> None:
    for p in agent.parameters() if dist.is_initialized() else []:
        dist.broadcast(p.data, src=0)


def average_gradients(agent: nn.Module) -> None:
    """All-reduce the gradients as one flat tensor (one collective instead of one per parameter); one process: nothing."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in agent.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, reduced in zip(grads, torch.split(flat / dist.get_world_size(), [g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x / (dist.get_world_size() if dist.is_initialized() else 1)


def check_parameters_identical(agent: nn.Module) -> None:
    """Every process applied the same averaged gradients, so all must hold the same parameters."""
    flat = nn.utils.parameters_to_vector(agent.parameters()).detach()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(g, flat) for g in gathered):
        raise RuntimeError("parameters diverged across processes")
    print0(f"parameters identical on {dist.get_world_size()} processes")


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while rank 0 still evaluates or writes: gloo aborts on a peer gone early
        dist.destroy_process_group()
        # gloo's threads release the last collectives' tensors later, taking the GIL: an interpreter shutting down aborts
        time.sleep(0.1)


# --- The end of a run ---
def finish(agent: Agent, args: Args, device: torch.device, logger: Logger, envs: gym.vector.VectorEnv, global_step: int) -> None:
    """Close the envs; under torchrun check that all processes hold the same parameters; evaluate on rank 0."""
    envs.close()
    if dist.is_initialized():  # optional: torchrun
        check_parameters_identical(agent)
    if logger.rank == 0 and args.eval_episodes > 0:  # optional: evaluation
        evaluate_and_log(agent, args, device, logger, global_step)
    logger.finish()
    leave_process_group()  # optional: torchrun


# --- optional: evaluation ---
def evaluate(agent: Agent, env_id: str, env_kwargs: dict, episodes: int, seed: int, device: torch.device, stochastic: bool,
             video_path: Optional[str], use_masks: bool = True) -> list[float]:  # fmt: skip
    """Returns of whole episodes (games on Atari), undiscounted, unclipped; video_path records the first (Atari: what the agent sees)."""
    envs = make_envs(env_id, 1, env_kwargs, render=video_path is not None and not is_atari(env_id))
    torch.manual_seed(seed)
    obs, info = envs.reset(seed=seed)
    n_actions, step = action_counts(envs.single_action_space), 0
    returns, episode_return, frames = [], 0.0, []
    while len(returns) < episodes:
        if video_path is not None and not returns:  # optional: video
            frames.append(obs[0, -1] if is_atari(env_id) else envs.render()[0])
        with torch.no_grad():
            x, mask = torch.as_tensor(obs, device=device), mask_tensor(valid_actions(info, 1, n_actions, step, use_masks), device)
            action = agent.get_action_and_value(x, None, mask)[0] if stochastic else agent.greedy_action(x, mask)
        obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        step += 1
        episode_return += float(reward[0])
        if terminated[0] or truncated[0]:
            returns.append(episode_return)
            episode_return = 0.0
            obs, info = envs.reset()
    envs.close()
    if video_path is not None:  # optional: video
        from moviepy import ImageSequenceClip

        frames = [np.repeat(f[..., None], 3, axis=-1) if f.ndim == 2 else f for f in frames]
        ImageSequenceClip(frames, fps=envs.metadata.get("render_fps", 30) or 30).write_videofile(video_path, logger=None)
    return returns


def evaluate_and_log(agent: Agent, args: Args, device: torch.device, logger: Logger, global_step: int) -> None:
    """The final policy over --eval-episodes whole episodes (the raw game score on Atari)."""
    video_path = None
    if args.capture_video:  # optional: video
        os.makedirs(os.path.dirname(video_path := os.path.join(logger.run_dir, "videos", "eval.mp4")), exist_ok=True)
    env_kwargs = json.loads(args.env_kwargs)
    returns = evaluate(agent, args.env_id, env_kwargs, args.eval_episodes, args.seed + 10_000, device, args.eval_stochastic, video_path, args.action_masks)  # fmt: skip
    logger.log(global_step, {"eval/episodic_return": float(np.mean(returns)), "eval/episodic_return_std": float(np.std(returns))})
    print(f"eval: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
    if logger.wandb_run is not None and video_path is not None:  # optional: video, wandb
        import wandb

        logger.wandb_run.log({"global_step": global_step, "videos/eval": wandb.Video(video_path, format="mp4")})


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: play the checkpoint's policy, reading only its weights_only=True part."""
    ckpt = load_checkpoint(args.eval_checkpoint, "--eval-checkpoint", keys=("args", "agent", "n_actions"))
    env_id = ckpt["args"]["env_id"]
    env_kwargs = check_env(env_id, ckpt["args"].get("env_kwargs", "{}"))  # checkpoints before --env-kwargs had none
    device, _ = pick_device(args.device, gpu_pays=is_atari(env_id))
    set_num_threads(args.num_threads)
    envs = make_envs(env_id, 1, env_kwargs)
    agent = Agent(envs.single_observation_space, ckpt["n_actions"], is_atari(env_id)).to(device)
    envs.close()
    mine, theirs = agent.state_dict(), ckpt["agent"]
    if differs := next((k for k in [*mine, *theirs] if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape), None):
        fail(f"--eval-checkpoint {args.eval_checkpoint}: its network does not fit this script's (first differing parameter: {differs}); evaluate it with the script that wrote it")  # fmt: skip
    agent.load_state_dict(ckpt["agent"])
    returns = evaluate(agent, env_id, env_kwargs, max(args.eval_episodes, 1), args.seed, device, args.eval_stochastic, None, ckpt["args"].get("action_masks", True))  # before --no-action-masks: masked  # fmt: skip
    print(f"eval {env_id}: return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")


# --- Argument checks ---
# One line naming the flag, exit status 2, as tyro does for a malformed flag.
def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_env(env_id: str, env_kwargs: str) -> dict:
    """The parsed --env-kwargs, once env_id makes with them an env acting in Discrete/MultiDiscrete (from 0), seeing Box/Discrete/Dict/Tuple."""
    try:
        kwargs = json.loads(env_kwargs)
        assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
        fail(f"--env-kwargs {env_kwargs} is not a JSON object; pass e.g. '{{\"map_name\": \"8x8\"}}'")
    try:
        atari = ":" not in env_id and is_atari(env_id)
    except gym.error.Error:
        atari = False  # gym.make below says what is wrong with the id
    if atari:
        # continuous: a Box action space; life_loss_info: a termination at every lost life, with no reset
        ours = {"self", "game", "num_envs", "autoreset_mode", "reward_clipping", "episodic_life", "life_loss_info", "continuous"}
        unknown = sorted(set(kwargs) - set(inspect.signature(AtariVectorEnv.__init__).parameters) - ours)
        if unknown or ours & set(kwargs):
            fail(f"--env-kwargs {env_kwargs}: ale-py's AtariVectorEnv takes no {(unknown or sorted(ours & set(kwargs)))[0]} here")
        return kwargs
    try:
        with warnings.catch_warnings():  # the error says it in one line; make_envs warns again if the id works
            warnings.simplefilter("ignore")
            env = gym.make(env_id, **kwargs)
    except Exception as e:  # a missing module, an unknown or deprecated id, a keyword the env does not take
        flag = f"--env-kwargs {env_kwargs}" if kwargs and isinstance(e, TypeError) else f"--env-id {env_id}"
        fail(f"{flag}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    action_space, obs_space = env.action_space, env.observation_space
    env.close()
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        hint = "; use ppo_continuous.py" if isinstance(action_space, gym.spaces.Box) else ""
        fail(f"--env-id {env_id} has a {type(action_space).__name__} action space; ppo_discrete.py needs Discrete or MultiDiscrete{hint}")
    if isinstance(action_space, gym.spaces.MultiDiscrete) and len(action_space.shape) != 1:
        fail(f"--env-id {env_id} has a MultiDiscrete action space of shape {action_space.shape}; ppo_discrete.py takes one row (nvec 1-D)")
    if np.any(action_space.start != 0):  # the policy numbers each dimension's actions from 0
        fail(f"--env-id {env_id} has an action space that starts at {action_space.start}; ppo_discrete.py needs actions from 0")
    try:
        flat_observations(env)
    except NotImplementedError:
        fail(f"--env-id {env_id}: its {obs_space} observation space has a part gymnasium cannot flatten")
    if not isinstance(obs_space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.Dict, gym.spaces.Tuple)):
        fail(f"--env-id {env_id} has a {type(obs_space).__name__} observation space; ppo_discrete.py takes Box, Discrete, Dict and Tuple")
    return kwargs


@functools.cache
def all_valid(num_envs: int, n_actions: int) -> np.ndarray:
    """One all-True mask per shape (nothing writes to it), for envs without masks: no array built at every step."""
    return np.ones((num_envs, n_actions), dtype=bool)


def mask_tensor(mask: np.ndarray, device: torch.device) -> Optional[torch.Tensor]:
    """mask on the device, or None for all_valid's shared mask: an env without masks costs no copy and no masking."""
    return None if mask is all_valid(*mask.shape) else torch.as_tensor(mask, device=device)


def action_counts(space: gym.Space) -> Union[int, list[int]]:
    """What Agent takes as n_actions: a Discrete space's n, a MultiDiscrete space's nvec."""
    return int(space.n) if isinstance(space, gym.spaces.Discrete) else [int(n) for n in space.nvec]


def valid_actions(info: dict, num_envs: int, n_actions: Union[int, list[int]], global_step: int, use_masks: bool, ended=False) -> np.ndarray:
    """The valid actions [num_envs, sum(nvec)] of each env's observation: info["action_mask"] (gymnasium's convention) where
    the env gives one, use_masks (--action-masks) and the episode goes on (not ended), else all. MultiDiscrete: the dimensions' masks side by side (sb3-contrib's
    MaskablePPO) or a tuple of one per dimension (MultiDiscrete.sample's); one that allows nothing is a one-line error."""
    total = n_actions if isinstance(n_actions, int) else sum(n_actions)  # plain Python: this runs at every step
    given = use_masks and "action_mask" in info and info.get("_action_mask", np.ones(num_envs, dtype=bool)) & ~np.asarray(ended)
    if given is False or not given.any():  # no masks, or every episode just ended
        return all_valid(num_envs, total)
    nvec, masks = np.atleast_1d(n_actions), np.ones((num_envs, total), dtype=bool)
    env_masks = np.asarray(info["action_mask"])[given]
    if env_masks.dtype == object:  # the vector env kept each env's tuple of per-dimension masks as an object
        env_masks = np.stack([np.hstack(m) for m in env_masks])  # (or a plain list)
    if env_masks.shape[1:] != masks.shape[1:]:
        fail(f"the env's action_mask has shape {env_masks.shape[1:]} per env; its {nvec.sum()} actions need shape {masks.shape[1:]} (--no-action-masks ignores it)")
    masks[given] = env_masks != 0
    allowed = np.logical_or.reduceat(masks, np.cumsum(nvec) - nvec, axis=-1)  # [num_envs, dimensions]
    if not allowed.all():
        i, d = np.argwhere(~allowed)[0]
        fail(f"the env's action_mask allows no action at global step {global_step} (env {i}{f', dimension {d}' if len(nvec) > 1 else ''}); fix the env or pass --no-action-masks")
    return masks


def check_args(args: Args, world_size: int) -> tuple[int, int, int]:
    """Validate the flags; return (batch_size, minibatch_size, num_iterations) per process."""
    for names, ok, need in [
        (("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs"), lambda v: v > 0, "be positive"),
        (("save_every", "num_threads", "ent_coef", "vf_coef"), lambda v: v >= 0, "be >= 0"),
        (("learning_rate", "clip_coef", "max_grad_norm"), lambda v: v > 0, "be > 0"), (("gamma", "gae_lambda"), lambda v: 0 <= v <= 1, "lie in [0, 1]"),
    ]:  # fmt: skip
        for name in (name for name in names if not ok(getattr(args, name))):
            fail(f"--{name.replace('_', '-')} must {need}, got {getattr(args, name)}")
    if args.target_kl is not None and not args.target_kl > 0:
        fail(f"--target-kl must be > 0 (or left unset), got {args.target_kl}")
    if args.eval_episodes < 0:  # optional: evaluation
        fail(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        divisors = [d for d in range(1, min(batch_size, 64) + 1) if batch_size % d == 0]
        fail(f"--num-minibatches {args.num_minibatches} does not divide the batch "
             f"--num-envs {args.num_envs} x --num-steps {args.num_steps} = {batch_size}; pick one of {divisors}")  # fmt: skip
    num_iterations = args.total_timesteps // (batch_size * world_size)
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
             f"({batch_size * world_size} steps); raise it or lower --num-envs/--num-steps")  # fmt: skip
    if args.total_timesteps % (batch_size * world_size):
        note(f"--total-timesteps {args.total_timesteps:,} is not a whole number of batches of {batch_size * world_size:,} "
             f"steps; training {num_iterations * batch_size * world_size:,} steps ({num_iterations} iterations)")  # fmt: skip
    return batch_size, batch_size // args.num_minibatches, num_iterations


# --- Env adapters and pickling ---
# Pickling: a resumed run continues the very episodes it was playing.
def flat_observations(env: gym.Env) -> gym.Env:
    """env, its Dict or Tuple observations flattened for the MLP (FlatObservation); other envs as they are."""
    return FlatObservation(env) if isinstance(env.observation_space, (gym.spaces.Dict, gym.spaces.Tuple)) else env


class FlatObservation(gym.Wrapper):
    """A Dict or Tuple observation as one vector (gymnasium's flatten: a Discrete part one-hot, a Box part raveled; stored as
    float32); a Dict's "action_mask" key (PettingZoo's convention) goes to info["action_mask"] instead."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.masked = isinstance(space, gym.spaces.Dict) and "action_mask" in space.spaces
        self.inner = gym.spaces.Dict({k: v for k, v in space.spaces.items() if k != "action_mask"}) if self.masked else space
        self.observation_space = gym.spaces.flatten_space(self.inner)

    def flat(self, obs, info: dict) -> tuple[np.ndarray, dict]:
        if self.masked:
            info = {**info, "action_mask": obs["action_mask"]}
            obs = {k: obs[k] for k in self.inner.spaces}
        return gym.spaces.flatten(self.inner, obs), info

    def reset(self, **kwargs) -> tuple[np.ndarray, dict]:
        return self.flat(*self.env.reset(**kwargs))

    def step(self, action) -> tuple:
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self.flat(obs, info)
        return obs, reward, terminated, truncated, info


class AtariLostLivesAndFire(AtariVectorEnv):
    """ale-py's AtariVectorEnv played as CleanRL's EpisodicLifeEnv under FireResetEnv: info["life_lost"] marks a lost life (an
    autoreset step starts a new game, none lost), and where the game has FIRE, the next action of a sub-env that lost a
    life but not its game is replaced by FIRE, announced by info["fire_next"]. ale-py fires only when a game starts:
    without this a policy that does not fire waits (Breakout: the ball never relaunched) for the 27,000-frame truncation."""

    def __init__(self, game: str, num_envs: int, use_fire_reset: bool = True, **kwargs):
        super().__init__(game, num_envs, use_fire_reset=use_fire_reset, **kwargs)
        action_set = self.ale.get_action_set()
        fires = use_fire_reset and ale_py.Action.FIRE in action_set  # use_fire_reset false: no FIRE of ours either
        self.fire = action_set.index(ale_py.Action.FIRE) if fires else None

    def reset(self, **kwargs) -> tuple[np.ndarray, dict]:
        obs, info = super().reset(**kwargs)
        self.lives, self.autoreset, self.fire_next = info["lives"], np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        return obs, info

    def step(self, actions: np.ndarray) -> tuple:
        if self.fire is not None:
            actions = np.where(self.fire_next, self.fire, actions)
        obs, reward, terminated, truncated, info = super().step(actions)
        life_lost = (info["lives"] < self.lives) & ~self.autoreset
        self.lives, self.autoreset = info["lives"], terminated | truncated
        self.fire_next = life_lost & ~self.autoreset & (self.fire is not None)
        return obs, reward, terminated, truncated, {**info, "life_lost": life_lost, "fire_next": self.fire_next}


def env_state(envs: gym.vector.VectorEnv) -> Optional[bytes]:
    """A SyncVectorEnv's state pickled (episodes in progress, RNGs, pending resets), not the functions that built it; else None."""
    if not isinstance(envs, gym.vector.SyncVectorEnv):
        return None  # ale-py's C++ envs
    try:
        return pickle.dumps({k: v for k, v in vars(envs).items() if k != "env_fns"})
    except Exception as e:
        note(f"the envs cannot be pickled ({type(e).__name__}: {e}); a resumed run will start fresh episodes")
        return None


# --- optional: fast-path ---
# Agent.get_action_and_value itself, for the MLP derived as numpy code (torch's per-op overhead
# dominates at this size): its torch.export graph, once a run, as one numpy call per node, fed the weights and checked.

FAST_PATH_ATOL = 1e-5  # float32 numpy vs float32 torch, the same ops in other summation orders: 1e-7 to 1e-6 (relative beyond 1)
# in CartPole's log-probs, entropies and values, 1e-5 with pre-activations in the hundreds. (forward's .float(): no float64 copy.)
# One expression per aten op, from the node's arguments by their schema names (one it does not name keeps its default); shapes
# are fixed (num_envs rows). numpy has no erf, and one torch kernel on the same memory beats layer_norm's eight numpy calls.
NUMPY_OF_ATEN = {
    "linear": "{input} @ {weight}.T + {bias}", "addmm": "{input} + {mat1} @ {mat2}", "matmul": "{input} @ {other}", "tanh": "np.tanh({input})",
    "relu": "np.maximum({input}, 0)", "sigmoid": "1 / (1 + np.exp(-{input}))", "gelu": "F.gelu(T({input}), approximate={approximate}).numpy()",
    "layer_norm": "F.layer_norm(T({input}), {normalized_shape}, T({weight}), T({bias}), {eps}).numpy()", "exp": "np.exp({input})",
    "log_softmax": "np_log_softmax({input}, {dim})", "softmax": "np.exp(np_log_softmax({input}, {dim}))", "log": "np.log({input})",
    "neg": "-{input}", "abs": "np.abs({input})", "sqrt": "np.sqrt({input})", "clamp": "np.clip({input}, {min}, {max})", "pow": "{input} ** {exponent}",
    "mul": "{input} * {other}", "div": "{input} / {other}", "add": "{input} + {other}", "sub": "{input} - {other}", "rsub": "{other} - {input}",
    "bitwise_not": "~{input}", "logical_not": "~{input}", "eq": "{input} == {other}", "masked_fill": "np.where({mask}, {value}, {input})",
    "where": "np.where({condition}, {input}, {other})", "cat": "np.concatenate({tensors}, {dim})", "gather": "np.take_along_axis({input}, {index}, {dim})",
    "sum": "{input}.sum({dim}, keepdims={keepdim})", "mean": "{input}.mean({dim}, keepdims={keepdim})", "amax": "{input}.max({dim}, keepdims={keepdim})",
    "one_hot": "np.eye({num_classes}, dtype=np.int64)[{input}]", "multinomial": "np_sample(rng, {input})",
}  # fmt: skip
RESHAPES, CASTS = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze"}, {"to", "_to_copy", "clone", "alias", "detach", "detach_", "lift_fresh_copy"}


def np_log_softmax(x: np.ndarray, dim: int) -> np.ndarray:
    shifted = x - x.max(dim, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(dim, keepdims=True))


def np_sample(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """torch.multinomial(probs, 1) by the exponential race (Gumbel-max without logs): argmax of probs / Exp(1) noise."""
    return (probs / -np.log(rng.random(probs.shape, dtype=np.float32))).argmax(-1, keepdims=True)


def numpy_source(ep: torch.export.ExportedProgram, name: str, outputs: list[int], constants: dict) -> str:
    """Source of name(rng, *inputs): the graph's outputs numbered in outputs, one numpy call per node they need; weights
    and constants (added to constants) are globals named as in the graph. NotImplementedError names what it lacks."""
    graph_outputs = list(ep.graph.output_node().args[0])
    needed, lines = {graph_outputs[i] for i in outputs}, []
    for node in reversed(ep.graph.nodes):  # only what the outputs need (the rollout skips the entropy)
        if node in needed:
            needed.update(node.all_input_nodes)
    for node in (n for n in ep.graph.nodes if n.op == "call_function" and n in needed):
        x, out = node.args[0], node.meta["val"]
        if node.target.__name__ == "getitem":
            lines.append(f"{node.name} = {x}[{node.args[1]}]")
            continue
        op, kwargs = node.target._schema.name.split("::")[-1], node.normalized_arguments(ep.graph_module, normalize_to_only_use_kwargs=True).kwargs  # fmt: skip
        shape = x.meta["val"].shape if isinstance(x, torch.fx.Node) else None
        if not node.all_input_nodes and torch.Tag.nondeterministic_seeded not in node.target.tags:  # arange, full, ...
            constants[node.name] = node.target(*node.args, **node.kwargs).cpu().numpy()
            continue
        if op in RESHAPES:
            code = f"{x}" if shape == out.shape else f"{x}.reshape({tuple(out.shape)})"
        elif op in CASTS:
            code = f"{x}" if x.meta["val"].dtype == out.dtype else f"{x}.astype(np.{torch.empty(0, dtype=out.dtype).numpy().dtype})"
        elif op == "split_with_sizes":  # slices: views, no copies
            ends, colons = np.cumsum([0, *kwargs["split_sizes"]]), ":, " * (kwargs["dim"] % len(shape))
            code = "(" + "".join(f"{x}[{colons}{a}:{b}], " for a, b in zip(ends, ends[1:])) + ")"
        elif op == "cat" and len(x) == 1:
            code = f"{x[0]}"
        elif op == "sum" and kwargs["dim"] and all(shape[d] == 1 for d in kwargs["dim"]) and kwargs["dtype"] is None:
            code = f"{x}.reshape({tuple(out.shape)})"  # a sum of one term
        elif op == "gather" and len(shape) == 2 and kwargs["dim"] % 2 == 1:  # fancy indexing: 6x take_along_axis's speed
            code, constants[f"rows_{shape[0]}"] = f"{x}[rows_{shape[0]}, {kwargs['index']}]", np.arange(shape[0])[:, None]
        elif op in NUMPY_OF_ATEN:
            code = NUMPY_OF_ATEN[op]
            for arg in node.target._schema.arguments:  # cuDNN's switch aside, one it does not name keeps its default
                if "{" + arg.name + "}" not in code and arg.name != "cudnn_enable" and arg.has_default_value() and kwargs[arg.name] != arg.default_value:
                    raise NotImplementedError(f"it has no numpy for aten.{op} with {arg.name}={kwargs[arg.name]}")
            code = code.format(**{k: f"({', '.join(map(str, v))},)" if isinstance(v, list) else str(v) if isinstance(v, torch.fx.Node) else repr(v) for k, v in kwargs.items()})  # fmt: skip
        else:
            raise NotImplementedError(f"it has no numpy for aten.{op}")
        lines.append(f"{node.name} = {code}".replace(" + None", ""))  # a linear layer without bias
    inputs = ", ".join(n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
    returned = ", ".join(str(graph_outputs[i]) for i in outputs)
    return "\n".join([f"def {name}(rng, {inputs}):", *(f"    {line}" for line in lines), f"    return {returned}\n"])


class DerivedPolicy(nn.Module):
    """get_action_and_value for one kind of input (with a mask or without) as numpy functions of its exported graph (a
    module is what torch.export takes): act (action, log-prob, value), value, check (all four); feed() gives the weights."""

    def __init__(self, agent: Agent, obs: torch.Tensor, *mask: torch.Tensor):
        super().__init__()
        self.agent, constants = agent, {}
        sig = (ep := torch.export.export(self, (obs, *mask))).graph_signature
        source = "".join(numpy_source(ep, name, outs, constants) for name, outs in (("act", [0, 1, 3]), ("value", [3]), ("check", [0, 1, 2, 3])))
        where = ((sig.inputs_to_parameters, agent.get_parameter), (sig.inputs_to_buffers, agent.get_buffer), (sig.inputs_to_lifted_tensor_constants, ep.constants.get))  # fmt: skip
        self.tensors = {name: get(t.removeprefix("agent.")) for names, get in where for name, t in names.items()}
        self.transposed = [name for name in self.tensors if f"{name}.T" in source]  # a linear layer's weight
        for name in self.transposed:
            source = source.replace(f"{name}.T", f"{name}_T")
        self.source, self.ns = source, {"np": np, "F": F, "T": lambda x: x if x is None else torch.from_numpy(x), "np_log_softmax": np_log_softmax, "np_sample": np_sample, **constants}  # fmt: skip
        exec(source, self.ns)
        self.act, self.value, self.check = self.ns["act"], self.ns["value"], self.ns["check"]

    def forward(self, obs: torch.Tensor, *mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.agent.get_action_and_value(obs, None, *mask)

    def feed(self) -> None:
        """The current weights: numpy views of the tensors, a linear layer's weight transposed once (contiguous)."""
        for name, t in self.tensors.items():
            self.ns[name] = t.detach().cpu().numpy()
        for name in self.transposed:
            self.ns[f"{name}_T"] = np.ascontiguousarray(self.ns[name].T)


# --- The rollout's policy ---

ON_POLICY_ATOL = 1e-3  # max |log-ratio| of an update's first minibatch, before any step; the same policy in
# float32 gives ~1e-6 (batch-dependent GPU kernels up to ~1e-4), a policy other than the trained one far more.


class RolloutPolicy:
    """get_action_and_value derived as numpy code while it reproduces the agent, else in torch; a forbidden action stops the run."""

    def __init__(self, agent: Agent, device: torch.device, rng: np.random.Generator, obs: np.ndarray, mask: np.ndarray):
        self.agent, self.device, self.rng, self.noted_plain, self.fast = agent, device, rng, False, False
        self.offsets = agent.offsets.cpu().numpy()
        self.derived, self.fast = {}, not agent.pixels  # derived: by input kind (mask?)  # optional: fast-path
        self.refresh(obs, mask)  # set-up: the first torch.export takes seconds (imports)  # optional: fast-path

    def refresh(self, obs: np.ndarray, mask: np.ndarray) -> None:  # optional: fast-path
        """Derive (once) the kinds of input obs and mask need (values: no mask), feed the weights, check on obs; failing: aside."""
        masked = mask is not all_valid(*mask.shape)
        if not self.fast:
            return
        try:
            for kind in {False, masked}:
                if kind not in self.derived:
                    self.derived[kind] = DerivedPolicy(self.agent, *(torch.as_tensor(x, device=self.device) for x in [obs, mask][: 1 + kind]))
                self.derived[kind].feed()
            cause = self.mismatch(obs, mask, masked)
        except Exception as e:  # a research edit it cannot follow must never stop the run
            cause = str(e) if isinstance(e, NotImplementedError) else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        if cause is not None:
            self.fast = False
            note(f"the numpy rollout path steps aside: {cause}; the rollout runs Agent.get_action_and_value in torch")

    def mismatch(self, obs: np.ndarray, mask: np.ndarray, masked: bool) -> Optional[str]:  # optional: fast-path
        """Where the derived code departs from get_action_and_value (log-probs of actions it draws, entropies, values), or None."""
        action, *mine = self.derived[masked].check(np.random.default_rng(0), obs, *([mask] if masked else []))
        with torch.no_grad():
            x = torch.as_tensor(obs, device=self.device)
            _, *reference = self.agent.get_action_and_value(x, torch.as_tensor(action, device=self.device), mask_tensor(mask, self.device))
        pairs = zip(("log-probs", "entropies", "values", "get_value's values"), [*mine, self.value(obs)], [*reference, self.agent.get_value(x)])
        for name, a, b in ((name, a, b.detach().cpu().numpy()) for name, a, b in pairs):
            if a.shape != b.shape:
                return f"its {name} have shape {a.shape}, Agent.get_action_and_value's {b.shape}"
            if not np.max(np.abs(a - b) / (1 + np.abs(b))) <= FAST_PATH_ATOL:  # absolute near 0, relative beyond 1
                return f"its {name} differ from Agent.get_action_and_value's by up to {np.abs(a - b).max():.3g}"
        return None

    def act(self, obs: np.ndarray, mask: np.ndarray, global_step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Actions sampled from the policy (among those mask allows), their log-probs and the values of obs, in numpy."""
        masked = mask is not all_valid(*mask.shape)
        if self.fast and masked not in self.derived:  # a run's first mask, met mid-rollout  # optional: fast-path
            self.refresh(obs, mask)
        action, logprob, value = self.sample(obs, mask, masked)
        if masked and not (allowed := np.take_along_axis(mask, action.reshape(len(mask), -1) + self.offsets, 1).all(-1)).all():  # an edit that undid the mask
            i = np.flatnonzero(~allowed)[0]
            fail(f"the policy sampled action {action[i]} that env {i}'s action_mask forbids at global step {global_step}: Agent.distribution must give masked actions no probability (MASKED_LOGIT)")  # fmt: skip
        return action, logprob, value

    def sample(self, obs: np.ndarray, mask: np.ndarray, masked: bool) -> tuple[np.ndarray, ...]:
        if self.fast:  # optional: fast-path
            return self.derived[masked].act(self.rng, obs, *([mask] if masked else []))
        with torch.no_grad():
            out = self.agent.get_action_and_value(torch.as_tensor(obs, device=self.device), None, mask_tensor(mask, self.device))
        action, logprob, _, value = (t.cpu().numpy() for t in out)
        return action, logprob, value

    def value(self, obs: np.ndarray) -> np.ndarray:
        if self.fast:  # optional: fast-path
            return self.derived[False].value(None, obs)
        with torch.no_grad():
            return self.agent.get_value(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    def check_on_policy(self, max_logratio: float, iteration: int) -> None:
        """The update's first minibatch must find the policy that collected it (log-ratio ~0): else the derived code is
        wrong in a way its check missed, and steps aside; or the plain path's policy is no function of its weights."""
        if max_logratio <= ON_POLICY_ATOL:
            return
        figure = f"on-policy check: max |log-ratio| {max_logratio:.3g} at the first minibatch of iteration {iteration}"
        if self.fast:
            self.fast = False
            note(f"{figure}; the rollout switches to the plain get_action_and_value for the rest of the run")
        elif not self.noted_plain:
            self.noted_plain = True
            note(f"{figure} with the plain get_action_and_value: the policy is not a function of its weights alone "
                 "(dropout? batch-dependent layers?); training goes on")  # fmt: skip


# --- Crashes and non-finite numbers ---
# A crash: an exception (the env's step or reset, out of memory, any other) ends the run after its traceback with one
# line naming the checkpoint of the last completed update (exit status 1); under torchrun the others wait in a collective.
class CrashCheckpoint:
    """Writes, when an exception leaves the with block, the checkpoint of the last completed update (Logger.last): its
    weights and optimizer as they are (unless the next update had begun), the RNGs as they are, no envs (fresh episodes)."""

    def __init__(self, logger: Logger, *state):
        self.logger, self.state = logger, state  # args, agent, optimizer, carry, rng, envs, guard

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, e, tb) -> None:
        if not isinstance(e, Exception) or dist.is_initialized():
            return  # none; an exit that says what it keeps (a one-line error, Ctrl-C); torchrun's (no checkpoint)
        (args, agent, optimizer, carry, rng, envs, guard), path = self.state, self.logger.checkpoint_path
        sys.excepthook(kind, e, tb)
        kept = f"no update completed, {f'the last checkpoint: {path}' if os.path.exists(path) else 'no checkpoint'}"
        if self.logger.last is not None:
            iteration, global_step, log_size = self.logger.last
            self.logger.file.seek(log_size)
            self.logger.file.truncate()  # the interrupted rollout's episodes come again
            save_checkpoint(self.logger, args, agent, optimizer, iteration, global_step, carry, rng, envs, crash=True)
            how = "exactly its weights" if guard.iteration <= iteration else "the weights the next update had begun to change"
            kept = f"checkpoint of iteration {iteration} in {path} ({how}); continue with --resume {path}"
        print(f"error: {type(e).__name__}: {e}; {kept}", file=sys.stderr, flush=True)
        sys.exit(1)


# Non-finite numbers: a step on a non-finite loss or gradient is skipped and counted; too many in a row, or a non-finite
# weight, stop the run before anything non-finite reaches a rollout or a checkpoint. The weights are checked after each
# update and at each skip: a step on a finite loss and clipped gradient keeps finite weights finite (a check per step: -3% SPS).

MAX_SKIPPED_STEPS = 10


def stop_nonfinite(what: str, iteration: int, where: str, checkpoint_path: str) -> NoReturn:
    kept = checkpoint_path if os.path.exists(checkpoint_path) else "none written"
    at = f"at iteration {iteration} ({where})" if iteration else f"at {where}"
    print0(f"error: non-finite {what} {at}; stopped, last good checkpoint kept: {kept}", file=sys.stderr)
    sys.exit(1)


def check_env_output(env_id: str, obs: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray, global_step: int, steps_per_row: int,
                     checkpoint_path: str) -> None:  # fmt: skip
    """Stop the run with one line naming the env step and env that returned a NaN or an infinity (observation or reward)."""
    if np.issubdtype(obs.dtype, np.floating):  # Atari's uint8 pixels cannot go non-finite
        returned = np.concatenate([obs[1:], next_obs[None]]).reshape(len(rewards), rewards.shape[1], -1)
    else:
        returned = np.zeros(rewards.shape + (1,))
    for what, x in (("observation", returned), ("reward", rewards[..., None])):
        bad = ~np.isfinite(x).all(-1)
        if bad.any():
            t, i = np.argwhere(bad)[0]
            value = x[t, i][~np.isfinite(x[t, i])][0]
            step = global_step - (len(rewards) - 1 - t) * steps_per_row
            stop_nonfinite(f"{what} ({value}) from --env-id {env_id}", 0, f"global step {step}, env {i}", checkpoint_path)


class NonFiniteGuard:
    def __init__(self, checkpoint_path: str):
        self.checkpoint_path, self.iteration, self.skipped, self.in_a_row = checkpoint_path, 0, 0, 0

    def at(self, iteration: int) -> "NonFiniteGuard":
        """The guard for the update of this iteration (its count of skipped steps starts at 0)."""
        self.iteration, self.skipped = iteration, 0
        return self

    def skip(self, loss: torch.Tensor, grad_norm: torch.Tensor, agent: Agent, epoch: int, minibatch: int) -> bool:
        """True (gradients zeroed) when the loss or the gradient norm is non-finite; MAX_SKIPPED_STEPS in a row stop the run."""
        finite_loss = math.isfinite(loss.item())
        if finite_loss and math.isfinite(grad_norm.item()):
            self.in_a_row = 0
            return False
        agent.zero_grad()
        self.check_weights(agent, epoch, minibatch)
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        if self.in_a_row >= MAX_SKIPPED_STEPS:
            what = f"{'gradient norm' if finite_loss else 'loss'} ({self.in_a_row} steps in a row)"
            stop_nonfinite(what, self.iteration, f"epoch {epoch + 1}, minibatch {minibatch + 1}", self.checkpoint_path)
        return True

    def check_weights(self, agent: Agent, epoch: int, minibatch: int) -> None:
        if math.isfinite(sum(p.detach().sum().item() for p in agent.parameters())):  # a third of the time of a check per tensor
            return
        name = first_nonfinite(agent.named_parameters())
        if name is not None:
            stop_nonfinite(f"weight {name}", self.iteration, f"epoch {epoch + 1}, minibatch {minibatch + 1}", self.checkpoint_path)


def first_nonfinite(named_tensors) -> Optional[str]:
    """The name of the first floating tensor holding a NaN or an infinity, or None."""
    for name, t in named_tensors:
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            return name
    return None


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:  # optional: evaluation
        sys.exit(evaluate_checkpoint(args))
    train(args)
