"""PPO for RLHF of causal language models, in one file (CleanRL style).

Fine-tunes a causal language model (the policy) to maximise a reward model's score minus a
per-token KL penalty to a frozen reference copy of itself (Ziegler et al., 2019; Stiennon et al.,
2020; "The N+ Implementation Details of RLHF with PPO", Huang et al., 2024). Metric names are TRL's.

Two ways to run it, one PPO code path:

    # built-in offline task (no network, no GPU): a hidden Markov-chain language, an SFT model,
    # a hidden gold reward and a reward model trained on noisy preferences, cached on first use
    python ppo_rlhf.py
    python ppo_rlhf.py --kl-coef 0.0          # watch the gold score collapse (over-optimisation)

    # real Hugging Face checkpoints; prompts as a local JSONL file with a "prompt" field
    python ppo_rlhf.py --model-name-or-path path/or/hub-name --reward-model-path path/to/rm \\
        --prompts prompts.jsonl

    # data parallel over processes (gloo on CPU, nccl on GPUs)
    torchrun --standalone --nproc_per_node 2 ppo_rlhf.py

A run writes runs/{run_name}/: args.json, metrics.jsonl, checkpoint.pt (for --resume) and the
trained policy with its tokenizer in policy/ (loads back with from_pretrained).
"""

import hashlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
import tyro
from torch import Tensor, nn
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (offset by the process rank under torchrun)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """torch device: auto (cuda, then mps, then cpu) or an explicit device string such as cuda:1"""
    num_threads: int = 1
    """torch CPU threads per process (0: torch's default); 1 is fastest for the built-in task's tiny models"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ppo-rlhf"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    runs_dir: str = "runs"
    """directory under which each run writes runs_dir/{run_name}/"""
    save_every: int = 0
    """updates between checkpoints (0 = only at the end and on Ctrl-C)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue; the run keeps its saved settings except --device,
    --num-threads, --save-every and --track"""

    model_name_or_path: Optional[str] = None
    """policy and reference: an AutoModelForCausalLM directory or hub name; None runs the built-in task"""
    reward_model_path: Optional[str] = None
    """reward model: an AutoModelForSequenceClassification with one label, sharing the policy's tokenizer"""
    prompts: Optional[str] = None
    """training prompts: a JSONL file with a "prompt" field per line, or a `datasets` name"""
    eval_prompts: Optional[str] = None
    """held-out evaluation prompts, same formats; None takes the first --eval-episodes training prompts"""
    max_prompt_length: int = 64
    """prompts longer than this many tokens keep their last tokens"""
    response_length: int = 16
    """maximum number of generated tokens per response"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed from logits divided by it"""
    bf16: bool = False
    """run forward passes in bfloat16 autocast (CUDA only)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy and value models"""

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

    total_episodes: int = 9600
    """total number of completions to train on, summed over processes"""
    per_device_train_batch_size: int = 16
    """episodes per micro-batch (one forward/backward) on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches whose gradients are summed before each optimizer step"""
    num_minibatches: int = 4
    """optimizer steps per PPO epoch"""
    update_epochs: int = 4
    """PPO epochs over each batch of episodes"""
    local_rollout_forward_batch_size: int = 64
    """chunk size of the no-grad passes (generation, reference, reward, value) on each process"""
    learning_rate: float = 3e-4
    """learning rate of the Adam optimizer (policy and value model)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float = 1.0
    """discount factor over tokens"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation over tokens"""
    norm_adv: bool = True
    """whiten advantages over the valid tokens of the batch"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) over the valid tokens of the batch"""
    clip_coef: float = 0.2
    """policy ratio clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values"""
    vf_clip_coef: float = 0.2
    """value clipping range used by --clip-vloss"""
    vf_coef: float = 0.1
    """coefficient of the value loss"""
    max_grad_norm: float = 1.0
    """maximum global norm of the gradients"""
    kl_coef: float = 0.05
    """coefficient of the per-token KL penalty to the reference (initial value with --adaptive-kl)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator: k1 = log(pi/ref), k3 = (ref/pi - 1) - log(ref/pi)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards --target-kl (Ziegler et al., 2019)"""
    target_kl: float = 6.0
    """target KL (nats per response) of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive controller"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that has no EOS token"""
    eval_every: int = 10
    """updates between evaluations on the held-out prompts (with a progress line and sample table)"""
    eval_episodes: int = 256
    """held-out prompts evaluated each time (gold score on the built-in task)"""


