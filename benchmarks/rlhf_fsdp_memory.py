"""Peak memory per process and time per iteration of ppo_rlhf.py on the CPU, full fine-tuning of the random
0.39B-parameter Qwen2 of rlhf_lora_memory.py (Qwen2.5-0.5B's shape, 32,000-token vocabulary): one unsharded process
against --fsdp over 2 torchrun processes (gloo).

The same per-process work in both: micro-batch 2, 2 minibatches, 1 epoch, 15-token prompts, 16-token responses, a
length reward function (no reward model; the value model is the policy's weights with a new head). Peak memory and
time per iteration as rlhf_lora_memory.measure takes them. Two unsharded processes would each need what the single
one does (18.8 GiB measured, results/rlhf/fsdp_memory.json): on a 24 GiB machine they do not fit, so that run is
not attempted.

    python benchmarks/rlhf_fsdp_memory.py --model-dir /tmp/qwen2-0.39b
    python benchmarks/rlhf_fsdp_memory.py --device cuda --bf16 --fsdp-processes 1   # one GPU, nccl (not run yet)

On a GPU the peak resident memory is the host's; the GPU's own use is what the run's first lines print.
"""

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rlhf_lora_memory import SCRIPT, build, measure, ppo_flags  # noqa: E402


@dataclass
class Args:
    model_dir: str = "/tmp/qwen2-0.39b"
    """where the random model, its tokenizer, prompts and reward function are built (once)"""
    out: str = "benchmarks/results/rlhf/fsdp_memory.json"
    """results file"""
    threads: int = 1
    """--num-threads of each process"""
    iterations: int = 3
    """iterations per run"""
    device: str = "cpu"
    """--device of the runs (cuda: one GPU per process)"""
    bf16: bool = False
    """--bf16 in both runs (CUDA only)"""
    fsdp_processes: int = 2
    """torchrun processes of the --fsdp run"""


def run(args: Args, name: str, processes: int, fsdp: bool) -> dict:
    runs_dir = os.path.join(args.model_dir, "runs", name)
    shutil.rmtree(runs_dir, ignore_errors=True)  # an earlier run of this benchmark
    launcher = [sys.executable, SCRIPT] if not fsdp else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), SCRIPT, "--fsdp",
    ]  # fmt: skip
    flags = ppo_flags(args.model_dir, runs_dir, 4 * processes * args.iterations, args.threads)
    cmd = [*launcher, *flags, "--device", args.device, *(["--bf16"] if args.bf16 else [])]
    start = time.time()
    out, peak_rss_gib, seconds_per_iteration = measure(name, cmd, runs_dir, args.threads)
    record = dict(
        setting=name, processes=processes, device=args.device, bf16=args.bf16, peak_rss_gib_per_process=peak_rss_gib,
        seconds_per_iteration=seconds_per_iteration, episodes_per_iteration=4 * processes, wall_s=round(time.time() - start),
        memory_line=next(line for line in out.splitlines() if line.startswith("memory per process")),
    )  # fmt: skip
    print(record, flush=True)
    return record


def main(args: Args) -> None:
    if not os.path.exists(os.path.join(args.model_dir, "rewards.py")):
        build(args.model_dir)
    records = [run(args, "unsharded", 1, fsdp=False), run(args, "fsdp", args.fsdp_processes, fsdp=True)]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model_dir")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(settings=settings, runs=records), f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
