"""Every measured figure README.md and benchmarks/README.md quote, with the results file it comes from and how it
is computed. tests/test_figures.py recomputes each one, checks that the README holds it as written here, and fails
on any measurement-looking number (SPS, ratios, ±, GiB, seconds, episodes/s...) that no entry covers.

Registering a figure is one entry in FIGURES:

    fig(README, "median ratio of **{:.2f}x**", "discrete_speed.json", lambda d: d["median_ratio"])

`text` is the README's text with a `{}` field per computed value; `source` a path under benchmarks/results/ (a
.json file is parsed, a .md or .tsv file read as text, a folder of results/continuous/ gives a Runs); `compute`
takes the loaded source (one argument per source when `source` is a tuple) and returns the field values. A figure
with no results file behind it says so in its own text ("no results file") and is registered with `unsourced`;
one quoted from elsewhere with `quoted` (its text names where); a number that is no measurement (a setting, an
arithmetic example) with `not_measured`. Every ± over seeds is the sample std (ddof 1): use `pm`.
"""

import gzip
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README, BENCH = "README.md", "benchmarks/README.md"
NO_FILE = "no results file"  # what an unsourced figure's text must say


@dataclass
class Figure:
    doc: str  # README.md or benchmarks/README.md
    text: str  # as the doc has it, a {} field per computed value
    source: str | tuple  # results file(s) under benchmarks/results/, or "quoted: WHERE" / "unsourced" / "not measured: WHY"
    compute: Callable | None = None
    until: str | None = None  # an unsourced figure may cover all the text from its own to this

    def rendered(self) -> str:
        if self.compute is None:
            return self.text
        if id(self) in _rendered:
            return _rendered[id(self)]
        sources = self.source if isinstance(self.source, tuple) else (self.source,)
        values = self.compute(*(load(s) for s in sources))
        _rendered[id(self)] = self.text.format(*(values if isinstance(values, (tuple, list)) else (values,)))
        return _rendered[id(self)]


FIGURES: list[Figure] = []
_rendered: dict = {}


def fig(doc: str, text: str, source: str | tuple, compute: Callable) -> None:
    FIGURES.append(Figure(doc, text, source, compute))


def quoted(doc: str, text: str, where: str) -> None:
    FIGURES.append(Figure(doc, text, f"quoted: {where}"))


def unsourced(doc: str, text: str, until: str | None = None) -> None:
    """A figure with no results file; with `until`, every figure from `text` to the end of `until` (a section)."""
    assert NO_FILE in text, f"an unsourced figure says so in its text ({NO_FILE!r}): {text!r}"
    FIGURES.append(Figure(doc, text, "unsourced", until=until))


def not_measured(doc: str, text: str, why: str) -> None:
    FIGURES.append(Figure(doc, text, f"not measured: {why}"))


class Runs:
    """The finished runs of one label of results/continuous/: per-seed final returns and greedy evaluations, the
    final return of a seed being the mean of its last 10 training episodes (continuous_returns.py's measure)."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = {}

    def log(self, env_id: str, seed: int) -> list:
        """A finished run's records (a run in progress has no metrics.jsonl.gz yet, and counts as not run)."""
        if (env_id, seed) not in self.logs:
            run = self.root / env_id / f"seed{seed}"
            finished = list(run.glob("*/metrics.jsonl.gz"))
            lines = gzip.decompress(finished[0].read_bytes()).decode().splitlines() if finished else []
            keep = ("episodic_return", "eval/")  # the rest of a log is never quoted: parse only these
            self.logs[env_id, seed] = [json.loads(line) for line in lines if any(key in line for key in keep)]
        return self.logs[env_id, seed]

    def finals(self, env_id: str, seeds=(1, 2, 3)) -> list:
        returns = [[r["charts/episodic_return"] for r in self.log(env_id, s) if "charts/episodic_return" in r] for s in seeds]
        return [statistics.mean(rets[-10:]) for rets in returns if rets]

    def eval(self, env_id: str, seeds=(1, 2, 3)) -> float:
        return statistics.mean(r["eval/episodic_return"] for s in seeds for r in self.log(env_id, s) if "eval/episodic_return" in r)


_cache: dict = {}


def load(source: str):
    if source not in _cache:
        path = RESULTS / source
        if path.is_dir():
            _cache[source] = Runs(path)
        elif path.suffix == ".json":
            _cache[source] = json.loads(path.read_text())
        else:
            _cache[source] = path.read_text()
    return _cache[source]


# formatting: what the tables print
def pm(xs, digits=0, sep="±") -> str:
    """mean ± sample std (ddof 1)."""
    return f"{statistics.mean(xs):.{digits}f} {sep} {statistics.stdev(xs):.{digits}f}"


def per(xs, digits=0, sep=", ", comma=False) -> str:
    return sep.join(f"{x:,.{digits}f}" if comma else f"{x:.{digits}f}" for x in xs)


def sci(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}e}".replace("e-0", "e-")


def med(xs) -> float:
    return statistics.median(xs)


def k(steps) -> str:
    return f"{steps / 1000:.0f}k"


ENVS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "InvertedPendulum-v5", "Ant-v5")
CLEANRL_V4 = {"HalfCheetah-v5": "1443 ± 46", "Hopper-v5": "2383 ± 272", "Walker2d-v5": "2288 ± 572", "InvertedPendulum-v5": "963", "Ant-v5": "not published"}
ZOO_V3 = {"HalfCheetah-v5": "5819 ± 663", "Hopper-v5": "2410 ± 10", "Walker2d-v5": "3479 ± 822", "Ant-v5": "1327 ± 452"}
ZOO = {"HalfCheetah-v5": "zoo-halfcheetah", "Hopper-v5": "zoo-hopper", "Walker2d-v5": "zoo-walker2d", "Ant-v5": "zoo-ant"}


def stamp_of(source: str) -> dict:
    """When and at what commit a result was measured: its own stamp, else the one recovered from git history."""
    recovered = load("stamps_recovered.json")
    if source in recovered:
        return recovered[source]
    runs = {name: v for name, v in recovered.items() if name.startswith(source.rstrip("/") + "/")}
    return runs[min(runs)] if runs else {}