def fail(message: str) -> NoReturn:
    """Print a one-line usage error and exit with status 2 (as argparse/tyro do)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Numerical core. Shapes: B episodes, T response tokens; `mask` is True on valid response tokens
# (up to and including the first EOS), False on padding.
# ----------------------------------------------------------------------------------------------


def first_true_indices(bools: Tensor) -> Tensor:
    """Index of the first True of each row, or the row length when there is none."""
    row_len = bools.size(-1)
    idx = torch.arange(row_len, device=bools.device)
    return torch.where(bools, idx, row_len).min(-1).values


def truncate_after_eos(responses: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Replace every token after the first EOS of each response by padding (the EOS stays)."""
    eos_idx = first_true_indices(responses == eos_id)
    after = torch.arange(responses.size(1), device=responses.device) > eos_idx[:, None]
    return responses.masked_fill(after, pad_id)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each token under `logits` (already divided by the temperature)."""
    return torch.gather(logits.float().log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise x to zero mean (unless shift_mean=False) and unit variance over masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    # k3 (Schulman, "Approximating KL divergence"): unbiased and never negative.
    return torch.expm1(-log_ratio) + log_ratio


def apply_missing_eos_penalty(scores: Tensor, responses: Tensor, eos_id: int, penalty: float) -> Tensor:
    """Subtract `penalty` from the score of each response that contains no EOS token."""
    return torch.where((responses == eos_id).any(1), scores, scores - penalty)


def shape_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, kl_coef: float, kl_estimator: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: -kl_coef * KL on each valid token, plus the score on the last valid one.

    Returns (rewards, kl, non_score_reward), all zero on padding.
    """
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, kl_estimator), 0.0)
    non_score_reward = -kl_coef * kl
    last = mask.sum(1) - 1
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, kl, non_score_reward


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """GAE over tokens. The value after the last valid token is 0 (the episode ends there).

    Returns (advantages, returns), zero on padding.
    """
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # Padding carries zero reward and value, so the trace of a shorter response starts at 0.
        lastgaelam = torch.where(mask[:, t], delta + gamma * gae_lambda * lastgaelam, 0.0)
        advantages[:, t] = lastgaelam
    return advantages, torch.where(mask, advantages + values, 0.0)


