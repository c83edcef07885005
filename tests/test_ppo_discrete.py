"""Tests of ppo_discrete.py: the numerical core and one whole PPO update against naive references and
hand-computed cases, the episode-boundary logic on a tiny time-limited env, the derived numpy rollout's
safety under a researcher's edits, checkpoints, signals and torchrun collectives, and the CLI end to end
in subprocesses."""

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

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.distributed as dist
import tyro
from conftest import ROOT, assert_one_line_error, check_the_fence_recipe, check_the_readme_line_counts, comparable, interrupt_with_ctrl_c, read_metrics, run_script, run_torchrun, wandb_offline_log

import ppo_discrete as ppo

# ---------------------------------------------------------------- GAE


def naive_gae(rewards, values, next_value, terminated, truncated, gamma, lam):
    """A_t = sum_k (gamma lam)^(k-t) delta_k up to the end of t's episode, one (t, env) at a time."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for k in range(t, T):
                v_next = next_value[n] if k == T - 1 else values[k + 1, n]
                if terminated[k, n]:
                    delta = rewards[k, n] - values[k, n]
                else:  # a truncation bootstraps from V(final obs) like any other step
                    delta = rewards[k, n] + gamma * v_next - values[k, n]
                total += discount * delta
                if terminated[k, n] or truncated[k, n]:
                    break
                discount *= gamma * lam
            adv[t, n] = total
    return adv


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_naive_reference_with_terminations_and_truncations(seed):
    rng = np.random.default_rng(seed)
    T, N = 37, 5
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    next_value = rng.normal(size=N)
    ends = rng.random((T, N))
    terminated = (ends < 0.1).astype(np.float64)
    truncated = ((ends >= 0.1) & (ends < 0.2)).astype(np.float64)
    assert terminated.sum() > 0 and truncated.sum() > 0
    gamma, lam = 0.97, 0.9
    adv, ret = ppo.compute_gae(rewards, values, next_value, terminated, truncated, gamma, lam)
    expected = naive_gae(rewards, values, next_value, terminated, truncated, gamma, lam)
    np.testing.assert_allclose(adv, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret, expected + values, rtol=1e-10, atol=1e-10)


class CountEnv(gym.Env):
    """Observation: steps taken in this episode. Reward 1 a step. Terminates at `terminate_at`
    steps if given; otherwise only a time limit ends it."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, terminate_at=None):
        self.terminate_at = terminate_at

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, self.t == self.terminate_at, False, {}


gym.register("CountEnvTruncated-v0", entry_point=CountEnv, max_episode_steps=3)
gym.register("CountEnvTerminated-v0", entry_point=lambda: CountEnv(terminate_at=3))


def rollout_flags(env_id, steps):
    """Step the script's own vector env as the rollout does; return obs, rewards, flags, valid."""
    envs = ppo.make_envs(env_id, 1, {})
    obs, _ = envs.reset(seed=0)
    next_reset = np.zeros(1, bool)
    rows = []
    for _ in range(steps):
        next_obs, reward, term, trunc, _ = envs.step(np.zeros(1, np.int64))
        rows.append((obs[0, 0], reward[0], float(term[0]), float(trunc[0] and not term[0]), float(not next_reset[0])))
        next_reset, obs = term | trunc, next_obs
    return np.array(rows), obs[0, 0]


def test_truncation_bootstraps_from_final_observation_by_hand():
    # Episodes of 3 steps cut by a time limit; V(s) = 10 + s; gamma = lambda = 0.5.
    rows, last_obs = rollout_flags("CountEnvTruncated-v0", 6)
    obs, rewards, term, trunc, valid = rows.T
    # NEXT_STEP: step 2 returns the final obs (3) truncated; step 3 is the reset step (reward 0).
    np.testing.assert_array_equal(obs, [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(rewards, [1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(trunc, [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(term, 0)
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 1])
    values = 10.0 + obs
    adv, _ = ppo.compute_gae(rewards[:, None], values[:, None], np.array([10.0 + last_obs]), term[:, None], trunc[:, None], 0.5, 0.5)
    # By hand: deltas -3.5, -4, 1 + 0.5 * V(3) - 12 = -4.5 (bootstrapped, trace cut), -, -3.5, -4.
    expected = np.array([-4.78125, -5.125, -4.5, np.nan, -4.5, -4.0])
    np.testing.assert_allclose(adv[valid == 1, 0], expected[valid == 1])


def test_termination_does_not_bootstrap_by_hand():
    rows, last_obs = rollout_flags("CountEnvTerminated-v0", 6)
    obs, rewards, term, trunc, valid = rows.T
    np.testing.assert_array_equal(term, [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(trunc, 0)
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 1])
    values = 10.0 + obs
    adv, _ = ppo.compute_gae(rewards[:, None], values[:, None], np.array([10.0 + last_obs]), term[:, None], trunc[:, None], 0.5, 0.5)
    # The last step of the episode: 1 - V(2) = -11; then -4 + 0.25 * -11 and -3.5 + 0.25 * that.
    expected = np.array([-3.5 + 0.25 * (-4 - 2.75), -6.75, -11.0, np.nan, -4.5, -4.0])
    np.testing.assert_allclose(adv[valid == 1, 0], expected[valid == 1])


# ---------------------------------------------------------------- losses and estimators


@pytest.mark.parametrize("adv", [2.0, -3.0])
def test_policy_loss_value_and_gradient_at_and_around_clip_boundaries(adv):
    eps, d = 0.2, 1e-3
    ratios = [0.5, 1 - eps - d, 1 - eps, 1 - eps + d, 1.0, 1 + eps - d, 1 + eps, 1 + eps + d, 1.7]
    ratio = torch.tensor(ratios, dtype=torch.float64, requires_grad=True)
    loss = ppo.policy_loss(ratio, torch.full_like(ratio, adv), eps)
    loss.sum().backward()
    for r, value, grad in zip(ratios, loss.tolist(), ratio.grad.tolist()):
        clipped = min(max(r, 1 - eps), 1 + eps)
        assert value == pytest.approx(-min(r * adv, clipped * adv))
        # The objective stops pushing once the ratio has moved past the clip range in the
        # direction the advantage favours; inside the range (boundaries included) it is -adv.
        past = (adv > 0 and r > 1 + eps) or (adv < 0 and r < 1 - eps)
        assert grad == pytest.approx(0.0 if past else -adv), (r, grad)


def test_value_loss_clipped_and_unclipped():
    old = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    ret = torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    new = torch.tensor([0.5, 0.1, 0.3, 1.0], dtype=torch.float64, requires_grad=True)
    loss = ppo.value_loss(new, old, ret, 0.2)
    # 0: clipped 0.2 -> (0.2-1)^2=0.64 > 0.25: clipped branch, no gradient. 1: inside range: (0.1-1)^2.
    # 2: unclipped (1.3)^2=1.69 > clipped (0.2+1)^2=1.44. 3: zero error.
    np.testing.assert_allclose(loss.detach().numpy(), 0.5 * np.array([0.64, 0.81, 1.69, 0.0]))
    loss.sum().backward()
    np.testing.assert_allclose(new.grad.numpy(), [0.0, 0.1 - 1.0, 0.3 + 1.0, 0.0])
    plain = ppo.value_loss(new, old, ret, None)
    np.testing.assert_allclose(plain.detach().numpy(), 0.5 * np.array([0.25, 0.81, 1.69, 0.0]))


def test_kl_estimators_hand_computed_and_unbiased():
    k1, k3 = ppo.kl_estimators(torch.tensor([np.log(2.0), 0.0, -np.log(4.0)], dtype=torch.float64))
    np.testing.assert_allclose(k1.numpy(), [-np.log(2), 0.0, np.log(4)])
    np.testing.assert_allclose(k3.numpy(), [1 - np.log(2), 0.0, -0.75 + np.log(4)])
    # Monte Carlo under the old policy p: both estimate KL(p || q).
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    a = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    k1, k3 = ppo.kl_estimators(q.log()[a] - p.log()[a])
    true_kl = float((p * (p / q).log()).sum())
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k3 >= 0).all()


# ---------------------------------------------------------------- the one policy definition and its derived numpy code


def perturbed_agent(space=gym.spaces.Box(-1, 1, (4,), np.float32), n_actions=3, agent_class=None, seed=0):
    torch.manual_seed(seed)
    agent = (agent_class or ppo.Agent)(space, n_actions, pixels=False)
    for p in agent.parameters():  # away from the zero-bias init, so that every term counts
        torch.nn.init.normal_(p, std=0.5)
    return agent


def test_get_action_and_value_is_the_categorical_of_the_logits():
    agent = perturbed_agent(n_actions=5)
    obs = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    logits, values = agent(obs)
    ref = torch.distributions.Categorical(logits=logits)
    given = torch.tensor([0, 1, 2, 3, 4, 2])
    action, logp, ent, value = agent.get_action_and_value(obs, given)
    assert action is given
    torch.testing.assert_close(logp, ref.log_prob(given))
    torch.testing.assert_close(ent, ref.entropy())
    torch.testing.assert_close(value, values)
    torch.testing.assert_close(agent.get_value(obs), values)
    assert torch.equal(agent.greedy_action(obs), logits.argmax(-1))
    # Sampled when not given: the frequencies of softmax(logits), and the log-prob of what was drawn.
    drawn, drawn_logp, _, _ = agent.get_action_and_value(obs[:1].expand(100_000, 4))
    np.testing.assert_allclose(np.bincount(drawn.numpy(), minlength=5) / drawn.numel(), ref.probs[0].detach().numpy(), atol=0.005)
    torch.testing.assert_close(drawn_logp, ref.log_prob(drawn[:, None].expand(-1, 6))[:, 0])


@pytest.mark.parametrize("space", [gym.spaces.Box(-1, 1, (3, 2), np.float32), gym.spaces.Discrete(7)], ids=["box", "discrete"])
def test_derived_rollout_reproduces_get_action_and_value(space, monkeypatch, capsys):
    monkeypatch.setattr(ppo, "NOTED", set())
    agent = perturbed_agent(space, n_actions=4)
    gen = np.random.default_rng(0)
    obs = gen.normal(size=(5, 3, 2)).astype(np.float32) if space.shape else np.array([0, 3, 6, 2, 5])
    all_valid = ppo.all_valid(5, 4)
    policy = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(0), obs, all_valid)
    assert policy.fast and capsys.readouterr().out == "", "the unmodified MLP agent takes the derived numpy path"
    assert "torch" not in policy.derived[False].source  # numpy calls only, one per node
    actions, *mine = policy.derived[False].check(np.random.default_rng(0), obs)
    _, logp, ent, value = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))
    for a, ref in zip(mine, (logp, ent, value)):
        np.testing.assert_allclose(a, ref.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(policy.value(obs), value.detach().numpy(), rtol=1e-6, atol=1e-6)
    # Its sampler (torch.multinomial as an exponential race on the run's numpy RNG): softmax frequencies, and the
    # log-prob of what it drew.
    many = np.repeat(obs[:1], 100_000, axis=0)
    drawn, drawn_logp, drawn_values = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(1), many, ppo.all_valid(len(many), 4)).act(many, ppo.all_valid(len(many), 4), 0)  # fmt: skip
    probs = agent.distribution(torch.as_tensor(obs[:1]))[0].exp()[0].detach().numpy()
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / drawn.size, probs, atol=0.005)
    np.testing.assert_allclose(drawn_logp, np.log(probs[drawn]), rtol=1e-5)
    assert drawn_values.shape == (100_000,)


class DoubledLogits(ppo.Agent):
    """A researcher's edit of forward() that no module list shows."""

    def forward(self, obs):
        logits, values = super().forward(obs)
        return 2 * logits, values