def when(source: str, script: str) -> tuple:
    """(date, commit) of a result, for the "measured DATE at COMMIT" labels: its own stamp's date and checkout
    (`git describe`), else the commit of the measured script recovered from history."""
    data = load(source) if source.endswith(".json") else None
    if isinstance(data, dict) and "stamp" in data:
        return data["stamp"]["date"][:10], data["stamp"]["commit"]
    found = stamp_of(source)
    if "commit_date" not in found:
        raise LookupError(f"{source} has no stamp to date it: run benchmarks/recover_stamps.py, or rerun it stamped")
    return found["commit_date"][:10], found["measured_scripts_commit_then"][script]


# ---------------------------------------------------------------------------------------------------------------
# README.md
# ---------------------------------------------------------------------------------------------------------------
unsourced(README, "500k steps in\n86 s on our 2-core machine beside a test run, ending at the 500 cap; timed by hand at e920939, no results file")
unsourced(README, "17 min 39 s in a fresh clone, timed by hand at e920939,\nno results file")
unsourced(README, "Breakout on 2 cores ran 1.9-3.5x slower with 2, timed by hand, no results file")

fig(README, "| on (default) | {} | {} |", "discrete_taxi_masks.json",
    lambda d: [pm([r[key] for r in d["runs"] if r["masks"]], 1, "+-") for key in ("last10", "eval")])
fig(README, "| off (`--no-action-masks`) | {} | {} |", "discrete_taxi_masks.json",
    lambda d: [pm([r[key] for r in d["runs"] if not r["masks"]], 1, "+-") for key in ("last10", "eval")])
fig(README, "{:.0f} against {:.0f} games finished, mean return of all training games {:.2f} against {:.2f} (last 20: {:.1f}\nagainst {:.1f}), greedy evaluation over 3 games {:.1f} in both",
    "discrete_breakout_fire.json", lambda d: [r[key] for key in ("episodes", "mean_return_all", "last20_return") for r in d["runs"]] + [d["runs"][0]["eval"]])
unsourced(README, "4e-7 on\nCartPole and Acrobot, 40 updates each, and on Breakout's CNN, 4 updates; measured by hand, no results file")
unsourced(README, """Breakout on our 2-core machine,
`--device cpu --num-envs 8 --total-timesteps 2048`, one thread against two, alternated pairs, whole
process (median of 3 pairs), timed by hand, no results file: at the lightest load we saw (~3, other jobs), 14.3 s against 27.3 s
(ratio 0.52, 0.34-0.53); at a load of ~7.5, 34.6 s against 116 s (0.29, 0.24-0.42); with a busy
loop added (load ~9), 76 s against 199 s (0.41, 0.35-0.57)""")
unsourced(README, "1e-7 to 3e-6: InvertedPendulum, HalfCheetah with\nboth presets, seed 1; measured by hand, no results file")
not_measured(README, "16\nbytes per parameter", "Adam's arithmetic: float32 weight, gradient and two moments")

lora = lambda setting: lambda d: next(r for r in d["runs"] if r["setting"] == setting)
fig(README, "| full fine-tuning | 0.77B (policy and value model) | {:.1f} GiB | {:.1f} |", "rlhf/lora_memory.json",
    lambda d: (lora("full")(d)["peak_rss_gib"], lora("full")(d)["seconds_per_iteration"]))
fig(README, "| `--lora-r 16 --lora-alpha 32 --lora-target-modules all-linear` | {:.1f}M | {:.1f} GiB | {:.1f} |", "rlhf/lora_memory.json",
    lambda d: (int(lora("lora")(d)["trained_parameters"].replace(",", "")) / 1e6, lora("lora")(d)["peak_rss_gib"], lora("lora")(d)["seconds_per_iteration"]))
fig(README, "measured {} at {}", "rlhf/lora_memory.json", lambda d: when("rlhf/lora_memory.json", "ppo_rlhf.py"))

fsdp = lambda d, setting, script="ppo_rlhf.py": next(r for r in d["runs"] if r["setting"] == setting and r.get("script", "ppo_rlhf.py") == script)
fig(README, "| unsharded, 1 process | {} | {:.1f} GiB | {:.0f} ({}) |", "rlhf/fsdp_memory.json",
    lambda d: (" / ".join(x.split()[-2] for x in fsdp(d, "unsharded")["memory_line"].split(":")[1].split(",")) + " GiB",
               fsdp(d, "unsharded")["peak_rss_gib_per_process"], fsdp(d, "unsharded")["seconds_per_iteration"], fsdp(d, "unsharded")["episodes_per_iteration"]))
fig(README, "| `--fsdp`, 2 processes (gloo) | 2.16 / 1.44 / 2.88 GiB, + 1.44 GiB policy while sampling | {:.1f} GiB (the larger process) | {:.0f} ({}) |", "rlhf/fsdp_memory.json",
    lambda d: (fsdp(d, "fsdp")["peak_rss_gib_per_process"], fsdp(d, "fsdp")["seconds_per_iteration"], fsdp(d, "fsdp")["episodes_per_iteration"]))
fig(README, "Two unsharded processes would each need the single one's {:.1f} GiB: {:.0f} GiB", "rlhf/fsdp_memory.json",
    lambda d: (fsdp(d, "unsharded")["peak_rss_gib_per_process"], 2 * fsdp(d, "unsharded")["peak_rss_gib_per_process"]))
not_measured(README, "24 GiB machine", "the machine's memory")
fig(README, "Until 35f53b5 the unsharded run peaked at {:.2f}\nGiB ({:.1f} s per iteration", "rlhf/fsdp_memory_before_finite_fix.json",
    lambda d: (d["runs"][0]["peak_rss_gib_per_process"], d["runs"][0]["seconds_per_iteration"]))
