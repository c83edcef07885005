"""Tests of ppo_rlhf.py --fsdp on the CPU: two torchrun processes over gloo, FSDP2 against the unsharded script.

The two-process parts run this file itself under torchrun (`worker`, at the bottom), which saves what it measured
for the tests to check; each launch serves several assertions, as a torchrun start costs seconds."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import Tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import ppo_rlhf as P  # noqa: E402
from test_ppo_rlhf import batch_near_policy  # noqa: E402

SCRIPT = os.path.join(REPO, "ppo_rlhf.py")
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PAD = 40  # outside the tiny models' vocabulary, as an added [PAD] is
UPDATE_ARGS = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=2, num_minibatches=2, update_epochs=2,
    learning_rate=1e-3, max_grad_norm=0.5, temperature=0.7,
)  # fmt: skip
# FSDP averages gradients by a reduce-scatter and sums the squared norm over shards: the same numbers as the
# unsharded all-reduce and clip up to float32 rounding, which Adam's division by sqrt(v) can amplify early on.
RTOL, ATOL = 1e-5, 1e-6


def tiny_models(lora: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A GPT-2 policy (tied embeddings) and a Llama value model, dropout off; with LoRA adapters on both."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=PAD, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1))
    torch.manual_seed(1)
    value_model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=PAD, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1,
    ))  # fmt: skip
    policy, value_model = P.as_ppo_model(policy), P.as_ppo_model(value_model)
    if lora:
        task = None  # add_lora reads only args
        args = P.Args(lora_r=4, lora_alpha=8.0, lora_target_modules=("c_attn", "q_proj", "v_proj"))
        policy, value_model = P.add_lora(policy, value_model, task, args)
    return policy, value_model


def rank_batch(policy: torch.nn.Module, rank: int, B: int = 8, ctx: int = 4, T: int = 5):
    """This process's batch: left-padded queries, responses of 1-5 tokens, and the rest as test_ppo_rlhf's
    batch_near_policy makes it; different on each process."""
    g = torch.Generator().manual_seed(10 + rank)
    queries = torch.randint(0, PAD, (B, ctx), generator=g)
    queries[0, :2] = PAD
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    responses = torch.randint(0, PAD, (B, T), generator=g).masked_fill(~mask, PAD)
    return batch_near_policy(policy, queries, responses, mask, PAD, UPDATE_ARGS["temperature"], g)


def one_update(sharded: bool, lora: bool, rank: int, chunked: bool = False, head_on_policy: bool = False) -> tuple[dict, dict]:
    """One PPO update through the script's own ppo_update, unsharded (all-reduce) or under
    FSDP (shard_model, per-tensor Adam); returns the full weights (rank 0) and the statistics. `chunked`: the
    log-probs from the backbone's hidden states through the output layer a position at a time (the path of
    large vocabularies, which calls the backbone and the head apart). `head_on_policy`: the value model is a head
    on the policy's backbone."""
    args = P.Args(**UPDATE_ARGS, fsdp=sharded, lora_r=4 if lora else 0)
    policy, value_model = tiny_models(lora)
    policy.logits_from_hidden = chunked
    if head_on_policy:
        value_model = P.PolicyValueHead(policy)
    data, advantages, returns = rank_batch(policy, rank)
    if sharded:
        policy, value_model = (P.shard_model(args, torch.device("cpu"), m) for m in (policy, value_model))
    trained = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5, fused=True)
    torch.manual_seed(123)
    stats = P.ppo_update(args, policy, value_model, optimizer, trained, data, advantages, returns, PAD, P.NonFiniteGuard())
    options = P.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {name: P.get_model_state_dict(m, options=options) for name, m in (("policy", policy), ("value", value_model))}
    return weights, {k: v.item() for k, v in stats.items()}


