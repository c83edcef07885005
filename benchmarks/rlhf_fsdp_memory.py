"""Peak memory per process and time per iteration of ppo_rlhf.py on the CPU, full fine-tuning of the random
0.39B-parameter Qwen2 of rlhf_lora_memory.py (Qwen2.5-0.5B's shape, 32,000-token vocabulary): one unsharded process
against --fsdp over 2 torchrun processes (gloo).

The same per-process work in both: micro-batch 2, 2 minibatches, 1 epoch, 15-token prompts, 16-token responses, a
length reward function (no reward model; the value model is the policy's weights with a new head). Peak memory and
time per iteration as rlhf_lora_memory.measure takes them. Two unsharded processes would each need what the single
one does (18.8 GiB measured, results/rlhf/fsdp_memory.json): on a 24 GiB machine they do not fit, so that run is
not attempted.

The loading peak of each process (the largest resident set size sampled every 0.1 s until the run prints its
memory line) is measured too; --load-only stops the runs there, and --script runs another ppo_rlhf.py (the one
before sharded loading, say). glibc keeps freed buffers below its mmap threshold for reuse, which the resident
size counts: MALLOC_MMAP_THRESHOLD_=1048576 in the environment measures without most of them.

    python benchmarks/rlhf_fsdp_memory.py --model-dir /tmp/qwen2-0.39b
    python benchmarks/rlhf_fsdp_memory.py --settings fsdp --load-only --script OLD/ppo_rlhf.py --out OLD.json
    python benchmarks/rlhf_fsdp_memory.py --model-dir /tmp/qwen2-0.39b-bf16 --saved-dtype bfloat16 --load-only
    python benchmarks/rlhf_fsdp_memory.py --device cuda --bf16 --fsdp-processes 1   # one GPU, nccl (not run yet)

On a GPU the peak resident memory is the host's; the GPU's own use is what the run's first lines print.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import tyro

from stamp import stamp

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
    settings: tuple[str, ...] = ("unsharded", "fsdp")
    """the runs to make, of unsharded and fsdp"""
    load_only: bool = False
    """stop each run once its models are loaded (at its memory line): the loading peak alone, in minutes"""
    script: str = SCRIPT
    """the ppo_rlhf.py to run (an older one, to compare loading)"""
    saved_dtype: str = "float32"
    """dtype the random model is saved in when built (the runs load it in float32 all the same)"""


class PeakRss(threading.Thread):
    """The peak resident set size of each process under this one (the run and, under torchrun, its workers),
    sampled every 0.1 s until stop()."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks, self.done = {}, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for process in psutil.Process().children(recursive=True):
                try:
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), process.memory_info().rss)
                except psutil.Error:  # it ended between the listing and the reading
                    pass

    def stop(self, processes: int) -> list[float]:
        """The peaks so far of the `processes` largest processes (the runs' own: torchrun's launcher is smaller), in
        GiB, largest first; sampling ends."""
        self.done.set()
        self.join()
        return [round(peak / 2**30, 2) for peak in sorted(self.peaks.values(), reverse=True)[:processes]]


def loaded(line: str) -> bool:
    """The run's memory line: printed once its models are loaded (and sharded) and its optimizer built."""
    return line.startswith("memory per process")


def loading_peak(cmd: list[str], threads: int, processes: int) -> tuple[list[float], str]:
    """--load-only: the loading peak of each process (GiB, largest first) and the memory line, the run stopped at
    that line."""
    sampler = PeakRss()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.PIPE, text=True)
    line = next((line for line in proc.stdout if loaded(line)), None)
    peaks = sampler.stop(processes)
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.kill()
    proc.wait()
    if line is None:
        raise SystemExit(f"{cmd} ended before its memory line")
    return peaks, line.strip()


def run(args: Args, name: str, processes: int, fsdp: bool) -> dict:
    runs_dir = os.path.join(args.model_dir, "runs", name)
    shutil.rmtree(runs_dir, ignore_errors=True)  # an earlier run of this benchmark
    launcher = [sys.executable, args.script] if not fsdp else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), args.script, "--fsdp",
    ]  # fmt: skip
    flags = ppo_flags(args.model_dir, runs_dir, 4 * processes * args.iterations, args.threads)
    cmd = [*launcher, *flags, "--device", args.device, *(["--bf16"] if args.bf16 else [])]
    script = "ppo_rlhf.py" if args.script == SCRIPT else args.script
    record = dict(setting=name, processes=processes, device=args.device, bf16=args.bf16, script=script)
    start = time.time()
    if args.load_only:
        record["loading_peak_rss_gib_by_process"], record["memory_line"] = loading_peak(cmd, args.threads, processes)
    else:
        sampler, loading = PeakRss(), []

        def on_line(line: str, proc) -> None:
            if loaded(line):
                loading.append(sampler.stop(processes))

        out, peak_rss_gib, seconds_per_iteration = measure(name, cmd, runs_dir, args.threads, on_line)
        record |= dict(
            peak_rss_gib_per_process=peak_rss_gib, loading_peak_rss_gib_by_process=loading[0],
            seconds_per_iteration=seconds_per_iteration, episodes_per_iteration=4 * processes,
            memory_line=next(line for line in out.splitlines() if loaded(line)),
        )  # fmt: skip
    record["wall_s"] = round(time.time() - start)
    print(record, flush=True)
    return record


def main(args: Args) -> None:
    if not os.path.exists(os.path.join(args.model_dir, "rewards.py")):
        build(args.model_dir, args.saved_dtype)
    runs = dict(unsharded=(1, False), fsdp=(args.fsdp_processes, True))
    started = stamp(__file__)
    records = [run(args, name, *runs[name]) | {"stamp": started} for name in args.settings]  # kept runs keep their own
    if os.path.exists(args.out):  # the runs of settings (or of other scripts) not made this time are kept
        made = {(r["setting"], r["script"]) for r in records}
        with open(args.out) as f:
            records = [r for r in json.load(f)["runs"] if (r["setting"], r.get("script", "ppo_rlhf.py")) not in made] + records
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model_dir", "settings", "script")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(settings=settings, runs=records), f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
