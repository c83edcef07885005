"""Throughput of ppo_rlhf.py against TRL's PPO trainer (trl==1.12.0, `trl.experimental.ppo`) on the
built-in offline task: the same cached SFT policy, reward model, tokenizer and prompts, the same
batch arithmetic and PPO settings, runs alternated on one machine (ours, TRL, ours, TRL, ...).

TRL removed PPOTrainer after 1.12, and it is never a dependency of the scripts: it lives in its own
virtual environment (benchmarks/requirements-trl.txt):

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt

    # from the repository root, with the scripts' own environment
    python benchmarks/rlhf_vs_trl.py --trl-python /work/trl-venv/bin/python

This driver (run with the scripts' environment) builds or reuses the built-in task's cache through
ppo_rlhf.py, runs `ppo_rlhf.py` and this same file in `--trl-worker` mode (run with the TRL
environment) as separate processes, one at a time, and finally scores every trained policy with
ppo_rlhf.py's own gold-score evaluation on the fixed held-out prompts (same code, same seed, for
both). Episodes per second count the training loop only: model loading, the trainer's set-up and
evaluations are excluded on both sides. Results go to benchmarks/results/rlhf_vs_trl.{json,md}.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from stamp import stamp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-episodes", type=int, default=9600, help="episodes per run (a multiple of 64); 9600 is ppo_rlhf.py's default")
    p.add_argument("--pairs", type=int, default=3, help="alternated (ours, TRL) pairs; pair i uses seed --seed + i")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-threads", type=int, default=1, help="torch CPU threads in every process")
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python", help="python of the environment with trl==1.12.0")
    p.add_argument("--work-dir", default="/tmp/rlhf_vs_trl", help="runs and the built-in task's cache go here")
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "rlhf_vs_trl"), help="prefix of the .json/.md results")
    p.add_argument("--eval-prompts", type=int, default=512, help="held-out prompts for the gold score (the task holds 512)")
    # worker mode (inside the TRL environment)
    p.add_argument("--render-only", action="store_true", help="rewrite the .md (and the notes in the .json) from the existing .json")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# TRL worker: runs inside the TRL environment; imports nothing from ppo_rlhf.py.
# ----------------------------------------------------------------------------------------------


def trl_worker(config_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with open(config_path) as f:
        cfg = json.load(f)
    t_start = time.time()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(cfg["num_threads"])
    transformers.set_seed(cfg["seed"])
    task = cfg["task_dir"]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(task, "sft"), padding_side="left")

    def read(path):
        with open(path) as f:
            return [json.loads(line)["prompt"] for line in f if line.strip()]

    def tokenized(path):
        ids = tokenizer(read(path), truncation=True, max_length=cfg["max_prompt_length"])["input_ids"]
        return Dataset.from_dict({"input_ids": ids})

    train_dataset = tokenized(os.path.join(task, "prompts.jsonl"))
    eval_dataset = tokenized(os.path.join(task, "eval_prompts.jsonl"))  # only used when num_sample_generations > 0
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(task, "sft"))
    ref_policy = AutoModelForCausalLM.from_pretrained(os.path.join(task, "sft"))
    reward_model = AutoModelForSequenceClassification.from_pretrained(os.path.join(task, "reward"), num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(os.path.join(task, "reward"), num_labels=1)
    config = PPOConfig(**cfg["ppo_config"])

    class Clock(TrainerCallback):
        def __init__(self):
            self.t_begin, self.step_ends, self.logs = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_begin = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append((state.episode, time.time()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append(dict(logs))

    clock = Clock()
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy, reward_model=reward_model,
        train_dataset=train_dataset, value_model=value_model, eval_dataset=eval_dataset, callbacks=[clock],
    )  # fmt: skip
    load_s = time.time() - t_start
    print(
        f"TRL batch arithmetic: batch_size {config.batch_size} = per_device_train_batch_size {config.per_device_train_batch_size}"
        f" x gradient_accumulation_steps {config.gradient_accumulation_steps} x world_size {config.world_size};"
        f" local_mini_batch_size {config.local_mini_batch_size} (num_mini_batches {config.num_mini_batches});"
        f" num_total_batches {config.num_total_batches}; optim {config.optim}; device {trainer.accelerator.device}",
        flush=True,
    )
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    episodes, t_last = clock.step_ends[-1]
    policy_dir = os.path.join(cfg["out_dir"], "policy")
    trainer.accelerator.unwrap_model(trainer.model).policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    result = dict(
        versions=dict(trl=trl.__version__, transformers=transformers.__version__, torch=torch.__version__),
        load_s=load_s, train_s=train_s, episodes=episodes, loop_s=t_last - clock.t_begin,
        eps=episodes / (t_last - clock.t_begin), final_log=clock.logs[-1] if clock.logs else None,
        policy_dir=policy_dir, resolved=dict(
            batch_size=config.batch_size, local_mini_batch_size=config.local_mini_batch_size,
            num_total_batches=config.num_total_batches, optim=str(config.optim), device=str(trainer.accelerator.device),
        ),
    )  # fmt: skip
    with open(os.path.join(cfg["out_dir"], "trl_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"TRL: {episodes} episodes in {t_last - clock.t_begin:.1f}s of training loop = {result['eps']:.1f} episodes/s", flush=True)


# ----------------------------------------------------------------------------------------------
# Driver: runs in the scripts' environment and imports ppo_rlhf.py.
# ----------------------------------------------------------------------------------------------


def settings_map(a) -> list[tuple[str, object, str, object, str]]:
    """(ppo_rlhf.py flag, value, TRL PPOConfig field, value, note) for every setting that matters."""
    batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.num_minibatches
    return [
        ("--total-episodes", a.total_episodes, "total_episodes", a.total_episodes, ""),
        ("episodes per update (micro x accum x minibatches)", batch, "per_device_train_batch_size x gradient_accumulation_steps",
         f"{batch} x 1", "TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps"),
        ("--num-minibatches", a.num_minibatches, "num_mini_batches", a.num_minibatches, "optimizer steps per PPO epoch"),
        ("--per-device-train-batch-size x --gradient-accumulation-steps", f"{a.per_device_train_batch_size} x {a.gradient_accumulation_steps}",
         "local_mini_batch_size (derived)", batch // a.num_minibatches,
         "TRL runs one micro-batch of min(per_device_train_batch_size, local_mini_batch_size) = 16 per minibatch, and steps after it "
         "(gradient_accumulation_steps=1); TRL's accumulation counter spans minibatches, so any other split would change the number of optimizer steps"),
        ("--update-epochs", a.update_epochs, "num_ppo_epochs", a.update_epochs, ""),
        ("--local-rollout-forward-batch-size", a.local_rollout_forward_batch_size, "local_rollout_forward_batch_size", a.local_rollout_forward_batch_size, ""),
        ("--response-length", a.response_length, "response_length", a.response_length, ""),
        ("--temperature", a.temperature, "temperature", a.temperature, "TRL adds 1e-7"),
        ("--max-prompt-length", a.max_prompt_length, "(tokenizer truncation when building the dataset)", a.max_prompt_length, "prompts are 8 tokens"),
        ("--learning-rate", a.learning_rate, "learning_rate", a.learning_rate, ""),
        ("--anneal-lr", a.anneal_lr, "lr_scheduler_type / warmup_steps", "linear / 0", "both reach 0 after the last update"),
        ("Adam eps 1e-5 (fixed in ppo_rlhf.py)", 1e-5, "adam_epsilon / weight_decay", "1e-05 / 0.0", "TRL: AdamW with weight decay 0"),
        ("--max-grad-norm", a.max_grad_norm, "max_grad_norm", a.max_grad_norm, "TRL's PPO loop never clips gradients: the value is unused"),
        ("--kl-coef", a.kl_coef, "kl_coef", a.kl_coef, ""),
        ("--kl-estimator", a.kl_estimator, "kl_estimator", a.kl_estimator, ""),
        ("--adaptive-kl", a.adaptive_kl, "(none)", False, "TRL has a fixed kl_coef only"),
        ("--missing-eos-penalty", a.missing_eos_penalty, "missing_eos_penalty", a.missing_eos_penalty, ""),
        ("EOS truncation (always)", True, "stop_token", "eos", ""),
        ("--gamma", a.gamma, "gamma", a.gamma, ""),
        ("--gae-lambda", a.gae_lambda, "lam", a.gae_lambda, ""),
        ("--norm-adv", a.norm_adv, "(always)", True, ""),
        ("--whiten-rewards", a.whiten_rewards, "whiten_rewards", a.whiten_rewards, ""),
        ("--clip-coef", a.clip_coef, "cliprange", a.clip_coef, ""),
        ("--clip-vloss / --vf-clip-coef", f"{a.clip_vloss} / {a.vf_clip_coef}", "cliprange_value", a.vf_clip_coef, "TRL always clips"),
        ("--vf-coef", a.vf_coef, "vf_coef", a.vf_coef, ""),
        ("--bf16", a.bf16, "bf16", False, "PPOConfig defaults to bf16=True: set False (CPU, fp32 like ours)"),
        ("--gradient-checkpointing", a.gradient_checkpointing, "gradient_checkpointing", False, "PPOConfig defaults to True: set False"),
        ("--eval-every (evaluations excluded from the timing)", "> number of updates", "num_sample_generations", 0, "TRL's default 10 would run greedy-ish sample generations during training"),
        ("--num-threads", "benchmark --num-threads", "torch.set_num_threads", "benchmark --num-threads", ""),
        ("value model: copy of the reward model", True, "value_model=AutoModelForSequenceClassification(reward)", True, ""),
        ("reference: separate copy of the SFT model", True, "ref_model=AutoModelForCausalLM(sft)", True, ""),
    ]  # fmt: skip


def trl_ppo_config(a, out_dir: str, seed: int) -> dict:
    return dict(
        output_dir=out_dir, report_to="none", save_strategy="no", seed=seed, use_cpu=True, disable_tqdm=True,
        logging_steps=1, bf16=False, gradient_checkpointing=False, num_sample_generations=0,
        total_episodes=a.total_episodes,
        per_device_train_batch_size=a.per_device_train_batch_size * a.gradient_accumulation_steps * a.num_minibatches,
        gradient_accumulation_steps=1, num_mini_batches=a.num_minibatches, num_ppo_epochs=a.update_epochs,
        local_rollout_forward_batch_size=a.local_rollout_forward_batch_size, response_length=a.response_length,
        temperature=a.temperature, learning_rate=a.learning_rate, lr_scheduler_type="linear" if a.anneal_lr else "constant",
        warmup_steps=0, adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=a.max_grad_norm,
        kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, missing_eos_penalty=a.missing_eos_penalty, stop_token="eos",
        gamma=a.gamma, lam=a.gae_lambda, whiten_rewards=a.whiten_rewards, cliprange=a.clip_coef,
        cliprange_value=a.vf_clip_coef, vf_coef=a.vf_coef,
    )  # fmt: skip


def gold_evaluation(ppo_rlhf, policy_dir: str, task_dir: str, a, n_prompts: int, seed: int) -> dict:
    """ppo_rlhf.py's held-out evaluation (its evaluate()), applied to a saved policy: sample the
    fixed held-out prompts with a fixed seed, score with the reward model and the hidden gold reward."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    p = ppo_rlhf
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(task_dir, "sft"), padding_side="left", truncation_side="left")
    pad_id, eos_id, n_special = tokenizer.pad_token_id, tokenizer.eos_token_id, len(p.BUILTIN_SPECIALS)
    policy = p.load_model(AutoModelForCausalLM, policy_dir, p.load_config(policy_dir, "policy"), "policy").eval()
    reward_path = os.path.join(task_dir, "reward")
    reward_model = p.load_model(AutoModelForSequenceClassification, reward_path, p.load_config(reward_path, "reward"), "reward").eval()
    lang = dict(np.load(os.path.join(task_dir, "language.npz")))
    prompts = [r["prompt"] for r in p.read_prompts(os.path.join(task_dir, "eval_prompts.jsonl"), "--eval-prompts")]
    eval_queries = tokenizer(prompts, truncation=True, max_length=a.max_prompt_length)["input_ids"][:n_prompts]
    gen_config = p.sampling_config(a.response_length, a.temperature, eos_id, pad_id, policy.get_input_embeddings().num_embeddings)
    device, chunk = torch.device("cpu"), a.local_rollout_forward_batch_size
    queries_all, responses_all, scores_all = [], [], []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 10_000)
        for i in range(0, len(eval_queries), chunk):
            queries = p.left_pad(eval_queries[i : i + chunk], pad_id, device)
            responses = p.truncate_after_eos(p.generate(policy, queries, pad_id, gen_config, a.response_length)[0], eos_id, pad_id)
            scores = p.sequence_scores(reward_model, torch.cat([queries, responses], 1), pad_id, queries.size(1))
            scores_all.append(p.apply_missing_eos_penalty(scores, responses, eos_id, a.missing_eos_penalty))
            queries_all += [[t for t in q if t != pad_id] for q in queries.tolist()]
            responses_all += responses.tolist()
    gold = [p.builtin_gold_score(lang, [t - n_special for t in q], p.builtin_words(r, eos_id, pad_id)) for q, r in zip(queries_all, responses_all)]
    lengths = [sum(t != pad_id for t in r) for r in responses_all]
    return dict(
        gold_score=float(np.mean(gold)), proxy_score=torch.cat(scores_all).mean().item(), n_prompts=len(gold),
        response_length=float(np.mean(lengths)), eos_fraction=float(np.mean([eos_id in r for r in responses_all])),
    )  # fmt: skip


