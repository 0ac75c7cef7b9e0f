"""The Hydra entry points, composed and run as a user runs them (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.trace import validate

ROOT = Path(__file__).resolve().parents[1]
FAST = ["workload.prompt_len=8", "workload.new_tokens=6", "workload.warmup=1", "workload.repeats=2",
        "device=cpu"]


def run(module: str, *overrides: str, cache_dir: Path, out: Path, timeout: int = 600):
    env = {**os.environ, "LAB_CACHE_DIR": str(cache_dir), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", module, f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["baseline", "verify"])
def test_configs_compose(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=["model=llama3-8b", "quant=q4f16_1"])
    assert cfg.model.preset == "llama3-8b" and cfg.quant.name == "q4f16_1"


def test_baseline_writes_a_complete_results_folder(cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = run("experiments.baseline", *FAST, cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "summary.md", "latency.png", "throughput.png", "trace.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    s = results["summary"]
    assert s["itl_s"]["count"] == 2 * 5 and s["decode_tokens_per_s"] > 0 and 0 < s["roofline_fraction"] < 1
    assert {"ttft_s", "e2e_s", "prefill_tokens_per_s", "weight_bytes", "peak_host_rss_bytes"} <= set(s)
    assert results["environment"]["git"] is not None and results["environment"]["tvm_version"]
    assert len(results["runs"][0]["samples"]) == 2
    trace = json.loads((out / "trace.json").read_text())
    validate(trace)
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"prefill 0", "decode 0", "load + weights"} <= names
    assert (out.parent / "latest").resolve() == out.resolve()


@pytest.mark.parametrize("override,message", [
    ("workload.new_tokens=0", "positive integer"),
    ("workload.prompt_len=5000", "exceeds tiny's context"),
    ("device=cuda", "no CUDA GPU"),
])
def test_bad_input_is_one_line_and_no_success_claimed(cache_dir, tmp_path, override, message):
    out = tmp_path / "run"
    proc = run("experiments.baseline", *FAST, override, cache_dir=cache_dir, out=out)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "error"


@pytest.mark.parametrize("override", ["model=llama9", "quant=q3"])
def test_unknown_choices_are_refused_by_hydra(cache_dir, tmp_path, override):
    proc = run("experiments.baseline", *FAST, override, cache_dir=cache_dir, out=tmp_path / "run")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Available options" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_verify_passes_and_writes_aligned_logits(cache_dir, tmp_path):
    import numpy as np

    out = tmp_path / "verify"
    proc = run("experiments.verify", "decode_steps=8", "prompt_len=12", cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    engine, reference = np.load(out / "engine_logits.npy"), np.load(out / "reference_logits.npy")
    assert results["status"] == "ok" and results["summary"]["greedy_tokens_identical"]
    assert engine.shape == reference.shape and engine.shape[0] <= len(results["token_ids"])
    assert engine.dtype == np.float32


def test_verify_fails_loudly_past_its_tolerance(cache_dir, tmp_path):
    proc = run("experiments.verify", "decode_steps=4", "prompt_len=8", "tolerance=1e-9",
               cache_dir=cache_dir, out=tmp_path / "v")
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    assert json.loads((tmp_path / "v" / "results.json").read_text())["status"] == "failed"


def test_verify_bad_checkpoint_folder(cache_dir, tmp_path):
    proc = run("experiments.verify", f"model.path={tmp_path / 'missing'}", cache_dir=cache_dir, out=tmp_path / "v")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_writes_one_results_dir_per_job(cache_dir, tmp_path):
    env = {**os.environ, "LAB_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, "-m", "experiments.baseline", "-m", "quant=q0f16,q4f16_1", *FAST,
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("[0-9]*/results.json"))
    assert len(results) == 2
    assert {json.loads(r.read_text())["config"]["quant"]["name"] for r in results} == {"q0f16", "q4f16_1"}