def all_gathers_while_sampling(gather: bool) -> int:
    """FSDP's all-gathers while the sharded policy samples 6 tokens for a chunk of 3 prompts, through the generate()
    shard_model gives it (gathered), or through its class's own."""
    policy, _ = tiny_models()
    P.shard_model(P.Args(), torch.device("cpu"), policy)
    queries = torch.randint(0, PAD, (3, 4), generator=torch.Generator().manual_seed(0))
    config = P.sampling_config(6, 1.0, PAD + 1, PAD, PAD)  # an EOS it cannot sample: 6 forwards on every process
    calls, all_gather_single = [], P.dist.all_gather_single

    def counted(*args, **kwargs):
        calls.append(1)
        return all_gather_single(*args, **kwargs)

    P.dist.all_gather_single = counted
    if not gather:
        del policy.generate  # the instance's gathered generate: the class's shows through
    P.generate(policy, queries, PAD, config, 6)
    P.dist.all_gather_single = all_gather_single
    return len(calls)


def finite_after_a_nan_on_rank_1(rank: int) -> tuple[bool, bool]:
    """The weight check (NonFiniteGuard.check_weights: exit 1 if non-finite) on this process before and after rank 1
    alone puts a NaN in its shard."""
    policy, _ = tiny_models()
    P.shard_model(P.Args(), torch.device("cpu"), policy)
    params = list(policy.parameters())

    def finite() -> bool:
        try:
            P.NonFiniteGuard().check_weights(params, 0, 0)
        except SystemExit:
            return False
        return True

    before = finite()
    if rank == 1:
        with torch.no_grad():
            params[-1].to_local().view(-1)[0] = float("nan")
    return before, finite()


