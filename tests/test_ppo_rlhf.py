"""Tests of ppo_rlhf.py: the numerical core against naive loops, and the script end to end."""

import inspect
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import ppo_rlhf as P  # noqa: E402
from conftest import RLHF_BLOCK_FLAGS, RLHF_BLOCKS, check_the_fence_recipe, check_the_readme_line_counts, interrupt_with_ctrl_c  # noqa: E402

SCRIPT = os.path.join(REPO, "ppo_rlhf.py")
# Tiny models run fastest on one thread, and the machine is shared.
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
torch.set_num_threads(1)


def random_batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    return g, lengths, mask


# ---------------------------------------------------------------------------------------------
# Numerical core
# ---------------------------------------------------------------------------------------------


def test_truncate_after_eos_and_first_true_indices():
    EOS, PAD = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [4, 5, 6, 2]])
    out = P.truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [4, 5, 6, 2]]
    assert P.first_true_indices(out == PAD).tolist() == [2, 4, 1, 4]
    # several EOS ids (eos_token_id [4, 2]): the first of any ends the response
    assert P.truncate_after_eos(responses, [4, 2], PAD).tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [4, 0, 0, 0]]


def test_missing_eos_penalty():
    responses = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0]])
    scores = torch.tensor([1.0, 1.0, -0.5])
    assert P.apply_missing_eos_penalty(scores, responses, 2, 0.75).tolist() == [1.0, 0.25, -0.5]
    assert P.apply_missing_eos_penalty(scores, responses, [7, 2], 0.75).tolist() == [1.0, 1.0, -0.5]


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shape_rewards_against_naive_loop(estimator):
    g, lengths, mask = random_batch(seed=1)
    B, T = mask.shape
    logprobs = -torch.rand(B, T, generator=g) * 3
    ref_logprobs = -torch.rand(B, T, generator=g) * 3
    scores = torch.randn(B, generator=g)
    rewards, kl, non_score = P.shape_rewards(logprobs, ref_logprobs, scores, mask, 0.1, estimator)
    for i in range(B):
        for t in range(T):
            lr = logprobs[i, t].item() - ref_logprobs[i, t].item()
            k = lr if estimator == "k1" else (np.exp(-lr) - 1) + lr
            expected_kl = k if t < lengths[i] else 0.0
            expected = -0.1 * expected_kl + (scores[i].item() if t == lengths[i] - 1 else 0.0)
            assert kl[i, t].item() == pytest.approx(expected_kl, abs=1e-6)
            assert non_score[i, t].item() == pytest.approx(-0.1 * expected_kl, abs=1e-6)
            assert rewards[i, t].item() == pytest.approx(expected, abs=1e-6)


def test_kl_estimators():
    # logprobs -1 under pi, -2 under ref: log(ref/pi) = -1
    k1, k3 = P.kl_estimators(torch.tensor([-2.0]) - torch.tensor([-1.0]))
    assert k1.item() == pytest.approx(1.0)
    assert k3.item() == pytest.approx(np.exp(-1.0))  # (e^-1 - 1) + 1
    # Both estimate KL(pi || ref) from samples of pi; k3 is never negative.
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    true_kl = (pi * (pi / ref).log()).sum().item()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = P.kl_estimators(ref.log()[samples] - pi.log()[samples])
    for est in (k1, k3):
        assert est.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k3 >= 0).all()


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_against_naive_loop(gamma, lam):
    g, lengths, mask = random_batch(B=8, T=9, seed=2)
    B, T = mask.shape
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)  # garbage on padding: must be ignored
    advantages, returns = P.compute_gae(rewards, values, mask, gamma, lam)
    for i in range(B):
        n = lengths[i].item()
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        adv, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[t] = last
        assert advantages[i, :n].tolist() == pytest.approx(adv, abs=1e-5)
        assert returns[i, :n].tolist() == pytest.approx([a + b for a, b in zip(adv, v)], abs=1e-5)
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()


