"""Steps per second of ppo_continuous.py with a researcher's edit of the policy, against CleanRL's
ppo_continuous_action.py, defaults of both, on one machine; and the rollout policy's cost per call.

A researcher copies the script and edits its policy; the rollout's numpy fast path is derived from the edited
definition (torch.export of get_action_and_value, one numpy line per aten node), so the speed comes with the copy.
Variants, each an edited copy of ppo_continuous.py written to a temporary folder (the same edits as the tests'):
  HalfCheetah-v5 (CleanRL: HalfCheetah-v4, its gymnasium 0.29.1), 30k steps: the script as shipped; a
  state-dependent log std (a linear head on the observation added to the log std); a squashed mean
  (high * tanh(mean)).
  InvertedPendulum-v5 (CleanRL: -v4), 30k steps: a Beta policy (alpha, beta = softplus + 1, scaled to the action
  bounds) against CleanRL's Gaussian; and one longer Beta run that must reach a return of 900.
Each pair runs CleanRL's script, then ours, the order of ours rotating from pair to pair; the ratio is taken pair by
pair (load on a shared machine hits both alike). One torch thread for every process (OMP_NUM_THREADS=1, ours
--num-threads 1 --device cpu, CleanRL --no-cuda). SPS is each script's own figure at its last iteration.
Per call (in process, one HalfCheetah observation, best of repeats): the derived numpy source, the hand-written
numpy copy it replaced (ppo_continuous.py at b6ded54, from git), and eager torch get_action_and_value under
inference_mode.

    /work/bin/slot nice python benchmarks/continuous_edited_sps.py --cleanrl-dir /tmp/cleanrl \
        --cleanrl-python /tmp/venv-cleanrl/bin/python

Writes benchmarks/results/continuous_edited_sps.{json,md}.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))
from test_ppo_continuous import BETA, CLASSES, DEFINITION, EDITS  # noqa: E402  the tests' edits, one copy

HALF_CHEETAH_EDITS = {"as shipped": [], "state-dependent log std": EDITS["state-dependent log std"], "squashed mean": EDITS["squashed mean"]}
BETA_EDIT = EDITS["Beta"]
OLD_COPY = "b6ded54"  # the last commit with the hand-written NumpyPolicy


def edited_script(work: Path, name: str, edits: list) -> Path:
    source = (ROOT / "ppo_continuous.py").read_text()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = work / f"ppo_{re.sub(r'[^a-z]+', '_', name.lower())}.py"
    path.write_text(source)
    return path


def run(cmd: list, cwd: str) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:2]))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, round(time.perf_counter() - start, 2)


def run_ours(script: Path, env_id: str, steps: int, seed: int, eval_episodes: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, str(script), "--env-id", env_id, "--seed", str(seed), "--total-timesteps", str(steps),
               "--num-threads", "1", "--device", "cpu", "--eval-episodes", str(eval_episodes), "--runs-dir", f"{work}/runs"]  # fmt: skip
        out, wall = run(cmd, work)
        (path,) = Path(work).glob("runs/*/metrics.jsonl")
        records = [json.loads(line) for line in path.read_text().splitlines()]
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    returns = [(r["global_step"], r["charts/episodic_return"]) for r in records if "charts/episodic_return" in r]
    evals = [r["eval/episodic_return"] for r in records if "eval/episodic_return" in r]
    return {"sps": [r["charts/SPS"] for r in records if "charts/SPS" in r][-1], "wall_s": wall, "notes": notes,
            "returns": returns, "eval_return": evals[-1] if evals else None}  # fmt: skip


def run_cleanrl(python: str, cleanrl_dir: Path, env_id: str, steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as work:  # CleanRL writes its tensorboard runs/ into the working directory
        cmd = [python, str(cleanrl_dir / "cleanrl" / "ppo_continuous_action.py"), "--env-id", env_id, "--seed", str(seed),
               "--total-timesteps", str(steps), "--no-cuda"]  # fmt: skip
        out, wall = run(cmd, work)
    return {"sps": int(re.findall(r"^SPS: (\d+)", out, re.M)[-1]), "wall_s": wall}


def per_call_us(work: Path) -> dict:
    """Microseconds per rollout call on one HalfCheetah observation: derived source, old numpy copy, eager torch."""
    import gymnasium as gym
    import numpy as np
    import torch

    torch.set_num_threads(1)
    old_path = work / "ppo_continuous_old.py"
    old_path.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COPY}:ppo_continuous.py"], capture_output=True, text=True, check=True).stdout)

    def load(path: Path, name: str):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    old = load(old_path, "ppo_continuous_old")
    box = gym.make("HalfCheetah-v5").action_space
    obs = np.random.default_rng(0).normal(size=(1, 17)).astype(np.float32)
    rng = np.random.default_rng(1)

    def best(f, number=2000, repeat=7) -> float:
        return round(min(timeit.repeat(f, number=number, repeat=repeat)) / number * 1e6, 1)

    table = {}
    for name, edits in HALF_CHEETAH_EDITS.items():
        module = load(edited_script(work, name, edits), f"edited_{len(table)}")
        torch.manual_seed(0)
        agent = module.Agent(17, box, (64, 64), "tanh", 0.0)
        derived = module.DerivedPolicy(agent, obs)

        def eager(agent=agent):
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(torch.as_tensor(obs))
                return action.numpy(), logprob.numpy(), value.numpy()

        row = {"derived numpy source": best(lambda: derived.act(obs, rng)), "eager torch": best(eager, number=500)}
        if not edits:
            torch.manual_seed(0)
            old_agent = old.Agent(17, 6, (64, 64), "tanh", 0.0)
            copy = old.NumpyPolicy(old_agent)
            row["old hand-written numpy copy"] = best(lambda: copy.act(obs, rng))
        table[name] = row
    return table


def stamp(command: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())  # fmt: skip
    describe = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {"git": describe, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()], "command": command}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cleanrl-dir", type=Path, required=True, help="holds cleanrl/ppo_continuous_action.py")
    parser.add_argument("--cleanrl-python", required=True, help="python of a venv with benchmarks/requirements-cleanrl.txt")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--beta-steps", type=int, default=150_000, help="the Beta learning run on InvertedPendulum-v5")
    args = parser.parse_args()
    results = {**stamp(" ".join(["python"] + sys.argv)), "steps": args.steps, "pairs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["per_call_us"] = per_call_us(work)
        print(json.dumps(results["per_call_us"]), flush=True)
        scripts = {name: edited_script(work, name, edits) for name, edits in HALF_CHEETAH_EDITS.items()}
        beta = edited_script(work, "beta", BETA_EDIT)
        for pair in range(args.pairs):
            names = list(scripts)[pair % 3 :] + list(scripts)[: pair % 3]  # rotate which runs next to CleanRL
            row = {"HalfCheetah CleanRL": run_cleanrl(args.cleanrl_python, args.cleanrl_dir, "HalfCheetah-v4", args.steps, 1)}
            for name in names:
                row[f"HalfCheetah {name}"] = run_ours(scripts[name], "HalfCheetah-v5", args.steps, 1)
            row["InvertedPendulum CleanRL Gaussian"] = run_cleanrl(args.cleanrl_python, args.cleanrl_dir, "InvertedPendulum-v4", args.steps, 1)
            row["InvertedPendulum Beta"] = run_ours(beta, "InvertedPendulum-v5", args.steps, 1)
            for value in row.values():
                value.pop("returns", None)
            results["pairs"].append(row)
            print(json.dumps({k: v["sps"] for k, v in row.items()}), flush=True)
        learning = run_ours(beta, "InvertedPendulum-v5", args.beta_steps, 1, eval_episodes=10)
        window = [r for _, r in learning["returns"]]
        reached = next((step for i, (step, _) in enumerate(learning["returns"]) if i >= 9 and statistics.mean(window[i - 9 : i + 1]) >= 900), None)
        results["beta_learning"] = {"steps": args.beta_steps, "sps": learning["sps"], "notes": learning["notes"],
                                    "first_step_mean_of_10_returns_at_least_900": reached,
                                    "last_10_returns_mean": round(statistics.mean(window[-10:]), 1), "eval_return_10_episodes": learning["eval_return"]}  # fmt: skip
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    summary = {}
    for name in list(HALF_CHEETAH_EDITS) + ["Beta"]:
        key, base = (f"HalfCheetah {name}", "HalfCheetah CleanRL") if name != "Beta" else ("InvertedPendulum Beta", "InvertedPendulum CleanRL Gaussian")
        ratios = [row[key]["sps"] / row[base]["sps"] for row in results["pairs"]]
        summary[key] = {"ours_sps": [row[key]["sps"] for row in results["pairs"]], "cleanrl_sps": [row[base]["sps"] for row in results["pairs"]],
                        "ratios": [round(r, 2) for r in ratios], "median_ratio": round(statistics.median(ratios), 2),
                        "notes": sorted({n for row in results["pairs"] for n in row[key]["notes"]})}  # fmt: skip
    results["summary"] = summary
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continuous_edited_sps.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# ppo_continuous.py with an edited policy against CleanRL ({results['git']}, {results['date']})", "",
             f"CPU: {results['cpu']} ({results['cores']} cores); load average before {results['load_before']}, after {results['load_after']}.",
             f"Command: `{results['command']}`", "", f"{args.pairs} pairs of {args.steps:,}-step runs, defaults of both, one torch thread.", "",
             "| variant | ours SPS | CleanRL SPS | ratio per pair | median ratio | notes |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, s in summary.items():
        lines.append(f"| {key} | {s['ours_sps']} | {s['cleanrl_sps']} | {s['ratios']} | {s['median_ratio']}x | {'; '.join(s['notes']) or 'none'} |")
    b = results["beta_learning"]
    lines += ["", f"Beta policy learning run, InvertedPendulum-v5, {b['steps']:,} steps: SPS {b['sps']:,}; the mean of 10 consecutive "
              f"episodic returns first reached 900 at global_step {b['first_step_mean_of_10_returns_at_least_900']}; last 10 episodes "
              f"{b['last_10_returns_mean']}; final evaluation (10 episodes, the mode) {b['eval_return_10_episodes']}.", "",
              "Per call, microseconds, one HalfCheetah observation (best of 7 repeats):", "", "| policy | derived numpy source | old hand-written numpy copy | eager torch |",
              "|---|---|---|---|"]  # fmt: skip
    for name, row in results["per_call_us"].items():
        lines.append(f"| {name} | {row['derived numpy source']} | {row.get('old hand-written numpy copy', '-')} | {row['eager torch']} |")
    (RESULTS / "continuous_edited_sps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
