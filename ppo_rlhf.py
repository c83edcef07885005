"""PPO for RLHF of causal language models, in one file (CleanRL style).

Fine-tunes a causal LM (the policy) to maximise a reward (a reward model's score and/or Python reward functions)
minus a per-token KL penalty to a frozen copy of itself (Ziegler et al., 2019; Stiennon et al., 2020; Huang et al.,
2024, "The N+ Implementation Details of RLHF with PPO"); LoRA optional. Metric names are TRL's. Without
--model-name-or-path it runs a built-in offline task (a hidden Markov-chain language, an SFT model, a hidden gold
reward and a reward model trained on noisy preferences).

    python ppo_rlhf.py                                   # the built-in task, cached on first use
    python ppo_rlhf.py --model-name-or-path MODEL --reward-model-path RM --prompts prompts.jsonl
    python ppo_rlhf.py --model-name-or-path MODEL --reward-fn rewards.py:accuracy --prompts prompts.jsonl
    torchrun --standalone --nproc_per_node 2 ppo_rlhf.py # data parallel (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node 8 ppo_rlhf.py --fsdp ...  # every model sharded over the processes (FSDP2)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import pickle
import random
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Annotated, Callable, Literal, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
import tyro
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)


@dataclass
class Args:
    """PPO for RLHF. Flags left unset take the defaults of the run's kind: the built-in task's own (tuned for it),
    or with --model-name-or-path TRL 1.12 PPOConfig's; the first line of a run says which. Any flag given wins."""

    model_name_or_path: Optional[str] = None
    """policy and reference: an AutoModelForCausalLM directory or hub name; None runs the built-in task"""
    reward_model_path: Optional[str] = None
    """reward model: an AutoModelForSequenceClassification with one label; optional with --reward-fn. With a
    tokenizer of its own it reads the decoded text: its chat template's, or prompt and response (an encoder's pair)"""
    reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """a reward function FILE.py:NAME, called as NAME(prompts, completions, completion_ids, **fields) -> a float (or
    None: 0) per completion, TRL's GRPO signature (fields: the prompt line's others); repeat for several: scores add up"""
    reward_fn_weights: Optional[tuple[float, ...]] = None
    """one weight per --reward-fn (default 1 each); the reward model's score weighs 1"""
    value_model_path: Optional[str] = None
    """value model: an AutoModelForSequenceClassification with one label; None copies the reward model (without one: the policy with a new head)"""
    value_head_on_policy: bool = False
    """the value model is a scalar head on the policy's backbone (OpenAI's 2019 layout): one model fewer, the value loss trains the policy too"""
    prompts: Optional[str] = None
    """training prompts: a JSONL file with a "prompt" string or "messages" (role/content dicts, for the chat template) per line, or a `datasets` name"""
    total_episodes: int = 9600
    """total number of completions to train on, summed over processes"""
    learning_rate: Optional[float] = None
    """learning rate of the Adam optimizer (policy and value model); unset: 3e-4 (built-in task), 3e-6 (TRL)"""
    adam_eps: Optional[float] = None
    """epsilon in Adam's denominator; unset: 1e-5 (built-in task), 1e-8 (TRL), whose AdamW has weight decay 0: Adam"""
    per_device_train_batch_size: int = 16
    """episodes per micro-batch (one forward/backward) on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches whose gradients are summed before each optimizer step"""
    anneal_lr: bool = True
    """anneal the learning rate linearly: iteration i of N at lr * (N - i + 1) / N, the last at lr / N"""
    gamma: float = 1.0
    """discount factor over tokens"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation over tokens"""
    baseline: Literal["gae", "group"] = "gae"
    """gae: a value model and GAE over tokens; group: no value model, RLOO over --group-size responses per prompt"""
    group_size: int = 2
    """--baseline group: responses per prompt, side by side (TRL RLOO's rloo_k); it divides each process's batch"""
    scale_group_std: bool = False
    """--baseline group: divide the advantages by their group's standard deviation, as GRPO does"""
    num_minibatches: Optional[int] = None
    """optimizer steps per PPO epoch; unset: 4 (built-in task), 1 (TRL)"""
    update_epochs: int = 4
    """PPO epochs over each batch of episodes"""
    norm_adv: bool = True
    """whiten advantages over the valid tokens of the batch"""
    clip_coef: float = 0.2
    """policy ratio clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values"""
    vf_coef: float = 0.1
    """coefficient of the value loss"""
    max_grad_norm: float = 1.0
    """maximum global norm of the gradients"""
    target_kl: Optional[float] = None
    """stop the update epochs early once the approximate KL (policy/approxkl_avg of an epoch) passes this (None: never)"""
    vf_clip_coef: float = 0.2
    """value clipping range used by --clip-vloss"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) over the valid tokens of the batch"""
    kl_coef: float = 0.05
    """coefficient of the per-token KL penalty to the reference (initial value with --adaptive-kl)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator: k1 = log(pi/ref), k3 = (ref/pi - 1) - log(ref/pi)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards --adaptive-kl-target (Ziegler et al., 2019)"""
    adaptive_kl_target: float = 6.0
    """target KL (nats per response) of the adaptive KL controller (--adaptive-kl)"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive controller"""
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of a response that has no EOS token; unset: 1.0 (built-in task), 0 (TRL)"""
    response_length: Optional[int] = None
    """maximum number of generated tokens per response; unset: 16 (built-in task), 53 (TRL)"""
    max_prompt_length: int = 64
    """prompts longer than this many tokens keep their last tokens"""
    temperature: Optional[float] = None
    """sampling temperature; log-probs are computed from logits divided by it; unset: 1.0 (built-in task), 0.7 (TRL)"""
    local_rollout_forward_batch_size: int = 64
    """chunk size of the no-grad passes (generation, reference, reward, value) on each process"""
    lora_r: int = 0
    """rank of LoRA adapters (peft) on the policy and the value model (its head trains whole); 0 trains every weight"""
    lora_alpha: float = 16.0
    """LoRA scaling: the adapters' update is multiplied by lora_alpha / lora_r"""
    lora_target_modules: Optional[tuple[str, ...]] = None
    """names of the modules that get adapters, e.g. q_proj v_proj, or all-linear; None: peft's default for the model"""

    # Run settings: where and how the run executes, what it writes, how it is evaluated.
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (offset by the process rank under torchrun)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """torch device: auto (cuda, then mps, then cpu) or an explicit device string such as cuda:1"""
    num_threads: int = 0
    """torch CPU threads per process; 0 picks from the work: 1 for the built-in task, torch's default for real models"""
    bf16: bool = False
    """run forward passes in bfloat16 autocast (CUDA only)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy and value models"""
    fsdp: bool = False  # optional: fsdp
    """under torchrun: shard every model, its gradients and Adam state over the processes with FSDP2"""
    track: bool = False  # optional: wandb
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ppo-rlhf"  # optional: wandb
    """the wandb's project name"""
    wandb_entity: Optional[str] = None  # optional: wandb
    """the entity (team) of wandb's project"""
    runs_dir: str = "runs"
    """directory under which each run writes runs_dir/{run_name}/"""
    save_every: int = 0
    """iterations between checkpoints (0 = only at the end, when stopped by SIGINT/SIGTERM and after an exception)"""
    resume: Optional[str] = None  # optional: resume
    """a checkpoint.pt to continue in its folder with its settings but --device, --num-threads, --save-every, --track
    (its resume_state is unpickled, which can run code: resume only your own runs)"""
    eval_every: int = 10  # optional: evaluation
    """iterations between evaluations on the held-out prompts (with a progress line and sample table)"""
    eval_episodes: int = 256  # optional: evaluation
    """held-out prompts evaluated each time (gold score on the built-in task)"""
    eval_prompts: Optional[str] = None  # optional: evaluation
    """held-out evaluation prompts, same formats as --prompts; None holds out a fixed split of --prompts"""
    eval_stochastic: bool = False  # optional: evaluation
    """if toggled, evaluation samples at --temperature (the built-in task's always does); by default it is greedy"""

    # Built-in task: its reward, its definition (the task_* flags: the cache key) and where it is cached.
    builtin_reward: Literal["model", "gold"] = "model"
    """built-in task: train on the learned reward model, or on the hidden gold reward (a verifiable reward function)"""
    cache_dir: Optional[str] = None
    """built-in task: where its models and prompts are cached; None means {runs_dir}/builtin_task"""
    task_seed: int = 0
    """built-in task: seed of the hidden language, corpus, preference labels and SFT/reward training"""
    task_vocab_size: int = 32
    """built-in task: number of words in the hidden language"""
    task_prompt_length: int = 8
    """built-in task: words per prompt"""
    task_sft_sequences: int = 20000
    """built-in task: corpus size the SFT model is trained on"""
    task_preference_pairs: int = 3000
    """built-in task: labelled response pairs the reward model is trained on (10% held out)"""


# The task: prompts in, responses out, and the model passes that score them. Shapes: B episodes, T response tokens.
# Queries are left-padded, responses right-padded; `mask` is True on valid response tokens (up to the first EOS, any
# of the checkpoint's). Padding becomes token 0 before any embedding lookup: an added [PAD] is never looked up.


def iteration_prompts(n: int, iteration: int, batch_size: int, local_batch_size: int, rank: int, seed: int) -> list[int]:
    """This process's share of the iteration's prompts (indices into the n prompts), drawn without replacement
    from a fresh permutation of the prompts on each pass over them."""
    first = (iteration - 1) * batch_size + rank * local_batch_size
    positions = range(first, first + local_batch_size)
    perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in {p // n for p in positions}}
    return [int(perms[p // n][p % n]) for p in positions]


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], device=device)


def first_true_indices(bools: Tensor) -> Tensor:
    """Index of the first True of each row, or the row length when there is none."""
    return torch.where(bools, torch.arange(bools.size(-1), device=bools.device), bools.size(-1)).min(-1).values


def is_eos(tokens: Tensor, eos_ids: int | list[int]) -> Tensor:
    """Where the tokens are an EOS: any of the checkpoint's EOS ids (Llama 3 and Qwen2.5-Instruct list several)."""
    return torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))


def truncate_after_eos(responses: Tensor, eos_ids: int | list[int], pad_id: int) -> Tensor:
    """Replace every token after the first EOS of each response by padding (the EOS stays)."""
    eos_idx = first_true_indices(is_eos(responses, eos_ids))
    after = torch.arange(responses.size(1), device=responses.device) > eos_idx[:, None]
    return responses.masked_fill(after, pad_id)


def apply_missing_eos_penalty(scores: Tensor, responses: Tensor, eos_ids: int | list[int], penalty: float) -> Tensor:
    """Subtract `penalty` from the score of each response that contains no EOS token."""
    return torch.where(is_eos(responses, eos_ids).any(1), scores, scores - penalty)


def sampler_logits(logits: Tensor, temperature: float, pad_id: int) -> Tensor:
    """The logits of the distribution responses are drawn from: divided by the temperature, and the pad id, which
    the sampler never emits, at the lowest float (no probability; finite, so entropies stay finite)."""
    logits = logits.float() / temperature
    if pad_id >= logits.size(-1):  # an added [PAD] outside the vocabulary
        return logits
    return logits.index_fill(-1, torch.tensor([pad_id], device=logits.device), torch.finfo(logits.dtype).min)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each token under `logits` (sampler_logits)."""
    return torch.gather(logits.float().log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def model_inputs(query_responses: Tensor, pad_id: int) -> dict[str, Tensor]:
    mask = query_responses != pad_id
    return dict(input_ids=query_responses.masked_fill(~mask, 0), attention_mask=mask.long(), position_ids=mask.cumsum(1) - mask.long())


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dimension (no gradient: it is only logged)."""
    with torch.no_grad():
        return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def lm_response_logprobs(model: nn.Module, query_responses: Tensor, pad_id: int, context_length: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and their distributions' entropies, under the logits divided by the temperature
    (fp32 logits that would be large are computed from the hidden states a chunk at a time, below the fence)."""
    inputs = model_inputs(query_responses, pad_id)
    tokens = inputs["input_ids"][:, context_length:]
    if large_logits(query_responses.numel(), vocab_rows(model)) and getattr(model, "logits_from_hidden", False):  # optional: fast-path
        return chunked_response_logprobs(model, inputs, tokens, context_length, temperature, pad_id)
    logits = sampler_logits(model(**inputs, use_cache=False).logits[:, context_length - 1 : -1], temperature, pad_id)
    return logprobs_from_logits(logits, tokens), entropy_from_logits(logits)


def token_scores(model: nn.Module, query_responses: Tensor, pad_id: int) -> Tensor:
    """The scalar head of a sequence-classification model applied at every position."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**model_inputs(query_responses, pad_id), use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, query_responses: Tensor, pad_id: int, context_length: int) -> Tensor:
    """Reward-model score read at the last real token of each response."""
    scores = token_scores(model, query_responses, pad_id)
    responses = query_responses[:, context_length:]
    last = context_length + first_true_indices(responses == pad_id) - 1
    return scores[torch.arange(len(scores), device=scores.device), last]


def sampling_config(response_length: int, temperature: float, eos_ids: int | list[int], pad_id: int, vocab_size: int) -> GenerationConfig:
    """Pure sampling at `temperature` (nothing else: as_ppo_model empties the model's generation_config), stopping at
    every EOS id; its logits are kept when output_logits is set (the fast path: log-probs without a forward)."""
    return GenerationConfig(
        max_new_tokens=response_length, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        eos_token_id=eos_ids, pad_token_id=eos_ids if isinstance(eos_ids, int) else eos_ids[0],  # finished rows: EOS, then padding
        suppress_tokens=[pad_id] if pad_id < vocab_size else None,  # a sampled pad would end the response
        output_logits=False, return_dict_in_generate=True,
    )  # fmt: skip


@torch.no_grad()
def generate(
    policy: nn.Module, queries: Tensor, pad_id: int, gen_config: GenerationConfig, response_length: int
) -> tuple[Tensor, Optional[Tensor]]:
    """Sample responses with the KV cache. Returns (responses right-padded to response_length, their log-probs from
    the generation pass itself when it kept its logits, which saves a forward; else None)."""
    inputs = model_inputs(queries, pad_id)
    out = policy.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=gen_config)
    responses, logprobs = out.sequences[:, queries.size(1) :], None
    missing = response_length - responses.size(1)
    if out.logits is not None:  # optional: fast-path
        logprobs = F.pad(logprobs_from_logits(sampler_logits(torch.stack(out.logits, 1), gen_config.temperature, pad_id), responses), (0, missing), value=0.0)
    return F.pad(responses, (0, missing), value=pad_id), logprobs