# Differences between the two setups that the settings mapping does not show (read from
# ppo_rlhf.py and trl/experimental/ppo/ppo_trainer.py of trl 1.12.0).
NOTES = [
    "Optimizer: ppo_rlhf.py uses torch.optim.Adam (fused, eps 1e-5) over one flat tensor holding the policy and value "
    "parameters; TRL uses the transformers default optim of its TrainingArguments (resolved: adamw_torch_fused, weight "
    "decay 0, eps 1e-5) over the parameter tensors.",
    "Models: the same cached built-in task (GPT-2s with the exact GELU) loaded by both from the same directories.",
    "Gradient clipping: ppo_rlhf.py clips the global norm at 1.0; TRL's PPO loop never calls a clip (max_grad_norm is ignored).",
    "Score position: ppo_rlhf.py adds the reward-model score at the last real token (the EOS); TRL adds it one position "
    "later (sequence_length + 1, the first padding slot, when the response is shorter than response_length) and fits values there too.",
    "Sampling: ppo_rlhf.py suppresses the pad token during generation; TRL does not (a sampled pad would end the response).",
    "Rollout log-probs: both take them from the generation pass (ours: logits / temperature with the pad token, which "
    "sampling suppresses, left out of the softmax; TRL: processed scores, temperature + 1e-7).",
    "Prompt order: each draws batches from the same 8192 training prompts with its own shuffling (ours: a seeded NumPy "
    "permutation per pass; TRL: a seeded torch DataLoader), so the two runs of a pair see different prompt sequences.",
    "Timing: ours is the `eps` ppo_rlhf.py logs at its last update (time since its training loop began, evaluations "
    "excluded since --eval-every exceeds the number of updates); TRL's is episodes / (last on_step_end - on_train_begin) "
    "from a callback (TRL's own `eps` log is an int). TRL's loop as shipped also calls gc.collect() every update and logs each update (logging_steps=1).",
    "Gold score: both saved policies are scored by ppo_rlhf.py's evaluation code (same held-out prompts, same sampling "
    "seed); on 256 prompts it reproduces ppo_rlhf.py's own final objective/gold_score exactly.",
    "Machine: 2 CPU cores shared with other jobs (load averages recorded in the JSON); runs alternate so drift hits both.",
]


