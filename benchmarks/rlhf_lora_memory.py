"""Peak memory and time per iteration of ppo_rlhf.py on the CPU, full fine-tuning against LoRA, for a random
0.39B-parameter Qwen2 (Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864;
vocabulary 32,000 instead of 151,936, tied embeddings).

Builds the model once into --model-dir (random weights, a byte-level Qwen2 tokenizer, prompts, a length reward
function), then runs ppo_rlhf.py on it for each setting, one run at a time, with no reward model (the value model
is the policy's weights with a new head, as with reward functions only). Peak memory: the run's maximum resident
set size (os.wait4's ru_maxrss for that process, model loading included). Time per iteration: the episodes trained
over the last logged episodes/s, per iteration (a rollout and a PPO update; loading and evaluation excluded).

    python benchmarks/rlhf_lora_memory.py --model-dir /tmp/qwen2-0.39b
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

from stamp import stamp

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ppo_rlhf.py")
REWARD_FN = "def length(prompts, completions, completion_ids, **kwargs):\n    return [len(ids) / 16 for ids in completion_ids]\n"


@dataclass
class Args:
    model_dir: str = "/tmp/qwen2-0.39b"
    """where the random model, its tokenizer, prompts and reward function are built (once)"""
    out: str = "benchmarks/results/rlhf/lora_memory.json"
    """results file"""
    threads: int = 1
    """--num-threads of each run"""
    lora_r: int = 16
    """LoRA rank of the LoRA run"""
    lora_alpha: float = 32.0
    """LoRA alpha of the LoRA run"""
    lora_target_modules: str = "all-linear"
    """LoRA target modules of the LoRA run"""
    iterations: int = 3
    """iterations per run"""


def build(model_dir: str, dtype: str = "float32") -> None:
    """The random model saved in `dtype` (Qwen2.5's own checkpoints are bfloat16), its tokenizer, prompts and reward."""
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    print(f"built a random Qwen2 of {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")
    model.to(getattr(torch, dtype)).save_pretrained(model_dir)
    vocab = {tok: i for i, tok in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=None, pad_token=None)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    with open(os.path.join(model_dir, "prompts.jsonl"), "w") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": " ".join(rng.choice(list("abcdefgh"), 8))}) + "\n")  # 15 tokens
    with open(os.path.join(model_dir, "rewards.py"), "w") as f:
        f.write(REWARD_FN)


def ppo_flags(model_dir: str, runs_dir: str, episodes: int, threads: int) -> list[str]:
    """ppo_rlhf.py's flags shared by the memory benchmarks: the model built in model_dir, its length reward, micro-batch 2,
    2 minibatches, 1 epoch, 16-token responses, evaluation only at the end."""
    return [
        "--model-name-or-path", model_dir, "--prompts", os.path.join(model_dir, "prompts.jsonl"),
        "--reward-fn", os.path.join(model_dir, "rewards.py") + ":length", "--runs-dir", runs_dir,
        "--response-length", "16", "--per-device-train-batch-size", "2", "--num-minibatches", "2", "--update-epochs", "1",
        "--local-rollout-forward-batch-size", "4", "--total-episodes", str(episodes), "--eval-every", "1000",
        "--eval-episodes", "4", "--num-threads", str(threads), "--learning-rate", "1e-5",
    ]  # fmt: skip


def measure(name: str, cmd: list[str], runs_dir: str, threads: int, on_line=None) -> tuple[str, float, float]:
    """Run cmd (one run writing under runs_dir); its stdout, peak resident set size in GiB (os.wait4's ru_maxrss:
    for torchrun, its largest process) and seconds per iteration (the episodes trained over the last logged
    episodes/s, per logged iteration). on_line(line, proc) is called on each line of stdout as it comes."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line, proc)
    out = "".join(lines)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{name} failed:\n{out[-3000:]}")
    (run_name,) = os.listdir(runs_dir)
    with open(os.path.join(runs_dir, run_name, "metrics.jsonl")) as f:
        train = [m for m in map(json.loads, f) if "eps" in m]
    return out, round(usage.ru_maxrss / 2**20, 2), round(train[-1]["episode"] / train[-1]["eps"] / len(train), 1)


def run(args: Args, name: str, extra: list[str]) -> dict:
    runs_dir = os.path.join(args.model_dir, "runs", name)
    shutil.rmtree(runs_dir, ignore_errors=True)  # an earlier run of this benchmark
    cmd = [sys.executable, SCRIPT, *ppo_flags(args.model_dir, runs_dir, 4 * args.iterations, args.threads), *extra]
    start = time.time()
    out, peak_rss_gib, seconds_per_iteration = measure(name, cmd, runs_dir, args.threads)
    record = dict(
        setting=name, flags=extra, peak_rss_gib=peak_rss_gib, seconds_per_iteration=seconds_per_iteration, wall_s=round(time.time() - start),
        trained_parameters=next((line.split(": ")[1].split(" ")[0] for line in out.splitlines() if line.startswith("LoRA")), "all"),
    )  # fmt: skip
    print(record)
    return record


def main(args: Args) -> None:
    if not os.path.exists(os.path.join(args.model_dir, "rewards.py")):
        build(args.model_dir)
    lora = ["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--lora-target-modules", args.lora_target_modules]
    started = stamp(__file__)
    records = [run(args, "lora", lora), run(args, "full", [])]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model_dir")}
    with open(args.out, "w") as f:
        json.dump(dict(stamp=started, settings=settings, runs=records), f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
