"""Results you can trust under faults (#17): bad input gets one line and exit status 2 before
anything is compiled; a damaged cache entry is named and rebuilt; an interrupted or failing run
leaves a results.json that claims no more than what happened; files are shared as a plain open()
would make them. Entry points run as subprocesses on the tiny model, signals go to real processes."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError, from_hf_folder
from harness import run_state
from harness.entry import run_task
from harness.measure import RunSample
from harness.report import Point, write_report
from harness.results import RunDir, atomic_write_text, current_umask

ROOT = Path(__file__).resolve().parents[1]
FAST = ["device=cpu", "workload.prompt_len=8", "workload.new_tokens=6", "workload.warmup=1", "workload.repeats=2",
        "measure_bandwidth=false"]
FAKE_ENV = {"timestamp": "2026-11-30T00:00:00+00:00", "command": "test", "git": None, "gpus": []}


def env_for(cache_dir: Path, **extra: str) -> dict:
    return {**os.environ, "LAB_CACHE_DIR": str(cache_dir), "HYDRA_FULL_ERROR": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def run(module: str, *overrides: str, cache_dir: Path, out: Path | None, timeout: int = 600, cwd: Path = ROOT,
        preexec_fn=None, **env):
    cmd = [sys.executable, "-m", module, *([f"hydra.run.dir={out}"] if out else []), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env_for(cache_dir, **env), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_one_line(proc, *fragments: str) -> str:
    """Exit status 2, no traceback, the last line on stderr an `error:` naming every fragment."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# --- bad checkpoints: refused before anything is compiled ---------------------------------------

def _damaged(tiny_checkpoint: Path, where: Path, config: dict | None = None, drop: tuple = (), tensors=None) -> Path:
    folder = where / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    if config or drop:
        raw = json.loads((folder / "config.json").read_text())
        raw.update(config or {})
        for key in drop:
            raw.pop(key, None)
        (folder / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        tensors(folder / "model.safetensors")
    return folder


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])


def _edit_tensors(change):
    def edit(file: Path) -> None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return edit


BAD_CHECKPOINTS = {
    "no layers": (dict(config={"num_hidden_layers": 0}),
                  ["config.json", "num_hidden_layers must be a positive integer"]),
    "hidden size as text": (dict(config={"hidden_size": "64"}), ["config.json", "hidden_size", "got '64'"]),
    "negative vocab": (dict(config={"vocab_size": -5}), ["config.json", "vocab_size must be a positive integer"]),
    "hidden size not a multiple of heads": (
        dict(config={"hidden_size": 130}, drop=("head_dim",)),
        ["config.json", "hidden_size 130 is not divisible by num_attention_heads 4"]),
    "kv heads": (dict(config={"num_key_value_heads": 3}), ["config.json", "num_key_value_heads 3"]),
    "truncated safetensors": (dict(tensors=_truncate), ["model.safetensors is truncated: tensor"]),
    "tensor of the wrong shape": (dict(tensors=_edit_tensors(lambda t: t.update(
        {"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"][:256]}))),
        ["model.safetensors: tensor model.layers.1.mlp.up_proj.weight has shape [256, 128]", "implies [512, 128]"]),
    "missing tensor": (dict(tensors=_edit_tensors(lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))),
                       ["tensor model.layers.0.self_attn.k_proj.weight", "is missing"]),
    "integer tensor": (dict(tensors=_edit_tensors(lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].astype(np.int32)}))), ["model.norm.weight is stored as I32"]),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_in_verify_before_compiling(tiny_checkpoint, tmp_path, case):
    damage, fragments = BAD_CHECKPOINTS[case]
    folder = _damaged(tiny_checkpoint, tmp_path, **damage)
    cache = tmp_path / "cache"
    start = time.monotonic()
    proc = run("experiments.verify", f"model.path={folder}", cache_dir=cache, out=tmp_path / "v")
    line = assert_one_line(proc, str(folder), *fragments)
    assert time.monotonic() - start < 30  # imports only: nothing compiled, transformers never loaded
    assert not [p for p in cache.glob("*") if p.is_dir()]  # nothing compiled
    doc = results(tmp_path / "v")
    assert doc["status"] == "error" and doc["error"] == line.removeprefix("error: ")


