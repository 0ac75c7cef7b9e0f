"""harness.breakdown (where a step's GPU time goes) and the in-memory CUPTI window: CPU only.

Kernel names come from tests/fixtures/kernel_names_llama3-8b_cuda.json (extracted from TVM's
generated CUDA source and the libraries, see its "how" fields); the sweep runs on synthetic records
whose answer is worked out by hand. The window is tested where CUPTI is missing (here) and, for its
bookkeeping, against a small stand-in for cupti-python's activity API.
"""

import enum
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pytest

from harness import breakdown as bd
from runtime_patch import cupti_tracer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "kernel_names_llama3-8b_cuda.json"
US = 1_000  # ns per µs
S = 1_000_000_000  # ns per s


def fixture_names() -> list[str]:
    doc = json.loads(FIXTURE.read_text())
    names = list(doc["tvm"]["kernels"]) + list(doc["gpu_run"]["kernels"])
    for section in ("native", "native_wip", "nccl", "cublas"):
        for entry in doc[section]["kernels"]:
            names += list(entry.values())  # mangled as CUPTI reports them, and demangled
    return names


# --- classification --------------------------------------------------------------------------------

def test_fixture_is_extracted_not_invented():
    doc = json.loads(FIXTURE.read_text())
    assert doc["description"].startswith("kernel names from TVM's generated CUDA source for llama3-8b")
    arts = doc["artifacts"]
    for tree in doc["git"]:
        assert {(a["tp"], a["quant"]) for a in arts.values() if a["tree"] == tree} >= \
            {(1, "q0f16"), (2, "q0f16"), (1, "q4f16_1"), (2, "q4f16_1")}
    # every artifact contributes kernels, and the tp=2 / q4 ones have kernels of their own
    per_artifact = {label: [k for k, where in doc["tvm"]["kernels"].items() if label in where] for label in arts}
    assert all(len(kernels) > 30 for kernels in per_artifact.values())
    assert "dequantize_kernel" in per_artifact["tp1-q4f16_1"] and "add1_kernel" in per_artifact["tp2-q0f16"]


def test_every_fixture_kernel_lands_in_a_named_category():
    names = fixture_names()
    assert len(names) > 200
    unclassified = [n for n in names if bd.classify(n) == bd.UNCLASSIFIED]
    assert unclassified == []
    assert set(bd.kernel_map(names).values()) <= set(bd.CATEGORIES) - {bd.UNCLASSIFIED, bd.COPIES}


