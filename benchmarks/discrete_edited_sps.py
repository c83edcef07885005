"""Steps per second of ppo_discrete.py as shipped and with a researcher's edit of its policy, against CleanRL's ppo.py
on CartPole-v1 (defaults of both, alternated runs, one torch thread each), and what one call of the rollout's policy
costs on 4 CartPole observations: the numpy code derived from get_action_and_value, eager torch, and the hand-written
numpy copy that the derived code replaced (ppo_discrete.py at b6ded54).

    python3 -m venv /tmp/venv-cleanrl && /tmp/venv-cleanrl/bin/pip install -r benchmarks/requirements-cleanrl.txt
    python benchmarks/discrete_edited_sps.py --cleanrl-dir /tmp/cleanrl --cleanrl-python /tmp/venv-cleanrl/bin/python

The edits are written by this script into copies of ppo_discrete.py, as a researcher would make them: a learned
softmax temperature (2 lines, starting at 1) and ReLU for tanh in both MLPs. Each pair runs ours as shipped, each
edited copy, then CleanRL's; ratios are taken pair by pair. SPS is each script's own figure at its last iteration
(steps over the time since its loop started; our one-time torch.export at set-up is outside it, as CleanRL's set-up
is outside its figure); whole-process wall times are kept beside it. Writes benchmarks/results/discrete_edited_sps.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cleanrl_sps import ROOT, RESULTS, SUITES, cleanrl_commit, describe, run_cleanrl, run_ours  # noqa: E402

RETURN_LOGP = "        return torch.cat([x.log_softmax(-1) for x in logits.split(self.nvec, -1)], -1), value"
EDITS = {
    "learned temperature": [
        ("        self.obs_onehot = ", "        self.log_temperature = nn.Parameter(torch.tensor(0.0))\n        self.obs_onehot = "),
        (RETURN_LOGP, RETURN_LOGP.replace("logits.split", "(logits / self.log_temperature.exp()).split")),
    ],
    "ReLU": [("nn.Tanh(),", "nn.ReLU(),")],
}  # fmt: skip

# One call of the rollout's policy on 4 CartPole observations, in microseconds: best of many rounds, the variants
# interleaved so that load hits them alike.
PER_CALL = r"""
import importlib.util, json, sys, timeit, numpy as np, torch, gymnasium as gym
torch.set_num_threads(1)
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
new, old = load("new", sys.argv[1]), load("old", sys.argv[2])
edited = {name: load(name.replace(" ", "_"), path) for name, path in json.loads(sys.argv[3]).items()}
space, obs = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
calls = {}
for name, module in {"shipped": new, **edited}.items():
    agent, mask = module.Agent(space, 2, False), module.all_valid(4, 2)
    policy = module.RolloutPolicy(agent, torch.device("cpu"), np.random.default_rng(1), obs, mask)
    assert policy.fast, name
    calls[f"derived numpy, {name}"] = lambda policy=policy, mask=mask: policy.act(obs, mask, 0)
    def eager(agent=agent):
        with torch.inference_mode():
            [t.numpy() for t in agent.get_action_and_value(torch.as_tensor(obs))]
    calls[f"eager torch get_action_and_value, {name}"] = eager
old_agent = old.Agent(space, 2, False)
old_policy, old_mask = old.RolloutPolicy(old_agent, torch.device("cpu"), np.random.default_rng(1)), old.all_valid(4, 2)
old_policy.refresh(obs, old_mask)
calls["hand-written numpy copy (b6ded54), shipped"] = lambda: old_policy.act(obs, old_mask)
best = {k: float("inf") for k in calls}
for _ in range(int(sys.argv[4])):
    for k, f in calls.items():
        best[k] = min(best[k], min(timeit.repeat(f, number=200, repeat=3)) / 200 * 1e6)
