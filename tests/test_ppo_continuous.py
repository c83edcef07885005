"""Tests of ppo_continuous.py: the Gaussian policy, the normalisers and one PPO update against torch.distributions
and naive references, the episode-boundary logic and action clipping on tiny custom envs, the fast paths' copy
safety, the collectives' devices, and the CLI end to end in subprocesses (MuJoCo InvertedPendulum-v5 and
HalfCheetah-v5)."""

import copy
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, check_the_fence_recipe, check_the_readme_line_counts, comparable, interrupt_with_ctrl_c, read_metrics, run_script, run_torchrun, wandb_offline_log

import ppo_continuous as ppo


def box(n, bound=1.0):
    return gym.spaces.Box(-bound, bound, (n,), np.float32)


@pytest.fixture
def restore_signals():
    """train() installs its SIGINT/SIGTERM handlers; an in-process run must not leave them to later tests."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


# ---------------------------------------------------------------- the Gaussian policy


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    log_std = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    actions = mean + 3 * torch.randn(7, 4, generator=gen, dtype=torch.float64)
    ref = torch.distributions.Normal(mean, log_std.exp())
    logp = ppo.Gaussian(mean, log_std).log_prob(actions)
    np.testing.assert_allclose(logp.numpy(), ref.log_prob(actions).sum(-1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ppo.Gaussian(mean, log_std).entropy().numpy(), ref.entropy().sum(-1).numpy(), rtol=1e-12)
    # Gradients flow to the mean and to the log std as through torch.distributions.
    mean.requires_grad_(True), log_std.requires_grad_(True)
    g_mine = torch.autograd.grad(ppo.Gaussian(mean, log_std).log_prob(actions).sum(), (mean, log_std))
    g_ref = torch.autograd.grad(torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(), (mean, log_std))
    for a, b in zip(g_mine, g_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10)
    # The agent samples from the Gaussian it scores: mean and std of many samples, and their log-probs.
    torch.manual_seed(0)
    agent = ppo.Agent(3, box(2), (8,), "tanh", 0.0)
    with torch.no_grad():
        agent.actor_mean[-1].bias.copy_(torch.tensor([1.0, -2.0]))
        agent.actor_mean[-1].weight.zero_()
        agent.actor_logstd.copy_(torch.tensor([[0.0, np.log(0.5)]]))
        samples, logp, entropy, _ = agent.get_action_and_value(torch.randn(200_000, 3))
    np.testing.assert_allclose(samples.mean(0).numpy(), [1.0, -2.0], atol=0.01)
    np.testing.assert_allclose(samples.std(0).numpy(), [1.0, 0.5], atol=0.01)
    ref = torch.distributions.Normal(torch.tensor([1.0, -2.0]), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(logp, ref.log_prob(samples).sum(-1))
    torch.testing.assert_close(entropy, ref.entropy().sum().expand(200_000))


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
def test_derived_rollout_policy_matches_agent(activation):
    torch.manual_seed(0)
    agent = ppo.Agent(5, box(3), (16, 8), activation, log_std_init=-0.5)
    with torch.no_grad():
        for p in agent.parameters():  # away from the init, so every layer and the log std matter
            p.add_(0.3 * torch.randn_like(p))
    obs = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    policy = ppo.DerivedPolicy(agent, obs)
    actions, logprob, value = policy.act(obs, np.random.default_rng(1))
    with torch.no_grad():
        mean = agent.greedy_action(torch.as_tensor(obs))
        _, ref_logprob, _, ref_value = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))
    np.testing.assert_allclose(value, ref_value.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(policy.value(obs), ref_value.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logprob, ref_logprob.numpy(), rtol=1e-5, atol=1e-5)
    noise = np.random.default_rng(1).standard_normal(actions.shape, dtype=np.float32)
    std = agent.actor_logstd.detach().exp().numpy()
    np.testing.assert_allclose(actions, mean.numpy() + std * noise, rtol=1e-5, atol=1e-5)
    # The weights are copies, refreshed on demand: an update the policy has not seen leaves its actions as they were.
    with torch.no_grad():
        agent.actor_logstd.add_(1.0)
    np.testing.assert_array_equal(policy.act(obs, np.random.default_rng(1))[0], actions)
    assert not np.allclose(policy.refresh().act(obs, np.random.default_rng(1))[0], actions)


def test_network_init_and_shapes():
    agent = ppo.Agent(11, box(3), (32, 16, 8), "relu", log_std_init=-1.0)
    w = agent.actor_mean[-1].weight.detach()
    # Orthogonal rows scaled by 0.01 on the policy head, zero biases everywhere, log std as given.
    np.testing.assert_allclose((w @ w.T).numpy(), 1e-4 * np.eye(3), atol=1e-9)
    assert all((m.bias == 0).all() for m in agent.modules() if isinstance(m, torch.nn.Linear))
    assert [m.out_features for m in agent.critic if isinstance(m, torch.nn.Linear)] == [32, 16, 8, 1]
    assert sum(isinstance(m, torch.nn.ReLU) for m in agent.actor_mean) == 3
    np.testing.assert_array_equal(agent.actor_logstd.detach().numpy(), -np.ones((1, 3)))
    action, logprob, entropy, value = agent.get_action_and_value(torch.zeros(4, 11))
    assert action.shape == (4, 3) and logprob.shape == entropy.shape == value.shape == (4,)


def test_no_ortho_init_keeps_torch_default_linear_init():
    torch.manual_seed(0)
    agent = ppo.Agent(11, box(3), (32, 16), "relu", log_std_init=-2.0, ortho_init=False)
    torch.manual_seed(0)  # the same draws, in the same order, as nn.Linear's own init
    reference = [torch.nn.Linear(i, o) for i, o in [(11, 32), (32, 16), (16, 3), (11, 32), (32, 16), (16, 1)]]
    linears = [m for m in agent.modules() if isinstance(m, torch.nn.Linear)]
    for mine, ref in zip(linears, reference, strict=True):
        torch.testing.assert_close(mine.weight, ref.weight, rtol=0, atol=0)
        torch.testing.assert_close(mine.bias, ref.bias, rtol=0, atol=0)
    head = linears[2].weight.detach()  # not the 0.01-scaled orthogonal head of the default
    assert (head.abs() > 0.02).any()


# ---------------------------------------------------------------- normalisers


def prior_stats(samples, eps=1e-4):
    """Mean and variance of the samples plus a pseudo-sample of weight eps, mean 0, variance 1
    (the running statistics' starting point)."""
    samples = np.asarray(samples, np.float64).reshape(len(samples), -1)
    total = len(samples) + eps
    mean = samples.sum(0) / total
    return mean, (eps + (samples**2).sum(0)) / total - mean**2


def test_running_mean_std_matches_numpy_over_a_stream():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(rng.integers(1, 9), 4)) * [1, 10, 0.1, 1] for _ in range(50)]
    rms = ppo.RunningMeanStd((4,))
    for b in batches:
        rms.update_from_moments(b.mean(0), b.var(0), len(b))
    stream = np.concatenate(batches)
    mean, var = prior_stats(stream)
    np.testing.assert_allclose(rms.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(rms.var, var, rtol=1e-10)
    assert rms.count == pytest.approx(len(stream) + 1e-4)
    # Against plain numpy once the prior has been washed out.
    np.testing.assert_allclose(rms.var, stream.var(0), rtol=1e-4)
    # The normaliser's own update (shifted moments, the path torchrun all-reduces) agrees too,
    # and normalises and clips with those statistics.
    norm = ppo.Normalizer(4, 1, ppo.Args(norm_reward=False, clip_obs=1.5))
    for b in batches:
        norm.update(b)
    np.testing.assert_allclose(norm.obs_rms.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(norm.obs_rms.var, var, rtol=1e-10)
    x = stream[:5]
    np.testing.assert_allclose(norm.normalize_obs(x), np.clip((x - mean) / np.sqrt(var + 1e-8), -1.5, 1.5), rtol=1e-6)


def reward_stream(seed, T=300, N=3):
    """Random rewards with terminations and truncations, laid out as NEXT_STEP autoreset does:
    the step after an ending step is a reset step with reward 0."""
    rng = np.random.default_rng(seed)
    rewards, term, trunc, valid = np.zeros((T, N)), np.zeros((T, N), bool), np.zeros((T, N), bool), np.ones((T, N), bool)
    for n in range(N):
        for t in range(T):
            if t and (term[t - 1, n] or trunc[t - 1, n]):
                valid[t, n] = False
                continue
            rewards[t, n] = rng.normal(1.0, 3.0)
            u = rng.random()
            term[t, n], trunc[t, n] = u < 0.04, 0.04 <= u < 0.08
    return rewards, term, trunc, valid


def naive_reward_scaling(rewards, term, trunc, valid, gamma, clip, reset_on_truncation=True):
    """One env at a time within each step: G_n = gamma * G_n + r, restarted after every episode
    end; statistics over every G of a real step so far; r / sqrt(var + 1e-8), clipped."""
    T, N = rewards.shape
    G, history, out = np.zeros(N), [], np.zeros((T, N))
    for t in range(T):
        for n in range(N):
            if valid[t, n]:
                G[n] = gamma * G[n] + rewards[t, n]
                history.append(G[n])
        var = prior_stats(history)[1][0]
        out[t] = np.clip(rewards[t] / np.sqrt(var + 1e-8), -clip, clip)
        G[term[t] | (trunc[t] & reset_on_truncation)] = 0.0
    return out, len(history)


def test_reward_scaling_over_episode_boundaries_with_truncations_matches_naive_reference():
    rewards, term, trunc, valid = reward_stream(0)
    assert trunc.sum() > 5 and term.sum() > 5 and (~valid).sum() > 10
    args = ppo.Args(gamma=0.9, clip_reward=2.5)
    norm = ppo.Normalizer(2, rewards.shape[1], args)
    scaled = []
    for t in range(len(rewards)):
        norm.update(np.zeros((3, 2)), rewards[t], valid[t], term[t] | trunc[t])
        scaled.append(norm.scale_reward(rewards[t]))
    expected, n_real = naive_reward_scaling(rewards, term, trunc, valid, 0.9, 2.5)
    np.testing.assert_allclose(np.array(scaled), expected, rtol=1e-9)
    assert (np.abs(expected) == 2.5).any(), "some rewards should hit the clip"
    # Reset steps add nothing to the statistics; every real step adds its return once.
    assert norm.ret_rms.count == pytest.approx(n_real + 1e-4) and n_real == valid.sum()
    # The stream tells the two rules apart: not restarting G at truncations gives other numbers.
    wrong, _ = naive_reward_scaling(rewards, term, trunc, valid, 0.9, 2.5, reset_on_truncation=False)
    assert not np.allclose(wrong, expected)


def test_normalizer_switches_and_state_round_trip():
    off = ppo.Normalizer(2, 1, ppo.Args(norm_obs=False, norm_reward=False))
    off.update(np.array([[5.0, 7.0]]), np.array([3.0]), np.array([True]), np.array([False]))
    np.testing.assert_array_equal(off.normalize_obs(np.array([[5.0, 7.0]])), [[5.0, 7.0]])
    np.testing.assert_array_equal(off.scale_reward(np.array([3.0])), [3.0])
    on = ppo.Normalizer(2, 1, ppo.Args())
    on.update(np.array([[5.0, 7.0], [1.0, 2.0]]))
    on.update(np.array([[2.0, 2.0]]), np.array([3.0]), np.array([True]), np.array([False]))
    copy = ppo.Normalizer(2, 1, ppo.Args())
    ppo.load_normalizer_state(copy, ppo.normalizer_state(on))
    x = np.array([[4.0, 4.0]])
    np.testing.assert_array_equal(copy.normalize_obs(x), on.normalize_obs(x))
    np.testing.assert_array_equal(copy.scale_reward(np.array([2.0])), on.scale_reward(np.array([2.0])))
    assert not np.array_equal(on.normalize_obs(x), x.astype(np.float32))


# ---------------------------------------------------------------- episode boundaries, action clipping


class CountEnv(gym.Env):
    """Observation: steps taken in this episode. Reward 1 a step; only a time limit ends it."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, False, False, {}


class RecordActionEnv(gym.Env):
    """Records every action it receives; tight bounds so that most Gaussian samples fall outside."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(np.array([-0.2, 0.0], np.float32), np.array([0.3, 0.1], np.float32))
    received = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), {}

    def step(self, action):
        RecordActionEnv.received.append(np.array(action, copy=True))
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), float(action.sum()), False, False, {}