not_measured(README, "1.75x the 2.88 GiB they check", "torch.isfinite's temporaries (abs, two bool masks) against the memory line's gradients")
fig(README, "({:.1f} / {:.1f} GiB there;", "rlhf/fsdp_memory.json", lambda d: fsdp(d, "fsdp")["loading_peak_rss_gib_by_process"])
fig(README, "the script before sharded\nloading: {:.1f} GiB measured on 2026-12-05", "rlhf/fsdp_memory.json",
    lambda d: next(r for r in d["runs"] if "before" in r.get("script", ""))["peak_rss_gib_per_process"])
not_measured(README, """a trained model costs 16 bytes per parameter
(float32 weight, gradient, Adam's two moments), a frozen one 4 (2 if saved in bfloat16), all divided by N
under `--fsdp`, plus the gathered policy while sampling (4 bytes per parameter, 2 with `--bf16`), plus
activations. For a 7B policy with its reference, a 7B reward model and a 7B value model, that is 2 x 7B x
16 + 2 x 7B x 4 = 280 GB per process unsharded, which no GPU holds however many processes run; with
`--fsdp --bf16` on 8 GPUs, 280 / 8 = 35 GB of shards + 14 GB of gathered policy while sampling, about
49 GB plus activations, within an 80 GB GPU""", "arithmetic from the formula above")
not_measured(README, "rank 0 needs 28 GB of host memory for a float32 model", "arithmetic: 7B x 4 bytes")
not_measured(README, "(about 100 GB for the\n7B example", "arithmetic")
not_measured(README, "pass 64 MiB", "a constant of ppo_rlhf.py")
not_measured(README, "sampled every 0.1 s", "how the benchmark samples memory")


def loading(d, dtype, malloc, sharded):
    r = next(r for r in d["runs"] if r["saved_dtype"] == dtype and r["malloc"] == malloc and ("sharded loading" in r["script"]) == sharded)
    return "{:.2f} / {:.2f} GiB".format(*r["loading_peak_rss_gib_by_process"])


for label, dtype in (("float32", "float32"), ("bfloat16 (as Qwen2.5 ships)", "bfloat16"), ("bfloat16", "bfloat16")):
    for malloc, shown in (("default", "default"), ("MALLOC_MMAP_THRESHOLD_=1048576", "`MALLOC_MMAP_THRESHOLD_=1048576`")):
        if (label == "bfloat16 (as Qwen2.5 ships)") == (malloc == "default") or dtype == "float32":
            fig(README, f"| {label} | {shown} | {{}} | {{}} |", "rlhf/fsdp_loading.json",
                lambda d, dt=dtype, m=malloc: (loading(d, dt, m, False), loading(d, dt, m, True)))
fig(README, "(2.86 GiB, of\nwhich 2.16 of shards), and a bfloat16 checkpoint's larger process drops from {:.2f} to {:.2f} GiB", "rlhf/fsdp_loading.json",
    lambda d: [float(loading(d, "bfloat16", "MALLOC_MMAP_THRESHOLD_=1048576", s).split()[0]) for s in (False, True)])

vocab = lambda d, when, part: d[when]["results"][part]
fig(README, "`results/rlhf/vocab_memory.json`, measured {} at {}", "rlhf/vocab_memory.json",
    lambda d: when("rlhf/vocab_memory.json", "ppo_rlhf.py"))
fig(README, "| rollout: sampling, policy and reference log-probs, values | {:,.0f} MiB ({:.1f} s) | {:,.0f} MiB ({:.1f} s) |", "rlhf/vocab_memory.json",
    lambda d: [x for w in ("before", "after") for x in (vocab(d, w, "rollout")["peak_above_mib"], vocab(d, w, "rollout")["seconds"])])
fig(README, "| one PPO micro-batch: forward, entropy, backward | {:,.0f} MiB ({:.1f} s) | {:,.0f} MiB ({:.1f} s) |", "rlhf/vocab_memory.json",
    lambda d: [x for w in ("before", "after") for x in (vocab(d, w, "update")["peak_above_mib"], vocab(d, w, "update")["seconds"])])


def gold_rows(sweep, gold, kl, learned):
    rs = [r for r in (sweep["runs"] if learned else gold["runs"]) if r["kl_coef"] == kl]
    return pm([r["gold"] for r in rs], 3), pm([r["kl"] for r in rs], 2 if kl else 1)


fig(README, "| 0 | learned reward model | {} (peak {:.3f}) | {} |", ("rlhf/results.json", "rlhf/gold_reward.json"),
    lambda s, g: (gold_rows(s, g, 0.0, True)[0], statistics.mean(max(x for _, x, *_ in r["curve"]) for r in s["runs"] if r["kl_coef"] == 0.0), gold_rows(s, g, 0.0, True)[1]))
fig(README, "| 0 | gold reward | {} | {} |", ("rlhf/results.json", "rlhf/gold_reward.json"), lambda s, g: gold_rows(s, g, 0.0, False))
fig(README, "| 0.05 | learned reward model | {} | {} |", ("rlhf/results.json", "rlhf/gold_reward.json"), lambda s, g: gold_rows(s, g, 0.05, True))
fig(README, "| 0.05 | gold reward | {} | {} |", ("rlhf/results.json", "rlhf/gold_reward.json"), lambda s, g: gold_rows(s, g, 0.05, False))
fig(README, "final gold score (SFT {:.3f})", "rlhf/gold_reward.json", lambda g: statistics.mean(r["sft_gold"] for r in g["runs"]))
unsourced(README, "(at most 1.6e-6 on the\nbuilt-in task; measured by hand, no results file)")
unsourced(README, "(0.03 measured on the built-in task under CPU autocast, by hand, no results file; deeper models drift more)")

# the Results table
cleanrl_sps = "cleanrl_sps.json"
fig(README, "| CartPole-v1 speed, CleanRL's defaults | {:.2f}x CleanRL's `ppo.py` SPS (median of 5 alternated pairs, measured {} at {}); {:.2f}x SB3's (3 pairs, measured {} at {}) | CleanRL (gymnasium 0.29.1), SB3 2.9.2 |",
    (cleanrl_sps, "discrete_speed.json"),
    lambda c, s: (c["envs"]["CartPole-v1"]["median_ratio"], *when(cleanrl_sps, "ppo_discrete.py"),
                  s["median_ratio"], *when("discrete_speed.json", "ppo_discrete.py")))
