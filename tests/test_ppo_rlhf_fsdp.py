"""Tests of ppo_rlhf.py --fsdp on the CPU: two torchrun processes over gloo, FSDP2 against the unsharded script.

The two-process parts run this file itself under torchrun (`worker`, at the bottom), which saves what it measured
for the tests to check; each launch serves several assertions, as a torchrun start costs seconds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import ppo_rlhf as P  # noqa: E402

SCRIPT = os.path.join(REPO, "ppo_rlhf.py")
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PAD = 40  # outside the tiny models' vocabulary, as an added [PAD] is
UPDATE_ARGS = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=2, num_minibatches=2, update_epochs=2,
    learning_rate=1e-3, max_grad_norm=0.5, temperature=0.7,
)  # fmt: skip
# FSDP averages gradients by a reduce-scatter and sums the squared norm over shards: the same numbers as the
# unsharded all-reduce and clip up to float32 rounding, which Adam's division by sqrt(v) can amplify early on.
RTOL, ATOL = 1e-5, 1e-6


def tiny_models(lora: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A GPT-2 policy (tied embeddings) and a Llama value model, dropout off; with LoRA adapters on both."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=PAD, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    torch.manual_seed(1)
    value_model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=PAD, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1,
    ))  # fmt: skip
    policy, value_model = P.disable_dropout(policy), P.disable_dropout(value_model)
    if lora:
        task = None  # add_lora reads only args
        args = P.Args(lora_r=4, lora_alpha=8.0, lora_target_modules=("c_attn", "q_proj", "v_proj"))
        policy, value_model = P.add_lora(policy, value_model, task, args)
    return policy, value_model


def rank_batch(policy: torch.nn.Module, rank: int, B: int = 8, ctx: int = 4, T: int = 5):
    """This process's batch: left-padded queries, responses of 1-5 tokens, old log-probs off the policy's (some
    ratios leave the clip range), raw advantages, values and returns; different on each process."""
    g = torch.Generator().manual_seed(10 + rank)
    queries = torch.randint(0, PAD, (B, ctx), generator=g)
    queries[0, :2] = PAD
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    responses = torch.randint(0, PAD, (B, T), generator=g).masked_fill(~mask, PAD)
    query_responses = torch.cat([queries, responses], 1)
    with torch.no_grad():
        logprobs = P.lm_response_logprobs(policy, query_responses, PAD, ctx, UPDATE_ARGS["temperature"])[0]
    zero = lambda x: torch.where(mask, x, 0.0)  # noqa: E731
    data = P.Rollout(
        query_responses=query_responses, context_length=ctx, responses=responses, mask=mask,
        logprobs=zero(logprobs + 0.3 * torch.randn(B, T, generator=g)), ref_logprobs=zero(logprobs),
        values=zero(torch.randn(B, T, generator=g)), scores=torch.randn(B, generator=g),
    )  # fmt: skip
    return data, zero(2.0 * torch.randn(B, T, generator=g) + 1.0), zero(torch.randn(B, T, generator=g))


def one_update(sharded: bool, lora: bool, rank: int) -> tuple[dict, dict]:
    """One PPO update through the script's own ppo_update, unsharded (flat parameters, all-reduce) or under
    FSDP (shard_models, per-tensor Adam); returns the full weights (rank 0) and the statistics."""
    args = P.Args(**UPDATE_ARGS, fsdp=sharded, lora_r=4 if lora else 0)
    policy, value_model = tiny_models(lora)
    data, advantages, returns = rank_batch(policy, rank)
    if sharded:
        P.shard_models(args, torch.device("cpu"), policy, value_model)
    trained = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    flat = P.ShardedParameters(trained) if sharded else P.FlatParameters(trained)
    optimizer = torch.optim.Adam(flat.tensors, lr=args.learning_rate, eps=1e-5, fused=True)
    torch.manual_seed(123)
    stats = P.ppo_update(args, policy, value_model, optimizer, flat, data, advantages, returns, PAD, P.NonFiniteGuard())
    options = P.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {name: P.get_model_state_dict(m, options=options) for name, m in (("policy", policy), ("value", value_model))}
    return weights, {k: v.item() for k, v in stats.items()}


def worker(case: str, out: str) -> None:
    """Run under torchrun (2 processes, gloo); rank 0 saves what the tests check into `out`."""
    torch.set_num_threads(1)
    P.dist.init_process_group("gloo")
    rank = P.dist.get_rank()
    if case == "update":
        results = {f"{'lora' if lora else 'full'}_{'fsdp' if sharded else 'flat'}": one_update(sharded, lora, rank) for lora in (False, True) for sharded in (False, True)}
        if rank == 0:
            torch.save(results, out)
    P.dist.destroy_process_group()


def run_worker(case: str, tmp_path) -> object:
    out = tmp_path / f"{case}.pt"
    proc = subprocess.run([*TORCHRUN, __file__, case, str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_one_update_under_fsdp_equals_the_unsharded_update(tmp_path):
    """Two processes with different batches, two epochs of two minibatches of two micro-batches: the parameters
    after ppo_update under FSDP (reduce-scatter, clip over sharded gradients, per-tensor Adam on shards) equal
    those of the unsharded update (flat parameters, all-reduce, fused Adam) to RTOL/ATOL, and so do the update's
    statistics; with LoRA too (the base frozen and sharded, the adapters and the value head trained)."""
    results = run_worker("update", tmp_path)
    for mode in ("full", "lora"):
        (flat, flat_stats), (sharded, sharded_stats) = results[f"{mode}_flat"], results[f"{mode}_fsdp"]
        before = tiny_models(mode == "lora")[0].state_dict()
        assert any(not torch.equal(before[k], flat["policy"][k]) for k in before), "the update changed nothing"
        for model in ("policy", "value"):
            assert flat[model].keys() == sharded[model].keys()
            for name, value in flat[model].items():
                torch.testing.assert_close(sharded[model][name], value, rtol=RTOL, atol=ATOL, msg=f"{mode} {model} {name}")
        assert sharded_stats == pytest.approx(flat_stats, rel=RTOL, abs=ATOL)


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--fsdp", "--runs-dir", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--fsdp" in lines[0] and "torchrun" in lines[0], proc.stderr


if __name__ == "__main__":
    worker(*sys.argv[1:])
