"""The shared reporting layer: atomic files, results.json, stats, traces, plots, Markdown."""
import json
import os
import sys

import numpy as np
import pytest

from harness import markdown, plots, results, stats, trace
from harness.results import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAKE_ENV = {"timestamp": "2026-11-26T00:00:00+00:00", "command": "python -m experiments.baseline tp=2",
            "git": {"sha": "abc123", "dirty": False}, "gpus": [], "cpu_model": "Test CPU",
            "cpu_count": 4, "hostname": "box", "tvm_version": "0.27.0"}


def listing(path):
    return sorted(os.listdir(path))


# --- atomic writes -------------------------------------------------------------------------

def test_atomic_writes_leave_only_the_target(tmp_path):
    import matplotlib.pyplot as plt

    results.atomic_write_text(tmp_path / "a.txt", "hello")
    results.atomic_write_json(tmp_path / "b.json", {"x": np.float32(1.5), "y": np.arange(3),
                                                     "z": np.int64(7), np.int64(2): True})
    results.atomic_save_npy(tmp_path / "c.npy", np.eye(2))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    results.atomic_save_figure(fig, tmp_path / "d.png")
    plt.close(fig)

    assert listing(tmp_path) == ["a.txt", "b.json", "c.npy", "d.png"]
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1.5, "y": [0, 1, 2], "z": 7,
                                                             "2": True}
    assert "\n  " in (tmp_path / "b.json").read_text()  # indent=2
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.eye(2))
    assert (tmp_path / "d.png").read_bytes().startswith(PNG_MAGIC)


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.json"
    results.atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        results.atomic_write_json(target, {"bad": object()})
    with pytest.raises(RuntimeError):
        with results._atomic_file(target, "w") as f:
            f.write("partial")
            raise RuntimeError("interrupted")
    assert listing(tmp_path) == ["r.json"]
    assert json.loads(target.read_text()) == {"ok": 1}


# --- environment and run folders -----------------------------------------------------------

def test_environment_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no NVML
    monkeypatch.setattr(results.shutil, "which", lambda name: None)  # and no nvidia-smi
    env = results.environment()
    for key in ("timestamp", "command", "project_version", "tvm_version", "python_version",
                "hostname", "cpu_model", "cpu_count", "memory_total_bytes"):
        assert env[key], key
    assert env["gpus"] == []
    assert env["timestamp"].endswith("+00:00")
    git = env["git"]
    assert git is None or (len(git["sha"]) == 40 and isinstance(git["dirty"], bool))
    json.dumps(env)


def test_git_info_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("LAB_GIT_SHA", raising=False)
    assert results.git_info(tmp_path) is None


def test_lab_git_sha_names_the_commit_of_a_copied_tree(monkeypatch):
    monkeypatch.setenv("LAB_GIT_SHA", "0123abc")  # wins over the checkout's own .git
    assert results.git_info() == {"sha": "0123abc", "dirty": None, "from": "LAB_GIT_SHA"}


def test_nvidia_smi_parsing():
    text = "0, NVIDIA H100 80GB HBM3, 580.65.06, 81559, 00000000:18:00.0\n"
    [gpu] = results.parse_nvidia_smi(text)
    assert gpu == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver_version": "580.65.06",
                   "memory_total_bytes": 81559 * 2**20, "pci_bus_id": "00000000:18:00.0"}


def test_results_json_structure(tmp_path):
    run = RunDir(tmp_path / "baseline" / "t1", env=FAKE_ENV)
    config = {"tp": 2, "quant": "q4f16_1"}
    runs = [{"tp": 2, "tokens_per_s": np.float64(150.0)}]
    path = run.write_results(config, runs, {"tokens_per_s": 150.0}, "ok", extra={"notes": "x"})
    assert path == run.path("results.json")
    doc = json.loads(path.read_text())
    assert list(doc) == ["config", "environment", "runs", "summary", "status", "notes"]
    assert doc["config"] == config and doc["status"] == "ok" and doc["environment"] == FAKE_ENV
    assert doc["runs"][0]["tokens_per_s"] == 150.0
    with pytest.raises(ValueError, match="status"):
        run.write_results(config, runs, {}, "ok", extra={"status": "ok"})


