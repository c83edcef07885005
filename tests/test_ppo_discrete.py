"""Tests of ppo_discrete.py: the numerical core against naive references and hand-computed cases,
the episode-boundary logic on a tiny time-limited env, and the CLI end to end in subprocesses."""

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, comparable, interrupt_with_ctrl_c, read_metrics, run_script, run_torchrun, wandb_offline_log

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
    envs = ppo.make_envs(env_id, 1)
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


def test_logprob_entropy_and_sampling_match_categorical():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, 5, (6,), generator=gen)
    logp, ent = ppo.logprob_and_entropy(logits, actions)
    ref = torch.distributions.Categorical(logits=logits)
    np.testing.assert_allclose(logp.numpy(), ref.log_prob(actions).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ent.numpy(), ref.entropy().numpy(), rtol=1e-12)
    # The rollout's numpy sampler: the right frequencies, and the log-probability of what it drew.
    rng = np.random.default_rng(0)
    row = np.array([1.0, 0.0, -1.0, 2.0, 30.0, 29.0], np.float32) - 28.0
    drawn, drawn_logp = ppo.sample_categorical(np.tile(row, (200_000, 1)), rng)
    probs = torch.tensor(row).softmax(0).numpy()
    np.testing.assert_allclose(np.bincount(drawn, minlength=6) / drawn.size, probs, atol=0.005)
    np.testing.assert_allclose(drawn_logp, np.log(probs[drawn]), rtol=1e-5)


def test_numpy_rollout_copy_matches_agent():
    for space, obs in (
        (gym.spaces.Box(-1, 1, (3, 2), np.float32), np.random.default_rng(0).normal(size=(5, 3, 2)).astype(np.float32)),
        (gym.spaces.Discrete(7), np.array([0, 3, 6])),
    ):
        agent = ppo.Agent(space, 4, pixels=False)
        for p in agent.parameters():  # move away from the zero-bias init so every term counts
            torch.nn.init.normal_(p, std=0.5)
        logits, values = ppo.rollout_policy(agent, torch.device("cpu"))(obs)
        ref_logits, ref_values = agent(torch.as_tensor(obs))
        np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values, ref_values.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_explained_variance():
    assert ppo.explained_variance(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert ppo.explained_variance(np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.0)
    assert np.isnan(ppo.explained_variance(np.array([1.0, 2.0]), np.array([5.0, 5.0])))


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


def test_torchrun_with_more_processes_than_gpus_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(SystemExit) as exit_info:
        ppo.pick_device("cuda")
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


def test_track_offline_leaves_metrics_in_wandb_run(tmp_path):
    run_script("ppo_discrete.py", "--total-timesteps", "1024", "--runs-dir", str(tmp_path), "--track", "--eval-episodes", "1")
    data = wandb_offline_log(tmp_path)
    for name in METRICS[2:] + ["global_step"]:
        assert name.encode() in data, name


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--env-id", "Pendulum-v1"], "ppo_continuous.py"),
        (["--env-id", "NoSuchEnv-v9"], "--env-id"),
        (["--num-minibatches", "3"], "--num-minibatches"),
        (["--num-envs", "0"], "--num-envs"),
        (["--gamma", "1.5"], "--gamma"),
        (["--total-timesteps", "100"], "--total-timesteps"),
        (["--resume", "/nonexistent/checkpoint.pt"], "--resume"),
    ],
)
def test_bad_input_gives_one_line_error(flags, needle, tmp_path):
    assert_one_line_error("ppo_discrete.py", flags, needle, tmp_path)


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
    interrupted_at = torch.load(ckpt, weights_only=False)["iteration"]
    assert 1 <= interrupted_at < 80, "the interrupt must land mid-run for this test to mean anything"
    run_script("ppo_discrete.py", "--resume", str(ckpt), "--num-threads", "1", "--device", "cpu")
    assert comparable(read_metrics(tmp_path / "c")) == a


def test_two_process_gloo_run(tmp_path):
    proc = run_torchrun("ppo_discrete.py", "--total-timesteps", "4096", "--runs-dir", str(tmp_path), "--eval-episodes", "1")
    assert "parameters identical on 2 processes" in proc.stdout
    records = read_metrics(tmp_path)
    # global_step counts the steps of both processes: 4 iterations of 4 envs x 128 steps x 2.
    assert max(r["global_step"] for r in records) == 4096
    assert [r["global_step"] for r in records if "losses/approx_kl" in r] == [1024, 2048, 3072, 4096]