def test_group_advantages_hand_computed_and_against_a_naive_loop():
    """RLOO: each return minus the mean of the other k - 1 returns of its group (k consecutive responses); with
    scale_std divided by the group's (unbiased) std + 1e-4, as GRPO."""
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, -1.0])
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0.0, 0.0, 1 + 1 / 3, -1 - 1 / 3]
    assert P.group_advantages(returns, 4, scale_std=False).tolist() == pytest.approx(expected, abs=1e-6)
    stds = [math.sqrt(14 / 3)] * 4 + [math.sqrt(2 / 3)] * 4
    assert P.group_advantages(returns, 4, scale_std=True).tolist() == pytest.approx([a / (s + 1e-4) for a, s in zip(expected, stds)], abs=1e-6)
    returns = torch.randn(12, generator=torch.Generator().manual_seed(0))
    naive = []
    for i, r in enumerate(returns.tolist()):
        group = returns[i // 3 * 3 : i // 3 * 3 + 3].tolist()
        naive.append(r - (sum(group) - r) / 2)
    assert P.group_advantages(returns, 3, scale_std=False).tolist() == pytest.approx(naive, abs=1e-6)
    # what train() hands it: the KL-shaped return of each response, score - kl_coef * summed KL (TRL's RLOO)
    g, _, mask = random_batch(B=4, T=5, seed=3)
    logprobs, ref_logprobs, scores = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    rewards, kl, _ = P.shape_rewards(logprobs, ref_logprobs, scores, mask, 0.1, "k1")
    assert rewards.sum(1).tolist() == pytest.approx((scores - 0.1 * torch.where(mask, logprobs - ref_logprobs, 0.0).sum(1)).tolist(), abs=1e-5)


def test_whiten_over_valid_tokens_only():
    g, _, mask = random_batch(B=5, T=6, seed=3)
    x = torch.randn(5, 6, generator=g) * 3 + 2
    x_pad = torch.where(mask, x, 1e6)  # huge padding must not leak into the statistics
    valid = x[mask].numpy().astype(np.float64)
    out = P.whiten(x_pad, mask)
    expected = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    assert out[mask].numpy() == pytest.approx(expected, abs=1e-5)
    assert (out[~mask] == 0).all()
    scaled = P.whiten(x_pad, mask, shift_mean=False)
    assert scaled[mask].numpy() == pytest.approx(expected + valid.mean(), abs=1e-5)


def test_policy_loss_at_clip_boundaries():
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios just inside and just outside 1 +- eps, for positive and negative advantages
    ratios = torch.tensor([[1.19, 1.21, 0.81, 0.79]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    new = ratios.log().requires_grad_(True)
    ratio = torch.exp(new - old)
    losses = P.policy_loss(ratio, adv, eps)
    loss = P.masked_mean(losses, mask)
    loss.backward()
    grads = new.grad[0].tolist()
    # inside the clip range the gradient of -A*ratio/n wrt log-ratio is -A*ratio/n; outside it is 0
    assert grads[0] == pytest.approx(-1.19 / 4) and grads[2] == pytest.approx(0.81 / 4)
    assert grads[1] == 0.0 and grads[3] == 0.0
    # ppo_update counts a token as clipped where the loss takes the clipped side
    assert P.masked_mean((losses > -adv * ratio).float(), mask).item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx((-1.19 - 1.2 + 0.81 + 0.8) / 4)
    # The pessimistic side is never clipped: ratio beyond 1+eps with a negative advantage
    new2, adv2 = torch.tensor([[np.log(1.5)]], requires_grad=True), torch.tensor([[-1.0]])
    losses2 = P.policy_loss(torch.exp(new2), adv2, eps)
    losses2.sum().backward()
    assert not (losses2 > -adv2 * torch.exp(new2)).item() and new2.grad.item() == pytest.approx(1.5)


def test_value_loss_clipping_and_mask():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    new = torch.tensor([[0.1, 0.3, -0.3, 9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    losses = P.value_loss(new, old, returns, 0.2)
    loss = P.masked_mean(losses, mask)
    loss.backward()
    # token 0: inside the range; token 1: moved towards the return beyond the range, clipped
    # (no gradient); token 2: moved away, unclipped error is larger; token 3: padding.
    expected = 0.5 * np.mean([(0.1 - 1) ** 2, (0.2 - 1) ** 2, (-0.3 - 1) ** 2])
    assert loss.item() == pytest.approx(expected)
    # ppo_update counts a token as clipped where the clipped error is the larger
    assert P.masked_mean((losses > 0.5 * (new - returns) ** 2).float(), mask).item() == pytest.approx(1 / 3)
    assert new.grad[0].tolist() == pytest.approx([(0.1 - 1) / 3, 0.0, (-0.3 - 1) / 3, 0.0])
    unclipped = P.masked_mean(P.value_loss(new, old, returns, None), mask)
    assert unclipped.item() == pytest.approx(0.5 * np.mean([0.81, 0.49, 1.69]))


def test_adaptive_kl_controller_hand_computed():
    # KL 9 vs target 6: error 0.5, clipped to 0.2; 64 episodes over a horizon of 10000
    assert P.adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 5.4: error -0.1, not clipped
    assert P.adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 64) == pytest.approx(0.1 * (1 - 0.1 * 64 / 10000))
    assert P.adaptive_kl_coef(0.1, 0.0, 6.0, 100, 100) == pytest.approx(0.08)


def tiny_gpt2(vocab=22, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)
    return P.as_ppo_model(GPT2LMHeadModel(config)).eval()


def tiny_llama_rm(vocab=22, seed=1, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=num_labels, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def test_logprobs_match_transformers_cross_entropy():
    model = tiny_gpt2()
    ids = torch.randint(2, 22, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
        logits = model(input_ids=ids).logits
    logprobs = P.logprobs_from_logits(logits[:, :-1], ids[:, 1:])
    assert (-logprobs.mean()).item() == pytest.approx(loss.item(), abs=1e-5)
    # With a temperature: the log-probs are those of softmax(logits / T).
    ctx = 4
    lp, entropy = P.lm_response_logprobs(model, ids, pad_id=99, context_length=ctx, temperature=0.7)
    expected = -F.cross_entropy((logits[:, ctx - 1 : -1] / 0.7).reshape(-1, 22), ids[:, ctx:].reshape(-1), reduction="none")
    assert lp.reshape(-1).tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    p = torch.softmax(logits[:, ctx - 1 : -1] / 0.7, -1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))


@pytest.mark.parametrize("model_fn", [lambda: tiny_gpt2(), lambda: tiny_qwen2(vocab=300)], ids=["gpt2", "qwen2"])
def test_chunked_logprobs_equal_the_full_logits_ones_and_their_gradients(monkeypatch, model_fn):
    """Above LOGITS_CHUNK_BYTES the log-probs, entropies and gradients come from chunks of positions (here 3 rows at
    a time, across sequence boundaries, the last chunk shorter) and equal those of the full logits."""
    ids = torch.randint(2, 22, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[0, :2] = 99  # left padding
    results = []
    for budget in (10**12, None):
        model = model_fn()
        P.check_logits_from_hidden(model)
        assert model.logits_from_hidden
        vocab = P.vocab_rows(model)
        monkeypatch.setattr(P, "LOGITS_CHUNK_BYTES", budget or 3 * 4 * vocab)
        called = []
        monkeypatch.setattr(P, "chunked_response_logprobs", lambda *a, f=P.chunked_response_logprobs: called.append(1) or f(*a))
        lp, entropy = P.lm_response_logprobs(model, ids, 99, 4, 0.7)
        (lp.sum() * 2).backward()
        assert bool(called) == (budget is None)
        results.append((lp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():
            torch.testing.assert_close(P.lm_response_logprobs(model, ids, 99, 4, 0.7)[0], lp.detach())
    (lp0, ent0, grads0), (lp1, ent1, grads1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_rollout_and_update_with_a_large_vocabulary_match_the_full_logits(monkeypatch):
    """With the logits over the budget, sampling keeps none and the rollout's log-probs come from a chunked forward
    pass: the same samples, log-probs equal to the sampling pass's; one PPO update through the chunked path gives the
    parameters the full logits give."""
    from types import SimpleNamespace

    PAD_ID, EOS = 299, 1
    queries = torch.randint(2, 200, (8, 4), generator=torch.Generator().manual_seed(0))
    queries[0, :2] = PAD_ID
    task = SimpleNamespace(pad_id=PAD_ID, eos_ids=[EOS], tokenizer=None)
    args = P.with_defaults(P.Args(response_length=5, local_rollout_forward_batch_size=4, **UPDATE_ARGS))
    results = []
    for budget in (10**12, 6 * 4 * 300):
        monkeypatch.setattr(P, "LOGITS_CHUNK_BYTES", budget)
        policy, ref_policy, value_model = tiny_qwen2(vocab=300), tiny_qwen2(vocab=300), tiny_llama_rm(vocab=300)
        P.check_logits_from_hidden(policy, ref_policy)
        keep_logits = not P.large_logits(args.local_rollout_forward_batch_size * args.response_length, 300)
        assert keep_logits == (budget == 10**12)
        gen_config = P.sampling_config(args.response_length, args.temperature, EOS, PAD_ID, 300)
        gen_config.output_logits = keep_logits
        torch.manual_seed(0)
        data = P.rollout(policy, ref_policy, P.Reward(tiny_llama_rm(vocab=300), None, []), value_model, queries, [{}] * 8, gen_config, task, args)
        results.append(data)
        # one update on the first batch, each way
        trained = [p for m in (policy, value_model) for p in m.parameters()]
        optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5)
        first = results[0]
        advantages = torch.where(first.mask, torch.randn(first.mask.shape, generator=torch.Generator().manual_seed(1)), 0.0)
        torch.manual_seed(123)
        P.ppo_update(args, policy, value_model, optimizer, trained, first, advantages, advantages * 0.5, PAD_ID, P.NonFiniteGuard())
        results.append(policy)
    (plain, plain_policy), (chunked, chunked_policy) = results[0:2], results[2:4]
    assert torch.equal(plain.responses, chunked.responses) and plain.mask.any()
    torch.testing.assert_close(chunked.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.ref_logprobs, plain.ref_logprobs)
    torch.testing.assert_close(chunked.values, plain.values)
    assert not torch.equal(plain_policy.model.embed_tokens.weight, tiny_qwen2(vocab=300).model.embed_tokens.weight)
    for a, b in zip(plain_policy.parameters(), chunked_policy.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_whole_run_with_a_large_vocabulary(qwen_models, tmp_path, monkeypatch, capsys):
    """Train in this process with the logits budget lowered so that every pass of the Qwen2 policy goes through
    the chunked path; the policy samples ids beyond its tokenizer, which the sample table survives."""
    import tyro

    monkeypatch.setattr(P, "LOGITS_CHUNK_BYTES", 4 * 4 * 320)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        P.train(tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path, "--reward-fn", f"{qwen_models / 'rewards.py'}:answered")))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr().out
    assert "note: a large vocabulary: sampling keeps no logits" in out and "done: " in out
    _, metrics = read_metrics(tmp_path)
    assert len([m for m in metrics if "objective/kl" in m]) == 2
    assert all(np.isfinite(v) for m in metrics for v in m.values())


def test_a_model_that_post_processes_its_logits_keeps_the_full_logits(capsys):
    """Gemma2 soft-caps its logits: the chunked path cannot reproduce them, so the model is left on the plain path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    gemma, qwen = Gemma2ForCausalLM(config).eval(), tiny_qwen2(vocab=50)
    P.check_logits_from_hidden(gemma, qwen)
    assert not gemma.logits_from_hidden and qwen.logits_from_hidden
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "Gemma2ForCausalLM" in out


# ---------------------------------------------------------------------------------------------
# One PPO update against a naive reference
# ---------------------------------------------------------------------------------------------

PAD = 22  # outside the tiny models' vocabulary, as an added [PAD] is
UPDATE_ARGS = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=2, num_minibatches=2, update_epochs=2,
    learning_rate=1e-3, max_grad_norm=0.5, temperature=0.7, clip_coef=0.2, vf_clip_coef=0.2, vf_coef=0.1,
)  # fmt: skip


def fixed_batch(policy, B=8, ctx=4, T=5):
    """A batch of 8 episodes: left-padded queries, responses of 1-5 tokens, and the rest as batch_near_policy makes it."""
    g = torch.Generator().manual_seed(3)
    queries = torch.randint(2, 22, (B, ctx), generator=g)
    queries[0, :2], queries[3, :1] = PAD, PAD
    lengths = torch.tensor([1, 5, 3, 5, 2, 4, 5, 3])
    mask = torch.arange(T)[None] < lengths[:, None]
    responses = torch.randint(2, 22, (B, T), generator=g).masked_fill(~mask, PAD)
    return batch_near_policy(policy, queries, responses, mask, PAD, UPDATE_ARGS["temperature"], g)


def batch_near_policy(policy, queries, responses, mask, pad, temperature, g):
    """The Rollout of these queries and responses, with old log-probs near the policy's (so that some ratios leave
    the clip range), and raw advantages (far from whitened), values and returns drawn from g; also used by
    test_ppo_rlhf_fsdp.py."""
    B, T = responses.shape
    ctx = queries.shape[1]
    query_responses = torch.cat([queries, responses], 1)
    with torch.no_grad():
        logprobs = P.lm_response_logprobs(policy, query_responses, pad, ctx, temperature)[0]
    zero = lambda x: torch.where(mask, x, 0.0)  # noqa: E731
    data = P.Rollout(
        query_responses=query_responses, context_length=ctx, responses=responses, mask=mask,
        logprobs=zero(logprobs + 0.3 * torch.randn(B, T, generator=g)), ref_logprobs=zero(logprobs),
        values=zero(torch.randn(B, T, generator=g)), scores=torch.randn(B, generator=g),
    )  # fmt: skip
    advantages = zero(2.0 * torch.randn(B, T, generator=g) + 1.0)
    returns = zero(torch.randn(B, T, generator=g))
    return data, advantages, returns


def naive_update(args, policy, value_model, data, advantages, returns, zero_grad="optimizer"):
    """PPO update written out: advantages whitened over the valid tokens, explicit loops over epochs,
    minibatches, micro-batches and valid tokens, global-norm clipping by hand, per-tensor torch Adam."""
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, foreach=False)
    B, T = data.mask.shape
    ctx, eps, A = data.context_length, args.clip_coef, args.gradient_accumulation_steps
    valid = [(i, t) for i in range(B) for t in range(T) if data.mask[i, t]]
    mean = sum(advantages[i, t].item() for i, t in valid) / len(valid)
    std = math.sqrt(sum((advantages[i, t].item() - mean) ** 2 for i, t in valid) / (len(valid) - 1) + 1e-8)
    adv = {(i, t): (advantages[i, t].item() - mean) / std for i, t in valid}
    stats = {k: [] for k in ("approx_kl", "clipfrac", "pg_loss", "v_loss", "v_clipfrac", "entropy", "ratio")}
    for epoch in range(args.update_epochs):
        perm = torch.randperm(B).tolist()
        for mb in range(args.num_minibatches):
            if zero_grad == "optimizer":
                optimizer.zero_grad()
            for acc in range(A):
                if zero_grad == "each_micro_batch":
                    optimizer.zero_grad()
                rows = perm[(mb * A + acc) * args.per_device_train_batch_size :][: args.per_device_train_batch_size]
                inputs = P.model_inputs(data.query_responses[rows], PAD)
                logits = policy(**inputs).logits[:, ctx - 1 : -1] / args.temperature
                new_lp = torch.gather(logits.log_softmax(-1), -1, inputs["input_ids"][:, ctx:, None]).squeeze(-1)
                new_v = P.token_scores(value_model, data.query_responses[rows], PAD)[:, ctx - 1 : -1]
                pg, vf, n = [], [], 0
                s = {k: 0.0 for k in stats}
                for j, i in enumerate(rows):
                    for t in range(T):
                        if not data.mask[i, t]:
                            continue
                        n += 1
                        a, r = adv[(i, t)], torch.exp(new_lp[j, t] - data.logprobs[i, t])
                        pg.append(torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps)))
                        v, old, R = new_v[j, t], data.values[i, t], returns[i, t]
                        v_clipped = old + torch.clamp(v - old, -args.vf_clip_coef, args.vf_clip_coef)
                        vf.append(0.5 * torch.maximum((v - R) ** 2, (v_clipped - R) ** 2))
                        p = torch.softmax(logits[j, t].detach(), -1)
                        s["approx_kl"] += (r.item() - 1) - math.log(r.item())
                        s["clipfrac"] += float((a > 0 and r.item() > 1 + eps) or (a < 0 and r.item() < 1 - eps))
                        s["v_clipfrac"] += float((v_clipped - R).abs().item() > (v - R).abs().item())
                        s["entropy"] += -(p * p.log()).sum().item()
                        s["ratio"] += r.item()
                pg_loss, v_loss = sum(pg) / n, sum(vf) / n
                ((pg_loss + args.vf_coef * v_loss) / A).backward()
                for k in stats:
                    stats[k].append(pg_loss.item() if k == "pg_loss" else v_loss.item() if k == "v_loss" else s[k] / n)
            norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params if p.grad is not None))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(min(1.0, args.max_grad_norm / (norm + 1e-6)))
            optimizer.step()
    return {k: (float(np.mean(v)), float(np.var(v, ddof=1)) if k == "ratio" else None) for k, v in stats.items()}


def scripted_update(update_fn, args, data, advantages, returns):
    policy, value_model = tiny_gpt2(), tiny_llama_rm()
    trained = [p for m in (policy, value_model) for p in m.parameters()]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5, fused=True)
    torch.manual_seed(123)
    stats = update_fn(args, policy, value_model, optimizer, trained, data, advantages, returns, PAD, P.NonFiniteGuard())
    return policy, value_model, stats


def edited_ppo_update(old: str, new: str):
    """ppo_update with one edit a researcher might make to its source."""
    source = inspect.getsource(P.ppo_update)
    assert old in source
    namespace = dict(vars(P))
    exec(compile(source.replace(old, new), P.__file__, "exec"), namespace)
    return namespace["ppo_update"]


def assert_same_parameters(model_a, model_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_one_ppo_update_matches_a_naive_reference():
    """Two epochs of two minibatches of two micro-batches on a fixed batch: the same parameters and statistics as
    the update written out with per-tensor Adam. Deleting optimizer.zero_grad() or the advantage whitening from
    ppo_update fails this test."""
    args = P.Args(**UPDATE_ARGS)
    data, advantages, returns = fixed_batch(tiny_gpt2())
    policy, value_model, stats = scripted_update(P.ppo_update, args, data, advantages, returns)
    ref_policy, ref_value = tiny_gpt2(), tiny_llama_rm()
    torch.manual_seed(123)
    expected = naive_update(args, ref_policy, ref_value, data, advantages, returns)
    assert not torch.equal(policy.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)  # it trained
    assert_same_parameters(policy, ref_policy)
    assert_same_parameters(value_model, ref_value)
    names = {
        "approx_kl": "policy/approxkl_avg", "clipfrac": "policy/clipfrac_avg", "pg_loss": "loss/policy_avg",
        "v_loss": "loss/value_avg", "v_clipfrac": "val/clipfrac_avg", "entropy": "policy/entropy_avg", "ratio": "val/ratio",
    }  # fmt: skip
    for k, name in names.items():
        assert stats[name].item() == pytest.approx(expected[k][0], rel=1e-5, abs=1e-6), name
    assert stats["val/ratio_var"].item() == pytest.approx(expected["ratio"][1], rel=1e-4, abs=1e-8)
    assert 0 < stats["policy/clipfrac_avg"].item() < 1 and 0 < stats["val/clipfrac_avg"].item() < 1  # both sides seen


@pytest.mark.parametrize(
    "edit",
    [
        ("optimizer.zero_grad()", "optimizer.zero_grad(set_to_none=False)"),
        ("optimizer.zero_grad()", "policy.zero_grad(); value_model.zero_grad()"),
        ("optimizer.zero_grad()", "policy.zero_grad(set_to_none=False); value_model.zero_grad()"),
        ("loss.backward()", "optimizer.zero_grad(); loss.backward()"),  # CleanRL's place: per micro-batch
    ],
    ids=["set_to_none_false", "model_zero_grad", "mixed", "per_micro_batch"],
)
def test_the_zero_grad_idioms_train_as_the_naive_update(edit):
    """A researcher's way of resetting gradients trains as the update written out with per-tensor Adam."""
    args = P.Args(**UPDATE_ARGS)
    data, advantages, returns = fixed_batch(tiny_gpt2())
    policy, value_model, _ = scripted_update(edited_ppo_update(*edit), args, data, advantages, returns)
    ref_policy, ref_value = tiny_gpt2(), tiny_llama_rm()
    torch.manual_seed(123)
    naive_update(args, ref_policy, ref_value, data, advantages, returns, "each_micro_batch" if edit[0] == "loss.backward()" else "optimizer")
    assert_same_parameters(policy, ref_policy)
    assert_same_parameters(value_model, ref_value)


def test_a_parameter_without_gradient_is_not_stepped_as_per_tensor_adam_skips_it():
    """value_model.zero_grad() before the clip in the second epoch: Adam skips the value model there (a flat Adam step
    would move it on its momentum), so it ends as after a one-epoch update, exactly."""
    args = P.Args(**(UPDATE_ARGS | dict(gradient_accumulation_steps=1, per_device_train_batch_size=4)))
    data, advantages, returns = fixed_batch(tiny_gpt2())
    update = edited_ppo_update("            average_gradients(trained)", "            value_model.zero_grad() if epoch == 1 else None\n            average_gradients(trained)")
    policy, value_model, _ = scripted_update(update, args, data, advantages, returns)
    one_epoch_policy, one_epoch_value, _ = scripted_update(P.ppo_update, replace(args, update_epochs=1), data, advantages, returns)
    assert not torch.equal(policy.transformer.wte.weight, one_epoch_policy.transformer.wte.weight)  # the policy trained on
    for a, b in zip(value_model.parameters(), one_epoch_value.parameters()):
        assert torch.equal(a, b)


def count_calls(monkeypatch, obj, name):
    """Wrap obj.name to count its calls; returns the list of call counts so far (its length)."""
    calls, original = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_kl_flags_that_do_not_do_what_their_value_suggests_get_a_note():
    # --target-kl once named the adaptive controller's target: that old command line now also stops epochs early.
    notes = P.kl_flag_notes(P.Args(adaptive_kl=True, target_kl=6.0))
    assert len(notes) == 1 and "--target-kl 6 stops the update epochs once an epoch's mean approximate KL passes it" in notes[0]
    notes = P.kl_flag_notes(P.Args(kl_horizon=500, adaptive_kl_target=3.0))
    assert notes == ["note: --adaptive-kl-target and --kl-horizon change nothing without --adaptive-kl (the KL coefficient stays --kl-coef)"]
    assert P.kl_flag_notes(P.Args()) == [] and P.kl_flag_notes(P.Args(adaptive_kl=True, kl_horizon=500)) == []


def test_target_kl_stops_the_update_epochs_early(monkeypatch):
    """--target-kl as in CleanRL: once an epoch's mean approximate KL passes it, the remaining epochs are skipped
    (the statistics average the epochs that ran); unset, or above the KL reached, every epoch runs."""
    data, advantages, returns = fixed_batch(tiny_gpt2())  # old log-probs 0.3 nats off: approx KL ~0.04 at once
    steps = count_calls(monkeypatch, torch.optim.Adam, "step")
    for target, expected_steps in ((None, 4), (10.0, 4), (1e-3, 2)):
        steps.clear()
        args = P.Args(**UPDATE_ARGS, target_kl=target)
        _, _, stats = scripted_update(P.ppo_update, args, data, advantages, returns)
        assert len(steps) == expected_steps, target
    args = P.Args(**(UPDATE_ARGS | dict(update_epochs=1)))
    _, _, one_epoch = scripted_update(P.ppo_update, args, data, advantages, returns)
    assert {k: v.item() for k, v in stats.items()} == {k: v.item() for k, v in one_epoch.items()}  # that epoch's alone


def test_update_statistics_are_named_and_a_new_one_is_one_line():
    args = P.Args(**UPDATE_ARGS)
    data, advantages, returns = fixed_batch(tiny_gpt2())
    line = 'stats["val/ratio"].append(masked_mean(ratio, mask))'
    update = edited_ppo_update(line, line + '; stats["val/ratio_max"].append(ratio.masked_fill(~mask, 0).max())')
    _, _, stats = scripted_update(update, args, data, advantages, returns)
    assert 1 < stats["val/ratio_max"].item() < 3 and stats["loss/skipped_steps"].item() == 0
    _, _, plain = scripted_update(P.ppo_update, args, data, advantages, returns)
    assert set(stats) - set(plain) == {"val/ratio_max"}


def nan_from_call(monkeypatch, obj, name, first_nan):
    """obj.name returns NaNs (a tensor, or a dict of them) from its first_nan-th call (1-based) on."""
    calls, original = [], getattr(obj, name)

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        if len(calls) < first_nan:
            return out
        return {k: v * math.nan for k, v in out.items()} if isinstance(out, dict) else out * math.nan

    monkeypatch.setattr(obj, name, poisoned)


def test_a_nan_loss_skips_the_step_and_ten_in_a_row_stop(monkeypatch, capsys):
    """A NaN loss in the first micro-batch: that minibatch's step is skipped (no Adam step) and counted, the other
    minibatch is stepped; MAX_SKIPPED_STEPS in a row exit 1 with one line."""
    args = P.Args(**(UPDATE_ARGS | dict(update_epochs=1)))
    data, advantages, returns = fixed_batch(tiny_gpt2())
    original = P.policy_loss
    calls = []

    def nan_first(*a):
        calls.append(1)
        return original(*a) * (math.nan if len(calls) == 1 else 1.0)

    monkeypatch.setattr(P, "policy_loss", nan_first)
    steps = count_calls(monkeypatch, torch.optim.Adam, "step")
    policy, value_model, stats = scripted_update(P.ppo_update, args, data, advantages, returns)
    assert stats["loss/skipped_steps"].item() == 1 and len(steps) == 1  # 2 minibatches, one stepped
    assert all(torch.isfinite(p).all() for p in list(policy.parameters()) + list(value_model.parameters()))
    assert not torch.equal(policy.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)  # minibatch 2 stepped

    monkeypatch.setattr(P, "policy_loss", lambda *a: original(*a) * math.nan)
    policy, value_model = tiny_gpt2(), tiny_llama_rm()
    trained = [p for m in (policy, value_model) for p in m.parameters()]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5)
    guard = P.NonFiniteGuard()
    for _ in range(P.MAX_SKIPPED_STEPS // args.num_minibatches - 1):  # 2 skipped steps per update
        P.ppo_update(args, policy, value_model, optimizer, trained, data, advantages, returns, PAD, guard)
    with pytest.raises(SystemExit) as exit_info:
        P.ppo_update(args, policy, value_model, optimizer, trained, data, advantages, returns, PAD, guard)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: non-finite loss in 10 steps in a row at iteration 1 (epoch 1, minibatch 2); stopped, last good checkpoint kept: none written"
    ]
    assert torch.equal(policy.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)  # never stepped


def test_padding_does_not_change_logprobs_or_scores():
    """Left-padded queries and right-padded responses give the same numbers as unpadded rows,
    with a pad id outside the vocabulary (an added [PAD] token)."""
    PAD = 22
    policy, rm = tiny_gpt2(), tiny_llama_rm()
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(2, 22, (q,), generator=g), torch.randint(2, 22, (r,), generator=g)) for q, r in [(3, 5), (6, 2), (4, 4)]]
    ctx, T = 6, 5
    batch = torch.stack([torch.cat([torch.full((ctx - len(q),), PAD), q, r, torch.full((T - len(r),), PAD)]) for q, r in rows])
    with torch.no_grad():
        lp, _ = P.lm_response_logprobs(policy, batch, PAD, ctx, 1.0)
        scores = P.sequence_scores(rm, batch, PAD, ctx)
        values = P.token_scores(rm, batch, PAD)
        for i, (q, r) in enumerate(rows):
            alone = torch.cat([q, r])[None]
            lp_alone, _ = P.lm_response_logprobs(policy, alone, PAD, len(q), 1.0)
            assert lp[i, : len(r)].tolist() == pytest.approx(lp_alone[0].tolist(), abs=1e-5)
            hidden = rm.model(input_ids=alone).last_hidden_state
            per_token = rm.score(hidden)[0, :, 0]
            assert scores[i].item() == pytest.approx(per_token[-1].item(), abs=1e-5)
            # the model's own pooled logits agree too
            assert scores[i].item() == pytest.approx(rm(input_ids=alone).logits[0, 0].item(), abs=1e-5)
            assert values[i, ctx - len(q) : ctx + len(r)].tolist() == pytest.approx(per_token.tolist(), abs=1e-5)


def test_builtin_gold_score_hand_computed():
    lang = dict(quality=np.array([1.0, -1.0, 0.5, 0.0]))
    # quality mean (1 - 1 + 0.5)/3, relevance 2/3 (words 0, 2 in the prompt), no repeats, ended
    assert P.builtin_gold_score(lang, [0, 2], [0, 1, 2, None]) == pytest.approx(0.5 / 3 + 2 / 3)
    # word 0 repeats once right after itself (1 of 3 transitions); missing EOS
    assert P.builtin_gold_score(lang, [3], [0, 0, 1, 0]) == pytest.approx(0.5 - 3 * 1 / 3 - 1.0)
    # a word coming back later is no repetition
    assert P.builtin_gold_score(lang, [3], [0, 1, 0, None]) == pytest.approx(1 / 3)
    assert P.builtin_gold_score(lang, [3], [None]) == -1.0


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """A tiny random GPT-2 policy and a tiny random Llama reward model sharing a word-level
    tokenizer that has no pad token, plus prompts of varying lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("real")
    vocab = {"<unk>": 0, "<eos>": 1, **{chr(ord("a") + i): i + 2 for i in range(20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tiny_gpt2().save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    tiny_llama_rm().save_pretrained(root / "rm")
    tiny_llama_rm(num_labels=2).save_pretrained(root / "rm2")
    rng = np.random.default_rng(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": " ".join(chr(ord("a") + w) for w in rng.integers(0, 20, rng.integers(2, 7)))}) + "\n")
    return root


def real_flags(root, runs_dir, *extra):
    return [
        "--model-name-or-path", str(root / "policy"), "--reward-model-path", str(root / "rm"),
        "--prompts", str(root / "prompts.jsonl"), "--runs-dir", str(runs_dir),
        "--response-length", "6", "--per-device-train-batch-size", "4", "--num-minibatches", "2",
        "--update-epochs", "2", "--local-rollout-forward-batch-size", "4", "--total-episodes", "48",
        "--eval-every", "2", "--eval-episodes", "8", *extra,
    ]  # fmt: skip


def run_script(flags, timeout=240, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *flags], env=ENV, capture_output=True, text=True, timeout=timeout, **kwargs)


def read_metrics(runs_dir):
    (run,) = [d for d in os.listdir(runs_dir) if d != "builtin_task"]
    with open(os.path.join(runs_dir, run, "metrics.jsonl")) as f:
        return os.path.join(runs_dir, run), [json.loads(line) for line in f]


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k != "eps"} for m in metrics]


TRAIN_KEYS = {
    "episode", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
    "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr", "eps",
    "objective/kl_coef", "objective/response_length", "objective/eos_fraction", "loss/skipped_steps",
}  # fmt: skip


def test_real_models_end_to_end_with_wandb_offline(real_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = real_flags(real_models, tmp_path, "--track", "--adaptive-kl", "--adaptive-kl-target", "1000", "--kl-horizon", "100", "--total-episodes", "50")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, metrics = read_metrics(tmp_path)
    assert "note: --total-episodes 50 is not a whole number of iterations; training 48 episodes" in proc.stdout
    assert "on-policy check" not in proc.stdout  # each update's first micro-batch found the sampling policy
    assert f"done: {run_dir} (metrics.jsonl, args.json, checkpoint.pt, policy/)" in proc.stdout
    assert "iteration 6/6 | episode 48 | eps " in proc.stdout  # the progress line
    train = [m for m in metrics if "objective/kl" in m]
    assert len(train) == 6  # 48 episodes / 8 per update
    assert all(set(m) == TRAIN_KEYS for m in train)
    assert [m["episode"] for m in train] == [8 * i for i in range(1, 7)]
    evals = [m for m in metrics if "eval/scores" in m]
    assert [m["episode"] for m in evals] == [0, 16, 32, 48]
    assert all(np.isfinite(v) for m in metrics for v in m.values())
    assert train[-1]["lr"] < train[0]["lr"]  # annealed
    # far below its target KL, the adaptive controller lowers kl_coef by 1 - 0.2 * 8 / 100 per update
    assert [m["objective/kl_coef"] for m in train] == pytest.approx([0.05 * 0.984**i for i in range(6)])
    assert any(d.startswith("offline-run") for d in os.listdir(os.path.join(run_dir, "wandb")))
    # the trained policy loads back into transformers, with a pad token distinct from EOS
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "policy"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, "policy"))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert not torch.equal(policy.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)
    assert json.load(open(os.path.join(run_dir, "args.json")))["track"] is True


def test_same_seed_same_metrics_and_resume_after_ctrl_c(real_models, tmp_path):
    flags = ["--total-episodes", "96", "--save-every", "1"]
    ref = run_script(real_flags(real_models, tmp_path / "a", *flags))
    assert ref.returncode == 0, ref.stderr[-3000:]
    # gradient checkpointing recomputes the same numbers
    again = run_script(real_flags(real_models, tmp_path / "b", *flags, "--gradient-checkpointing"))
    assert again.returncode == 0, again.stderr[-3000:]
    _, ref_metrics = read_metrics(tmp_path / "a")
    _, again_metrics = read_metrics(tmp_path / "b")
    assert without_timing(ref_metrics) == without_timing(again_metrics)

    # Interrupt a third run with Ctrl-C once it has logged an update, then resume it.
    runs_dir = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, SCRIPT, *real_flags(real_models, runs_dir, *flags)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        runs = [d for d in os.listdir(runs_dir)] if runs_dir.exists() else []
        path = os.path.join(runs_dir, runs[0], "metrics.jsonl") if runs else None
        if path and os.path.exists(path) and sum("objective/kl" in line for line in open(path)) >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: checkpoint at episode" in out
    run_dir, partial = read_metrics(runs_dir)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert 1 <= ckpt["iteration"] < 12, "the run finished before Ctrl-C arrived"
    assert not os.path.exists(os.path.join(run_dir, "policy"))
    resumed = run_script(["--resume", os.path.join(run_dir, "checkpoint.pt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.startswith(f"resumed from {run_dir}/checkpoint.pt at iteration "), resumed.stdout[:300]
    _, resumed_metrics = read_metrics(runs_dir)
    assert without_timing(resumed_metrics) == without_timing(ref_metrics)

    # A checkpoint from before the flat parameters (Adam state per tensor) is refused in one line.
    old = dict(ckpt, optimizer=torch.optim.Adam([torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]).state_dict())
    torch.save(old, tmp_path / "old.pt")
    refused = run_script(["--resume", str(tmp_path / "old.pt")])
    assert_one_line_error(refused.returncode, refused.stderr, "--resume")


def test_two_process_gloo_run(real_models, tmp_path):
    """torchrun with 2 CPU processes: ranks end with identical parameters, episodes count both
    (with the k3 estimator and reward whitening, which the other runs leave out)."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import os, sys, torch, tyro\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import ppo_rlhf\n"
        "optimizers = []\n"
        "class RecordingAdam(torch.optim.Adam):\n"
        "    def __init__(self, *a, **k):\n"
        "        super().__init__(*a, **k)\n"
        "        optimizers.append(self)\n"
        "torch.optim.Adam = RecordingAdam\n"
        "collectives = []\n"
        "def recording(fn):\n"
        "    def wrapper(*a, **k):\n"
        "        collectives.extend((fn.__name__, str(x.device)) for x in [*a, *k.values()] if torch.is_tensor(x))\n"
        "        return fn(*a, **k)\n"
        "    return wrapper\n"
        "for name in ('all_reduce', 'all_gather', 'broadcast', 'reduce_scatter', 'all_gather_object', 'broadcast_object_list', 'barrier'):\n"
        "    setattr(ppo_rlhf.dist, name, recording(getattr(ppo_rlhf.dist, name)))\n"
        "ppo_rlhf.train(tyro.cli(ppo_rlhf.Args))\n"
        "params = [p.detach().clone() for p in optimizers[0].param_groups[0]['params']]\n"
        f"torch.save((params, collectives), os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(wrapper), *real_flags(real_models, tmp_path / "runs", "--total-episodes", "32", "--kl-estimator", "k3", "--whiten-rewards", "--device", "cpu")],
        env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rank0, collectives0), (rank1, collectives1) = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # rank 0's save_policy added an embedding row for the added [PAD] after training
    assert all(torch.equal(a.flatten()[: b.numel()], b.flatten()) for a, b in zip(rank0, rank1))
    # every tensor handed to a collective lives on the training device (here the CPU) or the CPU
    assert {name for name, _ in collectives0} == {"all_reduce"} and {d for _, d in collectives0 + collectives1} == {"cpu"}
    assert not torch.equal(rank1[0], tiny_gpt2().transformer.wte.weight)  # the policy's first tensor trained
    _, metrics = read_metrics(tmp_path / "runs")
    # 16 episodes per update (8 per process), 2 updates
    train = [m for m in metrics if "objective/kl" in m]
    assert [m["episode"] for m in train] == [16, 32]
    assert all(m["objective/kl"] >= 0 for m in train)  # k3 is never negative, k1 can be


CRASHING_REWARD = """
import os

def length(prompts, completions, completion_ids, **kwargs):
    path = os.environ["CALLS"]
    calls = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(calls))
    if calls == int(os.environ.get("CRASH_AT", "0")):
        raise ConnectionError("the reward server went away")
    return [len(ids) / 10 for ids in completion_ids]
"""


@pytest.mark.parametrize("baseline", ["gae", "group"])
def test_a_crash_keeps_the_last_iteration_and_resume_continues_exactly(real_models, tmp_path, monkeypatch, capsys, baseline):
    """A reward function that raises on its 9th call (the rollout of iteration 3: 2 calls per rollout and per
    evaluation, evaluations at 0 and 2), with the default --save-every 0: one line naming the checkpoint of iteration
    2, exit 2, and --resume gives the uninterrupted run's metrics. Out of memory in the update: the same before the
    update's first step (exit 1, its traceback, then the line); after some steps, the checkpoint holds them and says
    the resumed run is not exact."""
    import tyro

    (tmp_path / "rewards.py").write_text(CRASHING_REWARD)
    extra = ["--reward-fn", f"{tmp_path / 'rewards.py'}:length"] + (["--baseline", "group"] if baseline == "group" else [])
    env = {**ENV, "CALLS": str(tmp_path / "calls")}
    flags = lambda runs: real_flags(real_models, tmp_path / runs, *extra)  # noqa: E731
    ref = subprocess.run([sys.executable, SCRIPT, *flags("ref")], env=env, capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _, ref_metrics = read_metrics(tmp_path / "ref")
    os.remove(tmp_path / "calls")
    crash = subprocess.run([sys.executable, SCRIPT, *flags("crash")], env={**env, "CRASH_AT": "9"}, capture_output=True, text=True, timeout=240)
    run_dir, _ = read_metrics(tmp_path / "crash")
    path = os.path.join(run_dir, "checkpoint.pt")
    assert_one_line_error(crash.returncode, crash.stderr, "--reward-fn")
    assert f"ConnectionError: the reward server went away; checkpoint of iteration 2 written; --resume {path} continues exactly" in crash.stderr
    assert torch.load(path, weights_only=True)["iteration"] == 2
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", path], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(read_metrics(tmp_path / "crash")[1]) == without_timing(ref_metrics)

    if baseline == "group":
        return
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.delenv("CRASH_AT", raising=False)
    for runs, where, how in (("oom", "ppo_update", "exactly"), ("late_oom", "check_weights", "(not exactly: its weights hold the 3 optimizer steps")):
        calls, original = [], getattr(P, where) if where == "ppo_update" else P.NonFiniteGuard.check_weights

        def out_of_memory(*a, original=original, calls=calls, limit=3 if where == "ppo_update" else 2 * 4 + 3):
            calls.append(1)
            if len(calls) == limit:  # the update of iteration 3 (before its first step, or after its 3rd)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(*a)

        with monkeypatch.context() as m:
            m.setattr(*((P, "ppo_update") if where == "ppo_update" else (P.NonFiniteGuard, "check_weights")), out_of_memory)
            with pytest.raises(SystemExit) as exit_info:
                P.train(tyro.cli(P.Args, args=flags(runs)))
        err = capsys.readouterr().err
        run_dir, _ = read_metrics(tmp_path / runs)
        path = os.path.join(run_dir, "checkpoint.pt")
        assert exit_info.value.code == 1 and "Traceback" in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (lower --local-rollout-forward-batch-size")
        assert f"checkpoint of iteration 2 written; --resume {path} continues {how}" in last
        P.train(tyro.cli(P.Args, args=["--resume", path]))
        if how == "exactly":
            assert without_timing(read_metrics(tmp_path / runs)[1]) == without_timing(ref_metrics)
        else:
            assert [m["episode"] for m in read_metrics(tmp_path / runs)[1] if "objective/kl" in m] == [8 * i for i in range(1, 7)]


CHECKPOINT_KEYS = {
    "args", "run_name", "iteration", "episode", "wandb_id", "metrics_offset", "policy", "value_model", "optimizer",
    "kl_coef", "resume_state",
}  # fmt: skip


def test_sigterm_checkpoints_exits_130_and_resume_continues_in_the_moved_folder(real_models, tmp_path):
    flags = real_flags(real_models, tmp_path / "unused", "--total-episodes", "96")
    del flags[flags.index("--runs-dir") : flags.index("--runs-dir") + 2]  # interrupt_with_ctrl_c passes its own
    checkpoint = interrupt_with_ctrl_c("ppo_rlhf.py", flags, tmp_path / "runs", after_records=2, sig=signal.SIGTERM)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert set(ckpt) == CHECKPOINT_KEYS
    assert 1 <= ckpt["iteration"] < 12 and ckpt["episode"] == 8 * ckpt["iteration"], "the run finished before SIGTERM arrived"
    assert len(pickle.loads(ckpt["resume_state"])) == 1  # one process's RNG states
    assert ckpt["metrics_offset"] == os.path.getsize(checkpoint.parent / "metrics.jsonl")
    assert not (checkpoint.parent / "policy").exists()

    # The run folder moves; --resume continues in it, wherever it is, and finishes the run there.
    moved = tmp_path / "elsewhere" / "my-run"
    shutil.move(checkpoint.parent, moved)
    resumed = run_script(["--resume", str(moved / "checkpoint.pt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.listdir(tmp_path / "runs") == []
    assert f"done: {moved} " in resumed.stdout
    metrics = [json.loads(line) for line in open(moved / "metrics.jsonl")]
    assert [m["episode"] for m in metrics if "objective/kl" in m] == [8 * i for i in range(1, 13)]
    assert [m["episode"] for m in metrics if "eval/scores" in m] == [16 * i for i in range(7)]


def test_resume_refuses_what_it_cannot_continue_in_one_line(real_models, tmp_path, capsys):
    """Checked in this process: every refusal is a one-line error naming --resume, never a traceback; the
    checkpoint itself loads with weights_only=True."""
    import tyro

    proc = run_script(real_flags(real_models, tmp_path / "runs", "--total-episodes", "8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, _ = read_metrics(tmp_path / "runs")
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    bad = {
        "missing": None,
        "not_a_checkpoint": "not a checkpoint",
        "old_format": {k: v for k, v in ckpt.items() if k not in ("iteration", "resume_state")} | {"update": 1, "rng": [{"numpy": np.random.get_state()}]},
        "resume_state_not_a_pickle": ckpt | {"resume_state": b"garbage"},
        "two_processes": ckpt | {"resume_state": pickle.dumps(pickle.loads(ckpt["resume_state"]) * 2)},
        "optimizer_per_tensor": ckpt | {"optimizer": torch.optim.Adam([torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]).state_dict()},
        # written when --target-kl was the adaptive controller's target: resuming would stop epochs at 6 nats
        "target_kl_of_old": ckpt | {"args": {k: v for k, v in ckpt["args"].items() if k != "adaptive_kl_target"} | {"target_kl": 6.0}},
    }  # fmt: skip
    for case, content in bad.items():
        path = tmp_path / f"{case}.pt"
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(SystemExit) as exit_info:
            P.train(tyro.cli(P.Args, args=["--resume", str(path)]))
        err = capsys.readouterr().err
        assert_one_line_error(exit_info.value.code, err, "--resume")
        assert case != "two_processes" or "written by 2 processes" in err


@pytest.mark.parametrize(
    "poison,line",
    [
        (("policy_loss", 5), "loss in 10 steps in a row at iteration 4 (epoch 1, minibatch 2)"),  # 4 steps per iteration
        (("sequence_scores", 5), "reward-model score at iteration 2 (rollout, before the update)"),  # 2 calls per pass
        (("trained_weights", 3), "policy.transformer.wte.weight in the checkpoint at iteration 2 (checkpoint refused)"),  # 2 calls per save
    ],
    ids=["loss", "score", "checkpoint"],
)
def test_non_finite_values_stop_the_run_and_keep_the_last_good_checkpoint(real_models, tmp_path, monkeypatch, capsys, poison, line):
    """NaNs from iteration 2 on, in the loss, the reward model's score or the state a checkpoint would hold: the run
    (a checkpoint after every iteration) stops with one line and exit 1, and the checkpoint on disk is finite (the
    loss: iteration 3's, its weights those of iteration 1, both updates skipped; else iteration 1's)."""
    import tyro

    nan_from_call(monkeypatch, P, *poison)
    args = tyro.cli(P.Args, args=real_flags(real_models, tmp_path, "--save-every", "1", "--eval-every", "100"))
    with pytest.raises(SystemExit) as exit_info:
        P.train(args)
    assert exit_info.value.code == 1
    run_dir, metrics = read_metrics(tmp_path)
    path = os.path.join(run_dir, "checkpoint.pt")
    assert capsys.readouterr().err.strip().splitlines() == [f"error: non-finite {line}; stopped, last good checkpoint kept: {path}"]
    ckpt = torch.load(path, weights_only=True)
    assert P.nonfinite_tensor({k: ckpt[k] for k in ("policy", "value_model", "optimizer")}) is None
    train = [m for m in metrics if "loss/skipped_steps" in m]
    if poison[0] == "policy_loss":
        assert ckpt["iteration"] == 3 and [m["loss/skipped_steps"] for m in train] == [0, 4, 4]
    else:
        assert ckpt["iteration"] == 1 and [m["loss/skipped_steps"] for m in train] == [0] * (1 + (poison[0] == "trained_weights"))
    assert not os.path.exists(path + ".tmp") and not os.path.exists(os.path.join(run_dir, "policy"))


def test_the_finite_check_finds_nan_and_inf_without_a_copy_of_the_tensor():
    """nonfinite_tensor (checkpoints, and the weights after every step) names the tensor with a NaN, +inf or -inf in
    any floating dtype, and adds far less than the tensor's size to the peak memory: torch.isfinite(t) adds 1.75x
    t's bytes (4 GiB of the 0.39B model's unsharded run)."""
    for dtype in (torch.float32, torch.bfloat16):
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.zeros(1000, dtype=dtype)
            t[517] = bad
            assert P.nonfinite_tensor({"a": {"b": torch.ones(3)}, "c": [torch.ones(2), t]}) == "c.1"
        assert P.nonfinite_tensor([torch.zeros(5, dtype=dtype), torch.zeros(0), torch.arange(3)]) is None
    code = (
        "import resource, torch, ppo_rlhf as P\n"
        "t = torch.ones(2**27)\n"  # 512 MiB, every page resident
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert P.nonfinite_tensor(t) is None\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout) < 64, f"the check added {float(proc.stdout):.0f} MiB to the peak for a 512 MiB tensor"


def test_init_distributed_serves_cuda_tensors_and_cpu_objects(monkeypatch):
    """On cuda the process group is nccl for cuda tensors and gloo for CPU tensors and objects; on the CPU, gloo."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(P.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(P.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(P.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    assert P.init_distributed(torch.device("cuda", 1)) == (True, 1, 2)
    assert calls == ["cuda:1", "cpu:gloo,cuda:nccl"]
    calls.clear()
    assert P.init_distributed(torch.device("cpu")) == (True, 1, 2) and calls == ["gloo"]
    monkeypatch.delenv("WORLD_SIZE")  # not started by torchrun
    assert P.init_distributed(torch.device("cpu")) == (False, 0, 1)


def assert_one_line_error(returncode, stderr, flag):
    assert returncode == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], stderr[-2000:]


def test_bad_input_through_the_cli_is_one_line_without_traceback(real_models, tmp_path):
    flags = real_flags(real_models, tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a b"}\n{"text": "c d"}\n')
    flags[5] = str(tmp_path / "bad.jsonl")
    proc = run_script(flags)
    assert_one_line_error(proc.returncode, proc.stderr, "--prompts")
    assert "line 2" in proc.stderr


@pytest.mark.parametrize(
    "case,flag",
    [
        ("missing_model", "--model-name-or-path"),
        ("missing_reward_model", "--reward-model-path"),
        ("two_labels", "--reward-model-path"),
        ("missing_prompts", "--prompts"),
        ("response_too_long", "--response-length"),
        ("too_few_episodes", "--total-episodes"),
        ("reward_model_without_policy", "--reward-model-path"),
        ("empty_eval_prompt", "--eval-prompts"),
    ],
)
def test_bad_inputs_one_line_exit_2(real_models, tmp_path, capsys, case, flag):
    """Parsed by tyro and run by train() in this process (the CLI test above covers the process exit)."""
    import tyro

    flags = real_flags(real_models, tmp_path)
    if case == "missing_model":
        flags[1] = str(tmp_path / "does-not-exist")
    elif case == "missing_reward_model":
        flags[3] = str(tmp_path / "does-not-exist")
    elif case == "two_labels":
        flags[3] = str(real_models / "rm2")
    elif case == "missing_prompts":
        flags[5] = str(tmp_path / "missing.jsonl")
    elif case == "response_too_long":
        flags += ["--response-length", "30"]  # + prompts of up to 6 tokens > 32 positions
    elif case == "too_few_episodes":
        flags += ["--total-episodes", "7"]
    elif case == "empty_eval_prompt":  # the error named --prompts, which held none
        (tmp_path / "eval.jsonl").write_text('{"prompt": "a b"}\n{"prompt": ""}\n')
        flags += ["--eval-prompts", str(tmp_path / "eval.jsonl")]
    else:
        flags = flags[2:]
    with pytest.raises(SystemExit) as exit_info:
        P.train(tyro.cli(P.Args, args=flags))
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, flag)


NUMERIC_FLAG_CASES = [
    ("--learning-rate", "-1"), ("--learning-rate", "nan"), ("--adam-eps", "0"), ("--per-device-train-batch-size", "0"),
    ("--gradient-accumulation-steps", "0"), ("--num-minibatches", "0"), ("--update-epochs", "0"),
    ("--total-episodes", "0"), ("--gamma", "1.5"), ("--gae-lambda", "-0.1"), ("--clip-coef", "0"),
    ("--vf-clip-coef", "-1"), ("--vf-coef", "-1"), ("--max-grad-norm", "0"), ("--target-kl", "0"), ("--adaptive-kl-target", "0"),
    ("--kl-coef", "-0.1"), ("--kl-horizon", "0"), ("--missing-eos-penalty", "inf"), ("--response-length", "0"),
    ("--max-prompt-length", "0"), ("--temperature", "0"), ("--local-rollout-forward-batch-size", "0"),
    ("--seed", "-1"), ("--num-threads", "-1"), ("--save-every", "-1"), ("--eval-every", "0"),
    ("--eval-episodes", "0"), ("--task-seed", "-1"), ("--task-vocab-size", "3"), ("--task-prompt-length", "0"),
    ("--task-prompt-length", "60"), ("--task-sft-sequences", "10"), ("--task-preference-pairs", "5"),
]  # fmt: skip


@pytest.mark.parametrize("flag,value", NUMERIC_FLAG_CASES, ids=[f"{f}={v}" for f, v in NUMERIC_FLAG_CASES])
def test_every_numeric_flag_is_checked_before_anything_is_built(tmp_path, capsys, flag, value):
    """A value out of range is one line naming the flag, exit 2, before the built-in task is built or a run
    folder is made."""
    import tyro

    args = tyro.cli(P.Args, args=["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), flag, value])
    with pytest.raises(SystemExit) as exit_info:
        P.train(args)
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, flag)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_zero_batch_flags_through_the_cli_without_traceback(tmp_path):
    for flag in ("--per-device-train-batch-size", "--num-minibatches", "--learning-rate"):
        proc = run_script(["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), flag, "0"])
        assert_one_line_error(proc.returncode, proc.stderr, flag)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Reward functions, chat prompts, a reward model with its own tokenizer, large vocabularies, LoRA
# ---------------------------------------------------------------------------------------------

WORDS = [chr(ord("a") + i) for i in range(20)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"


def byte_tokenizer(cls_name="Qwen2Tokenizer", specials=()):
    """A byte-level BPE tokenizer without merges (one token per byte, as Qwen2's and GPT-2's tokenizers read
    text), built offline; `specials` come first, so that two such tokenizers can have different vocabularies."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {tok: i for i, tok in enumerate([*specials, *bytes_to_unicode().values()])}
    cls = getattr(transformers, cls_name)
    return cls(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=None, pad_token=None)


def tiny_qwen2(vocab, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


REWARD_FUNCTIONS = """
import json, math

def length(prompts, completions, completion_ids, **kwargs):
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=kwargs["answer"])) + "\\n")
    return [len(ids) / 10 for ids in completion_ids]

def answered(prompts, completions, answer, **kwargs):
    return [float(a == p.upper()) + 0.5 * float(a[0].lower() in c.split()) for p, c, a in zip(prompts, completions, answer)]

def constant(prompts, completions, **kwargs):
    return (10.0,) * len(prompts)

def raises(prompts, completions, **kwargs):
    raise RuntimeError("the judge is down")

def wrong_length(prompts, completions, **kwargs):
    return [1.0]

def not_a_number(prompts, completions, **kwargs):
    return ["good"] * len(prompts)

def nan(prompts, completions, **kwargs):
    return [math.nan] * len(prompts)

def no_kwargs(prompts, completions):
    return [0.0] * len(prompts)

def positional(prompts, completions, /, **kwargs):
    return [0.0] * len(prompts)

NOT_A_FUNCTION = 3
"""


@pytest.fixture(scope="session")
def qwen_models(tmp_path_factory):
    """A tiny Qwen2 policy with a byte-level Qwen2 tokenizer (256 bytes, <|im_end|> as EOS, no pad token) and a
    chat template; its embedding (320 rows) is larger than the tokenizer, as Qwen2.5's is. Plain prompts with an
    "answer" field (the prompt in capitals), chat prompts, and reward functions."""
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_qwen2(vocab=320).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rng = np.random.default_rng(1)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(40):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 6)))
            f.write(json.dumps({"prompt": prompt, "answer": prompt.upper()}) + "\n")
    with open(root / "chat_prompts.jsonl", "w") as f:
        for i in range(40):
            words = " ".join(rng.choice(WORDS, rng.integers(1, 4)))
            messages = [{"role": "system", "content": "a b"}, {"role": "user", "content": words}]
            # every fourth line in TRL's conversational form: the messages under "prompt"
            f.write(json.dumps({"prompt" if i % 4 == 3 else "messages": messages, "answer": words.upper()}) + "\n")
    (root / "rewards.py").write_text(f"LOG = {str(root / 'calls.jsonl')!r}\n" + REWARD_FUNCTIONS)
    return root


def qwen_flags(root, runs_dir, *extra):
    return [
        "--model-name-or-path", str(root / "policy"), "--prompts", str(root / "prompts.jsonl"),
        "--runs-dir", str(runs_dir), "--response-length", "6", "--per-device-train-batch-size", "4",
        "--num-minibatches", "2", "--update-epochs", "2", "--local-rollout-forward-batch-size", "4",
        "--total-episodes", "16", "--eval-every", "2", "--eval-episodes", "8", *extra,
    ]  # fmt: skip


def test_reward_functions_only_trl_signature_weights_and_prompt_fields(qwen_models, tmp_path):
    """Two reward functions, weighted 2 and -1, on a Qwen2 policy with no reward model: each gets the decoded
    completions, their token ids and the prompt lines' other fields in the prompts' order; the logged scores are
    their weighted sum; the value model is the policy's weights with a new scalar head."""
    from transformers import AutoTokenizer

    log = qwen_models / "calls.jsonl"
    log.unlink(missing_ok=True)
    rewards = qwen_models / "rewards.py"
    flags = qwen_flags(qwen_models, tmp_path, "--reward-fn", f"{rewards}:length", "--reward-fn", f"{rewards}:answered", "--reward-fn-weights", "2", "-1", "--missing-eos-penalty", "0")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "value model: the policy's weights with a new scalar head" in proc.stdout
    run_dir, metrics = read_metrics(tmp_path)
    calls = [json.loads(line) for line in open(log)]
    tokenizer = AutoTokenizer.from_pretrained(qwen_models / "policy")
    for call in calls:
        assert len(call["prompts"]) == len(call["completions"]) == len(call["completion_ids"]) == len(call["answer"]) == 4
        assert call["answer"] == [p.upper() for p in call["prompts"]]  # the fields travel with their prompts
        for text, ids in zip(call["completions"], call["completion_ids"]):
            assert ids and max(ids) < 320 and len(ids) <= 6
            assert text == tokenizer.decode([t for t in ids if t < len(tokenizer)], skip_special_tokens=True)

    def weighted(call):
        return [2 * len(ids) / 10 - (float(a == p.upper()) + 0.5 * float(a[0].lower() in c.split())) for p, c, ids, a in zip(call["prompts"], call["completions"], call["completion_ids"], call["answer"])]

    # calls 0-1: the evaluation at episode 0 (8 prompts); 2-3: the first rollout; then the second, and evaluation
    evals = [m for m in metrics if "eval/scores" in m]
    train = [m for m in metrics if "objective/scores" in m]
    assert evals[0]["eval/scores"] == pytest.approx(np.mean(weighted(calls[0]) + weighted(calls[1])), abs=1e-5)
    assert train[0]["objective/scores"] == pytest.approx(np.mean(weighted(calls[2]) + weighted(calls[3])), abs=1e-5)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert "score.weight" in ckpt["value_model"] and "model.layers.0.self_attn.q_proj.weight" in ckpt["value_model"]
    # evaluation: 8 prompts held out of the 40, never trained on, answered greedily
    assert "evaluation: 8 of the 40 prompts of --prompts held out" in proc.stdout
    assert not set(calls[0]["prompts"] + calls[1]["prompts"]) & {p for c in calls[2:-2] for p in c["prompts"]}
    greedy = greedy_completions(qwen_models / "policy", calls[0]["prompts"] + calls[1]["prompts"], 6)
    assert greedy == calls[0]["completion_ids"] + calls[1]["completion_ids"]


def greedy_completions(policy_dir, prompts, length):
    """Each prompt's completion, token by token the most likely one but the pad id (the one the script adds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model, pad_id = AutoModelForCausalLM.from_pretrained(policy_dir).eval(), len(tokenizer)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        completion = []
        with torch.no_grad():
            while len(completion) < length and tokenizer.eos_token_id not in completion:
                logits = model(input_ids=torch.tensor([ids + completion])).logits[0, -1]
                logits[pad_id] = -math.inf
                completion.append(int(logits.argmax()))
        out.append(completion)
    return out


def test_eval_stochastic_samples_the_evaluation(qwen_models, tmp_path):
    """--eval-stochastic: evaluation samples at --temperature (not greedily as by default)."""
    log = qwen_models / "calls.jsonl"
    log.unlink(missing_ok=True)
    flags = qwen_flags(qwen_models, tmp_path, "--reward-fn", f"{qwen_models / 'rewards.py'}:length", "--total-episodes", "8", "--eval-every", "100", "--eval-stochastic")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in open(log)]
    sampled = calls[0]["completion_ids"] + calls[1]["completion_ids"]
    assert sampled != greedy_completions(qwen_models / "policy", calls[0]["prompts"] + calls[1]["prompts"], 6)


def test_two_default_sets_and_flags_given_win():
    """Unset flags take the built-in task's defaults, or TRL 1.12 PPOConfig's with a model of one's own; a flag
    given wins; --help shows both values of each."""
    import re

    import tyro

    parse = lambda *flags: P.with_defaults(tyro.cli(P.Args, args=list(flags)))  # noqa: E731
    builtin, trl = parse(), parse("--model-name-or-path", "m")
    assert {k: getattr(builtin, k) for k in P.BUILTIN_DEFAULTS} == P.BUILTIN_DEFAULTS
    assert {k: getattr(trl, k) for k in P.TRL_DEFAULTS} == P.TRL_DEFAULTS
    assert P.TRL_DEFAULTS == dict(learning_rate=3e-6, num_minibatches=1, missing_eos_penalty=0.0, response_length=53, temperature=0.7, adam_eps=1e-8)
    assert P.BUILTIN_DEFAULTS["adam_eps"] == 1e-5  # the value the built-in task was tuned with
    assert (trl.update_epochs, trl.kl_coef, trl.kl_estimator, trl.clip_coef, trl.vf_coef, trl.vf_clip_coef, trl.gamma, trl.gae_lambda) == (4, 0.05, "k1", 0.2, 0.1, 0.2, 1.0, 0.95)
    given = parse("--model-name-or-path", "m", "--learning-rate", "1e-5", "--num-minibatches", "4")
    assert (given.learning_rate, given.num_minibatches, given.temperature) == (1e-5, 4, 0.7)
    # the first line names only the values in use, not those of the flags given
    assert P.defaults_in_use(given) == "defaults: TRL 1.12 PPOConfig's, --missing-eos-penalty 0 --response-length 53 --temperature 0.7 --adam-eps 1e-08"
    source = inspect.getsource(P.Args)
    for name in P.TRL_DEFAULTS:
        doc = source.split(f"    {name}: ")[1].splitlines()[1]
        values = re.search(r"unset: (\S+) \(built-in task\), (\S+) \(TRL\)", doc).groups()
        assert tuple(map(float, values)) == (P.BUILTIN_DEFAULTS[name], P.TRL_DEFAULTS[name]), name
    assert P.defaults_in_use(builtin) == "defaults: the built-in task's"
    assert P.defaults_in_use(trl).startswith("defaults: TRL 1.12 PPOConfig's, --learning-rate 3e-06 --num-minibatches 1")


def test_held_out_split_is_fixed_and_disjoint():
    records = [{"prompt": str(i)} for i in range(40)]
    train, evaluation, line = P.held_out_split(records, 256)
    assert len(evaluation) == 8 and len(train) == 32 and sorted(train + evaluation, key=lambda r: int(r["prompt"])) == records
    assert P.held_out_split(records, 256) == (train, evaluation, line) and line.startswith("evaluation: 8 of the 40 prompts")
    assert len(P.held_out_split(records, 3)[1]) == 3  # at most --eval-episodes
    train, evaluation, line = P.held_out_split(records[:4], 256)
    assert train == evaluation == records[:4] and line.startswith("note: --prompts holds 4 prompts")


def test_a_bfloat16_checkpoint_trains_in_float32(qwen_models, tmp_path):
    """A policy and a reward model saved in bfloat16 (as Qwen2.5 and Llama ship): the policy, its reference and the
    value model (a copy of the reward model) train in float32 (at TRL's lr 3e-6 every RMSNorm weight moves, which
    in bfloat16 would round away); the reward model stays in bfloat16; the first lines say so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_qwen2(vocab=320).to(torch.bfloat16).save_pretrained(tmp_path / "policy")
    tiny_llama_rm(vocab=320).to(torch.bfloat16).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(qwen_models / "policy").save_pretrained(tmp_path / "policy")
    flags = qwen_flags(qwen_models, tmp_path / "runs", "--reward-model-path", str(tmp_path / "rm"))
    flags[1] = str(tmp_path / "policy")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("run policy__ppo_rlhf__1__") and " (defaults: TRL 1.12 PPOConfig's, --learning-rate 3e-06 " in lines[0]
    assert "weights: policy, reference and value model in float32 (the policy saved in bfloat16); reward model in bfloat16, as saved" in lines
    run_dir, _ = read_metrics(tmp_path / "runs")
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "policy"))
    norms = [p for name, p in policy.named_parameters() if "norm" in name]
    assert len(norms) == 5 and all(p.dtype == torch.float32 and (p != 1).float().mean() > 0.9 for p in norms)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert {v.dtype for v in ckpt["value_model"].values()} == {torch.float32}
    assert ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-8  # TRL's AdamW's


def test_the_sampler_is_the_distribution_of_the_stored_logprobs(tmp_path, monkeypatch):
    """A checkpoint whose generation_config asks for a repetition penalty, top-k and more: the sampled tokens'
    frequencies match exp(stored log-probs), those log-probs sum to 1 over the tokens the sampler can emit, and
    the pad id (inside the vocabulary here) is never sampled and gets no probability; a note names what was
    ignored."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    pad_id, eos_id = 0, 1
    model = tiny_gpt2()
    model.generation_config = GenerationConfig(repetition_penalty=5.0, top_k=3, min_new_tokens=1, no_repeat_ngram_size=1, temperature=0.2, do_sample=True)
    model.save_pretrained(tmp_path / "policy")
    policy = P.as_ppo_model(P.load_model(AutoModelForCausalLM, str(tmp_path / "policy"), AutoConfig.from_pretrained(tmp_path / "policy"), "--model-name-or-path"))
    note = P.generation_config_note(GenerationConfig.from_pretrained(tmp_path / "policy"), [eos_id], 1.0)
    assert note.startswith("note: the checkpoint's generation_config asks for do_sample=True, min_new_tokens=1, no_repeat_ngram_size=1, repetition_penalty=5.0, temperature=0.2, top_k=3; ignored")
    n, temperature = 6000, 0.8
    queries = torch.tensor([[5, 6, 7, 8]]).repeat(n, 1)
    torch.manual_seed(0)
    config = P.sampling_config(2, temperature, eos_id, pad_id, 22)
    config.output_logits = True  # the fast path's log-probs, from the sampling pass
    responses, logprobs = P.generate(policy, queries, pad_id, config, 2)
    first = responses[:, 0]
    assert (responses != pad_id).all()
    # every token's probability at the first position by a forward pass: they sum to 1 over the 21 other than pad
    every = torch.cat([queries[:21], torch.arange(1, 22)[:, None]], 1)
    probs = torch.cat([torch.zeros(1), P.lm_response_logprobs(policy, every, pad_id, 4, temperature)[0][:, 0].exp()])
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(logprobs[:, 0].exp(), probs[first])  # the stored log-probs are those
    frequencies = torch.bincount(first, minlength=22).float() / n
    assert (frequencies - probs).abs().max() < 0.015  # 6000 samples: a standard error below 0.004
    # the chunked path of large vocabularies leaves pad out too
    monkeypatch.setattr(P, "LOGITS_CHUNK_BYTES", 64)
    policy.logits_from_hidden = True
    chunked = P.lm_response_logprobs(policy, every, pad_id, 4, temperature)[0][:, 0].exp()
    torch.testing.assert_close(chunked, probs[1:])


def bigram_qwen2(tokenizer, next_token: dict, default: int):
    """An untied tiny Qwen2 whose next token depends on the last token only, by a margin of 40 logits: its attention
    and MLP outputs are zeroed, so the final hidden state is the normalised embedding, one of three directions."""
    model = tiny_qwen2(vocab=len(tokenizer))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    force_bigram(model, next_token, default)
    return model


@torch.no_grad()
def force_bigram(model, next_token: dict, default: int):
    """next_token: {token id: the token it is followed by}; every other token is followed by `default`."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    directions = {nxt: torch.eye(embed.size(1))[i] for i, nxt in enumerate(sorted({default, *next_token.values()}))}
    embed.copy_(directions[default].expand_as(embed))
    head.zero_()
    for token, nxt in next_token.items():
        embed[token] = directions[nxt]
    for nxt, direction in directions.items():
        head[nxt] = 10.0 * direction


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_saved_policy_deploys_as_the_checkpoint_came(qwen_models, tmp_path, lora):
    """A checkpoint with eos_token_id [4, 2] in its generation_config (and its own sampling settings), a tokenizer
    with no pad token (the run's [PAD] lies beyond its embedding) and right-side padding and truncation, whose next
    token is forced by its weights: after a prompt ending in a-g the response is [4], in h-n it is [2] (the
    second EOS id ends it), else ["z", 4]. Every response ends at an EOS, so no missing-EOS penalty is paid. The saved
    policy, loaded with AutoModelForCausalLM and AutoTokenizer, has the original generation_config and tokenizer
    settings and a pad token it can look up, and generate() on a padded batch stops where the original model (with
    the saved weights) stops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = byte_tokenizer(specials=["<|endoftext|>", "<|im_start|>", "<|end|>", "<|x|>", "<|im_end|>"])
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    letter = lambda c: tokenizer.convert_tokens_to_ids(c)  # noqa: E731
    forced = {letter(c): 4 if c < "h" else 2 if c < "o" else letter("z") for c in WORDS} | {letter("z"): 4}
    model = bigram_qwen2(tokenizer, forced, default=letter("z"))
    model.generation_config = GenerationConfig(eos_token_id=[4, 2], do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    log = qwen_models / "calls.jsonl"
    log.unlink(missing_ok=True)
    extra = ["--lora-r", "4", "--lora-target-modules", "q_proj", "v_proj"] if lora else []
    flags = qwen_flags(qwen_models, tmp_path / "runs", "--reward-fn", f"{qwen_models / 'rewards.py'}:length", "--missing-eos-penalty", "5", *extra)
    flags[flags.index("--model-name-or-path") + 1] = str(tmp_path / "policy")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: the tokenizer of {tmp_path / 'policy'} has no pad token apart from EOS: the run pads with an added [PAD] (id 261, never sampled); policy/'s tokenizer gets it too, with an embedding row for it" in proc.stdout
    assert "do_sample=True, temperature=0.6, top_k=20, top_p=0.9; ignored: responses are sampled at --temperature 0.7 with nothing else (stopping at EOS ids 4 2)" in proc.stdout
    expected = lambda prompt: [4] if prompt[-1] < "h" else [2] if prompt[-1] < "o" else [letter("z"), 4]  # noqa: E731
    calls = [json.loads(line) for line in open(log)]
    assert [ids for c in calls for ids in c["completion_ids"]] == [expected(p) for c in calls for p in c["prompts"]]
    run_dir, metrics = read_metrics(tmp_path / "runs")
    train = [m for m in metrics if "objective/kl" in m]
    assert all(m["objective/eos_fraction"] == 1.0 and m["val/num_eos_tokens"] == 8 for m in train)
    rollouts = [calls[2 + 2 * i]["prompts"] + calls[3 + 2 * i]["prompts"] for i in range(2)]  # after evaluation's two
    assert [m["objective/scores"] for m in train] == pytest.approx([np.mean([len(expected(p)) / 10 for p in r]) for r in rollouts])

    saved_dir = os.path.join(run_dir, "policy")
    saved, saved_tokenizer = AutoModelForCausalLM.from_pretrained(saved_dir).eval(), AutoTokenizer.from_pretrained(saved_dir)
    drop_version = lambda config: {k: v for k, v in config.to_dict().items() if k != "transformers_version"}  # noqa: E731
    assert drop_version(saved.generation_config) == drop_version(GenerationConfig.from_pretrained(tmp_path / "policy"))
    original_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    for setting in ("padding_side", "truncation_side", "chat_template", "eos_token"):
        assert getattr(saved_tokenizer, setting) == getattr(original_tokenizer, setting), setting
    assert saved_tokenizer.all_special_tokens == ["<|im_end|>", "[PAD]", "<|end|>"]
    assert saved_tokenizer.padding_side == "right" and saved_tokenizer.pad_token == "[PAD]"
    assert saved_tokenizer.pad_token_id == 261 < saved.get_input_embeddings().num_embeddings == 262
    if lora:  # the adapter carries the same; on the base model resized for the [PAD], it gives the merged policy
        from peft import PeftModel

        adapter_dir = os.path.join(run_dir, "adapter")
        assert drop_version(GenerationConfig.from_pretrained(adapter_dir)) == drop_version(saved.generation_config)
        assert AutoTokenizer.from_pretrained(adapter_dir).get_vocab() == saved_tokenizer.get_vocab()
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
        base.resize_token_embeddings(len(saved_tokenizer))
        adapted = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        for k, v in saved.state_dict().items():
            torch.testing.assert_close(adapted.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    prompts = ["a b c", "d e h", "k", "p q r s t", "b a", "n o"]
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    original.resize_token_embeddings(len(saved_tokenizer))
    original.load_state_dict(saved.state_dict())
    torch.manual_seed(0)
    batch = saved_tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = saved.generate(**batch, max_new_tokens=6)[:, batch["input_ids"].size(1) :].tolist()
        alone = [original.generate(**original_tokenizer(p, return_tensors="pt"), max_new_tokens=6)[0, len(p.split()) * 2 - 1 :].tolist() for p in prompts]
    for prompt, row, own in zip(prompts, out, alone):
        assert own == expected(prompt) and row[: len(own)] == own and set(row[len(own) :]) <= {4, 261}, (prompt, row, own)


def test_reward_functions_add_to_the_reward_model(real_models, tmp_path):
    """A constant function adds exactly its value to the reward model's score (the first rollout and the first
    evaluation are the same in both runs: the reward does not change what the untrained policy samples)."""
    plain = run_script(real_flags(real_models, tmp_path / "plain", "--total-episodes", "8"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    rewards = tmp_path / "rewards.py"
    rewards.write_text("LOG = None\n" + REWARD_FUNCTIONS)
    added = run_script(real_flags(real_models, tmp_path / "added", "--total-episodes", "8", "--reward-fn", f"{rewards}:constant"))
    assert added.returncode == 0, added.stderr[-3000:]
    assert "value model: a copy of the reward model" in added.stdout
    (_, a), (_, b) = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "added")
    for key, i in (("eval/scores", 0), ("objective/scores", 1)):
        assert b[i][key] == pytest.approx(a[i][key] + 10.0, abs=1e-5)


def test_chat_prompts_go_through_the_chat_template(qwen_models, tmp_path):
    """"messages" prompts become the chat template's text ending with the assistant's turn; reward functions get
    them in TRL's conversational form (messages in, [{"role": "assistant", "content": ...}] out)."""
    log = qwen_models / "calls.jsonl"
    log.unlink(missing_ok=True)
    flags = qwen_flags(qwen_models, tmp_path, "--reward-fn", f"{qwen_models / 'rewards.py'}:length", "--total-episodes", "8")
    flags[flags.index("--prompts") + 1] = str(qwen_models / "chat_prompts.jsonl")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_eval_line = next(line for line in proc.stdout.splitlines() if line.startswith("iteration 0/"))
    query = first_eval_line.split(" | ")[-1].split(" -> ")[0]
    assert query.startswith("'system: a b user: ") and query.endswith(" assistant: '"), query
    for call in (json.loads(line) for line in open(log)):
        for messages, completion, answer in zip(call["prompts"], call["completions"], call["answer"]):
            assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"].upper() == answer
            assert len(completion) == 1 and completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)


CHAT_ERRORS = {
    "bad_role": ({"messages": [{"role": "bot", "content": "a"}]}, "message 0 has role 'bot'"),
    "no_content": ({"messages": [{"role": "user"}]}, "message 0 is not a dict with a string"),
    "empty": ({"messages": []}, "not a non-empty list"),
    "both": ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "needs either"),
    "no_template": ({"messages": [{"role": "user", "content": "a"}]}, "has no chat template"),
}


@pytest.mark.parametrize("case", list(CHAT_ERRORS))
def test_chat_prompt_mistakes_are_one_line_errors(qwen_models, real_models, tmp_path, capsys, case):
    import tyro

    record, message = CHAT_ERRORS[case]
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a b"}) + "\n" + json.dumps(record) + "\n")
    flags = qwen_flags(qwen_models, tmp_path / "runs", "--reward-fn", f"{qwen_models / 'rewards.py'}:constant")
    flags[flags.index("--prompts") + 1] = str(tmp_path / "prompts.jsonl")
    if case == "no_template":  # the GPT-2 policy's tokenizer has none
        flags[flags.index("--model-name-or-path") + 1] = str(real_models / "policy")
    with pytest.raises(SystemExit) as exit_info:
        P.train(tyro.cli(P.Args, args=flags))
    err = capsys.readouterr().err
    assert_one_line_error(exit_info.value.code, err, "--prompts")
    assert message in err and (case == "no_template" or "line 2" in err)
    assert not (tmp_path / "runs").exists()


RM_TEMPLATE = "{% for m in messages %}<|sep|>{{ m['role'] }}: {{ m['content'] }}{% endfor %}<|endoftext|>"


@pytest.fixture(scope="session")
def other_reward_models(tmp_path_factory, qwen_models):
    """Reward models for the Qwen2 policy: a GPT-2 with a byte-level GPT-2 tokenizer whose ids differ (three
    special tokens first), with and without a chat template; a Llama with the policy's own tokenizer but an
    embedding smaller than the policy's."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    root = tmp_path_factory.mktemp("other_rms")
    for name, template in (("gpt2_rm", None), ("gpt2_rm_chat", RM_TEMPLATE)):
        tokenizer = byte_tokenizer("GPT2Tokenizer", specials=["<|pad|>", "<|endoftext|>", "<|sep|>"])
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "additional_special_tokens": ["<|sep|>"]})
        tokenizer.chat_template = template
        torch.manual_seed(2)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=2, n_head=2, num_labels=1)
        GPT2ForSequenceClassification(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tiny_llama_rm(vocab=258).save_pretrained(root / "small_rm")
    AutoTokenizer.from_pretrained(qwen_models / "policy").save_pretrained(root / "small_rm")
    encoder_reward_models(root)
    return root


def wordpiece_tokenizer(model_max_length):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], a pair [CLS] A [SEP] B [SEP], lower case), built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(ord("a") + i) for i in range(26)]
    vocab = {t: i for i, t in enumerate(specials + letters + ["##" + c for c in letters] + list(".,!?'"))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length, model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip


def encoder_reward_models(root):
    """A tiny BERT and a tiny DeBERTa-v2 (relative attention, pooler) sequence classifier, each with the WordPiece
    tokenizer; the DeBERTa's tokenizer reads at most 10 tokens, so that long texts are cut."""
    from transformers import BertConfig, BertForSequenceClassification, DebertaV2Config, DebertaV2ForSequenceClassification

    size = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64, num_labels=1)
    for name, model_max_length in (("bert_rm", 512), ("deberta_rm", 10)):
        tokenizer = wordpiece_tokenizer(model_max_length)
        torch.manual_seed(3)
        if name == "bert_rm":
            model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), **size))
        else:
            config = DebertaV2Config(vocab_size=len(tokenizer), relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], pooler_hidden_size=16, **size)
            model = DebertaV2ForSequenceClassification(config)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