class BadActionEnv(CountEnv):
    def __init__(self, action_space):
        self.action_space = action_space


gym.register("ContCountEnvTruncated-v0", entry_point=CountEnv, max_episode_steps=3)
gym.register("RecordActionEnv-v0", entry_point=RecordActionEnv, max_episode_steps=10_000)
gym.register("UnboundedActionEnv-v0", entry_point=lambda: BadActionEnv(gym.spaces.Box(-np.inf, np.inf, (2,))))
gym.register("MatrixActionEnv-v0", entry_point=lambda: BadActionEnv(gym.spaces.Box(-1, 1, (2, 2))))


class TupleCountEnv(CountEnv):
    """CountEnv's steps beside their parity: a Tuple observation (a Box and a Discrete)."""

    observation_space = gym.spaces.Tuple((gym.spaces.Box(0, 100, (1,), np.float32), gym.spaces.Discrete(2)))

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return (obs, 0), info

    def step(self, action):
        obs, *rest = super().step(action)
        return (obs, self.t % 2), *rest


gym.register("TupleCountEnv-v0", entry_point=TupleCountEnv, max_episode_steps=3)


def test_truncation_bootstraps_from_final_observation_by_hand():
    # Episodes of 3 steps cut by a time limit; V(s) = 10 + s; gamma = lambda = 0.5.
    envs = ppo.make_envs("ContCountEnvTruncated-v0", 1)
    obs, _ = envs.reset(seed=0)
    next_reset, rows = np.zeros(1, bool), []
    for _ in range(6):
        next_obs, reward, term, trunc, _ = envs.step(np.zeros((1, 1), np.float32))
        rows.append((obs[0, 0], reward[0], float(term[0]), float(trunc[0] and not term[0]), float(not next_reset[0])))
        next_reset, obs = term | trunc, next_obs
    obs_seq, rewards, term, trunc, valid = np.array(rows).T
    # NEXT_STEP: step 2 returns the final obs (3) truncated; step 3 is the reset step (reward 0).
    np.testing.assert_array_equal(obs_seq, [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(trunc, [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 1])
    values = 10.0 + obs_seq
    adv, _ = ppo.compute_gae(rewards[:, None], values[:, None], np.array([10.0 + obs[0, 0]]), term[:, None], trunc[:, None], 0.5, 0.5)
    # By hand: deltas -3.5, -4, 1 + 0.5 * V(3) - 12 = -4.5 (bootstrapped, trace cut), -, -3.5, -4.
    expected = np.array([-4.78125, -5.125, -4.5, np.nan, -4.5, -4.0])
    np.testing.assert_allclose(adv[valid == 1, 0], expected[valid == 1])
    # Treated as a termination instead (--no-bootstrap-truncation): 1 - V(2) = -11 at step 2.
    no_trunc = np.zeros_like(trunc[:, None])
    adv, _ = ppo.compute_gae(rewards[:, None], values[:, None], np.array([10.0 + obs[0, 0]]), trunc[:, None], no_trunc, 0.5, 0.5)
    assert adv[2, 0] == -11.0


def test_env_gets_clipped_action_while_the_sampled_one_is_stored_and_trained_on(tmp_path, monkeypatch):
    sampled, trained = [], []
    act, logprob = ppo.DerivedPolicy.act, ppo.Gaussian.log_prob

    def spy_act(self, obs, rng):  # the rollout's calls (the float64 check calls the source itself)
        out = act(self, obs, rng)
        sampled.append(out[0].copy())
        return out

    def spy_logprob(self, actions):
        if torch.is_grad_enabled():
            trained.append(actions.detach().cpu().numpy().copy())
        return logprob(self, actions)

    monkeypatch.setattr(ppo.DerivedPolicy, "act", spy_act)
    monkeypatch.setattr(ppo.Gaussian, "log_prob", spy_logprob)
    RecordActionEnv.received.clear()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        args = ppo.Args(
            env_id="RecordActionEnv-v0", num_steps=32, num_minibatches=2, update_epochs=1, total_timesteps=64,
            eval_episodes=0, runs_dir=str(tmp_path), num_threads=1, log_std_init=0.5,
        )  # fmt: skip
        ppo.train(args)
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    sampled = np.concatenate(sampled)
    received = np.stack(RecordActionEnv.received)
    low, high = RecordActionEnv.action_space.low, RecordActionEnv.action_space.high
    assert len(received) == len(sampled) == 64
    assert ((sampled < low) | (sampled > high)).mean() > 0.5, "most samples should lie outside the bounds"
    np.testing.assert_array_equal(received, np.clip(sampled, low, high))
    # The update trained on the unclipped samples: each iteration's minibatches hold its 32 actions.
    trained = np.concatenate(trained)
    for i in range(2):
        got, want = trained[32 * i : 32 * (i + 1)], sampled[32 * i : 32 * (i + 1)]
        np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_env_state_continues_mujoco_episodes_exactly():
    # MuJoCo envs pickle as their constructor arguments (EzPickle); env_state keeps the simulation.
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (1060, 1, 6)).astype(np.float32)
    envs = ppo.make_envs("HalfCheetah-v5", 1)
    envs.reset(seed=5)
    for a in actions[:50]:
        envs.step(a)
    copy = ppo.make_envs("HalfCheetah-v5", 1)
    copy.reset(seed=123)
    ppo.restore_env_state(copy, ppo.env_state(envs))
    ends = 0
    for a in actions[50:]:  # across the 1000-step time limit and the reset step after it
        out, out_copy = envs.step(a), copy.step(a)
        for x, y in zip(out[:4], out_copy[:4]):
            np.testing.assert_array_equal(x, y)
        ends += int(out[3][0])
    assert ends == 1


@pytest.mark.parametrize(
    "env_id, needle",
    [("UnboundedActionEnv-v0", "unbounded"), ("MatrixActionEnv-v0", "1-D"), ("CartPole-v1", "ppo_discrete.py")],
)
def test_unusable_action_spaces_give_one_line_error(env_id, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo.resolve_env(env_id)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and env_id in lines[0], lines


# ---------------------------------------------------------------- presets and the command line


def test_presets_and_overrides_parse():
    assert ppo.parse_args([]) == ppo.Args()
    assert ppo.parse_args(["--env-id", "Hopper-v5"]) == ppo.Args(env_id="Hopper-v5")
    args = ppo.parse_args(["cleanrl", "--env-id", "Hopper-v5", "--learning-rate", "1e-4", "--hidden-sizes", "256", "256"])
    assert args == ppo.Args(env_id="Hopper-v5", learning_rate=1e-4, hidden_sizes=(256, 256))
    for name, (_, preset) in ppo.PRESETS.items():
        assert ppo.parse_args([name]) == dataclasses.replace(preset, preset=name)  # args.json records the preset
        assert ppo.parse_args([name, "--seed", "7"]).seed == 7


def test_a_preset_s_first_line_names_it_and_the_flags_it_set(capsys):
    args = ppo.parse_args(["zoo-hopper", "--seed", "3"])
    ppo.print_plan(types.SimpleNamespace(args=args, rank=0, run_name="r"), "cpu", 1, 512, 64, 2, None)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("r: preset zoo-hopper (--env-id Hopper-v5, --learning-rate 9.80828e-05, ") and "--seed" not in first, first
    ppo.print_plan(types.SimpleNamespace(args=ppo.parse_args([]), rank=0, run_name="r"), "cpu", 1, 512, 64, 2, {"iteration": 4})
    assert capsys.readouterr().out.startswith("r: resumed from None at iteration 4; 2 iterations of 512 steps")


@pytest.mark.parametrize(
    "reset", ["optimizer.zero_grad()", "optimizer.zero_grad(set_to_none=False)", "agent.zero_grad()", "both", "nothing"]
)
def test_flat_parameters_give_the_same_outputs_gradients_and_adam_steps(reset):
    # The idioms a researcher writes do on the flat parameters what they do on plain ones, "nothing" (gradients
    # piling up across steps) included.
    torch.manual_seed(0)
    plain, flat = ppo.Agent(5, box(2), (16, 16), "tanh", 0.0), ppo.Agent(5, box(2), (16, 16), "tanh", 0.0)
    flat.load_state_dict(plain.state_dict())
    flat_params = ppo.flatten_parameters(flat)
    assert flat_params.numel() == sum(p.numel() for p in plain.parameters())
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-2)
    opt_flat = torch.optim.Adam([flat_params], lr=1e-2, fused=True)
    start = flat_params.detach().clone()
    for _ in range(4):
        obs = torch.randn(8, 5)
        losses = []
        for agent, optimizer in ((plain, opt_plain), (flat, opt_flat)):
            if reset in ("optimizer.zero_grad()", "both"):
                optimizer.zero_grad()
            if reset in ("agent.zero_grad()", "both"):
                agent.zero_grad()
            if reset == "optimizer.zero_grad(set_to_none=False)":
                optimizer.zero_grad(set_to_none=False)
            dist, value = agent.distribution(obs)
            losses.append((dist.loc**2).sum() + value.sum() + dist.log_std.sum())
            losses[-1].backward()
        torch.testing.assert_close(losses[0], losses[1])
        # every parameter's gradient landed in its slice of the flat gradient, and is a view into it
        torch.testing.assert_close(flat_params.grad, torch.cat([p.grad.reshape(-1) for p in plain.parameters()]))
        sizes = [p.numel() for p in flat.parameters()]
        for p, offset in zip(flat.parameters(), np.cumsum([0] + sizes[:-1])):
            assert p.grad.data_ptr() == flat_params.grad[offset:].data_ptr()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0), torch.nn.utils.clip_grad_norm_([flat_params], 1.0)
        opt_plain.step(), opt_flat.step()
    for p, q in zip(plain.parameters(), flat.parameters()):
        torch.testing.assert_close(p, q)
    assert (flat_params.detach() - start).abs().min() > 0, "every parameter moved"