def tiny_deberta() -> torch.nn.Module:
    """A DeBERTa-v2 sequence classifier (an encoder reward model), whose class names no _no_split_modules."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(2)
    config = DebertaV2Config(
        vocab_size=PAD, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=1,
        max_position_embeddings=32, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], pooler_hidden_size=16,
    )  # fmt: skip
    return P.as_ppo_model(DebertaV2ForSequenceClassification(config)).eval()


def sharded_encoder_scores() -> tuple[Tensor, Tensor]:
    """A tiny DeBERTa-v2's scores of a padded batch, unsharded and sharded by shard_model over the processes."""
    model = tiny_deberta()
    ids = torch.randint(0, PAD, (3, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = (torch.arange(7)[None] < torch.tensor([[7], [5], [3]])).long()
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=attention_mask).logits
        P.shard_model(P.Args(), torch.device("cpu"), model)
        return whole, model(input_ids=ids, attention_mask=attention_mask).logits


LOAD_FLAGS = {  # the model roles each set loads: policy, reference, reward model, value model
    "reward model": ["--reward-model-path", "rm"],  # a GPT-2 policy (tied); the value model a copy of the Llama RM (rotary)
    "new value head": ["--model-name-or-path", "qwen", "--reward-fn", "REWARD_FN"],  # Qwen2 (tied, rotary); a new head
    "lora, bf16 reward model": ["--reward-model-path", "rm_bf16", "--lora-r", "4", "--lora-target-modules", "c_attn", "q_proj"],
    "value head on policy": ["--model-name-or-path", "qwen", "--reward-fn", "REWARD_FN", "--value-head-on-policy"],
}  # fmt: skip


def loaded_models(root: str, flags: list[str], sharded: bool) -> tuple[dict[str, torch.nn.Module], P.Task, P.Args]:
    """The run's models as load_models builds them from the models fixture, with --fsdp or without; the task, the
    flags."""
    import tyro

    paths = {"rm": f"{root}/rm", "rm_bf16": f"{root}/rm_bf16", "qwen": f"{root}/qwen", "REWARD_FN": f"{root}/rewards.py:length"}
    base = ["--model-name-or-path", f"{root}/policy", "--prompts", f"{root}/prompts.jsonl", "--response-length", "6", "--device", "cpu"]
    args = P.with_defaults(tyro.cli(P.Args, args=base + [paths.get(f, f) for f in flags] + (["--fsdp"] if sharded else [])))
    task = P.load_task(args, P.dist.get_rank(), True)
    policy, ref_policy, reward, value_model = P.load_models(task, args, torch.device("cpu"))
    return dict(policy=policy, ref_policy=ref_policy, reward_model=reward.model, value_model=value_model), task, args


def whole_models(root: str) -> dict:
    """For each LOAD_FLAGS set and model: the full state dict gathered from the --fsdp load and the plain load's
    (rank 0 returns both), and this process's buffers (non-persistent ones too) and whether its input and output
    embeddings are one tensor, in both loads."""
    options = P.StateDictOptions(full_state_dict=True, cpu_offload=True)
    results = {}
    for name, flags in LOAD_FLAGS.items():
        plain, sharded = loaded_models(root, flags, False)[0], loaded_models(root, flags, True)[0]
        for role, model in sharded.items():
            if model is None:
                continue
            tied = lambda m: m.get_output_embeddings() is not None and m.get_output_embeddings().weight is m.get_input_embeddings().weight  # noqa: E731
            results[name, role] = dict(
                whole=P.get_model_state_dict(model, options=options), plain=plain[role].state_dict(),
                buffers=dict(model.named_buffers()), plain_buffers=dict(plain[role].named_buffers()),
                tied=hasattr(model, "get_output_embeddings") and tied(model), plain_tied=hasattr(model, "get_output_embeddings") and tied(plain[role]),
            )  # fmt: skip
    deberta = os.path.join(root, "deberta")  # an encoder reward model, saved in bfloat16
    config = P.load_config(deberta, "--reward-model-path", num_labels=1)
    plain = P.load_model(P.AutoModelForSequenceClassification, deberta, config, "--reward-model-path", "auto")
    model = P.load_model_to_shard(P.AutoModelForSequenceClassification, deberta, config, "--reward-model-path", "auto")
    model = P.shard_model(P.Args(fsdp=True), torch.device("cpu"), model)
    results["deberta", "reward_model"] = dict(
        whole=P.get_model_state_dict(model, options=options), plain=plain.state_dict(), buffers=dict(model.named_buffers()),
        plain_buffers=dict(plain.named_buffers()), tied=False, plain_tied=False,
    )  # fmt: skip
    return results


def evaluations(root: str) -> dict:
    """The held-out evaluation (8 prompts, greedy) of the "reward model" set's policy in chunks of 3 prompts, plain
    and under --fsdp, with the prompts each generate() call answered on this process."""
    answered, generate = [], P.generate

    def counted(policy, queries, *args):
        answered.append(len(queries))
        return generate(policy, queries, *args)

    P.generate, results = counted, {}
    for sharded in (False, True):
        models, task, args = loaded_models(root, [*LOAD_FLAGS["reward model"], "--local-rollout-forward-batch-size", "3"], sharded)
        reward = P.Reward(models["reward_model"], task.reward_tokenizer, task.reward_functions)
        config = P.sampling_config(args.response_length, args.temperature, task.eos_ids, task.pad_id, PAD)
        answered.clear()
        results[sharded] = (*P.evaluate(models["policy"], reward, task, config, args, episode=0), list(answered))
    P.generate = generate
    return results


def worker(case: str, out: str, root: str = "") -> None:
    """Run under torchrun (2 processes, gloo); rank 0 saves what the tests check into `out` ("load": each process into
    `out`.RANK, from the models in `root`)."""
    torch.set_num_threads(1)
    P.dist.init_process_group("gloo")
    rank = P.dist.get_rank()
    if case == "update":
        results = {f"{'lora' if lora else 'full'}_{'fsdp' if sharded else 'flat'}": one_update(sharded, lora, rank) for lora in (False, True) for sharded in (False, True)}
        results |= {f"head_{'fsdp' if sharded else 'flat'}": one_update(sharded, False, rank, head_on_policy=True) for sharded in (False, True)}
        P.LOGITS_CHUNK_BYTES = 4 * PAD  # one position per chunk
        results |= {f"chunked_{'fsdp' if sharded else 'flat'}": one_update(sharded, False, rank, chunked=True) for sharded in (False, True)}
        results["finite"] = finite_after_a_nan_on_rank_1(rank)  # rank 0's answer: it holds no NaN itself
        results["all_gathers"] = {gather: all_gathers_while_sampling(gather) for gather in (True, False)}
        results["encoder_scores"] = sharded_encoder_scores()
        if rank == 0:
            torch.save(results, out)
    if case == "load":
        torch.save(whole_models(root) | {"evaluations": evaluations(root)}, f"{out}.{rank}")
    P.leave_process_group(True)  # a barrier, then gloo's threads let go before the interpreter shuts down


@pytest.fixture(scope="module")
def update_results(tmp_path_factory) -> dict:
    """What the "update" worker measured, one torchrun launch for the tests that read it."""
    out = tmp_path_factory.mktemp("update") / "update.pt"
    proc = subprocess.run([*TORCHRUN, __file__, "update", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_one_update_under_fsdp_equals_the_unsharded_update(update_results):
    """Two processes with different batches, two epochs of two minibatches of two micro-batches: the parameters
    after ppo_update under FSDP (reduce-scatter, clip over sharded gradients, per-tensor Adam on shards) equal
    those of the unsharded update (flat parameters, all-reduce, fused Adam) to RTOL/ATOL, and so do the update's
    statistics; with LoRA too (the base frozen and sharded, the adapters and the value head trained), and with the
    log-probs of large vocabularies (backbone and output layer called apart, a position at a time), and with the
    value head on the policy's backbone (--value-head-on-policy)."""
    for mode in ("full", "lora", "chunked", "head"):
        (flat, flat_stats), (sharded, sharded_stats) = update_results[f"{mode}_flat"], update_results[f"{mode}_fsdp"]
        before = tiny_models(mode == "lora")[0].state_dict()
        assert any(not torch.equal(before[k], flat["policy"][k]) for k in before), "the update changed nothing"
        for model in ("policy", "value"):
            assert flat[model].keys() == sharded[model].keys()
            for name, value in flat[model].items():
                torch.testing.assert_close(sharded[model][name], value, rtol=RTOL, atol=ATOL, msg=f"{mode} {model} {name}")
        # A clip fraction counts tokens: one whose value sits at the clip boundary (old + (new - old) rounds away from new)
        # may count in one path and not the other, so those statistics may differ by a token (1/64 here), no more.
        counts = {k for k in flat_stats if k.endswith("clipfrac_avg")}
        assert {k: v for k, v in sharded_stats.items() if k not in counts} == pytest.approx({k: v for k, v in flat_stats.items() if k not in counts}, rel=RTOL, abs=ATOL)
        assert {k: sharded_stats[k] for k in counts} == pytest.approx({k: flat_stats[k] for k in counts}, abs=1 / 64 + ATOL)


def test_a_nan_in_one_process_shard_is_seen_by_every_process(update_results):
    """The non-finite weight check under --fsdp: rank 0 answers for rank 1's shard too (all-reduced)."""
    assert update_results["finite"] == (True, False)


def test_sampling_gathers_the_policy_once_per_chunk_not_per_token(update_results):
    """The tiny policy has 3 FSDP units (2 decoder layers and the parameters outside them): sampling 6 tokens
    under gathered() all-gathers each once; without it each forward (one per token) gathers all 3 again."""
    assert update_results["all_gathers"] == {True: 3, False: 3 * 6}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The tiny policy (GPT-2) and reward model (Llama) saved with a word-level tokenizer without a pad token, and
    prompts of 2-6 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("fsdp_models")
    vocab = {"<unk>": 0, "<eos>": 1, **{chr(ord("a") + i): i + 2 for i in range(20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    policy, reward_model = tiny_models()
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    reward_model.save_pretrained(root / "rm")
    reward_model.to(torch.bfloat16).save_pretrained(root / "rm_bf16")
    tiny_deberta().to(torch.bfloat16).save_pretrained(root / "deberta")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=PAD, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    (root / "rewards.py").write_text("def length(prompts, completions, completion_ids, **kwargs):\n    return [len(c) / 6 for c in completion_ids]\n")
    rng = np.random.default_rng(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": " ".join(chr(ord("a") + w) for w in rng.integers(0, 20, rng.integers(2, 7)))}) + "\n")
    return root


def flags(root, runs_dir, *extra) -> list[str]:
    return [
        "--model-name-or-path", str(root / "policy"), "--reward-model-path", str(root / "rm"),
        "--prompts", str(root / "prompts.jsonl"), "--runs-dir", str(runs_dir), "--response-length", "6",
        "--per-device-train-batch-size", "4", "--num-minibatches", "2", "--update-epochs", "2",
        "--local-rollout-forward-batch-size", "4", "--total-episodes", "96", "--eval-every", "3", "--eval-episodes", "8",
        "--device", "cpu", "--num-threads", "1", *extra,
    ]  # fmt: skip


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, SCRIPT, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_metrics(runs_dir) -> tuple[str, list[dict]]:
    (run,) = os.listdir(runs_dir)
    with open(os.path.join(runs_dir, run, "metrics.jsonl")) as f:
        return os.path.join(runs_dir, run), [{k: v for k, v in json.loads(line).items() if k != "eps"} for line in f]


def memory_line(stdout: str) -> dict[str, float]:
    """The bytes of the run's "memory per process" line, by what they hold."""
    import re

    (line,) = [line for line in stdout.splitlines() if line.startswith("memory per process")]
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return {what: float(n) * scale[unit] for what, n, unit in re.findall(r"(parameters|gradients|Adam state) ([\d.]+) (\w+)", line)}


def interrupted(models, runs_dir) -> str:
    """Start an --fsdp run, send SIGTERM to both processes (as a scheduler does) once it logged an update; returns
    its checkpoint.pt after checking that both processes finished the iteration and exited 130."""
    import psutil

    proc = subprocess.Popen([*TORCHRUN, SCRIPT, *flags(models, runs_dir, "--fsdp")], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        paths = [os.path.join(runs_dir, d, "metrics.jsonl") for d in os.listdir(runs_dir)] if runs_dir.exists() else []
        if paths and os.path.exists(paths[0]) and '"objective/kl"' in open(paths[0]).read():
            break
        time.sleep(0.05)
    for worker in psutil.Process(proc.pid).children():
        worker.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "interrupted: checkpoint" in out and "exitcode  : 130" in err, err[-3000:]
    (run,) = os.listdir(runs_dir)
    return os.path.join(runs_dir, run, "checkpoint.pt")


def test_fsdp_run_resumes_exactly_and_saves_a_plain_transformers_policy(models, tmp_path):
    """An --fsdp run on 2 processes: the same metrics as the unsharded 2-process run (to float tolerance); SIGTERM
    then --resume gives exactly the uninterrupted run's metrics; the checkpoint is checkpoint.pt and one folder of
    shards (one file per process); the saved policy loads with plain transformers and equals the unsharded run's."""
    from transformers import AutoModelForCausalLM

    sharded_out = torchrun(*flags(models, tmp_path / "fsdp", "--fsdp")).stdout
    flat_out = torchrun(*flags(models, tmp_path / "flat")).stdout
    # the first lines: each process holds half of every model, of the gradients and of Adam's state
    sharded_memory, flat_memory = memory_line(sharded_out), memory_line(flat_out)
    for what in ("parameters", "gradients", "Adam state"):
        assert sharded_memory[what] == pytest.approx(flat_memory[what] / 2, rel=0.02), what
    run_dir, metrics = run_metrics(tmp_path / "fsdp")
    flat_dir, flat_metrics = run_metrics(tmp_path / "flat")
    assert [m.keys() for m in metrics] == [m.keys() for m in flat_metrics]
    for m, f in zip(metrics, flat_metrics):
        assert m == pytest.approx(f, rel=1e-4, abs=1e-5)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoint-6"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["policy"] is None and ckpt["optimizer"] is None and ckpt["iteration"] == 6
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "policy"))
    flat_policy = AutoModelForCausalLM.from_pretrained(os.path.join(flat_dir, "policy"))
    initial = AutoModelForCausalLM.from_pretrained(models / "policy")
    assert not torch.equal(policy.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight)
    for (name, a), b in zip(policy.named_parameters(), flat_policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

    checkpoint = interrupted(models, tmp_path / "stopped")
    ckpt = torch.load(checkpoint, weights_only=True)
    assert 1 <= ckpt["iteration"] < 6, "the run finished before SIGTERM arrived"
    assert os.listdir(os.path.dirname(checkpoint)).count(f"checkpoint-{ckpt['iteration']}") == 1
    torchrun("--resume", checkpoint)
    _, resumed = run_metrics(tmp_path / "stopped")
    assert resumed == metrics


def test_lora_under_fsdp_checkpoints_and_saves_the_merged_policy_and_the_adapter(models, tmp_path):
    """LoRA with --fsdp (and the value head on the policy's backbone): the frozen base sharded, the adapters and the
    value head trained; checkpoints hold only what trains; policy/ loads with plain transformers (merged) and
    adapter/ with peft, to the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "c_attn"]
    out = torchrun(*flags(models, tmp_path, "--fsdp", "--total-episodes", "32", "--save-every", "1", "--value-head-on-policy", *lora)).stdout
    assert "value model: a scalar head on the policy's own backbone" in out
    (run,) = os.listdir(tmp_path)
    run_dir = tmp_path / run
    assert sorted(os.listdir(run_dir / "checkpoint-2")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "policy"), run_dir / "adapter")
    ids = torch.randint(2, 22, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        initial = AutoModelForCausalLM.from_pretrained(models / "policy")(input_ids=ids).logits
        logits = merged(input_ids=ids).logits
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(logits, initial)  # the adapters trained


@pytest.fixture(scope="module")
def load_results(models, tmp_path_factory) -> list[dict]:
    """What the "load" worker measured on each process (rank 0's, rank 1's), one torchrun launch for the tests that
    read it."""
    out = tmp_path_factory.mktemp("load") / "load.pt"
    proc = subprocess.run([*TORCHRUN, __file__, "load", str(out), str(models)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]


def test_sharded_loading_gives_every_process_the_models_a_plain_load_gives(load_results):
    """--fsdp loads each model whole on rank 0 only; rank 1 builds it on the meta device and receives its shards
    and buffers. Gathered, every model equals the one loaded without --fsdp exactly (same values and dtypes),
    for each LOAD_FLAGS set and a bfloat16 DeBERTa-v2 reward model; on both processes the buffers (rotary
    frequencies, which no checkpoint holds) equal the plain load's, and tied embeddings stay one tensor."""
    for rank, results in enumerate(load_results):
        results = {k: v for k, v in results.items() if k != "evaluations"}
        assert len(results) == 15  # 4 models in 2 sets, 3 without a reward model in 2, the DeBERTa
        for (name, role), r in results.items():
            if rank == 0:
                assert r["whole"].keys() == r["plain"].keys(), (name, role)
                for key, value in r["plain"].items():
                    assert r["whole"][key].dtype == value.dtype and torch.equal(r["whole"][key], value), (name, role, key)
            assert r["buffers"].keys() == r["plain_buffers"].keys(), (name, role)
            for key, value in r["plain_buffers"].items():
                assert torch.equal(r["buffers"][key], value), (rank, name, role, key)
            assert r["tied"] == r["plain_tied"], (rank, name, role)
        assert results["reward model", "policy"]["tied"] and results["new value head", "ref_policy"]["tied"]
        assert any("inv_freq" in key for key in results["reward model", "value_model"]["buffers"])
        if rank == 0:  # the reward model in its saved dtype, as without --fsdp
            assert {v.dtype for v in results["lora, bf16 reward model", "reward_model"]["whole"].values()} == {torch.bfloat16}


def test_under_fsdp_each_process_evaluates_its_own_chunks_and_rank_0_reports_them_all(load_results):
    """8 held-out prompts in chunks of 3 over 2 processes: rank 0 answers chunks 1 and 3 (3 and 2 prompts), rank 1
    chunk 2 and, as a sharded forward needs every process, one prompt along whose answer it drops. Rank 0 returns
    the metrics and sample table of the unsharded evaluation (all 8 prompts, in order); rank 1 returns nothing."""
    rank0, rank1 = (results["evaluations"] for results in load_results)
    (plain_metrics, plain_rows, plain_answered), (metrics, rows, answered) = rank0[False], rank0[True]
    assert plain_answered == [3, 3, 2] and answered == [3, 2] and rank1[True] == ({}, [], [3, 1])
    assert metrics == pytest.approx(plain_metrics, rel=RTOL, abs=ATOL)
    assert [r[:3] for r in rows] == [r[:3] for r in plain_rows] and len(rows) == 8
    assert [r[3] for r in rows] == pytest.approx([r[3] for r in plain_rows], rel=RTOL, abs=ATOL)


def test_an_encoder_reward_model_is_sharded_by_its_blocks(update_results):
    """DeBERTa-v2 names no _no_split_modules: its layers are found as its longest list of blocks of one class, and
    sharded over the two processes it scores as it does whole."""
    assert [type(m).__name__ for m in P.decoder_layers(tiny_deberta())] == ["DebertaV2Layer"] * 2
    whole, sharded = update_results["encoder_scores"]
    torch.testing.assert_close(sharded, whole, rtol=RTOL, atol=ATOL)


def test_a_model_fsdp_cannot_wrap_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        P.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --fsdp: Sequential"), lines


def updated_policy(vf_coef: float, head_on_policy: bool) -> dict:
    """The policy's weights after one unclipped ppo_update (one process), with a separate value model or the value
    head on the policy's backbone."""
    policy, value_model = tiny_models()
    if head_on_policy:
        value_model = P.PolicyValueHead(policy)
    data, advantages, returns = rank_batch(policy, 0)
    args = P.Args(**(UPDATE_ARGS | dict(vf_coef=vf_coef, max_grad_norm=1e9)))  # no clip: it couples the models
    trained = [p for m in (policy, value_model) for p in m.parameters()]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5, fused=True)
    torch.manual_seed(123)
    P.ppo_update(args, policy, value_model, optimizer, trained, data, advantages, returns, PAD, P.NonFiniteGuard())
    return {k: v.clone() for k, v in policy.state_dict().items()}


def test_the_value_head_on_the_policy_shares_its_backbone():
    """--value-head-on-policy: the value model holds nothing but a head initialised at 0 (one model fewer) on the
    policy's backbone, so the value loss moves the policy's weights, which a separate value model never does."""
    policy = tiny_models()[0]
    head = P.PolicyValueHead(policy)
    assert [name for name, _ in head.named_parameters()] == ["score.weight"]
    assert P.token_scores(head, torch.randint(0, PAD, (2, 5)), PAD).eq(0).all()
    separate, shared = ([updated_policy(c, on_policy) for c in (0.0, 0.1)] for on_policy in (False, True))
    assert all(torch.equal(separate[0][k], separate[1][k]) for k in separate[0])
    assert any(not torch.equal(shared[0][k], shared[1][k]) for k in shared[0])


def test_a_run_with_the_value_head_on_the_policy(models, tmp_path):
    """End to end in one process: the first lines say what the value model is and hold one model fewer than the
    default run (whose value model is a copy of the reward model); the run resumes from its checkpoint."""
    proc = subprocess.run([sys.executable, SCRIPT, *flags(models, tmp_path, "--value-head-on-policy", "--total-episodes", "16")], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "value model: a scalar head on the policy's own backbone" in proc.stdout
    policy, reward_model = tiny_models()
    one_model_fewer = sum(p.numel() * 4 for m in (policy, policy, reward_model) for p in m.parameters()) + policy.config.n_embd * 4
    assert memory_line(proc.stdout)["parameters"] == pytest.approx(one_model_fewer, rel=0.01)
    run_dir, _ = run_metrics(tmp_path)
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", os.path.join(run_dir, "checkpoint.pt")], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_the_value_head_on_the_policy_with_a_value_model_path_is_a_one_line_error(tmp_path, capsys):
    import tyro

    with pytest.raises(SystemExit) as exit_info:
        P.train(tyro.cli(P.Args, args=["--value-head-on-policy", "--value-model-path", str(tmp_path), "--runs-dir", str(tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--value-head-on-policy" in lines[0] and "--value-model-path" in lines[0], lines


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--fsdp", "--runs-dir", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--fsdp" in lines[0] and "torchrun" in lines[0], proc.stderr


if __name__ == "__main__":
    worker(*sys.argv[1:])