@pytest.mark.parametrize("name, category", [
    # TVM's kernels, named after their (fused) functions
    ("linear8_kernel", bd.WEIGHTS), ("fused_linear6_add_kernel", bd.WEIGHTS), ("dequantize3_kernel", bd.WEIGHTS),
    ("batch_decode_paged_kv_kernel", bd.ATTENTION), ("batch_prefill_ragged_kv_kernel", bd.ATTENTION),
    ("fused_rope_kernel", bd.ATTENTION), ("tir_kv_cache_transpose_append_kernel", bd.ATTENTION),
    ("copy_single_page_kernel", bd.ATTENTION), ("tir_attention_merge_state_kernel", bd.ATTENTION),
    ("rms_norm1_kernel", bd.NORMS), ("add1_kernel", bd.NORMS), ("fused_split1_silu1_multiply1_kernel", bd.NORMS),
    ("fused_reshape5_reshape6_kernel", bd.NORMS),
    ("embedding_kernel", bd.EMBEDDING), ("take_last_kernel", bd.EMBEDDING), ("argmax_kernel", bd.EMBEDDING),
    ("take_last_row_kernel", bd.EMBEDDING),  # the rows a prefill's last layer finishes on (engine.model.llama)
    ("void (anonymous namespace)::ArgmaxRows(float const*, long, float*, int*, unsigned int*, int*)", bd.EMBEDDING),
    # ours (runtime_patch/native), mangled as CUPTI reports them and demangled
    ("_ZN56_GLOBAL__N__3b0ad47d_17_cuda_attention_cu_2642a290_1103013CausalSoftmaxEPKfP6__halfPfiiiiiliilf", bd.ATTENTION),
    ("void (anonymous namespace)::DecodePartial<128, 4>(__half const*, __half const*, int const*, int const*, "
     "int const*, float*, float*, int, int, int, int, float)", bd.ATTENTION),
    ("void (anonymous namespace)::GemvQ4<4, __half>(__half const*, unsigned int const*, __half const*, __half*, int, int)",
     bd.WEIGHTS),
    # the quantized GEMVs and the prefill's dequantize as CUPTI named them on 2 x H200 (2026-11-30)
    ("void (anonymous namespace)::GemvQuant<4, 2, 8, __half>(__half const*, unsigned int const*, __half const*, "
     "__half*, int, int)", bd.WEIGHTS),
    ("void (anonymous namespace)::Dequantize<4>(unsigned int const*, __half const*, __half*, long)", bd.WEIGHTS),
    # the prefill's quantized GEMM and its split-K sums (the demangled forms of quant_gemm.cu's kernels)
    ("void (anonymous namespace)::GemmQuant<4, 4, __half>(__half const*, unsigned int const*, __half const*, "
     "__half*, float*, int, int, int, int, int)", bd.WEIGHTS),
    ("void (anonymous namespace)::GemmQuantReduce<__half>(float const*, __half*, int, int, int, int, int, int)",
     bd.WEIGHTS),
    ("void (anonymous namespace)::StaticDecodeCluster<128, 4>(__half const*, __half const*, __half const*, __half*, "
     "__half*, int const*, __half*, int, int, float)", bd.ATTENTION),
    # the tensor-core static decode and the decode's RMSNorm as CUPTI named them on an H200 (2026-12-01)
    ("StaticDecodeMma<128, 4>", bd.ATTENTION),
    ("void (anonymous namespace)::RmsNormRows<__half>(uint4 const*, uint4 const*, uint4*, int, float)", bd.NORMS),
    # NCCL (seen on 2 x H100) and all-reduces of ours, whatever their case
    ("ncclDevKernel_AllReduce_Sum_f16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", bd.COLLECTIVES),
    ("ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)", bd.COLLECTIVES),
    ("_Z14allreduce_oneIfEvPT_", bd.COLLECTIVES), ("oneshot_allreduce", bd.COLLECTIVES),
    ("void (anonymous namespace)::OneShotAllReduce<__half, 2>((anonymous namespace)::Params)", bd.COLLECTIVES),
    # the static KV cache's kernels (work in progress in the tree as these names were taken)
    ("void (anonymous namespace)::StaticDecode<128, 4>(__half const*)", bd.ATTENTION),
    ("(anonymous namespace)::AppendRows(__half const*, __half const*, __half*, __half*, int, int, int, int)", bd.ATTENTION),
    ("(anonymous namespace)::Advance(int const*, int*, int*, int*, int)", bd.EMBEDDING), ("arange_kernel", bd.NORMS),
    # cuBLAS (docs/BENCHMARKS.md saw nvjet_sm90_* for the prefill GEMMs on an H100)
    ("nvjet_sm90_*", bd.WEIGHTS),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, __half, __half, __half, __half, false>", bd.WEIGHTS),
])
def test_named_kernels_get_their_category(name, category):
    assert bd.classify(name) == category


def test_copies_go_by_record_kind_and_unknown_kernels_stay_unclassified():
    assert bd.classify("Memcpy HtoD", "memcpy") == bd.COPIES
    assert bd.classify("Memset", "memset") == bd.COPIES
    assert bd.classify("linear8_kernel", "memcpy") == bd.COPIES  # the kind decides, not the name
    assert bd.classify("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>") == bd.UNCLASSIFIED
    assert bd.classify("my_new_kernel") == bd.UNCLASSIFIED
    assert [r.category for r in bd.RULES][0] == bd.COLLECTIVES and all(r.note for r in bd.RULES)


# --- the sweep -----------------------------------------------------------------------------------------

def rec(name, start_us, end_us, device=0, stream=7, kind="kernel"):
    return {"kind": kind, "name": name, "start_ns": int(start_us * US), "end_ns": int(end_us * US),
            "device": device, "stream": stream}


def win(start_us, end_us):
    return (start_us * 1e-6, end_us * 1e-6)


def test_sequential_records_and_idle_add_up_to_the_window():
    records = [rec("linear8_kernel", 10, 30), rec("batch_decode_paged_kv_kernel", 40, 50),
               rec("Memcpy DtoH", 60, 65, kind="memcpy"), rec("rms_norm_kernel", 70, 71)]
    b = bd.step_breakdown(records, [win(0, 100)], device=0)
    assert b["steps"] == 1 and b["step_us"] == pytest.approx(100)
    assert b["categories"][bd.WEIGHTS] == pytest.approx(20)
    assert b["categories"][bd.ATTENTION] == pytest.approx(10)
    assert b["categories"][bd.COPIES] == pytest.approx(5)
    assert b["categories"][bd.NORMS] == pytest.approx(1)
    assert b["idle_us"] == pytest.approx(64) and b["shares"][bd.IDLE] == pytest.approx(0.64)
    assert b["check"]["exact"] and b["check"]["difference_us"] == 0
    assert [k["name"] for k in b["kernels"]][:2] == ["linear8_kernel", "batch_decode_paged_kv_kernel"]