@pytest.mark.parametrize("case", ["no layers", "tensor of the wrong shape"])
def test_a_bad_checkpoint_is_one_line_in_baseline(tiny_checkpoint, tmp_path, case):
    damage, fragments = BAD_CHECKPOINTS[case]
    folder = _damaged(tiny_checkpoint, tmp_path, **damage)
    proc = run("experiments.baseline", *FAST, f"model.path={folder}", cache_dir=tmp_path / "cache", out=tmp_path / "b")
    assert_one_line(proc, str(folder), *fragments)
    assert results(tmp_path / "b")["status"] == "error"


def test_the_reference_loaders_refusal_is_one_line(tiny_checkpoint, tmp_path):
    """What transformers refuses beyond the engine's checks (a pad token outside the vocabulary)
    is mapped the same way, before compiling."""
    folder = _damaged(tiny_checkpoint, tmp_path, config={"pad_token_id": 5000})
    proc = run("experiments.verify", f"model.path={folder}", cache_dir=tmp_path / "cache", out=tmp_path / "v")
    assert_one_line(proc, str(folder), "transformers cannot load this checkpoint", "Padding_idx")
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_dir()]


def test_checkpoint_checks_read_headers_only(tiny_checkpoint, tmp_path):
    from engine.weights import check_checkpoint, safetensors_header

    config = from_hf_folder(tiny_checkpoint)
    check_checkpoint(tiny_checkpoint, config)  # a good one passes
    header = safetensors_header(tiny_checkpoint / "model.safetensors")
    assert header["lm_head.weight"]["shape"] == (config.vocab_size, config.hidden_size)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        safetensors_header(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ConfigError, match="truncated or not a safetensors file"):
        safetensors_header(tmp_path / "huge.safetensors")


# --- other bad input: one line, exit status 2 ----------------------------------------------------

@pytest.mark.parametrize("module,overrides,fragments", [
    ("experiments.overlap", ["mode=[]"], ["mode is empty"]),
    ("experiments.overlap", ["workload.new_tokens=1"], ["workload.new_tokens >= 2"]),
    ("experiments.quant_compare", ["workload.new_tokens=1"], ["workload.new_tokens >= 2"]),
    ("experiments.tensor_parallel", ["overlap=full_overlap"], ["overlap='full_overlap'", "experiments.overlap"]),
    ("experiments.baseline", ["device=cuda", "device.cuda_arch=sm_90"], ["no CUDA GPU", "device=cpu"]),
])
def test_bad_values_are_refused_up_front(cache_dir, tmp_path, module, overrides, fragments):
    if module == "experiments.baseline":
        from harness.spec import cuda_visible

        if cuda_visible():
            pytest.skip("a GPU is visible here")
    proc = run(module, "device=cpu", *overrides, cache_dir=cache_dir, out=tmp_path / "r")
    assert_one_line(proc, *fragments)
    assert results(tmp_path / "r")["status"] == "error"