@pytest.mark.parametrize("rm", ["gpt2_rm", "gpt2_rm_chat", "small_rm", "bert_rm", "deberta_rm"])
def test_reward_model_with_its_own_tokenizer_reads_the_decoded_text(qwen_models, other_reward_models, tmp_path, rm):
    """A reward model whose vocabulary differs from the Qwen2 policy's (or whose embedding is smaller than the
    policy's, which samples ids beyond it) scores the decoded text re-tokenised for it, through its chat template
    when it has one: the first evaluation's score equals the reward model's own forward on that text, one
    conversation at a time; encoders (BERT, DeBERTa-v2) through their own pooling, a text longer than the
    DeBERTa's tokenizer reads cut at its start, with a note; an encoder reads the prompt and the completion as a
    text pair. The value model is then the policy's weights with a new head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    log = qwen_models / "calls.jsonl"
    log.unlink(missing_ok=True)
    flags = qwen_flags(qwen_models, tmp_path, "--reward-model-path", str(other_reward_models / rm), "--reward-fn", f"{qwen_models / 'rewards.py'}:length", "--missing-eos-penalty", "0", "--total-episodes", "8")
    proc = run_script(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(reads the decoded text in its own tokens)" in proc.stdout
    assert "value model: the policy's weights with a new scalar head" in proc.stdout
    model = AutoModelForSequenceClassification.from_pretrained(other_reward_models / rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(other_reward_models / rm, truncation_side="left")
    calls = [json.loads(line) for line in open(log)]
    expected = []
    for call in calls[:2]:  # the evaluation at episode 0
        for prompt, completion, ids in zip(call["prompts"], call["completions"], call["completion_ids"]):
            if rm == "gpt2_rm_chat":
                text = f"<|sep|>user: {prompt}<|sep|>assistant: {completion}<|endoftext|>"
            elif rm == "small_rm":  # the policy's tokenizer, chat template included
                text = f"user: {prompt} assistant: {completion} "
            elif rm == "gpt2_rm":
                text = prompt + completion + (tokenizer.eos_token if 256 in ids else "")  # 256: the policy's EOS
            text = (prompt, completion) if rm in ("bert_rm", "deberta_rm") else (text,)
            encoded = tokenizer(*text, truncation=rm == "deberta_rm", max_length=10)  # its start cut, [CLS] kept
            with torch.no_grad():
                score = model(**{k: torch.tensor([v]) for k, v in encoded.items()}).logits[0, 0].item()
            expected.append(score + len(ids) / 10)
    _, metrics = read_metrics(tmp_path)
    assert metrics[0]["eval/scores"] == pytest.approx(np.mean(expected), abs=1e-5)
    if rm == "small_rm":  # the policy did sample ids its tokenizer and the reward model do not know
        assert any(max(ids) >= 258 for call in calls for ids in call["completion_ids"])
    assert ("note: --reward-model-path: a text of" in proc.stdout) == (rm == "deberta_rm")


def test_an_encoder_reward_model_reads_chat_prompts_without_the_policys_markup():
    """A BERT reward model scoring a chat prompt's answer from a policy whose chat template spells <|im_start|> and
    <|im_end|>: it reads the messages' contents (a line each) and the response as a text pair, [CLS] prompt [SEP]
    response [SEP] with token type 1 on the response: none of the policy's chat markup or special tokens (which its
    WordPiece vocabulary would read as [UNK]s)."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification

    policy_tokenizer = byte_tokenizer(specials=["<|im_start|>", "<|im_end|>"])
    policy_tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    policy_tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    task = SimpleNamespace(tokenizer=policy_tokenizer, pad_id=len(policy_tokenizer), eos_ids=[1])
    records = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc, def?"}]}, {"prompt": "xyz"}]
    answers = [policy_tokenizer("ghi jk")["input_ids"] + [1], policy_tokenizer("no")["input_ids"]]
    width = max(map(len, answers))
    responses = torch.tensor([a + [task.pad_id] * (width - len(a)) for a in answers])
    episodes = P.decode_episodes(records, responses, task)
    tokenizer = wordpiece_tokenizer(512)
    torch.manual_seed(3)
    size = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), num_labels=1, **size)).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    scores = P.retokenized_scores(model, tokenizer, episodes, task)
    pairs = [("be brief\nabc, def?", "ghi jk"), ("xyz", "no")]
    assert [P.reward_model_text(tokenizer, p, c, True, encoder=True) for p, c in zip(episodes.prompts, episodes.completions)] == pairs
    (inputs,) = seen
    for i, (prompt, response) in enumerate(pairs):
        n = inputs["attention_mask"][i].sum().item()
        ids, types = inputs["input_ids"][i, :n].tolist(), inputs["token_type_ids"][i, :n].tolist()
        assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", *tokenizer.tokenize(prompt), "[SEP]", *tokenizer.tokenize(response), "[SEP]"]
        assert "[UNK]" not in tokenizer.convert_ids_to_tokens(ids) and types == [0] * (len(ids) - len(tokenizer.tokenize(response)) - 1) + [1] * (len(tokenizer.tokenize(response)) + 1)
        with torch.no_grad():
            alone = model(**tokenizer(prompt, response, return_tensors="pt")).logits[0, 0]
        torch.testing.assert_close(scores[i], alone)