def test_idle_time_goes_to_the_record_the_device_waited_to_start():
    """Where a tp=2 step idles: before its first kernel (the host's launch), before an allreduce
    (the other device), after its last kernel (the end of the step); per step over two steps."""
    records = []
    for t0 in (0, 100):
        records += [rec("linear8_kernel", t0 + 10, t0 + 40),
                    rec("void (anonymous namespace)::OneShotAllReduce<__half, 2>((anonymous namespace)::Params)",
                        t0 + 45, t0 + 50),
                    rec("linear9_kernel", t0 + 50, t0 + 90)]
    b = bd.step_breakdown(records, [win(0, 100), win(100, 200)], device=0)
    assert b["idle_us"] == pytest.approx(25)
    waits = {w["name"]: (w["category"], w["us_per_step"]) for w in b["idle_before"]}
    assert waits == {"linear8_kernel": (bd.WEIGHTS, pytest.approx(10)),
                     bd.END_OF_STEP: (bd.IDLE, pytest.approx(10)),
                     "void (anonymous namespace)::OneShotAllReduce<__half, 2>((anonymous namespace)::Params)":
                         (bd.COLLECTIVES, pytest.approx(5))}
    assert sum(w["us_per_step"] for w in b["idle_before"]) == pytest.approx(b["idle_us"])
    assert [w["name"] for w in b["idle_before"]][2].endswith("(anonymous namespace)::Params)")  # largest first
    point = {"label": "tp=2", "breakdown": {"measured": True, "devices": [{"device": 0, "decode": b, "prefill": None}]},
             "floor_us": None}
    assert bd.idle_lines([point]) == ["- tp=2 GPU 0: 25.0 idle: 10.0 before linear8_kernel, "
                                      "10.0 before (end of the step), 5.0 before OneShotAllReduce<__half, 2>"]
    assert "GPU idle by what the device waited to start" in bd.markdown_table([point])


