"""Run a list of shell commands on a GPU box within a time budget and collect what they wrote.

    python bench/run_steps.py --out "$OUT" --budget 540 -- "cmd 1" "cmd 2" ...

Each command runs in order (output to <out>/steps.log, with its exit status and seconds); a
command is not started when the budget left is under --min-left seconds; results/ and
docs/benchmarks/ are packed into <out>/results.tgz at the end (the device tool brings back few files).
"""

from __future__ import annotations

import argparse
import os
import signal
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
    ap.add_argument("--max-file-mb", type=float, default=8, help="files above this stay out of results.tgz")
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
            # A session of its own, so that a step past its time is stopped with all its processes
            # (disco workers included), not just the shell; SIGABRT first makes a Python with
            # PYTHONFAULTHANDLER=1 print where it was.
            proc = subprocess.Popen(["bash", "-c", cmd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=min(left - 10, args.step_timeout))
            except subprocess.TimeoutExpired:
                rc = "timeout"
                for sig, grace in ((signal.SIGABRT, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=grace)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
            failures += rc != 0
            print(f"[step {i}] exit {rc} after {time.monotonic() - t0:.1f} s", file=log, flush=True)
            print(f"[step {i}] exit {rc} after {time.monotonic() - t0:.1f} s: {cmd[:120]}", flush=True)
    left_out = []
    with tarfile.open(args.out / "results.tgz", "w:gz") as tar:
        for folder in ("results", "docs/benchmarks"):
            for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
                if path.is_file() and path.stat().st_size > args.max_file_mb * 2**20:
                    left_out.append(f"{path} ({path.stat().st_size / 2**20:.0f} MiB)")
                elif path.is_file():
                    tar.add(path)
    if left_out:  # the device tool brings back a limited size: big traces stay on the box
        print("left out of results.tgz:\n  " + "\n  ".join(left_out), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