fig(README, "| HalfCheetah speed, CleanRL's defaults | {:.2f}x CleanRL's `ppo_continuous_action.py` SPS (median of 5 pairs; v5 against CleanRL's v4; measured {} at {})",
    cleanrl_sps, lambda c: (c["envs"]["HalfCheetah"]["median_ratio"], *when(cleanrl_sps, "ppo_continuous.py")))
unsourced(README, "those cost 6% (whole-process wall, 40,960 steps, 5 alternated pairs against the previous version on the idle machine: 11.96 vs 11.21 s; timed by hand, no results file): about 3.0x")
fig(README, "| default threads beside a busy core, CartPole / InvertedPendulum | {:.1f}x / {:.1f}x the SPS of the previous default (torch's 2 threads; measured {} at {}) | |", "thread_trap.json",
    lambda d: (d["cases"]["CartPole-v1"]["median_ratio"], d["cases"]["InvertedPendulum-v5"]["median_ratio"], d["date"][:10], stamp_of("thread_trap.json")["measured_scripts_commit_then"]["ppo_discrete.py"]))
fig(README, "| CartPole / Acrobot, steps to 475 / -100 (3 seeds, measured {} at {}) | {} / {} | SB3: {} / {} |", "discrete_classic.json",
    lambda d: (*when("discrete_classic.json", "ppo_discrete.py"),
               *[k(statistics.mean(r["steps_to_threshold"] for r in d["envs"][e][who])) for who in ("ours", "sb3") for e in ("CartPole-v1", "Acrobot-v1")]))
fig(README, "| HalfCheetah-v5 speed | {:.2f}x SB3's SPS (median of 3, measured {} at {}) | SB3 2.9.2 |", "continuous_sps.json",
    lambda d: (med(d["ratio"]), *when("continuous_sps.json", "ppo_continuous.py")))
fig(README, "| 1M steps, `cleanrl` preset: HalfCheetah / Hopper / Walker2d / InvertedPendulum / Ant (v5, 3 seeds, mean ± sample std) | {} | CleanRL (v4, its published figures): 1443 ± 46 / 2383 ± 272 / 2288 ± 572 / 963 / - |",
    "continuous/cleanrl", lambda r: " / ".join(pm(r.finals(e)) for e in ENVS))
fig(README, "| 1M steps, `zoo-*` presets (rl-zoo's tuned settings): HalfCheetah / Hopper / Walker2d / Ant (v5, 3 seeds, mean ± sample std) | {} | SB3 2.9.2, same settings, v5, this machine: {}; rl-zoo published (v3, one agent each): 5819 / 2410 / 3479 / 1327 |",
    tuple(f"continuous/{ZOO[e]}" for e in ZOO) + ("continuous/sb3-zoo",),
    lambda *rs: (" / ".join(pm(r.finals(e)) for r, e in zip(rs, ZOO)), " / ".join(sb3_cell(rs[-1], e, short=True) for e in ZOO)))
fig(README, "| RLHF built-in task, episodes/s at a level gold score | {:.2f}x TRL 1.12's PPOTrainer (ratio of the means of 3 pairs; measured {} at {}) | TRL 1.12.0 |",
    "rlhf_vs_trl.json", lambda d: (d["summary"]["eps_ratio"], *when("rlhf_vs_trl.json", "ppo_rlhf.py")))
quoted(README, "CleanRL (v4, its published figures): 1443 ± 46 / 2383 ± 272 / 2288 ± 572 / 963", "CleanRL's documentation, ppo_continuous_action.py benchmark table")
quoted(README, "rl-zoo published (v3, one agent each): 5819 / 2410 / 3479 / 1327", "rl-baselines3-zoo benchmark.md")

# ---------------------------------------------------------------------------------------------------------------
# benchmarks/README.md
# ---------------------------------------------------------------------------------------------------------------
classic = "discrete_classic.json"
for env, label in (("CartPole-v1", "CartPole-v1"), ("Acrobot-v1", "Acrobot-v1")):
    for who, name in (("ours", "ppo_discrete.py"), ("sb3", "SB3 PPO")):
        fig(BENCH, f"| {label} | {name} | {{}} | {{}} | {{}} |", classic,
            lambda d, e=env, w=who: (", ".join(k(r["steps_to_threshold"]) for r in d["envs"][e][w]), k(statistics.mean(r["steps_to_threshold"] for r in d["envs"][e][w])),
                                     pm([r["final_return"] for r in d["envs"][e][w]], 1, "+-")))
fig(BENCH, "measured {} at {}", classic, lambda d: when(classic, "ppo_discrete.py"))
fig(BENCH, "{:.0f}% fewer steps to -100 on Acrobot", classic,
    lambda d: 100 * (1 - statistics.mean(r["steps_to_threshold"] for r in d["envs"]["Acrobot-v1"]["ours"]) / statistics.mean(r["steps_to_threshold"] for r in d["envs"]["Acrobot-v1"]["sb3"])))
unsourced(BENCH, """With `--learning-rate 1e-3` CartPole's 20-episode mean
crossed 400 within 30k-55k steps (seeds 1-2) and ended at 500 after 150k (no results file).""")
fig(BENCH, "ppo_discrete.py {} SPS against SB3's {}, a median\nratio of **{:.2f}x**", "discrete_speed.json",
    lambda d: (per(d["ours"], sep=" / ", comma=True), per(d["sb3"], sep=" / ", comma=True), d["median_ratio"]))
fig(BENCH, "steps at {:,.0f} SPS", "discrete_speed.json", lambda d: round(d["env_limit_sps"], -2))
fig(BENCH, "the per-seed ratios were {} on CartPole and {} on Acrobot", classic,
    lambda d: [" / ".join(f"{o['sps'] / s['sps']:.2f}" for o, s in zip(d["envs"][e]["ours"], d["envs"][e]["sb3"])) for e in ("CartPole-v1", "Acrobot-v1")])