def test_overlap_goes_to_one_category_and_hidden_collective_time_is_reported():
    records = [rec("linear8_kernel", 0, 50, stream=7),
               rec("ncclDevKernel_AllReduce_Sum_f16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 30, 80, stream=9),
               rec("Memcpy PtoP", 70, 90, stream=11, kind="memcpy"),
               rec("linear9_kernel", 45, 55, stream=7)]  # overlaps on its own stream (PDL): counted once
    b = bd.step_breakdown(records, [win(0, 100)], device=0)
    cats = b["categories"]
    assert cats[bd.WEIGHTS] == pytest.approx(55)
    assert cats[bd.COPIES] == pytest.approx(20)  # 70-90: copies outrank collectives
    assert cats[bd.COLLECTIVES] == pytest.approx(15)  # 55-70 exposed
    assert b["collectives_overlapped_us"] == pytest.approx(35)  # 30-55 under the GEMVs, 70-80 under the copy
    assert b["idle_us"] == pytest.approx(10)
    assert sum(cats.values()) + b["idle_us"] == pytest.approx(b["step_us"])


def test_records_are_clipped_to_each_window_and_averaged_per_step():
    records = [rec("linear8_kernel", 90, 130),  # crosses the edge of the first window
               rec("batch_decode_paged_kv_kernel", 195, 260),  # covers the whole second window
               rec("linear8_kernel", 300, 400)]  # outside both windows
    b = bd.step_breakdown(records, [win(100, 150), win(200, 250)], device=0)
    assert b["steps"] == 2 and b["step_us"] == pytest.approx(50)
    assert b["categories"][bd.WEIGHTS] == pytest.approx(15)  # 30 µs in step one, 0 in step two
    assert b["categories"][bd.ATTENTION] == pytest.approx(25)  # 0 and 50
    assert b["idle_us"] == pytest.approx(10)  # 20 and 0
    assert b["records_in_windows"] == 2
    assert b["kernels"][0] == {"name": "batch_decode_paged_kv_kernel", "category": bd.ATTENTION,
                               "us_per_step": pytest.approx(25), "calls_per_step": 0.5}


def test_each_device_is_swept_on_its_own_records():
    records = [rec("linear8_kernel", 0, 40, device=0), rec("linear8_kernel", 0, 10, device=1),
               rec("ncclDevKernel_AllReduce_Sum_f16_RING_LL", 40, 60, device=1, stream=3)]
    point = bd.point_breakdown(records, [win(0, 100)], [], devices=[0, 1])
    assert point["measured"] and [d["device"] for d in point["devices"]] == [0, 1]
    gpu0, gpu1 = (d["decode"] for d in point["devices"])
    assert gpu0["categories"][bd.WEIGHTS] == pytest.approx(40) and gpu0["categories"][bd.COLLECTIVES] == 0
    assert gpu1["categories"][bd.WEIGHTS] == pytest.approx(10) and gpu1["categories"][bd.COLLECTIVES] == pytest.approx(20)
    assert gpu1["idle_us"] == pytest.approx(70)
    assert all(d["prefill"] is None for d in point["devices"])


def test_sums_equal_the_windows_exactly_whatever_the_overlaps():
    rng = random.Random(7)
    names = ["linear8_kernel", "batch_decode_paged_kv_kernel", "rms_norm_kernel", "argmax_kernel",
             "ncclDevKernel_AllReduce_Sum_f16_RING_LL", "mystery_kernel"]
    records = []
    for _ in range(400):
        start = rng.uniform(0, 1000)
        records.append(rec(rng.choice(names), start, start + rng.uniform(0.1, 30), device=rng.choice([0, 1]),
                           stream=rng.choice([7, 9, 11]), kind=rng.choice(["kernel"] * 6 + ["memcpy", "memset"])))
    windows = [win(a, a + rng.uniform(5, 90)) for a in range(0, 1000, 100)]
    for device in (0, 1):
        b = bd.step_breakdown(records, windows, device)
        assert b["check"]["exact"], b["check"]
        assert sum(b["categories"].values()) + b["idle_us"] == pytest.approx(b["step_us"], rel=1e-12)
        assert sum(b["shares"].values()) == pytest.approx(1.0)
        assert b["categories"][bd.UNCLASSIFIED] > 0  # mystery_kernel is shown, not folded away


def test_prefill_attention_gemms_are_told_from_the_weights_by_their_place():
    gemm = "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_execute_kernel__5x_cublas"
    reduce = "void cublasLt::splitKreduce_kernel<32, 16, int, __half, __half, float, __half>"
    order = [("qkv", gemm), ("rope", "fused_rope_kernel"), ("append", "tir_kv_cache_transpose_append_kernel"),
             ("qk1", gemm), ("qk2", gemm), ("softmax", "(anonymous namespace)::CausalSoftmax(float const*)"),
             ("pv1", gemm), ("pv1r", reduce), ("pv2", gemm), ("pv2r", reduce), ("o_proj", gemm), ("o_projr", reduce),
             ("norm", "rms_norm_kernel")]
    records = [rec(name, 10 * i, 10 * i + 5) for i, (_, name) in enumerate(order)]
    cats = bd._categorise(records, {})
    got = {role: cat for (role, _), cat in zip(order, cats)}
    assert [r for r, c in got.items() if c == bd.ATTENTION] == ["rope", "append", "qk1", "qk2", "softmax",
                                                                "pv1", "pv1r", "pv2", "pv2r"]
    assert got["qkv"] == got["o_proj"] == got["o_projr"] == bd.WEIGHTS
    b = bd.step_breakdown(records, [win(0, 130)], device=0)
    assert b["categories"][bd.ATTENTION] == pytest.approx(45) and b["categories"][bd.WEIGHTS] == pytest.approx(15)


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="at least one step window"):
        bd.step_breakdown([], [], device=0)
    with pytest.raises(ValueError, match="ends before it starts"):
        bd.step_breakdown([], [win(10, 5)], device=0)


# --- records from tracer documents ------------------------------------------------------------------

def test_the_profiler_uses_the_tracers_helpers():
    """One clock fit and one c++filt call, in runtime_patch.cupti_tracer (below harness/ and
    profiler/): the profiler's names are the tracer's functions."""
    from profiler import kernels, timeline

    assert timeline.host_clock is cupti_tracer.host_clock and kernels.demangle is cupti_tracer.demangle
    to_s = cupti_tracer.host_clock([[1 * S, 10.0], [3 * S, 12.000002]])
    assert abs(to_s(2 * S) - 11.000001) < 1e-9


