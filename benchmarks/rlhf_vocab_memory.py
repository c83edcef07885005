"""Peak CPU memory of ppo_rlhf.py's passes over a 151,936-token vocabulary (Qwen2.5's), on a tiny random Qwen2.

Each phase runs in a fresh process: build the models (hidden 64, 2 layers; the embedding and the tied output
layer are most of its 9.8M parameters), read the resident set size (RSS), run the phase once, and report the
peak RSS (getrusage's ru_maxrss) above that. Phases:
  rollout  one call of ppo_rlhf.rollout on --rollout-batch prompts: sampling, the policy's and the reference's
           log-probs, values, a reward function's scores
  update   one call of ppo_rlhf.ppo_update on one micro-batch of --micro-batch episodes (forward, entropy, backward)
--script picks the ppo_rlhf.py to measure, so two versions compare on the same machine:

    python benchmarks/rlhf_vocab_memory.py --script /tmp/before/ppo_rlhf.py --label before
    python benchmarks/rlhf_vocab_memory.py --script ppo_rlhf.py --label after
"""

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from typing import Optional

import tyro

from stamp import stamp


@dataclass
class Args:
    script: str = "ppo_rlhf.py"
    """the ppo_rlhf.py to measure"""
    label: str = "after"
    """the name its numbers are stored under in --out"""
    out: str = "benchmarks/results/rlhf/vocab_memory.json"
    """results file (one entry per label)"""
    vocab: int = 151936
    """embedding rows of the policy, the reference and the value model"""
    prompt_length: int = 48
    """tokens per prompt"""
    response_length: int = 16
    """generated tokens per response (ppo_rlhf.py's default)"""
    rollout_batch: int = 64
    """prompts per no-grad chunk (ppo_rlhf.py's default --local-rollout-forward-batch-size)"""
    micro_batch: int = 16
    """episodes per micro-batch (ppo_rlhf.py's default --per-device-train-batch-size)"""
    phase: Optional[str] = None
    """internal: run one phase in this process"""


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_phase(args: Args) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    spec = importlib.util.spec_from_file_location("ppo_rlhf_measured", args.script)
    P = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = P  # its dataclasses look their module up
    spec.loader.exec_module(P)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = dict(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    policy, ref_policy = Qwen2ForCausalLM(Qwen2Config(**config)).eval(), Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    value_model = Qwen2ForSequenceClassification(Qwen2Config(**config, num_labels=1))
    pad_id, eos_id = args.vocab - 1, args.vocab - 2
    if hasattr(P, "check_logits_from_hidden"):
        P.check_logits_from_hidden(policy, ref_policy)
    ppo = P.Args(
        response_length=args.response_length, local_rollout_forward_batch_size=args.rollout_batch,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1, num_minibatches=1, update_epochs=1,
    )  # fmt: skip
    if hasattr(P, "with_defaults"):  # flags left unset take a default set
        ppo = P.with_defaults(ppo)
    g = torch.Generator().manual_seed(0)
    if args.phase == "rollout":
        task = types.SimpleNamespace(pad_id=pad_id, eos_ids=[eos_id], tokenizer=None)
        reward = P.Reward(model=None, tokenizer=None, functions=[])  # scores 0: the reward is not measured
        gen_config = P.sampling_config(args.response_length, 1.0, eos_id, pad_id, args.vocab)
        if hasattr(P, "large_logits"):
            gen_config = P.sampling_config(args.response_length, 1.0, eos_id, pad_id, args.vocab)
            gen_config.output_logits = not P.large_logits(args.rollout_batch * args.response_length, args.vocab)
        queries = torch.randint(0, 1000, (args.rollout_batch, args.prompt_length), generator=g)
        records = [{"prompt": ""}] * args.rollout_batch
        before, start = rss_mib(), time.perf_counter()
        with torch.no_grad():
            P.rollout(policy, ref_policy, reward, value_model, queries, records, gen_config, task, ppo)
    else:
        B, T, ctx = args.micro_batch, args.response_length, args.prompt_length
        query_responses = torch.randint(0, 1000, (B, ctx + T), generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
        zeros = torch.zeros(B, T)
        data = P.Rollout(
            query_responses=query_responses, context_length=ctx, responses=query_responses[:, ctx:], mask=mask,
            logprobs=zeros - 12.0, ref_logprobs=zeros - 12.0, values=zeros, scores=torch.zeros(B),
        )  # fmt: skip
        trained = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
        flat = P.FlatParameters(trained) if hasattr(P, "FlatParameters") else None  # older scripts step one flat tensor
        stepped = [flat.param] if flat else trained
        optimizer = torch.optim.Adam(stepped, lr=1e-5, eps=1e-5)
        advantages, returns = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
        # Adam's moments exist before the measurement, as in every update after the first
        for p in stepped:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        guard = [P.NonFiniteGuard()] if hasattr(P, "NonFiniteGuard") else []  # older scripts take no guard
        before, start = rss_mib(), time.perf_counter()
        P.ppo_update(ppo, policy, value_model, optimizer, flat or trained, data, advantages, returns, pad_id, *guard)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(rss_before_mib=round(before, 1), peak_rss_mib=round(peak, 1), peak_above_mib=round(peak - before, 1), seconds=round(seconds, 2))


def main(args: Args) -> None:
    if args.phase is not None:
        print(json.dumps(run_phase(args)))
        return
    started, results = stamp(__file__), {}
    for phase in ("rollout", "update"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", phase]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{args.label} {phase}: {results[phase]}")
    stored = json.load(open(args.out)) if os.path.exists(args.out) else {}
    stored[args.label] = dict(stamp=started, results=results, settings={k: v for k, v in vars(args).items() if k not in ("phase", "out")})
    with open(args.out, "w") as f:
        json.dump(stored, f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