def test_value_model_path(qwen_models, other_reward_models, tmp_path, capsys):
    """--value-model-path loads the value model from a sequence-classification checkpoint that reads the policy's
    tokens; one whose embedding is smaller than the policy's is a one-line error."""
    import tyro
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=320, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_labels=1)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "value")
    rewards = f"{qwen_models / 'rewards.py'}:constant"
    proc = run_script(qwen_flags(qwen_models, tmp_path / "runs", "--reward-fn", rewards, "--value-model-path", str(tmp_path / "value"), "--total-episodes", "8", "--eval-episodes", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"value model: {tmp_path / 'value'}" in proc.stdout
    assert "iteration 1/1" in proc.stdout  # the progress line, with fewer held-out prompts than sample-table rows
    run_dir, _ = read_metrics(tmp_path / "runs")
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["value_model"]["score.weight"].shape == (1, 8)  # the value checkpoint's width, not the policy's 16
    args = tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path / "bad", "--reward-fn", rewards, "--value-model-path", str(other_reward_models / "small_rm")))
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_info:
        P.train(args)
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, "--value-model-path")
    # an encoder: the error does not suggest a tokenizer of its own, which a value model cannot use
    args = tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path / "bad", "--reward-fn", rewards, "--value-model-path", str(other_reward_models / "bert_rm")))
    with pytest.raises(SystemExit) as exit_info:
        P.train(args)
    err = capsys.readouterr().err
    assert_one_line_error(exit_info.value.code, err, "--value-model-path")
    assert "BertForSequenceClassification has no `score` head" in err and "tokenizer of its own" not in err