@dataclass
class Reward:
    """What scores a response, the scores added up: a reward model and reward functions on the decoded text."""

    model: Optional[nn.Module]
    tokenizer: Optional[transformers.PreTrainedTokenizerBase]  # its own; None: it reads the policy's tokens
    functions: list[RewardFunction]


@torch.no_grad()
def score_responses(reward: Reward, queries: Tensor, responses: Tensor, records: list[dict], task: Task) -> Tensor:
    """Scores [B] of the responses to the queries (prompt lines `records`), before the missing-EOS penalty; a reward
    model that shares the policy's tokenizer reads its tokens (nothing decoded)."""
    scores = torch.zeros(len(queries), device=queries.device)
    if reward.model is not None and reward.tokenizer is None:
        scores += sequence_scores(reward.model, torch.cat([queries, responses], 1), task.pad_id, queries.size(1))
    if reward.tokenizer is not None or reward.functions:
        episodes = decode_episodes(records, responses, task)
        if reward.tokenizer is not None:
            scores += retokenized_scores(reward.model, reward.tokenizer, episodes, task)
        for function in reward.functions:
            scores += function.weight * torch.tensor(call_reward_function(function, episodes), device=scores.device)
    return scores


@dataclass
class Rollout:
    """One batch of episodes. Per-token tensors are [B, T] over the response tokens and 0 on padding."""

    query_responses: Tensor
    context_length: int  # queries are left-padded to this length
    responses: Tensor
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor  # [B], after the missing-EOS penalty


@torch.no_grad()
def rollout(
    policy: nn.Module, ref_policy: nn.Module, reward: Reward, value_model: Optional[nn.Module], queries: Tensor,
    records: list[dict], gen_config: GenerationConfig, task: Task, args: Args,
) -> Rollout:
    """Sample a response to each query, then score it: log-probs under the policy (from the sampling pass) and
    the reference, the reward, the value model's values (0 without one). In chunks of the no-grad batch size."""
    context_length, pad_id, n = queries.size(1), task.pad_id, args.local_rollout_forward_batch_size
    policy.eval()
    chunks = []
    with torch.autocast(queries.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        for i in range(0, len(queries), n):
            query = queries[i : i + n]
            response, logprob = generate(policy, query, pad_id, gen_config, args.response_length)
            response = truncate_after_eos(response, task.eos_ids, pad_id)
            query_response = torch.cat([query, response], 1)
            if logprob is None:  # no logits kept while sampling (a large vocabulary)
                logprob = lm_response_logprobs(policy, query_response, pad_id, context_length, args.temperature)[0]
            with adapters_disabled(ref_policy):  # LoRA: the reference is the policy without its adapters
                ref_logprob, _ = lm_response_logprobs(ref_policy, query_response, pad_id, context_length, args.temperature)
            score = score_responses(reward, query, response, records[i : i + n], task)
            score = apply_missing_eos_penalty(score, response, task.eos_ids, args.missing_eos_penalty)
            value = torch.zeros_like(ref_logprob) if value_model is None else token_scores(value_model.eval(), query_response, pad_id)[:, context_length - 1 : -1]
            chunks.append((response, logprob, ref_logprob, score, value))
    responses, logprobs, ref_logprobs, scores, values = (torch.cat(x) for x in zip(*chunks))
    mask = responses != pad_id
    return Rollout(
        query_responses=torch.cat([queries, responses], 1), context_length=context_length, responses=responses,
        mask=mask, logprobs=torch.where(mask, logprobs, 0.0), ref_logprobs=torch.where(mask, ref_logprobs, 0.0),
        values=torch.where(mask, values, 0.0), scores=scores,
    )  # fmt: skip


# The models: the policy and its frozen reference, the frozen reward model, and the value model.


def load_models(task: Task, args: Args, device: torch.device) -> tuple[nn.Module, nn.Module, Reward, Optional[nn.Module]]:
    """Returns (policy, ref_policy, reward, value_model), each an as_ppo_model placed once built. The value model
    copies the reward model (TL;DR reproduction: it starts out predicting scores); --baseline group: none."""
    load, place = load_model, partial(place_model, device)
    if args.fsdp:  # rank 0 reads the weights; each process keeps its shards  # optional: fsdp
        load, place = load_model_to_shard, partial(shard_model, args, device)
    causal_lm = lambda: as_ppo_model(load(AutoModelForCausalLM, task.policy_path, task.policy_config, "--model-name-or-path"))  # noqa: E731
    scorer = lambda *source: as_ppo_model(load(AutoModelForSequenceClassification, *source))  # noqa: E731
    policy = causal_lm()
    if args.gradient_checkpointing:  # not reentrant: under LoRA the checkpointed blocks' inputs need no gradient
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.lora_r:  # under LoRA the reference is the policy itself, its adapters disabled (adapters_disabled)
        policy, ref_policy = place(policy), place(causal_lm().eval().requires_grad_(False))
    reward_model = None
    if task.reward_path is not None:
        reward_model = scorer(task.reward_path, task.reward_config, "--reward-model-path", "auto").eval()
        if task.reward_tokenizer is None:
            check_scorer(task, reward_model, "--reward-model-path", policy)
        reward_model = place(reward_model.requires_grad_(False))
    value_model = PolicyValueHead(policy) if args.value_head_on_policy else scorer(*task.value_source) if task.value_source[0] else None
    check_scorer(task, value_model, task.value_source[2], policy)
    if task.value_source[2] == "--model-name-or-path":  # a new head: values start at 0 (OpenAI's 2019 code)
        for p in value_model.score.parameters():
            nn.init.zeros_(p)
    if args.gradient_checkpointing and value_model is not None and not args.value_head_on_policy:  # else the policy's backbone
        value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        policy, value_model = add_lora(policy, value_model, task, args)
        policy = ref_policy = place(policy)
    value_model = place(value_model)
    check_logits_from_hidden(policy, ref_policy)  # optional: fast-path
    return policy, ref_policy, Reward(reward_model, task.reward_tokenizer, task.reward_functions), value_model


class PolicyValueHead(nn.Module):
    """--value-head-on-policy: a scalar head (initialised at 0) on the policy's own backbone, read by token_scores as
    any value model is. The backbone is not registered here: its parameters stay the policy's alone."""

    base_model_prefix = "backbone"

    def __init__(self, policy: nn.Module):
        super().__init__()
        backbone, output_layer = lm_parts(policy)
        self._policy_backbone = (backbone,)  # a tuple: nn.Module does not register what it holds
        self.score = nn.Linear(output_layer.in_features, 1, bias=False, device=output_layer.weight.device)
        nn.init.zeros_(self.score.weight)

    @property
    def backbone(self) -> nn.Module:
        return self._policy_backbone[0]

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()


def as_ppo_model(model: nn.Module) -> nn.Module:
    """Dropout off (it would make the first minibatch's ratio differ from 1, and values noisy; load_config zeroes the
    configs' rates too), and an empty generation_config (generate() fills what sampling_config leaves unset from it,
    top-k, ..., and would sample another distribution than the one whose log-probs are stored; policy/ keeps the
    checkpoint's)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if model.can_generate():
        model.generation_config = GenerationConfig()
    return model


# The PPO maths: small functions the tests check against naive reference code. Masking and averaging over
# the valid tokens happen at the call site (masked_mean).


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise x to zero mean (unless shift_mean=False) and unit variance over masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask, out if shift_mean else out + mean, 0.0)


def kl_estimators(logratio: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token estimators of KL(pi || q) from logratio = log(q / pi) on samples of pi (Schulman, "Approximating
    KL divergence"): k1 = -logratio (unbiased, noisy), k3 = (q/pi - 1) - log(q/pi) (unbiased, never negative)."""
    return -logratio, torch.expm1(logratio) - logratio


def shape_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, kl_coef: float, kl_estimator: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: -kl_coef * KL(pi || ref) on each valid token, plus the score on the last valid one.
    Returns (rewards, kl, non_score_reward), all zero on padding."""
    k1, k3 = kl_estimators(ref_logprobs - logprobs)
    kl = torch.where(mask, k1 if kl_estimator == "k1" else k3, 0.0)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), mask.sum(1) - 1] += scores
    return rewards, kl, non_score_reward


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float) -> tuple[Tensor, Tensor]:
    """GAE over tokens. The value after the last valid token is 0 (the episode ends there).
    Returns (advantages, returns), zero on padding."""
    rewards, values, T = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0), rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # Padding carries zero reward and value, so the trace of a shorter response starts at 0.
        lastgaelam = torch.where(mask[:, t], delta + gamma * gae_lambda * lastgaelam, 0.0)
        advantages[:, t] = lastgaelam
    return advantages, torch.where(mask, advantages + values, 0.0)


def group_advantages(returns: Tensor, k: int, scale_std: bool) -> Tensor:
    """RLOO (Ahmadian et al., 2024): each return minus the mean of the other k - 1 in its group (k consecutive
    responses to one prompt); with scale_std divided by the group's std (+1e-4), as GRPO."""
    groups = returns.view(-1, k)
    advantages = groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (advantages / (groups.std(1, keepdim=True) + 1e-4) if scale_std else advantages).flatten()


def policy_loss(ratio: Tensor, advantages: Tensor, clip_coef: float) -> Tensor:
    """Per-token clipped surrogate loss, the negated min of the unclipped and clipped objectives."""
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef))


def value_loss(new_values: Tensor, old_values: Tensor, returns: Tensor, clip_coef: Optional[float]) -> Tensor:
    """Per-token 0.5 * squared error; with clip_coef, the max of the plain and the clipped errors."""
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped
    clipped = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
    return 0.5 * torch.max(unclipped, (clipped - returns) ** 2)