def test_a_cache_dir_that_is_a_file_is_one_line(cache_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = run("experiments.baseline", *FAST, f"cache_dir={tmp_path / 'a-file'}", cache_dir=cache_dir,
               out=tmp_path / "r")
    assert_one_line(proc, str(tmp_path / "a-file"), "not a folder")


@pytest.mark.parametrize("multirun", [False, True])
def test_a_results_folder_that_cannot_be_written_is_one_line(cache_dir, tmp_path, multirun):
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "run"
    args = ["-m", *FAST, f"hydra.sweep.dir={target}"] if multirun else [*FAST, f"hydra.run.dir={target}"]
    proc = run("experiments.baseline", *args, cache_dir=cache_dir, out=None)
    assert_one_line(proc, str(target), "hydra.sweep.dir=DIR" if multirun else "hydra.run.dir=DIR")


@pytest.mark.parametrize("multirun", [False, True])
def test_the_default_results_folder_is_checked_quietly(cache_dir, tmp_path, multirun):
    """The folder check resolves the default folder's ${hydra:job.name} (no callback warning) and
    the run lands in results/<experiment>/ under the working folder."""
    proc = run("experiments.tensor_parallel", *(["-m"] if multirun else []), "tp=[]", cache_dir=cache_dir,
               out=None, cwd=tmp_path)
    assert "Callback" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: tp is empty; give e.g. 'tp=[1,2]'"
    assert len(list((tmp_path / "results" / "tensor_parallel").glob("*/**/results.json"
                                                                        if multirun else "*/results.json"))) == 1


# --- the artifact cache checks what it loads -----------------------------------------------------

def _copy_of(artifact, cache: Path) -> Path:
    cache.mkdir()
    return Path(shutil.copytree(artifact.path, cache / artifact.path.name))


def test_damaged_artifacts_are_refused_by_name(compiled, tiny_config, tmp_path):
    from engine.compile import Artifact

    artifact = compiled(tiny_config, "q0f16")
    assert artifact.metadata["files"]["model.so"]["bytes"] == artifact.library.stat().st_size
    cases = {
        "model.so has": lambda f: os.truncate(f / "model.so", (f / "model.so").stat().st_size // 2),
        "metadata.json is not valid JSON": lambda f: (f / "metadata.json").write_text("{not json"),
        "metadata.json: no build spec": lambda f: (f / "metadata.json").write_text("{}"),
    }
    for i, (message, damage) in enumerate(cases.items()):
        folder = _copy_of(artifact, tmp_path / f"c{i}")
        damage(folder)
        with pytest.raises(ConfigError, match=re.escape(message)):
            Artifact.load(folder)
    folder = _copy_of(artifact, tmp_path / "flip")  # same size, other bytes: the checksum
    data = bytearray((folder / "model.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.so").write_bytes(bytes(data))
    Artifact.load(folder)  # sizes only (what disco workers do)
    with pytest.raises(ConfigError, match="does not match the SHA-256"):
        Artifact.load(folder, verify=True)


def test_a_damaged_cache_entry_is_named_and_rebuilt(compiled, tiny_config, tmp_path, caplog):
    from engine.compile import BuildSpec, compile_model

    artifact = compiled(tiny_config, "q0f16")
    folder = _copy_of(artifact, tmp_path / "cache")
    (folder / "metadata.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="engine.compile"):
        rebuilt = compile_model(BuildSpec(tiny_config, "q0f16"), tmp_path / "cache")
    assert rebuilt.path == folder and rebuilt.metadata["key"] == artifact.metadata["key"]
    assert any("rebuilding the damaged cache entry" in r.message and folder.name in r.message
               and "metadata.json is not valid JSON" in r.message for r in caplog.records)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # nothing left aside
    assert folder.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's 0700


def test_a_truncated_model_so_is_rebuilt_not_a_bus_error(compiled, tiny_config, tmp_path):
    artifact = compiled(tiny_config, "q0f16")
    folder = _copy_of(artifact, tmp_path / "cache")
    os.truncate(folder / "model.so", (folder / "model.so").stat().st_size // 2)
    proc = run("experiments.baseline", *FAST, cache_dir=tmp_path / "cache", out=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = proc.stdout + proc.stderr  # Hydra's log lines go to stdout
    assert f"rebuilding the damaged cache entry {folder.name}" in logged and "model.so has" in logged
    assert results(tmp_path / "b")["status"] == "ok"


# --- runs that cannot do everything say so -------------------------------------------------------

@pytest.mark.parametrize("module,overrides", [("experiments.baseline", []),
                                              ("experiments.tensor_parallel", ["tp=[1,2]"])])
def test_one_new_token_reports_ttft_and_no_decode_figures(cache_dir, tmp_path, module, overrides):
    out = tmp_path / "r"
    proc = run(module, *FAST, "workload.new_tokens=1", *overrides, cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode not measured (new_tokens=1: no decode step)" in proc.stdout
    doc = results(out)
    assert doc["status"] == "ok"
    points = [doc["summary"]] if module.endswith("baseline") else [doc["summary"]["tp=1"], doc["summary"]["tp=2"]]
    for s in points:
        assert s["ttft_s"]["count"] == 2 and s["itl_s"] is None and s["decode_tokens_per_s"] is None
        assert "new_tokens=1" in s["note"]
    if not module.endswith("baseline"):
        assert doc["summary"]["tp=2"]["ttft_speedup"] > 0 and "speedup" not in doc["summary"]["tp=2"]
    assert "Notes" in (out / "summary.md").read_text() and (out / "latency.png").is_file()
    assert not (out / "throughput.png").exists()
    mode = 0o666 & ~current_umask()  # what open() makes, not mkstemp's 0600
    for name in ("results.json", "summary.md", "latency.png", "trace.json"):
        assert (out / name).stat().st_mode & 0o777 == mode, name


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_while_plotting_makes_the_run_partial(compiled, tiny_config, cache_dir, tmp_path):
    """A file-size limit stands in for a full disk: the plots (tens of KB) cannot be written."""
    out = tmp_path / "r"
    compiled(tiny_config, "q0f16")  # the run's artifact is in the cache: nothing to write there
    proc = run("experiments.baseline", *FAST, cache_dir=cache_dir, out=out, preexec_fn=_file_size_limit(20_000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    doc = results(out)
    assert doc["status"] == "partial" and doc["summary"]["decode_tokens_per_s"] > 0
    assert any(e.startswith("latency.png: OSError") for e in doc["report_errors"])
    assert not (out / "latency.png").exists() and "latency.png: OSError" in (out / "summary.md").read_text()
    assert "Traceback" not in proc.stderr


def test_a_results_json_too_big_for_the_disk_leaves_a_small_one(compiled, tiny_config, cache_dir, tmp_path):
    out = tmp_path / "r"
    compiled(tiny_config, "q0f16")  # the run's artifact is in the cache
    proc = run("experiments.baseline", *FAST, cache_dir=cache_dir, out=out, preexec_fn=_file_size_limit(4000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: could not write")
    doc = results(out)
    assert doc["status"] == "error" and "could not write" in doc["error"] and doc["runs"] == []


@pytest.mark.slow
def test_two_runs_started_together_get_two_folders(compiled, tiny_config, cache_dir, tmp_path):
    """Run folders are named to the microsecond and the pid; `latest` is the newer run, whichever ends first."""
    compiled(tiny_config, "q0f16")  # the run's artifact is in the cache
    cmd = [sys.executable, "-m", "experiments.baseline", *FAST, "workload.repeats=1"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env_for(cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    printed = [re.search(r"results: (\S+)", out).group(1) for out, _ in outputs]
    assert len(set(printed)) == 2
    base = tmp_path / "results" / "baseline"
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    assert [str(p) for p in folders] == sorted(printed)
    assert all(results(f)["status"] == "ok" for f in folders)
    assert os.readlink(base / "latest") == folders[-1].name


def test_an_early_worker_death_is_one_clear_line(cache_dir, tmp_path):
    """A disco worker killed as it starts (before or just after its loop begins)."""
    (tmp_path / "die_now.py").write_text("import os, signal, threading\n"
                                         "threading.Timer(0.0, os.kill, (os.getpid(), signal.SIGKILL)).start()\n")
    out = tmp_path / "r"
    proc = run("experiments.tensor_parallel", *FAST, "tp=[2]", cache_dir=cache_dir, out=out,
               LAB_DISCO_WORKER_IMPORTS="die_now",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    doc = results(out)
    assert doc["status"] == "error" and "disco worker" in doc["summary"]["error"]


def test_a_broken_disco_reply_is_described_as_a_dead_worker():
    """TVM's own error where a worker's pipe closes between two reads (a race seen in the row above)."""
    from harness.sweep import failure

    class InternalError(RuntimeError):
        pass

    message, expected = failure(InternalError("Check failed: (action == DiscoAction::kSyncWorker) is false: "))
    assert expected and message.startswith("a disco worker process died")
    assert failure(KeyError())[0] == "KeyError"  # never an empty error


# --- interrupted runs ---------------------------------------------------------------------------

def _progress(text: str) -> int:
    counts = re.findall(r"\| *(\d+)/\d+ \[", text)
    return int(counts[-1]) if counts else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_leaves_its_finished_points(cache_dir, tmp_path, sig, to_group):
    """Ctrl-C (SIGINT to the process group, workers included) or `kill` (SIGTERM to the
    controller) while tp=2 is inside its timed runs: tp=1's point is kept, the run says it was
    interrupted, the workers are gone and so is the shared-memory segment."""
    import psutil

    out = tmp_path / "r"
    repeats = 8
    cmd = [sys.executable, "-m", "experiments.tensor_parallel", f"hydra.run.dir={out}", "tp=[1,2]", "device=cpu",
           "workload.prompt_len=8", "workload.new_tokens=48", "workload.warmup=0", f"workload.repeats={repeats}",
           "measure_bandwidth=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    os.set_blocking(proc.stderr.fileno(), False)
    err, workers, deadline = b"", set(), time.monotonic() + 300
    try:
        # one of tp=2's timed runs done: seven left to be interrupted in (with one left fewer, a loaded
        # 2-core machine once saw the sweep end before the signal)
        while _progress(err.decode(errors="replace")) < repeats + 1:
            assert proc.poll() is None and time.monotonic() < deadline, err.decode(errors="replace")[-3000:]
            err += proc.stderr.read() or b""
            try:
                workers |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        os.set_blocking(proc.stderr.fileno(), True)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = (err + rest).decode(errors="replace")
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"interrupted by {sig.name} during tp=2" in stderr
    doc = results(out)
    assert doc["status"] == "interrupted" and doc["interrupted_by"] == sig.name and doc["interrupted_during"] == "tp=2"
    assert [r["label"] for r in doc["runs"]] == ["tp=1"] and len(doc["runs"][0]["samples"]) == repeats
    assert doc["summary"]["decode_tokens_per_s"] > 0
    assert workers
    time.sleep(0.5)
    alive = [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive
    assert not list(Path("/dev/shm").glob(f"tvm_lab_ccl.{proc.pid}.*"))


@pytest.mark.slow
def test_the_profilers_time_limit_leaves_an_interrupted_results_json(compiled, tiny_config, cache_dir, tmp_path):
    compiled(tiny_config, "q0f16")  # the run's artifact is in the cache
    env = {**env_for(cache_dir), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "profile_gpu.sh"), "-m", "basic", "-d", "12", "-o", str(tmp_path / "p"),
                           "--", *FAST, "workload.repeats=1000000"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-3000:]
    [folder] = (tmp_path / "p").glob("basic-*")
    doc = results(folder / "experiment")
    assert doc["status"] == "interrupted" and doc["interrupted_by"] == "SIGINT"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "time limit reached" and summary["experiment_status"] == "interrupted"
    assert "its results.json: status interrupted" in proc.stdout


@pytest.mark.slow
def test_sigterm_to_the_profiler_stops_the_experiment_first(compiled, tiny_config, cache_dir, tmp_path):
    """A SIGTERM to the profiler (a job scheduler's) reaches the experiment's process group: the
    experiment ends `interrupted` and the profiler still writes its summary, exit 143."""
    compiled(tiny_config, "q0f16")
    env = {**env_for(cache_dir), "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(ROOT / "profile_gpu.sh"), "-m", "basic", "-d", "300", "-o", str(tmp_path / "p"),
                             "--", *FAST, "workload.repeats=1000000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the experiment is timing its repeats
        logs = list((tmp_path / "p").glob("basic-*/experiment.log"))
        if logs and "run/s" in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    [folder] = (tmp_path / "p").glob("basic-*")
    doc = results(folder / "experiment")
    assert doc["status"] == "interrupted" and doc["interrupted_by"] == "SIGINT"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    assert summary["experiment_status"] == "interrupted"


# --- the guard: a fault at any point never leaves a results.json claiming more ------------------

def _point(label: str, ok: bool = True) -> Point:
    from engine.generate import StepTiming

    steps = [StepTiming("prefill", 0, 0.0, 0.01, 8), StepTiming("decode", 0, 0.01, 0.02, 1)]
    from harness.stats import summarize

    p = Point(label, {"tp": 1}, [RunSample(0, 1, 8, 2, 0.0, 0.02, steps)] if ok else [],
              {"ttft_s": summarize([0.01]), "decode_tokens_per_s": 100.0, "itl_s": summarize([0.01]),
               "weight_bytes": 1})
    if not ok:
        p.error = "RuntimeError: boom"
    return p


def _task(*steps):
    """A task that measures points and fails as told: each step is a Point (added as run_point
    adds it), "report" (write_report of the points so far) or an exception to raise."""
    def task(run_dir):
        points = []
        for step in steps:
            if isinstance(step, Point):
                run_state.current().add(step)
                points.append(step)
            elif step == "report":
                write_report(run_dir, "t", {"x": 1}, points)
            elif isinstance(step, str):
                run_state.current().begin(step)
            elif callable(step):
                step()
            else:
                raise step
        return 0
    return task


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends


@pytest.mark.parametrize("steps,code,status", [
    ((), 0, None),
    ((RuntimeError(),), 1, "error"),
    ((ConfigError("bad value; use another"),), 2, "error"),
    ((_point("a"), "b", RuntimeError("late")), 1, "partial"),
    ((_point("a"), _point("b", ok=False), "report", TypeError("after the report")), 1, "partial"),
    ((_point("a"), "report", KeyError()), 1, "partial"),
    ((_point("a"), "b", KeyboardInterrupt()), 130, "interrupted"),
    ((_point("a"), "b", run_state.Terminated()), 143, "interrupted"),
    ((_point("a"), "b", _sigterm), 143, "interrupted"),
    ((_point("a"), "report", KeyboardInterrupt()), 130, "interrupted"),
], ids=["nothing", "error", "bad input", "fails after a point", "fails after a partial report",
        "fails after the report", "sigint", "terminated", "real sigterm", "interrupted after the report"])
def test_a_fault_at_any_point_is_what_results_json_says(tmp_path, capsys, steps, code, status):
    run_dir = RunDir(tmp_path / "run", env=FAKE_ENV)
    task = _task(*steps)
    before = signal.getsignal(signal.SIGTERM)
    assert run_task(lambda: task(run_dir), run_dir, {"x": 1}) == code
    assert signal.getsignal(signal.SIGTERM) == before  # put back
    if status is None:
        assert not run_dir.path("results.json").exists()
        return
    doc = results(run_dir.root)
    assert doc["status"] == status
    if "report" in steps:
        assert doc["status_before_interrupt" if status == "interrupted" else "status"] in ("ok", "partial")
        assert "report_errors" not in doc  # the report itself went through
    measured = [p.label for p in steps if isinstance(p, Point) and p.ok]
    assert [r["label"] for r in doc["runs"] if not r["error"]] == measured
    if status == "interrupted":
        assert doc["interrupted_by"] == ("SIGINT" if code == 130 else "SIGTERM")
        assert doc["interrupted_during"] == (None if "report" in steps else "b")
    else:
        assert doc["error"]  # never empty: a bare KeyError() is "KeyError"
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted by" if code > 2 else "error: ")


def test_a_figure_that_cannot_be_written_makes_the_report_partial(tmp_path):
    run_dir = RunDir(tmp_path / "run", env=FAKE_ENV)

    def broken(path):
        raise OSError(28, "No space left on device")

    status = write_report(run_dir, "t", {}, [_point("a")], figures=[("speedup.png", broken)])
    doc = results(run_dir.root)
    assert status == doc["status"] == "partial"
    assert doc["report_errors"] == ["speedup.png: OSError: [Errno 28] No space left on device"]
    assert "speedup.png: OSError" in run_dir.path("summary.md").read_text()
    names = sorted(os.listdir(run_dir.root))
    assert names == ["latency.png", "results.json", "summary.md", "throughput.png", "trace.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_shared_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        path = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exit_status_is_2_where_every_point_failed_on_the_users_input():
    from harness.entry import exit_status

    refused = _point("a", ok=False)
    refused.config_error = True
    assert exit_status("ok", [_point("a")]) == 0
    assert exit_status("error", [refused]) == 2
    assert exit_status("partial", [refused, _point("b")]) == 1
    assert exit_status("error", [_point("a", ok=False)]) == 1


def test_a_folder_used_again_claims_nothing_until_the_run_writes(cache_dir, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"status": "ok"}))
    proc = run("experiments.overlap", "device=cpu", "mode=[]", cache_dir=cache_dir, out=out)
    assert_one_line(proc, "mode is empty")
    assert results(out)["status"] == "error"
    assert json.loads((out / "results.previous.json").read_text()) == {"status": "ok"}