def test_group_baseline_builds_no_value_model(real_models, tmp_path, monkeypatch, capsys):
    """--baseline group: k responses to each prompt side by side; no value model loaded, run, stepped or saved (the
    only scorer loaded and run is the reward model, Adam steps the policy's parameters alone, the checkpoint holds
    no value weights); no value metrics; a group size that does not divide the batch is one line."""
    import tyro

    loaded, scored, queries_seen = [], [], []
    load_model, token_scores, rollout = P.load_model, P.token_scores, P.rollout
    monkeypatch.setattr(P, "load_model", lambda cls, path, *a, **k: loaded.append((cls.__name__, path)) or load_model(cls, path, *a, **k))
    monkeypatch.setattr(P, "token_scores", lambda model, *a: scored.append(type(model).__name__) or token_scores(model, *a))
    monkeypatch.setattr(P, "rollout", lambda policy, ref, reward, value, queries, *a: queries_seen.append(queries) or rollout(policy, ref, reward, value, queries, *a))
    P.train(tyro.cli(P.Args, args=real_flags(real_models, tmp_path / "runs", "--baseline", "group", "--group-size", "4", "--total-episodes", "16")))
    out = capsys.readouterr().out
    assert "; baseline group: 4 responses per prompt, RLOO): 8 episodes per iteration" in out.splitlines()[0]
    assert "value model: none (--baseline group)" in out
    assert [cls for cls, _ in loaded] == ["AutoModelForCausalLM", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]
    assert set(scored) == {"LlamaForSequenceClassification"}  # the reward model, the only scorer that runs
    for queries in queries_seen:  # groups of 4 copies of a prompt; 2 prompts per iteration
        groups = queries.view(2, 4, -1)
        assert (groups == groups[:, :1]).all() and not torch.equal(groups[0, 0], groups[1, 0])
    run_dir, metrics = read_metrics(tmp_path / "runs")
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["value_model"] is None
    adam_values = sum(state["exp_avg"].numel() for state in ckpt["optimizer"]["state"].values())
    assert adam_values == sum(p.numel() for p in tiny_gpt2().parameters())  # the policy's alone
    train = [m for m in metrics if "objective/kl" in m]
    assert len(train) == 2 and all(set(m) == TRAIN_KEYS - {"loss/value_avg", "val/clipfrac_avg"} for m in train)
    with pytest.raises(SystemExit) as exit_info:
        P.train(tyro.cli(P.Args, args=real_flags(real_models, tmp_path / "bad", "--baseline", "group", "--group-size", "3")))
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, "--group-size 3 must be at least 2 and divide the 8 episodes")
    for flags in (["--group-size", "4"], ["--baseline", "group", "--value-head-on-policy"]):
        with pytest.raises(SystemExit) as exit_info:
            P.train(tyro.cli(P.Args, args=real_flags(real_models, tmp_path / "bad", *flags)))
        assert_one_line_error(exit_info.value.code, capsys.readouterr().err, "--baseline group")
    assert not (tmp_path / "bad").exists()


