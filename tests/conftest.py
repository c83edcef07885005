"""Shared helpers: the scripts live at the repository root and are run as a user would run them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_script(script: str, *flags: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `python script flags...` from the repository root with wandb offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(flags)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(runs_dir: Path) -> list[dict]:
    """The metrics.jsonl records of the single run under runs_dir."""
    (path,) = runs_dir.glob("*/metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]