def test_failure_never_claims_success(tmp_path):
    run = RunDir(tmp_path / "r", env=FAKE_ENV)
    run.write_failure({"tp": 4}, "CUDA out of memory")
    doc = json.loads(run.path("results.json").read_text())
    assert doc["status"] == "error"
    assert doc["error"] == "CUDA out of memory"
    assert doc["summary"] == {} and doc["runs"] == []


def test_latest_link_points_at_newest_run(tmp_path):
    older, newer = RunDir(tmp_path / "2026-01-01", env=FAKE_ENV), RunDir(tmp_path / "2026-01-02", env=FAKE_ENV)
    older.update_latest_link()
    assert (tmp_path / "latest").resolve() == older.root.resolve()
    link = newer.update_latest_link()
    assert link == tmp_path / "latest" and link.is_symlink()
    assert link.resolve() == newer.root.resolve()
    assert os.readlink(link) == "2026-01-02"  # relative: the folder can move
    assert listing(tmp_path) == ["2026-01-01", "2026-01-02", "latest"]


# --- stats ---------------------------------------------------------------------------------

def test_summarize_matches_numpy():
    x = np.random.default_rng(0).lognormal(size=1000)
    s = stats.summarize(list(x))
    assert s["count"] == 1000
    assert s["mean"] == pytest.approx(x.mean())
    assert s["std"] == pytest.approx(x.std(ddof=1))
    assert (s["min"], s["max"]) == (x.min(), x.max())
    for q in (50, 95, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(x, q))
    assert all(type(v) in (int, float) for v in s.values())


def test_summarize_single_sample_and_bad_input():
    assert stats.summarize([0.005]) == {"count": 1, "mean": 0.005, "std": 0.0, "min": 0.005,
                                        "max": 0.005, "p50": 0.005, "p95": 0.005, "p99": 0.005}
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


def test_roofline_note_only_above_one():
    assert stats.roofline_note(0.93, 3.9e12) is None and stats.roofline_note(1.0, 3.9e12) is None
    note = stats.roofline_note(1.02, 3.63e12)
    assert "1.02" in note and "3.63 TB/s" in note and "probe" in note


def test_notes_carry_each_points_note_and_roofline_note():
    from harness.report import Point, notes_of

    high = stats.roofline_note(1.02, 3.63e12)
    a, b = Point("q0f16", {}, summary={"roofline_note": high}), Point("q4f16_1", {}, summary={})
    assert notes_of([b]) is None
    assert notes_of([a]) == high
    c = Point("q8f16_1", {}, summary={"note": "ran as pipeline", "roofline_note": high})
    assert notes_of([a, b, c]) == f"- q0f16: {high}\n- q8f16_1: ran as pipeline; {high}"


def test_collector_clock_counts_the_cyclic_collectors_time():
    """measure's per-run collector clock (RunSample.gc_s): the seconds of a collection made while it
    is installed, none of one made after; it leaves gc.callbacks as it found them."""
    import gc

    from harness import measure

    before = list(gc.callbacks)
    with measure._CollectorClock() as clock:
        garbage = [[] for _ in range(20000)]
        for a, b in zip(garbage, garbage[1:]):  # cycles only the collector frees
            a.append(b)
            b.append(a)
        del garbage, a, b
        gc.collect()
    seen = clock.seconds
    assert seen > 0 and gc.callbacks == before
    gc.collect()
    assert clock.seconds == seen


def test_roofline_fraction():
    # 16 GB per token at 4 TB/s is a 4 ms floor; 5 ms measured is 80% of roofline.
    assert stats.roofline_fraction(16e9, 4e12, 5e-3) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        stats.roofline_fraction(16e9, 0, 5e-3)


# --- traces --------------------------------------------------------------------------------