def test_a_reward_model_sharing_the_tokenizer_reads_tokens_without_decoding(monkeypatch):
    """The token path: nothing is decoded, the score is sequence_scores on the policy's ids."""
    monkeypatch.setattr(P, "decode", lambda *a, **k: pytest.fail("decoded"))
    rm = tiny_llama_rm()
    queries = torch.tensor([[22, 5, 6], [7, 8, 9]])
    responses = torch.tensor([[3, 1, 22], [4, 5, 1]])
    task = P.Task(*[None] * 7, pad_id=22, eos_ids=[1], train_queries=[], eval_queries=[], train_records=[], eval_records=[], reward_functions=[], name="t")
    scores = P.score_responses(P.Reward(rm, None, []), queries, responses, [{}, {}], task)
    torch.testing.assert_close(scores, P.sequence_scores(rm, torch.cat([queries, responses], 1), 22, 3))


def lora_models(args, seed=0):
    """The tiny GPT-2 policy and Llama value model with LoRA adapters (B perturbed away from 0, so that both A and B
    get gradients), through the script's own wiring."""
    from types import SimpleNamespace

    policy, value_model = tiny_gpt2(), tiny_llama_rm()
    policy, value_model = P.add_lora(policy, value_model, SimpleNamespace(value_source=(None, None, "--value")), args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*policy.named_parameters(), *value_model.named_parameters()]:
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy, value_model