fig(BENCH, "steps {:,.0f} agent steps/s, gymnasium's Python `AtariPreprocessing` + `FrameStackObservation` in a\n`SyncVectorEnv` {:,.0f}", "discrete_atari_envs.json",
    lambda d: (d["AtariVectorEnv (C++)"], d["gymnasium wrappers, SyncVectorEnv"]))
fig(BENCH, "at {} SPS while that env alone gave\n{:,.0f} steps/s in the same session", "discrete_atari.json", lambda d: (d["ours_sps"], d["env_limit_sps"]))
fig(BENCH, "(both measured {} at {})", "discrete_atari.json", lambda d: when("discrete_atari.json", "ppo_discrete.py"))

fig(BENCH, "core: ppo_continuous.py {} SPS, SB3 {}, ratio {}\n(median **{:.2f}x**); the env alone with random actions {:,.0f}-{:,.0f} SPS; measured {} at {}", "continuous_sps.json",
    lambda d: (per(d["ppo_continuous.py"], sep=" / ", comma=True), per(d["stable-baselines3"], sep=" / ", comma=True), per(d["ratio"], 2, " / "), med(d["ratio"]),
               min(d["random actions"]), max(d["random actions"]), *when("continuous_sps.json", "ppo_continuous.py")))

for env in ENVS:
    fig(BENCH, f"| {env} | {{}} | {{}} | {{:.0f}} | {CLEANRL_V4[env]} |", "continuous/cleanrl",
        lambda r, e=env: (pm(r.finals(e)), per(r.finals(e)), r.eval(e)))
quoted(BENCH, "CleanRL's published figure (v4 envs)", "CleanRL's documentation, ppo_continuous_action.py benchmark table")
fig(BENCH, "level on Hopper ({} against 2383 ± 272: seed 3 ends at {:.0f})", "continuous/cleanrl",
    lambda r: (pm(r.finals("Hopper-v5")), r.finals("Hopper-v5")[2]))
fig(BENCH, "One of\nthree HalfCheetah seeds (3) climbs slowly, to {:,.0f} at 1M steps", "continuous/cleanrl", lambda r: round(r.finals("HalfCheetah-v5")[2], -1))
unsourced(BENCH, "every seed's 20-episode mean reached the 1,000 cap by 39k-44k steps and stayed\nthere (read off the curves by hand, no results file)")


def sb3_cell(sb3: Runs, env: str, short: bool = False) -> str:
    """SB3's final return on env: mean ± std over 3 seeds, the seeds finished so far, or "not run"."""
    s = sb3.finals(env)
    if not s:
        return "-" if short else "not run"
    if len(s) < 3:
        return f"{per(s)} ({len(s)} of 3 seeds)" if short else f"{per(s)} ({len(s)} of 3 seeds so far; eval {sb3.eval(env):.0f})"
    return pm(s) if short else f"{pm(s)} ({per(s)}; eval {sb3.eval(env):.0f})"


def zoo_row(env):
    def row(cleanrl, ours, sb3):
        o = ours.finals(env)
        return pm(cleanrl.finals(env)), pm(o), per(o), ours.eval(env), sb3_cell(sb3, env)
    return row


for env in ZOO:
    fig(BENCH, f"| {env} | {{}} | **{{}}** ({{}}) | {{:.0f}} | {{}} | {ZOO_V3[env]} |" if env == "HalfCheetah-v5" else f"| {env} | {{}} | {{}} ({{}}) | {{:.0f}} | {{}} | {ZOO_V3[env]} |",
        ("continuous/cleanrl", f"continuous/{ZOO[env]}", "continuous/sb3-zoo"), zoo_row(env))
quoted(BENCH, "rl-zoo published (v3, one agent)", "rl-baselines3-zoo benchmark.md (its ± over evaluation episodes)")
fig(BENCH, "lands {:.0f} below SB3 with\nthe same settings", ("continuous/zoo-halfcheetah", "continuous/sb3-zoo"),
    lambda o, s: statistics.mean(s.finals("HalfCheetah-v5")) - statistics.mean(o.finals("HalfCheetah-v5")))
fig(BENCH, "(seed 2, {:.0f}, is above SB3's best; runs of the script of\n2026-11-25 had given {}, `results/continuous/zoo-halfcheetah-2026-11-25/`)",
    ("continuous/zoo-halfcheetah", "continuous/zoo-halfcheetah-2026-11-25"), lambda o, old: (o.finals("HalfCheetah-v5")[1], pm(old.finals("HalfCheetah-v5"))))
fig(BENCH, "the weights after 1 and 20 epochs within {} relative with zoo-halfcheetah's\nsettings and {} with zoo-walker2d's (float32 rounding; rerun at {}); and SB3's VecNormalize and our normaliser fed the same HalfCheetah stream scale rewards\nwithin {} and observations within {}",
    "continuous/sb3_equivalence.json", lambda d: (*(sci(max(u["weights_max_rel_diff"] for u in d["update"] if u["preset"] == p)) for p in ("zoo-halfcheetah", "zoo-walker2d")), d["stamp"]["script_commit"], sci(d["normalisation"]["reward_max_abs_diff"], 0), sci(d["normalisation"]["obs_max_abs_diff"], 0)))
fig(BENCH, "On the envs that terminate, fed random actions (Walker2d-v5: {} episodes in\n{:,} steps; Ant-v5: {}), rewards still scale within {} and {}, but observations differ by up to {:.2f} and\n{:.2f} (normalised units)",
    "continuous/sb3_equivalence.json", lambda d: (lambda w, a: (w["episodes"], w["steps"], a["episodes"], sci(w["reward_max_abs_diff"], 0), sci(a["reward_max_abs_diff"], 0),
                                                               w["obs_max_abs_diff"], a["obs_max_abs_diff"]))(*d["normalisation_terminating"]))