def test_tracer_documents_become_host_clock_records():
    doc = {"format": cupti_tracer.FORMAT, "label": "controller", "pid": 1,
           "clock": {"pairs": [[1 * S, 10.0], [3 * S, 12.0]]},
           "records": [{"kind": "kernel", "name": "linear8_kernel", "start_ns": 2 * S, "end_ns": 2 * S + 5000,
                        "device_id": 1, "stream_id": 13},
                       {"kind": "runtime", "name": "cudaLaunchKernel", "start_ns": 2 * S, "end_ns": 2 * S + 10}]}
    [r] = bd.records_from_documents([doc, json.dumps(doc)])[:1]
    assert r == {"kind": "kernel", "name": "linear8_kernel", "start_ns": 11 * S, "end_ns": 11 * S + 5000,
                 "device": 1, "stream": 13}
    assert len(bd.records_from_documents([doc, json.dumps(doc)])) == 2  # API records are left out
    with pytest.raises(cupti_tracer.TracerUnavailable, match="pid 4: no GPU"):
        bd.host_records(json.dumps({"unavailable": "no GPU", "pid": 4}))
    with pytest.raises(ValueError, match="no clock calibration pair"):
        bd.host_records({"records": doc["records"]})


# --- reporting ---------------------------------------------------------------------------------------------

def report_points():
    records = [rec("linear8_kernel", 0, 60, device=d) for d in (0, 1)] + \
              [rec("ncclDevKernel_AllReduce_Sum_f16_RING_LL", 60, 70, device=d, stream=3) for d in (0, 1)] + \
              [rec("linear8_kernel", 200, 500)]
    measured = bd.point_breakdown(records, [win(0, 100)], [win(200, 600)], devices=[0, 1])
    return [{"label": "tp=2 q0f16", "breakdown": measured, "floor_us": bd.bandwidth_floor_us(160e6, 3.2e12)},
            {"label": "tp=1 q0f16", "breakdown": bd.not_measured("cupti-python is not importable"), "floor_us": None}]


def test_table_has_a_row_per_point_device_and_phase_and_says_what_was_not_measured():
    text = bd.markdown_table(report_points())
    lines = text.splitlines()
    assert "| config | GPU | phase |" in lines[0] and "weights (GEMV/GEMM) µs (share)" in lines[0]
    rows = [line for line in lines if line.startswith("| tp=2 q0f16")]
    assert len(rows) == 4  # 2 GPUs x decode, prefill
    assert "| 0 | decode | 1 | 100.0 | 60.0 (60%) |" in rows[0] and "| 50.0 |" in rows[0]  # floor 50 µs
    assert rows[2].startswith("| tp=2 q0f16 | 0 | prefill |") and rows[2].endswith("| — |")  # no floor on prefill
    assert "- tp=1 q0f16: breakdown not measured: cupti-python is not importable" in lines


def test_table_of_unmeasured_points_only_gives_the_reasons():
    text = bd.markdown_table([{"label": "tp=1", "breakdown": bd.not_measured("device=cpu: no CUPTI on the CPU")}])
    assert text == "- tp=1: breakdown not measured: device=cpu: no CUPTI on the CPU\n"


def test_plot_is_written(tmp_path):
    out = bd.plot(report_points(), tmp_path / "breakdown.png", "Llama-3-8B decode step")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one measured"):
        bd.plot(report_points()[1:], tmp_path / "none.png", "nothing")
    assert not (tmp_path / "none.png").exists()


def test_bandwidth_floor():
    assert bd.bandwidth_floor_us(16e9, 3.2e12) == pytest.approx(5000)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        bd.bandwidth_floor_us(16e9, 0)


def test_not_measured_record():
    assert bd.not_measured("no GPU") == {"measured": False, "reason": "no GPU"}


# --- the in-memory CUPTI window --------------------------------------------------------------------------

needs_no_cupti = pytest.mark.skipif(importlib.util.find_spec("cupti") is not None, reason="cupti-python is installed here")


@needs_no_cupti
def test_window_refuses_cleanly_without_cupti():
    window = cupti_tracer.Window("test")
    for _ in range(2):  # no state left behind: a second try says the same
        with pytest.raises(cupti_tracer.TracerUnavailable, match="cupti-python is not importable"):
            window.start()
        assert not window.is_open and not cupti_tracer.is_running()
    with pytest.raises(RuntimeError, match="not open"):
        window.stop()


