"""./profile_gpu.sh and profiler: the command line as a user runs it (CPU only), and
the CUPTI record -> Chrome trace conversion on synthetic records."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from profiler import kernels, timeline
from harness.trace import Trace, validate
from runtime_patch import cupti_tracer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "profile_gpu.sh"
FAST = ["device=cpu", "workload.prompt_len=8", "workload.new_tokens=6", "workload.warmup=1", "workload.repeats=2"]


def profile(*args: str, cache_dir: Path | None = None, env: dict | None = None, timeout: int = 600):
    env = {**os.environ, "PYTHON": sys.executable, "HYDRA_FULL_ERROR": "0", **(env or {})}
    if cache_dir is not None:
        env["LAB_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_folder(parent: Path, mode: str) -> Path:
    found = sorted(parent.glob(f"{mode}-*"))
    assert len(found) == 1, found
    return found[0]


# --- the command line ------------------------------------------------------------------------

def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_help_lists_the_modes():
    proc = profile("-h")
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: ./profile_gpu.sh -m MODE")
    for mode in ("basic", "nsight", "timeline"):
        assert f"\n  {mode} " in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["-m", "flamegraph"], "unknown mode 'flamegraph'"),
    ([], "a mode is required"),
    (["-m", "basic", "-x"], "unknown option -x"),
    (["-m", "basic", "-d", "soon"], "-d needs a positive number"),
    (["-m", "basic", "device=cpu"], "Hydra overrides go after --"),
])
def test_bad_usage_is_refused_with_the_usage(tmp_path, args, message):
    proc = profile(*args, "-o", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr and "Usage: ./profile_gpu.sh" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_experiment_is_refused_by_the_module(tmp_path):
    proc = profile("-m", "basic", "-s", "no_such_thing", "-o", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown experiment 'no_such_thing'" in proc.stderr and "baseline" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("ncu") or shutil.which("nsys"), reason="a Nsight tool is installed here")
def test_nsight_without_nsys_or_ncu_exits_3(tmp_path):
    proc = profile("-m", "nsight", "-o", str(tmp_path), "--", *FAST)
    assert proc.returncode == 3
    assert "neither nsys (Nsight Systems) nor ncu (Nsight Compute) is on PATH" in proc.stderr
    assert "-m timeline" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_run_folders_are_never_reused(tmp_path):
    from profiler.__main__ import make_run_dir

    first, second = make_run_dir(tmp_path, "basic"), make_run_dir(tmp_path, "basic")
    assert first != second and first.is_dir() and second.is_dir()


# --- the modes on the CPU ----------------------------------------------------------------------

@pytest.mark.slow
def test_basic_samples_the_cpu_without_a_gpu(cache_dir, tmp_path):
    proc = profile("-m", "basic", "-d", "300", "-o", str(tmp_path), "--", *FAST, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = run_folder(tmp_path, "basic")
    summary = json.loads((out / "summary.json").read_text())
    if summary["sampler"] != "cpu":
        pytest.skip("a GPU is visible here: sampled it instead")
    assert summary["sampling"].startswith("CPU sampling") and "CPU sampling" in proc.stdout
    rows = (out / "samples.csv").read_text().splitlines()
    assert rows[0] == "time_s,perf_counter_s,cpu_percent,rss_bytes,processes"
    assert len(rows) > 5 and summary["samples"] == len(rows) - 1
    assert summary["stats"]["peak_rss_bytes"] > 0 and summary["stats"]["cpu_percent"]["max"] > 0
    assert summary["status"] == "ok" and summary["experiment_status"] == "ok"
    assert (out / "utilisation.png").stat().st_size > 0
    assert (out / "experiment" / "results.json").is_file()  # hydra.run.dir was put inside the run folder
    assert str(out) in proc.stdout and "summary.json" in proc.stdout


@pytest.mark.slow
def test_timeline_falls_back_to_host_spans(cache_dir, tmp_path):
    proc = profile("-m", "timeline", "-o", str(tmp_path), "--", *FAST, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = run_folder(tmp_path, "timeline")
    summary = json.loads((out / "summary.json").read_text())
    if summary["kernel_trace"] == "cupti":
        pytest.skip("CUPTI traced a GPU here: no fallback to test")
    assert summary["kernel_trace"] == "host spans only (fallback)" and summary["fallback_reason"]
    assert "FALLBACK" in proc.stdout
    trace = json.loads((out / "trace.json").read_text())
    validate(trace)  # X events with dur, spans nest per track, every pid/tid has metadata
    assert "FALLBACK" in trace["otherData"]["note"]
    spans = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"prefill 0", "decode 0", "run 0"} <= spans
    assert any(e["ph"] == "C" for e in trace["traceEvents"])  # sampled counters
    steps = {s["category"]: s for s in summary["host_steps"]}
    assert steps["decode"]["count"] == 2 * 5 and steps["prefill"]["count"] == 2
    assert "Host step timings" in (out / "kernels.md").read_text()
    assert "chrome://tracing" in proc.stdout and "ui.perfetto.dev" in proc.stdout


# --- CUPTI records -> Chrome trace (synthetic records; plain data transformation) ------------------

def _kernel(name, start, end, corr, device=0, stream=7):
    return {"kind": "kernel", "name": name, "start_ns": start, "end_ns": end, "device_id": device,
            "stream_id": stream, "context_id": 1, "correlation_id": corr, "grid": [64, 1, 1],
            "block": [128, 1, 1], "shared_bytes": 0, "registers": 32, "graph_id": 0}


S = 1_000_000_000  # ns per second


def synthetic_docs():
    controller = {
        "format": cupti_tracer.FORMAT, "label": "experiment", "pid": 100, "complete": True,
        "clock": {"pairs": [[1 * S, 10.0], [3 * S, 12.0]]},
        "records": [
            {"kind": "runtime", "name": "cudaLaunchKernel", "start_ns": 1 * S + 100_000_000,
             "end_ns": 1 * S + 100_005_000, "correlation_id": 1, "thread_id": 7, "process_id": 100, "cbid": 211},
            {"kind": "driver", "name": "cuLaunchKernel", "start_ns": 1 * S + 100_001_000,
             "end_ns": 1 * S + 100_004_000, "correlation_id": 2, "thread_id": 7, "process_id": 100, "cbid": 307},
            _kernel("fused_gemv_kernel", 1 * S + 200_000_000, 1 * S + 200_050_000, corr=1),
            # overlaps the first on the same stream (e.g. programmatic dependent launch): its own lane
            _kernel("fused_gemv_kernel", 1 * S + 200_040_000, 1 * S + 200_090_000, corr=3),
            {"kind": "memcpy", "name": "Memcpy HtoD", "start_ns": 1 * S + 300_000_000,
             "end_ns": 1 * S + 300_001_000, "device_id": 0, "stream_id": 13, "context_id": 1,
             "correlation_id": 4, "bytes": 1 << 20, "copy_kind": "HTOD"},
            {"kind": "memory", "name": "allocation", "start_ns": 1 * S + 50_000_000, "end_ns": 1 * S + 50_000_000,
             "bytes": 1 << 20, "address": 1, "memory_kind": "DEVICE", "device_id": 0, "stream_id": 0,
             "correlation_id": 0},
            {"kind": "memory", "name": "release", "start_ns": 1 * S + 400_000_000, "end_ns": 1 * S + 400_000_000,
             "bytes": 1 << 20, "address": 1, "memory_kind": "DEVICE", "device_id": 0, "stream_id": 0,
             "correlation_id": 0},
        ]}
    worker = {  # a disco worker killed before stop(): read from its spool, marked incomplete
        "label": "disco worker 1", "pid": 101, "complete": False,
        "clock": {"pairs": [[5 * S, 10.0]]},
        "records": [_kernel("_Z14allreduce_oneIfEvPT_", 5 * S + 200_000_000, 5 * S + 200_020_000, corr=9, device=1)]}
    return [controller, worker]


def test_host_clock_uses_offset_and_rate():
    to_s = timeline.host_clock([[1 * S, 10.0], [3 * S, 12.000002]])  # 1 ppm drift
    assert to_s(1 * S) == pytest.approx(10.0)
    assert to_s(3 * S) == pytest.approx(12.000002, abs=1e-9)
    assert timeline.host_clock([[5 * S, 10.0]])(6 * S) == pytest.approx(11.0)
    crazy = timeline.host_clock([[1 * S, 10.0], [3 * S, 30.0]])  # a bad pair: rate ignored
    assert crazy(2 * S) == pytest.approx(11.0)


def test_lanes_hold_nesting_or_sequential_spans():
    spans = [(0, 10), (2, 5), (10, 20), (15, 25), (21, 22)]
    lanes = timeline.assign_lanes(spans)
    assert lanes[0] == lanes[1] == lanes[2] == 0  # nested, then back to back
    assert lanes[3] == 1  # starts inside (10, 20) and ends after it
    assert lanes[4] == 0  # after (10, 20) closed


def test_cupti_records_become_a_valid_chrome_trace():
    host = Trace(9.5)
    host.process(1, "tiny q0f16 (controller)")
    host.thread(1, 1, "host: generate loop")
    host.span(1, 1, "decode 0", 11.19, 11.21, cat="decode")
    host_doc = host.to_dict()

    trace = Trace(9.5)
    stats = timeline.add_cupti(trace, synthetic_docs(), names={"_Z14allreduce_oneIfEvPT_": "void allreduce_one<float>(float*)"})
    doc = timeline.merged_document([(Path("trace.json"), host_doc)], trace, {"mode": "timeline"})
    validate(doc)

    events = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert "tiny q0f16 (controller)" == procs[1]
    gpu0 = next(p for p, n in procs.items() if n == "GPU 0 · experiment (pid 100)")
    gpu1 = next(p for p, n in procs.items() if n.startswith("GPU 1 · disco worker 1 (pid 101) [incomplete"))
    api = next(p for p, n in procs.items() if n == "experiment (pid 100) · CUDA API")
    assert sorted(n for (p, _), n in threads.items() if p == gpu0) == ["stream 13", "stream 7", "stream 7 (overlap 1)"]
    assert stats["kernels"] == 3 and stats["memcpys"] == 1 and stats["devices"] == [0, 1]
    assert stats["overlap_lanes"] == 1 and stats["processes"] == 2

    spans = [e for e in events if e["ph"] == "X"]
    first = next(e for e in spans if e["pid"] == gpu0 and e["args"]["correlation_id"] == 1)
    assert first["name"] == "fused_gemv_kernel" and first["cat"] == "kernel"
    assert first["ts"] == pytest.approx((10.2 - 9.5) * 1e6) and first["dur"] == pytest.approx(50.0)
    assert first["args"]["grid"] == [64, 1, 1]
    copy = next(e for e in spans if e["cat"] == "memcpy")
    assert copy["args"]["bytes"] == 1 << 20 and copy["args"]["GB/s"] == pytest.approx((1 << 20) / 1e-6 / 1e9, rel=1e-3)
    assert any(e["name"] == "void allreduce_one<float>(float*)" and e["pid"] == gpu1 for e in spans)
    decode = next(e for e in spans if e["name"] == "decode 0")
    assert decode["pid"] == 1 and decode["ts"] == pytest.approx((11.19 - 9.5) * 1e6)
    api_spans = sorted((e for e in spans if e["pid"] == api), key=lambda e: e["ts"])
    assert [e["name"] for e in api_spans] == ["cudaLaunchKernel", "cuLaunchKernel"]
    assert len({e["tid"] for e in api_spans}) == 1  # nested on one host thread

    flows = [e for e in events if e["ph"] in ("s", "f")]
    assert len(flows) == 2 and stats["flows"] == 1  # only correlation 1 has a launch record
    start, end = sorted(flows, key=lambda e: e["ph"] != "s")
    assert start["id"] == end["id"] and start["pid"] == api and end["pid"] == gpu0
    assert start["ts"] == pytest.approx(api_spans[0]["ts"]) and end["ts"] == pytest.approx(first["ts"])

    memory = [e["args"]["MiB"] for e in events if e["ph"] == "C" and e["pid"] == gpu0]
    assert memory == [1.0, 0.0]


def test_records_spooled_by_a_killed_process_are_read(tmp_path):
    spool = tmp_path / "cupti-7.partial.jsonl"
    lines = [{"format": cupti_tracer.FORMAT, "label": "disco worker 1", "pid": 7},
             {"clock": [1 * S, 10.0]},
             {"records": [_kernel("k", 1 * S + 10, 1 * S + 20, corr=1)]},
             {"clock": [2 * S, 11.0]}]
    spool.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"records": [{"kind": "ker')
    (tmp_path / "cupti-8.unavailable.json").write_text(json.dumps({"label": "x", "pid": 8, "reason": "no GPU"}))
    docs, notes = timeline.load_record_files(tmp_path)
    assert len(docs) == 1 and docs[0]["complete"] is False and docs[0]["label"] == "disco worker 1"
    assert len(docs[0]["records"]) == 1 and docs[0]["clock"]["pairs"] == [[1 * S, 10.0], [2 * S, 11.0]]
    assert notes == [{"label": "x", "pid": 8, "reason": "no GPU"}]


def test_tracer_without_cupti_leaves_a_note(tmp_path, monkeypatch):
    if importlib.util.find_spec("cupti") is not None:
        pytest.skip("cupti-python is installed here")
    monkeypatch.setenv("LAB_CUPTI_DIR", str(tmp_path))
    assert cupti_tracer.maybe_start_from_env("test") is False
    assert not cupti_tracer.is_running() and cupti_tracer.stop() is None
    note = json.loads((tmp_path / f"cupti-{os.getpid()}.unavailable.json").read_text())
    assert note["label"] == "test" and "cupti-python is not importable" in note["reason"]


# --- kernel tables from the tools' outputs -----------------------------------------------------------

def test_kernel_table_orders_by_total_time():
    stats = kernels.aggregate([("a", 10.0), ("b", 100.0), ("a", 30.0), ("a", 20.0)])
    assert [(s.name, s.calls, s.total_ns, s.median_ns) for s in stats] == [("b", 1, 100.0, 100.0), ("a", 3, 60.0, 20.0)]
    text = kernels.kernel_section(stats, top=1)
    assert "4 launches of 2 distinct kernels" in text and "| 1 | b | 1 |" in text and "| a |" not in text


def test_ncu_raw_csv_is_parsed():
    text = "\n".join([
        "==PROF== Connected to process 4242 (/usr/bin/python3.12)",
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","gpu__time_duration.sum"',
        '"","","","","","","","","","","","usecond"',
        '"0","4242","python3.12","127.0.0.1","fused_gemv_kernel","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","1,250.50"',
        '"1","4242","python3.12","127.0.0.1","softmax_kernel","1","7","(256, 1, 1)","(1, 1, 1)","0","9.0","3.00"',
    ])
    launches = kernels.parse_ncu_csv(text)
    assert [(k["name"], k["duration_ns"]) for k in launches] == [("fused_gemv_kernel", 1_250_500.0),
                                                                 ("softmax_kernel", 3000.0)]
    assert launches[0]["stream"] == "7" and launches[0]["grid"] == "(64, 1, 1)"
    assert kernels.parse_ncu_csv("no kernels were profiled\n") == []


def test_nsys_kernel_summary_is_parsed():
    text = ('"Time (%)","Total Time (ns)","Instances","Avg (ns)","Med (ns)","Min (ns)","Max (ns)","StdDev (ns)","Name"\n'
            '"60.0","600","3","200.0","200.0","100","300","100.0","gemv"\n'
            '"40.0","400","1","400.0","400.0","400","400","0.0","matmul"\n')
    stats = kernels.parse_nsys_kernel_summary(text)
    assert [(s.name, s.calls, s.total_ns, s.min_ns, s.max_ns) for s in stats] == [
        ("gemv", 3, 600.0, 100.0, 300.0), ("matmul", 1, 400.0, 400.0, 400.0)]


def test_gpu_idle_during_decode_steps_is_measured_from_the_records():

    host = Trace(origin_s=10.0)
    host.process(1, "pipeline")
    host.span(1, 1, "decode 0", 10.2, 10.3)
    host.span(1, 1, "decode 1", 10.3, 10.4)
    host.span(1, 1, "prefill 0", 10.0, 10.2)  # not a decode step: outside the windows
    rows = timeline.device_idle_during_decode([(Path("trace.json"), host.to_dict())], synthetic_docs())
    by_gpu = {r["device"]: r for r in rows}
    assert set(by_gpu) == {0, 1} and all(r["host_track"] == "pipeline" and r["decode_steps"] == 2 for r in rows)
    # GPU 0: two overlapping 50 us kernels from 10.2 s (their union, 90 us, counts once) and a 1 us copy
    assert by_gpu[0]["decode_s"] == pytest.approx(0.2)
    assert by_gpu[0]["busy_s"] == pytest.approx(91e-6)
    assert by_gpu[0]["idle_fraction"] == pytest.approx(1 - 91e-6 / 0.2)
    assert by_gpu[1]["busy_s"] == pytest.approx(20e-6)  # the worker's allreduce


def test_timeline_keeps_the_timed_repeats_only():
    """A kernel-level trace holds the records of the timed repeats ("run N" spans), not the weight
    loading, compiles and warm-up around them (a Llama-3-8B run made a 1.1 GB trace before)."""
    host = [(None, {"otherData": {"origin_s": 100.0}, "traceEvents": [
        {"ph": "X", "cat": "run", "name": "run 0", "ts": 1_000_000, "dur": 500_000, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "run", "name": "run 1", "ts": 2_000_000, "dur": 500_000, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "setup", "name": "load + weights", "ts": 0, "dur": 900_000, "pid": 1, "tid": 1}]})]
    windows = timeline.run_windows(host, margin_s=0.0)
    assert windows == [(101.0, 101.5), (102.0, 102.5)]
    # CUPTI clock = host clock in ns here (two calibration pairs on the identity)
    doc = {"clock": {"pairs": [[0, 0.0], [10**12, 1000.0]]}, "records": [
        {"kind": "kernel", "start_ns": int(100.2e9), "end_ns": int(100.3e9)},   # weights: out
        {"kind": "kernel", "start_ns": int(101.1e9), "end_ns": int(101.2e9)},   # run 0: in
        {"kind": "kernel", "start_ns": int(101.4e9), "end_ns": int(101.6e9)},   # straddles run 0's end: in
        {"kind": "kernel", "start_ns": int(101.7e9), "end_ns": int(101.8e9)},   # between runs: out
        {"kind": "kernel", "start_ns": int(102.4e9), "end_ns": int(102.45e9)},  # run 1: in
        {"kind": "kernel", "start_ns": int(103.0e9), "end_ns": int(103.1e9)}]}  # after: out
    kept, dropped = timeline.keep_within([doc], windows)
    assert [r["start_ns"] for r in kept[0]["records"]] == [int(101.1e9), int(101.4e9), int(102.4e9)]
    assert dropped == 3