fig(BENCH, "SB3's greedy evaluation is higher\n({:.0f} vs {:.0f})", ("continuous/sb3-zoo", "continuous/zoo-halfcheetah"), lambda s, o: (s.eval("HalfCheetah-v5"), o.eval("HalfCheetah-v5")))
unsourced(BENCH, "(± 1,500 to 2,900 over a seed's 10 episodes; the per-episode returns are in the runs' stdout.log, no results file)")
fig(BENCH, "its third falls ({:.0f})", "continuous/sb3-zoo", lambda s: s.finals("Hopper-v5")[0])
fig(BENCH, "while the `cleanrl` preset reaches\n{}", "continuous/cleanrl", lambda r: pm(r.finals("Hopper-v5")))
fig(BENCH, "on\nAnt-v5 it stays near {:.0f}", "continuous/zoo-ant", lambda r: round(statistics.mean(r.finals("Ant-v5")), -1))
fig(BENCH, "ends at {} over its three seeds (eval {:.0f}), above `zoo-walker2d` (eval {:.0f}) while the seeds\noverlap (SB3's lowest {:.0f}, our highest {:.0f})", ("continuous/sb3-zoo", "continuous/zoo-walker2d"),
    lambda s, z: (pm(s.finals("Walker2d-v5")), s.eval("Walker2d-v5"), z.eval("Walker2d-v5"), min(s.finals("Walker2d-v5")), max(z.finals("Walker2d-v5"))))
fig(BENCH, "preset ({} against {})", ("continuous/zoo-walker2d", "continuous/cleanrl"), lambda z, c: (pm(z.finals("Walker2d-v5")), pm(c.finals("Walker2d-v5"))))

for env in ("HalfCheetah-v5", "Hopper-v5"):
    fig(BENCH, f"| {env} | {{}} ({{}}) | {{}} ({{}}) | {{:+.0f}} |", ("continuous/cleanrl-2026-11-25", "continuous/no-bootstrap"),
        lambda a, b, e=env: (pm(a.finals(e)), per(a.finals(e)), pm(b.finals(e)), per(b.finals(e)), statistics.mean(a.finals(e)) - statistics.mean(b.finals(e))))
fig(BENCH, "seed 1 ({:,.0f}-{:,.0f} against {:,.0f}-{:,.0f} on the plateau)", ("continuous/cleanrl-2026-11-25", "continuous/no-bootstrap"),
    lambda a, b: (min(a.finals("HalfCheetah-v5")[1:]), max(a.finals("HalfCheetah-v5")[1:]), min(b.finals("HalfCheetah-v5")), max(b.finals("HalfCheetah-v5"))))
fig(BENCH, "the difference ({:+.0f}) is inside the seeds'\nspread", ("continuous/cleanrl-2026-11-25", "continuous/no-bootstrap"),
    lambda a, b: statistics.mean(a.finals("Hopper-v5")) - statistics.mean(b.finals("Hopper-v5")))

for env, label, steps in (("CartPole-v1", "CartPole-v1, 4 envs x 128 steps, 4 x 4 minibatches", "500,000"), ("HalfCheetah", "HalfCheetah-v5 / -v4, 1 env x 2048 steps, 10 x 32 minibatches", "102,400")):
    fig(BENCH, f"| {label} | {steps} | {{}} | {{}} | {{}} | **{{:.2f}}x** | {{:.2f}}x |", cleanrl_sps,
        lambda d, e=env: (per([p["ours"]["sps"] for p in d["envs"][e]["pairs"]], sep=" / ", comma=True), per([p["cleanrl"]["sps"] for p in d["envs"][e]["pairs"]], sep=" / ", comma=True),
                          per([p["ratio"] for p in d["envs"][e]["pairs"]], 2), d["envs"][e]["median_ratio"], d["envs"][e]["median_wall_ratio"]))
fig(BENCH, "steps at {:,.0f} (v4) and {:,.0f} (v5) SPS", cleanrl_sps, lambda d: (d["envs"]["HalfCheetah"]["env_alone_sps"]["cleanrl"], d["envs"]["HalfCheetah"]["env_alone_sps"]["ours"]))
fig(BENCH, "({:,.0f} against {:,.0f} random-action SPS, 4 envs)", cleanrl_sps, lambda d: (d["envs"]["CartPole-v1"]["env_alone_sps"]["cleanrl"], d["envs"]["CartPole-v1"]["env_alone_sps"]["ours"]))
fig(BENCH, "Measured {} at {} (ppo_discrete.py) and {} (ppo_continuous.py)", cleanrl_sps,
    lambda d: (d["date"][:10], stamp_of(cleanrl_sps)["measured_scripts_commit_then"]["ppo_discrete.py"], stamp_of(cleanrl_sps)["measured_scripts_commit_then"]["ppo_continuous.py"]))
before = "cleanrl_sps_before_per_op_work.json"
fig(BENCH, "HalfCheetah was {:,.0f}-{:,.0f} SPS against CleanRL's\n{:,.0f}-{:,.0f}: {:.2f}-{:.2f} per pair, median **{:.2f}x**; CartPole {:.2f}-{:.2f}, median {:.2f}x", before,
    lambda d: (min(p["ours"]["sps"] for p in d["envs"]["HalfCheetah"]["pairs"]), max(p["ours"]["sps"] for p in d["envs"]["HalfCheetah"]["pairs"]),
               min(p["cleanrl"]["sps"] for p in d["envs"]["HalfCheetah"]["pairs"]), max(p["cleanrl"]["sps"] for p in d["envs"]["HalfCheetah"]["pairs"]),
               min(p["ratio"] for p in d["envs"]["HalfCheetah"]["pairs"]), max(p["ratio"] for p in d["envs"]["HalfCheetah"]["pairs"]), d["envs"]["HalfCheetah"]["median_ratio"],
               min(p["ratio"] for p in d["envs"]["CartPole-v1"]["pairs"]), max(p["ratio"] for p in d["envs"]["CartPole-v1"]["pairs"]), d["envs"]["CartPole-v1"]["median_ratio"]))


def startup(d, env, who):
    pairs = d["envs"][env]["pairs"]
    return med([p[who]["wall_s"] - d["envs"][env]["total_timesteps"] / p[who]["sps"] for p in pairs])


