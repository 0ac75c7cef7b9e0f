"""Results folders: atomic writes, the environment a run happened in, and results.json."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil

from engine.compile import current_umask  # results files honour the umask as the artifact cache does
from runtime_patch import settings

from .nvml import Nvml

REPO_ROOT = Path(__file__).resolve().parent.parent
RESERVED_KEYS = ("config", "environment", "runs", "summary", "status")


# --- atomic writes -------------------------------------------------------------------------

@contextmanager
def _atomic_file(path, mode: str):
    """Yield a temp file next to `path`; on success it replaces `path`, on error it is removed.
    The file gets the mode a plain open() would give it (0666 less the umask: 0644 usually), not
    mkstemp's 0600: results folders are shared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> Path:
    with _atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def to_jsonable(obj):
    """Plain JSON types from numpy scalars/arrays, paths, dataclasses and any Mapping/sequence."""
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):  # also covers OmegaConf's DictConfig
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (Sequence, set, frozenset)) and not isinstance(obj, bytes):  # and ListConfig
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _json_key(key):
    key = key.item() if isinstance(key, np.generic) else key
    return key if isinstance(key, (str, int, float, bool)) or key is None else str(key)


def atomic_write_json(path, obj, indent: int | None = 2) -> Path:
    # Serialise first, so an unserialisable object never touches the file system.
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent) + "\n")


def atomic_save_figure(fig, path, **savefig_kwargs) -> Path:
    fmt = Path(path).suffix.lstrip(".") or "png"
    with _atomic_file(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)
    return Path(path)


def atomic_save_npy(path, array) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    with _atomic_file(path, "wb") as f:
        f.write(buf.getvalue())
    return Path(path)


# --- environment ---------------------------------------------------------------------------

def git_info(repo_root=REPO_ROOT) -> dict | None:
    """{"sha", "dirty"} of the checkout at `repo_root`, or None. $LAB_GIT_SHA, where set, wins: a
    copy of the tree on a GPU box may carry a .git that is not the commit the copy was made from."""
    if settings.is_set("LAB_GIT_SHA"):
        return {"sha": settings.text("LAB_GIT_SHA"), "dirty": None, "from": "LAB_GIT_SHA"}

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo_root, capture_output=True,
                              text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": head.stdout.strip(),
            "dirty": status.returncode != 0 or bool(status.stdout.strip())}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpus_nvml() -> list[dict] | None:
    nv = Nvml.open()
    if nv is None:
        return None
    with nv:
        driver = nv.text(nv.read("nvmlSystemGetDriverVersion"))
        gpus = []
        for i, h in enumerate(nv.handles):
            memory, pci = nv.read("nvmlDeviceGetMemoryInfo", h), nv.read("nvmlDeviceGetPciInfo", h)
            gpus.append({"index": i, "name": nv.text(nv.read("nvmlDeviceGetName", h)), "driver_version": driver,
                         "memory_total_bytes": int(memory.total) if memory else None,
                         "pci_bus_id": nv.text(pci.busId) if pci else None})
        return gpus


def parse_nvidia_smi(csv_text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id
    --format=csv,noheader,nounits` (memory in MiB)."""
    gpus = []
    for line in csv_text.strip().splitlines():
        index, name, driver, mem_mib, bus = (c.strip() for c in line.split(","))
        gpus.append({"index": int(index), "name": name, "driver_version": driver,
                     "memory_total_bytes": int(float(mem_mib)) * 2**20, "pci_bus_id": bus})
    return gpus


def _gpus_nvidia_smi() -> list[dict]:
    # The GPU box may lack nvidia-ml-py; nvidia-smi reports the same facts.
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,pci.bus_id",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def gpus() -> list[dict]:
    found = _gpus_nvml()
    return found if found is not None else _gpus_nvidia_smi()


def _version(module_name: str, dist_name: str | None = None) -> str | None:
    module = sys.modules.get(module_name)
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    if dist_name is None:
        return None
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What produced a result: code, software, machine, time."""
    try:
        project_version = metadata.version("tvm-tp-lab")
    except metadata.PackageNotFoundError:
        project_version = "unknown"
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        "cwd": os.getcwd(),
        "project_version": project_version,
        "git": git_info(),
        # tvm is not imported here: the runtime-only setup must load its libraries before
        # `import tvm`, so the distribution's version stands in until tvm is imported.
        "tvm_version": _version("tvm", "apache-tvm"),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": int(psutil.virtual_memory().total),
        "cuda_visible_devices": settings.raw("CUDA_VISIBLE_DEVICES"),
        "gpus": gpus(),
    }


# --- run directories -----------------------------------------------------------------------

class ResultsNotWritten(OSError):
    """results.json could not be written (a full disk, a folder gone read-only)."""

    def __str__(self) -> str:
        return str(self.strerror)


class RunDir:
    """One results folder, e.g. results/<experiment>/<timestamp>/."""

    def __init__(self, root, env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._env = env
        self.results: dict | None = None  # the results.json last written by this process

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def env(self) -> dict:
        if self._env is None:
            self._env = environment()
        return self._env

    def path(self, name: str) -> Path:
        return self.root / name

    def write_results(self, config: dict, runs: list, summary: dict, status: str,
                      extra: dict | None = None) -> Path:
        extra = dict(extra or {})
        clash = sorted(set(extra) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"extra may not override {clash}")
        doc = {"config": config, "environment": self.env, "runs": runs,
               "summary": summary, "status": status, **extra}
        return self.write_document(doc)

    def write_document(self, doc: dict) -> Path:
        """Write `doc` as results.json (atomically) and remember it (`results`); ResultsNotWritten
        where the file system refuses (the previous results.json, if any, is left as it was)."""
        try:
            path = atomic_write_json(self.path("results.json"), doc)
        except OSError as err:
            raise ResultsNotWritten(err.errno, f"could not write {self.path('results.json')}: "
                                               f"{err.strerror or err}") from err
        self.results = doc
        return path

    def write_failure(self, config: dict, error: str, runs: list | None = None, status: str = "error",
                      summary: dict | None = None, extra: dict | None = None) -> Path:
        """results.json for a run that failed (or was interrupted: `status`); any runs finished
        before are kept."""
        return self.write_results(config, runs or [], summary or {}, status, {"error": str(error), **(extra or {})})

    def update_latest_link(self, name: str = "latest") -> Path:
        """Point <parent>/latest at this folder (relative link; replaced atomically). Where the
        link points at a sibling run folder named by a later start (harness.entry.run_id), it is
        left there: `latest` is the newest run, whichever of two runs started together ends first."""
        import fcntl

        parent = self.root.parent
        link = parent / name
        lock = os.open(parent, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one updater at a time (a lock on the folder itself)
            current = os.readlink(link) if link.is_symlink() else None
            if current is not None and _started_later(current, self.root.name) and (parent / current).is_dir():
                return link
            tmp = parent / f".{name}.{os.getpid()}.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(self.root.name, tmp)
            try:
                os.replace(tmp, link)
            except BaseException:
                tmp.unlink()
                raise
        finally:
            os.close(lock)
        return link


_RUN_ID = re.compile(r"(?:multirun-)?(\d{8}-\d{6}-\d{6})-(\d+)")


def _started_later(other: str, mine: str) -> bool:
    """Whether run folder `other` was started after `mine`, both named by harness.entry.run_id
    (time to the microsecond, then the pid); False for any other names."""
    a, b = _RUN_ID.fullmatch(other), _RUN_ID.fullmatch(mine)
    return bool(a and b) and (a[1], int(a[2])) > (b[1], int(b[2]))