class ActionBias(ppo.Agent):
    """An action-dependent change of the logits, made in the one definition."""

    def distribution(self, obs, action_mask=None):
        logits, value = self(obs)
        return (logits + torch.tensor([0.0, 0.3, -0.2])).log_softmax(-1), value


class ThreeOutputs(ppo.Agent):
    """forward returns three values and the one definition uses the third (a per-state temperature)."""

    def forward(self, obs):
        logits, values = super().forward(obs)
        return logits, values, 1.0 + values.detach().abs()[:, None]

    def distribution(self, obs, action_mask=None):
        logits, value, temperature = self(obs)
        return (logits / temperature).log_softmax(-1), value


class LearnedTemperature(ppo.Agent):
    """A learned softmax temperature, starting at exactly 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_temperature = torch.nn.Parameter(torch.tensor(0.0))

    def distribution(self, obs, action_mask=None):
        logits, value = self(obs)
        return (logits / self.log_temperature.exp()).log_softmax(-1), value


class EpsilonMixed(ppo.Agent):
    """Probabilities mixed with the uniform distribution."""

    def distribution(self, obs, action_mask=None):
        logp, value = super().distribution(obs, action_mask)
        return (0.9 * logp.exp() + 0.1 / logp.shape[-1]).log(), value


class Cumsum(ppo.Agent):
    """An op the numpy table does not have."""

    def distribution(self, obs, action_mask=None):
        logits, value = self(obs)
        return (logits + 0.1 * logits.cumsum(-1)).log_softmax(-1), value


class DataDependent(ppo.Agent):
    """Python control flow on a tensor's value: no graph can hold it."""

    def distribution(self, obs, action_mask=None):
        logits, value = self(obs)
        return (logits if logits.sum() > 0 else -logits).log_softmax(-1), value


def edited_agent(kind):
    if kind == "multidiscrete-1d":  # MultiDiscrete([3]): actions [B, 1]
        return ppo.Agent(gym.spaces.Box(-1, 1, (4,), np.float32), [3], pixels=False)
    classes = {"forward": DoubledLogits, "action-bias": ActionBias, "three-outputs": ThreeOutputs, "temperature": LearnedTemperature,
               "epsilon": EpsilonMixed, "cumsum": Cumsum, "data-dependent": DataDependent}  # fmt: skip
    agent = perturbed_agent(agent_class=classes.get(kind))
    if kind in ("relu", "gelu"):
        agent.actor[1] = agent.critic[1] = torch.nn.ReLU() if kind == "relu" else torch.nn.GELU()
    if kind == "layernorm":
        agent.actor = torch.nn.Sequential(agent.actor[0], torch.nn.LayerNorm(64), *agent.actor[1:])
    return agent


@pytest.mark.parametrize("kind", ["relu", "gelu", "layernorm", "forward", "action-bias", "three-outputs", "temperature", "epsilon", "multidiscrete-1d"])  # fmt: skip
def test_edited_agents_stay_on_the_derived_path_and_run_the_edit(kind, monkeypatch, capsys):
    monkeypatch.setattr(ppo, "NOTED", set())
    agent, obs = edited_agent(kind), np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    mask = ppo.all_valid(5, sum(agent.nvec))
    policy = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(0), obs, mask)
    assert policy.fast and capsys.readouterr().out == ""
    actions, logprobs, values = policy.act(obs, mask, 0)
    _, ref_logp, _, ref_values = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))
    np.testing.assert_allclose(logprobs, ref_logp.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values, ref_values.detach().numpy(), rtol=1e-6, atol=1e-6)
    unedited = perturbed_agent() if kind != "multidiscrete-1d" else None  # the edit matters: the plain MLP's log-probs differ
    if unedited is not None and kind != "temperature":
        assert not np.allclose(unedited.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))[1].detach().numpy(), logprobs, atol=1e-3)


def test_a_temperature_that_starts_at_exactly_1_is_run_from_the_first_iteration(monkeypatch, capsys):
    monkeypatch.setattr(ppo, "NOTED", set())
    agent, obs = edited_agent("temperature"), np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    policy = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(0), obs, ppo.all_valid(5, 3))
    assert policy.fast and "p_agent_log_temperature" in policy.derived[False].source  # the edit is in the code it runs
    untempered = ppo.Agent.distribution(agent, torch.as_tensor(obs))[0].detach().numpy()
    with torch.no_grad():
        agent.log_temperature.fill_(1e-4)  # a first update's worth: a change within the old copy's tolerance
    policy.refresh(obs, ppo.all_valid(5, 3))
    actions, logprobs, _ = policy.act(obs, ppo.all_valid(5, 3), 0)
    tempered = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))[1].detach().numpy()
    assert policy.fast and capsys.readouterr().out == ""
    np.testing.assert_allclose(logprobs, tempered, rtol=1e-6, atol=1e-6)
    assert np.abs(untempered[np.arange(5), actions] - tempered).max() > 1e-5


@pytest.mark.parametrize(
    "kind, cause",
    [("cumsum", "it has no numpy for aten.cumsum;"), ("numpy-broken", "it has no numpy for aten.tanh;"), ("data-dependent", "")],
)  # fmt: skip
def test_the_derived_path_steps_aside_with_one_note_naming_the_cause(kind, cause, monkeypatch, capsys):
    monkeypatch.setattr(ppo, "NOTED", set())
    if kind == "numpy-broken":  # an op the table lost: it must step aside, not crash the run
        monkeypatch.delitem(ppo.NUMPY_OF_ATEN, "tanh")
    agent = edited_agent(kind if kind != "numpy-broken" else "relu")
    if kind == "numpy-broken":
        agent.actor[1] = torch.nn.Tanh()
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    policy = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(0), obs, ppo.all_valid(5, 3))
    for _ in range(3):  # refreshed every iteration; the note comes once
        policy.refresh(obs, ppo.all_valid(5, 3))
        assert not policy.fast
        actions, logprobs, values = policy.act(obs, ppo.all_valid(5, 3), 0)  # the plain method: its own log-probs of its own samples
        _, ref_logp, _, ref_values = agent.get_action_and_value(torch.as_tensor(obs), torch.as_tensor(actions))
        np.testing.assert_array_equal(logprobs, ref_logp.detach().numpy())
        np.testing.assert_array_equal(values, ref_values.detach().numpy())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: the numpy rollout path steps aside: {cause}"), lines
    assert lines[0].endswith("; the rollout runs Agent.get_action_and_value in torch")


# Edits a researcher makes in a copy of the script, each as (old, new) replacements of the source.
RETURN_LOGP = "        return torch.cat([x.log_softmax(-1) for x in logits.split(self.nvec, -1)], -1), value"
TEMPERATURE = [
    ("        self.obs_onehot = ", "        self.log_temperature = nn.Parameter(torch.tensor(0.0))\n        self.obs_onehot = "),
    (RETURN_LOGP, RETURN_LOGP.replace("logits.split", "(logits / self.log_temperature.exp()).split")),
]  # fmt: skip
EDITS = {
    "relu": [("nn.Tanh(),", "nn.ReLU(),")],
    "gelu": [("nn.Tanh(),", "nn.GELU(),")],
    "layernorm": [("        nn.Tanh(),\n        layer_init(nn.Linear(64, 64)),", "        nn.LayerNorm(64),\n        nn.Tanh(),\n        layer_init(nn.Linear(64, 64)),")],
    "temperature": [TEMPERATURE[0], TEMPERATURE[1]],
    "temperature-at-0.5": [(TEMPERATURE[0][0], TEMPERATURE[0][1].replace("0.0", "-0.7")), TEMPERATURE[1]],
    "epsilon": [(RETURN_LOGP, "        logp = " + RETURN_LOGP[len("        return "):-len(", value")] + "\n        return (0.95 * logp.exp() + 0.05 / logp.shape[-1]).log(), value")],
    "cumsum": [(RETURN_LOGP, RETURN_LOGP.replace("logits.split", "(logits + 0.1 * logits.cumsum(-1)).split"))],
    "action-dependent-logits": [(RETURN_LOGP, "        return (logits + 0.5 * (torch.arange(logits.shape[-1]) == 0)).log_softmax(-1), value")],
    "extra-output": [
        ("        return self.actor(hidden), self.critic(hidden).squeeze(-1)\n",
         "        return self.actor(hidden), self.critic(hidden).squeeze(-1), hidden\n"),
        ("        logits, value = self(obs)\n", "        logits, value, _ = self(obs)\n"),
    ],
    "forward-three-values": [
        ("        self.obs_onehot = ", "        self.log_temperature = nn.Parameter(torch.tensor(0.5))\n        self.obs_onehot = "),
        ("        return self.actor(hidden), self.critic(hidden).squeeze(-1)\n",
         "        return self.actor(hidden), self.critic(hidden).squeeze(-1), self.log_temperature\n"),
        ("        logits, value = self(obs)\n", "        logits, value, log_t = self(obs)\n        logits = logits / log_t.exp()\n"),
    ],
}  # fmt: skip


def run_edited_copy(tmp_path, edits, *flags, check=True):
    source = (ROOT / "ppo_discrete.py").read_text()
    for old, new in edits:
        assert old in source, old
        source = source.replace(old, new)
    (tmp_path / "ppo_edited.py").write_text(source)
    flags = ["--update-epochs", "1", "--num-minibatches", "1", "--eval-episodes", "1", *flags]
    proc = subprocess.run(
        [sys.executable, "ppo_edited.py", *flags, "--runs-dir", "runs", "--num-threads", "1", "--device", "cpu"],
        cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if not check:
        return proc, None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [r for r in read_metrics(tmp_path / "runs") if "losses/approx_kl" in r]


@pytest.mark.parametrize(
    "edit, steps_aside",
    [("relu", None), ("gelu", None), ("layernorm", None), ("temperature", None), ("temperature-at-0.5", None), ("epsilon", None),
     ("action-dependent-logits", None), ("extra-output", None), ("forward-three-values", None),
     ("cumsum", "it has no numpy for aten.cumsum")],
)  # fmt: skip
def test_an_edited_copy_of_the_script_trains_on_policy(edit, steps_aside, tmp_path):
    proc, updates = run_edited_copy(tmp_path, EDITS[edit], "--total-timesteps", "2048")
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    if steps_aside is None:  # the derived path follows the edit
        assert notes == [], notes
    else:
        assert len(notes) == 1 and notes[0].startswith(f"note: the numpy rollout path steps aside: {steps_aside}"), notes
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "__ppo_edited__" in run_dir.name  # exp_name comes from the file name
    # One epoch of one minibatch: the update's forward sees the rollout's parameters, so the ratio is 1
    # wherever the rollout acted with the policy being trained (an unchecked copy: |old_approx_kl| ~1e-2).
    assert len(updates) == 4
    for r in updates:
        assert abs(r["losses/old_approx_kl"]) < 1e-6 and r["losses/clipfrac"] == 0, r


def test_a_temperature_edit_starting_at_exactly_1_is_sampled_by_the_run_from_the_first_iteration(tmp_path):
    # A copy that ignored the temperature would pass its 1e-5 check while the temperature drifts from 1: |old_approx_kl|
    # up to 9.5e-7 within 10 iterations (issue 23). Rollout and update running the same ops leave rounding only (~4e-9).
    proc, updates = run_edited_copy(tmp_path, EDITS["temperature"], "--total-timesteps", "10240")
    assert "note:" not in proc.stdout and len(updates) == 20
    assert max(abs(r["losses/old_approx_kl"]) for r in updates) < 1e-7, [r["losses/old_approx_kl"] for r in updates]


def test_an_edit_that_puts_probability_back_on_masked_actions_stops_the_run_naming_the_step(tmp_path):
    # Epsilon mixed in after the mask: a forbidden action is sampled sooner or later (384 in 20k steps, unchecked).
    proc, _ = run_edited_copy(tmp_path, EDITS["epsilon"], "--env-id", "Taxi-v4", "--total-timesteps", "4096", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"error: the policy sampled action \d that env \d's action_mask forbids at global step \d+: "
                        r"Agent.distribution must give masked actions no probability \(MASKED_LOGIT\)", line), line  # fmt: skip


def train_in_process(monkeypatch, **flags):
    """ppo.train with flags, in this process (so that tests can monkeypatch it); its signal handlers undone."""
    monkeypatch.setattr(ppo, "NOTED", set())
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        ppo.train(ppo.Args(**{"eval_episodes": 0, "num_threads": 1, "device": "cpu", **flags}))
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_on_policy_check_switches_a_rollout_fed_another_policy(monkeypatch, capsys, tmp_path):
    derive = ppo.DerivedPolicy.__init__

    def off_policy(self, *inputs):  # a fast path wrong in a way its per-iteration check does not see
        derive(self, *inputs)
        act = self.act
        self.act = lambda rng, *x: (lambda a, logp, v: (a, logp + 0.05, v))(*act(rng, *x))

    monkeypatch.setattr(ppo.DerivedPolicy, "__init__", off_policy)
    train_in_process(monkeypatch, total_timesteps=2048, update_epochs=1, num_minibatches=1, runs_dir=str(tmp_path))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: on-policy check: max |log-ratio| 0.05 at the first minibatch of iteration 1; "
        "the rollout switches to the plain get_action_and_value for the rest of the run"
    ]
    kls = [r["losses/old_approx_kl"] for r in read_metrics(tmp_path) if "losses/old_approx_kl" in r]
    assert kls[0] == pytest.approx(0.05, abs=1e-5) and all(abs(kl) < 1e-6 for kl in kls[1:]), kls