def test_one_ppo_update_with_lora_matches_a_naive_reference():
    """Under LoRA only the adapters and the value head are flattened and trained: the same parameters as the update
    written out with per-tensor Adam, and the frozen base weights unchanged."""
    args = P.Args(**UPDATE_ARGS, lora_r=2, lora_alpha=4.0, lora_target_modules=("c_attn", "q_proj", "v_proj"))
    data, advantages, returns = fixed_batch(tiny_gpt2())
    policy, value_model = lora_models(args)
    trainable = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) < 0.2 * sum(p.numel() for m in (policy, value_model) for p in m.parameters())
    optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, eps=1e-5, fused=True)
    torch.manual_seed(123)
    P.ppo_update(args, policy, value_model, optimizer, trainable, data, advantages, returns, PAD, P.NonFiniteGuard())
    ref_policy, ref_value = lora_models(args)
    torch.manual_seed(123)
    naive_update(args, ref_policy, ref_value, data, advantages, returns)
    assert_same_parameters(policy, ref_policy)
    assert_same_parameters(value_model, ref_value)
    untouched_policy, _ = lora_models(args)
    for (name, a), b in zip(policy.named_parameters(), untouched_policy.parameters()):
        assert torch.equal(a, b) != ("lora_" in name), name  # the adapters trained, nothing else did