fig(BENCH, "about the same for both: {:.2f} s of ours against {:.2f} s of CleanRL's on CartPole, {:.2f} s against {:.2f} s on HalfCheetah, median wall time less steps / SPS", cleanrl_sps,
    lambda d: [startup(d, e, w) for e in ("CartPole-v1", "HalfCheetah") for w in ("ours", "cleanrl")])
quoted(BENCH, "The CartPole figure quoted in issue 10 (2.9-4.1x over two runs, pairs 2.6 to 5.4)", "issue 10")
fig(BENCH, "the pairs lie between {:.2f} and {:.2f}", (cleanrl_sps, before),
    lambda a, b: (min(p["ratio"] for d in (a, b) for p in d["envs"]["CartPole-v1"]["pairs"]), max(p["ratio"] for d in (a, b) for p in d["envs"]["CartPole-v1"]["pairs"])))

PROFILE_NOTE = "Profiles and timings taken by hand (py-spy, torch.profiler, whole-process timings), no results file: not reproducible from this repository."
unsourced(BENCH, PROFILE_NOTE, until="the deliberate change to the unbiased advantage std.")


def thread_row(d, env):
    rounds = d["cases"][env]["rounds"]
    cols = [per([r[key]["sps"] for r in rounds], sep=" / ", comma=True) for key in rounds[0]]
    ratios = d["cases"][env]["ratio_current_over_old"]
    worst = max(ratios)
    cells = ", ".join(f"**{x:.1f}**" if x == worst and worst > 10 else f"{x:.1f}" for x in ratios)
    return (*cols, cells, d["cases"][env]["median_ratio"])


fig(BENCH, "| CartPole-v1 | {} | {} | {} | {} (median {:.1f}x) |", "thread_trap.json",
    lambda d: (lambda c: (c[0].replace("373", "**373**"), *c[1:]))(thread_row(d, "CartPole-v1")))
fig(BENCH, "| InvertedPendulum-v5 | {} | {} | {} | {} (median {:.1f}x) |", "thread_trap.json", lambda d: thread_row(d, "InvertedPendulum-v5"))
fig(BENCH, "one CartPole run in five fell to {} SPS", "thread_trap.json", lambda d: min(r["12ddd4d, default (torch's 2 threads)"]["sps"] for r in d["cases"]["CartPole-v1"]["rounds"]))
fig(BENCH, "The issue's 99 SPS on InvertedPendulum did not recur here; its worst case was {:,.0f}", "thread_trap.json",
    lambda d: min(r["12ddd4d, default (torch's 2 threads)"]["sps"] for r in d["cases"]["InvertedPendulum-v5"]["rounds"]))
fig(BENCH, "measured {} at {}", "thread_trap.json", lambda d: (d["date"][:10], stamp_of("thread_trap.json")["measured_scripts_commit_then"]["ppo_discrete.py"]))
quoted(BENCH, "the\n10-20x trap of issue 10", "issue 10")
not_measured(BENCH, "Two\nthreads beside a busy core cost 2-7x as a rule", "a summary of the table's ratios")
unsourced(BENCH, """(and one in
eight in an earlier series of whole-process timings, 157 s against 9.6 s for the others, timed by hand, no results file)""")
unsourced(BENCH, """Timed as whole
processes (start-up and the final 10-episode evaluation included, alternated, 5 pairs each; timed by hand, no results file), the current default
took 4.05 s median against 9.95 s on CartPole and 3.37 s against 17.3 s on InvertedPendulum (old runs 5.6-39.7 s)""")

sweep = "rlhf/results.json"
fig(BENCH, "reward-model held-out accuracy {:.3f} against the gold order; SFT gold\nscore {:.2f} (gold std over SFT samples {:.2f}). Mean +- sample std (ddof 1) over 3 seeds at 4,800 episodes, measured {} at {}", sweep,
    lambda d: (d["task"]["rm_accuracy"], statistics.mean(r["sft_gold"] for r in d["runs"]), d["task"]["sft_gold_std"], *when(sweep, "ppo_rlhf.py")))


def sweep_row(d, kl):
    rs = [r for r in d["runs"] if r["kl_coef"] == kl]
    return [pm([r[key] for r in rs], digits, "+-") for key, digits in (("gold", 2), ("proxy", 2), ("kl", 1))] + [per([r[key] for r in rs], 2 if key == "gold" else 1) for key in ("gold", "kl")]


fig(BENCH, "| 0 | {} ({}) | {} | {} ({}) |", sweep, lambda d: (lambda c: (c[0], c[3], c[1], c[2], c[4]))(sweep_row(d, 0.0)))
for kl in (0.02, 0.05, 0.2):
    fig(BENCH, f"| {kl} | {{}} | {{}} | {{}} |", sweep, lambda d, kl=kl: sweep_row(d, kl)[:3])
fig(BENCH, "one seed\nof three went all the way (seed 2, KL {:.0f}); the other two had reached KL {:.0f} and {:.0f}", sweep,
    lambda d: (lambda kls: (kls[1], kls[0], kls[2]))([r["kl"] for r in d["runs"] if r["kl_coef"] == 0.0]))
fig(BENCH, "Each run of 4,800 episodes took {:.0f}-{:.0f} s whole (the first, which also built\nthe task, {:.0f} s); the training loop ran at {:.0f}-{:.0f} episodes/s", sweep,
    lambda d: (min(r["wall_s"] for r in d["runs"][1:]), max(r["wall_s"] for r in d["runs"][1:]), d["runs"][0]["wall_s"], min(r["eps"] for r in d["runs"]), max(r["eps"] for r in d["runs"])))
unsourced(BENCH, """gold score near 1.2 between 15 and 25 nats of KL,
then 0.8 at 35, 0.1 at 45 and about -1 beyond 70, while the proxy climbs from 1.9 to 2.3 (read off the plot by hand, no results file)""")


def trl_row(d):
    o, t = d["summary"]["ours"], d["summary"]["trl"]
    return (per(o["eps"], 1, " / "), per(t["eps"], 1, " / "), d["summary"]["eps_ratio"], per([a / b for a, b in zip(o["eps"], t["eps"])], 2), o["gold_mean"], t["gold_mean"])