def write_markdown(result: dict, path: str) -> list[str]:
    runs, ours_s, trl_s = result["runs"], result["summary"]["ours"], result["summary"]["trl"]
    trl_versions, ours_versions = result["versions"]["trl_env"], result["versions"]["ours"]
    md = [
        f"# ppo_rlhf.py vs TRL {trl_versions['trl']} PPOTrainer: built-in task, {result['total_episodes']} episodes per run",
        "",
        f"Command (repository root): `{result['command']}`",
        "",
        f"Alternated runs (ours, TRL, ...), {result['pairs']} pairs, CPU, {result['num_threads']} torch thread(s) per process, one process at a time. "
        f"Episodes/s: training loop only (model loading, trainer set-up and evaluations excluded). Gold/proxy score: ppo_rlhf.py's held-out "
        f"evaluation ({result['eval_prompts']} fixed prompts, sampling seed {result['eval_seed']}) applied to each saved policy. "
        f"SFT policy: gold {result['sft_eval']['gold_score']:.3f}, proxy {result['sft_eval']['proxy_score']:.3f}.",
        "",
        "| run | trainer | seed | episodes | episodes/s | gold score | proxy score | train KL (last update) | response length | EOS fraction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(runs):
        kl = f"{r['objective_kl']:.2f}" if r["objective_kl"] is not None else "n/a"
        md.append(f"| {k + 1} | {r['trainer']} | {r['seed']} | {r['episodes']} | {r['eps']:.1f} | {r['gold_score']:.3f} | {r['proxy_score']:.3f} | {kl} | {r['response_length']:.1f} | {r['eos_fraction']:.2f} |")
    md += [
        "",
        f"Mean: ppo_rlhf.py {ours_s['eps_mean']:.1f} episodes/s, gold {ours_s['gold_mean']:.3f}; TRL {trl_s['eps_mean']:.1f} episodes/s, gold {trl_s['gold_mean']:.3f}; "
        f"throughput ratio {ours_s['eps_mean'] / trl_s['eps_mean']:.2f}x.",
        "",
        f"Versions: ours transformers {ours_versions['transformers']}, torch {ours_versions['torch']}; TRL environment {trl_versions}.",
        "",
        "Differences between the setups:",
        "",
    ] + [f"- {n}" for n in result.get("notes", NOTES)] + [
        "",
        "Settings mapping (ppo_rlhf.py -> TRL PPOConfig):",
        "",
        "| ppo_rlhf.py | value | TRL | value | note |",
        "|---|---|---|---|---|",
    ] + [f"| {x['ppo_rlhf']} | {x['ppo_rlhf_value']} | {x['trl']} | {x['trl_value']} | {x['note']} |" for x in result["settings"]]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return md


def run(cmd: list[str], log_path: str, env: dict) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f"command failed with status {proc.returncode} (log {log_path}):\n{tail}")
    return wall