class DropoutAgent(ppo.Agent):
    """A policy that is no function of its weights alone: dropout in the actor, left in training mode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.actor.insert(2, torch.nn.Dropout(0.5))


def test_on_policy_check_on_the_plain_path_notes_once_and_trains_on(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ppo, "Agent", DropoutAgent)
    train_in_process(monkeypatch, total_timesteps=2048, runs_dir=str(tmp_path))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, notes
    assert notes[0].startswith("note: the numpy rollout path steps aside: it has no numpy for aten.dropout")
    assert re.fullmatch(r"note: on-policy check: max \|log-ratio\| [\d.e+-]+ at the first minibatch of iteration 1 with "
                        r"the plain get_action_and_value: .*; training goes on", notes[1]), notes[1]  # fmt: skip
    assert len([r for r in read_metrics(tmp_path) if "losses/approx_kl" in r]) == 4


class MixedEndsEnv(gym.Env):
    """Observation: steps taken in this episode. Even episodes (0, 2, ...) terminate after 2 steps; odd ones
    run until the time limit of 4 steps truncates them."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, self.episode % 2 == 0 and self.t == 2, False, {}


gym.register("MixedEnds-v0", entry_point=MixedEndsEnv, max_episode_steps=4)


def test_rollout_hands_gae_the_right_flags_and_leaves_reset_steps_out(monkeypatch, tmp_path):
    seen, batches, gae = [], [], ppo.compute_gae

    def spy_gae(rewards, values, next_value, terminated, truncated, gamma, gae_lambda):
        seen.append((rewards.copy(), terminated.copy(), truncated.copy()))
        return gae(rewards, values, next_value, terminated, truncated, gamma, gae_lambda)

    update = ppo.ppo_update
    monkeypatch.setattr(ppo, "compute_gae", spy_gae)
    monkeypatch.setattr(ppo, "ppo_update", lambda agent, opt, batch, *rest: batches.append(batch["obs"][:, 0].tolist()) or update(agent, opt, batch, *rest))
    train_in_process(monkeypatch, env_id="MixedEnds-v0", num_envs=2, num_steps=12, num_minibatches=2, total_timesteps=48, runs_dir=str(tmp_path))
    # From reset, every 8 steps: 2 steps (terminated), the autoreset step, 4 steps (truncated), the autoreset step.
    period = dict(obs=[0, 1, 2, 0, 1, 2, 3, 4], reward=[1, 1, 0, 1, 1, 1, 1, 0], term=[0, 1, 0, 0, 0, 0, 0, 0],
                  trunc=[0, 0, 0, 0, 0, 0, 1, 0], valid=[1, 1, 0, 1, 1, 1, 1, 0])  # fmt: skip
    whole = {k: np.array(v * 3) for k, v in period.items()}  # 24 steps = 2 iterations of 12
    for i, (rewards, terminated, truncated) in enumerate(seen):
        steps = slice(12 * i, 12 * (i + 1))
        for name, got in (("reward", rewards), ("term", terminated), ("trunc", truncated)):
            np.testing.assert_array_equal(got, np.repeat(whole[name][steps, None], 2, axis=1), err_msg=f"{name}, iteration {i + 1}")
        kept = [o for o, v in zip(whole["obs"][steps], whole["valid"][steps]) if v for _ in range(2)]
        assert batches[i] == kept, (i, batches[i])
    assert len(seen) == 2


def test_explained_variance():
    assert ppo.explained_variance(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert ppo.explained_variance(np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.0)
    assert np.isnan(ppo.explained_variance(np.array([1.0, 2.0]), np.array([5.0, 5.0])))


# ---------------------------------------------------------------- one PPO update against a naive reference


def naive_ppo_update(agent, batch, args, rng):
    """The update written out: explicit loops over epochs and minibatches (the same permutations),
    torch.distributions.Categorical, the clipped objectives as in the paper, gradient clipping and
    Adam by hand, one tensor at a time. Returns the stats' means and the epochs run."""
    params = list(agent.parameters())
    first, second = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    n, k, eps, t = len(batch["actions"]), args.num_minibatches, args.clip_coef, 0
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    stats = {name: [] for name in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
    for epoch in range(args.update_epochs):
        perm, start, epoch_kl = rng.permutation(n), 0, []
        for size in sizes:
            idx = torch.as_tensor(perm[start : start + size])
            start += size
            logits, new_values = agent(batch["obs"][idx])
            pi = torch.distributions.Categorical(logits=logits)
            logratio = pi.log_prob(batch["actions"][idx]) - batch["logprobs"][idx]
            ratio = torch.exp(logratio)
            adv = batch["advantages"][idx]
            if args.norm_adv:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv).mean()
            old, ret = batch["values"][idx], batch["returns"][idx]
            if args.clip_vloss:
                clipped = old + torch.clamp(new_values - old, -eps, eps)
                v_loss = 0.5 * torch.max((new_values - ret) ** 2, (clipped - ret) ** 2).mean()
            else:
                v_loss = 0.5 * ((new_values - ret) ** 2).mean()
            entropy = pi.entropy().mean()
            loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
            grads = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
            scale = min(1.0, args.max_grad_norm / (norm + 1e-6))
            t += 1
            with torch.no_grad():
                for p, g, m, v in zip(params, grads, first, second):
                    g = g * scale
                    m.copy_(0.9 * m + 0.1 * g)
                    v.copy_(0.999 * v + 0.001 * g * g)
                    p -= args.learning_rate * (m / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-5)
            logratio, ratio, pg_loss, v_loss, entropy = (x.detach() for x in (logratio, ratio, pg_loss, v_loss, entropy))
            epoch_kl.append(((ratio - 1) - logratio).mean().item())
            for name, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy),
                                ("old_approx_kl", -logratio.mean()), ("approx_kl", epoch_kl[-1]),
                                ("clipfrac", ((ratio - 1).abs() > eps).float().mean())):  # fmt: skip
                stats[name].append(float(value))
        if args.target_kl is not None and np.mean(epoch_kl) > args.target_kl:
            return {f"losses/{k}": np.mean(v) for k, v in stats.items()}, epoch + 1
    return {f"losses/{k}": np.mean(v) for k, v in stats.items()}, args.update_epochs


def fixed_batch(agent, n=37):
    """A batch whose size the minibatches do not divide, old log-probs away from the current policy
    (so ratios leave the clip range) and advantages with a mean far from 0."""
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(n, 4, generator=gen)
    with torch.no_grad():
        logits, values = agent(obs)
    actions = torch.randint(0, 3, (n,), generator=gen)
    old_logits = logits + 0.5 * torch.randn(n, 3, generator=gen)
    return {
        "obs": obs,
        "actions": actions,
        "action_mask": torch.ones(n, 3, dtype=torch.bool),
        "logprobs": old_logits.log_softmax(-1).gather(-1, actions[:, None])[:, 0],
        "values": values + 0.3 * torch.randn(n, generator=gen),
        "advantages": 1.0 + 2.0 * torch.randn(n, generator=gen),
        "returns": values + torch.randn(n, generator=gen),
    }