print(json.dumps({k: round(v, 1) for k, v in best.items()}))
"""


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_edited(work: Path, name: str) -> Path:
    source = (ROOT / "ppo_discrete.py").read_text()
    for old, new in EDITS[name]:
        assert old in source, f"the {name} edit no longer applies: {old!r}"
        source = source.replace(old, new)
    path = work / f"ppo_discrete_{name.replace(' ', '_').lower()}.py"
    path.write_text(source)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cleanrl-dir", type=Path, required=True, help="checkout of github.com/vwxyzjn/cleanrl (cleanrl/ppo.py in it)")
    parser.add_argument("--cleanrl-python", required=True, help="python of a venv made from benchmarks/requirements-cleanrl.txt")
    parser.add_argument("--cleanrl-commit", default="b5fb801e60651ba15cf784866db6cb7c3490b60c", help="CleanRL's commit, when --cleanrl-dir is no git checkout")
    parser.add_argument("--python", default=sys.executable, help="python for our scripts (default: this one)")
    parser.add_argument("--pairs", type=int, default=3, help="alternated rounds (ours shipped, each edit, CleanRL)")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--per-call-rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    edited = {name: write_edited(work, name) for name in EDITS}
    old = work / "ppo_discrete_b6ded54.py"
    old.write_text(subprocess.run(["git", "-C", str(ROOT), "show", "b6ded54:ppo_discrete.py"], capture_output=True, text=True, check=True).stdout)
    describe_cmd = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": describe_cmd.stdout.strip(), "cpu": f"{os.cpu_count()} x {cpu_model()}",
        "load_before": os.getloadavg(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"ours": describe(args.python), "cleanrl": describe(args.cleanrl_python)},
        "cleanrl_commit": cleanrl_commit(args.cleanrl_dir, args.cleanrl_commit), "total_timesteps": args.steps, "seed": args.seed,
        "edits": {name: [new for _, new in EDITS[name]] for name in EDITS}, "pairs": [],
    }  # fmt: skip
    suite = dict(SUITES["CartPole-v1"], steps=args.steps)
    for i in range(args.pairs):
        runs = {"shipped": run_ours(suite, args.python, args.seed)}
        for name, path in edited.items():
            runs[name] = run_ours(dict(suite, ours=str(path)), args.python, args.seed)
        runs["CleanRL"] = run_cleanrl(suite, args.cleanrl_python, args.cleanrl_dir, args.seed)
        results["pairs"].append(runs)
        print(f"pair {i + 1}: " + ", ".join(f"{k} {r['sps']} SPS ({r['wall_s']} s)" for k, r in runs.items()), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    per_call = subprocess.run([args.python, "-c", PER_CALL, str(ROOT / "ppo_discrete.py"), str(old), json.dumps({k: str(v) for k, v in edited.items()}), str(args.per_call_rounds)],
                              capture_output=True, text=True, env=env, check=True)  # fmt: skip
    results["per_call_us"] = json.loads(per_call.stdout.strip().splitlines()[-1])
    results["load_after"] = os.getloadavg()
    variants = [k for k in results["pairs"][0] if k != "CleanRL"]
    results["median_ratio"] = {k: statistics.median(p[k]["sps"] / p["CleanRL"]["sps"] for p in results["pairs"]) for k in variants}
    results["median_wall_ratio"] = {k: statistics.median(p["CleanRL"]["wall_s"] / p[k]["wall_s"] for p in results["pairs"]) for k in variants}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "discrete_edited_sps.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"# ppo_discrete.py as shipped and edited, against CleanRL's ppo.py: CartPole-v1, {args.steps:,} steps ({results['date']})",
        "",
        f"Commit {results['commit']}; {results['cpu']}; load average {results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after;"
        f" one torch thread per process; CleanRL {results['cleanrl_commit'][:12]}. Command: `{results['command']}`",
        "",
        "| policy | SPS per round | CleanRL SPS per round | ratio per round | median ratio | wall-time ratio (median) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for k in variants:
        ours, theirs = " / ".join(f"{p[k]['sps']:,}" for p in results["pairs"]), " / ".join(f"{p['CleanRL']['sps']:,}" for p in results["pairs"])
        ratios = ", ".join(f"{p[k]['sps'] / p['CleanRL']['sps']:.2f}" for p in results["pairs"])
        lines.append(f"| {k} | {ours} | {theirs} | {ratios} | **{results['median_ratio'][k]:.2f}x** | {results['median_wall_ratio'][k]:.2f}x |")
    lines += ["", "One call of the rollout's policy, 4 CartPole observations (best of interleaved rounds, microseconds):", ""]
    lines += [f"- {k}: {v} us" for k, v in results["per_call_us"].items()]
    (RESULTS / "discrete_edited_sps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