def test_lora_reference_is_the_policy_with_its_adapters_disabled(qwen_models, tmp_path):
    """One causal LM in memory: the reference is the policy object, and under adapters_disabled it gives the base
    model's log-probs while the policy (adapters on) gives others."""
    import tyro
    from transformers import AutoModelForCausalLM

    args = tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path, "--reward-fn", f"{qwen_models / 'rewards.py'}:constant", "--lora-r", "4", "--lora-target-modules", "all-linear"))
    task = P.load_task(args, 0, False)
    policy, ref_policy, _, value_model = P.load_models(task, args, torch.device("cpu"))
    assert ref_policy is policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForCausalLM.from_pretrained(qwen_models / "policy").eval()
    with torch.no_grad():
        expected = P.lm_response_logprobs(base, ids, -1, 3, 1.0)[0]
        with P.adapters_disabled(ref_policy):
            reference = P.lm_response_logprobs(ref_policy, ids, -1, 3, 1.0)[0]
        adapted = P.lm_response_logprobs(policy, ids, -1, 3, 1.0)[0]
    torch.testing.assert_close(reference, expected)
    assert (adapted - expected).abs().max() > 1e-3
    assert all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())  # re-enabled, trainable
    trained = {n for n, p in value_model.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and all("lora_" in n for n in trained - {"score.weight"})  # the head trains whole
    assert any("mlp.down_proj.lora_A" in n for n in trained)  # all-linear reaches the MLP


def test_lora_run_saves_a_merged_policy_and_an_adapter_and_resumes(qwen_models, tmp_path):
    """A LoRA run, stopped by SIGTERM and resumed, logs what an uninterrupted one logs; its checkpoint holds only
    what trains; the policy is saved merged (transformers loads it with peft unavailable) and as a peft adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["--reward-fn", f"{qwen_models / 'rewards.py'}:length", "--lora-r", "4", "--lora-target-modules", "q_proj", "v_proj", "--learning-rate", "3e-2", "--total-episodes", "96", "--num-threads", "1"]
    whole = run_script(qwen_flags(qwen_models, tmp_path / "whole", *lora))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "LoRA r=4 alpha=16 on q_proj v_proj" in whole.stdout and "policy/, adapter/)" in whole.stdout
    run_dir, metrics = read_metrics(tmp_path / "whole")
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["policy"] and all("lora_" in k for k in ckpt["policy"])
    assert all("lora_" in k or k == "score.weight" for k in ckpt["value_model"]) and "score.weight" in ckpt["value_model"]

    flags = qwen_flags(qwen_models, tmp_path / "unused", *lora)
    del flags[flags.index("--runs-dir") : flags.index("--runs-dir") + 2]
    checkpoint = interrupt_with_ctrl_c("ppo_rlhf.py", flags, tmp_path / "runs", after_records=3, sig=signal.SIGTERM)
    assert 1 <= torch.load(checkpoint, weights_only=True)["iteration"] < 12, "the run finished before SIGTERM arrived"
    resumed = run_script(["--resume", str(checkpoint)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, resumed_metrics = read_metrics(tmp_path / "runs")
    assert without_timing(resumed_metrics) == without_timing(metrics)

    # merged: loads without peft; the targeted weights moved, the others did not
    code = (
        "import sys, torch; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({os.path.join(run_dir, 'policy')!r})\n"
        f"torch.save(m.state_dict(), {str(tmp_path / 'merged.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = torch.load(tmp_path / "merged.pt")
    base = AutoModelForCausalLM.from_pretrained(qwen_models / "policy").state_dict()
    assert not any("lora" in k for k in merged)
    for k, v in base.items():
        assert torch.equal(merged[k], v) != k.endswith(("q_proj.weight", "v_proj.weight")), k
    # the adapter on the base model gives the merged model's logits
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_models / "policy"), os.path.join(run_dir, "adapter")).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "policy")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "extra,flag,message",
    [
        (["--lora-r", "4", "--lora-target-modules", "q_proj", "qkv"], "--lora-target-modules", "no module is named qkv"),
        (["--lora-target-modules", "q_proj"], "--lora-target-modules", "needs --lora-r"),
        (["--lora-r", "4", "--peft-absent"], "--lora-r", "pip install peft"),
        (["--lora-r", "-1"], "--lora-r", "at least 0"),
        (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha", "positive"),
    ],
    ids=["missing_target", "targets_without_r", "peft_absent", "negative_r", "zero_alpha"],
)
def test_lora_mistakes_are_one_line_errors(qwen_models, tmp_path, capsys, monkeypatch, extra, flag, message):
    import tyro

    if "--peft-absent" in extra:
        extra = [e for e in extra if e != "--peft-absent"]
        monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails as it does where peft is not installed
    args = tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path / "runs", "--reward-fn", f"{qwen_models / 'rewards.py'}:constant", *extra))
    with pytest.raises(SystemExit) as exit_info:
        P.train(args)
    err = capsys.readouterr().err
    assert_one_line_error(exit_info.value.code, err, flag)
    assert message in err
    assert not (tmp_path / "runs").exists()


REWARD_FN_ERRORS = {
    "missing_file": ("missing.py:length", "does not exist"),
    "no_colon": ("rewards.py", "expected FILE.py:NAME"),
    "missing_function": ("rewards.py:nothing", "defines no function nothing"),
    "not_a_function": ("rewards.py:NOT_A_FUNCTION", "defines no function NOT_A_FUNCTION"),
    "no_kwargs": ("rewards.py:no_kwargs", "must accept (prompts, completions, **kwargs)"),
    "positional_only": ("rewards.py:positional", "must accept (prompts, completions, **kwargs)"),
    "import_raises": ("broken.py:f", "importing"),
    "raises": ("rewards.py:raises", "raised RuntimeError: the judge is down"),
    "wrong_length": ("rewards.py:wrong_length", "returned 1 scores for 4 completions"),
    "not_a_number": ("rewards.py:not_a_number", "score 0 is 'good'"),
    "nan": ("rewards.py:nan", "score 0 is nan"),
}


@pytest.mark.parametrize("case", list(REWARD_FN_ERRORS))
def test_reward_function_mistakes_are_one_line_errors_naming_the_function(qwen_models, tmp_path, capsys, case):
    """Loading mistakes stop the run before any model is loaded; a function that raises or returns a wrong value
    stops it at the first evaluation, before the run folder is made."""
    import tyro

    (tmp_path / "rewards.py").write_text("LOG = None\n" + REWARD_FUNCTIONS)
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    spec, message = REWARD_FN_ERRORS[case]
    spec = str(tmp_path / spec) if case != "no_colon" else str(tmp_path / spec)
    args = tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path / "runs", "--reward-fn", spec, "--eval-episodes", "4"))
    with pytest.raises(SystemExit) as exit_info:
        P.train(args)
    err = capsys.readouterr().err
    assert_one_line_error(exit_info.value.code, err, f"--reward-fn {spec}")
    assert message in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--reward-fn-weights", "1", "2"], "--reward-fn-weights"),
        (["--reward-fn-weights", "nan"], "--reward-fn-weights"),
        (["--builtin-reward", "gold"], "--builtin-reward"),
        ([], "--model-name-or-path"),  # no reward at all
    ],
)
def test_reward_flag_combinations_are_checked(qwen_models, tmp_path, capsys, extra, flag):
    import tyro

    fn = ["--reward-fn", f"{qwen_models / 'rewards.py'}:constant"] if extra else []
    with pytest.raises(SystemExit) as exit_info:
        P.train(tyro.cli(P.Args, args=qwen_flags(qwen_models, tmp_path / "runs", *fn, *extra)))
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, flag)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# The built-in task
# ---------------------------------------------------------------------------------------------


def test_a_policy_that_is_not_a_function_of_its_weights_is_noted_once(real_models, tmp_path):
    """An edited copy whose dropout stays on (p=0.1; train mode turns it on in the update, not while sampling):
    the first micro-batch of the first update finds log-probs other than the sampled ones, which one note says, with
    the figure; the run goes on to the end. The unedited script gives no such note (the end-to-end test)."""
    source = open(SCRIPT).read()
    assert source.count("            module.p = 0.0\n") == 1
    edited = tmp_path / "ppo_rlhf_dropout.py"
    edited.write_text(source.replace("            module.p = 0.0\n", "            module.p = 0.1\n"))
    proc = subprocess.run([sys.executable, str(edited), *real_flags(real_models, tmp_path / "runs")], env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if "on-policy check" in line]
    assert len(notes) == 1 and notes[0].startswith("note: on-policy check: max |log-ratio| "), proc.stdout
    assert "at the first micro-batch of iteration 1, above 0.001" in notes[0]
    assert float(notes[0].split("max |log-ratio| ")[1].split(" ")[0]) > 1e-2
    assert len([m for m in read_metrics(tmp_path / "runs")[1] if "objective/kl" in m]) == 6  # it trained on


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin_cache")


def builtin_run(cache, runs_dir, *extra):
    """A built-in task run with the default thread count (no OMP_NUM_THREADS): the script picks one thread."""
    flags = ["--cache-dir", str(cache), "--runs-dir", str(runs_dir), "--total-episodes", "640", "--eval-every", "10", "--eval-episodes", "256", *extra]
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, SCRIPT, *flags], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ", 1 torch thread(s)" in proc.stdout
    assert "on-policy check" not in proc.stdout
    return read_metrics(runs_dir)[1], proc.stdout


def test_builtin_task_learns_gold_reward_and_kl_coef_limits_kl(builtin_cache, tmp_path):
    metrics, stdout = builtin_run(builtin_cache, tmp_path / "loose", "--kl-coef", "0.05")
    (task_dir,) = os.listdir(builtin_cache)
    task = json.load(open(os.path.join(builtin_cache, task_dir, "task.json")))
    assert task["rm_accuracy"] >= 0.75
    gold = [m["objective/gold_score"] for m in metrics if "objective/gold_score" in m]
    assert len(gold) == 2  # SFT policy at episode 0, trained policy at the end
    assert gold[1] > gold[0] + 0.5 * task["sft_gold_std"], gold
    loose_kl = [m["objective/kl"] for m in metrics if "objective/kl" in m][-1]

    # The cached models are reused (no SFT training this time) and a tighter KL budget holds.
    tight, stdout = builtin_run(builtin_cache, tmp_path / "tight", "--kl-coef", "0.5")
    assert "SFT model trained" not in stdout
    tight_kl = [m["objective/kl"] for m in tight if "objective/kl" in m][-1]
    assert tight_kl < loose_kl / 2, (tight_kl, loose_kl)
    ckpt = torch.load(os.path.join(read_metrics(tmp_path / "tight")[0], "checkpoint.pt"), weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-5  # the built-in task's own default


def test_builtin_gold_reward_is_a_reward_function_the_policy_learns(builtin_cache, tmp_path):
    """--builtin-reward gold trains on the hidden gold reward through the reward-function path: with no
    missing-EOS penalty the evaluation score is the gold score itself, and it rises well above the SFT policy's."""
    metrics, stdout = builtin_run(builtin_cache, tmp_path, "--builtin-reward", "gold", "--missing-eos-penalty", "0")
    assert "reward: --builtin-reward gold x 1; value model: the policy's weights with a new scalar head" in stdout
    evals = [m for m in metrics if "objective/gold_score" in m]
    assert [m["eval/scores"] for m in evals] == pytest.approx([m["objective/gold_score"] for m in evals], abs=1e-5)
    (task_dir,) = os.listdir(builtin_cache)
    task = json.load(open(os.path.join(builtin_cache, task_dir, "task.json")))
    assert evals[-1]["objective/gold_score"] > evals[0]["objective/gold_score"] + 0.5 * task["sft_gold_std"]


def trained_records(records: list[dict]) -> list[dict]:
    """The training iterations' records, without the wall-clock episodes per second."""
    return [{k: v for k, v in r.items() if k != "eps"} for r in records if "objective/kl" in r]


def test_a_copy_without_any_optional_block_runs_the_same_ppo_and_an_all_deleted_copy_learns(builtin_cache, tmp_path):
    """The fence's recipe (tests/droppable.py, conftest.check_the_fence_recipe) on the built-in task: each optional
    block deleted alone (fsdp with torchrun) trains to the same metrics (the fast path's copy to 2e-3), all deleted the
    copy learns."""
    task = ["--cache-dir", str(builtin_cache), "--num-threads", "1"]
    scores = check_the_fence_recipe(
        "ppo_rlhf.py", [*task, "--total-episodes", "128"], [*task, "--total-episodes", "640"], tmp_path, RLHF_BLOCKS,
        RLHF_BLOCK_FLAGS, ("--eval-every", "100", "--eval-episodes", "16"), trained_records, "objective/scores",
        fast_path_rel=2e-3,  # log-probs by a forward pass, not the sampling pass: rounding apart (a clip fraction: a token)
    )  # fmt: skip
    assert len(scores) == 10 and np.mean(scores[-2:]) > scores[0] + 0.5, scores  # the SFT policy's: about 0


def test_the_readme_gives_this_script_s_line_counts_as_they_are():
    check_the_readme_line_counts("ppo_rlhf.py", RLHF_BLOCKS)


def test_num_threads_default_follows_the_work_and_explicit_values_win():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        P.set_num_threads(0, small_network=False)  # a real model: torch's default stays
        assert torch.get_num_threads() == 2
        P.set_num_threads(0, small_network=True)  # the built-in task's tiny models
        assert torch.get_num_threads() == 1
        P.set_num_threads(3, small_network=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