@pytest.mark.parametrize(
    "flags",
    [{}, {"norm_adv": False, "clip_vloss": False}, {"target_kl": 1e-4}],
    ids=["defaults", "no-norm-adv-no-clip-vloss", "target-kl-stops-early"],
)
def test_one_ppo_update_matches_naive_reference(flags):
    args = ppo.Args(learning_rate=0.01, num_minibatches=4, update_epochs=3, **flags)
    torch.manual_seed(0)
    agent = ppo.Agent(gym.spaces.Box(-1, 1, (4,), np.float32), 3, pixels=False)
    reference, start = copy.deepcopy(agent), copy.deepcopy(agent)
    batch = fixed_batch(agent)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    stats, first_logratio = ppo.ppo_update(agent, optimizer, batch, args, np.random.default_rng(7), ppo.NonFiniteGuard("none").at(1))
    expected, epochs = naive_ppo_update(reference, batch, args, np.random.default_rng(7))
    assert stats.pop("losses/skipped_steps") == 0
    # Before any step: the largest |log-ratio| of the first minibatch (the same permutation as the reference's).
    first = torch.as_tensor(np.random.default_rng(7).permutation(37)).tensor_split(4)[0]
    logits = start(batch["obs"][first])[0]
    expected_first = (logits.log_softmax(-1).gather(-1, batch["actions"][first, None])[:, 0] - batch["logprobs"][first]).abs().max()
    assert first_logratio == pytest.approx(expected_first.item(), rel=1e-6)
    assert epochs == (1 if "target_kl" in flags else args.update_epochs)
    moved = 0.0
    for p, q, p0 in zip(agent.parameters(), reference.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # float32 rounding of Adam; a wrong update is off by ~lr
        moved = max(moved, (q - p0).abs().max().item())
    assert moved > 0.01  # the update moved the parameters well beyond the tolerance
    assert stats.keys() == expected.keys()
    for name in stats:
        assert stats[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name


def test_network_init_and_shapes():
    agent = ppo.Agent(gym.spaces.Box(-1, 1, (4,), np.float32), 2, pixels=False)
    w = agent.actor[-1].weight.detach()
    # Orthogonal rows scaled by 0.01 on the policy head, zero biases everywhere.
    np.testing.assert_allclose((w @ w.T).numpy(), 1e-4 * np.eye(2), atol=1e-9)
    assert all((m.bias == 0).all() for m in agent.modules() if isinstance(m, torch.nn.Linear))
    logits, value = agent(torch.zeros(3, 4))
    assert logits.shape == (3, 2) and value.shape == (3,)
    cnn = ppo.Agent(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), 6, pixels=True)
    logits, value = cnn(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert logits.shape == (2, 6) and value.shape == (2,)
    onehot = ppo.Agent(gym.spaces.Discrete(16), 4, pixels=False)
    assert onehot(torch.tensor([3.0, 15.0]))[0].shape == (2, 4)


def test_auto_device_sends_the_cnn_to_a_gpu_and_keeps_the_mlp_on_the_cpu():
    assert ppo.auto_device(True, cuda=True, mps=False)[0] == "cuda"
    assert ppo.auto_device(True, cuda=False, mps=True)[0] == "mps"
    assert ppo.auto_device(False, cuda=True, mps=False)[0] == "cpu"
    assert "--device cuda to override" in ppo.auto_device(False, cuda=True, mps=False)[1]
    assert ppo.auto_device(True, cuda=False, mps=False) == ("cpu", "auto: no GPU")


def test_torchrun_with_more_processes_than_gpus_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(SystemExit) as exit_info:
        ppo.pick_device("cuda", gpu_pays=False)
    assert exit_info.value.code == 2
    assert "start one process per GPU or pass --device cpu" in capsys.readouterr().err


def test_import_has_no_side_effects():
    proc = subprocess.run(
        [sys.executable, "-c", "import os, ppo_discrete; print(os.path.exists('runs'))"],
        cwd=ROOT / "tests", env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, capture_output=True, text=True,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# ---------------------------------------------------------------- CLI end to end

METRICS = [
    "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl",
    "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
]  # fmt: skip


def test_cartpole_cli_writes_metrics_args_checkpoint_and_evaluates(tmp_path):
    proc = run_script(
        "ppo_discrete.py", "--total-timesteps", "2048", "--runs-dir", str(tmp_path), "--eval-episodes", "2", "--capture-video"
    )
    records = read_metrics(tmp_path)
    keys = set().union(*records)
    assert set(METRICS) <= keys, set(METRICS) - keys
    assert all("global_step" in r for r in records)
    assert max(r["global_step"] for r in records) == 2048
    lrs = [r["charts/learning_rate"] for r in records if "charts/learning_rate" in r]
    np.testing.assert_allclose(lrs, [2.5e-4 * (1 - i / 4) for i in range(4)])  # linear annealing
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "args.json").exists() and (run_dir / "checkpoint.pt").exists()
    assert (run_dir / "videos" / "eval.mp4").stat().st_size > 1000
    assert "eval: return" in proc.stdout
    assert "device cpu (auto: " in proc.stdout and ", 1 torch thread(s)" in proc.stdout  # the MLP's defaults
    progress = r"^iteration 4/4 \| global_step 2,048 \| SPS [\d,]+ \| episodic_return \(last \d+\) [\d.]+$"
    assert re.search(progress, proc.stdout, re.MULTILINE), proc.stdout
    assert f"done: {run_dir} (metrics.jsonl, args.json, checkpoint.pt, videos/)" in proc.stdout
    # What a policy needs loads without unpickling code; resuming's own state is one pickled blob.
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == set(ppo.CHECKPOINT_KEYS) and isinstance(ckpt["resume_state"], bytes)
    assert ckpt["iteration"] == 4 and ckpt["global_step"] == 2048 and ckpt["n_actions"] == 2
    # A saved checkpoint can be evaluated without training.
    proc = run_script("ppo_discrete.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2")
    assert "over 2 episodes" in proc.stdout


def test_atari_cli_logs_whole_game_scores(tmp_path):
    proc = run_script(
        "ppo_discrete.py", "--env-id", "ALE/Breakout-v5", "--num-envs", "4", "--num-steps", "128",
        "--total-timesteps", "1024", "--runs-dir", str(tmp_path), "--eval-episodes", "1", "--eval-stochastic",
        "--capture-video",
    )  # fmt: skip
    records = read_metrics(tmp_path)
    episodes = [r for r in records if "charts/episodic_return" in r]
    assert episodes, "a near-random policy loses 5 Breakout lives well within 256 steps"
    # A whole game (5 lives) of a near-random policy lasts far longer than one life (~30 steps).
    assert min(r["charts/episodic_length"] for r in episodes) > 60
    assert all(float(r["charts/episodic_return"]).is_integer() for r in episodes)
    assert "losses/approx_kl" in set().union(*records)
    assert list(tmp_path.glob("*/videos/eval.mp4"))
    assert "eval: return" in proc.stdout
    assert ", 1 torch thread(s)" in proc.stdout  # the CNN's default too: more stall beside a busy core


def test_track_offline_leaves_metrics_in_wandb_run(tmp_path):
    run_script("ppo_discrete.py", "--total-timesteps", "1024", "--runs-dir", str(tmp_path), "--track", "--eval-episodes", "1")
    data = wandb_offline_log(tmp_path)
    for name in METRICS[2:] + ["global_step"]:
        assert name.encode() in data, name


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--env-id", "Pendulum-v1"], "ppo_continuous.py"),
        (["--env-id", "NoSuchEnv-v9"], "--env-id NoSuchEnv-v9: Environment `NoSuchEnv` doesn't exist"),
        (["--env-id", "Taxi-v3"], "--env-id Taxi-v3: Environment version v3 for `Taxi` is deprecated. Please use `Taxi-v4` instead."),
        (["--env-id", "no_such_module:Tiny-v0"], "--env-id no_such_module:Tiny-v0: No module named 'no_such_module'"),
        (["--env-kwargs", '{"gravity": 3}'], "unexpected keyword argument 'gravity'"),
        (["--env-kwargs", "[1, 2]"], "--env-kwargs [1, 2] is not a JSON object"),
        (["--env-id", "ALE/Breakout-v5", "--env-kwargs", '{"episodic_life": true}'], "AtariVectorEnv takes no episodic_life"),
        (["--env-id", "ALE/Breakout-v5", "--env-kwargs", '{"continuous": true}'], "AtariVectorEnv takes no continuous"),
        (["--env-id", "ALE/Breakout-v5", "--env-kwargs", '{"life_loss_info": true}'], "AtariVectorEnv takes no life_loss_info"),
        (["--num-minibatches", "3"], "--num-minibatches"),
        (["--num-envs", "0"], "--num-envs"),
        (["--gamma", "1.5"], "--gamma"),
        (["--total-timesteps", "100"], "--total-timesteps"),
        (["--resume", "/nonexistent/checkpoint.pt"], "--resume"),
    ],
)
def test_bad_input_gives_one_line_error(flags, needle, tmp_path):
    assert_one_line_error("ppo_discrete.py", flags, needle, tmp_path)


def test_a_file_that_is_no_checkpoint_of_this_script_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"agent": {}, "ranks": [{"rng": np.zeros(3)}]}, tmp_path / "pickled_numpy.pt")  # not weights_only
    torch.save({"policy": {}, "episode": 3}, tmp_path / "other_keys.pt")
    for name in ("notes.txt", "pickled_numpy.pt", "other_keys.pt"):
        for flag in ("--resume", "--eval-checkpoint"):
            assert_one_line_error("ppo_discrete.py", [flag, str(tmp_path / name)], flag, tmp_path)


def test_total_timesteps_not_a_whole_number_of_batches_is_noted(monkeypatch, capsys):
    monkeypatch.setattr(ppo, "NOTED", set())
    assert ppo.check_args(ppo.Args(total_timesteps=2000), world_size=1) == (512, 128, 3)
    expected = "note: --total-timesteps 2,000 is not a whole number of batches of 512 steps; training 1,536 steps (3 iterations)"
    assert capsys.readouterr().out.splitlines() == [expected]
    assert ppo.check_args(ppo.Args(total_timesteps=2048), world_size=1) == (512, 128, 4)
    assert capsys.readouterr().out == ""


