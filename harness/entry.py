"""What every entry point does around its work: quiet TVM's logging, hand the task its results
folder, turn a user's mistake into one line and exit status 2, and never leave a results.json
claiming more than happened.

    @hydra.main(config_path="../conf", config_name="baseline", version_base="1.3")
    @entry.guarded
    def main(cfg, run_dir): ...      # returns the exit status
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from datetime import datetime
from typing import Callable

from omegaconf import OmegaConf

from engine.config import ConfigError
from runtime_patch import settings

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


def guarded(task: Callable) -> Callable:
    """Wrap a Hydra task `task(cfg, run_dir) -> exit code`. A failure before the task wrote its
    results leaves a results.json with status "error" (never one claiming success); user-facing
    errors become one line on stderr and exit status 2, with no traceback."""

    @functools.wraps(task)
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from .results import RunDir

        quiet_tvm()
        run_dir = RunDir(HydraConfig.get().runtime.output_dir)
        try:
            code = task(cfg, run_dir)
        except Exception as err:
            if not run_dir.path("results.json").exists():
                run_dir.write_failure(OmegaConf.to_container(cfg, resolve=True), str(err))
            if not isinstance(err, ConfigError):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        _exit_now_after_nccl(code or 0)
        if code:
            sys.exit(code)

    return run
