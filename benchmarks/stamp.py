"""The stamp every benchmark result carries: which code ran, when, on what machine, under what load, by which command.

    from stamp import stamp                       # from a script in benchmarks/ (its folder is on sys.path)
    result = {"stamp": stamp(__file__), ...}      # once, when the measurement starts

    python benchmarks/stamp.py --out FILE.json -- CMD ARGS...   # stamp any command: run it, record how it ended

`commit` is `git describe --always --dirty` of the checkout at the moment of the stamp; `script_commit` the last
commit that touched the script, and `script_modified` whether the script differs from that commit (so a
checkout dirty elsewhere, e.g. a README being edited, does not hide that the script itself was clean).
Results written before stamps existed carry `"recovered_from_history": true` instead (benchmarks/README.md).
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stamp(script: str, command: list | None = None) -> dict:
    """Where, when and from what code a measurement starts; `command` defaults to this process's argv."""
    script_path = os.path.relpath(Path(script).resolve(), ROOT)
    modified = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", script_path], cwd=ROOT).returncode != 0
    return {
        "commit": git("describe", "--always", "--dirty"),
        "script": script_path,
        "script_commit": git("log", "-1", "--format=%h", "--", script_path),
        "script_modified": modified,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "threads": os.cpu_count(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "unset (OMP_NUM_THREADS)"),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Stamp a command's run: write the stamp, run it, add how it ended.")
    parser.add_argument("--out", required=True, help="JSON file the stamp goes to")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    record = stamp(cmd[0] if Path(cmd[0]).suffix == ".py" else next((c for c in cmd if c.endswith(".py")), cmd[0]), cmd)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    start = time.time()
    rc = subprocess.run(cmd).returncode
    record.update(exit_code=rc, wall_s=round(time.time() - start, 1))
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