class WritesMarker:
    """Unpickling it creates a file: it stands for the code a shared pickle could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_eval_checkpoint_reads_weights_only(tmp_path):
    run_script(
        "ppo_discrete.py", "--total-timesteps", "1024", "--runs-dir", str(tmp_path / "runs"), "--eval-episodes", "0", "--num-threads", "1"
    )
    (path,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    ckpt, marker = torch.load(path, weights_only=True), tmp_path / "code-ran"
    # A shared checkpoint whose resume_state runs code when unpickled still evaluates, and the code never runs.
    ckpt["resume_state"] = pickle.dumps(WritesMarker(str(marker)))
    torch.save(ckpt, tmp_path / "shared.pt")
    proc = run_script("ppo_discrete.py", "--eval-checkpoint", str(tmp_path / "shared.pt"), "--eval-episodes", "1")
    assert "over 1 episodes" in proc.stdout and not marker.exists()
    # Pickled code anywhere else is refused in one line.
    ckpt["n_actions"] = WritesMarker(str(marker))
    torch.save(ckpt, tmp_path / "evil.pt")
    assert_one_line_error("ppo_discrete.py", ["--eval-checkpoint", str(tmp_path / "evil.pt")], "--eval-checkpoint", tmp_path)
    assert not marker.exists()
    # A network this script does not build (a copy's: one more layer, or another width) is one line naming the parameter.
    for key, tensor in [("actor.extra.weight", torch.zeros(2, 2)), ("critic.0.weight", torch.zeros(7, 4))]:
        ckpt = torch.load(path, weights_only=True)
        ckpt["agent"][key] = tensor
        torch.save(ckpt, tmp_path / "copy.pt")
        assert_one_line_error("ppo_discrete.py", ["--eval-checkpoint", str(tmp_path / "copy.pt")], f"first differing parameter: {key}", tmp_path)


# ---------------------------------------------------------------- learning, determinism, resume


def last_returns(records, n=20):
    return [r["charts/episodic_return"] for r in records if "charts/episodic_return" in r][-n:]


def test_cartpole_learns(tmp_path):
    # With CleanRL's learning rate 2.5e-4 the 20-episode mean was 250-330 after 150k steps (seeds 1-3);
    # 1e-3 crossed 400 within 30k-55k steps (seeds 1-2).
    run_script(
        "ppo_discrete.py", "--total-timesteps", "150000", "--learning-rate", "1e-3", "--seed", "1",
        "--runs-dir", str(tmp_path), "--num-threads", "1",
    )  # fmt: skip
    returns = last_returns(read_metrics(tmp_path))
    # A random policy averages about 22 on CartPole-v1.
    assert len(returns) == 20 and np.mean(returns) >= 400, returns


def test_same_seed_same_metrics_and_interrupted_resume_matches(tmp_path):
    # Same numbers are promised on the CPU (GPU kernels may reduce in varying order).
    flags = ["--total-timesteps", "40960", "--num-threads", "1", "--eval-episodes", "2", "--device", "cpu"]
    run_script("ppo_discrete.py", *flags, "--runs-dir", str(tmp_path / "a"))
    run_script("ppo_discrete.py", *flags, "--runs-dir", str(tmp_path / "b"))
    a, b = comparable(read_metrics(tmp_path / "a")), comparable(read_metrics(tmp_path / "b"))
    assert a == b

    # Interrupt a third run with Ctrl-C part-way, resume it, and compare with the uninterrupted run.
    ckpt = interrupt_with_ctrl_c("ppo_discrete.py", flags, tmp_path / "c")
    interrupted_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 1 <= interrupted_at < 80, "the interrupt must land mid-run for this test to mean anything"
    run_script("ppo_discrete.py", "--resume", str(ckpt), "--num-threads", "1", "--device", "cpu")
    assert comparable(read_metrics(tmp_path / "c")) == a


class RaisesOnItsNthStep(gym.Env):
    """Steps of a random walk; the Nth step of all its copies together raises (a simulator server going away)."""

    observation_space, action_space = gym.spaces.Box(-10, 10, (4,), np.float32), gym.spaces.Discrete(2)
    RAISE_AT, STEPS = [None], [0]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.normal(size=4).astype(np.float32), {}

    def step(self, action):
        RaisesOnItsNthStep.STEPS[0] += 1
        if RaisesOnItsNthStep.STEPS[0] == RaisesOnItsNthStep.RAISE_AT[0]:
            raise ConnectionError("the simulator went away")
        self.t += 1
        return self.np_random.normal(size=4).astype(np.float32), float(action), self.t == 20, False, {}


gym.register("RaisesOnItsNthStep-v0", entry_point=RaisesOnItsNthStep)


def test_an_env_that_raises_leaves_the_checkpoint_of_the_last_update_and_resume_continues(monkeypatch, capsys, tmp_path):
    flags = dict(env_id="RaisesOnItsNthStep-v0", total_timesteps=2048, update_epochs=1)
    train_in_process(monkeypatch, runs_dir=str(tmp_path / "whole"), **flags)
    whole = comparable(read_metrics(tmp_path / "whole"))
    RaisesOnItsNthStep.STEPS[0], RaisesOnItsNthStep.RAISE_AT[0] = 0, 2 * 512 + 100  # in iteration 3's rollout, --save-every 0
    with pytest.raises(SystemExit) as crashed:
        train_in_process(monkeypatch, runs_dir=str(tmp_path / "parts"), **flags)
    (ckpt,) = (tmp_path / "parts").glob("*/checkpoint.pt")
    assert crashed.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" in err[0] and err[-1] == (f"error: ConnectionError: the simulator went away; checkpoint of iteration 2 in {ckpt} "
                                                 f"(exactly its weights); continue with --resume {ckpt}")  # fmt: skip
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["iteration"], saved["global_step"]) == (2, 1024)
    assert comparable(read_metrics(tmp_path / "parts")) == [r for r in whole if r["global_step"] <= 1024]  # the rollout's episodes undone
    RaisesOnItsNthStep.RAISE_AT[0] = None
    train_in_process(monkeypatch, resume=str(ckpt))
    assert "note: the checkpoint of a crash: resumed training starts fresh episodes" in capsys.readouterr().out
    resumed = [r for r in read_metrics(tmp_path / "parts") if "losses/approx_kl" in r]
    assert [r["global_step"] for r in resumed] == [512, 1024, 1536, 2048]


def test_sigterm_checkpoints_exits_130_and_resumes_in_the_moved_run_folder(tmp_path):
    flags = ["--total-timesteps", "40960", "--num-threads", "1", "--eval-episodes", "2", "--device", "cpu"]
    run_script("ppo_discrete.py", *flags, "--runs-dir", str(tmp_path / "a"))
    ckpt = interrupt_with_ctrl_c("ppo_discrete.py", flags, tmp_path / "b", sig=signal.SIGTERM)
    assert 1 <= torch.load(ckpt, weights_only=True)["iteration"] < 80
    moved = tmp_path / "moved" / ckpt.parent.name
    shutil.move(ckpt.parent, moved)
    proc = run_script("ppo_discrete.py", "--resume", str(moved / "checkpoint.pt"), "--num-threads", "1", "--device", "cpu")
    assert comparable(read_metrics(tmp_path / "moved")) == comparable(read_metrics(tmp_path / "a"))
    assert f"done: {moved} (metrics.jsonl, args.json, checkpoint.pt)" in proc.stdout


# ---------------------------------------------------------------- torchrun


@pytest.mark.parametrize("device, backend", [("cuda:0", "cpu:gloo,cuda:nccl"), ("cpu", "gloo")])
def test_process_group_serves_cpu_tensors_and_objects_beside_cuda(device, backend, monkeypatch):
    chosen = []
    monkeypatch.setattr(dist, "init_process_group", lambda b: chosen.append(b))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ppo.init_distributed(torch.device(device)) == (1, 2)
    assert chosen == [backend]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ppo.init_distributed(torch.device(device)) == (0, 1) and chosen == [backend]


def test_collectives_get_tensors_on_the_training_device_or_the_cpu(monkeypatch, tmp_path):
    # A real process group of one rank runs every collective of the script in this process.
    calls, real_init = [], dist.init_process_group

    def recording(name, collective):
        def wrapper(*args, **kwargs):
            flat = [y for x in [*args, *kwargs.values()] for y in (x if isinstance(x, list) else [x])]
            calls.append((name, [t.device for t in flat if isinstance(t, torch.Tensor)]))
            return collective(*args, **kwargs)

        return wrapper

    for name in ("broadcast", "all_reduce", "all_gather", "all_gather_object", "barrier"):
        monkeypatch.setattr(dist, name, recording(name, getattr(dist, name)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: real_init(backend, store=dist.HashStore(), rank=0, world_size=1))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    flags = dict(total_timesteps=1024, eval_episodes=1, num_threads=1, device="cpu", target_kl=10.0)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        ppo.train(ppo.Args(**flags, runs_dir=str(tmp_path / "group")))
        monkeypatch.delenv("WORLD_SIZE")
        ppo.train(ppo.Args(**flags, runs_dir=str(tmp_path / "plain")))
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        if dist.is_initialized():
            dist.destroy_process_group()
    assert {name for name, _ in calls} == {"broadcast", "all_reduce", "all_gather", "all_gather_object", "barrier"}
    assert all(d in (torch.device(flags["device"]), torch.device("cpu")) for _, devices in calls for d in devices), calls
    # Gradients, target-KL and stop flag all-reduced over one rank: the same numbers as without a group.
    assert comparable(read_metrics(tmp_path / "group")) == comparable(read_metrics(tmp_path / "plain"))


def test_two_process_gloo_run(tmp_path):
    proc = run_torchrun("ppo_discrete.py", "--total-timesteps", "4096", "--runs-dir", str(tmp_path), "--eval-episodes", "1")
    assert "parameters identical on 2 processes" in proc.stdout
    records = read_metrics(tmp_path)
    # global_step counts the steps of both processes: 4 iterations of 4 envs x 128 steps x 2.
    assert max(r["global_step"] for r in records) == 4096
    assert [r["global_step"] for r in records if "losses/approx_kl" in r] == [1024, 2048, 3072, 4096]


# ---------------------------------------------------------------- non-finite numbers


def nan_loss_at(monkeypatch, calls):
    """policy_loss returns NaN at these calls (16 a default update: 4 epochs of 4 minibatches)."""
    count, loss = [0], ppo.policy_loss

    def nan_loss(*args):
        count[0] += 1
        return loss(*args) * (float("nan") if count[0] - 1 in calls else 1.0)

    monkeypatch.setattr(ppo, "policy_loss", nan_loss)


def test_a_non_finite_loss_skips_the_step_and_is_counted(monkeypatch, tmp_path):
    nan_loss_at(monkeypatch, {20})  # iteration 2, epoch 2, minibatch 1
    train_in_process(monkeypatch, total_timesteps=2048, runs_dir=str(tmp_path))
    updates = [r for r in read_metrics(tmp_path) if "losses/skipped_steps" in r]
    assert [r["losses/skipped_steps"] for r in updates] == [0, 1, 0, 0]
    assert all(np.isfinite(r["losses/policy_loss"]) for r in updates)  # the mean of the minibatches stepped
    (ckpt,) = tmp_path.glob("*/checkpoint.pt")
    assert all(t.isfinite().all() for t in torch.load(ckpt, weights_only=True)["agent"].values())


def stopped_run(monkeypatch, capsys, tmp_path, iteration_kept):
    """Train 4 iterations, a checkpoint after each, which must stop with exit status 1 and leave the checkpoint of
    iteration_kept whole and finite; return the run's stderr lines and that checkpoint's path."""
    with pytest.raises(SystemExit) as stopped:
        train_in_process(monkeypatch, total_timesteps=2048, save_every=1, runs_dir=str(tmp_path))
    assert stopped.value.code == 1
    (ckpt,) = tmp_path.glob("*/checkpoint.pt*")
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == iteration_kept and all(t.isfinite().all() for t in state["agent"].values())
    return capsys.readouterr().err.splitlines(), ckpt


def test_max_skipped_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(monkeypatch, capsys, tmp_path):
    nan_loss_at(monkeypatch, set(range(32, 1000)))  # from iteration 3 on
    err, ckpt = stopped_run(monkeypatch, capsys, tmp_path, iteration_kept=2)
    # The 10th NaN in a row: call 41, iteration 3, epoch 3, minibatch 2.
    assert err == [
        f"error: non-finite loss ({ppo.MAX_SKIPPED_STEPS} steps in a row) at iteration 3 (epoch 3, minibatch 2); "
        f"stopped, last good checkpoint kept: {ckpt}"
    ]


@pytest.mark.parametrize(
    "poisoned_step, found",
    # Found at the next minibatch (its gradient turns non-finite), or after the update's last step.
    [(17, "iteration 2 (epoch 1, minibatch 2)"), (32, "iteration 2 (epoch 4, minibatch 4)")],
)
def test_a_non_finite_weight_after_a_step_stops_the_run_and_is_never_checkpointed(poisoned_step, found, monkeypatch, capsys, tmp_path):
    steps, step = [0], torch.optim.Adam.step

    def poisoning_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps[0] += 1
        if steps[0] == poisoned_step:
            with torch.no_grad():
                self.param_groups[0]["params"][2][0, 0] = float("inf")  # actor.2.weight
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    err, ckpt = stopped_run(monkeypatch, capsys, tmp_path, iteration_kept=1)
    assert err == [f"error: non-finite weight actor.2.weight at {found}; stopped, last good checkpoint kept: {ckpt}"]
    # The checkpoint writer refuses non-finite state in its own right, with the same line.
    agent = ppo.Agent(gym.spaces.Box(-1, 1, (4,), np.float32), 2, pixels=False)
    optimizer = torch.optim.Adam(agent.parameters())
    with torch.no_grad():
        agent.critic[0].bias[3] = float("nan")
    logger = type("Logger", (), {"rank": 0, "checkpoint_path": str(tmp_path / "new" / "checkpoint.pt")})()
    with pytest.raises(SystemExit) as refused:
        ppo.save_checkpoint(logger, ppo.Args(), agent, optimizer, 7, 0, None, np.random.default_rng(0), None)
    assert refused.value.code == 1 and not (tmp_path / "new").exists()
    assert capsys.readouterr().err.splitlines() == [
        "error: non-finite weight critic.0.bias at iteration 7 (at the checkpoint, not written); stopped, last good checkpoint kept: none written"
    ]


class UnpicklableEnv(CountEnv):
    def __init__(self):
        super().__init__()
        self.callback = lambda: None


gym.register("Unpicklable-v0", entry_point=UnpicklableEnv, max_episode_steps=3)


def test_envs_that_cannot_be_pickled_still_checkpoint_and_resume_with_fresh_episodes(monkeypatch, capsys, tmp_path):
    train_in_process(monkeypatch, env_id="Unpicklable-v0", total_timesteps=1024, save_every=1, runs_dir=str(tmp_path))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: the envs cannot be pickled (") and "fresh episodes" in notes[0], notes
    (ckpt,) = tmp_path.glob("*/checkpoint.pt")
    train_in_process(monkeypatch, resume=str(ckpt), total_timesteps=1024)
    assert "note: these envs cannot be saved; resumed training starts fresh episodes" in capsys.readouterr().out


# ---------------------------------------------------------------- action masks


class PickTheLegalAction(gym.Env):
    """Each step one of 4 actions is legal, shown one-hot in the observation and, with masks, as
    info["action_mask"]; reward 1 for it, 0 for an illegal action (counted in ILLEGAL)."""

    observation_space = gym.spaces.Box(0, 1, (4,), np.float32)
    action_space = gym.spaces.Discrete(4)
    ILLEGAL = [0]

    def __init__(self, masks=True, empty_mask_at=None):
        self.masks, self.empty_mask_at, self.steps = masks, empty_mask_at, 0

    def observe(self):
        self.legal = int(self.np_random.integers(4))
        mask = (np.arange(4) == self.legal).astype(np.int8) * (self.steps != self.empty_mask_at)
        return np.eye(4, dtype=np.float32)[self.legal], ({"action_mask": mask} if self.masks else {})

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observe()

    def step(self, action):
        self.steps += 1
        PickTheLegalAction.ILLEGAL[0] += int(action != self.legal)
        reward = float(action == self.legal)
        obs, info = self.observe()
        return obs, reward, False, False, info


gym.register("PickMasked-v0", entry_point=PickTheLegalAction, max_episode_steps=8)
gym.register("PickUnmasked-v0", entry_point=lambda: PickTheLegalAction(masks=False), max_episode_steps=8)
gym.register("PickEmptyMask-v0", entry_point=lambda: PickTheLegalAction(empty_mask_at=5), max_episode_steps=8)


class PickMaskedAfterReset(PickTheLegalAction):
    """Masks in step()'s info only, none from reset()."""

    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed)[0], {}