@needs_no_cupti
def test_window_functions_answer_with_the_reason():
    import tvm_ffi

    cupti_tracer.register_window_functions()
    start = tvm_ffi.get_global_func(cupti_tracer.WINDOW_START)
    stop = tvm_ffi.get_global_func(cupti_tracer.WINDOW_STOP)
    assert "without lab.cupti.window_start" in json.loads(str(stop()))["unavailable"]
    start()
    answer = json.loads(str(stop()))
    assert "cupti-python is not importable" in answer["unavailable"]
    with pytest.raises(cupti_tracer.TracerUnavailable):
        bd.host_records(answer)


class StandInCupti:
    """The part of cupti-python's activity API the tracer uses, with records queued by the test and
    handed over on flush (as CUPTI hands over completed buffers)."""

    class ActivityKind(enum.IntEnum):
        CONCURRENT_KERNEL = 1
        MEMCPY = 2
        MEMSET = 3
        MEMORY2 = 4

    class ActivityMemcpyKind(enum.IntEnum):
        HTOD = 1

    def __init__(self):
        self.now = 1_000
        self.enabled: set = set()
        self.queued: list = []
        self.callbacks = None

    def activity_register_callbacks(self, requested, completed):
        self.callbacks = (requested, completed)

    def activity_enable(self, kind):
        self.enabled.add(kind)

    def activity_disable(self, kind):
        self.enabled.discard(kind)

    def get_timestamp(self):
        self.now += 1
        return self.now

    def activity_flush_all(self, forced):
        batch, self.queued = self.queued, []
        if batch:
            self.callbacks[1](batch)

    def kernel(self, name, start, end):
        self.queued.append(types.SimpleNamespace(
            kind=int(self.ActivityKind.CONCURRENT_KERNEL), start=start, end=end, device_id=0, stream_id=7,
            context_id=1, correlation_id=len(self.queued), name=name, grid_x=1, grid_y=1, grid_z=1,
            block_x=32, block_y=1, block_z=1, static_shared_memory=0, dynamic_shared_memory=0))


@pytest.fixture
def stand_in_cupti(monkeypatch):
    fake = StandInCupti()
    monkeypatch.setitem(sys.modules, "cupti", types.SimpleNamespace(cupti=fake))
    monkeypatch.setenv("LAB_CUPTI_FLUSH_S", "0")  # no flusher thread: the test decides when buffers arrive
    yield fake
    cupti_tracer.stop()


def test_window_subscribes_for_its_duration_where_no_tracer_runs(stand_in_cupti, tmp_path):
    fake = stand_in_cupti
    fake.kernel("linear8_kernel", 10, 20)  # ran before the window: left out
    window = cupti_tracer.Window("controller")
    window.start()
    assert fake.enabled == {fake.ActivityKind.CONCURRENT_KERNEL, fake.ActivityKind.MEMCPY, fake.ActivityKind.MEMSET}
    with pytest.raises(cupti_tracer.TracerUnavailable, match="stop it before starting the file tracer"):
        cupti_tracer.start(tmp_path / "c.json", "x")
    fake.kernel("rms_norm_kernel", fake.now, fake.now + 1)  # between the two calibration reads
    doc = window.stop()
    assert fake.enabled == set()
    assert doc["window"]["source"] == "own subscriber" and len(doc["clock"]["pairs"]) == 2
    assert [r["name"] for r in doc["records"]] == ["rms_norm_kernel"] and doc["counts"] == {"kernel": 1}
    assert bd.host_records(doc)[0]["name"] == "rms_norm_kernel"


def test_window_taps_a_running_file_tracer(stand_in_cupti, tmp_path):
    fake = stand_in_cupti
    cupti_tracer.start(tmp_path / "cupti-1.json", "controller")
    window = cupti_tracer.Window("controller")
    window.start()
    with pytest.raises(RuntimeError, match="another CUPTI window is open"):
        cupti_tracer.Window().start()
    fake.kernel("linear8_kernel", fake.now, fake.now + 1)
    doc = window.stop()
    assert doc["window"]["source"] == "file tracer" and [r["name"] for r in doc["records"]] == ["linear8_kernel"]
    assert fake.ActivityKind.CONCURRENT_KERNEL in fake.enabled  # the file tracer still traces
    path = cupti_tracer.stop()
    assert [r["name"] for r in cupti_tracer.read_records(path)["records"]] == ["linear8_kernel"]
