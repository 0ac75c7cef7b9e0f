"""Run an experiment (or a profiler wrapping it) as a subprocess under a time limit.

The experiment runs in a process group of its own, its output is shown and kept in
`experiment.log`, and at the limit the whole group is asked to stop (SIGINT, so Python's at-exit
handlers, the CUPTI tracer's among them, still run), then told (SIGTERM), then killed. A SIGINT
(Ctrl-C) or SIGTERM sent to the profiler stops the experiment the same way, and the run is
`interrupted` (by that signal).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness.results import REPO_ROOT

EXPERIMENTS_DIR = REPO_ROOT / "experiments"  # entry points only: every module there with a main
_SAFE_VALUE = re.compile(r"[\w./@%+\-]+")


def _has_main(path: Path) -> bool:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)


def experiments() -> list[str]:
    """Modules under experiments/ that define a main (the entry points)."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_") and _has_main(p))


def check_experiment(name: str) -> str | None:
    """None if `name` is an entry point, else what is wrong (with the ones there are)."""
    if re.fullmatch(r"[A-Za-z]\w*", name) and _has_main(EXPERIMENTS_DIR / f"{name}.py"):
        return None
    return f"unknown experiment {name!r}; choose one of: {', '.join(experiments())}"


def hydra_value(value: str) -> str:
    """A path as a Hydra override value: quoted where Hydra's grammar would read it otherwise."""
    if _SAFE_VALUE.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_args(experiment: str, overrides: list[str], run_dir: Path) -> list[str]:
    """`-m experiments.<name>` with its results folder put at `run_dir`."""
    where = hydra_value(str(run_dir))
    return ["-m", f"experiments.{experiment}", f"hydra.run.dir={where}", f"hydra.sweep.dir={where}",
            *overrides]


@dataclasses.dataclass
class Completed:
    command: list[str]
    returncode: int | None
    timed_out: bool
    interrupted: bool
    start_s: float  # time.perf_counter() when the process was started
    end_s: float
    log_path: Path
    interrupted_by: str | None = None  # "SIGINT" | "SIGTERM": the signal the profiler got

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def status(self) -> str:
        if self.timed_out:
            return "time limit reached"
        if self.interrupted:
            return "interrupted"
        return "ok" if self.returncode == 0 else f"experiment failed (exit status {self.returncode})"


def _tee(stream, log, echo: bool) -> None:
    out = sys.stdout.buffer if echo else None
    for chunk in iter(lambda: stream.read1(65536), b""):
        log.write(chunk)
        log.flush()
        if out is not None:
            try:
                out.write(chunk)
                out.flush()
            except (OSError, ValueError):
                out = None


class _Terminated(Exception):
    """The profiler got SIGTERM (raised in the main thread by the handler `run` installs)."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, first_signal_to_leader: bool = False, grace_s: float = 20.0) -> None:
    """Ask, tell, then make the process group end. With `first_signal_to_leader`, the first
    SIGINT goes to the leader only (a profiler that stops its target itself, e.g. ncu)."""
    steps = [(signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)]
    for i, (sig, wait_s) in enumerate(steps):
        if proc.poll() is not None:
            break
        if i == 0 and first_signal_to_leader:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        else:
            _signal_group(proc, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    # Leave no stragglers of the group behind (disco workers of a stopped controller).
    if proc.poll() is not None:
        _signal_group(proc, signal.SIGKILL)


def run(command: list[str], env: dict, log_path: Path, time_limit_s: float, on_start=None,
        echo: bool = True, stop_leader_first: bool = False) -> Completed:
    """Run `command` from the repository root; `on_start(popen)` is called once it has started
    (e.g. to attach a sampler to its pid)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        start_s = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        tee = threading.Thread(target=_tee, args=(proc.stdout, log, echo), daemon=True)
        tee.start()
        if on_start is not None:
            on_start(proc)
        timed_out = interrupted = False
        interrupted_by = None
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            proc.wait(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"\nprofile: the time limit of {time_limit_s:g} s was reached: stopping the experiment",
                  file=sys.stderr, flush=True)
            stop(proc, stop_leader_first)
        except (KeyboardInterrupt, _Terminated) as err:
            interrupted = True
            interrupted_by = "SIGTERM" if isinstance(err, _Terminated) else "SIGINT"
            print(f"\nprofile: interrupted ({interrupted_by}): stopping the experiment (outputs so far are still "
                  "written)", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
            stop(proc, stop_leader_first)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        end_s = time.perf_counter()
        tee.join(timeout=10)
    return Completed(command, proc.returncode, timed_out, interrupted, start_s, end_s, log_path, interrupted_by)