gym.register("PickMaskedAfterReset-v0", entry_point=PickMaskedAfterReset, max_episode_steps=8)


def test_masked_actions_get_no_probability_and_are_never_greedy():
    agent = perturbed_agent(n_actions=4)
    obs = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    logits = agent(obs)[0]
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[torch.arange(3), logits.argmax(-1)] = False  # rule out each row's most likely action
    mask[2, :3] = False  # and for the last row all but one
    logp, _ = agent.distribution(obs, mask)
    assert torch.equal(logp.exp() == 0, ~mask)
    masked = torch.distributions.Categorical(logits=logits.masked_fill(~mask, -torch.inf))
    given = torch.tensor([int(mask[0].nonzero()[0]), int(mask[1].nonzero()[0]), 3])
    _, lp, ent, _ = agent.get_action_and_value(obs, given, mask)
    torch.testing.assert_close(lp, masked.log_prob(given))
    torch.testing.assert_close(ent, masked.entropy())
    assert mask[torch.arange(3), agent.greedy_action(obs, mask)].all()
    drawn = agent.get_action_and_value(obs.repeat(2000, 1), None, mask.repeat(2000, 1))[0].view(2000, 3)
    assert mask[torch.arange(3), drawn].all()
    # The derived path: the same masked log-probs and entropies, and it never samples a masked action either.
    x, m = obs.numpy(), mask.numpy()
    policy = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(0), x, m)
    assert policy.fast and policy.mismatch(x, m, True) is None
    np.testing.assert_allclose(policy.derived[True].check(np.random.default_rng(0), x, m)[2], ent.detach().numpy(), rtol=1e-5, atol=1e-6)
    many, many_masks = np.tile(x, (2000, 1)), np.tile(m, (2000, 1))
    actions = ppo.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(0), many, many_masks).act(many, many_masks, 0)[0]
    assert m[np.tile(np.arange(3), 2000), actions].all()


def test_an_env_without_masks_costs_no_masking_on_the_plain_path_and_in_evaluation(monkeypatch):
    masks, distribution = [], ppo.Agent.distribution
    monkeypatch.setattr(
        ppo.Agent, "distribution", lambda self, obs, action_mask=None: masks.append(action_mask) or distribution(self, obs, action_mask)
    )
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    policy = ppo.RolloutPolicy(perturbed_agent(agent_class=DropoutAgent), torch.device("cpu"), np.random.default_rng(0), obs, ppo.all_valid(5, 3))
    assert not policy.fast
    masks.clear()
    policy.act(obs, ppo.all_valid(5, 3), 0)
    ppo.evaluate(perturbed_agent(n_actions=2), "CartPole-v1", {}, 1, 0, torch.device("cpu"), False, None)
    assert len(masks) > 1 and all(m is None for m in masks)
    given = np.array([[True, False, True]] * 5)
    policy.act(obs, given, 0)  # a real mask reaches the distribution
    assert torch.equal(masks[-1], torch.as_tensor(given))


def test_a_masked_env_never_takes_an_illegal_action_and_learns_faster(monkeypatch, capsys, tmp_path):
    flags = dict(total_timesteps=4096, learning_rate=1e-3, eval_episodes=3)
    for env_id in ("PickMasked-v0", "PickUnmasked-v0"):
        PickTheLegalAction.ILLEGAL[0] = 0
        train_in_process(monkeypatch, env_id=env_id, runs_dir=str(tmp_path / env_id), **flags)
        records = read_metrics(tmp_path / env_id)
        returns = [r["charts/episodic_return"] for r in records if "charts/episodic_return" in r]
        if env_id == "PickMasked-v0":  # every step legal, in training and in evaluation
            assert PickTheLegalAction.ILLEGAL[0] == 0 and set(returns) == {8.0}
            assert [r["eval/episodic_return"] for r in records if "eval/episodic_return" in r] == [8.0]
        else:  # without the mask, the same policy must first learn which action is legal
            assert PickTheLegalAction.ILLEGAL[0] > 1000 and np.mean(returns) < 6, np.mean(returns)


def test_an_env_that_masks_only_after_reset_is_trained_on_its_masked_policy(monkeypatch, capsys, tmp_path):
    # The rollout acted with the masks of step()'s infos; the update must use them too, or the on-policy check fires.
    flags = dict(total_timesteps=2048, update_epochs=1, num_minibatches=1, runs_dir=str(tmp_path))
    train_in_process(monkeypatch, env_id="PickMaskedAfterReset-v0", **flags)
    assert "note:" not in capsys.readouterr().out
    kls = [r["losses/old_approx_kl"] for r in read_metrics(tmp_path) if "losses/old_approx_kl" in r]
    assert len(kls) == 4 and all(abs(kl) < 1e-6 for kl in kls), kls


def test_a_mask_that_allows_no_action_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as failed:
        train_in_process(monkeypatch, env_id="PickEmptyMask-v0", total_timesteps=512, runs_dir=str(tmp_path))
    assert failed.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the env's action_mask allows no action at global step 20 (env 0); fix the env or pass --no-action-masks"
    ]


# ---------------------------------------------------------------- the envs researchers bring

ENV_MODULE = """
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    \"\"\"Walk right (action 1) along a corridor of `length` cells to a reward of 1.\"\"\"

    action_space = gym.spaces.Discrete(2)

    def __init__(self, length=4):
        self.length = length
        self.observation_space = gym.spaces.Box(0, length, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = max(0, self.x + (1 if action == 1 else -1))
        done = self.x == self.length
        return np.array([self.x], np.float32), float(done), done, False, {}


gym.register("Corridor-v0", entry_point=Corridor, max_episode_steps=20)
"""


