"""The thread trap: the default thread count of ppo_discrete.py and ppo_continuous.py before and after
`--num-threads 0` came to mean one thread for an MLP, with one other CPU-bound job on the machine, as a new user
would meet it. Each round runs, with default flags and no OMP_NUM_THREADS: the scripts at --old-commit (12ddd4d:
torch's default thread count, a thread per core), the current scripts (one thread for the MLP), and the old scripts
with --num-threads 1 (whether the difference is the threads or the code). Writes benchmarks/results/thread_trap.json.

    .venv/bin/python benchmarks/thread_trap.py --rounds 5        # a busy loop on the side, as in issue 10
    .venv/bin/python benchmarks/thread_trap.py --no-busy          # the same on a quiet machine
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stamp import stamp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from cleanrl_sps import busy_seconds  # noqa: E402  (CPU the machine spent busy, from /proc/stat)

CASES = {
    "CartPole-v1": ["ppo_discrete.py", "--total-timesteps", "50000"],
    "InvertedPendulum-v5": ["ppo_continuous.py", "--env-id", "InvertedPendulum-v5", "--total-timesteps", "8192"],
}


def run(script: Path, flags: list[str]) -> dict:
    """One training run with default threading (no OMP_NUM_THREADS); its SPS, wall time, CPU time, and the
    cores every other process (the busy job included) used meanwhile."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as work:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, start = busy_seconds(), time.perf_counter()
        cmd = [sys.executable, str(script), *flags, "--runs-dir", str(Path(work) / "runs")]
        proc = subprocess.run(cmd, cwd=work, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True)
        wall, busy = time.perf_counter() - start, busy_seconds() - busy
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        (path,) = Path(work).glob("runs/*/metrics.jsonl")
        sps = [r["charts/SPS"] for r in map(json.loads, path.read_text().splitlines()) if "charts/SPS" in r][-1]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"sps": sps, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "other_cores": round(max(busy - cpu, 0) / wall, 2)}


def main() -> None:
    started = stamp(__file__)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-commit", default="12ddd4d", help="commit whose --num-threads 0 meant torch's default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--busy", action=argparse.BooleanOptionalAction, default=True, help="a busy loop beside the runs")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    old_dir = Path(tempfile.mkdtemp())
    for case in args.cases:
        name = CASES[case][0]
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old_commit}:{name}"], check=True, capture_output=True, text=True)
        (old_dir / name).write_text(source.stdout)
    default_threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                                     text=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}).stdout.strip()  # fmt: skip
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    results = {"stamp": started, "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "torch_default_threads": int(default_threads),
               "busy_loop_beside": args.busy, "old_commit": args.old_commit, "cases": {}}  # fmt: skip
    try:
        for case in args.cases:
            script, *flags = CASES[case]
            variants = {
                f"{args.old_commit}, default (torch's {default_threads} threads)": (old_dir / script, flags),
                "current, default (1 thread)": (ROOT / script, flags),
                f"{args.old_commit}, --num-threads 1": (old_dir / script, flags + ["--num-threads", "1"]),
            }
            rounds = []
            for r in range(args.rounds):
                rounds.append({label: run(path, f) for label, (path, f) in variants.items()})
                print(f"{case} round {r + 1}: " + ", ".join(f"{k}: {v['sps']} SPS ({v['wall_s']} s)" for k, v in rounds[-1].items()), flush=True)
            old, new = list(variants)[:2]
            ratios = [x[new]["sps"] / x[old]["sps"] for x in rounds]
            results["cases"][case] = {"command": " ".join([script, *flags]), "rounds": rounds, "ratio_current_over_old": ratios,
                                      "median_ratio": statistics.median(ratios)}  # fmt: skip
            print(f"{case}: current / old default SPS per round {' '.join(f'{x:.1f}' for x in ratios)}", flush=True)
    finally:
        if busy is not None:
            busy.terminate()
    out = ROOT / "benchmarks" / "results" / ("thread_trap.json" if args.busy else "thread_trap_quiet.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