def good_trace(origin=100.0):
    t = trace.Trace(origin, other_data={"model": "tiny"})
    t.process(0, "rank 0", sort_index=0)
    t.thread(0, 1, "compute stream", sort_index=0)
    t.thread(0, 2, "comm stream", sort_index=1)
    t.span(0, 1, "decode step", origin + 0.000, origin + 0.010, cat="step")
    t.span(0, 1, "matmul", origin + 0.001, origin + 0.004, args={"bytes": 10})
    t.span(0, 1, "matmul", origin + 0.004, origin + 0.010)  # touches the previous one: fine
    t.span(0, 2, "allreduce", origin + 0.003, origin + 0.006)  # other track may overlap
    t.counter(0, "memory", origin + 0.002, {"MiB": 512})
    t.flow(0, 1, origin + 0.002, 0, 2, origin + 0.004, "launch", id=1)
    t.instant(0, 1, "token", origin + 0.010)
    return t


def test_trace_good_and_saved(tmp_path):
    t = good_trace()
    d = t.to_dict()
    trace.validate(d)
    assert d["displayTimeUnit"] == "ms" and d["otherData"]["model"] == "tiny"
    spans = [e for e in d["traceEvents"] if e["ph"] == "X"]
    assert spans[1]["ts"] == pytest.approx(1000.0) and spans[1]["dur"] == pytest.approx(3000.0)
    meta = {(e["name"], e.get("tid")) for e in d["traceEvents"] if e["ph"] == "M"}
    assert {("process_name", None), ("process_sort_index", None), ("thread_name", 1),
            ("thread_sort_index", 2)} <= meta
    flows = [e for e in d["traceEvents"] if e["ph"] in "sf"]
    assert [e["ph"] for e in flows] == ["s", "f"] and all(e["bp"] == "e" for e in flows)
    t.save(tmp_path / "trace.json")
    assert listing(tmp_path) == ["trace.json"]
    trace.validate(json.loads((tmp_path / "trace.json").read_text()))


def test_trace_float_tolerance():
    t = trace.Trace(0.0)
    t.process(0, "p")
    t.thread(0, 0, "t")
    t.span(0, 0, "outer", 0.1, 0.2)
    t.span(0, 0, "inner", 0.15, 0.2 + 1e-10)  # ends 1e-4 us after its parent: rounding
    trace.validate(t.to_dict())


def bad(mutate):
    d = good_trace().to_dict()
    mutate(d)
    return d


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("traceEvents"), "traceEvents"),
    (lambda d: d["traceEvents"].append({"ph": "X", "pid": 0, "tid": 1, "ts": 0, "dur": 1}),
     "missing required key 'name'"),
    (lambda d: next(e for e in d["traceEvents"] if e["ph"] == "X").pop("dur"), "dur"),
    (lambda d: next(e for e in d["traceEvents"] if e["ph"] == "X").update(dur=-5.0), "dur"),
    (lambda d: d["traceEvents"].append(
        {"name": "late", "ph": "X", "pid": 0, "tid": 1, "ts": 3000.0, "dur": 9000.0}),
     "partially overlaps"),
    (lambda d: d["traceEvents"].append(
        {"name": "x", "ph": "X", "pid": 0, "tid": 9, "ts": 0.0, "dur": 1.0}), "thread_name"),
    (lambda d: d["traceEvents"].append(
        {"name": "x", "ph": "X", "pid": 7, "tid": 1, "ts": 0.0, "dur": 1.0}), "process_name"),
    (lambda d: d["traceEvents"].append({"name": "c", "ph": "C", "pid": 3, "ts": 0.0, "args": {}}),
     "process_name"),
])
def test_trace_validation_rejects(mutate, message):
    with pytest.raises(ValueError, match=message):
        trace.validate(bad(mutate))


def test_span_rejects_negative_duration():
    with pytest.raises(ValueError):
        trace.Trace(0.0).span(0, 0, "x", 2.0, 1.0)


def test_merge_shifts_to_earliest_origin():
    a, b = trace.Trace(10.0), trace.Trace(10.5)
    for rank, t in enumerate((a, b)):
        t.process(rank, f"rank {rank}")
        t.thread(rank, 0, "main")
        t.span(rank, 0, "step", t.origin_s + 0.1, t.origin_s + 0.2)
    merged = trace.merge(a, b).to_dict()
    trace.validate(merged)
    starts = sorted(e["ts"] for e in merged["traceEvents"] if e["ph"] == "X")
    assert starts == pytest.approx([100_000.0, 600_000.0])


# --- plots ---------------------------------------------------------------------------------

