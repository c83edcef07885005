"""Stamps for the results written before benchmarks/stamp.py existed, recovered from git history:

    python benchmarks/recover_stamps.py        # writes benchmarks/results/stamps_recovered.json

For each result (a file, or a run folder of results/continuous/), the commit that wrote what is there now (for a
run folder: the commit that added its args.json, which a run writes once), its date, the benchmark script that
makes it and the measured scripts, each at its last commit at or before that one. A result may have been measured
with uncommitted edits of those scripts, and the machine's CPU, load and the exact command were not recorded (unless
the file says so itself): every entry says `"recovered_from_history": true`, never that it was recorded. A result
that carries its own stamp (a "stamp" key, or stamp.json in a run folder) is left out.
"""

import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "stamps_recovered.json"

# result (path under results/, a prefix for a group) -> (benchmark script, scripts it measures)
MAKERS = [
    ("cleanrl_sps", "cleanrl_sps.py", ["ppo_discrete.py", "ppo_continuous.py"]),
    ("continuous_sps.json", "continuous_sps.py", ["ppo_continuous.py"]),
    ("discrete_breakout_fire.json", None, ["ppo_discrete.py"]),
    ("discrete_taxi_masks.", "discrete_taxi_masks.py", ["ppo_discrete.py"]),
    ("discrete_", "bench_discrete.py", ["ppo_discrete.py"]),
    ("rlhf_vs_trl", "rlhf_vs_trl.py", ["ppo_rlhf.py"]),
    ("thread_trap.json", "thread_trap.py", ["ppo_discrete.py", "ppo_continuous.py"]),
    ("rlhf/gold_reward.", "rlhf_gold_reward.py", ["ppo_rlhf.py"]),
    ("rlhf/lora_memory.json", "rlhf_lora_memory.py", ["ppo_rlhf.py"]),
    ("rlhf/fsdp_", "rlhf_fsdp_memory.py", ["ppo_rlhf.py"]),
    ("rlhf/vocab_memory.json", "rlhf_vocab_memory.py", ["ppo_rlhf.py"]),
    ("rlhf/", "rlhf_sweep.py", ["ppo_rlhf.py"]),
    ("continuous/sb3_equivalence.json", "sb3_equivalence.py", ["ppo_continuous.py"]),
    ("continuous/sb3-zoo/", "sb3_mujoco.py", []),
    ("continuous/", "continuous_returns.py", ["ppo_continuous.py"]),
    ("gpu/", "device_check.sh", ["ppo_discrete.py", "ppo_continuous.py", "ppo_rlhf.py"]),
]
# runs a later commit deleted, put back under a label of their own: (label, where they were, a commit that had them)
MOVED = [
    ("continuous/cleanrl-2026-11-25/", "continuous/cleanrl/", "7707410~1"),
    ("continuous/zoo-halfcheetah-2026-11-25/", "continuous/zoo-halfcheetah/", "5488d5b~1"),
    ("cleanrl_sps_before_per_op_work.json", "cleanrl_sps.json", "5bf55ae~1"),  # overwritten by 5bf55ae's rerun
]


NOTE = ("the checkout a result was measured in is not recorded: the scripts' commits are the last ones on this "
        "branch at or before the commit that added the result (the run may have used an earlier one, or uncommitted edits)")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


# commits that rewrote results without measuring anything: a result's measurement is the commit before
REFORMATS = {"22f0ea9": "per-run logs gzipped, learning curves one line each in the JSON files"}


def last_commit(path: str, at: str = "HEAD") -> str:
    return git("log", "-1", "--format=%h", at, "--", path)


def measured_in(path: str, at: str = "HEAD") -> tuple:
    """The last commit that changed path's numbers, and the reformatting commits after it."""
    commits = git("log", "--format=%h", at, "--", path).splitlines()
    later = [c for c in commits if c in REFORMATS]
    return next((c for c in commits if c not in REFORMATS), commits[-1]), later


def maker(name: str) -> tuple:
    return next(((script, measured) for prefix, script, measured in MAKERS if name.startswith(prefix)), (None, []))


def recovered(name: str, written_by: Path) -> dict:
    """The history of one result; written_by is the file whose last commit dates it."""
    rel, at, moved = str(written_by.relative_to(ROOT)), "HEAD", None
    for label, before, ref in MOVED:
        if name.startswith(label):
            rel, at, moved = rel.replace(label, before, 1), ref, f"deleted by {ref[:-2]}, restored from {ref}"
    commit, reformats = measured_in(rel, at)
    script, measured = maker(name)
    entry = {"recovered_from_history": True, "written_in": commit, "commit_date": git("log", "-1", "--format=%cI", commit)}
    for c in reformats:
        entry[f"rewritten_in_{c}"] = REFORMATS[c]
    if moved:
        entry["restored"] = moved.replace("deleted", "deleted or overwritten")
    if script:
        entry["benchmark_script"] = f"benchmarks/{script}"
        entry["benchmark_script_commit_then"] = last_commit(f"benchmarks/{script}", commit) or "not yet committed"
    else:
        entry["benchmark_script"] = "none (run by hand; the command is in the file)"
    entry["measured_scripts_commit_then"] = {s: last_commit(s, commit) for s in measured}
    started = name.rsplit("__", 1)[-1]
    if name.startswith("continuous/") and started.isdigit():  # a run folder's name ends with its start time
        entry["run_started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(started)))
    entry["note"] = NOTE
    return entry


def results() -> dict:
    """Every result to stamp: files, and run folders under results/continuous/{label}/{env}/seed{n}/."""
    found = {}
    tracked = git("ls-files", str(RESULTS.relative_to(ROOT))).splitlines()
    for rel in tracked:
        path = ROOT / rel
        name = str(path.relative_to(RESULTS))
        derived = path.name in ("summary.md", "stdout.log", "stamp.json") or name.startswith("continuous/") and "_vs_" in name
        if name == OUT.name or path.suffix == ".png" or derived:
            continue
        if name.startswith("continuous/") and name.count("/") >= 4:  # a run: dated by its args.json
            run = path.parent
            if (run.parent / "stamp.json").exists() or (run / "stamp.json").exists():
                continue
            args = run / "args.json"
            found.setdefault(str(run.relative_to(RESULTS)), args if args.exists() else path)
            continue
        if path.suffix == ".json" and "stamp" in json.loads(path.read_text()):
            continue
        found[name] = path
    return found


def main() -> None:
    stamps = {name: recovered(name, path) for name, path in sorted(results().items())}
    OUT.write_text(json.dumps(stamps, indent=1) + "\n")
    print(f"{len(stamps)} results: {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
