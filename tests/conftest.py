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