def adaptive_kl_coef(kl_coef: float, current_kl: float, target_kl: float, horizon: int, n_episodes: int) -> float:
    """Ziegler et al. (2019): move kl_coef proportionally to the (clipped) relative KL error."""
    error = float(np.clip(current_kl / target_kl - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * n_episodes / horizon)


def ppo_update(
    args: Args, policy: nn.Module, value_model: Optional[nn.Module], optimizer: torch.optim.Optimizer, trained: list[Tensor],
    data: Rollout, advantages: Tensor, returns: Optional[Tensor], pad_id: int, guard: NonFiniteGuard,
) -> dict[str, Tensor]:
    """One PPO update: --update-epochs epochs (fewer past --target-kl) over shuffled minibatches of the batch, each
    minibatch one Adam step on the gradients of --gradient-accumulation-steps micro-batches. Returns statistics."""
    if args.norm_adv:
        advantages = whiten(advantages, data.mask)
    micro, accumulation, ctx = args.per_device_train_batch_size, args.gradient_accumulation_steps, data.context_length
    policy.train()  # dropout is off; train mode only turns on gradient checkpointing
    critic = value_model is not None  # --baseline group: none
    if critic:
        value_model.train()
    stats = defaultdict(list)
    for epoch in range(args.update_epochs):
        perm = torch.randperm(len(advantages), device=advantages.device)
        for mb in range(args.num_minibatches):
            optimizer.zero_grad()
            minibatch_loss = 0.0
            for acc in range(accumulation):
                idx = perm[(mb * accumulation + acc) * micro : (mb * accumulation + acc + 1) * micro]
                mask, mb_advantages, query_responses = data.mask[idx], advantages[idx], data.query_responses[idx]
                with torch.autocast(advantages.device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    new_logprobs, entropies = lm_response_logprobs(policy, query_responses, pad_id, ctx, args.temperature)
                    new_values = token_scores(value_model, query_responses, pad_id)[:, ctx - 1 : -1] if critic else None
                logratio = new_logprobs - data.logprobs[idx]
                guard.check_on_policy(logratio, mask, first=epoch == mb == acc == 0)  # the sampling policy is the trained one
                ratio = torch.exp(logratio)
                pg_losses = policy_loss(ratio, mb_advantages, args.clip_coef)
                pg_loss = masked_mean(pg_losses, mask)
                if critic:
                    v_losses = value_loss(new_values, data.values[idx], returns[idx], args.vf_clip_coef if args.clip_vloss else None)
                    v_loss = masked_mean(v_losses, mask)
                loss = (pg_loss + args.vf_coef * v_loss if critic else pg_loss) / accumulation
                loss.backward()
                minibatch_loss = minibatch_loss + loss.detach()
                with torch.no_grad():  # one line per statistic, under its logged name
                    stats["policy/approxkl_avg"].append(masked_mean((ratio - 1) - logratio, mask))  # k3, as CleanRL
                    stats["policy/clipfrac_avg"].append(masked_mean((pg_losses > -mb_advantages * ratio).float(), mask))
                    stats["loss/policy_avg"].append(pg_loss.detach())
                    if critic:  # without a value model (--baseline group) no value statistics are logged
                        stats["loss/value_avg"].append(v_loss.detach())
                        stats["val/clipfrac_avg"].append(masked_mean((v_losses > 0.5 * (new_values - returns[idx]) ** 2).float(), mask))
                    stats["policy/entropy_avg"].append(masked_mean(entropies, mask))
                    stats["val/ratio"].append(masked_mean(ratio, mask))
            average_gradients(trained)  # every process steps with the mean gradient  # optional: torchrun
            grad_norm = nn.utils.clip_grad_norm_(trained, args.max_grad_norm)  # under --fsdp the norm over every shard
            if guard.skip_step(minibatch_loss, grad_norm, optimizer, epoch, mb):
                continue
            optimizer.step()
            guard.check_weights(trained, epoch, mb)
        if args.target_kl is not None and last_epoch_mean(stats["policy/approxkl_avg"], args) > args.target_kl:
            break  # the remaining epochs are skipped, as CleanRL does
    ratios = torch.stack(stats["val/ratio"])
    return {name: torch.stack(values).mean() for name, values in stats.items()} | {
        "val/ratio_var": ratios.var() if ratios.numel() > 1 else ratios.new_zeros(()),
        "loss/skipped_steps": guard.take_skipped(ratios.device),
    }


@dataclass
class LoopState:
    """What one iteration hands to the next and a checkpoint saves, besides weights, optimizer and RNG states."""

    iteration: int = 0  # the last iteration finished
    episode: int = 0  # completions generated so far, summed over processes
    kl_coef: float = 0.0


def train(args: Args) -> None:
    args, ckpt, distributed, rank, world_size = with_defaults(args), None, False, 0, 1  # a new run in one process
    ckpt, args = load_resume(args)  # optional: resume
    device, device_reason = pick_device(args.device)
    distributed, rank, world_size = init_distributed(device)  # optional: torchrun
    local_batch_size, batch_size, num_iterations = check_args(args, world_size, ckpt, device)
    configure_torch(args)
    task = load_task(args, rank, distributed)  # the built-in task is built once, by rank 0, into its cache
    policy, ref_policy, reward, value_model = load_models(task, args, device)
    gen_config = sampling_config(args.response_length, args.temperature, task.eos_ids, task.pad_id, policy.get_input_embeddings().num_embeddings)
    gen_config.output_logits = not large_logits(args.local_rollout_forward_batch_size * args.response_length, vocab_rows(policy))  # optional: fast-path
    # One optimizer over policy and value model: one loss, one clip of the global gradient norm.
    trained = [p for m in (policy, value_model) if m is not None for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=args.adam_eps, fused=device.type in ("cpu", "cuda"))
    # Seeded after the built-in task (which seeds itself), so a cached and a freshly built task give the same run.
    state = LoopState(kl_coef=args.kl_coef)
    seed_everything(args.seed + rank)
    if ckpt is not None:  # its first line names the checkpoint  # optional: resume
        state = restore(ckpt, rank, device, policy, value_model, optimizer)
    run = Run(args, ckpt, task, rank)
    describe(run, args, task, f"{device} ({device_reason}), {torch.get_num_threads()} torch thread(s)", world_size, num_iterations, batch_size, gen_config, trained)
    describe_memory(run, trained, policy, ref_policy, reward.model, value_model)
    guard = NonFiniteGuard(run, state)  # non-finite scores, losses, gradients or weights: skip the step or stop
    stop_requested = install_stop_handlers()
    crash = CrashCheckpoint(run, args, policy, value_model, optimizer, device)  # an exception: the last iteration kept
    try:
        if ckpt is None:  # the SFT policy's scores: the baseline the run must beat  # optional: evaluation
            run.log_evaluation(0, num_iterations, 0, {}, *evaluate(policy, reward, task, gen_config, args, episode=0))

        start_time, start_episode = time.time(), state.episode
        for iteration in range(state.iteration + 1, num_iterations + 1):
            # 1. Learning rate annealed linearly (iteration i of N at lr * (N - i + 1) / N).
            lr = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations if args.anneal_lr else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 2. Rollout: this process's share of the iteration's prompts, answered by the policy and scored; under
            # --baseline group each prompt k times in a row, so that its k responses are one group.
            k = args.group_size if args.baseline == "group" else 1
            prompts = iteration_prompts(len(task.train_queries), iteration, batch_size // k, local_batch_size // k, rank, args.seed)
            prompts = [i for i in prompts for _ in range(k)]
            queries = left_pad([task.train_queries[i] for i in prompts], task.pad_id, device)
            records = [task.train_records[i] for i in prompts]
            data = rollout(policy, ref_policy, reward, value_model, queries, records, gen_config, task, args)
            guard.check_scores(data.scores)
            state.episode += batch_size

            # 3. Rewards: a per-token KL penalty plus the score at the last real token; GAE over tokens, or (--baseline
            # group, as TRL's RLOO) each response's summed rewards (score - kl_coef * KL) against its group's.
            rewards, kl, non_score_reward = shape_rewards(data.logprobs, data.ref_logprobs, data.scores, data.mask, state.kl_coef, args.kl_estimator)
            if args.whiten_rewards:
                rewards = whiten(rewards, data.mask, shift_mean=False)
            if args.baseline == "gae":
                advantages, returns = compute_gae(rewards, data.values, data.mask, args.gamma, args.gae_lambda)
            else:  # the response's advantage on each of its tokens
                advantages, returns = torch.where(data.mask, group_advantages(rewards.sum(1), k, args.scale_group_std)[:, None], 0.0), None

            # 4. PPO update of the policy and the value model (if any).
            update_stats = ppo_update(args, policy, value_model, optimizer, trained, data, advantages, returns, task.pad_id, guard)

            # 5. Log; adapt the KL coefficient; evaluate; checkpoint; stop after SIGINT/SIGTERM.
            eps = (state.episode - start_episode) / (time.time() - start_time)
            metrics = batch_metrics(data, kl, non_score_reward, update_stats, task.eos_ids)
            metrics |= {"objective/kl_coef": state.kl_coef, "lr": lr, "eps": eps}
            run.log(state.episode, metrics)
            if args.adaptive_kl:
                state.kl_coef = adaptive_kl_coef(state.kl_coef, metrics["objective/kl"], args.adaptive_kl_target, args.kl_horizon, batch_size)
            state.iteration = iteration
            crash.snapshot(state)
            if iteration % args.eval_every == 0 or iteration == num_iterations:  # optional: evaluation
                run.log_evaluation(iteration, num_iterations, state.episode, metrics, *evaluate(policy, reward, task, gen_config, args, state.episode))
            stop = stop_requested()
            if stop or iteration == num_iterations or (args.save_every and iteration % args.save_every == 0):
                save_checkpoint(run, state, args, policy, value_model, optimizer, device)
            if stop and iteration < num_iterations:  # stopped in the last iteration, the run ends as usual
                exit_interrupted(run, state, distributed)
    except Exception as e:  # raised by user code (a reward function or model), out of memory, ...
        crash.stop(e)

    policy = unsharded_policy(policy, task) if args.fsdp else policy  # gathered on rank 0 only  # optional: fsdp
    if rank == 0:
        save_policy(run, policy, task)
    run.finish()
    leave_process_group(distributed)  # optional: torchrun


# Infrastructure: nothing below changes what PPO computes but what the calls above name: load_task (the pad token, the EOS
# ids, the prompts' text), load_config (dropout rates 0 in the configs), retokenized_scores and call_reward_function (the
# reward). The fast path computes the same log-probs by another route. Delete a section headed `# --- optional: NAME ---`
# and each line marked `# optional: NAME` (fsdp with torchrun): the copy runs.


# --- Run folder and logging ---
class Run:
    """The run's folder, written by rank 0 (args.json, metrics.jsonl, checkpoint.pt; wandb with --track), made at the
    first record; a resumed run continues in its checkpoint's folder, metrics.jsonl cut back to the checkpoint."""

    def __init__(self, args: Args, ckpt: Optional[dict], task: Task, rank: int):
        self.rank0, self.metrics, self.wandb = rank == 0, None, None
        self.args, self.builtin = args, task.builtin
        # Every process must agree on the name: rank 0's clock decides.
        self.name, self.wandb_id, self.metrics_offset = broadcast_object(f"{task.name}__{args.exp_name}__{args.seed}__{int(time.time())}"), None, None
        self.dir = os.path.join(args.runs_dir, self.name)
        if ckpt is not None:  # optional: resume
            self.name, self.wandb_id, self.metrics_offset = ckpt["run_name"], ckpt["wandb_id"], ckpt["metrics_offset"]
            self.dir = os.path.dirname(os.path.abspath(args.resume))

    def open(self) -> None:
        """Make the folder, write args.json, open metrics.jsonl and wandb (rank 0, once)."""
        if not self.rank0 or self.metrics is not None:
            return
        args = self.args
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
        metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if self.metrics_offset is not None and os.path.exists(metrics_path):  # optional: resume
            with open(metrics_path, "r+") as f:  # lines logged after the checkpoint will be logged again
                f.truncate(self.metrics_offset)
        self.metrics = open(metrics_path, "a")
        if args.track:  # optional: wandb
            import wandb

            config = asdict(args) | ({"builtin_task": self.builtin} if self.builtin is not None else {})
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=self.name, id=self.wandb_id, config=config, resume="allow", dir=self.dir)
            self.wandb.define_metric("*", step_metric="episode")
            self.wandb_id = self.wandb.id

    def log(self, episode: int, metrics: dict) -> None:
        if not self.rank0:
            return
        self.open()
        record = {"episode": episode, **metrics}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:  # optional: wandb
            self.wandb.log(record)

    def log_evaluation(self, iteration: int, num_iterations: int, episode: int, last: dict, metrics: dict, rows: list) -> None:
        """Log an evaluation, send its sample table to wandb, and print the progress line (`last`: training metrics)."""
        if not self.rank0:
            return
        self.log(episode, metrics)
        if self.wandb is not None:  # optional: wandb
            import wandb

            columns = ["episode", "query", "response", "score"] + (["gold_score"] if len(rows[0]) > 4 else [])
            self.wandb.log({"episode": episode, "samples": wandb.Table(columns=columns, data=rows)})
        line = [f"iteration {iteration}/{num_iterations}", f"episode {episode:,}"]
        line += [f"eps {last['eps']:,.1f}"] if "eps" in last else []
        line += [f"{k.split('/')[-1]} {last[k]:.3f}" for k in ("objective/scores", "objective/kl", "objective/kl_coef") if k in last]
        line += [f"{'eval_scores' if k == 'eval/scores' else k.split('/')[-1]} {v:.3f}" for k, v in metrics.items()]
        print(" | ".join(line + [f"{rows[0][1][-60:]!r} -> {rows[0][2][:60]!r}"]), flush=True)

    def finish(self) -> None:
        if self.wandb is not None:  # optional: wandb
            self.wandb.finish()
        if self.metrics is not None:
            self.metrics.close()


def describe(run: Run, args: Args, task: Task, device: str, world_size: int, num_iterations: int, batch_size: int, gen_config: GenerationConfig, trained: list[Tensor]) -> None:
    """The batch arithmetic, the reward and the value model, printed by rank 0 at the start."""
    if not run.rank0:
        return
    baseline = "GAE with a value model" if args.baseline == "gae" else f"group: {args.group_size} responses per prompt, RLOO{', scaled by the group std' if args.scale_group_std else ''}"
    print(
        f"run {run.name} ({defaults_in_use(args)}; baseline {baseline}): {batch_size} episodes per iteration = {args.per_device_train_batch_size} (micro-batch) x "
        f"{args.gradient_accumulation_steps} (gradient accumulation) x {args.num_minibatches} (minibatches) x {world_size} "
        f"(processes); {num_iterations} iterations = {num_iterations * batch_size} episodes; {args.update_epochs} PPO epochs; "
        f"no-grad passes in chunks of {args.local_rollout_forward_batch_size}; device {device}"
    )
    reads = "the policy's tokens" if task.reward_tokenizer is None else "the decoded text in its own tokens"
    rewards = [f"reward model {task.reward_path} (reads {reads})"] if task.reward_path else []
    rewards += [f"{f.name} x {f.weight:g}" for f in task.reward_functions]
    values = {
        "--value-model-path": task.value_source[0], "--reward-model-path": "a copy of the reward model",
        "--model-name-or-path": "the policy's weights with a new scalar head",
        "--value-head-on-policy": "a scalar head on the policy's own backbone (one trunk for both losses)",
        "--baseline group": "none (--baseline group)",
    }  # fmt: skip
    print(f"reward: {' + '.join(rewards)}; value model: {values[task.value_source[2]]}")
    for line in task.lines:
        print(line)
    if args.lora_r:
        targets = " ".join(args.lora_target_modules) if args.lora_target_modules else "peft's default modules"
        print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {targets}: {sum(p.numel() for p in trained):,} parameters train (adapters of policy{' and value model, value head' if args.baseline == 'gae' else ''})")
    if not gen_config.output_logits:  # optional: fast-path
        print("note: a large vocabulary: sampling keeps no logits (the rollout's log-probs come from a forward pass), and log-probs and entropies are computed from the hidden states a chunk of positions at a time")
    if num_iterations * batch_size != args.total_episodes:
        print(f"note: --total-episodes {args.total_episodes} is not a whole number of iterations; training {num_iterations * batch_size} episodes")
    for line in kl_flag_notes(args):
        print(line)
    unused = [flag_name(f.name) for f in fields(Args) if f.name in ("gamma", "gae_lambda", "vf_coef", "clip_vloss", "vf_clip_coef") and getattr(args, f.name) != f.default]
    if unused and args.baseline == "group":
        print(f"note: {' and '.join(unused)} change nothing under --baseline group (no value model, no GAE)")
    if (b := task.builtin) is not None:
        print(f"built-in task: reward model held-out accuracy {b['rm_accuracy']:.3f}, SFT gold score {b['sft_gold_mean']:.3f} +- {b['sft_gold_std']:.3f}")


def describe_memory(run: Run, trained: list[Tensor], *models: Optional[nn.Module]) -> None:
    """The bytes this process holds of the models' parameters, gradients and Adam state (two moments per trained value)"""
    if not run.rank0:
        return
    local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
    params = {id(p): p for m in models if m is not None for p in m.parameters()}.values()
    param_bytes = sum(local(p).numel() * p.element_size() for p in params)
    grad_bytes = sum(local(p).numel() * p.element_size() for p in trained)
    line = f"memory per process: parameters {size(param_bytes)}, gradients {size(grad_bytes)}, Adam state {size(2 * grad_bytes)}"
    if run.args.fsdp:  # optional: fsdp
        policy_bytes = sum(p.numel() * (2 if run.args.bf16 else p.element_size()) for p in models[0].parameters())
        line += f" (rank 0's shards, FSDP over {dist.get_world_size()} processes; plus the whole policy, {size(policy_bytes)}, while sampling a chunk)"
    print(line)


def size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


@torch.no_grad()
def batch_metrics(data: Rollout, kl: Tensor, non_score_reward: Tensor, update_stats: dict, eos_ids: list[int]) -> dict[str, float]:
    """The iteration's statistics under TRL's names, averaged over processes (val/num_eos_tokens: summed)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local = {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (-data.logprobs).sum(1).mean(),
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/scores": data.scores.mean(),
        **update_stats,
        "val/num_eos_tokens": is_eos(data.responses, eos_ids).sum().float() * world_size,
        "objective/response_length": data.mask.sum(1).float().mean(),
        "objective/eos_fraction": is_eos(data.responses, eos_ids).any(1).float().mean(),
    }
    metrics = dict(zip(local, all_reduce_mean(torch.stack(list(local.values()))).tolist()))
    metrics["objective/rlhf_reward"] = metrics["objective/scores"] + metrics["objective/non_score_reward"]
    return metrics


def save_policy(run: Run, policy: nn.Module, task: Task) -> None:
    """The trained policy as a Hugging Face model (from_pretrained loads it without peft) with the checkpoint's own
    generation_config and tokenizer, plus the run's [PAD] if it had no pad token, and a row for it beyond the embedding
    (resize_token_embeddings' mean of the others). Under LoRA also the adapter alone (with the embedding if resized)."""
    tokenizer, files = AutoTokenizer.from_pretrained(task.policy_path), "policy/"
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": task.tokenizer.pad_token})
    if tokenizer.pad_token_id >= policy.get_input_embeddings().num_embeddings:
        policy.resize_token_embeddings(len(tokenizer))
    (policy.get_base_model() if is_lora(policy) else policy).generation_config = task.generation_config
    if is_lora(policy):
        for save in (policy, tokenizer, task.generation_config):
            save.save_pretrained(os.path.join(run.dir, "adapter"))
        policy, files = policy.merge_and_unload(), "policy/, adapter/"  # the run is over: merged in place
    policy.save_pretrained(os.path.join(run.dir, "policy"))
    tokenizer.save_pretrained(os.path.join(run.dir, "policy"))
    print(f"done: {run.dir} (metrics.jsonl, args.json, checkpoint.pt, {files})")


# --- Checkpoints ---
# Everything but "resume_state" loads with weights_only=True; "resume_state" is the pickled list of each process's RNG
# states, unpickled by --resume only.
def rng_state(device: torch.device) -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(run: Run, state: LoopState, args: Args, policy: nn.Module, value_model: Optional[nn.Module], optimizer, device: torch.device) -> None:
    """Every process hands in its RNG states; rank 0 writes checkpoint.pt."""
    header = checkpoint_header(run, state, args, device)
    if args.fsdp:  # the weights and Adam's state in every process's shards  # optional: fsdp
        return save_sharded_checkpoint(run, state, header, policy, value_model, optimizer)
    if run.rank0:
        write_checkpoint(run, header, whole_weights(policy, value_model, optimizer))


def checkpoint_header(run: Run, state: LoopState, args: Args, device: torch.device) -> dict:
    """What checkpoint.pt holds besides the weights and Adam's state: flags, loop state, every process's RNG
    states, rank 0's metrics length and wandb id. A collective; every process gets it whole."""
    if run.rank0:
        run.open()
    ranks = gather_objects((rng_state(device), run.metrics.tell() if run.rank0 else None, run.wandb_id))
    resume_state = pickle.dumps([rng for rng, _, _ in ranks])
    return dict(args=asdict(args), run_name=run.name, **asdict(state), wandb_id=ranks[0][2], metrics_offset=ranks[0][1], resume_state=resume_state)


def whole_weights(policy: nn.Module, value_model: Optional[nn.Module], optimizer) -> dict:
    return dict(policy=trained_weights(policy), value_model=None if value_model is None else trained_weights(value_model), optimizer=optimizer.state_dict())


def write_checkpoint(run: Run, header: dict, weights: dict) -> str:
    """checkpoint.pt (returns its path): the header with the weights and Adam's state (under --fsdp None: in the
    shards), written atomically (a tmp file, fsync'd, then renamed); one holding a non-finite value is refused."""
    nonfinite = nonfinite_tensor(weights)
    if nonfinite is not None:
        stop_nonfinite(run, f"{nonfinite} in the checkpoint", header["iteration"], "(checkpoint refused)")
    path = os.path.join(run.dir, "checkpoint.pt")
    tmp = f"{path}.tmp" if run.rank0 else f"{path}.tmp{os.getpid()}"  # after a crash any process may write it
    with open(tmp, "wb") as f:  # flushed to the disk before the rename: a crash leaves the old one whole
        torch.save(header | weights, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def nonfinite_tensor(tree, name: str = "") -> Optional[str]:
    """The name of the first floating tensor in `tree` (nested dicts and lists) holding a non-finite value; min and max
    propagate NaN and inf without the temporaries of torch.isfinite(tensor), 1.75x the tensor's bytes."""
    if isinstance(tree, DTensor):  # this process's shard  # optional: fsdp
        tree = tree.to_local()
    if isinstance(tree, Tensor):
        return name if tree.is_floating_point() and tree.numel() and not torch.stack(torch.aminmax(tree)).isfinite().all() else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = nonfinite_tensor(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def trained_weights(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint keeps of a model: every weight, or under LoRA what trains (the rest reloads from its path)."""
    if not has_adapters(model):
        return model.state_dict()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- optional: resume ---
CHECKPOINT_KEYS = {"args", "run_name", "wandb_id", "metrics_offset", "policy", "value_model", "optimizer", "resume_state"}
CHECKPOINT_KEYS |= {f.name for f in fields(LoopState)}  # iteration, episode, kl_coef


def load_resume(args: Args) -> tuple[Optional[dict], Args]:
    """--resume: the checkpoint, and its run's settings with this command's --device, --num-threads, --save-every, --track."""
    if args.resume is None:
        return None, args
    if not os.path.isfile(args.resume):
        fail(f"--resume: {args.resume} does not exist; pass a checkpoint.pt written by an earlier run")
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        ranks = pickle.loads(ckpt["resume_state"])
        keep = {"device", "num_threads", "resume", "save_every", "track"}
        resumed = Args(**{**ckpt["args"], **{k: v for k, v in asdict(args).items() if k in keep}})
        if not CHECKPOINT_KEYS <= set(ckpt) or set(ckpt["args"]) != {f.name for f in fields(Args)}:
            raise KeyError("the keys or flags of another version")  # e.g. --target-kl, which once meant another thing
    except Exception as e:  # not a checkpoint, or one written by another version of this script
        fail(f"--resume: {args.resume} is not a checkpoint of this version of ppo_rlhf.py ({type(e).__name__}); start anew")
    return ckpt | {"resume_state": ranks, "folder": os.path.dirname(os.path.abspath(args.resume))}, resumed


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_trained_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    if not has_adapters(model):
        model.load_state_dict(weights)
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or trainable & set(missing):
        raise KeyError("the checkpoint's LoRA weights do not fit")


def load_weights(ckpt: dict, policy: nn.Module, value_model: Optional[nn.Module], optimizer) -> None:
    if ckpt["args"]["fsdp"]:  # optional: fsdp
        return load_shards(os.path.join(ckpt["folder"], shards_name(ckpt["iteration"])), policy, value_model, optimizer)
    load_trained_weights(policy, ckpt["policy"])
    if value_model is not None:  # --baseline group: none
        load_trained_weights(value_model, ckpt["value_model"])
    optimizer.load_state_dict(ckpt["optimizer"])


def restore(ckpt: dict, rank: int, device: torch.device, policy: nn.Module, value_model: nn.Module, optimizer) -> LoopState:
    """Weights, optimizer and this process's RNG states from a checkpoint; returns the loop's state."""
    try:
        load_weights(ckpt, policy, value_model, optimizer)
    except (RuntimeError, ValueError, KeyError):
        fail("--resume: the model or optimizer state in the checkpoint does not fit these models; start a new run")
    set_rng_state(ckpt["resume_state"][rank], device)
    if rank == 0:
        print(f"resumed from {ckpt['folder']}/checkpoint.pt at iteration {ckpt['iteration']}, episode {ckpt['episode']:,}", flush=True)
    return LoopState(**{f.name: ckpt[f.name] for f in fields(LoopState)})


# --- Non-finite values ---
# A step skipped (loss/skipped_steps); MAX_SKIPPED_STEPS in a row, a non-finite weight or score stop the run with one
# line; no checkpoint is written after it.
MAX_SKIPPED_STEPS = 10
ON_POLICY_ATOL = 1e-3  # max |log-ratio| of an update's first micro-batch before any step (float32: 1.6e-6 measured)
ON_POLICY_ATOL_BF16 = 0.25  # --bf16 (0.03 measured under CPU autocast; dropout moves log-probs by O(1)); see the README


def stop_nonfinite(run: Optional[Run], what: str, iteration: int, where: str) -> NoReturn:
    """The run's end after a non-finite value: one line on stderr (rank 0), exit status 1, the last good checkpoint kept."""
    path = None if run is None else os.path.join(run.dir, "checkpoint.pt")
    kept = path if path is not None and os.path.exists(path) else "none written"
    if run is None or run.rank0:
        print(f"error: non-finite {what} at iteration {iteration} {where}; stopped, last good checkpoint kept: {kept}", file=sys.stderr, flush=True)
    if run is not None:
        run.finish()
    sys.exit(1)


class NonFiniteGuard:
    """The checks of one run (each all-reduced: every process decides alike) and the on-policy check of each update."""

    def __init__(self, run: Optional[Run] = None, state: Optional[LoopState] = None):
        self.run, self.state, self.consecutive, self.skipped = run, state or LoopState(), 0, 0
        self.on_policy_atol = ON_POLICY_ATOL_BF16 if run is not None and run.args.bf16 else ON_POLICY_ATOL
        self.noted_off_policy = False

    def check_on_policy(self, logratio: Tensor, mask: Tensor, first: bool) -> None:
        """At an update's first micro-batch, before any step: one note the first time max |log-ratio| passes the tolerance."""
        if not first:
            return
        largest = torch.where(mask, logratio.detach().abs(), 0.0).max()
        if dist.is_initialized():
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        if self.noted_off_policy or not largest.item() > self.on_policy_atol:
            return
        self.noted_off_policy = True
        if self.run is None or self.run.rank0:
            print(
                f"note: on-policy check: max |log-ratio| {largest.item():.3g} at the first micro-batch of iteration "
                f"{self.state.iteration + 1}, above {self.on_policy_atol:g}: the update's forward does not reproduce the "
                "log-probs the batch was sampled with (dropout? a model whose outputs depend on the batch?); training goes on",
                flush=True,
            )

    def take_skipped(self, device: torch.device) -> Tensor:
        """The steps skipped since the last call (loss/skipped_steps of an update), on the statistics' device."""
        skipped, self.skipped = self.skipped, 0
        return torch.tensor(float(skipped), device=device)

    def stop(self, what: str, where: str) -> NoReturn:
        stop_nonfinite(self.run, what, self.state.iteration + 1, where)  # state.iteration: the last one finished

    def skip_step(self, loss: Tensor, grad_norm: Tensor, optimizer: torch.optim.Optimizer, epoch: int, mb: int) -> bool:
        """Whether this minibatch's step is skipped (its gradients zeroed); the MAX_SKIPPED_STEPS-th skip in a row stops the run."""
        if isinstance(grad_norm, DTensor):  # --fsdp: the norm of every shard  # optional: fsdp
            grad_norm = grad_norm.full_tensor()
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)]).float()
        bad = all_reduce_mean(bad).tolist()
        if not any(bad):
            self.consecutive = 0
            return False
        optimizer.zero_grad()
        self.consecutive, self.skipped = self.consecutive + 1, self.skipped + 1
        if self.consecutive >= MAX_SKIPPED_STEPS:
            what = "loss" if bad[0] else "gradient norm"
            self.stop(f"{what} in {MAX_SKIPPED_STEPS} steps in a row", f"(epoch {epoch + 1}, minibatch {mb + 1})")
        return True

    def check_weights(self, params: list[Tensor], epoch: int, mb: int) -> None:
        """Every process's parameters (under --fsdp its shards): the same answer on every process."""
        if all_reduce_mean(torch.tensor(float(nonfinite_tensor(params) is not None))).item():
            self.stop("weight after an optimizer step", f"(epoch {epoch + 1}, minibatch {mb + 1})")

    def check_scores(self, scores: Tensor) -> None:
        """Reward functions are checked where they are called; a reward model's score is checked here."""
        if all_reduce_mean((~torch.isfinite(scores)).any().float()).item():
            self.stop("reward-model score", "(rollout, before the update)")


def last_epoch_mean(values: list[Tensor], args: Args) -> float:
    """The mean of the last epoch's per-micro-batch values, averaged over processes (all stop at the same epoch)."""
    per_epoch = args.num_minibatches * args.gradient_accumulation_steps
    return all_reduce_mean(torch.stack(values[-per_epoch:]).mean()).item()


# --- Signals and crashes ---
# SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends) finish the iteration, write a checkpoint and exit 130. An
# exception (a reward function's or model's, out of memory, any other) ends the run with the checkpoint of the last
# completed iteration, named in its last line: exit status 2 for a reward function, 1 after a traceback.
def install_stop_handlers() -> Callable[[], bool]:
    """Returns stop_requested(), true on every process once any was asked to stop (a collective); a second Ctrl-C stops at once."""
    requested = False

    def request_stop(signum, frame):
        nonlocal requested
        requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def stop_requested() -> bool:
        if not dist.is_initialized():
            return requested
        flag = torch.tensor(float(requested))  # on the CPU: the gloo half of the process group
        dist.all_reduce(flag)
        return bool(flag.item())

    return stop_requested


def exit_interrupted(run: Run, state: LoopState, distributed: bool) -> NoReturn:
    path = os.path.join(run.dir, "checkpoint.pt")
    if run.rank0:
        print(f"interrupted: checkpoint at episode {state.episode:,} in {path}; continue with --resume {path}", flush=True)
    run.finish()
    leave_process_group(distributed)  # optional: torchrun
    sys.exit(130)


class RewardFunctionError(Exception):
    """A reward function raised or returned something other than a finite score per completion."""


class CrashCheckpoint:
    """After each completed iteration, its checkpoint's header and Adam's step count (weights and Adam state do not change until
    the next step): stop(e) writes that checkpoint with the weights as they are, then ends the run with one line naming it."""

    def __init__(self, run: Run, args: Args, policy: nn.Module, value_model: Optional[nn.Module], optimizer, device: torch.device):
        self.run, self.args, self.models, self.optimizer, self.device = run, args, (policy, value_model), optimizer, device
        self.header, self.steps = None, 0

    def snapshot(self, state: LoopState) -> None:
        self.header, self.steps = checkpoint_header(self.run, state, self.args, self.device), adam_steps(self.optimizer)

    def stop(self, e: Exception) -> NoReturn:
        path, why = os.path.join(self.run.dir, "checkpoint.pt"), "no iteration completed" if self.header is None else None
        if self.args.fsdp:  # the shards would need every process  # optional: fsdp
            why = why or "--fsdp writes no checkpoint after an error"
        if why:
            kept = f"{why}; the last checkpoint: {path}" if os.path.exists(path) else f"{why}; no checkpoint"
        else:
            self.header["metrics_offset"] = self.run.metrics.tell() if self.run.rank0 else self.header["metrics_offset"]
            write_checkpoint(self.run, self.header, whole_weights(*self.models, self.optimizer))
            steps = adam_steps(self.optimizer) - self.steps
            how = "exactly" if not steps else f"(not exactly: its weights hold the {steps} optimizer steps taken since; the next iteration is redone)"
            kept = f"checkpoint of iteration {self.header['iteration']} written; --resume {path} continues {how}"
        self.run.finish()
        if isinstance(e, RewardFunctionError):
            fail(f"{e}; {kept}")
        traceback.print_exc()
        hint = " (lower --local-rollout-forward-batch-size or --per-device-train-batch-size)" if isinstance(e, torch.OutOfMemoryError) else ""
        where = f" on process {dist.get_rank()}" if dist.is_initialized() else ""
        print(f"error: {exception_line(e)}{where}{hint}; {kept}", file=sys.stderr, flush=True)
        sys.exit(1)


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)  # each tensor's count


# --- Device, threads and collectives ---
# The collectives do nothing in one process; under torchrun rank 0 logs, saves and evaluates.
def pick_device(name: str) -> tuple[torch.device, str]:
    """The torch device and why: `auto` takes a GPU (cuda, then mps) if any; under torchrun `cuda` is the local rank's GPU."""
    reason = f"--device {name}"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        reason = "auto: no GPU" if name == "cpu" else "auto: language models gain from a GPU"
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


def set_num_threads(num_threads: int, small_network: bool) -> None:
    """--num-threads, or when 0: one thread for a small network (more stall beside a busy core), else torch's default."""
    if num_threads or small_network:
        torch.set_num_threads(num_threads or 1)


def place_model(device: torch.device, model: Optional[nn.Module]) -> Optional[nn.Module]:
    return model if model is None else model.to(device)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Average x over processes, in place (nothing to do in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


# --- optional: torchrun ---
# One process per device. On cuda the process group serves both devices (nccl for cuda tensors, gloo for CPU tensors
# and objects).
def init_distributed(device: torch.device) -> tuple[bool, int, int]:
    """Returns (distributed, rank, world_size), joining torchrun's process group if any (even one process's: --fsdp)."""
    if "WORLD_SIZE" not in os.environ:
        return False, 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return True, dist.get_rank(), dist.get_world_size()


def average_gradients(params: list[Tensor]) -> None:
    """Each gradient replaced by its mean over the processes, in one all-reduce (a missing one counts as 0, as in DDP).
    Under --fsdp FSDP has averaged them (reduce-scatter)."""
    if not dist.is_initialized() or isinstance(params[0], DTensor):
        return
    grads = all_reduce_mean(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
    for p, grad in zip(params, grads.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)


def leave_process_group(distributed: bool) -> None:
    if distributed:
        dist.barrier()  # a process that leaves while rank 0 still evaluates can abort the others
        dist.destroy_process_group()
        # gloo's threads release the last collectives' tensors later, taking the GIL: a shutting-down interpreter aborts
        time.sleep(0.1)


# --- optional: fsdp ---
# FSDP2's fully_shard, each decoder layer a unit and the parameters outside them one more, entered through each of its
# modules (code that calls a backbone and a head apart gathers them as the model's forward does); checkpoints through
# torch.distributed.checkpoint, each process its own shards, checkpoint.pt the rest.
def load_model_to_shard(cls, path: str, config, flag: str, dtype="float32") -> nn.Module:
    """load_model on rank 0 only; the other processes build the model on the meta device, in rank 0's dtype, and
    shard_model fills their shards."""
    if dist.get_rank() == 0:
        model = load_model(cls, path, config, flag, dtype)
        broadcast_object(model.dtype)
        return model
    with torch.device("meta"):
        return cls.from_config(config, dtype=broadcast_object(None))


def shard_model(args: Args, device: torch.device, model: Optional[nn.Module]) -> Optional[nn.Module]:
    """fully_shard the model (--bf16: parameters gathered in bfloat16, master weights and reduction in float32), then
    fill the other processes' empty shards (built on the meta device) and buffers from rank 0's whole copy. Its
    generate() gathers every unit once for the whole call, not once per token (processes may sample different lengths)."""
    if model is None:
        return None
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed_precision = bf16 if args.bf16 else MixedPrecisionPolicy()
    whole = model.state_dict() if dist.get_rank() == 0 else {}  # detached views: they keep the unsharded values
    head = isinstance(model, PolicyValueHead)  # its backbone is the policy's, sharded with it; token_scores calls the head
    layers = [] if head else decoder_layers(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    rest = [m for m in model.modules() if id(m) not in in_layers and next(m.parameters(recurse=False), None) is not None]
    try:
        for layer in layers:
            fully_shard(layer, mp_policy=mixed_precision)
        if rest:
            fully_shard(rest, mp_policy=mixed_precision)
        if not head:
            fully_shard(model, mp_policy=mixed_precision)
        if dist.get_rank() != 0:
            model.to_empty(device=device)
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        del whole
        if not head:
            with torch.no_grad():  # FSDP takes the first module to run forward as the root: the whole model
                one_token = torch.zeros(1, 1, dtype=torch.long, device=device)
                model(input_ids=one_token, attention_mask=torch.ones_like(one_token), use_cache=False)
        if hasattr(model, "generate"):
            model.generate = gathered(model)(model.generate)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        fail(f"--fsdp: FSDP cannot shard {type(model).__name__} ({exception_line(e)}); drop --fsdp")
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, innermost first: the classes its _no_split_modules names (Qwen2DecoderLayer, ...),
    or without that list (DeBERTa-v2) the blocks of its longest nn.ModuleList of one class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not names:
        lists = [blocks for blocks in model.modules() if isinstance(blocks, nn.ModuleList) and len({type(m) for m in blocks}) == 1]
        names = {type(max(lists, key=len)[0]).__name__} if lists else set()
    layers = [m for m in reversed(list(model.modules())) if type(m).__name__ in names]
    if not layers:
        fail(f"--fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules) and holds no list of blocks to shard it by; drop --fsdp")
    return layers


@contextlib.contextmanager
def gathered(model: nn.Module):
    """The whole model on every process for the block (or the function it decorates), then sharded again."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


SHARDED_STATE = StateDictOptions(ignore_frozen_params=True, strict=False)  # under LoRA the frozen base reloads from its path


def shards_name(iteration: int) -> str:
    return f"checkpoint-{iteration}"


def sharded_state(policy: nn.Module, value_model: nn.Module, optimizer) -> tuple[nn.Module, dict]:
    """Both trained models as one module (the optimizer's state keyed by their names) and this process's shards of both."""
    models = nn.ModuleDict({k: m for k, m in dict(policy=policy, value_model=value_model).items() if m is not None})
    model_state, optimizer_state = get_state_dict(models, optimizer, options=SHARDED_STATE)
    return models, {"model": model_state, "optimizer": optimizer_state}


def save_sharded_checkpoint(run: Run, state: LoopState, header: dict, policy: nn.Module, value_model: nn.Module, optimizer) -> None:
    """Each process writes its shards into checkpoint-{iteration}.tmp/, renamed by rank 0 (whole or not; non-finite
    refused); then rank 0 writes checkpoint.pt, which names them, and removes the older shards."""
    _, shards = sharded_state(policy, value_model, optimizer)
    nonfinite = [name for name in gather_objects(nonfinite_tensor(shards)) if name is not None]
    if nonfinite:
        stop_nonfinite(run, f"{nonfinite[0]} in the checkpoint", state.iteration, "(checkpoint refused)")
    path = os.path.join(run.dir, shards_name(state.iteration))
    dcp.save(shards, checkpoint_id=f"{path}.tmp")  # its files fsync'd before it returns
    dist.barrier()
    if run.rank0:
        shutil.rmtree(path, ignore_errors=True)  # left by a run that stopped before naming it in checkpoint.pt
        os.replace(f"{path}.tmp", path)
        write_checkpoint(run, header, dict(policy=None, value_model=None, optimizer=None))
        remove_old_shards(run.dir, state.iteration)


def remove_old_shards(run_dir: str, iteration: int) -> None:
    for name in os.listdir(run_dir):
        if name.startswith("checkpoint-") and name != shards_name(iteration):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def load_shards(path: str, policy: nn.Module, value_model: nn.Module, optimizer) -> None:
    if not os.path.isdir(path):
        fail(f"--resume: the checkpoint's shards {path} are missing; resume from a run folder copied whole")
    models, shards = sharded_state(policy, value_model, optimizer)
    try:
        dcp.load(shards, checkpoint_id=path)
    except BaseException as e:  # dcp's CheckpointException derives from BaseException
        raise ValueError(str(e)) from None
    set_state_dict(models, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"], options=SHARDED_STATE)


def unsharded_policy(policy: nn.Module, task: Task) -> Optional[nn.Module]:
    """--fsdp, at the end: the policy gathered into an ordinary copy in rank 0's CPU memory (None elsewhere), for save_policy."""
    weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    copy = load_model(AutoModelForCausalLM, task.policy_path, task.policy_config, "--model-name-or-path")
    if is_lora(policy):
        from peft import get_peft_model

        copy = get_peft_model(copy, policy.peft_config["default"])
    copy.load_state_dict(weights)
    return copy


# --- optional: evaluation ---
# Held-out prompts answered greedily (sampled with fixed noise on the built-in task), scored, and a sample table.
def evaluation_prompts(records: list[dict], builtin_path: Optional[str], args: Args, lines: list[str]) -> tuple[list[dict], list[dict], str]:
    """(training, evaluation prompt lines, the flag that gave them): the first --eval-episodes of the built-in task's or of
    --eval-prompts, or without either a split held out of `records` (--prompts)."""
    path, flag = (builtin_path, "--prompts") if builtin_path else (args.eval_prompts, "--eval-prompts")
    if path is not None:
        return records, read_prompts(path, flag)[: args.eval_episodes], flag
    train, evaluation, line = held_out_split(records, args.eval_episodes)
    lines.append(line)
    return train, evaluation, "--prompts"


def held_out_split(records: list[dict], eval_episodes: int) -> tuple[list[dict], list[dict], str]:
    """(training, evaluation prompts, a line saying so): a fixed split, at most --eval-episodes and a fifth held out, in the
    file's order; fewer than 5 prompts are not split (evaluation reuses training prompts)."""
    n_eval = min(eval_episodes, len(records) // 5)
    if n_eval == 0:
        return records, records[:eval_episodes], f"note: --prompts holds {len(records)} prompts, too few to hold out a fifth; evaluation reuses training prompts (give --eval-prompts)"
    held_out = set(np.random.default_rng(0).permutation(len(records))[:n_eval].tolist())
    train = [r for i, r in enumerate(records) if i not in held_out]
    evaluation = [r for i, r in enumerate(records) if i in held_out]
    return train, evaluation, f"evaluation: {n_eval} of the {len(records)} prompts of --prompts held out (a fixed split; --eval-prompts to choose them), training on the other {len(train)}"


@torch.no_grad()
def evaluate(policy: nn.Module, reward: Reward, task: Task, gen_config: GenerationConfig, args: Args, episode: int) -> tuple[dict, list]:
    """Answer the held-out prompts, greedily or (--eval-stochastic, the built-in task) with fixed noise, and score them (with the gold
    reward on the built-in task): metrics and sample rows, on rank 0 (under --fsdp each process answers its chunks)."""
    processes, rank, device = 1, 0, next(policy.parameters()).device
    if args.fsdp:  # a sharded forward needs every process  # optional: fsdp
        processes, rank = dist.get_world_size(), dist.get_rank()
    if processes == 1 and dist.is_initialized() and dist.get_rank() != 0:
        return {}, []
    if not args.eval_stochastic and task.builtin is None:
        gen_config = greedy_config(gen_config)
    pad_id, eos_ids, chunk = task.pad_id, task.eos_ids, args.local_rollout_forward_batch_size
    n_eval = len(task.eval_queries)
    policy.eval()
    chunks = []  # (first prompt, queries, responses, scores)
    fork_rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with fork_rng, torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        torch.manual_seed(args.seed + 10_000 + rank)
        for i in (first + rank * chunk for first in range(0, n_eval, processes * chunk)):  # a chunk per process in turn
            part = slice(i, i + chunk) if i < n_eval else slice(0, 1)  # past the end: a prompt along, its answer dropped
            queries = left_pad(task.eval_queries[part], pad_id, device)
            responses = generate(policy, queries, pad_id, gen_config, args.response_length)[0]
            responses = truncate_after_eos(responses, eos_ids, pad_id)
            scores = score_responses(reward, queries, responses, task.eval_records[part], task)
            scores = apply_missing_eos_penalty(scores, responses, eos_ids, args.missing_eos_penalty)
            if i < n_eval:
                chunks.append((i, [[t for t in q if t != pad_id] for q in queries.tolist()], responses.tolist(), scores))
    if processes > 1:  # rank 0 takes every process's chunks, in the prompts' order
        gathered_chunks = gather_objects([(i, q, r, s.cpu()) for i, q, r, s in chunks])
        chunks = sorted((c for process_chunks in gathered_chunks for c in process_chunks), key=lambda c: c[0])
        if rank != 0:
            return {}, []
    queries_all, responses_all = [q for c in chunks for q in c[1]], [r for c in chunks for r in c[2]]
    scores_all = [c[3] for c in chunks]
    metrics = {"eval/scores": torch.cat(scores_all).mean().item()}
    gold = None
    if task.language is not None:
        n_special = len(BUILTIN_SPECIALS)
        gold = [
            builtin_gold_score(task.language, [t - n_special for t in q], builtin_words(r, eos_ids[0], pad_id))
            for q, r in zip(queries_all, responses_all)
        ]
        metrics["objective/gold_score"] = float(np.mean(gold))
    n = min(8, len(queries_all))
    texts = decode(task.tokenizer, queries_all[:n] + [[t for t in r if t != pad_id] for r in responses_all[:n]])
    rows = [
        [episode, q, r, s.item()] + ([gold[i]] if gold else [])
        for i, (q, r, s) in enumerate(zip(texts[:n], texts[n:], torch.cat(scores_all)[:n]))
    ]
    return metrics, rows


def greedy_config(gen_config: GenerationConfig) -> GenerationConfig:
    """The sampler's settings taking the most likely token (the pad id still suppressed) instead of sampling."""
    greedy = GenerationConfig.from_dict(gen_config.to_dict())
    greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, None, None, None
    greedy.output_logits = False  # evaluation needs no log-probs
    return greedy


# --- Defaults and argument checks ---
# The two default sets: the flags whose defaults differ between the built-in task and TRL 1.12 PPOConfig (which also
# has 4 epochs, kl_coef 0.05 with k1, cliprange 0.2, vf_coef 0.1, cliprange_value 0.2, gamma 1 and lambda 0.95).
# A bad flag is one line naming it, exit status 2, as tyro does for a malformed flag.
BUILTIN_DEFAULTS = dict(learning_rate=3e-4, num_minibatches=4, missing_eos_penalty=1.0, response_length=16, temperature=1.0, adam_eps=1e-5)
TRL_DEFAULTS = dict(learning_rate=3e-6, num_minibatches=1, missing_eos_penalty=0.0, response_length=53, temperature=0.7, adam_eps=1e-8)


def with_defaults(args: Args) -> Args:
    """The flags left unset (None) set from the run's default set."""
    defaults = BUILTIN_DEFAULTS if args.model_name_or_path is None else TRL_DEFAULTS
    return replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


def defaults_in_use(args: Args) -> str:
    """Which default set the unset flags took, with TRL's values in use (never one the run does not use)."""
    if args.model_name_or_path is None:
        return "defaults: the built-in task's"
    in_use = " ".join(f"{flag_name(k)} {v:g}" for k, v in TRL_DEFAULTS.items() if getattr(args, k) == v)
    return "defaults: TRL 1.12 PPOConfig's" + (f", {in_use}" if in_use else "")


def fail(message: str) -> NoReturn:
    """Print a one-line usage error and exit with status 2 (as argparse/tyro do)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def flag_name(field: str) -> str:
    """The command-line flag of an Args field: learning_rate -> --learning-rate."""
    return "--" + field.replace("_", "-")


def kl_flag_notes(args: Args) -> list[str]:
    """One note per KL flag that does not do what its value suggests (--target-kl once named the controller's target)."""
    notes = []
    if args.adaptive_kl and args.target_kl is not None:
        notes.append(f"note: --target-kl {args.target_kl:g} stops the update epochs once an epoch's mean approximate KL passes it; the adaptive controller aims at --adaptive-kl-target {args.adaptive_kl_target:g}")
    unused = [flag_name(f.name) for f in fields(Args) if f.name in ("adaptive_kl_target", "kl_horizon") and getattr(args, f.name) != f.default]
    if unused and not args.adaptive_kl:
        verb = "changes" if len(unused) == 1 else "change"
        notes.append(f"note: {' and '.join(unused)} {verb} nothing without --adaptive-kl (the KL coefficient stays --kl-coef)")
    return notes


def check_args(args: Args, world_size: int, ckpt: Optional[dict], device: torch.device) -> tuple[int, int, int]:
    """Every flag's range, before anything is built. Returns episodes per iteration on this process and on all, and iterations."""
    if ckpt is not None and len(ckpt["resume_state"]) != world_size:  # optional: resume
        fail(f"--resume: {args.resume} was written by {len(ckpt['resume_state'])} processes; resume with as many")
    at_least = dict(
        total_episodes=1, per_device_train_batch_size=1, gradient_accumulation_steps=1, num_minibatches=1,
        update_epochs=1, kl_horizon=1, response_length=1, max_prompt_length=1, local_rollout_forward_batch_size=1,
        seed=0, num_threads=0, save_every=0, lora_r=0, task_seed=0,
        task_vocab_size=7,  # each word has 6 successors other than itself
        task_prompt_length=1, task_sft_sequences=128, task_preference_pairs=20,  # an SFT batch; a held-out tenth
    )  # fmt: skip
    at_least |= dict(eval_every=1, eval_episodes=1)  # optional: evaluation
    for name, low in at_least.items():
        if getattr(args, name) < low:
            fail(f"{flag_name(name)} must be at least {low}, got {getattr(args, name)}")
    if args.seed > 2**31 or args.task_seed > 2**31:
        fail(f"--seed and --task-seed must be below 2**31, got {args.seed} and {args.task_seed}")
    if args.task_prompt_length > 47:  # prompt + 16 response words + EOS in the SFT model's 64 positions
        fail(f"--task-prompt-length must be at most 47, got {args.task_prompt_length}")
    for name in ("learning_rate", "adam_eps", "clip_coef", "vf_clip_coef", "max_grad_norm", "adaptive_kl_target", "temperature", "lora_alpha"):
        if not 0 < getattr(args, name) < math.inf:
            fail(f"{flag_name(name)} must be a positive number, got {getattr(args, name)}")
    if args.target_kl is not None and not 0 < args.target_kl < math.inf:
        fail(f"--target-kl must be a positive number (or left unset), got {args.target_kl}")
    if args.lora_r:
        try:
            import peft  # noqa: F401
        except ImportError:
            fail("--lora-r needs peft (pip install peft); or --lora-r 0 to train every weight")
    elif args.lora_target_modules is not None:
        fail("--lora-target-modules needs --lora-r above 0")
    if args.value_head_on_policy and args.value_model_path is not None:
        fail("--value-head-on-policy and --value-model-path both name the value model; give one of them")
    for name in ("vf_coef", "kl_coef", "missing_eos_penalty"):
        if not 0 <= getattr(args, name) < math.inf:
            fail(f"{flag_name(name)} must be a number >= 0, got {getattr(args, name)}")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"{flag_name(name)} must lie in [0, 1], got {getattr(args, name)}")
    needs_a_model = ["reward_model_path", "value_model_path", "prompts"]
    needs_a_model.append("eval_prompts")  # optional: evaluation
    if args.model_name_or_path is None:
        for name in needs_a_model:
            if getattr(args, name) is not None:
                fail(f"{flag_name(name)} needs --model-name-or-path; leave both out for the built-in task")
    elif args.prompts is None or (args.reward_model_path is None and not args.reward_fn):
        fail("--model-name-or-path needs --prompts and a reward: --reward-model-path and/or --reward-fn")
    elif args.builtin_reward != "model":
        fail(f"--builtin-reward {args.builtin_reward} is for the built-in task; drop it or --model-name-or-path")
    if args.reward_fn_weights is not None and len(args.reward_fn_weights) != len(args.reward_fn):
        fail(f"--reward-fn-weights: {len(args.reward_fn_weights)} weights for {len(args.reward_fn)} --reward-fn; give one per function")
    if args.reward_fn_weights is not None and not all(math.isfinite(w) for w in args.reward_fn_weights):
        fail(f"--reward-fn-weights must be finite numbers, got {' '.join(map(str, args.reward_fn_weights))}")
    if args.bf16 and device.type != "cuda":
        fail("--bf16 needs a CUDA device; drop it on CPU/MPS")
    if args.fsdp and "WORLD_SIZE" not in os.environ:  # optional: fsdp
        fail("--fsdp shards the models over torchrun's processes; start the run with torchrun --nproc_per_node N ppo_rlhf.py --fsdp ..., or drop --fsdp")
    local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_minibatches
    batch_size = local_batch_size * world_size
    if args.baseline == "group" and (args.group_size < 2 or local_batch_size % args.group_size):
        fail(f"--group-size {args.group_size} must be at least 2 and divide the {local_batch_size} episodes of each process per iteration (--per-device-train-batch-size x --gradient-accumulation-steps x --num-minibatches)")
    if args.baseline == "gae" and (args.group_size != Args.group_size or args.scale_group_std):
        fail("--group-size and --scale-group-std are for --baseline group; add it or drop them")
    if args.baseline == "group" and (args.value_model_path or args.value_head_on_policy):
        fail("--baseline group trains no value model; drop --value-model-path and --value-head-on-policy, or use --baseline gae")
    if args.total_episodes < batch_size:
        fail(f"--total-episodes {args.total_episodes} is less than one iteration of {batch_size} episodes; raise it")
    return local_batch_size, batch_size, args.total_episodes // batch_size


def configure_torch(args: Args) -> None:
    # transformers' load reports and progress bars would drown the progress lines
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.backends.cudnn.deterministic = args.torch_deterministic
    set_num_threads(args.num_threads, small_network=args.model_name_or_path is None)


# --- Models and prompts ---
# A mistake in a path, a model or a prompts file is a one-line error.
@dataclass
class Task:
    """What a run trains on: models' paths and configs, tokenizer, prompts as ids and as lines (`records`), reward functions."""

    policy_path: str
    reward_path: Optional[str]  # None: reward functions only
    policy_config: transformers.PretrainedConfig
    reward_config: Optional[transformers.PretrainedConfig]
    reward_tokenizer: Optional[transformers.PreTrainedTokenizerBase]  # the reward model's own, when it reads text
    value_source: tuple  # (path, config, flag) the value model is loaded from
    tokenizer: transformers.PreTrainedTokenizerBase
    pad_id: int
    eos_ids: list[int]  # the tokenizer's EOS first, then the others of the checkpoint's generation_config
    train_queries: list[list[int]]
    eval_queries: list[list[int]]
    train_records: list[dict]
    eval_records: list[dict]
    reward_functions: list[RewardFunction]
    name: str  # the run name's prefix
    builtin: Optional[dict] = None  # the built-in task's description (its task.json)
    language: Optional[dict] = None  # the built-in task's hidden language, for the gold score
    lines: list[str] = field(default_factory=list)  # what the first lines of the run say about the task (notes)
    generation_config: Optional[GenerationConfig] = None  # the checkpoint's, as shipped: the sampler ignores it, policy/ keeps it


def load_task(args: Args, rank: int, distributed: bool) -> Task:
    """The built-in task (rank 0 builds it or finds it in its cache), or the models and prompts given by the flags.
    Reward functions are imported first, so that a mistake in one costs no model loading."""
    reward_functions = load_reward_functions(args.reward_fn, args.reward_fn_weights)
    builtin = language = eval_prompts_path = None
    if args.model_name_or_path is None:
        cache_dir = builtin_cache_dir(args)
        if rank == 0:
            builtin = builtin_task(args, cache_dir)
        if distributed:
            dist.barrier()
        if rank != 0:
            builtin = builtin_task(args, cache_dir)  # built by rank 0: a cache hit
        policy_path, reward_path = os.path.join(cache_dir, "sft"), os.path.join(cache_dir, "reward")
        prompts_path, eval_prompts_path = os.path.join(cache_dir, "prompts.jsonl"), os.path.join(cache_dir, "eval_prompts.jsonl")
        language, name = dict(np.load(os.path.join(cache_dir, "language.npz"))), "builtin"
        if args.builtin_reward == "gold":
            reward_path = None
            reward_functions.append(RewardFunction("--builtin-reward gold", builtin_gold_reward(language), 1.0))
    else:
        policy_path, reward_path = args.model_name_or_path, args.reward_model_path
        prompts_path = args.prompts
        name = os.path.basename(os.path.normpath(args.model_name_or_path))
    policy_config = load_config(policy_path, "--model-name-or-path")
    reward_config = None if reward_path is None else load_config(reward_path, "--reward-model-path", num_labels=1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left", truncation_side="left")
    except (OSError, ValueError) as e:
        fail(f"--model-name-or-path: cannot load a tokenizer from {policy_path} ({str(e).splitlines()[0]})")
    if tokenizer.eos_token_id is None:
        fail(f"--model-name-or-path: the tokenizer of {policy_path} has no EOS token; set one and save it again")
    try:  # the generation_config the checkpoint loads with: its own, or the one transformers makes of its config
        generation_config = GenerationConfig.from_pretrained(policy_path)
    except (OSError, ValueError):
        generation_config = GenerationConfig.from_model_config(policy_config)
    listed = generation_config.eos_token_id if isinstance(generation_config.eos_token_id, list) else [generation_config.eos_token_id]
    eos_ids = list(dict.fromkeys([tokenizer.eos_token_id] + [i for i in listed if i is not None]))
    reward_tokenizer = None if reward_path is None else reward_model_tokenizer(reward_path, reward_config, tokenizer, policy_config)
    if args.baseline == "group":
        value_source = (None, None, "--baseline group")
    elif args.value_head_on_policy:
        value_source = (policy_path, None, "--value-head-on-policy")
    elif args.value_model_path is not None:
        value_source = (args.value_model_path, load_config(args.value_model_path, "--value-model-path", num_labels=1), "--value-model-path")
    elif reward_path is not None and reward_tokenizer is None:
        value_source = (reward_path, reward_config, "--reward-model-path")
    else:  # the value model reads the policy's tokens: a reward model that reads text cannot be it
        value_config = load_config(policy_path, "--model-name-or-path")
        value_config.num_labels = 1
        value_source = (policy_path, value_config, "--model-name-or-path")
    lines = [dtypes_line(policy_config, reward_config, args.baseline == "gae")]
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in eos_ids:
        # Padding must differ from every EOS, or a real EOS would be masked out. The new id may lie outside the
        # embedding table; model_inputs never looks it up, and save_policy adds a row for it.
        kept, row = ("keeps its own", "") if tokenizer.pad_token_id is not None else ("gets it too", ", with an embedding row for it")
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        kept += row if tokenizer.pad_token_id >= getattr(policy_config, "vocab_size", 0) else ""
        lines.append(f"note: the tokenizer of {policy_path} has no pad token apart from EOS: the run pads with an added [PAD] (id {tokenizer.pad_token_id}, never sampled); policy/'s tokenizer {kept}")

    def tokenize(records: list[dict], flag: str) -> list[list[int]]:
        """A chat prompt's text comes from the chat template, special tokens included."""
        texts = [chat_prompt_text(tokenizer, r, flag) if is_chat(r) else r["prompt"] for r in records]
        queries = [
            tokenizer(text, truncation=True, max_length=args.max_prompt_length, add_special_tokens=not is_chat(r))["input_ids"]
            for text, r in zip(texts, records)
        ]
        if min(map(len, queries), default=1) == 0:
            fail(f"{flag}: a prompt tokenises to no tokens; remove empty prompts")
        return queries

    train_records, eval_records, eval_flag = read_prompts(prompts_path, "--prompts"), [], "--prompts"
    train_records, eval_records, eval_flag = evaluation_prompts(train_records, eval_prompts_path, args, lines)  # optional: evaluation
    note = generation_config_note(generation_config, eos_ids, args.temperature)
    lines += [note] if note else []
    if builtin is not None and args.eval_stochastic:  # optional: evaluation
        lines.append("note: --eval-stochastic changes nothing on the built-in task: its evaluation always samples")
    train_queries, eval_queries = tokenize(train_records, "--prompts"), tokenize(eval_records, eval_flag)
    longest = max(len(q) for q in train_queries + eval_queries)
    scorers = [(reward_config, "--reward-model-path")] if reward_tokenizer is None else []
    for config, flag in [(policy_config, "--model-name-or-path"), *scorers, value_source[1:]]:
        size = None if config is None else context_size(config)
        if size is not None and longest + args.response_length > size:
            fail(f"--response-length: {longest} prompt tokens + {args.response_length} response tokens exceed the {size}-token context of {flag}; lower --response-length or --max-prompt-length")
    return Task(
        policy_path, reward_path, policy_config, reward_config, reward_tokenizer, value_source, tokenizer, tokenizer.pad_token_id,
        eos_ids, train_queries, eval_queries, train_records, eval_records, reward_functions, name,
        builtin, language, lines, generation_config,
    )  # fmt: skip


def dtypes_line(policy_config, reward_config, value_model: bool) -> str:
    line = f"weights: policy, reference{' and value model' if value_model else ''} in float32 (the policy saved in {saved_dtype(policy_config)})"
    return line + (f"; reward model in {saved_dtype(reward_config)}, as saved" if reward_config is not None else "")


def check_scorer(task: Task, model: nn.Module, flag: str, policy: nn.Module) -> None:
    """A reward or value model that reads the policy's tokens: a `score` head on a backbone, an embedding row for every token the
    policy can sample. No model (--baseline group's value model): nothing to check."""
    if model is None:
        return
    if not reads_last_token(model):  # a value model reads the policy's tokens: its own tokenizer is no way out
        own = ", or a reward model with a tokenizer of its own" if flag == "--reward-model-path" else ""
        fail(f"{flag}: {type(model).__name__} has no `score` head on a backbone; pass a decoder model for sequence classification{own}")
    rows, policy_rows = model.get_input_embeddings().num_embeddings, policy.get_input_embeddings().num_embeddings
    if max(max(q) for q in task.train_queries + task.eval_queries) >= rows or rows < policy_rows:
        fail(f"{flag}: its embedding has {rows} rows, the policy's {policy_rows}; it must read the policy's tokens (share its tokenizer and embedding size)")


def read_prompts(source: str, flag: str) -> list[dict]:
    """The prompt lines (records) of a JSONL file or a `datasets` dataset, with any other fields (for reward functions)."""
    if os.path.isfile(source):
        records = []
        with open(source) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    fail(f"{flag}: line {n} of {source} is not JSON; pass a JSONL file with a \"prompt\" field per line")
                records.append(check_prompt_record(record, f"{flag}: line {n} of {source}"))
    elif source.endswith((".jsonl", ".json")) or os.path.isabs(source) or source.startswith("."):
        fail(f"{flag}: {source} does not exist; pass a JSONL file with a \"prompt\" field per line")
    else:
        try:
            import datasets
        except ImportError:
            fail(f"{flag}: {source} is not a file, and loading it as a dataset needs `pip install datasets`")
        try:
            data = datasets.load_dataset(source, split="train")
        except Exception as e:  # the hub, the network or the dataset's own loading script
            fail(f"{flag}: cannot load dataset {source} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        if "prompt" not in data.column_names and "messages" not in data.column_names:
            fail(f"{flag}: dataset {source} has no \"prompt\" or \"messages\" column; pass one that has")
        records = [check_prompt_record(record, f"{flag}: row {n} of dataset {source}") for n, record in enumerate(data)]
    if not records:
        fail(f"{flag}: {source} holds no prompts")
    return records


CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_prompt_record(record, where: str) -> dict:
    """A prompt line, with TRL's conversational "prompt" (a list of messages) moved to "messages"."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), list) and "messages" not in record:
        record = {"messages": record["prompt"], **{k: v for k, v in record.items() if k != "prompt"}}
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        fail(f"{where} needs either a \"prompt\" string or \"messages\" (a list of role/content dicts)")
    if "prompt" in record and not isinstance(record["prompt"], str):
        fail(f"{where} has a \"prompt\" that is not a string")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            fail(f"{where} has \"messages\" that are not a non-empty list of role/content dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                fail(f"{where}: message {i} is not a dict with a string \"content\"")
            if m.get("role") not in CHAT_ROLES:
                fail(f"{where}: message {i} has role {m.get('role')!r}; a role is one of {', '.join(CHAT_ROLES)}")
    clash = sorted(set(record) & REWARD_FN_ARGUMENTS)
    if clash:
        fail(f"{where} has a field named {clash[0]!r}, which reward functions receive from the run; rename it")
    return record


def is_chat(record: dict) -> bool:
    return "messages" in record


def chat_prompt_text(tokenizer, record: dict, flag: str) -> str:
    """The prompt the tokenizer's chat template makes of the messages, ending where the assistant's turn begins."""
    if tokenizer.chat_template is None:
        fail(f"{flag}: a prompt holds \"messages\" but the tokenizer of {tokenizer.name_or_path} has no chat template; give \"prompt\" strings or a tokenizer with one")
    try:
        return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own checks (e.g. roles that must alternate)
        fail(f"{flag}: the chat template of {tokenizer.name_or_path} refuses a prompt's messages ({exception_line(e)})")


def load_config(path: str, flag: str, num_labels: Optional[int] = None):
    """The model's config with dropout off (before the model is built: some copy it); a scorer's must have `num_labels`."""
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1):
        fail(f"{flag}: {path} does not exist; pass a directory saved with save_pretrained or a hub name")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"{flag}: cannot load {path} ({str(e).splitlines()[0]})")
    for key, value in vars(config).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    if num_labels is not None and config.num_labels != num_labels:
        fail(f"{flag}: {path} has {config.num_labels} labels; a reward or value model needs exactly {num_labels} (num_labels={num_labels})")
    return config


def load_model(cls, path: str, config, flag: str, dtype="float32") -> nn.Module:
    """A model in float32 whatever dtype it was saved in (small updates would round away in bfloat16), or with
    dtype="auto" in its saved dtype (a frozen reward model)."""
    try:
        return cls.from_pretrained(path, config=config, dtype=dtype)
    except (OSError, ValueError) as e:
        fail(f"{flag}: cannot load {path} as {cls.__name__} ({str(e).splitlines()[0]})")


def saved_dtype(config) -> str:
    dtype = getattr(config, "dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


IGNORED_GENERATION_KEYS = {"transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "_from_model_config", "max_length", "max_new_tokens", "use_cache"}


def generation_config_note(shipped: GenerationConfig, eos_ids: list[int], temperature: float) -> Optional[str]:
    """A note naming what the checkpoint's generation_config asks for that the sampler ignores (its EOS ids it uses)."""
    asked = {k: v for k, v in shipped.to_diff_dict().items() if k not in IGNORED_GENERATION_KEYS and not k.startswith(("output_", "return_"))}
    if not asked:
        return None
    settings = ", ".join(f"{k}={v}" for k, v in sorted(asked.items()))
    return f"note: the checkpoint's generation_config asks for {settings}; ignored: responses are sampled at --temperature {temperature:g} with nothing else (stopping at EOS ids {' '.join(map(str, eos_ids))}), the distribution whose log-probs PPO stores; policy/ keeps it as shipped"


def context_size(config) -> Optional[int]:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone and the output layer of a causal LM (under LoRA, of the model peft wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


# --- Reward functions and the reward model's text ---
# Reward functions: plain Python functions with the signature of TRL's GRPO reward functions, from --reward-fn's
# files; a mistake in one is one line naming it. A reward model with a tokenizer of its own reads the decoded text,
# re-tokenised (through its chat template when it has one); one that reads the policy's token ids keeps the token path.
REWARD_FN_ARGUMENTS = {"prompts", "completions", "completion_ids"}


@dataclass
class RewardFunction:
    name: str  # how errors name it: "--reward-fn FILE.py:NAME"
    fn: Callable[..., list]
    weight: float


@dataclass
class Episodes:
    """A batch of episodes as reward functions receive them."""

    prompts: list  # each prompt line's "prompt" string, or its "messages"
    completions: list  # the decoded responses (special tokens left out); after "messages", [{"role": "assistant", "content": text}]
    completion_ids: list[list[int]]  # the response tokens up to and including EOS
    fields: dict[str, list]  # the prompt lines' other fields, by name (None where a line lacks one)


def load_reward_functions(specs: tuple[str, ...], weights: Optional[tuple[float, ...]]) -> list[RewardFunction]:
    functions = []
    for i, spec in enumerate(specs):
        path, _, name = spec.rpartition(":")
        where = f"--reward-fn {spec}"
        if not path or not name.isidentifier():
            fail(f"{where}: expected FILE.py:NAME, a Python file and the name of a function in it")
        if not os.path.isfile(path):
            fail(f"{where}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"reward_fn_{i}", path)
        if module_spec is None:
            fail(f"{where}: {path} is not a Python file (.py)")
        module = importlib.util.module_from_spec(module_spec)
        folder = os.path.dirname(os.path.abspath(path))
        sys.path.insert(0, folder)  # the file may import modules beside it
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            fail(f"{where}: importing {path} raised {exception_line(e)}")
        finally:
            sys.path.remove(folder)
        fn = getattr(module, name, None)
        if not callable(fn):
            fail(f"{where}: {path} defines no function {name}")
        try:
            kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        except (TypeError, ValueError):  # a builtin without a signature
            kinds = set()
        if inspect.Parameter.VAR_KEYWORD not in kinds or inspect.Parameter.POSITIONAL_ONLY in kinds:
            fail(f"{where}: {name} must accept (prompts, completions, **kwargs) as keywords, as TRL's reward functions do")
        functions.append(RewardFunction(where, fn, 1.0 if weights is None else weights[i]))
    return functions


def decode_episodes(records: list[dict], responses: Tensor, task: Task) -> Episodes:
    completion_ids = [[t for t in r if t != task.pad_id] for r in responses.tolist()]
    texts = decode(task.tokenizer, completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] if is_chat(r) else t for t, r in zip(texts, records)]
    names = sorted({k for r in records for k in r} - {"prompt", "messages"})
    fields = {k: [r.get(k) for r in records] for k in names}
    prompts = [r["messages"] if is_chat(r) else r["prompt"] for r in records]
    return Episodes(prompts, completions, completion_ids, fields)


def call_reward_function(function: RewardFunction, episodes: Episodes) -> list[float]:
    """The function's scores, checked: a number (or None, which scores 0) per completion."""
    name, n = function.name, len(episodes.prompts)
    try:
        out = function.fn(
            prompts=episodes.prompts, completions=episodes.completions, completion_ids=episodes.completion_ids,
            **episodes.fields,
        )  # fmt: skip
    except Exception as e:
        raise RewardFunctionError(f"{name}: the function raised {exception_line(e)}") from e
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(f"{name}: the function returned a {type(out).__name__}; return a list with a float per completion")
    if len(out) != n:
        raise RewardFunctionError(f"{name}: the function returned {len(out)} scores for {n} completions; return one per completion")
    scores = []
    for i, value in enumerate(out):
        if isinstance(value, (np.generic, Tensor)) and np.size(value) == 1:
            value = value.item()
        if value is not None and (not isinstance(value, numbers.Real) or not math.isfinite(value)):
            raise RewardFunctionError(f"{name}: the function's score {i} is {value!r}; return finite numbers (or None, which scores 0)")
        scores.append(0.0 if value is None else float(value))
    return scores


def exception_line(e: Exception) -> str:
    message = str(e).strip().splitlines()
    return f"{type(e).__name__}: {message[0]}" if message else type(e).__name__


def decode(tokenizer, sequences: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
    """The text of token id lists; ids the tokenizer does not know (an embedding larger than it) decode to nothing."""
    known = len(tokenizer)
    return tokenizer.batch_decode([[t for t in s if 0 <= t < known] for s in sequences], skip_special_tokens=skip_special_tokens)


def reward_model_tokenizer(path: str, config, policy_tokenizer, policy_config) -> Optional[transformers.PreTrainedTokenizerBase]:
    """The reward model's tokenizer when it must read text (its vocabulary gives some policy tokens other ids, or its
    embedding is smaller than the policy's, which can sample its extra rows); None when it reads the policy's tokens."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, truncation_side="left")
    except (OSError, ValueError, TypeError):  # no tokenizer files beside the model
        tokenizer = None
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if any(vocab.get(token) != i for token, i in policy_tokenizer.get_vocab().items()):
            return tokenizer
    if getattr(config, "vocab_size", None) and getattr(policy_config, "vocab_size", None) and config.vocab_size < policy_config.vocab_size:
        return tokenizer or policy_tokenizer
    return None


def retokenized_scores(model: nn.Module, tokenizer, episodes: Episodes, task: Task) -> Tensor:
    """The reward model's scores of the decoded episodes in its own tokens: a decoder's head read at the last one, an
    encoder's (BERT, RoBERTa, DeBERTa, ModernBERT) own forward and pooling on a text pair, logits[:, 0]. A text longer
    than the model reads loses its start (a pair: its longer part's), with a note the first time."""
    encoder = not reads_last_token(model)
    texts = [
        reward_model_text(tokenizer, prompt, completion, not set(task.eos_ids).isdisjoint(ids), encoder)
        for prompt, completion, ids in zip(episodes.prompts, episodes.completions, episodes.completion_ids)
    ]
    size, special, columns = max_text_tokens(model, tokenizer), tokenizer.chat_template is None, list(zip(*texts)) if isinstance(texts[0], tuple) else [texts]
    encoded = tokenizer(*columns, add_special_tokens=special)
    if size is not None and max(map(len, encoded["input_ids"])) > size:
        if not getattr(model, "truncation_noted", False):
            print(f"note: --reward-model-path: a text of {max(map(len, encoded['input_ids']))} tokens is longer than the {size} the reward model reads; it reads the text's end (every such text is cut so)")
            model.truncation_noted = True
        encoded = tokenizer(*columns, add_special_tokens=special, truncation=True, max_length=size)
    device, width = next(model.parameters()).device, max(map(len, encoded["input_ids"]))
    if not encoder:
        return token_scores(model, left_pad(encoded["input_ids"], -1, device), -1)[:, -1]  # -1: never a token
    inputs = {k: torch.tensor([s + [0] * (width - len(s)) for s in v], device=device) for k, v in encoded.items()}  # right-padded
    return model(**inputs).logits[:, 0].float()


def reads_last_token(model: nn.Module) -> bool:
    """A decoder classifier: a `score` head on a backbone, read at the last token (other classifiers pool in their
    own forward)."""
    return hasattr(model, "score") and hasattr(model, model.base_model_prefix)


def max_text_tokens(model: nn.Module, tokenizer) -> Optional[int]:
    """The most tokens the reward model reads: its positions, or its tokenizer's stated maximum when smaller (RoBERTa
    states 512 for its 514 positions)."""
    sizes = [n for n in (context_size(model.config), tokenizer.model_max_length) if n is not None and n < 1e9]
    return min(sizes, default=None)


def reward_model_text(tokenizer, prompt, completion, ended: bool, encoder: bool) -> str | tuple[str, str]:
    """Prompt and completion as the reward model reads them: its chat template's conversation; else without the policy's
    chat markup (a chat prompt: its messages' contents, a line each), an encoder's text pair (its tokenizer separates
    them) or a decoder's text, the prompt's then the completion's and its EOS when the response ended with one."""
    text = completion[0]["content"] if isinstance(completion, list) else completion
    if tokenizer.chat_template is not None:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        try:
            return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text}], tokenize=False)
        except Exception as e:  # the template's own checks
            fail(f"--reward-model-path: its chat template refuses a conversation ({exception_line(e)})")
    prompt = "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else prompt
    return (prompt, text) if encoder else prompt + text + (tokenizer.eos_token if ended and tokenizer.eos_token else "")


# --- LoRA ---
# Adapters through peft on the policy (peft's PeftModel) and on the value model (injected; its head trains whole).
def add_lora(policy: nn.Module, value_model: nn.Module, task: Task, args: Args) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, get_peft_model

    targets = list(args.lora_target_modules) if args.lora_target_modules else None
    check_lora_targets(policy, value_model, targets)
    if targets == ["all-linear"]:  # peft's shorthand, which it reads only as a string
        targets = "all-linear"
    config = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(args.seed)  # the same initial adapters on every process, and in every run of this seed
    try:
        with warnings.catch_warnings():  # peft calls a deprecated transformers property, and sets this itself
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **config))
            # the value head trains whole, never through an adapter
            if value_model is not None and not isinstance(value_model, PolicyValueHead):  # a head on the policy trains whole
                value_model = get_peft_model(value_model, LoraConfig(exclude_modules=["score"], **config)).get_base_model()
    except ValueError as e:  # no default target modules for this architecture, or none of the names in one model
        fail(f"--lora-target-modules: {exception_line(e).rstrip('.')}; name modules of both the policy and the value model (e.g. all-linear)")
    if value_model is not None:
        value_model.score.requires_grad_(True)
    return policy, value_model


def check_lora_targets(policy: nn.Module, value_model: nn.Module, targets: Optional[list]) -> None:
    """Every module name given must exist in the policy or the value model (peft would silently skip a misspelt one)."""
    modules = [(n.rsplit(".", 1)[-1], m) for model in (policy, value_model) if model is not None for n, m in model.named_modules()]
    missing = [t for t in targets or [] if t != "all-linear" and t not in {name for name, _ in modules}]
    if missing:
        linear = sorted({name for name, m in modules if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        fail(f"--lora-target-modules: no module is named {missing[0]} in the policy or the value model; their linear layers: {', '.join(linear)}")


def is_lora(model: nn.Module) -> bool:
    """Whether the model is peft's wrapper (the policy under LoRA)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def has_adapters(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def adapters_disabled(model: nn.Module):
    """A context in which the model runs without its LoRA adapters (nothing to do for a model without them)."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


# --- optional: fast-path ---
# The rollout's log-probs from the sampling pass's logits (generate), and for large vocabularies fp32 logits above
# LOGITS_CHUNK_BYTES computed from the final hidden states a chunk of positions at a time, recomputed in the backward
# pass rather than kept (sampling then keeps no logits).
LOGITS_CHUNK_BYTES = 2**26


def vocab_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.size(0)


def large_logits(positions: int, vocab: int) -> bool:
    return positions * vocab * 4 > LOGITS_CHUNK_BYTES


@torch.no_grad()
def check_logits_from_hidden(*models: nn.Module) -> None:
    """Marks each model whose logits are its output layer on its backbone's last hidden state (checked on a few tokens);
    a model that post-processes them (Gemma's soft-capping) keeps the full logits, with a note."""
    for model in models:
        backbone, head = lm_parts(model)
        ids = torch.arange(8, device=head.weight.device)[None] % vocab_rows(model)
        plain = model(input_ids=ids, use_cache=False).logits.float()
        from_hidden = head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
        model.logits_from_hidden = torch.allclose(plain, from_hidden, rtol=1e-4, atol=1e-5)
        if not model.logits_from_hidden:
            print(f"note: {type(model).__name__}'s logits are not its output layer on its last hidden state; log-probs use its full logits (more memory)")


def chunked_response_logprobs(
    model: nn.Module, inputs: dict, tokens: Tensor, context_length: int, temperature: float, pad_id: int
) -> tuple[Tensor, Tensor]:
    """lm_response_logprobs from the hidden states, LOGITS_CHUNK_BYTES of logits at a time, each recomputed in the backward."""
    backbone, head = lm_parts(model)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, context_length - 1 : -1]
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_rows(model)))
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.size(-1)), tokens.reshape(-1)
    logprobs, entropies = [], []
    for i in range(0, len(flat_tokens), rows):
        h, t = flat_hidden[i : i + rows], flat_tokens[i : i + rows]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = torch.utils.checkpoint.checkpoint(head_logprobs, head, h, t, temperature, pad_id, use_reentrant=False)
        else:
            lp, ent = head_logprobs(head, h, t, temperature, pad_id)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs).view_as(tokens), torch.cat(entropies).view_as(tokens)


def head_logprobs(head: nn.Module, hidden: Tensor, tokens: Tensor, temperature: float, pad_id: int) -> tuple[Tensor, Tensor]:
    logits = sampler_logits(head(hidden), temperature, pad_id)
    return logprobs_from_logits(logits, tokens), entropy_from_logits(logits)


# --- The built-in task ---
# A hidden Markov-chain language, an SFT model trained on its corpus, a hidden gold reward, Bradley-Terry labels on SFT
# samples and a reward model trained on them, saved as ordinary Hugging Face checkpoints.
BUILTIN_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
BUILTIN_RESPONSE_LENGTH = 16  # longest response in the corpus
BUILTIN_EVAL_PROMPTS = 512
BUILTIN_VERSION = 4  # bump when the task definition changes, so stale caches are not reused


def builtin_cache_dir(args: Args) -> str:
    """One cache entry per task definition: the task_* flags and BUILTIN_VERSION."""
    key = json.dumps({k: v for k, v in asdict(args).items() if k.startswith("task_")} | {"v": BUILTIN_VERSION})
    return os.path.join(args.cache_dir or os.path.join(args.runs_dir, "builtin_task"), hashlib.sha1(key.encode()).hexdigest()[:10])


def builtin_language(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Hidden language: sparse word transitions without self-loops, a per-word stop probability and a hidden quality."""
    rng = np.random.default_rng(seed)
    transition = np.zeros((vocab_size, vocab_size))
    for w in range(vocab_size):
        successors = rng.choice([v for v in range(vocab_size) if v != w], size=6, replace=False)
        transition[w, successors] = rng.dirichlet(np.full(6, 0.7))
    return dict(
        transition=transition,
        eos_prob=rng.uniform(0.03, 0.2, vocab_size),
        quality=rng.normal(0.0, 1.0, vocab_size),
    )


def builtin_sample(lang: dict, n: int, prompt_length: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Sample n prompts and their continuations (lists of words, None appended at EOS)."""
    cum = np.cumsum(lang["transition"], 1)
    words = np.empty((n, prompt_length + BUILTIN_RESPONSE_LENGTH), dtype=np.int64)
    words[:, 0] = rng.integers(0, len(cum), n)
    for t in range(1, words.shape[1]):
        u = rng.random(n)[:, None]
        words[:, t] = np.minimum((u > cum[words[:, t - 1]]).sum(1), len(cum) - 1)
    stops = rng.random((n, BUILTIN_RESPONSE_LENGTH)) < lang["eos_prob"][words[:, prompt_length - 1 : -1]]
    responses = []
    for i in range(n):
        end = int(np.argmax(stops[i])) if stops[i].any() else None
        r = list(words[i, prompt_length:][: end if end is not None else BUILTIN_RESPONSE_LENGTH])
        responses.append(r + [None] if end is not None else r)
    return words[:, :prompt_length], responses


def builtin_gold_score(lang: dict, prompt: list[int], response: list[Optional[int]]) -> float:
    """Hidden gold reward of a response (words, None for EOS): mean word quality + relevance (share of prompt words) - 3 x
    immediate repetitions (SFT never shows them, so the reward model cannot learn it) - 1 without EOS."""
    ended = None in response
    words = response[: response.index(None)] if ended else response
    if not words:  # an empty answer
        return -1.0
    quality = float(np.mean([lang["quality"][w] if w >= 0 else -2.0 for w in words]))
    relevance = float(np.mean([w in prompt for w in words]))
    repeats = [words[i] == words[i - 1] for i in range(1, len(words))]
    repetition = float(np.mean(repeats)) if repeats else 0.0
    return quality + relevance - 3.0 * repetition - (0.0 if ended else 1.0)


def builtin_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; pad is distinct from eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(BUILTIN_SPECIALS + [f"w{i}" for i in range(vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def builtin_words(ids: list[int], eos_id: int, pad_id: int) -> list[Optional[int]]:
    """Token ids -> words (None for EOS, -1 for other special tokens), dropping padding."""
    n = len(BUILTIN_SPECIALS)
    return [None if i == eos_id else (i - n if i >= n else -1) for i in ids if i != pad_id]


def builtin_gold_reward(language: dict) -> Callable[..., list[float]]:
    """The hidden gold reward as a reward function: a verifiable reward, with nothing to over-optimise."""
    eos_id, pad_id = BUILTIN_SPECIALS.index("<eos>"), BUILTIN_SPECIALS.index("<pad>")

    def gold(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **fields) -> list[float]:
        words = [[int(w[1:]) for w in prompt.split()] for prompt in prompts]  # prompts read "w3 w17 ..."
        return [builtin_gold_score(language, p, builtin_words(ids, eos_id, pad_id)) for p, ids in zip(words, completion_ids)]

    return gold


def builtin_task(args: Args, cache_dir: str) -> dict:
    """Build the built-in task into cache_dir (or reuse it). Returns its description (task.json)."""
    task_json = os.path.join(cache_dir, "task.json")
    if os.path.exists(task_json):
        with open(task_json) as f:
            return json.load(f)
    tmp_dir = f"{cache_dir}.tmp{os.getpid()}"
    os.makedirs(tmp_dir, exist_ok=True)
    torch.manual_seed(args.task_seed)
    rng = np.random.default_rng(args.task_seed)
    lang = builtin_language(args.task_vocab_size, args.task_seed)
    np.savez(os.path.join(tmp_dir, "language.npz"), **lang)
    tokenizer = builtin_tokenizer(args.task_vocab_size)
    pad_id, eos_id, n_special = tokenizer.pad_token_id, tokenizer.eos_token_id, len(BUILTIN_SPECIALS)
    P = args.task_prompt_length
    times = {}

    # 1. Corpus: prompt words, continuation, EOS; padding (right) is ignored by the loss.
    t0 = time.time()
    prompts, responses = builtin_sample(lang, args.task_sft_sequences, P, rng)
    seqs = [[w + n_special for w in p] + [eos_id if w is None else w + n_special for w in r] for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    corpus = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])

    # 2. SFT: a tiny GPT-2 from a config, trained on the corpus; exact (erf) GELU, faster on CPU than the tanh one.
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )  # fmt: skip
    sft = GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(sft.parameters(), lr=3e-3)
    batch, epochs = 128, 3
    steps = epochs * (len(corpus) // batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    for epoch in range(epochs):
        perm = torch.randperm(len(corpus))
        for i in range(0, len(corpus) - batch + 1, batch):
            x = corpus[perm[i : i + batch]]
            loss = sft(**model_inputs(x, pad_id), labels=x.masked_fill(x == pad_id, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    sft.eval()
    sft.save_pretrained(os.path.join(tmp_dir, "sft"))
    tokenizer.save_pretrained(os.path.join(tmp_dir, "sft"))
    times["sft_s"] = time.time() - t0
    print(f"built-in task: SFT model trained in {times['sft_s']:.0f}s (final LM loss {loss.item():.3f})")

    # 3. Preferences: two SFT samples per prompt, labelled by a Bradley-Terry draw on the gold reward (noisy labels).
    t0 = time.time()
    n_pairs = args.task_preference_pairs
    pair_prompts, _ = builtin_sample(lang, n_pairs, P, rng)
    queries = torch.tensor(pair_prompts + n_special).repeat(2, 1)
    gen_config = sampling_config(BUILTIN_RESPONSE_LENGTH, 1.0, eos_id, pad_id, len(tokenizer))
    sampled = torch.cat(
        [generate(sft, queries[i : i + 512], pad_id, gen_config, BUILTIN_RESPONSE_LENGTH)[0] for i in range(0, len(queries), 512)]
    )
    sampled = truncate_after_eos(sampled, eos_id, pad_id)
    gold = torch.tensor(
        [builtin_gold_score(lang, (q[:P] - n_special).tolist(), builtin_words(r.tolist(), eos_id, pad_id)) for q, r in zip(queries, sampled)]
    )
    gold_mean, gold_std = gold.mean().item(), gold.std().item()
    first_wins = torch.rand(n_pairs) < torch.sigmoid((gold[:n_pairs] - gold[n_pairs:]) / (0.5 * gold_std))
    seq = torch.cat([queries, sampled], 1)
    chosen = torch.where(first_wins[:, None], seq[:n_pairs], seq[n_pairs:])
    rejected = torch.where(first_wins[:, None], seq[n_pairs:], seq[:n_pairs])
    gold_margin = torch.where(first_wins, 1.0, -1.0) * (gold[:n_pairs] - gold[n_pairs:])
    n_test = n_pairs // 10

    # 4. Reward model: the SFT backbone with a fresh scalar head, trained on the pairs.
    rm = as_ppo_model(GPT2ForSequenceClassification.from_pretrained(os.path.join(tmp_dir, "sft"), num_labels=1))
    nn.init.normal_(rm.score.weight, std=1.0 / np.sqrt(config.n_embd + 1))
    optimizer = torch.optim.Adam(rm.parameters(), lr=1e-3)
    batch, epochs = 64, 3
    train_idx = torch.arange(n_test, n_pairs)
    for epoch in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx))]
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            s = sequence_scores(rm, torch.cat([chosen[idx], rejected[idx]]), pad_id, P)
            loss = -F.logsigmoid(s[: len(idx)] - s[len(idx) :]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    rm.eval()
    with torch.no_grad():
        test = torch.arange(n_test)
        s = sequence_scores(rm, torch.cat([chosen[test], rejected[test]]), pad_id, P)
        decided = gold_margin[test] != 0  # accuracy against the gold order, not the noisy labels
        rm_accuracy = ((s[:n_test] > s[n_test:]) == (gold_margin[test] > 0))[decided].float().mean().item()
        # SFT samples' scores to mean 0, std 1: the head (no bias) scaled, the final norm's bias shifted along it.
        all_scores = sequence_scores(rm, seq, pad_id, P)
        mean, std = all_scores.mean(), all_scores.std()
        rm.score.weight /= std
        w = rm.score.weight[0]
        rm.transformer.ln_f.bias -= (mean / std) * w / (w @ w)
    rm.save_pretrained(os.path.join(tmp_dir, "reward"))
    tokenizer.save_pretrained(os.path.join(tmp_dir, "reward"))
    times["reward_model_s"] = time.time() - t0
    print(f"built-in task: reward model trained in {times['reward_model_s']:.0f}s, held-out accuracy {rm_accuracy:.3f} (against the gold order)")

    # 5. Prompt sets for PPO, written in the same JSONL format a user would pass with --prompts.
    for name, n in (("prompts.jsonl", 8192), ("eval_prompts.jsonl", BUILTIN_EVAL_PROMPTS)):
        words, _ = builtin_sample(lang, n, P, rng)
        with open(os.path.join(tmp_dir, name), "w") as f:
            for p in words:
                f.write(json.dumps({"prompt": " ".join(f"w{w}" for w in p)}) + "\n")
    task = dict(
        rm_accuracy=rm_accuracy, sft_gold_mean=gold_mean, sft_gold_std=gold_std, times=times,
        settings={k: v for k, v in asdict(args).items() if k.startswith("task_")},
    )  # fmt: skip
    with open(os.path.join(tmp_dir, "task.json"), "w") as f:
        json.dump(task, f, indent=1)
    os.replace(tmp_dir, cache_dir)
    return task


if __name__ == "__main__":
    train(tyro.cli(Args))