def test_a_module_id_env_with_env_kwargs_trains_evaluates_and_names_its_run_folder_cleanly(tmp_path):
    (tmp_path / "my_envs.py").write_text(ENV_MODULE)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(tmp_path)}
    flags = ["--env-id", "my_envs:Corridor-v0", "--env-kwargs", '{"length": 7}', "--total-timesteps", "1024", "--eval-episodes", "1"]
    proc = subprocess.run([sys.executable, str(ROOT / "ppo_discrete.py"), *flags, "--runs-dir", "runs", "--num-threads", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("my_envs_Corridor-v0__ppo_discrete__1__"), run_dir.name
    assert "eval: return" in proc.stdout
    # The kwargs are part of the run (args.json, the checkpoint, which evaluates on its own) and reach gym.make.
    assert json.loads((run_dir / "args.json").read_text())["env_kwargs"] == '{"length": 7}'
    lengths = [r["charts/episodic_length"] for r in read_metrics(tmp_path / "runs") if "charts/episodic_length" in r]
    assert lengths and min(lengths) >= 7  # the corridor the run walked had 7 cells (the default 4 gives 4-step episodes)
    proc = subprocess.run([sys.executable, str(ROOT / "ppo_discrete.py"), "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "eval my_envs:Corridor-v0: return" in proc.stdout, proc.stderr[-2000:]
    made = ppo.make_envs("CartPole-v1", 1, {"max_episode_steps": 7})
    made.reset(seed=0)
    assert all(not any(made.step(np.zeros(1, np.int64))[3]) for _ in range(6)) and made.step(np.zeros(1, np.int64))[3][0]


class DictPick(PickTheLegalAction):
    """PickTheLegalAction with a Dict observation: the legal action as a Discrete part, a Box part that is noise,
    and the mask as the Dict's "action_mask" key (PettingZoo's convention), not in info."""

    observation_space = gym.spaces.Dict(
        {"legal": gym.spaces.Discrete(4), "noise": gym.spaces.Box(-1, 1, (2,), np.float32), "action_mask": gym.spaces.MultiBinary(4)}
    )

    def observe(self):
        obs, info = super().observe()
        noise = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"legal": self.legal, "noise": noise, "action_mask": info.pop("action_mask")}, info


gym.register("DictPick-v0", entry_point=DictPick, max_episode_steps=8)


class DictPickEndsBare(DictPick):
    """DictPick whose episodes end on an observation whose mask allows nothing, as board and card games end: terminated
    after 6 steps, or truncated by the time limit after 3 (an observation the env still masks)."""

    def __init__(self, terminate_at=None):
        super().__init__()
        self.terminate_at = terminate_at

    def reset(self, *, seed=None, options=None):
        self.steps = 0
        return super().reset(seed=seed)

    def step(self, action):
        obs, reward, _, _, info = super().step(action)
        if self.steps == (self.terminate_at or 3):
            obs["action_mask"] = np.zeros(4, np.int8)
        return obs, reward, self.steps == self.terminate_at, False, info


gym.register("DictPickTerminatesBare-v0", entry_point=lambda: DictPickEndsBare(terminate_at=6), max_episode_steps=8)
gym.register("DictPickTruncatedBare-v0", entry_point=DictPickEndsBare, max_episode_steps=3)


@pytest.mark.parametrize("env_id, length", [("DictPickTerminatesBare-v0", 6), ("DictPickTruncatedBare-v0", 3)])
def test_the_mask_of_an_episode_s_last_observation_is_neither_checked_nor_used(monkeypatch, tmp_path, env_id, length):
    """Its action is never taken (the next step resets): the run goes on, every action legal; --no-action-masks turns
    off the mask of the Dict's key too (illegal actions taken, as without masks)."""
    for masks in (True, False):
        PickTheLegalAction.ILLEGAL[0] = 0
        train_in_process(monkeypatch, env_id=env_id, total_timesteps=1024, action_masks=masks, runs_dir=str(tmp_path / str(masks)))
        returns = {r["charts/episodic_return"] for r in read_metrics(tmp_path / str(masks)) if "charts/episodic_return" in r}
        if masks:
            assert PickTheLegalAction.ILLEGAL[0] == 0 and returns == {float(length)}
        else:
            assert PickTheLegalAction.ILLEGAL[0] > 100 and min(returns) < length


def test_make_envs_builds_a_dict_observation_env_once_flattened_with_its_mask_in_info(monkeypatch):
    built, init = [], DictPick.__init__
    monkeypatch.setattr(DictPick, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    envs = ppo.make_envs("DictPick-v0", 3, {})
    assert len(built) == 3  # one env per sub-env, not a vector env made, inspected and made again
    assert envs.single_observation_space.shape == (6,)  # legal one-hot (4), noise (2)
    obs, info = envs.reset(seed=0)
    assert obs.dtype == envs.single_observation_space.dtype and (obs[:, :4].sum(1) == 1).all()
    np.testing.assert_array_equal(info["action_mask"], obs[:, :4])  # the mask left the observation for info
    envs.close()


def test_a_dict_observation_env_trains_with_its_mask_checkpoints_resumes_and_evaluates(monkeypatch, capsys, tmp_path):
    flags = dict(env_id="DictPick-v0", total_timesteps=2048, eval_episodes=2)
    PickTheLegalAction.ILLEGAL[0] = 0
    train_in_process(monkeypatch, runs_dir=str(tmp_path / "whole"), **flags)
    whole = comparable(read_metrics(tmp_path / "whole"))
    assert PickTheLegalAction.ILLEGAL[0] == 0 and {r["charts/episodic_return"] for r in whole if "charts/episodic_return" in r} == {8.0}
    assert [r["eval/episodic_return"] for r in whole if "eval/episodic_return" in r] == [8.0]
    # Stopped after iteration 2 as by Ctrl-C, then resumed: the same numbers as the whole run.
    asked = iter([False, True])
    monkeypatch.setattr(ppo, "install_stop_handlers", lambda device: lambda: next(asked))
    with pytest.raises(SystemExit) as stopped:
        train_in_process(monkeypatch, runs_dir=str(tmp_path / "parts"), **flags)
    assert stopped.value.code == 130
    (ckpt,) = (tmp_path / "parts").glob("*/checkpoint.pt")
    monkeypatch.undo()
    train_in_process(monkeypatch, resume=str(ckpt))
    assert comparable(read_metrics(tmp_path / "parts")) == whole
    assert "note:" not in capsys.readouterr().out  # the flattened envs pickle, and the numpy copy acts


def test_gymnasium_envs_as_they_come_taxi_masks_and_a_blackjack_tuple(monkeypatch, tmp_path):
    # Taxi-v4 gives info["action_mask"] (walls, and pickup/dropoff only where legal; an illegal one costs -10):
    # with masks every episode's return is -length, or 21 - length with the passenger delivered.
    train_in_process(monkeypatch, env_id="Taxi-v4", total_timesteps=2048, runs_dir=str(tmp_path))
    episodes = [r for r in read_metrics(tmp_path) if "charts/episodic_return" in r]
    assert episodes and all(r["charts/episodic_return"] + r["charts/episodic_length"] in (0, 21) for r in episodes), episodes
    # Blackjack-v1 observes a Tuple of three Discrete spaces: one-hot each, 32 + 11 + 2 long.
    envs = ppo.make_envs("Blackjack-v1", 2, {})
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 45)
    assert all((obs[:, part].sum(1) == 1).all() for part in (slice(0, 32), slice(32, 43), slice(43, 45)))
    envs.close()


class BlowsUp(CountEnv):
    """CountEnv whose simulator returns NaN in the observation (or an infinite reward) at its 300th step."""

    def __init__(self, what="observation"):
        super().__init__()
        self.total, self.what = 0, what

    def step(self, action):
        self.total += 1
        obs, reward, *rest = super().step(action)
        if self.total == 300:
            obs, reward = (np.array([np.nan], np.float32), reward) if self.what == "observation" else (obs, -np.inf)
        return obs, reward, *rest


gym.register("BlowsUp-v0", entry_point=BlowsUp, max_episode_steps=50)
gym.register("RewardBlowsUp-v0", entry_point=lambda: BlowsUp("reward"), max_episode_steps=50)


@pytest.mark.parametrize("env_id, what", [("BlowsUp-v0", "observation (nan)"), ("RewardBlowsUp-v0", "reward (-inf)")])
def test_a_simulator_that_blows_up_stops_the_run_naming_env_step_and_value(env_id, what, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        train_in_process(monkeypatch, env_id=env_id, total_timesteps=2048, save_every=1, runs_dir=str(tmp_path))
    assert stopped.value.code == 1
    (ckpt,) = tmp_path.glob("*/checkpoint.pt*")
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2 and all(t.isfinite().all() for t in state["agent"].values())
    # Each of the 4 envs returns NaN at its own 300th step, the vector env's 305th (after 5 autoreset steps,
    # one per 50-step episode): global step 4 x 305 = 1220, in iteration 3.
    assert capsys.readouterr().err.splitlines() == [
        f"error: non-finite {what} from --env-id {env_id} at global step 1220, env 0; stopped, last good checkpoint kept: {ckpt}"
    ]


def test_a_checkpoint_of_another_version_resumes_with_a_one_line_error_and_still_evaluates(monkeypatch, capsys, tmp_path):
    # a0ca58c's checkpoints had no --env-kwargs (nor the mask in the carried state): --resume refuses them in one
    # line, not with a traceback from the carried state; their weights are this Agent's, so --eval-checkpoint plays them.
    train_in_process(monkeypatch, total_timesteps=512, runs_dir=str(tmp_path))
    (ckpt,) = tmp_path.glob("*/checkpoint.pt")
    state = torch.load(ckpt, weights_only=True)
    del state["args"]["env_kwargs"]
    torch.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        ppo.load_resume(ppo.Args(resume=str(tmp_path / "old.pt")))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "another version of ppo_discrete.py" in err[0], err
    ppo.evaluate_checkpoint(ppo.Args(eval_checkpoint=str(tmp_path / "old.pt"), eval_episodes=1, num_threads=1, device="cpu"))
    assert capsys.readouterr().out.startswith("eval CartPole-v1: return ")


# ---------------------------------------------------------------- MultiDiscrete actions


class MatchTwo(gym.Env):
    """MultiDiscrete([3, 4]) actions: the observation shows a target (a, b) one-hot (3 + 4 entries); reward 0.5 for
    each dimension that matches it. With masks, info["action_mask"] allows in each dimension the target and one other
    action: flat (the dimensions side by side, 7 long) or as a tuple of one mask per dimension. RULED_OUT counts the
    actions a mask ruled out that were taken anyway."""

    observation_space = gym.spaces.Box(0, 1, (7,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 4])
    RULED_OUT = [0]

    def __init__(self, masks=None):
        self.masks = masks

    def observe(self):
        self.target = self.np_random.integers([3, 4])
        if self.masks is None:
            self.mask = None
            return np.concatenate([np.eye(3)[self.target[0]], np.eye(4)[self.target[1]]]).astype(np.float32), {}
        self.mask = [np.eye(n, dtype=np.int8)[t] for n, t in zip((3, 4), self.target)]
        for m, n, t in zip(self.mask, (3, 4), self.target):
            m[(t + 1 + self.np_random.integers(n - 1)) % n] = 1
        obs = np.concatenate([np.eye(3)[self.target[0]], np.eye(4)[self.target[1]]]).astype(np.float32)
        return obs, {"action_mask": tuple(self.mask) if self.masks == "tuple" else np.concatenate(self.mask)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observe()

    def step(self, action):
        assert self.action_space.contains(np.asarray(action)), action
        if self.mask is not None:
            MatchTwo.RULED_OUT[0] += sum(int(m[a] == 0) for m, a in zip(self.mask, action))
        reward = 0.5 * float(np.sum(np.asarray(action) == self.target))
        obs, info = self.observe()
        return obs, reward, False, False, info


gym.register("MatchTwo-v0", entry_point=MatchTwo, max_episode_steps=8)
gym.register("MatchTwoMasked-v0", entry_point=MatchTwo, kwargs={"masks": "flat"}, max_episode_steps=8)
gym.register("MatchTwoTupleMasks-v0", entry_point=MatchTwo, kwargs={"masks": "tuple"}, max_episode_steps=8)


def fixed_logits_agent(logits):
    """An MLP agent with nvec [2, 3] whose policy head gives these logits whatever the observation."""
    agent = ppo.Agent(gym.spaces.Box(-1, 1, (2,), np.float32), [2, 3], pixels=False)
    with torch.no_grad():
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.copy_(torch.tensor(logits))
    return agent


def test_multidiscrete_log_probs_and_entropies_are_the_heads_summed_by_hand():
    # Dimension 0: logits (0, ln 3), probabilities (1/4, 3/4); dimension 1: logits (0, 0, ln 2), (1/4, 1/4, 1/2).
    agent = fixed_logits_agent([0.0, np.log(3), 0.0, 0.0, np.log(2)])
    obs = torch.zeros(3, 2)
    h0, h1 = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), -(0.5 * np.log(0.25) + 0.5 * np.log(0.5))
    given = torch.tensor([[1, 2], [0, 0], [1, 1]])
    action, logp, ent, _ = agent.get_action_and_value(obs, given)
    expected = [np.log(0.75) + np.log(0.5), np.log(0.25) + np.log(0.25), np.log(0.75) + np.log(0.25)]
    np.testing.assert_allclose(logp.detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(ent.detach().numpy(), [h0 + h1] * 3, rtol=1e-6)
    assert agent.greedy_action(obs).tolist() == [[1, 2]] * 3
    # A mask per dimension, side by side: dimension 1 without its action 2 is (1/2, 1/2), dimension 0 without action 1 is (1, 0).
    mask = torch.tensor([[True, True, True, True, False], [True, False, True, True, True], [True, True, True, True, True]])
    _, logp, ent, _ = agent.get_action_and_value(obs, torch.tensor([[1, 0], [0, 2], [1, 2]]), mask)
    np.testing.assert_allclose(logp.detach().numpy(), [np.log(0.75) + np.log(0.5), np.log(0.5), np.log(0.75) + np.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(ent.detach().numpy(), [h0 + np.log(2), h1, h0 + h1], rtol=1e-6)
    assert agent.greedy_action(obs, mask)[1].tolist() == [0, 2]
    # Sampled: [B, D] actions, each dimension with its own frequencies, never a masked one.
    drawn = agent.get_action_and_value(obs[:1].expand(40_000, 2), None, mask[:1].expand(40_000, 5))[0]
    assert drawn.shape == (40_000, 2) and not (drawn[:, 1] == 2).any()
    np.testing.assert_allclose(np.bincount(drawn[:, 0].numpy(), minlength=2) / 40_000, [0.25, 0.75], atol=0.01)
    np.testing.assert_allclose(np.bincount(drawn[:, 1].numpy(), minlength=3) / 40_000, [0.5, 0.5, 0], atol=0.01)


def test_a_multidiscrete_env_learns_evaluates_greedily_and_resumes_exactly(monkeypatch, capsys, tmp_path):
    flags = dict(env_id="MatchTwo-v0", total_timesteps=8192, learning_rate=1e-3, eval_episodes=3)
    train_in_process(monkeypatch, runs_dir=str(tmp_path / "whole"), **flags)
    whole = comparable(read_metrics(tmp_path / "whole"))
    returns = [r["charts/episodic_return"] for r in whole if "charts/episodic_return" in r]
    # A random policy matches 1/3 and 1/4 of the time: 8 x (0.5/3 + 0.5/4) = 2.33 an episode; all matched is 8.
    assert np.mean(returns[:20]) < 3.5 and np.mean(returns[-20:]) > 4.5, (np.mean(returns[:20]), np.mean(returns[-20:]))
    assert [r["eval/episodic_return"] for r in whole if "eval/episodic_return" in r][0] > 6  # greedy: 7.33 measured
    assert "note:" not in capsys.readouterr().out  # the derived path samples each dimension
    (ckpt,) = (tmp_path / "whole").glob("*/checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["n_actions"] == [3, 4]
    # Stopped after iteration 2 as by Ctrl-C, then resumed: the same numbers as the whole run.
    asked = iter([False, True])
    monkeypatch.setattr(ppo, "install_stop_handlers", lambda device: lambda: next(asked))
    with pytest.raises(SystemExit):
        train_in_process(monkeypatch, runs_dir=str(tmp_path / "parts"), **flags)
    (ckpt,) = (tmp_path / "parts").glob("*/checkpoint.pt")
    monkeypatch.undo()
    train_in_process(monkeypatch, resume=str(ckpt))
    assert comparable(read_metrics(tmp_path / "parts")) == whole
    ppo.evaluate_checkpoint(ppo.Args(eval_checkpoint=str(ckpt), eval_episodes=2, num_threads=1, device="cpu"))
    assert "eval MatchTwo-v0: return " in capsys.readouterr().out


@pytest.mark.parametrize("env_id", ["MatchTwoMasked-v0", "MatchTwoTupleMasks-v0"], ids=["flat", "tuple"])
def test_multidiscrete_masks_per_dimension_are_never_violated(env_id, monkeypatch, tmp_path):
    MatchTwo.RULED_OUT[0] = 0
    flags = dict(total_timesteps=2048, eval_episodes=2, update_epochs=1, num_minibatches=1, runs_dir=str(tmp_path))
    train_in_process(monkeypatch, env_id=env_id, **flags)
    assert MatchTwo.RULED_OUT[0] == 0  # over 2048 training steps and 2 greedy evaluation episodes
    # And the masked policy is what the update trained: each update's one minibatch, before its step, on-policy.
    kls = [r["losses/old_approx_kl"] for r in read_metrics(tmp_path) if "losses/old_approx_kl" in r]
    assert all(abs(kl) < 1e-6 for kl in kls), kls


def test_no_action_masks_ignores_the_env_mask_in_training_and_evaluation(monkeypatch, tmp_path):
    assert ppo.Args().action_masks and not tyro.cli(ppo.Args, args=["--no-action-masks"]).action_masks
    PickTheLegalAction.ILLEGAL[0] = 0
    flags = dict(total_timesteps=1024, update_epochs=1, num_minibatches=1, eval_episodes=2, runs_dir=str(tmp_path))
    evaluated_with, evaluate = [], ppo.evaluate
    monkeypatch.setattr(ppo, "evaluate", lambda *a, **k: evaluated_with.append(a[8] if len(a) > 8 else k.get("use_masks", True)) or evaluate(*a, **k))
    train_in_process(monkeypatch, env_id="PickMasked-v0", action_masks=False, **flags)
    assert evaluated_with == [False]  # the final evaluation ignores the mask too
    # A near-uniform policy over 4 actions takes the legal one about 1 time in 4 (with the mask: always).
    assert PickTheLegalAction.ILLEGAL[0] > 500, PickTheLegalAction.ILLEGAL[0]
    records = read_metrics(tmp_path)
    assert np.mean([r["charts/episodic_return"] for r in records if "charts/episodic_return" in r]) < 4
    # The update trained the unmasked policy that acted (its one minibatch, before its step, on-policy).
    assert all(abs(r["losses/old_approx_kl"]) < 1e-6 for r in records if "losses/old_approx_kl" in r)
    (ckpt,) = tmp_path.glob("*/checkpoint.pt")
    PickTheLegalAction.ILLEGAL[0] = 0
    ppo.evaluate_checkpoint(ppo.Args(eval_checkpoint=str(ckpt), eval_episodes=2, num_threads=1, device="cpu"))
    assert PickTheLegalAction.ILLEGAL[0] > 0  # --eval-checkpoint plays as the run trained: unmasked


# ---------------------------------------------------------------- Atari as CleanRL plays it


def test_atari_fires_after_every_lost_life_so_a_noop_policy_does_not_stall(monkeypatch):
    sent, step = [], ppo.AtariVectorEnv.step
    monkeypatch.setattr(ppo.AtariVectorEnv, "step", lambda self, actions: sent.append(int(actions[0])) or step(self, actions))
    envs = ppo.make_envs("ALE/Breakout-v5", 1, {})
    assert envs.fire == 1  # Breakout's minimal action set: NOOP, FIRE, RIGHT, LEFT
    envs.reset(seed=0)
    lives, fire_next, ended = [5], [], None
    for t in range(400):
        _, _, term, trunc, info = envs.step(np.zeros(1, np.int64))  # the policy: NOOP, always
        lives.append(int(info["lives"][0]))
        fire_next.append(bool(info["fire_next"][0]))
        if term[0] or trunc[0]:
            ended = t
            break
    envs.close()
    # Each lost life but the last is followed by exactly one FIRE sent to ale-py, announced by fire_next; the ball is
    # relaunched, lost again, and the game ends after 5 lives within a few hundred steps.
    lost = [t for t in range(len(lives) - 1) if lives[t + 1] < lives[t]]
    assert ended is not None and term[0] and lives[-1] == 0 and len(lost) == 5, (ended, lives[-1], lost)
    assert [t for t, a in enumerate(sent) if a == 1] == [t + 1 for t in lost[:-1]]
    assert [t for t, f in enumerate(fire_next) if f] == lost[:-1]
    # Without it (ale-py's AtariVectorEnv as it comes), a NOOP policy waits for the time limit after its first lost life.
    plain = ppo.AtariVectorEnv("breakout", 1, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, repeat_action_probability=0.25)
    plain.reset(seed=0)
    for _ in range(400):
        _, _, term, trunc, info = plain.step(np.zeros(1, np.int64))
        assert not (term[0] or trunc[0])
    assert info["lives"][0] == 4
    plain.close()
    # use_fire_reset false (--env-kwargs) turns off ale-py's FIRE at a game's start and ours after a lost life alike.
    assert ppo.make_envs("ALE/Breakout-v5", 1, {"use_fire_reset": False}).fire is None


def test_atari_fire_steps_are_left_out_of_the_update_and_evaluation_fires_too(monkeypatch, tmp_path):
    flags = dict(env_id="ALE/Breakout-v5", num_envs=2, num_steps=64, num_minibatches=1, update_epochs=1, total_timesteps=128)
    no_decision, step = [], ppo.AtariLostLivesAndFire.step
    def recording_step(self, actions):
        out = step(self, actions)
        no_decision.append(out[2] | out[3] | out[4]["fire_next"])  # the next step is an autoreset or a FIRE
        return out
    monkeypatch.setattr(ppo.AtariLostLivesAndFire, "step", recording_step)
    batches, update = [], ppo.ppo_update
    monkeypatch.setattr(ppo, "ppo_update", lambda agent, opt, batch, *rest: batches.append(len(batch["actions"])) or update(agent, opt, batch, *rest))
    train_in_process(monkeypatch, runs_dir=str(tmp_path), **flags)
    skipped = np.array(no_decision[:63]).sum()  # the flags of steps 0..62 leave out steps 1..63
    assert skipped > 0 and batches == [128 - skipped], (skipped, batches)
    # Greedy evaluation of a policy that never fires: a whole game (5 lives) in a few hundred steps, not 27,000 frames.
    agent = ppo.Agent(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), 4, pixels=True)
    with torch.no_grad():
        agent.actor.weight.zero_()
        agent.actor.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # NOOP
    no_decision.clear()
    ppo.evaluate(agent, "ALE/Breakout-v5", {}, 1, 0, torch.device("cpu"), False, None)
    assert len(no_decision) < 1000 and sum(f.sum() for f in no_decision) == 5  # 4 FIREs and the game's end


def test_a_resumed_atari_run_starts_fresh_games_seeded_from_the_iteration(monkeypatch, capsys, tmp_path):
    flags = dict(env_id="ALE/Breakout-v5", num_envs=2, num_steps=32, num_minibatches=1, update_epochs=1, total_timesteps=192)
    resets, reset = [], ppo.AtariLostLivesAndFire.reset

    def recording_reset(self, **kwargs):
        obs, info = reset(self, **kwargs)
        resets.append((kwargs.get("seed"), obs))
        return obs, info

    monkeypatch.setattr(ppo.AtariLostLivesAndFire, "reset", recording_reset)
    asked = iter([False, True])
    monkeypatch.setattr(ppo, "install_stop_handlers", lambda device: lambda: next(asked))
    with pytest.raises(SystemExit):
        train_in_process(monkeypatch, runs_dir=str(tmp_path), **flags)  # stopped after iteration 2 of 3
    (ckpt,) = tmp_path.glob("*/checkpoint.pt")
    monkeypatch.setattr(ppo, "install_stop_handlers", lambda device: lambda: False)
    train_in_process(monkeypatch, resume=str(ckpt))
    # ale-py's envs cannot be saved: the resumed run resets them once more, with seeds of its own, and its first
    # games open otherwise than the run's first games did.
    derived = int(np.random.SeedSequence([1, 0, 2]).generate_state(1)[0]) % 2**30
    assert [seed for seed, _ in resets] == [1, 1, derived] and derived not in (1, 2), resets
    opening, resumed = resets[0][1], resets[2][1]
    assert np.array_equal(resets[1][1], opening) and not np.array_equal(resumed[0], opening[0]) and not np.array_equal(resumed[1], opening[1])
    assert "note: these envs cannot be saved; resumed training starts fresh episodes" in capsys.readouterr().out


def test_multidiscrete_masks_that_allow_nothing_in_a_dimension_or_have_another_length_are_one_line_errors(capsys):
    flat = ppo.valid_actions({"action_mask": np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]])}, 2, [2, 3], 9, True)
    assert flat.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]
    assert ppo.valid_actions({"action_mask": np.zeros((2, 5))}, 2, [2, 3], 9, False).all()  # --no-action-masks: all valid
    listed = np.empty(2, object)  # an env that gives its mask as a Python list: the vector env keeps objects
    listed[0], listed[1] = [1, 0, 0, 1, 0], [0, 1, 1, 0, 0]
    assert (ppo.valid_actions({"action_mask": listed}, 2, [2, 3], 9, True) == flat).all()
    for info, needle in [
        ({"action_mask": np.array([[1, 0, 0, 1, 0], [1, 1, 0, 0, 0]])}, "allows no action at global step 9 (env 1, dimension 1)"),
        ({"action_mask": np.ones((2, 4))}, "the env's action_mask has shape (4,) per env; its 5 actions need shape (5,)"),
    ]:
        with pytest.raises(SystemExit) as failed:
            ppo.valid_actions(info, 2, [2, 3], 9, True)
        err = capsys.readouterr().err.splitlines()
        assert failed.value.code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("env_id, space, needle", [
    ("TwoRowsOfActions-v0", gym.spaces.MultiDiscrete([[2, 3], [4, 5]]), "MultiDiscrete action space of shape (2, 2); ppo_discrete.py takes one row"),
    ("ActionsFromOne-v0", gym.spaces.Discrete(3, start=1), "an action space that starts at 1; ppo_discrete.py needs actions from 0"),
])  # fmt: skip
def test_action_spaces_it_cannot_play_are_one_line_errors(env_id, space, needle, capsys):
    gym.register(env_id, entry_point=lambda: type("Odd", (CountEnv,), {"action_space": space})())
    with pytest.raises(SystemExit) as failed:
        ppo.check_env(env_id, "{}")
    err = capsys.readouterr().err.splitlines()
    assert failed.value.code == 2 and len(err) == 1 and needle in err[0], err



# ---------------------------------------------------------------- the fence's recipe


def test_a_copy_without_any_optional_block_runs_the_same_ppo_and_an_all_deleted_copy_learns(tmp_path):
    """The fence's recipe on copies (tests/droppable.py, conftest.check_the_fence_recipe) on CartPole-v1: each block deleted
    alone trains to the same metrics, all deleted the copy learns."""
    returns = check_the_fence_recipe("ppo_discrete.py", ["--num-threads", "1", "--total-timesteps", "1024", "--num-envs", "2", "--num-steps", "128"], ["--num-threads", "1", "--total-timesteps", "20000"], tmp_path)
    assert np.mean(returns[-20:]) > 3 * 22, np.mean(returns[-20:])  # a random policy: ~22


def test_the_readme_gives_this_script_s_line_counts_as_they_are():
    check_the_readme_line_counts("ppo_discrete.py")