def test_torchrun_with_more_processes_than_gpus_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(SystemExit) as exit_info:
        ppo.pick_device("cuda", gpu_pays=False)
    assert exit_info.value.code == 2
    assert "start one process per GPU or pass --device cpu" in capsys.readouterr().err


def test_auto_device_keeps_the_mlp_on_the_cpu_beside_a_gpu():
    assert ppo.auto_device(False, cuda=True, mps=False)[0] == "cpu"
    assert "--device cuda to override" in ppo.auto_device(False, cuda=True, mps=False)[1]
    assert ppo.auto_device(False, cuda=False, mps=True)[0] == "cpu"
    assert ppo.auto_device(False, cuda=False, mps=False) == ("cpu", "auto: no GPU")
    assert ppo.auto_device(True, cuda=True, mps=True)[0] == "cuda"


def test_num_threads_default_is_one_for_the_mlp_and_explicit_values_win():
    before = torch.get_num_threads()
    try:
        ppo.set_num_threads(0, small_network=True)
        assert torch.get_num_threads() == 1
        ppo.set_num_threads(2, small_network=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_import_has_no_side_effects():
    # no run folder, and no GL backend chosen for MuJoCo (that happens only with --capture-video)
    proc = subprocess.run(
        [sys.executable, "-c", "import os, ppo_continuous; print(os.path.exists('runs'), os.environ.get('MUJOCO_GL'))"],
        cwd=ROOT / "tests", env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"False {os.environ.get('MUJOCO_GL')}", proc.stderr


METRICS = [
    "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl",
    "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
]  # fmt: skip


def test_inverted_pendulum_cli_metrics_checkpoint_video_and_eval(tmp_path):
    proc = run_script(
        "ppo_continuous.py", "--env-id", "InvertedPendulum-v5", "--num-steps", "256", "--num-minibatches", "4",
        "--total-timesteps", "1024", "--runs-dir", str(tmp_path), "--eval-episodes", "2", "--capture-video",
        "--num-threads", "1",
    )  # fmt: skip
    records = read_metrics(tmp_path)
    keys = set().union(*records)
    assert set(METRICS) <= keys, set(METRICS) - keys
    assert max(r["global_step"] for r in records) == 1024
    lrs = [r["charts/learning_rate"] for r in records if "charts/learning_rate" in r]
    np.testing.assert_allclose(lrs, [3e-4 * (1 - i / 4) for i in range(4)])  # linear annealing
    # The entropy of a 1-D Gaussian with log std 0 is 1.419 before training moves it.
    assert abs(records[-2]["losses/entropy"] - 1.4189) < 0.05
    (run_dir,) = [path.parent for path in tmp_path.glob("*/metrics.jsonl")]
    assert (run_dir / "args.json").exists() and (run_dir / "videos" / "eval.mp4").stat().st_size > 1000
    assert "eval: return" in proc.stdout
    assert re.search(r"^iteration 4/4 \| global_step 1,024 \| SPS [\d,]+ \| episodic_return \(last \d+\) [\d.]+$", proc.stdout, re.M)
    assert proc.stdout.strip().splitlines()[-1] == f"done: {run_dir} (metrics.jsonl, args.json, checkpoint.pt, videos/)"
    assert "note:" not in proc.stdout  # 1024 steps are 4 whole batches
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    # Every observation returned counted once (4 iterations x 256 steps + the first reset), and one
    # return per real step: fewer, since reset steps count for nothing.
    episodes = [r for r in records if "charts/episodic_length" in r]
    assert ckpt["normalizer"]["obs_rms"]["count"] == pytest.approx(1024 + 1 + 1e-4)
    real_steps = ckpt["normalizer"]["ret_rms"]["count"] - 1e-4
    assert 1024 - len(episodes) - 1 <= real_steps <= 1024 - len(episodes) + 1 and len(episodes) > 10
    # A saved checkpoint can be evaluated without training.
    proc = run_script("ppo_continuous.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2")
    assert "eval InvertedPendulum-v5: return" in proc.stdout and "over 2 episodes" in proc.stdout

    # Evaluation loads with weights_only=True: it never unpickles "resume_state" (here code that would write a
    # file), and refuses a checkpoint with a pickled object anywhere else.
    marker = tmp_path / "unpickled"
    ckpt["resume_state"] = pickle.dumps(RunsCode(f"open({str(marker)!r}, 'w').close()"))
    torch.save(ckpt, tmp_path / "shared.pt")
    proc = run_script("ppo_continuous.py", "--eval-checkpoint", str(tmp_path / "shared.pt"), "--eval-episodes", "1")
    assert "eval InvertedPendulum-v5: return" in proc.stdout and not marker.exists()
    pickle.loads(ckpt["resume_state"])
    assert marker.exists(), "the payload does run when unpickled, so the check above means something"
    ckpt["normalizer"]["obs_rms"]["mean"] = np.zeros(4)
    torch.save(ckpt, tmp_path / "numpy.pt")
    assert_one_line_error("ppo_continuous.py", ["--eval-checkpoint", str(tmp_path / "numpy.pt")], "--eval-checkpoint", tmp_path / "e")


class RunsCode:
    """Unpickles by running a line of Python: what a checkpoint someone shared could hold."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_half_cheetah_cli_with_preset_and_network_flags(tmp_path):
    proc = run_script(
        "ppo_continuous.py", "cleanrl", "--num-envs", "2", "--num-steps", "512", "--num-minibatches", "4",
        "--update-epochs", "2", "--total-timesteps", "2048", "--hidden-sizes", "32", "32", "32", "--activation", "relu",
        "--runs-dir", str(tmp_path), "--eval-episodes", "1", "--eval-stochastic",
    )  # fmt: skip
    # The defaults pick the device and thread count from the work and say so: one thread for the MLP.
    assert "device cpu (auto: " in proc.stdout and ", 1 torch thread(s)" in proc.stdout
    records = read_metrics(tmp_path)
    (metrics_path,) = tmp_path.glob("*/metrics.jsonl")  # tmp_path is also the cwd, where MuJoCo logs warnings
    assert "HalfCheetah-v5" in metrics_path.parent.name
    assert [r["global_step"] for r in records if "losses/approx_kl" in r] == [1024, 2048]
    # HalfCheetah never terminates: its episodes end at the 1000-step time limit only.
    assert [r["charts/episodic_length"] for r in records if "charts/episodic_length" in r] == [1000, 1000]
    assert "eval: return" in proc.stdout


def test_track_offline_leaves_metrics_in_wandb_run(tmp_path):
    run_script(
        "ppo_continuous.py", "--env-id", "InvertedPendulum-v5", "--num-steps", "256", "--num-minibatches", "4",
        "--total-timesteps", "512", "--runs-dir", str(tmp_path), "--track", "--eval-episodes", "1", "--num-threads", "1",
    )  # fmt: skip
    data = wandb_offline_log(tmp_path)
    for name in METRICS + ["global_step", "eval/episodic_return"]:
        assert name.encode() in data, name


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--env-id", "CartPole-v1"], "ppo_discrete.py"),
        (["--env-id", "NoSuchEnv-v9"], "--env-id"),
        (["--num-minibatches", "3"], "--num-minibatches"),
        (["--resume", "/nonexistent/checkpoint.pt"], "--resume"),
        (["zoo-humanoid", "--seed", "2"], "zoo-humanoid"),
    ],
)
def test_bad_input_gives_one_line_error(flags, needle, tmp_path):
    assert_one_line_error("ppo_continuous.py", flags, needle, tmp_path)
    assert not list(tmp_path.iterdir()), "a rejected command line leaves no run behind"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"num_envs": 0}, "--num-envs"),
        ({"gamma": 1.5}, "--gamma"),
        ({"total_timesteps": 100}, "--total-timesteps"),
        ({"clip_obs": 0.0}, "--clip-obs"),
        ({"clip_reward": -1.0}, "--clip-reward"),
        ({"hidden_sizes": (64, 0)}, "--hidden-sizes"),
        ({"target_kl": 0.0}, "--target-kl"),
    ],
)
def test_bad_flag_values_give_one_line_error(overrides, needle, capsys):
    # The same check_args that main runs first, in-process (a subprocess a case costs seconds).
    with pytest.raises(SystemExit) as exit_info:
        ppo.check_args(ppo.Args(**overrides), world_size=1)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + needle), lines


# ---------------------------------------------------------------- learning, determinism, resume


def test_inverted_pendulum_learns(tmp_path):
    # CleanRL's defaults with shorter rollouts (1024 steps) and bigger minibatches (8 of 128): about
    # 15k steps to a mean of 500 (seeds 1, 2, 3: 13k, 14k, 17k) and 1000 at 30k, in about 30 s.
    run_script(
        "ppo_continuous.py", "--env-id", "InvertedPendulum-v5", "--total-timesteps", "30720", "--num-steps", "1024",
        "--num-minibatches", "8", "--seed", "1", "--runs-dir", str(tmp_path), "--num-threads", "1", "--eval-episodes", "5",
    )  # fmt: skip
    records = read_metrics(tmp_path)
    returns = [r["charts/episodic_return"] for r in records if "charts/episodic_return" in r][-10:]
    # A random policy balances for about 5 steps; 1000 is the cap.
    assert len(returns) == 10 and np.mean(returns) >= 500, returns
    assert records[-1]["eval/episodic_return"] >= 500


def test_same_seed_same_metrics_and_interrupted_resume_matches(tmp_path):
    flags = [
        "--env-id", "InvertedPendulum-v5", "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "2",
        "--total-timesteps", "2560", "--num-threads", "1", "--eval-episodes", "2", "--device", "cpu",
    ]  # fmt: skip  (same numbers are promised on the CPU; GPU kernels may reduce in varying order)
    run_script("ppo_continuous.py", *flags, "--runs-dir", str(tmp_path / "a"))
    run_script("ppo_continuous.py", *flags, "--runs-dir", str(tmp_path / "b"))
    a, b = comparable(read_metrics(tmp_path / "a")), comparable(read_metrics(tmp_path / "b"))
    assert a == b

    # Interrupt a third run with Ctrl-C part-way, resume it, and compare with the uninterrupted run.
    ckpt_path = interrupt_with_ctrl_c("ppo_continuous.py", flags, tmp_path / "c")
    interrupted = torch.load(ckpt_path, weights_only=True)
    assert 1 <= interrupted["iteration"] < 10, "the interrupt must land mid-run for this test to mean anything"
    assert interrupted["normalizer"]["obs_rms"]["count"] > 256
    run_script("ppo_continuous.py", "--resume", str(ckpt_path), "--num-threads", "1", "--device", "cpu")
    assert comparable(read_metrics(tmp_path / "c")) == a
    # The normalisation statistics at the end are the same too, to the last bit.
    (final_a,) = (tmp_path / "a").glob("*/checkpoint.pt")
    norm_a, norm_c = torch.load(final_a, weights_only=True)["normalizer"], torch.load(ckpt_path, weights_only=True)["normalizer"]
    for name in ("obs_rms", "ret_rms"):
        for key in ("mean", "var", "count"):
            np.testing.assert_array_equal(norm_c[name][key], norm_a[name][key])

    # A checkpoint whose optimizer state does not fit (Adam state per tensor) is refused in one line.
    old = torch.load(final_a, weights_only=True)
    old["optimizer"] = torch.optim.Adam(ppo.Agent(4, box(1), (64, 64), "tanh", 0.0).parameters()).state_dict()
    torch.save(old, tmp_path / "old.pt")
    assert_one_line_error("ppo_continuous.py", ["--resume", str(tmp_path / "old.pt")], "--resume", tmp_path / "d")


def test_two_process_gloo_run(tmp_path):
    proc = run_torchrun(
        "ppo_continuous.py", "--env-id", "InvertedPendulum-v5", "--num-steps", "128", "--num-minibatches", "2",
        "--update-epochs", "2", "--total-timesteps", "1024", "--runs-dir", str(tmp_path), "--eval-episodes", "1",
    )  # fmt: skip
    assert "parameters identical on 2 processes (normalisation statistics too)" in proc.stdout
    records = read_metrics(tmp_path)
    # global_step counts the steps of both processes: 4 iterations of 1 env x 128 steps x 2.
    assert [r["global_step"] for r in records if "losses/approx_kl" in r] == [256, 512, 768, 1024]
    (ckpt_path,) = tmp_path.glob("*/checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    # The observation statistics saw the observations of both processes.
    assert ckpt["normalizer"]["obs_rms"]["count"] == pytest.approx(2 * (512 + 1) + 1e-4)
    assert len(pickle.loads(ckpt["resume_state"])) == 2


# ---------------------------------------------------------------- one PPO update against a naive reference


def naive_ppo_update(agent, batch, args, rng):
    """The update written out plainly: per-tensor Adam, loops over epochs and minibatches, each minibatch's
    valid steps picked out, torch.distributions for the Gaussian, the gradient-norm clip by hand."""
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, foreach=False)
    batch_size = len(batch["obs"])
    minibatch_size = batch_size // args.num_minibatches
    for epoch in range(args.update_epochs):
        perm = rng.permutation(batch_size)
        for start in range(0, batch_size, minibatch_size):
            idx = [j for j in perm[start : start + minibatch_size] if batch["valid"][j] == 1]
            obs, actions, old_logprob, old_value, adv, ret = (batch[k][idx] for k in ("obs", "actions", "logprobs", "values", "advantages", "returns"))
            if args.norm_adv:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            mean, value = agent.actor_mean(obs), agent.critic(obs).squeeze(-1)
            policy = torch.distributions.Normal(mean, agent.actor_logstd.exp())
            ratio = (policy.log_prob(actions).sum(-1) - old_logprob).exp()
            clipped_ratio = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
            pg_loss = torch.max(-adv * ratio, -adv * clipped_ratio).mean()
            clipped_value = old_value + (value - old_value).clamp(-args.clip_coef, args.clip_coef)
            v_loss = 0.5 * torch.max((value - ret) ** 2, (clipped_value - ret) ** 2).mean()
            entropy = policy.entropy().sum(-1).mean()
            loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            grads = [p.grad for p in agent.parameters()]
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            for g in grads:
                g.mul_(min(1.0, args.max_grad_norm / (norm.item() + 1e-6)))
            optimizer.step()


def test_ppo_update_matches_naive_reference_update():
    # float64 throughout, so the two may differ only by the order of their sums.
    torch.manual_seed(0)
    agent = ppo.Agent(4, box(2), (8, 8), "tanh", -0.3).double()
    with torch.no_grad():
        for p in agent.parameters():  # away from the init, so the heads matter
            p.add_(0.3 * torch.randn_like(p))
    reference = copy.deepcopy(agent)
    gen = torch.Generator().manual_seed(1)
    n = 24
    obs, actions = torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randn(n, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _, logprobs, _, value = agent.get_action_and_value(obs, actions)
        logprobs = logprobs + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    valid = torch.ones(n, dtype=torch.float64)
    valid[[3, 10, 17]] = 0  # reset steps
    batch = {
        "obs": obs, "actions": actions, "logprobs": logprobs, "values": value + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64),
        "advantages": 0.5 + 2 * torch.randn(n, generator=gen, dtype=torch.float64), "returns": value + torch.randn(n, generator=gen, dtype=torch.float64),
        "valid": valid,
    }  # fmt: skip
    args = ppo.Args(learning_rate=3e-3, num_minibatches=3, update_epochs=3, ent_coef=0.01, max_grad_norm=0.5)
    params = [ppo.flatten_parameters(agent)]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)  # as train() builds it
    stats = ppo.ppo_update(agent, optimizer, params, batch, args, np.random.default_rng(7))
    naive_ppo_update(reference, batch, args, np.random.default_rng(7))
    for p, q in zip(agent.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert stats["clipfrac"] > 0.05, "the ratio clip should be active"


# ---------------------------------------------------------------- the update's fast path: the same numbers to the bit


def flat_agent(seed=0, hidden=(64, 64), activation="tanh"):
    torch.manual_seed(seed)
    agent = ppo.Agent(17, box(6), hidden, activation, 0.0)
    return agent, [ppo.flatten_parameters(agent)]


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])  # clipping, and not
def test_clip_grad_norm_gives_clip_grad_norm_s_numbers_to_the_bit(scale):
    for seed in range(20):
        grad = torch.randn(4993, generator=torch.Generator().manual_seed(seed)) * scale
        plain, fast = torch.nn.Parameter(torch.zeros(4993)), torch.nn.Parameter(torch.zeros(4993))
        plain.grad, fast.grad = grad.clone(), grad.clone()
        expected = torch.nn.utils.clip_grad_norm_([plain], 0.5)
        assert torch.equal(ppo.clip_grad_norm([fast], 0.5), expected) and torch.equal(plain.grad, fast.grad)


def test_compute_gae_equals_the_step_by_step_recursion_to_the_bit():
    # The TD errors are computed for all steps at once; every element goes through the same float32 operations
    # as in the step-by-step form.
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 300, 3, 0.99, 0.95
    rewards, values = rng.normal(size=(T, N)).astype(np.float32), rng.normal(size=(T, N)).astype(np.float32)
    next_value = rng.normal(size=N).astype(np.float32)
    terminated = (rng.random((T, N)) < 0.03).astype(np.float32)
    truncated = ((rng.random((T, N)) < 0.03) & (terminated == 0)).astype(np.float32)
    advantages, returns = ppo.compute_gae(rewards, values, next_value, terminated, truncated, gamma, lam)
    expected, last = np.zeros_like(rewards), np.zeros_like(next_value)
    next_values = np.concatenate([values[1:], next_value[None]])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1.0 - np.maximum(terminated[t], truncated[t])) * last
        expected[t] = last
    assert advantages.tobytes() == expected.tobytes() and returns.tobytes() == (expected + values).tobytes()


# ---------------------------------------------------------------- one definition of the policy; the rollout derived from it


class SquashedMean(ppo.Agent):
    """A researcher's edit of the one definition: means squashed into (-2, 2)."""

    def distribution(self, obs):
        dist, value = super().distribution(obs)
        return ppo.Gaussian(2 * torch.tanh(dist.loc), dist.log_std), value


class StateDependentStd(ppo.Agent):
    """A researcher's edit of the one definition: a head on the observation added to the log std."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logstd_head = torch.nn.Linear(5, 3)

    def distribution(self, obs):
        dist, value = super().distribution(obs)
        return ppo.Gaussian(dist.loc, dist.log_std + self.logstd_head(obs)), value


class BetaPolicy(ppo.Agent):
    """A researcher's edit of the one definition: a Beta distribution on [low, high] per action dimension."""

    def distribution(self, obs):
        mean, value = self.actor_mean(obs), self.critic(obs).squeeze(-1)
        alpha, beta = torch.nn.functional.softplus(mean) + 1, torch.nn.functional.softplus(self.actor_logstd - mean) + 1
        return torch.distributions.Independent(torch.distributions.Beta(alpha, beta), 1), value


def modified_agent(change):
    torch.manual_seed(0)
    cls = {"forward": SquashedMean, "state_std": StateDependentStd, "beta": BetaPolicy}.get(change, ppo.Agent)
    agent = cls(5, box(3), (16, 16), "elu", log_std_init=-0.5)
    if change == "gelu":
        agent.actor_mean[1], agent.critic[3] = torch.nn.GELU(), torch.nn.GELU(approximate="tanh")
    elif change == "layernorm":
        agent.actor_mean.insert(1, torch.nn.LayerNorm(16))
    elif change == "elu_alpha":
        agent.critic[1] = torch.nn.ELU(alpha=0.5)
    elif change == "relu":
        agent.actor_mean[1], agent.critic[1] = torch.nn.ReLU(), torch.nn.ReLU()
    elif change == "mish":
        agent.critic[1] = torch.nn.Mish()
    with torch.no_grad():
        for p in agent.parameters():  # away from the init, so every layer matters
            p.add_(0.3 * torch.randn_like(p))
    return agent


def test_derived_rollout_is_used_for_the_unmodified_network_without_side_effects(capsys):
    agent = modified_agent("none")
    obs = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32) * 3
    torch_state = torch.get_rng_state()
    params = [p.detach().clone() for p in agent.parameters()]
    policy = ppo.RolloutPolicies(agent, torch.device("cpu"), obs).pick(obs)
    assert isinstance(policy, ppo.DerivedPolicy) and capsys.readouterr().out == ""
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(torch.equal(p, q) for p, q in zip(params, agent.parameters()))
    # A small std divides float32 rounding up to 1e-5 in a log-prob; the check, in float64, is not fooled by it.
    torch.manual_seed(1)
    agent = ppo.Agent(17, box(6), (64, 64), "tanh", log_std_init=-2.5)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = np.random.default_rng(1).normal(size=(256, 17)).astype(np.float32) * 3
    policy = ppo.RolloutPolicies(agent, torch.device("cpu"), obs).pick(obs)
    assert isinstance(policy, ppo.DerivedPolicy) and policy.mismatch(obs, torch.device("cpu")) is None
    # The check's margin: the float64 source and the float64 agent agree far inside FAST_PATH_ATOL.
    mine = policy.namespace(copy.deepcopy(agent).double(), np.float64)
    actions, logprobs, values = mine["act"](obs.astype(np.float64), np.random.default_rng(0))
    with torch.no_grad():
        _, ref_logprobs, _, ref_values = copy.deepcopy(agent).double().get_action_and_value(torch.as_tensor(obs, dtype=torch.float64), torch.as_tensor(actions))
    assert np.max(np.abs(logprobs - ref_logprobs.numpy()) / np.maximum(1, np.abs(ref_logprobs.numpy()))) < ppo.FAST_PATH_ATOL / 100
    assert np.max(np.abs(values - ref_values.numpy())) < ppo.FAST_PATH_ATOL / 100


@pytest.mark.parametrize("change", ["relu", "gelu", "layernorm", "elu_alpha", "forward", "state_std", "beta"])
def test_an_edited_network_stays_on_the_derived_path_and_follows_the_edit(change, capsys):
    agent = modified_agent(change)
    obs = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    policies = ppo.RolloutPolicies(agent, torch.device("cpu"), obs)
    policy = policies.pick(obs)
    assert isinstance(policy, ppo.DerivedPolicy) and isinstance(policies.pick(obs), ppo.DerivedPolicy)
    assert capsys.readouterr().out == ""
    # What it samples is the edited policy's: its log-probs and values are get_action_and_value's.
    actions, logprob, value = policy.act(obs, np.random.default_rng(1))
    with torch.no_grad():
        _, ref_logprob, _, ref_value = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))
    np.testing.assert_allclose(logprob, ref_logprob.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, ref_value.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(policy.value(obs), ref_value.numpy(), rtol=1e-5, atol=1e-5)
    if change == "beta":  # the draws are the Beta's: inside (0, 1), with its mean
        many = np.concatenate([policy.act(obs, np.random.default_rng(i))[0] for i in range(400)])
        assert many.min() > 0 and many.max() < 1
        with torch.no_grad():
            dist = agent.distribution(torch.as_tensor(obs))[0]
        np.testing.assert_allclose(many.reshape(400, 4, 3).mean(0), dist.mean.numpy(), atol=0.05)


def test_an_op_the_table_lacks_steps_aside_with_a_one_line_note_naming_it(capsys):
    agent = modified_agent("mish")
    obs = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    policies = ppo.RolloutPolicies(agent, torch.device("cpu"), obs)
    policy = policies.pick(obs)
    assert isinstance(policy, ppo.RolloutPolicies) and isinstance(policies.pick(obs), ppo.RolloutPolicies)
    lines = capsys.readouterr().out.strip().splitlines()  # the next iteration says nothing more
    assert lines == ["note: the derived numpy rollout steps aside: it has no numpy translation of aten.mish.default(v_linear_3); "
                     "the rollout runs get_action_and_value"], lines  # fmt: skip
    actions, logprob, value = policy.act(obs, np.random.default_rng(1))
    with torch.no_grad():
        _, ref_logprob, _, ref_value = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))
    np.testing.assert_allclose(logprob, ref_logprob.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(policy.value(obs), ref_value.numpy(), rtol=1e-6)


def test_the_derived_source_is_checked_on_what_it_returns(monkeypatch, capsys):
    agent = modified_agent("none")
    obs = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    # A slip in the table (exp read as 2 ** x): the actions come from another std, their log-probs too.
    monkeypatch.setitem(ppo.NUMPY_OPS, "exp", lambda x, dtype="DT": f"np.exp2({x})")
    assert isinstance(ppo.RolloutPolicies(agent, torch.device("cpu"), obs).pick(obs), ppo.RolloutPolicies)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: the derived numpy rollout steps aside: its log-probs by "), lines
    assert "entropies" not in lines[0] and "values" not in lines[0], lines


def test_greedy_action_follows_the_distribution():
    agent = modified_agent("beta")  # an edit of distribution() alone
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32))
    with torch.no_grad():
        dist = agent.distribution(obs)[0]
        torch.testing.assert_close(agent.greedy_action(obs), dist.mode)
        alpha, beta = dist.base_dist.concentration1, dist.base_dist.concentration0
        torch.testing.assert_close(agent.greedy_action(obs), (alpha - 1) / (alpha + beta - 2))
    assert torch.equal(agent.low, -torch.ones(3)) and torch.equal(agent.high, torch.ones(3))  # the bounds it knows