def test_plots_write_png(tmp_path):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    paths = [
        plots.latency_distribution({"tp=1": rng.normal(5e-3, 1e-4, 200),
                                    "tp=2": list(rng.normal(3e-3, 1e-4, 200))},
                                   "Decode latency", tmp_path / "latency.png"),
        plots.throughput_bars({"tp=1": 150.0, "tp=2": 260.5}, "tokens/s", "Throughput",
                              tmp_path / "throughput.png"),
        plots.speedup_vs_ideal([1, 2, 4], [1.0, 1.8, 3.1], tmp_path / "speedup.png",
                               "TP speedup"),
        plots.scatter_tradeoff([{"label": "q4 tp=1", "x": 0.02, "y": 250},
                                {"label": "q8 tp=2", "x": 0.004, "y": 280}],
                               "relative logit error", "tokens/s", "Quantization",
                               tmp_path / "tradeoff.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
    assert listing(tmp_path) == ["latency.png", "speedup.png", "throughput.png", "tradeoff.png"]
    assert plt.get_fignums() == []  # every figure closed


def test_plots_reject_empty(tmp_path):
    with pytest.raises(ValueError):
        plots.latency_distribution({"a": []}, "t", tmp_path / "x.png")
    with pytest.raises(ValueError):
        plots.speedup_vs_ideal([1, 2], [1.0], tmp_path / "x.png")
    assert listing(tmp_path) == []


# --- markdown ------------------------------------------------------------------------------

def test_table():
    rows = [{"tp": 1, "tps": 150.123, "note": "a|b"}, {"tp": 2, "tps": None}]
    md = markdown.table(rows, [("tp", "TP", None), ("tps", "tokens/s", "{:.2f}"),
                               ("note", "Note", None)])
    assert md.splitlines() == ["| TP | tokens/s | Note |", "|---|---|---|",
                               "| 1 | 150.12 | a\\|b |", "| 2 | — | — |"]


def test_summary_document_starts_with_provenance():
    doc = markdown.summary_document("Baseline", FAKE_ENV, [("Results", "| a |\n|---|\n| 1 |")])
    head = doc.split("## Results")[0]
    assert doc.startswith("# Baseline\n")
    for fact in ("python -m experiments.baseline tp=2", "abc123", "Test CPU",
                 "2026-11-26T00:00:00+00:00"):
        assert fact in head
    gpu_env = {**FAKE_ENV, "gpus": [{"name": "NVIDIA H100", "driver_version": "580"}] * 2}
    assert "2 x NVIDIA H100" in markdown.summary_document("B", gpu_env, [])


def test_a_record_names_the_experiment_its_command_ran(tmp_path):
    """bench.records names a record by the experiment module in its command (a hydra.run.dir outside
    results/<experiment>/ has no telling parent), else by the results folder's parent."""
    from bench.records import _experiment

    assert _experiment("python -m experiments.quant_compare device=cuda hydra.run.dir=/out/qc", tmp_path / "3" / "qc") \
        == "quant_compare"
    assert _experiment(None, tmp_path / "tensor_parallel" / "20261201-040000") == "tensor_parallel"
    assert _experiment("python bench/other.py", tmp_path / "overlap" / "x") == "overlap"


@pytest.mark.parametrize("args, message", [(["--rows", "0,3"], "--rows 0,3: each must be 0 (the rule), 1, 2 or 4"),
                                           (["--quants", "q3f16"], "--quants q3f16: each must be one of")])
def test_gemv_bench_refuses_bad_options_up_front(tmp_path, args, message):
    """bench.gemv run: a rows-per-warp or quantization it has no kernel for is one line and exit 2,
    before anything (CUDA included) starts."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "bench.gemv", "run", "--dir", str(tmp_path), "--out",
                           str(tmp_path / "x.json"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "x.json").exists()


def test_static_kv_bench_refuses_a_context_of_no_keys(tmp_path):
    """bench.static_kv --profile 0: one line and exit 2, before the CUDA plugin loads."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "bench.static_kv", "--out", str(tmp_path / "x.json"), "--profile", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--profile 0: a context of at least 1 key" in proc.stderr
    assert not (tmp_path / "x.json").exists()
