"""Shared helpers: the scripts live at the repository root and are run as a user would run them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder, so nothing it writes (MuJoCo's MUJOCO_LOG.TXT, a default
    runs/ folder) lands in the repository."""
    monkeypatch.chdir(tmp_path)


def run_script(script: str, *flags: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `python script flags...` from the repository root with wandb offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *flags], cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(flags)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(runs_dir: Path) -> list[dict]:
    """The metrics.jsonl records of the single run under runs_dir."""
    (path,) = runs_dir.glob("*/metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    """Metric records without the wall-clock-dependent SPS."""
    return [{k: v for k, v in r.items() if k != "charts/SPS"} for r in records]


def interrupt_with_ctrl_c(
    script: str, flags: list[str], runs_dir: Path, after_records: int = 30, sig: int = signal.SIGINT
) -> Path:
    """Start a run, send `sig` (Ctrl-C by default; SIGTERM is what a scheduler sends) once
    `after_records` metric lines are logged, check that it wrote a checkpoint and exited with
    status 130; return the checkpoint's path."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / script), *flags, "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs_dir.glob("*/metrics.jsonl")):
        time.sleep(0.05)
    while time.time() < deadline and len(read_metrics(runs_dir)) < after_records:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: checkpoint" in out
    (checkpoint,) = runs_dir.glob("*/checkpoint.pt")
    return checkpoint


def run_torchrun(script: str, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc script flags...` on the CPU (gloo)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(ROOT / script), *flags, "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_one_line_error(script: str, flags: list[str], needle: str, runs_dir: Path) -> None:
    """The command line is rejected with exit status 2 and one stderr line that contains needle."""
    proc = run_script(script, *flags, "--runs-dir", str(runs_dir), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def wandb_offline_log(runs_dir: Path) -> bytes:
    """The raw bytes of the single offline wandb run under runs_dir (metric names appear verbatim)."""
    (wandb_file,) = runs_dir.glob("*/wandb/offline-run-*/run-*.wandb")
    return wandb_file.read_bytes()


# The fence's recipe (tests/droppable.py): the optional blocks of each script, and the flags each takes away.
BLOCKS = ("resume", "torchrun", "wandb", "video", "evaluation", "fast-path")
BLOCK_FLAGS = {"resume": ["--resume"], "wandb": ["--track", "--wandb-project-name"], "video": ["--capture-video"],
               "evaluation": ["--eval-episodes", "--eval-checkpoint", "--capture-video"]}  # fmt: skip
RLHF_BLOCKS = ("resume", "torchrun", "wandb", "evaluation", "fast-path", "fsdp")
RLHF_BLOCK_FLAGS = {"resume": ["--resume"], "wandb": ["--track", "--wandb-project-name"], "fsdp": ["--fsdp"],
                    "evaluation": ["--eval-every", "--eval-episodes", "--eval-prompts", "--eval-stochastic"]}  # fmt: skip
TOGETHER = {"torchrun": {"fsdp"}}  # FSDP needs torchrun's process group: deleting torchrun deletes it too


def check_the_fence_recipe(
    script: str, flags: list[str], learn_flags: list[str], tmp_path: Path, blocks=BLOCKS, block_flags=BLOCK_FLAGS,
    eval_flags=("--eval-episodes", "0"), same=comparable, learned="charts/episodic_return", fast_path_rel=None,
) -> list[float]:
    """Each optional block deleted alone (with what needs it, TOGETHER): a copy that runs `flags` (plus eval_flags where it
    has the flags) to the very metrics of the whole script (`same`; the fast path's copy: the same policy by another route,
    its metrics within fast_path_rel if given), its Args without the block's fields. All deleted: --help without any
    block's flag, and the `learned` metric of learn_flags."""
    import droppable

    source = (ROOT / script).read_text()
    assert set(droppable.sections(source)) | set().union(*droppable.marks(source).values()) == set(blocks)
    run_script(script, *flags, *eval_flags, "--runs-dir", str(tmp_path / "whole"))
    whole = same(read_metrics(tmp_path / "whole"))
    for names in [{name} | (TOGETHER.get(name, set()) & set(blocks)) for name in blocks] + [set(blocks)]:
        copy_path = tmp_path / f"ppo_without_{'_'.join(sorted(names))}.py"
        copy_path.write_text(copy := droppable.drop(source, names))
        for flag in (f for name in names for f in block_flags.get(name, [])):
            assert f"\n    {flag[2:].replace('-', '_')}:" not in copy, (names, flag)  # its Args field went with the block
        if names != set(blocks):
            runs = tmp_path / "_".join(sorted(names))
            proc = run_script(str(copy_path), *flags, *([] if "evaluation" in names else eval_flags), "--runs-dir", str(runs), check=False)
            assert proc.returncode == 0, (names, proc.stderr[-2000:])
            if names != {"fast-path"}:
                assert same(read_metrics(runs)) == whole, names
            elif fast_path_rel is not None:
                fast = same(read_metrics(runs))
                assert len(fast) == len(whole) and all(f == pytest.approx(w, rel=fast_path_rel, abs=1e-6) for f, w in zip(fast, whole))
    proc = run_script(str(copy_path), *learn_flags, "--runs-dir", str(tmp_path / "all"), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    helped = run_script(str(copy_path), "--help", check=False)
    assert helped.returncode == 0 and not any(f in helped.stdout for fs in block_flags.values() for f in fs), helped.stdout[-2000:]
    return [r[learned] for r in read_metrics(tmp_path / "all") if learned in r]


def check_the_readme_line_counts(script: str, blocks=BLOCKS) -> None:
    """README's reading table: lines of the file, of the part above the fence, of the copy without every optional block."""
    import droppable

    source = (ROOT / script).read_text()
    fence = next(i for i, line in enumerate(source.splitlines(), 1) if line.startswith("# Infrastructure"))
    row = f"| `{script}` | {len(source.splitlines())} | {fence} | {len(droppable.drop(source, set(blocks)).splitlines())} |"
    assert row in (ROOT / "README.md").read_text(), row