def driver(args) -> None:
    import hashlib
    from dataclasses import asdict

    import numpy as np
    import torch

    sys.path.insert(0, REPO)
    import ppo_rlhf

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.num_threads)
    load_avg_at_start, started = os.getloadavg(), stamp(__file__)
    a = ppo_rlhf.with_defaults(ppo_rlhf.Args(total_episodes=args.total_episodes, num_threads=args.num_threads))
    batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.num_minibatches
    if args.total_episodes % batch:
        sys.exit(f"--total-episodes must be a multiple of {batch} (one update), so both trainers run the same episodes")
    num_updates = args.total_episodes // batch
    os.makedirs(args.work_dir, exist_ok=True)

    # 1. The built-in task, built (or found) by ppo_rlhf.py itself, in the cache dir it would use.
    cache_root = os.path.join(args.work_dir, "cache")
    key = json.dumps({k: v for k, v in asdict(a).items() if k.startswith("task_")} | {"v": ppo_rlhf.BUILTIN_VERSION})
    task_dir = os.path.join(cache_root, hashlib.sha1(key.encode()).hexdigest()[:10])
    task = ppo_rlhf.builtin_task(a, task_dir)
    print(f"built-in task in {task_dir}: reward model accuracy {task['rm_accuracy']:.3f}, SFT gold {task['sft_gold_mean']:.3f} +- {task['sft_gold_std']:.3f}")

    # 2. The settings, mapped explicitly.
    mapping = settings_map(a)
    print("settings (ppo_rlhf.py -> TRL PPOConfig):")
    for ours, ov, trl_name, tv, note in mapping:
        print(f"  {ours} = {ov}  ->  {trl_name} = {tv}" + (f"   [{note}]" if note else ""))

    trl_version = subprocess.run(
        [args.trl_python, "-c", "import trl, transformers, torch, accelerate, datasets; print(trl.__version__, transformers.__version__, torch.__version__, accelerate.__version__, datasets.__version__)"],
        capture_output=True, text=True,
    )  # fmt: skip
    if trl_version.returncode != 0:
        sys.exit(f"--trl-python {args.trl_python} cannot import trl:\n{trl_version.stderr[-2000:]}")
    trl_versions = dict(zip(["trl", "transformers", "torch", "accelerate", "datasets"], trl_version.stdout.split()))
    ours_versions = dict(transformers=transformers.__version__, torch=torch.__version__)
    print(f"ours: {ours_versions}; TRL environment: {trl_versions}")

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS=str(args.num_threads))
    runs = []
    sft_eval = gold_evaluation(ppo_rlhf, os.path.join(task_dir, "sft"), task_dir, a, args.eval_prompts, args.seed)
    print(f"SFT policy: gold {sft_eval['gold_score']:.3f}, proxy {sft_eval['proxy_score']:.3f}")
    for i in range(args.pairs):
        seed = args.seed + i
        # ours
        out = os.path.join(args.work_dir, f"ours_{i}")
        cmd = [
            sys.executable, "ppo_rlhf.py", "--seed", str(seed), "--total-episodes", str(args.total_episodes),
            "--runs-dir", out, "--cache-dir", cache_root, "--num-threads", str(args.num_threads), "--device", "cpu",
            "--eval-every", str(num_updates + 1),
        ]  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)  # runs of an earlier invocation
        os.makedirs(out)
        wall = run(cmd, os.path.join(args.work_dir, f"ours_{i}.log"), env)
        (run_name,) = [d for d in os.listdir(out) if d != "builtin_task"]
        with open(os.path.join(out, run_name, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        train_lines = [m for m in lines if "eps" in m]
        evals = [m for m in lines if "objective/gold_score" in m]
        last = train_lines[-1]
        ev = gold_evaluation(ppo_rlhf, os.path.join(out, run_name, "policy"), task_dir, a, args.eval_prompts, args.seed)
        runs.append(dict(
            trainer="ppo_rlhf.py", pair=i, seed=seed, command=" ".join(cmd), wall_s=wall, episodes=last["episode"],
            eps=last["eps"], loop_s=last["episode"] / last["eps"], objective_kl=last["objective/kl"],
            objective_scores=last["objective/scores"], in_script_final_gold_256=evals[-1]["objective/gold_score"], **ev,
        ))  # fmt: skip
        print(f"  ours  seed {seed}: {last['eps']:.1f} episodes/s, gold {ev['gold_score']:.3f}, proxy {ev['proxy_score']:.3f}, train KL {last['objective/kl']:.2f}")
        # TRL
        out = os.path.join(args.work_dir, f"trl_{i}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        cfg_path = os.path.join(out, "worker_config.json")
        with open(cfg_path, "w") as f:
            json.dump(dict(
                task_dir=task_dir, out_dir=out, seed=seed, num_threads=args.num_threads, max_prompt_length=a.max_prompt_length,
                ppo_config=trl_ppo_config(a, os.path.join(out, "trainer_output"), seed),
            ), f, indent=1)  # fmt: skip
        cmd = [args.trl_python, os.path.relpath(__file__, REPO), "--trl-worker", "--worker-config", cfg_path]
        wall = run(cmd, os.path.join(args.work_dir, f"trl_{i}.log"), env)
        with open(os.path.join(out, "trl_result.json")) as f:
            r = json.load(f)
        ev = gold_evaluation(ppo_rlhf, r["policy_dir"], task_dir, a, args.eval_prompts, args.seed)
        log = r["final_log"] or {}
        runs.append(dict(
            trainer="trl==" + r["versions"]["trl"], pair=i, seed=seed, command=" ".join(cmd), wall_s=wall, episodes=r["episodes"],
            eps=r["eps"], loop_s=r["loop_s"], objective_kl=log.get("objective/kl"), objective_scores=log.get("objective/scores"),
            load_s=r["load_s"], resolved=r["resolved"], **ev,
        ))  # fmt: skip
        print(f"  TRL   seed {seed}: {r['eps']:.1f} episodes/s, gold {ev['gold_score']:.3f}, proxy {ev['proxy_score']:.3f}, train KL {log.get('objective/kl', float('nan')):.2f}")

    # 3. Summary.
    def summary(name):
        rs = [r for r in runs if r["trainer"].startswith(name)]
        return dict(
            eps_mean=float(np.mean([r["eps"] for r in rs])), eps=[r["eps"] for r in rs],
            gold_mean=float(np.mean([r["gold_score"] for r in rs])), gold=[r["gold_score"] for r in rs],
            proxy_mean=float(np.mean([r["proxy_score"] for r in rs])), kl_mean=float(np.mean([r["objective_kl"] for r in rs])),
        )  # fmt: skip

    ours_s, trl_s = summary("ppo_rlhf"), summary("trl")
    command = " ".join([os.path.relpath(sys.executable) if not os.path.isabs(sys.executable) else sys.executable] + sys.argv)
    result = dict(
        command=command, total_episodes=args.total_episodes, pairs=args.pairs, num_threads=args.num_threads,
        stamp=started, machine=dict(cpus=os.cpu_count(), load_avg_at_start=load_avg_at_start, load_avg_at_end=os.getloadavg()),
        versions=dict(ours=ours_versions, trl_env=trl_versions), task_dir=task_dir,
        task=dict(rm_accuracy=task["rm_accuracy"], sft_gold_mean=task["sft_gold_mean"], sft_gold_std=task["sft_gold_std"]),
        sft_eval=sft_eval, eval_prompts=args.eval_prompts, eval_seed=args.seed + 10_000,
        settings=[dict(ppo_rlhf=o, ppo_rlhf_value=str(ov), trl=t, trl_value=str(tv), note=n) for o, ov, t, tv, n in mapping],
        runs=runs, summary=dict(ours=ours_s, trl=trl_s, eps_ratio=ours_s["eps_mean"] / trl_s["eps_mean"]),
    )  # fmt: skip
    result["notes"] = NOTES
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = write_markdown(result, args.results + ".md")
    print("\n".join(md[: 12 + len(runs)]))
    print(f"wrote {args.results}.json and {args.results}.md")


if __name__ == "__main__":
    cli = parse_args()
    if cli.trl_worker:
        trl_worker(cli.worker_config)
    elif cli.render_only:
        with open(cli.results + ".json") as f:
            measured = json.load(f)
        measured["notes"] = NOTES
        with open(cli.results + ".json", "w") as f:
            json.dump(measured, f, indent=1)
        write_markdown(measured, cli.results + ".md")
        print(f"rewrote {cli.results}.md")
    else:
        driver(cli)
