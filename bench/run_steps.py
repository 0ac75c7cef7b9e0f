"""Run a list of shell commands on a GPU box within a time budget and collect what they wrote.

    python bench/run_steps.py --out "$OUT" --budget 540 -- "cmd 1" "cmd 2" ...

Each command runs in order (output to <out>/steps.log, with its exit status and seconds); a
command is not started when the budget left is under --min-left seconds; results/ and
docs/benchmarks/ are packed into <out>/results.tgz at the end (the device tool brings back few files).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=540)
    ap.add_argument("--min-left", type=float, default=30)
    ap.add_argument("--step-timeout", type=float, default=240, help="seconds one command may run")
    ap.add_argument("commands", nargs="+")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    failures = 0
    with open(args.out / "steps.log", "w") as log:
        for i, cmd in enumerate(args.commands):
            left = args.budget - (time.monotonic() - start)
            if left < args.min_left:
                print(f"[step {i}] SKIPPED (budget): {cmd}", file=log, flush=True)
                continue
            print(f"[step {i}] $ {cmd}", file=log, flush=True)
            t0 = time.monotonic()
            try:
                rc = subprocess.run(["bash", "-c", cmd], stdout=log, stderr=subprocess.STDOUT,
                                    timeout=min(left - 10, args.step_timeout)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            failures += rc != 0
            print(f"[step {i}] exit {rc} after {time.monotonic() - t0:.1f} s", file=log, flush=True)
            print(f"[step {i}] exit {rc} after {time.monotonic() - t0:.1f} s: {cmd[:120]}", flush=True)
    with tarfile.open(args.out / "results.tgz", "w:gz") as tar:
        for folder in ("results", "docs/benchmarks"):
            if Path(folder).exists():
                tar.add(folder)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
