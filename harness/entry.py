"""What every entry point does around its work: quiet TVM's logging, hand the task its results
folder, turn a user's mistake into one line and exit status 2, and never leave a results.json
claiming more than happened.

    @hydra.main(config_path="../conf", config_name="baseline", version_base="1.3")
    @entry.guarded
    def main(cfg, run_dir): ...      # returns the exit status (entry.exit_status)

Exit statuses: 0 ok; 1 the run failed or partly failed (results.json: "partial", "error", or
"failed" for verify); 2 bad input (one line on stderr naming the fix); 130 / 143 interrupted by
SIGINT / SIGTERM (results.json: "interrupted", with the points finished before).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from engine.config import ConfigError
from runtime_patch import settings

from .results import ResultsNotWritten, RunDir

log = logging.getLogger("experiments")
_run_id: str | None = None


def run_id() -> str:
    """This process's run folder name: start time to the microsecond and the process id (two
    runs started in the same second, or microsecond, never share a folder)."""
    global _run_id
    if _run_id is None:
        _run_id = f"{datetime.now():%Y%m%d-%H%M%S-%f}-{os.getpid()}"
    return _run_id


# conf/hydra/default.yaml names run folders with it; registered when an entry point imports this.
if not OmegaConf.has_resolver("lab_run_id"):
    OmegaConf.register_new_resolver("lab_run_id", run_id)


def quiet_tvm() -> None:
    for name in ("tvm", "tvm.relax", "tvm.s_tir", "tvm.ffi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings.set_default("TVM_LOG_DEBUG", "0")


def _exit_now_after_nccl(code: int) -> None:
    """Results are written and sessions closed: after an nccl session, leave without interpreter
    teardown, which was seen to hang there (see runtime_patch.disco.nccl_was_used)."""
    from runtime_patch import disco

    if disco.nccl_was_used():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_status(status: str, points=()) -> int:
    """An entry point's exit status for its report's `status`: 0 "ok"; 2 where every point failed
    on the user's input (a ConfigError inside the point, e.g. a model that cannot fit); else 1."""
    if status == "ok":
        return 0
    if points and all(p.config_error for p in points):
        return 2
    return 1