def train_in_process(tmp_path, capsys, **overrides):
    """A short in-process run (InvertedPendulum unless overridden); returns the note: lines it printed."""
    defaults = dict(
        env_id="InvertedPendulum-v5", num_steps=64, num_minibatches=2, update_epochs=1, total_timesteps=192,
        eval_episodes=0, runs_dir=str(tmp_path), num_threads=1, device="cpu",
    )  # fmt: skip
    ppo.train(ppo.Args(**{**defaults, **overrides}))
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]


def test_training_run_with_an_activation_the_table_lacks_says_so_once_and_trains(tmp_path, monkeypatch, capsys, restore_signals):
    monkeypatch.setitem(ppo.ACTIVATIONS, "tanh", torch.nn.Mish)  # a researcher's edit of the network
    notes = train_in_process(tmp_path, capsys)
    assert len(notes) == 1 and "no numpy translation of aten.mish.default" in notes[0], notes
    assert [r["global_step"] for r in read_metrics(tmp_path) if "losses/approx_kl" in r] == [64, 128, 192]


HEAD = "        self.critic = mlp(obs_dim, 1, hidden_sizes, activation, 1.0, ortho_init)\n"
MEAN = "        mean = self.actor_mean(obs)\n"
DEFINITION = "        return Gaussian(mean, self.actor_logstd), self.critic(obs).squeeze(-1)\n"
LAYER = "        layers += [linear(width, hidden), ACTIVATIONS[activation]()]\n"
CLASSES = "class Agent(nn.Module):\n"
SQUASHED = '''class SquashedGaussian(Gaussian):
    """A Gaussian squashed by tanh into (low, high)."""

    def __init__(self, mean, log_std, low, high):
        super().__init__(mean, log_std)
        self.mid, self.half = (high + low) / 2, (high - low) / 2

    def sample(self, sample_shape=torch.Size()):
        return self.mid + self.half * torch.tanh(super().sample())

    def log_prob(self, actions):
        y = ((actions - self.mid) / self.half).clamp(-1 + 1e-6, 1 - 1e-6)
        return super().log_prob(torch.atanh(y)) - torch.log(self.half * (1 - y * y)).sum(-1)

    @property
    def mode(self):
        return self.mid + self.half * torch.tanh(self.loc)


'''
BETA = '''class ScaledBeta(torch.distributions.Beta):
    """Independent Beta distributions scaled to (low, high)."""

    def __init__(self, alpha, beta, low, high):
        super().__init__(alpha, beta, validate_args=False)
        self.low, self.width = low, high - low

    def sample(self, sample_shape=torch.Size()):
        return self.low + self.width * super().sample(sample_shape)

    def log_prob(self, actions):
        x = ((actions - self.low) / self.width).clamp(1e-6, 1 - 1e-6)
        return (super().log_prob(x) - self.width.log()).sum(-1)

    def entropy(self):
        return (super().entropy() + self.width.log()).sum(-1)

    @property
    def mode(self):
        return self.low + self.width * self.mean


'''
EDITS = {  # a researcher's edits of a copy of the script, each in the policy's definition only
    "state-dependent log std": [
        (HEAD, HEAD + "        self.logstd_head = nn.Linear(obs_dim, act_dim)\n"),
        (DEFINITION, DEFINITION.replace("self.actor_logstd)", "self.actor_logstd + self.logstd_head(obs))")),
    ],
    "forward returning the distribution": [
        (HEAD, HEAD + "        self.logstd_head = nn.Linear(obs_dim, act_dim)\n\n    def forward(self, obs):\n" + MEAN
         + DEFINITION.replace("self.actor_logstd)", "self.actor_logstd + self.logstd_head(obs))")),
        (MEAN + DEFINITION, "        return self(obs)\n"),
    ],
    "squashed mean": [(MEAN, "        mean = self.high * torch.tanh(self.actor_mean(obs))\n")],
    "layer norm and GELU in the MLP": [(LAYER, "        layers += [linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]\n")],
    "tanh-squashed Gaussian": [
        ("def compute_gae(\n", SQUASHED + "def compute_gae(\n"),  # after the script's Gaussian, which it extends
        (DEFINITION, "        return SquashedGaussian(mean, self.actor_logstd, self.low, self.high), self.critic(obs).squeeze(-1)\n"),
    ],
    "Beta": [
        (CLASSES, BETA + CLASSES),
        ("        self.actor_mean = mlp(obs_dim, act_dim,", "        self.actor_mean = mlp(obs_dim, 2 * act_dim,"),
        (MEAN + DEFINITION, "        alpha, beta = (nn.functional.softplus(self.actor_mean(obs)) + 1).chunk(2, -1)\n"
         "        return ScaledBeta(alpha, beta, self.low, self.high), self.critic(obs).squeeze(-1)\n"),
    ],
    "Mish in the MLP (no numpy translation)": [(LAYER, "        layers += [linear(width, hidden), nn.Mish()]\n")],
}  # fmt: skip