def policy_loss(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clipped surrogate loss. Returns (loss, clipfrac, approx_kl (k3), ratio), means over valid tokens."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl, masked_mean(ratio, mask)


def value_loss(
    new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: Optional[float]
) -> tuple[Tensor, Tensor]:
    """0.5 * squared error, clipped around the rollout's values when clip_range is set. Returns (loss, clipfrac)."""
    losses = (new_values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(losses, mask), torch.zeros((), device=losses.device)
    clipped = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    losses2 = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(losses, losses2), mask), masked_mean((losses2 > losses).float(), mask)


def adaptive_kl_coef(kl_coef: float, current_kl: float, target_kl: float, horizon: int, n_episodes: int) -> float:
    """Ziegler et al. (2019): move kl_coef proportionally to the (clipped) relative KL error."""
    error = float(np.clip(current_kl / target_kl - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * n_episodes / horizon)


# ----------------------------------------------------------------------------------------------
# Model passes shared by the built-in task and PPO. Queries are left-padded, responses
# right-padded; padding is masked out and replaced by token 0 before any embedding lookup, so a
# pad id outside the model's vocabulary (an added [PAD]) is never looked up.
# ----------------------------------------------------------------------------------------------


def model_inputs(query_responses: Tensor, pad_id: int) -> dict[str, Tensor]:
    mask = query_responses != pad_id
    return dict(
        input_ids=query_responses.masked_fill(~mask, 0),
        attention_mask=mask.long(),
        position_ids=mask.cumsum(1) - mask.long(),
    )


def lm_response_logprobs(
    model: nn.Module, query_responses: Tensor, pad_id: int, context_length: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and the per-token logits (divided by the temperature)."""
    inputs = model_inputs(query_responses, pad_id)
    logits = model(**inputs, use_cache=False).logits[:, context_length - 1 : -1].float() / temperature
    return logprobs_from_logits(logits, inputs["input_ids"][:, context_length:]), logits


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


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], device=device)


@torch.no_grad()
def generate(
    policy: nn.Module, queries: Tensor, pad_id: int, gen_config: GenerationConfig, response_length: int
) -> tuple[Tensor, Tensor]:
    """Sample responses with the KV cache. Returns (responses right-padded to response_length,
    their log-probs taken from the generation pass itself, which saves a forward)."""
    inputs = model_inputs(queries, pad_id)
    out = policy.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=gen_config
    )
    responses = out.sequences[:, queries.size(1) :]
    logits = torch.stack(out.logits, 1).float() / gen_config.temperature
    logprobs = logprobs_from_logits(logits, responses)
    missing = response_length - responses.size(1)
    return F.pad(responses, (0, missing), value=pad_id), F.pad(logprobs, (0, missing), value=0.0)


def sampling_config(response_length: int, temperature: float, eos_id: int, pad_id: int, vocab_size: int) -> GenerationConfig:
    """Pure sampling at `temperature` (no top-k/top-p), stopping at EOS, with logits returned."""
    return GenerationConfig(
        max_new_tokens=response_length, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        eos_token_id=eos_id, pad_token_id=eos_id,  # finished rows are filled with EOS, then made padding
        suppress_tokens=[pad_id] if pad_id < vocab_size else None,  # a sampled pad would end the response
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


def flatten_parameters(params: list[nn.Parameter]) -> nn.Parameter:
    """One flat parameter holding `params`: afterwards each of them, and its .grad, is a view into
    the flat tensor and into its .grad (backward accumulates into those views in place)."""
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        p.data = flat.data[offset : offset + p.numel()].view_as(p)
        p.grad = flat.grad[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout would make the PPO ratio differ from 1 on the first minibatch and values noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


# ----------------------------------------------------------------------------------------------
# Built-in offline task: a hidden Markov-chain language, an SFT model trained on its corpus, a
# hidden gold reward, Bradley-Terry preference labels on SFT samples, and a reward model trained
# on them. Models are saved as ordinary Hugging Face checkpoints and then go through the same PPO
# code as real checkpoints.
# ----------------------------------------------------------------------------------------------

BUILTIN_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
BUILTIN_RESPONSE_LENGTH = 16  # longest response in the corpus
BUILTIN_EVAL_PROMPTS = 512
BUILTIN_VERSION = 4  # bump when the task definition changes, so stale caches are not reused


def builtin_language(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Hidden language: sparse word transitions without self-loops (so SFT samples never repeat
    a word right after itself), a per-word stop probability, and a hidden per-word quality."""
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
    """Hidden gold reward of a response (words, None for EOS): mean word quality, plus relevance
    (share of words taken from the prompt), minus a penalty for words repeated right after
    themselves (which SFT samples never show, so the reward model cannot learn it: the policy
    exploits it when the KL budget is loose) and a missing-EOS penalty."""
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
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def builtin_words(ids: list[int], eos_id: int, pad_id: int) -> list[Optional[int]]:
    """Token ids -> words (None for EOS, -1 for other special tokens), dropping padding."""
    n = len(BUILTIN_SPECIALS)
    return [None if i == eos_id else (i - n if i >= n else -1) for i in ids if i != pad_id]


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

    # 2. SFT: a tiny GPT-2 built from a config, trained as a language model on the corpus. Its
    # activation is the exact (erf) GELU rather than GPT-2's tanh approximation: torch's CPU tanh
    # is slow enough that gelu_new cost 3.3 ms a call against 0.4 ms on a rollout batch (64 x 24 x 256).
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

    # 3. Preferences: two SFT samples per prompt, labelled by a Bradley-Terry draw on the gold
    # reward (noisy like human labels); the temperature is a fraction of the gold spread.
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
    rm = disable_dropout(GPT2ForSequenceClassification.from_pretrained(os.path.join(tmp_dir, "sft"), num_labels=1))
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
        # Normalise the score so SFT samples have mean 0 and std 1. GPT-2's score head has no bias:
        # scale its weight, and shift through the final layer norm's bias along the head's direction.
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


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------


def read_prompts(source: str, flag: str) -> list[str]:
    if os.path.isfile(source):
        prompts = []
        with open(source) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    fail(f"{flag}: line {n} of {source} is not JSON; pass a JSONL file with a \"prompt\" field per line")
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    fail(f"{flag}: line {n} of {source} has no string \"prompt\" field; add one to every line")
                prompts.append(record["prompt"])
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
        if "prompt" not in data.column_names:
            fail(f"{flag}: dataset {source} has no \"prompt\" column; pass one that has")
        prompts = list(data["prompt"])
    if not prompts:
        fail(f"{flag}: {source} holds no prompts")
    return prompts


def load_config(path: str, flag: str):
    """The model's config with dropout off (set before the model is built, as some models copy it)."""
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1):
        fail(f"{flag}: {path} does not exist; pass a directory saved with save_pretrained or a hub name")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"{flag}: cannot load {path} ({str(e).splitlines()[0]})")
    for key, value in vars(config).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def load_model(cls, path: str, config, flag: str) -> nn.Module:
    try:
        model = cls.from_pretrained(path, config=config)
    except (OSError, ValueError) as e:
        fail(f"{flag}: cannot load {path} as {cls.__name__} ({str(e).splitlines()[0]})")
    return disable_dropout(model)


def context_size(config) -> Optional[int]:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main(args: Args) -> None:
    # 0. Validate flags before anything slow. Transformers' load reports and progress bars would
    # drown the progress lines.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    resume_state = None
    if args.resume is not None:
        if not os.path.isfile(args.resume):
            fail(f"--resume: {args.resume} does not exist; pass a checkpoint.pt written by an earlier run")
        resume_state = torch.load(args.resume, map_location="cpu", weights_only=False)
        keep = {"device", "num_threads", "resume", "save_every", "track"}
        args = Args(**{**resume_state["args"], **{k: v for k, v in asdict(args).items() if k in keep}})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if resume_state is not None and len(resume_state["rng"]) != world_size:
        fail(f"--resume: {args.resume} was written by {len(resume_state['rng'])} processes; resume with as many")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    micro = args.per_device_train_batch_size
    minibatch = micro * args.gradient_accumulation_steps
    local_batch = minibatch * args.num_minibatches
    batch = local_batch * world_size
    num_updates = args.total_episodes // batch
    for flag, value in (
        ("--per-device-train-batch-size", micro), ("--gradient-accumulation-steps", args.gradient_accumulation_steps),
        ("--num-minibatches", args.num_minibatches), ("--update-epochs", args.update_epochs),
        ("--local-rollout-forward-batch-size", args.local_rollout_forward_batch_size),
        ("--response-length", args.response_length), ("--max-prompt-length", args.max_prompt_length),
        ("--eval-every", args.eval_every), ("--eval-episodes", args.eval_episodes), ("--kl-horizon", args.kl_horizon),
    ):  # fmt: skip
        if value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if num_updates < 1:
        fail(f"--total-episodes {args.total_episodes} is less than one update of {batch} episodes; raise it")
    if args.save_every < 0 or args.num_threads < 0:
        fail(f"--save-every and --num-threads must be >= 0, got {args.save_every} and {args.num_threads}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        fail("--gamma and --gae-lambda must lie in [0, 1]")
    if args.clip_coef <= 0 or args.vf_clip_coef <= 0:
        fail("--clip-coef and --vf-clip-coef must be positive")
    if args.kl_coef < 0 or args.target_kl <= 0:
        fail("--kl-coef must be >= 0 and --target-kl positive")
    if args.model_name_or_path is None and (args.reward_model_path or args.prompts):
        fail("--reward-model-path/--prompts need --model-name-or-path; leave all three out for the built-in task")
    if args.model_name_or_path is not None and (args.reward_model_path is None or args.prompts is None):
        fail("--model-name-or-path needs --reward-model-path and --prompts as well")
    if args.device == "auto":
        device_str = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        device_str = args.device
    try:
        device = torch.device(device_str)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {args.device} is not usable here ({str(e).splitlines()[0]}); pass auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and world_size > 1:
        if local_rank >= torch.cuda.device_count():
            fail(
                f"--device {args.device}: torchrun started local rank {local_rank} but only"
                f" {torch.cuda.device_count()} GPU(s) are visible; start one process per GPU or pass --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if args.bf16 and device.type != "cuda":
        fail("--bf16 needs a CUDA device; drop it on CPU/MPS")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    # 1. Processes: one per device; rank 0 logs, saves and evaluates.
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0

    # 2. Models. The built-in task is built by rank 0 (or found in its cache), then served to
    # the same code as real checkpoints.
    task = None
    if args.model_name_or_path is None:
        key = json.dumps({k: v for k, v in asdict(args).items() if k.startswith("task_")} | {"v": BUILTIN_VERSION})
        cache_dir = os.path.join(args.cache_dir or os.path.join(args.runs_dir, "builtin_task"), hashlib.sha1(key.encode()).hexdigest()[:10])
        if is_main:
            task = builtin_task(args, cache_dir)
        if world_size > 1:
            dist.barrier()
        if not is_main:
            task = builtin_task(args, cache_dir)  # built by rank 0: a cache hit
        policy_path, reward_path = os.path.join(cache_dir, "sft"), os.path.join(cache_dir, "reward")
        prompts_path, eval_prompts_path = os.path.join(cache_dir, "prompts.jsonl"), os.path.join(cache_dir, "eval_prompts.jsonl")
        lang = dict(np.load(os.path.join(cache_dir, "language.npz")))
        prefix = "builtin"
    else:
        policy_path, reward_path = args.model_name_or_path, args.reward_model_path
        prompts_path, eval_prompts_path = args.prompts, args.eval_prompts or args.prompts
        prefix = os.path.basename(os.path.normpath(args.model_name_or_path))
    policy_config = load_config(policy_path, "--model-name-or-path")
    rm_config = load_config(reward_path, "--reward-model-path")
    if rm_config.num_labels != 1:
        fail(f"--reward-model-path: {reward_path} has {rm_config.num_labels} labels; a reward model needs exactly one (num_labels=1)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left", truncation_side="left")
    except (OSError, ValueError) as e:
        fail(f"--model-name-or-path: cannot load a tokenizer from {policy_path} ({str(e).splitlines()[0]})")
    if tokenizer.eos_token_id is None:
        fail(f"--model-name-or-path: the tokenizer of {policy_path} has no EOS token; set one and save it again")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Padding must differ from EOS, or a real EOS would be masked out. The new id may lie
        # outside the embedding table; model_inputs never looks it up.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy = load_model(AutoModelForCausalLM, policy_path, policy_config, "--model-name-or-path").to(device)
    ref_policy = load_model(AutoModelForCausalLM, policy_path, policy_config, "--model-name-or-path").to(device).eval()
    reward_model = load_model(AutoModelForSequenceClassification, reward_path, rm_config, "--reward-model-path").to(device).eval()
    # Value model: a separate copy of the reward model (as in the TL;DR reproduction of Huang et
    # al., 2024). It starts out predicting scores, which is close to the returns it must learn,
    # and keeps value-loss gradients out of the policy's representation.
    value_model = load_model(AutoModelForSequenceClassification, reward_path, rm_config, "--reward-model-path").to(device)
    if not hasattr(reward_model, "score") or not hasattr(reward_model, reward_model.base_model_prefix):
        fail(f"--reward-model-path: {type(reward_model).__name__} has no `score` head on a backbone; pass a decoder model for sequence classification")
    for p in list(ref_policy.parameters()) + list(reward_model.parameters()):
        p.requires_grad_(False)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        value_model.gradient_checkpointing_enable()

    # 3. Prompts, tokenised once; the context must hold the longest prompt plus a full response.
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=args.max_prompt_length)["input_ids"]

    train_queries = tokenize(read_prompts(prompts_path, "--prompts"))
    eval_queries = tokenize(read_prompts(eval_prompts_path, "--eval-prompts" if args.eval_prompts else "--prompts"))[: args.eval_episodes]
    if min(len(q) for q in train_queries + eval_queries) == 0:
        fail("--prompts: a prompt tokenises to no tokens; remove empty prompts")
    longest = max(len(q) for q in train_queries + eval_queries)
    for model, flag in ((policy, "--model-name-or-path"), (reward_model, "--reward-model-path")):
        size = context_size(model.config)
        if size is not None and longest + args.response_length > size:
            fail(f"--response-length: {longest} prompt tokens + {args.response_length} response tokens exceed the {size}-token context of {flag}; lower --response-length or --max-prompt-length")
    embeddings = reward_model.get_input_embeddings().num_embeddings
    if max(max(q) for q in train_queries) >= embeddings:
        fail(f"--reward-model-path: its vocabulary ({embeddings}) is smaller than the policy tokenizer's; the reward model must share the policy's tokenizer")
    gen_config = sampling_config(args.response_length, args.temperature, eos_id, pad_id, policy.get_input_embeddings().num_embeddings)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # 4. Optimiser over policy and value model together (one loss, one clip of the global norm).
    # Their parameters and gradients live in one flat tensor each, so the fused Adam step, the
    # clip and the torchrun all-reduce are one call each: on small models a call per tensor costs
    # more than the arithmetic.
    flat_params = flatten_parameters([p for m in (policy, value_model) for p in m.parameters() if p.requires_grad])
    optimizer = torch.optim.Adam([flat_params], lr=args.learning_rate, eps=1e-5, fused=device.type in ("cpu", "cuda"))

    # 5. Run directory, or the state of the run being resumed.
    start_update, episode, kl_coef = 1, 0, args.kl_coef
    if resume_state is not None:
        run_name = resume_state["run_name"]
        try:
            policy.load_state_dict(resume_state["policy"])
            value_model.load_state_dict(resume_state["value_model"])
            optimizer.load_state_dict(resume_state["optimizer"])
        except (RuntimeError, ValueError):  # e.g. per-tensor Adam state, from before the flat parameters
            fail(f"--resume {args.resume}: its model or optimizer state does not fit this version of the script; start a new run")
        start_update, episode, kl_coef = resume_state["update"] + 1, resume_state["episode"], resume_state["kl_coef"]
    else:
        run_name = f"{prefix}__{args.exp_name}__{args.seed}__{int(time.time())}"
        if world_size > 1:  # every rank must agree on the run directory
            names = [run_name]
            dist.broadcast_object_list(names, src=0)
            run_name = names[0]
    run_dir = os.path.join(args.runs_dir, run_name)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
        if resume_state is not None and os.path.exists(metrics_path):
            # Lines logged after the checkpoint will be logged again by the resumed run.
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["episode"] <= episode]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    wandb = None
    if args.track and is_main:
        import wandb

        wandb.init(
            project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
            config=asdict(args) | ({"builtin_task": task} if task is not None else {}),
            id="".join(c if c.isalnum() or c in "-_" else "-" for c in run_name), resume="allow", dir=run_dir,
        )  # fmt: skip
        wandb.define_metric("*", step_metric="episode")

    def log(metrics: dict) -> None:
        if not is_main:
            return
        metrics = {"episode": episode, **metrics}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if wandb is not None:
            wandb.log(metrics)

    # 6. Seeds are set after the built-in task (which seeds itself from --task-seed), so a cached
    # and a freshly built task give the same run.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if resume_state is not None:
        set_rng_state(resume_state["rng"][rank], device)

    if is_main:
        print(
            f"run {run_name}: {batch} episodes per update = {micro} (micro-batch) x {args.gradient_accumulation_steps} "
            f"(gradient accumulation) x {args.num_minibatches} (minibatches) x {world_size} (processes); "
            f"{num_updates} updates = {num_updates * batch} episodes; {args.update_epochs} PPO epochs; "
            f"no-grad passes in chunks of {args.local_rollout_forward_batch_size}; device {device}"
        )
        if task is not None:
            print(f"built-in task: reward model held-out accuracy {task['rm_accuracy']:.3f}, SFT gold score {task['sft_gold_mean']:.3f} +- {task['sft_gold_std']:.3f}")

    def evaluate() -> tuple[dict, list]:
        """Sample the held-out prompts with a fixed seed (the same noise at every evaluation) and
        score them; on the built-in task also with the hidden gold reward."""
        policy.eval()
        queries_all, responses_all, scores_all = [], [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), autocast:
            torch.manual_seed(args.seed + 10_000)
            for i in range(0, len(eval_queries), args.local_rollout_forward_batch_size):
                queries = left_pad(eval_queries[i : i + args.local_rollout_forward_batch_size], pad_id, device)
                responses = truncate_after_eos(generate(policy, queries, pad_id, gen_config, args.response_length)[0], eos_id, pad_id)
                scores = sequence_scores(reward_model, torch.cat([queries, responses], 1), pad_id, queries.size(1))
                scores_all.append(apply_missing_eos_penalty(scores, responses, eos_id, args.missing_eos_penalty))
                queries_all += [[t for t in q if t != pad_id] for q in queries.tolist()]
                responses_all += responses.tolist()
        metrics = {"eval/scores": torch.cat(scores_all).mean().item()}
        gold = None
        if task is not None:
            n_special = len(BUILTIN_SPECIALS)
            gold = [builtin_gold_score(lang, [t - n_special for t in q], builtin_words(r, eos_id, pad_id)) for q, r in zip(queries_all, responses_all)]
            metrics["objective/gold_score"] = float(np.mean(gold))
        rows = [
            [episode, tokenizer.decode(q), tokenizer.decode([t for t in r if t != pad_id]), s.item()] + ([gold[i]] if gold else [])
            for i, (q, r, s) in enumerate(zip(queries_all[:8], responses_all[:8], torch.cat(scores_all)[:8]))
        ]
        return metrics, rows

    def evaluate_and_log(last: dict) -> None:
        metrics, rows = evaluate()
        log(metrics)
        if wandb is not None:
            columns = ["episode", "query", "response", "score"] + (["gold_score"] if task is not None else [])
            wandb.log({"episode": episode, "samples": wandb.Table(columns=columns, data=rows)})
        print(
            f"update {update}/{num_updates} episode {episode}: "
            + " ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in metrics.items())
            + "".join(f" {k} {last[k]:.3f}" for k in ("objective/scores", "objective/kl", "objective/kl_coef", "eps") if k in last)
            + f" | {rows[0][1][-60:]!r} -> {rows[0][2][:60]!r}"
        )

    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        print("Ctrl-C: finishing this update, then saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)

    def checkpoint(update: int) -> None:
        rngs = [rng_state(device)]
        if world_size > 1:
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_state(device))
        if is_main:
            save_checkpoint(
                os.path.join(run_dir, "checkpoint.pt"),
                dict(
                    run_name=run_name, args=asdict(args), update=update, episode=episode, kl_coef=kl_coef,
                    policy=policy.state_dict(), value_model=value_model.state_dict(), optimizer=optimizer.state_dict(), rng=rngs,
                ),
            )  # fmt: skip

    update = 0
    if resume_state is None and is_main:
        evaluate_and_log({})  # the SFT policy's scores: the baseline the run must beat
    start_time, start_episode = time.time(), episode
    for update in range(start_update, num_updates + 1):
        # 7. Learning rate annealed linearly to 0 at the last update.
        lr = args.learning_rate * (1.0 - (update - 1.0) / num_updates if args.anneal_lr else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 8. Rollout (no grad, in chunks): this rank's slice of the global batch of prompts,
        # drawn without replacement from a fresh permutation each pass over the prompts.
        first = (update - 1) * batch + rank * local_batch
        positions = range(first, first + local_batch)
        perms = {e: np.random.default_rng([args.seed, e]).permutation(len(train_queries)) for e in {p // len(train_queries) for p in positions}}
        batch_queries = left_pad([train_queries[perms[p // len(train_queries)][p % len(train_queries)]] for p in positions], pad_id, device)
        context_length = batch_queries.size(1)
        policy.eval()
        value_model.eval()
        chunk = args.local_rollout_forward_batch_size
        responses, logprobs, ref_logprobs, scores, values = [], [], [], [], []
        with torch.no_grad(), autocast:
            for i in range(0, local_batch, chunk):
                queries = batch_queries[i : i + chunk]
                response, logprob = generate(policy, queries, pad_id, gen_config, args.response_length)
                response = truncate_after_eos(response, eos_id, pad_id)
                query_response = torch.cat([queries, response], 1)
                ref_logprobs.append(lm_response_logprobs(ref_policy, query_response, pad_id, context_length, args.temperature)[0])
                score = sequence_scores(reward_model, query_response, pad_id, context_length)
                scores.append(apply_missing_eos_penalty(score, response, eos_id, args.missing_eos_penalty))
                values.append(token_scores(value_model, query_response, pad_id)[:, context_length - 1 : -1])
                responses.append(response)
                logprobs.append(logprob)
        responses, logprobs, ref_logprobs = torch.cat(responses), torch.cat(logprobs), torch.cat(ref_logprobs)
        scores, values = torch.cat(scores), torch.cat(values)
        query_responses = torch.cat([batch_queries, responses], 1)
        mask = responses != pad_id
        logprobs, ref_logprobs = torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0)
        values = torch.where(mask, values, 0.0)
        episode += batch

        # 9. Rewards: per-token KL penalty plus the score at the last real token; GAE over tokens.
        rewards, kl, non_score_reward = shape_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, args.kl_estimator)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, args.gamma, args.gae_lambda)
        if args.norm_adv:
            advantages = whiten(advantages, mask)

        # 10. PPO epochs over shuffled minibatches; gradients accumulated over micro-batches and
        # averaged over processes before clipping and stepping.
        policy.train()  # dropout is off; train mode only activates gradient checkpointing
        value_model.train()
        stats = torch.zeros(7, args.update_epochs, args.num_minibatches, args.gradient_accumulation_steps, device=device)
        for epoch in range(args.update_epochs):
            perm = torch.randperm(local_batch, device=device)
            for mb in range(args.num_minibatches):
                for acc in range(args.gradient_accumulation_steps):
                    idx = perm[mb * minibatch + acc * micro : mb * minibatch + (acc + 1) * micro]
                    mb_mask = mask[idx]
                    with autocast:
                        new_logprobs, logits = lm_response_logprobs(policy, query_responses[idx], pad_id, context_length, args.temperature)
                        new_values = token_scores(value_model, query_responses[idx], pad_id)[:, context_length - 1 : -1]
                    pg_loss, pg_clipfrac, approx_kl, ratio = policy_loss(new_logprobs, logprobs[idx], advantages[idx], mb_mask, args.clip_coef)
                    vf_loss, vf_clipfrac = value_loss(new_values, values[idx], returns[idx], mb_mask, args.vf_clip_coef if args.clip_vloss else None)
                    loss = (pg_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps
                    loss.backward()
                    with torch.no_grad():
                        entropy = masked_mean(torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1), mb_mask)
                        stats[:, epoch, mb, acc] = torch.stack([approx_kl, pg_clipfrac, pg_loss, vf_loss, vf_clipfrac, entropy, ratio])
                if world_size > 1:
                    dist.all_reduce(flat_params.grad)
                    flat_params.grad /= world_size
                nn.utils.clip_grad_norm_([flat_params], args.max_grad_norm)
                optimizer.step()
                flat_params.grad.zero_()

        # 11. Statistics (averaged over processes), adaptive KL coefficient, logging.
        with torch.no_grad():
            ratios = stats[6].flatten()
            local = {
                "objective/kl": kl.sum(1).mean(),
                "objective/entropy": (-logprobs).sum(1).mean(),
                "objective/non_score_reward": non_score_reward.sum(1).mean(),
                "objective/scores": scores.mean(),
                "policy/approxkl_avg": stats[0].mean(),
                "policy/clipfrac_avg": stats[1].mean(),
                "loss/policy_avg": stats[2].mean(),
                "loss/value_avg": stats[3].mean(),
                "val/clipfrac_avg": stats[4].mean(),
                "policy/entropy_avg": stats[5].mean(),
                "val/ratio": ratios.mean(),
                "val/ratio_var": ratios.var() if ratios.numel() > 1 else ratios.new_zeros(()),
                "val/num_eos_tokens": (responses == eos_id).sum().float() * world_size,  # a sum over processes
                "objective/response_length": mask.sum(1).float().mean(),
                "objective/eos_fraction": (responses == eos_id).any(1).float().mean(),
            }
            summary = torch.stack(list(local.values()))
            if world_size > 1:
                dist.all_reduce(summary)
                summary /= world_size
        last = dict(zip(local, summary.tolist()))
        last["objective/rlhf_reward"] = last["objective/scores"] + last["objective/non_score_reward"]
        last |= {"objective/kl_coef": kl_coef, "lr": lr, "eps": (episode - start_episode) / (time.time() - start_time)}
        log(last)
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, last["objective/kl"], args.target_kl, args.kl_horizon, batch)
        if is_main and (update % args.eval_every == 0 or update == num_updates):
            evaluate_and_log(last)

        # 12. Checkpoint every --save-every updates, and stop cleanly after a Ctrl-C on any rank.
        stop = torch.tensor(float(interrupted), device=device)
        if world_size > 1:
            dist.all_reduce(stop)
        if stop.item() > 0 and update < num_updates:
            checkpoint(update)
            if is_main:
                print(f"interrupted: checkpoint saved; continue with --resume {os.path.join(run_dir, 'checkpoint.pt')}")
            break
        if args.save_every and update % args.save_every == 0 and update < num_updates:
            checkpoint(update)
    else:
        # 13. The end: a final checkpoint and the policy as an ordinary Hugging Face model.
        checkpoint(num_updates)
        if is_main:
            policy.save_pretrained(os.path.join(run_dir, "policy"))
            tokenizer.save_pretrained(os.path.join(run_dir, "policy"))
            print(f"done: policy saved to {os.path.join(run_dir, 'policy')}")
    if wandb is not None:
        wandb.finish()
    if world_size > 1:
        dist.barrier()  # wait for rank 0 to finish evaluating: a rank leaving gloo early once died of SIGABRT
        dist.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