def describe(err: BaseException) -> str:
    """An exception as one line: its type and message (the type alone where the message is empty)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def guarded(task: Callable) -> Callable:
    """Wrap a Hydra task `task(cfg, run_dir) -> exit status` (run_task says what it guards)."""

    @functools.wraps(task)
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        quiet_tvm()
        config = OmegaConf.to_container(cfg, resolve=True)
        folder = HydraConfig.get().runtime.output_dir
        try:
            run_dir = RunDir(folder)
            stale = run_dir.path("results.json")
            if stale.exists():  # a folder used again: until this run writes its own, none claims anything
                os.replace(stale, run_dir.path("results.previous.json"))
                log.warning("%s was moved to results.previous.json: this run writes its own", stale)
        except OSError as err:
            _refuse_folder(folder, err, "hydra.run.dir")
        code = run_task(lambda: task(cfg, run_dir), run_dir, config)
        _exit_now_after_nccl(code)
        if code:
            sys.exit(code)

    return run


def run_task(call: Callable[[], int | None], run_dir, config: dict) -> int:
    """Run an entry point's task and return its exit status, with the run's state installed
    (harness.run_state: the points finished) and SIGTERM raising like SIGINT, so that whatever
    happens results.json claims no more than what happened:
    - the task returns: its results.json is its own (written last by report.write_report);
    - bad input (ConfigError): one line on stderr, results.json "error" (or "partial" where
      points were measured before), exit status 2;
    - any other exception: logged with its traceback, results.json "partial" (points were
      measured, or the report was written before the failure) or "error", exit status 1;
    - SIGINT / SIGTERM (Ctrl-C, kill, the profiler's time limit): the sessions close on the way
      out (their disco workers stop), results.json "interrupted" with the points finished,
      exit status 130 / 143.
    A results.json written before a later failure is rewritten with the status lowered."""
    from . import run_state

    state = run_state.RunState()
    with run_state.installed(state), run_state.signals_as_exceptions():
        try:
            code = call()
        except KeyboardInterrupt as err:
            with run_state.signals_ignored():
                return _interrupted(run_dir, config, state, run_state.signal_of(err))
        except ConfigError as err:
            with run_state.signals_ignored():
                return _failed(run_dir, config, state, str(err), user_error=True)
        except ResultsNotWritten as err:  # a full disk: no traceback, a smaller results.json is tried
            with run_state.signals_ignored():
                return _failed(run_dir, config, state, str(err), user_error=False)
        except Exception as err:  # noqa: BLE001  (recorded, then reported with its traceback)
            log.error("the run failed:\n%s", traceback.format_exc().rstrip())
            with run_state.signals_ignored():
                return _failed(run_dir, config, state, describe(err), user_error=False)
    return code or 0


def _document(run_dir, config: dict, state, status: str, extra: dict) -> dict:
    from .report import summary_of

    return {"config": config, "environment": run_dir.env, "runs": [p.to_dict() for p in state.points],
            "summary": summary_of(state.points), "status": status, **extra}


def _write(run_dir, doc: dict) -> str | None:
    """Write `doc` as results.json; where that fails (a full disk), a small one saying so.
    Returns what went wrong (None: `doc` was written)."""
    try:
        run_dir.write_document(doc)
        return None
    except Exception as err:  # noqa: BLE001  (ResultsNotWritten, or what JSON cannot hold)
        problem = str(err) if isinstance(err, ResultsNotWritten) else f"could not write results.json: {describe(err)}"
    error = doc.get("error")
    small = {"config": doc.get("config"), "environment": doc.get("environment"), "runs": [], "summary": {},
             "status": "interrupted" if doc.get("status") == "interrupted" else "error",
             "error": problem if not error or error in problem else f"{error}; {problem}"}
    try:
        run_dir.write_document(small)
    except Exception:  # noqa: BLE001
        return problem
    return f"{problem}; wrote a smaller one, without the measurements"


def _say(message: str, problem: str | None) -> None:
    """One line (two where writing results.json failed too)."""
    if problem is None or problem.startswith(message):
        print(f"error: {problem or message}", file=sys.stderr, flush=True)
    else:
        print(f"error: {message}\nerror: {problem}", file=sys.stderr, flush=True)


def _link_latest(run_dir) -> None:
    try:
        run_dir.update_latest_link()
    except OSError as err:
        log.warning("could not point %s at this run: %s", run_dir.root.parent / "latest", err)


def _interrupted(run_dir, config: dict, state, signum: signal.Signals) -> int:
    from . import run_state

    during = {"interrupted_by": signum.name, "interrupted_during": state.current}
    if run_dir.results is not None:  # the report was written: what came after it was cut short
        doc = {**run_dir.results, "status": "interrupted", "status_before_interrupt": run_dir.results["status"],
               **during}
    else:
        doc = _document(run_dir, config, state, "interrupted", during)
    problem = _write(run_dir, doc)
    if problem is None:
        _link_latest(run_dir)
    finished = len(state.measured)
    head = f"interrupted by {signum.name}" + (f" during {state.current}" if state.current else "")
    if problem is None:
        print(f"{head}: results.json (status interrupted) holds the {finished} point{'s' * (finished != 1)} "
              f"measured before: {run_dir.root}", file=sys.stderr, flush=True)
    else:
        print(f"{head}\nerror: {problem}", file=sys.stderr, flush=True)
    return run_state.exit_status(signum)


def _failed(run_dir, config: dict, state, message: str, user_error: bool) -> int:
    if run_dir.results is not None:  # the report was written: the failure came after it
        before = run_dir.results["status"]
        status = "partial" if before in ("ok", "partial") else before
        doc = {**run_dir.results, "status": status, "error": message}
    else:
        doc = _document(run_dir, config, state, "partial" if state.measured else "error", {"error": message})
    problem = _write(run_dir, doc)
    if problem is None and (state.points or not user_error):
        _link_latest(run_dir)
    _say(message, problem)
    return 2 if user_error else 1


class RunFolderCheck(Callback):
    """A Hydra callback (conf/hydra/default.yaml): a results folder that cannot be written is
    refused with one line and exit status 2 before the run starts (Hydra would fail creating it
    with a traceback)."""

    def on_run_start(self, config, **kwargs) -> None:
        _check_folder(_resolved(config, "run"), "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_folder(_resolved(config, "sweep"), "hydra.sweep.dir")


def _resolved(config, which: str) -> str:
    """hydra.<which>.dir resolved: its ${hydra:...} interpolations need the Hydra config, which
    Hydra sets only after the start callbacks (run_job sets the same one again)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(config)
    return str(config.hydra[which].dir)


def _check_folder(value, key: str) -> None:
    path = Path(str(value))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        _refuse_folder(path, err, key)


def _refuse_folder(path, err: OSError, key: str) -> None:
    """A results folder that cannot be written: one line naming the fix, exit status 2."""
    print(f"error: cannot write the results folder {path} ({err.strerror or err}); choose another with "
          f"{key}=DIR", file=sys.stderr, flush=True)
    sys.exit(2)