def edited_copy(tmp_path, edits):
    source = (ROOT / "ppo_continuous.py").read_text()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = tmp_path / "ppo_edited.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_policy_trains_on_policy_through_the_cli(edit, tmp_path):
    script = edited_copy(tmp_path, EDITS[edit])
    flags = ["--env-id", "InvertedPendulum-v5", "--num-steps", "128", "--num-minibatches", "1", "--update-epochs", "1",
             "--total-timesteps", "512", "--eval-episodes", "1", "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    proc = run_script(str(script), *flags)
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    if "no numpy translation" in edit:  # one note, then the rollout runs the agent itself
        assert len(notes) == 1 and "steps aside: it has no numpy translation of aten.mish.default" in notes[0], notes
    else:  # the derived rollout follows the edit: no note
        assert notes == [], notes
    # One minibatch, one epoch: old_approx_kl is the first minibatch's, before any step; ~0 means the rollout
    # sampled from the policy being trained (the old numpy copy's state-independent std gave 3e-3 to 8e-3).
    kls = [r["losses/old_approx_kl"] for r in read_metrics(tmp_path / "runs") if "losses/old_approx_kl" in r]
    assert len(kls) == 4 and max(abs(k) for k in kls) < 1e-6, kls
    assert "eval: return" in proc.stdout


@pytest.mark.parametrize("path", ["derived", "plain"])
def test_on_policy_check_catches_a_rollout_fed_another_policy(path, tmp_path, monkeypatch, capsys, restore_signals):
    if path == "plain":  # no derived path: the agent's own method is the one that disagrees (as dropout would)
        monkeypatch.setitem(ppo.ACTIVATIONS, "tanh", torch.nn.Mish)
    policy_class = ppo.DerivedPolicy if path == "derived" else ppo.RolloutPolicies
    act, calls = policy_class.act, []

    def another_policy(self, obs, rng):
        actions, logprob, value = act(self, obs, rng)
        calls.append(type(self))
        return actions, logprob + 0.01, value

    monkeypatch.setattr(policy_class, "act", another_policy)
    notes = [n for n in train_in_process(tmp_path, capsys, num_minibatches=1, total_timesteps=256) if "on-policy" in n]
    if path == "derived":  # its check, when refreshed, runs the source itself: only the on-policy check sees the slip
        assert notes == [
            "note: on-policy check: max |log-ratio| 1.0e-02 at the first minibatch of iteration 1; the rollout "
            "switches to the plain get_action_and_value for the rest of the run"
        ]
        assert calls == [ppo.DerivedPolicy] * 64  # iterations 2 to 4 sampled with the agent itself
    else:
        assert len(notes) == 1 and "iteration 1, with the plain get_action_and_value" in notes[0], notes
        assert calls == [ppo.RolloutPolicies] * 256  # the run went on
    kls = [r["losses/old_approx_kl"] for r in read_metrics(tmp_path) if "losses/old_approx_kl" in r]
    assert kls[0] == pytest.approx(0.01, abs=1e-5)


class EpisodesEnv(gym.Env):
    """Episodes in a cycle of three: terminated at step 2; cut by the time limit (4 steps); terminated at step 4,
    when the time limit also cuts it. Observation: steps taken; reward 1 a step."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = getattr(self, "episode", -1) + 1, 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.t == (2, 99, 4)[self.episode % 3]
        return np.array([self.t], np.float32), 1.0, terminated, False, {}


gym.register("EpisodesEnv-v0", entry_point=EpisodesEnv, max_episode_steps=4)


@pytest.mark.parametrize("bootstrap", [True, False])
def test_the_rollout_hands_gae_the_right_episode_boundaries(bootstrap, tmp_path, monkeypatch, capsys, restore_signals):
    seen = []
    compute_gae, ppo_update = ppo.compute_gae, ppo.ppo_update

    def spy_gae(rewards, values, next_value, terminated, truncated, gamma, gae_lambda):
        seen.append({"rewards": rewards[:, 0].copy(), "terminated": terminated[:, 0].copy(), "truncated": truncated[:, 0].copy()})
        return compute_gae(rewards, values, next_value, terminated, truncated, gamma, gae_lambda)

    def spy_update(agent, optimizer, params, batch, *args):
        seen[-1]["valid"] = batch["valid"].numpy().copy()
        return ppo_update(agent, optimizer, params, batch, *args)

    monkeypatch.setattr(ppo, "compute_gae", spy_gae)
    monkeypatch.setattr(ppo, "ppo_update", spy_update)
    train_in_process(tmp_path, capsys, env_id="EpisodesEnv-v0", num_steps=16, total_timesteps=32, bootstrap_truncation=bootstrap)
    # By hand, step by step (R: the reset step after an episode's end, left out of the update):
    # iteration 1: A A| R B B B B/ R C C C C| R A A| R     (|: terminated, /: truncated by the time limit)
    # iteration 2: B B B B/ R C C C C| R A A| R B B B     (the rollout carries over the episode boundaries)
    term = [[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]]
    trunc = [[0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    valid = [[1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1]]
    if not bootstrap:  # --no-bootstrap-truncation: a time limit is a termination
        term, trunc = np.maximum(term, trunc), np.zeros_like(trunc)
    assert len(seen) == 2
    for got, t, c, v in zip(seen, term, trunc, valid):
        np.testing.assert_array_equal(got["terminated"], t)
        np.testing.assert_array_equal(got["truncated"], c)
        np.testing.assert_array_equal(got["valid"], v)
        assert (got["rewards"][np.array(v) == 0] == 0).all() and (got["rewards"][np.array(v) == 1] != 0).all()


# ---------------------------------------------------------------- non-finite numbers: skipped steps, a clean stop


NAN_LOSS = "            loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss\n"


@pytest.mark.parametrize("nan_at, stops", [("== 2", False), ("> 4", True)])
def test_a_non_finite_loss_skips_its_step_and_ten_in_a_row_stop_the_run(nan_at, stops, tmp_path):
    # Minibatch steps are counted from 1 across the run; 2 minibatches x 2 epochs = 4 a update.
    counter = "import itertools\nMINIBATCH_STEPS = itertools.count(1)\n\n\n@dataclass\nclass Args:\n"
    nan = NAN_LOSS + f"            loss = loss + float('nan') if next(MINIBATCH_STEPS) {nan_at} else loss\n"
    script = edited_copy(tmp_path, [("@dataclass\nclass Args:\n", counter), (NAN_LOSS, nan)])
    flags = ["--env-id", "InvertedPendulum-v5", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "2",
             "--total-timesteps", "320", "--save-every", "1", "--eval-episodes", "1", "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    proc = run_script(str(script), *flags, check=False)
    records = [r for r in read_metrics(tmp_path / "runs") if "losses/skipped_steps" in r]
    (ckpt_path,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["agent"].values())
    if not stops:
        assert proc.returncode == 0, proc.stderr
        assert [r["losses/skipped_steps"] for r in records] == [1, 0, 0, 0, 0]
        return
    # Steps 5 to 14 are the ten in a row: iterations 2 and 3 skip all four, iteration 4 stops at its second.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: non-finite loss (10 steps in a row) at iteration 4 (epoch 1, minibatch 2); stopped, last good "
        f"checkpoint kept: {ckpt_path}"
    )
    assert [r["losses/skipped_steps"] for r in records] == [0, 4, 4] and ckpt["iteration"] == 3


def test_save_checkpoint_refuses_non_finite_weights(tmp_path, capsys):
    class FakeRun:
        rank, run_dir, run_name, wandb_id, args, file = 0, str(tmp_path), "r", None, ppo.Args(), open(tmp_path / "m", "w")

    agent = ppo.Agent(3, box(1), (4,), "tanh", 0.0)
    with torch.no_grad():
        agent.critic[0].weight[0, 0] = float("nan")
    envs = ppo.make_envs("InvertedPendulum-v5", 1)
    carry = ppo.Carry.start(np.zeros((1, 4), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        ppo.save_checkpoint(FakeRun, 7, 70, agent, torch.optim.Adam(agent.parameters()), ppo.Normalizer(4, 1, ppo.Args()), carry, np.random.default_rng(), envs, False)  # fmt: skip
    assert exit_info.value.code == 1 and not (tmp_path / "checkpoint.pt").exists()
    assert capsys.readouterr().err == (
        "error: non-finite agent.critic.0.weight at iteration 7 (the checkpoint it would write); stopped, last good "
        "checkpoint kept: none written\n"
    )


# ---------------------------------------------------------------- torchrun: the collectives' devices


def test_torchrun_on_gpus_uses_a_process_group_that_serves_cuda_and_cpu_tensors(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ppo.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(ppo.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(ppo.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ppo.torch.cuda, "set_device", lambda device: calls.append(device))
    assert ppo.init_distributed(torch.device("cuda:1")) == (True, 1, 2)
    assert calls == [torch.device("cuda:1"), "cpu:gloo,cuda:nccl"]
    assert ppo.init_distributed(torch.device("cpu")) == (True, 1, 2) and calls[-1] == "gloo"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ppo.init_distributed(torch.device("cuda:0")) == (False, 0, 1)


def test_end_of_run_check_moves_gpu_parameters_to_the_cpu_before_the_cat():
    # A fake CUDA tensor (no GPU needed) catches a cat of tensors on two devices.
    from torch._subclasses.fake_tensor import FakeTensorMode

    normalizer = ppo.Normalizer(3, 1, ppo.Args())
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = [torch.empty(10, device="cuda")]
        with pytest.raises(RuntimeError, match="device"):
            torch.cat([params[0].double(), torch.zeros(2, dtype=torch.float64)])
        flat = ppo.parameters_and_statistics(params, normalizer)
    assert flat.device == torch.device("cpu") and flat.dtype == torch.float64 and flat.shape == (10 + 3 * 2 + 1 + 3,)


def test_collectives_get_tensors_on_the_training_device_or_the_cpu(tmp_path, monkeypatch, capsys, restore_signals):
    # One process plays rank 0 of two identical ones: every collective is recorded, sums double.
    seen = []

    def record(name, tensor):
        seen.append((name, tensor.device))

    def all_reduce(tensor, *args, **kwargs):
        record("all_reduce", tensor)
        tensor.mul_(2)

    def all_gather(tensors, tensor, *args, **kwargs):
        record("all_gather", tensor)
        for t in tensors:
            t.copy_(tensor)

    def all_gather_object(objects, obj, *args, **kwargs):
        objects[:] = [obj] * len(objects)

    monkeypatch.setattr(ppo, "init_distributed", lambda device: (True, 0, 2))
    monkeypatch.setattr(ppo.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ppo.dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(ppo.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(ppo.dist, "all_gather", all_gather)
    monkeypatch.setattr(ppo.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(ppo.dist, "broadcast", lambda tensor, src: record("broadcast", tensor))
    monkeypatch.setattr(ppo.dist, "barrier", lambda *args: None)
    monkeypatch.setattr(ppo.dist, "destroy_process_group", lambda *args: None)
    args = ppo.Args(
        env_id="InvertedPendulum-v5", num_steps=64, num_minibatches=2, update_epochs=2, total_timesteps=300,
        eval_episodes=0, runs_dir=str(tmp_path), num_threads=1, device="cpu", target_kl=100.0,
    )  # fmt: skip
    ppo.train(args)
    out = capsys.readouterr().out
    assert {name for name, _ in seen} == {"all_reduce", "all_gather", "broadcast"}
    assert {device for _, device in seen} == {torch.device("cpu")}  # the training device here, and the CPU
    # Gradients (8 minibatch steps), KL per epoch (4), normaliser moments per step and at reset, stop flag (2).
    assert sum(name == "all_reduce" for name, _ in seen) == 8 + 4 + 128 + 1 + 2
    assert "parameters identical on 2 processes" in out
    # 300 steps over 2 processes of 64: two whole batches of 128, said in one line.
    assert "note: --total-timesteps 300 is not a whole number of batches of 128 steps; training 256 steps (2 iterations)" in out
    assert [r["global_step"] for r in read_metrics(tmp_path) if "losses/approx_kl" in r] == [128, 256]


# ---------------------------------------------------------------- signals, resume folder, command line


def test_sigterm_checkpoints_and_a_moved_run_resumes_in_its_new_folder(tmp_path):
    flags = [
        "--env-id", "InvertedPendulum-v5", "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "2",
        "--total-timesteps", "2560", "--num-threads", "1", "--eval-episodes", "0", "--device", "cpu",
    ]  # fmt: skip
    ckpt_path = interrupt_with_ctrl_c("ppo_continuous.py", flags, tmp_path / "runs", sig=signal.SIGTERM)
    # Everything but resume_state is tensors and plain values.
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {
        "args", "run_name", "iteration", "global_step", "wandb_id", "metrics_offset", "agent", "optimizer", "normalizer", "resume_state",
    }  # fmt: skip
    assert isinstance(ckpt["resume_state"], bytes) and 1 <= ckpt["iteration"] < 10
    moved = tmp_path / "elsewhere" / "my_run"
    shutil.move(ckpt_path.parent, moved)
    proc = run_script("ppo_continuous.py", "--resume", str(moved / "checkpoint.pt"), "--num-threads", "1")
    assert proc.stdout.strip().splitlines()[-1] == f"done: {moved} (metrics.jsonl, args.json, checkpoint.pt)"
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    records = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if "losses/approx_kl" in r] == [256 * i for i in range(1, 11)]


def test_help_lists_the_flags_and_the_presets():
    proc = run_script("ppo_continuous.py", "--help")
    for flag in ("--env-id", "--total-timesteps", "--learning-rate", "--num-minibatches", "--clip-coef", "--hidden-sizes", "--resume", "--eval-checkpoint"):
        assert flag in proc.stdout, flag
    assert "cleanrl" in proc.stdout and "zoo-halfcheetah" in proc.stdout
    proc = run_script("ppo_continuous.py", "zoo-halfcheetah", "--help")  # the preset's values as the defaults
    assert "2.0633e-05" in proc.stdout and "--num-steps INT" in proc.stdout


def test_exp_name_comes_from_the_file_name(tmp_path):
    shutil.copy(ROOT / "ppo_continuous.py", tmp_path / "ppo_dualclip.py")
    proc = subprocess.run([sys.executable, "-c", "import ppo_dualclip; print(ppo_dualclip.Args().exp_name)"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.stdout.strip() == "ppo_dualclip", proc.stderr
    assert ppo.Args().exp_name == "ppo_continuous"


# ---------------------------------------------------------------- the environments researchers bring

TEST_ENVS = '''
import gymnasium as gym
import numpy as np


class DictGoal(gym.Env):
    """A point moved towards a goal: Dict observations (point, goal of `goals` numbers, a mode); blow_up_at makes
    the observation or the reward of that step (counted over the env's life; 0: the first reset) non-finite."""

    def __init__(self, goals=2, blow_up_at=None, blow_up="observation", blow_up_seed=None):
        box = lambda n: gym.spaces.Box(-5, 5, (n,), np.float32)
        self.observation_space = gym.spaces.Dict({"pos": box(2), "goal": box(goals), "mode": gym.spaces.Discrete(3)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.blow_up_at, self.blow_up, self.steps = blow_up_at, blow_up, 0
        self.blow_up_seed, self.first_seed = blow_up_seed, None  # blow_up_seed: only the sub-env reset with it

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.first_seed = seed if self.first_seed is None else self.first_seed
        self.pos, self.t = np.zeros(2, np.float32), 0
        self.goal = self.np_random.uniform(-2, 2, self.observation_space["goal"].shape).astype(np.float32)
        if self.blow_up_at == 0:  # the first reset's observation
            self.goal[0] = np.nan
        return {"pos": self.pos.copy(), "goal": self.goal.copy(), "mode": 0}, {}

    def step(self, action):
        self.t, self.steps = self.t + 1, self.steps + 1
        self.pos = np.clip(self.pos + 0.2 * action, -5, 5).astype(np.float32)
        obs, reward = {"pos": self.pos.copy(), "goal": self.goal.copy(), "mode": self.t % 3}, -float(np.abs(self.pos - self.goal[:2]).sum())
        blow_up = self.steps == self.blow_up_at and self.blow_up_seed in (None, self.first_seed)
        if blow_up and self.blow_up == "observation":
            obs["pos"][1] = np.nan
        if blow_up and self.blow_up == "reward":
            reward = float("inf")
        return obs, reward, False, False, {}


gym.register("DictGoal-v0", entry_point=DictGoal, max_episode_steps=50)
'''


@pytest.fixture
def test_envs(tmp_path, monkeypatch):
    """A module of the researcher's own, importable by the script (`test_envs:DictGoal-v0`)."""
    (tmp_path / "test_envs.py").write_text(TEST_ENVS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "test_envs:DictGoal-v0"


def test_a_module_env_with_dict_observations_and_kwargs_trains_checkpoints_resumes_and_evaluates(
    test_envs, tmp_path, monkeypatch, capsys, restore_signals
):
    flags = ["--env-id", test_envs, "--env-kwargs", '{"goals": 3}', "--num-steps", "64", "--num-minibatches", "2",
             "--update-epochs", "2", "--total-timesteps", "256", "--eval-episodes", "2", "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    assert "eval: return" in run_script("ppo_continuous.py", *flags).stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("test_envs_DictGoal-v0__ppo_continuous__1__")  # no ':' or '/' in folder names
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    # The normaliser reads the flat vector: the point (2), the goal of 3 (--env-kwargs) and the mode one-hot (3).
    assert ckpt["normalizer"]["obs_rms"]["mean"].shape == (8,) and ckpt["args"]["env_kwargs"] == '{"goals": 3}'
    resumed = run_script("ppo_continuous.py", "--resume", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2")
    assert "eval: return" in resumed.stdout  # the pickled envs came back; the trained policy evaluated
    monkeypatch.syspath_prepend(str(tmp_path))  # in this process, as PYTHONPATH does for the script
    ppo.train(ppo.parse_args(["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2"]))
    assert f"eval {test_envs}: return" in capsys.readouterr().out


def test_tuple_observations_arrive_flat_pickle_with_their_envs_and_train(tmp_path, capsys, restore_signals):
    assert ppo.resolve_env("TupleCountEnv-v0")[0].shape == (3,)  # the step count, then the parity one-hot
    envs, copy = ppo.make_envs("TupleCountEnv-v0", 2), ppo.make_envs("TupleCountEnv-v0", 2)
    envs.reset(seed=0)
    copy.reset(seed=0)
    envs.step(np.zeros((2, 1), np.float32))
    ppo.restore_env_state(copy, ppo.env_state(envs))  # the flattening wrapper pickles into a checkpoint
    for vec in (envs, copy):
        np.testing.assert_array_equal(vec.step(np.zeros((2, 1), np.float32))[0], [[2, 1, 0], [2, 1, 0]])
    assert train_in_process(tmp_path, capsys, env_id="TupleCountEnv-v0") == []
    assert [r["global_step"] for r in read_metrics(tmp_path) if "losses/approx_kl" in r] == [64, 128, 192]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--env-id", "nope_module:Nope-v0"], "--env-id nope_module:Nope-v0: No module named 'nope_module'"),
        (["--env-id", "Taxi-v3"], "--env-id Taxi-v3: Environment version v3 for `Taxi` is deprecated. Please use `Taxi-v4`"),
        (["--env-id", "test_envs:DictGoal-v0", "--env-kwargs", '{"nope": 1}'], "unexpected keyword argument 'nope'"),
        (["--env-id", "test_envs:DictGoal-v0", "--env-kwargs", "{goals: 3}"], "--env-kwargs '{goals: 3}' is not a JSON object"),
    ],
)  # fmt: skip
def test_env_errors_are_gymnasium_s_own_in_one_line(flags, needle, test_envs, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))  # in this process, as PYTHONPATH does for the script
    args = ppo.parse_args(flags)
    with pytest.raises(SystemExit) as exit_info:
        ppo.check_args(args, 1)
        ppo.build_agent(args, torch.device("cpu"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("num_envs", [1, 2])
@pytest.mark.parametrize("blow_up, value", [("observation", "nan"), ("reward", "inf")])
def test_a_simulator_that_blows_up_stops_the_run_and_keeps_the_last_checkpoint(
    blow_up, value, num_envs, test_envs, tmp_path, monkeypatch, capsys, restore_signals
):
    monkeypatch.syspath_prepend(str(tmp_path))
    # With two envs only sub-env 1 (reset with seed 1 + 1) blows up: the line names it and its raw value, which the
    # stored rollout no longer tells apart (the shared normalisation statistics spread a nan to every env).
    kwargs = json.dumps({"blow_up_at": 150, "blow_up": blow_up, "blow_up_seed": num_envs})
    flags = ["--env-id", test_envs, "--env-kwargs", kwargs, "--num-steps", "64", "--num-minibatches", "2", "--num-threads", "1",
             "--num-envs", str(num_envs), "--total-timesteps", str(640 * num_envs), "--save-every", "1",
             "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        ppo.train(ppo.parse_args(flags))
    (ckpt_path,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    # The env's 150th step is its 152nd (two reset steps before it): global step 152 per env, in iteration 3.
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: non-finite {blow_up} {value} from {test_envs} (sub-env {num_envs - 1}) at global_step "
        f"{152 * num_envs} (iteration 3); stopped, last good checkpoint kept: {ckpt_path}"
    )
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["iteration"] == 2 and all(torch.isfinite(t).all() for t in ckpt["agent"].values())


def test_a_non_finite_first_observation_stops_the_run_before_training(test_envs, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = ["--env-id", test_envs, "--env-kwargs", '{"blow_up_at": 0}', "--num-steps", "64", "--num-minibatches", "2",
             "--num-threads", "1", "--total-timesteps", "128", "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        ppo.train(ppo.parse_args(flags))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: non-finite observation nan from {test_envs} (sub-env 0) at global_step 0 (iteration 1); "
        "stopped, last good checkpoint kept: none written"
    )


def test_a_checkpoint_of_another_version_is_a_one_line_error(capsys):
    old_args = {k: v for k, v in dataclasses.asdict(ppo.Args()).items() if k != "env_kwargs"}
    with pytest.raises(SystemExit) as stop:
        ppo.resumed_args(ppo.Args(resume="old/checkpoint.pt"), {"args": old_args})
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "another version of ppo_continuous.py" in err[0], err
    assert ppo.resumed_args(ppo.Args(), {"args": dataclasses.asdict(ppo.Args(seed=5))}).seed == 5


FLAKY_ENV = '''
import os

import gymnasium as gym
import numpy as np


class Flaky(gym.Env):
    """Random observations; raises FLAKY_ERROR on the process's FLAKY_AT-th step (a simulator server going away)."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    steps = 0  # the process's count, which no checkpoint carries

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), {}

    def step(self, action):
        Flaky.steps, self.t = Flaky.steps + 1, self.t + 1
        if Flaky.steps == int(os.environ.get("FLAKY_AT", 0)):
            raise {"ConnectionError": ConnectionError, "MemoryError": MemoryError}[os.environ["FLAKY_ERROR"]]("the server went away")
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), float(action[0]), False, self.t >= 20, {}


gym.register("Flaky-v0", entry_point=Flaky)
'''


@pytest.mark.parametrize("error", ["ConnectionError", "MemoryError"])
def test_an_exception_in_the_env_leaves_the_last_iteration_s_checkpoint_and_resume_continues_exactly(error, tmp_path, monkeypatch):
    (tmp_path / "flaky_env.py").write_text(FLAKY_ENV)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    flags = ["--env-id", "flaky_env:Flaky-v0", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "2",
             "--total-timesteps", "512", "--eval-episodes", "0"]  # fmt: skip
    monkeypatch.setenv("FLAKY_AT", "300")  # in iteration 5: four iterations completed, the default --save-every 0
    monkeypatch.setenv("FLAKY_ERROR", error)
    proc = run_script("ppo_continuous.py", *flags, "--runs-dir", str(tmp_path / "crashed"), check=False)
    (checkpoint,) = (tmp_path / "crashed").glob("*/checkpoint.pt")
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {error}: the server went away; checkpoint of iteration 4 (global_step 256) in {checkpoint.resolve()}; "
        f"continue with --resume {checkpoint.resolve()}"
    )
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 4
    if error == "MemoryError":
        return
    monkeypatch.delenv("FLAKY_AT")
    run_script("ppo_continuous.py", "--resume", str(checkpoint))
    run_script("ppo_continuous.py", *flags, "--runs-dir", str(tmp_path / "whole"))
    assert comparable(read_metrics(tmp_path / "crashed")) == comparable(read_metrics(tmp_path / "whole"))



# ---------------------------------------------------------------- the fence's recipe


def test_a_copy_without_any_optional_block_runs_the_same_ppo_and_an_all_deleted_copy_learns(tmp_path):
    """The fence's recipe on copies (tests/droppable.py, conftest.check_the_fence_recipe) on InvertedPendulum-v5: each block deleted
    alone trains to the same metrics, all deleted the copy learns."""
    flags = ["--env-id", "InvertedPendulum-v5", "--num-threads", "1", "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "2"]
    returns = check_the_fence_recipe("ppo_continuous.py", [*flags, "--total-timesteps", "512"], flags[:4] + ["--total-timesteps", "16384"], tmp_path)
    assert np.mean(returns[-20:]) > 5 * np.mean(returns[:20]), (np.mean(returns[:20]), np.mean(returns[-20:]))  # random: ~7


def test_the_readme_gives_this_script_s_line_counts_as_they_are():
    check_the_readme_line_counts("ppo_continuous.py")