fig(BENCH, "| idle | {} | {} | **{:.2f}x** ({}) | {:.3f} / {:.3f} |", "rlhf_vs_trl.json", trl_row)
fig(BENCH, "| one ppo_continuous.py training run on the second core (`--results benchmarks/results/rlhf_vs_trl_beside_a_run`) | {} | {} | **{:.2f}x** ({}) | {:.3f} / {:.3f} |",
    "rlhf_vs_trl_beside_a_run.json", trl_row)
fig(BENCH, "(TRL ahead by {:.3f}, {:.2f} of the SFT gold std)", "rlhf_vs_trl.json",
    lambda d: (d["summary"]["trl"]["gold_mean"] - d["summary"]["ours"]["gold_mean"], (d["summary"]["trl"]["gold_mean"] - d["summary"]["ours"]["gold_mean"]) / d["task"]["sft_gold_std"]))
unsourced(BENCH, """about 2% slower on this task than the one flat tensor before it (in-loop episodes/s,
5 alternated pairs timed by hand with farm-bench, no results file)""")
fig(BENCH, "9,600 episodes, 3 alternated pairs, one torch thread per process, measured {} at {}", "rlhf_vs_trl.json",
    lambda d: when("rlhf_vs_trl.json", "ppo_rlhf.py"))


unsourced(README, "The export costs 3.5 to 4.2 s once (our 2-core machine, loaded; most of\nit torch importing its compiler stack), outside the SPS figure as CleanRL's set-up is outside its own,\ninside the whole-process wall time; each refresh (new weights, the check) 1.4 to 1.8 ms an iteration (both timed by hand, no results file)")
fig(README, "| {:.2f}x / {:.2f}x / {:.2f}x CleanRL's `ppo.py` SPS (medians of 3 alternated rounds, 2026-12-06, one other benchmark running beside them: [results](benchmarks/results/discrete_edited_sps.md)); one rollout call on 4 observations: derived {} us, the former hand-written copy {} us, eager torch {:.0f} us |",
    "discrete_edited_sps.json", lambda d: (*(d["median_ratio"][k] for k in ("shipped", "learned temperature", "ReLU")), d["per_call_us"]["derived numpy, shipped"], d["per_call_us"]["hand-written numpy copy (b6ded54), shipped"], d["per_call_us"]["eager torch get_action_and_value, shipped"]))


fig(README, "Per call on one HalfCheetah observation: {:.0f} us as shipped, {:.0f} and {:.0f} us with the two edits,\nagainst {:.0f} us for the old hand-written copy and {:.0f} us for eager torch", "continuous_edited_sps.json",
    lambda d: (d["per_call_us"]["as shipped"]["derived numpy source"], d["per_call_us"]["state-dependent log std"]["derived numpy source"], d["per_call_us"]["squashed mean"]["derived numpy source"], d["per_call_us"]["as shipped"]["old hand-written numpy copy"], d["per_call_us"]["as shipped"]["eager torch"]))
fig(README, "| {:.2f}x / {:.2f}x CleanRL's SPS, the script as shipped {:.2f}x in the same pairs", "continuous_edited_sps.json",
    lambda d: tuple(d["summary"][k]["median_ratio"] for k in ("HalfCheetah state-dependent log std", "HalfCheetah squashed mean", "HalfCheetah as shipped")))
fig(README, "a Beta policy on InvertedPendulum-v5 {:.2f}x CleanRL's Gaussian, and it reached a return of 900 (mean of 10 episodes) at {:.0f}k steps, eval {:.0f}", "continuous_edited_sps.json",
    lambda d: (d["summary"]["InvertedPendulum Beta"]["median_ratio"], d["beta_learning"]["first_step_mean_of_10_returns_at_least_900"] / 1000, d["beta_learning"]["eval_return_10_episodes"]))


def baseline_row(d, setting):
    runs = sorted((r for r in d["runs"] if r["setting"] == setting), key=lambda r: r["seed"])
    return (pm([r["gold"] for r in runs], 3), pm([r["kl"] for r in runs], 2), per([r["eps"] for r in runs], 1, " / "), pm([r["wall_s"] for r in runs]))


fig(README, "| baseline | final gold score (SFT {:.3f}) |", "rlhf/baselines.json", lambda d: statistics.mean(r["sft_gold"] for r in d["runs"]))
fig(README, "| `gae` (value model, GAE) | {} | {} | {} | {} |", "rlhf/baselines.json", lambda d: baseline_row(d, "gae"))
for size in (2, 4):
    fig(README, f"| `group`, k = {size} | {{}} | {{}} | {{}} | {{}} |", "rlhf/baselines.json", lambda d, size=size: baseline_row(d, f"group k={size}"))
not_measured(README, "the same setting moved by up to 5x between seeds", "a reading of the per-seed episodes/s of the table above it")


def gpu(tsv, run):
    row = next(line.split("\t") for line in tsv.splitlines() if line.startswith(run + "\t"))
    return float(row[3])


fig(BENCH, "Measured {} at {}, on one NVIDIA H100 80GB", "gpu/sps.tsv",
    lambda t: when("gpu/sps.tsv", "ppo_discrete.py"))
fig(BENCH, "Breakout (8 envs, Nature CNN) at {:,.0f} SPS against {:,.0f} on the same machine's\n16 CPU cores; CartPole at {:,.0f} SPS", "gpu/sps.tsv",
    lambda t: (gpu(t, "breakout-cuda"), gpu(t, "breakout-cpu"), gpu(t, "cartpole-cuda")))
fig(BENCH, "the built-in RLHF task at {:.0f}\nepisodes/s in fp32, 94-98 with `--bf16`", "gpu/sps.tsv", lambda t: gpu(t, "rlhf-cuda-fp32"))
fig(BENCH, "and {:.0f} with `--bf16 --gradient-checkpointing`", "gpu/sps.tsv", lambda t: gpu(t, "rlhf-cuda-bf16-gc"))
quoted(BENCH, "94-98 with `--bf16`", "results/gpu/device_check.md (the progress lines of a run cut at 100 s; sps.tsv keeps the last, 97.6)")
