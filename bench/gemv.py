"""The batch-1 decode GEMV kernels of quantized linears, per shape, against the copy bandwidth.

Two formulations of the same linear, both scheduled by dlight's GEMV rule:
`fp32_inline` (what the engine's `decode` uses with decode_gemv=tir: the float32 weight computed
inside the reduction) and `fp16_stage` (the fp16 producer stage that prefill and batch decode use
for tensor cores); and `library`, runtime_patch/native/quant_gemv.cu's `lab.gemv.q4` / `lab.gemv.q8`
(the engine's `decode` with decode_gemv=library).

    python -m bench.gemv build --out DIR           # any machine: compile each variant to DIR/*.so
    python -m bench.gemv run --dir DIR --out F.json   # on the GPU: check against NumPy, time
                                                      # (without DIR/manifest.json: library only)
    python -m bench.gemv norm --out F.json            # on the GPU: lab.norm.rms and lab.norm.add_rms only

TVM's kernels are built for Llama-3-8B's batch-1 decode linears at tp=1 (SHAPES); the library's
also run on the per-rank shapes of Llama-3-8B at tp=2, Llama-3-70B at tp=2 and the 8B's LM head
(LIBRARY_SHAPES); and `lab.dequant.q4` / `q8`, the prefill's dequantize before its cuBLAS GEMM,
on SHAPES (checked bit for bit); the fused GEMVs the model calls (`lab.gemv.q4_add`, `_swiglu`, the
split norm's `_add_sq`, `_rms`, `_swiglu_rms`: FUSIONS) against their CPU versions, timed in a CUDA graph beside the plain GEMV; and the decode's
RMSNorm `lab.norm.rms` (NORM_CASES, the decode's and the prefill's rows) and the prefill's
`lab.norm.add_rms` (ADD_NORM_CASES) against their CPU versions, timed in a graph. `run` times each kernel with CUDA events
over many calls, rotating over enough weight copies (4x the L2 cache) that every call reads from HBM, and
reports GB/s of weight bytes (packed weights + scales) beside the device's copy bandwidth.
`--rows 0,1,2` times the library's GEMVs under each rows-per-warp choice (`lab.gemv.rows`; 0 is the
plugin's rule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import engine  # noqa: F401  (prepares a runtime-only TVM before anything imports tvm)
from bench import attention as attention_bench  # its CUDA-event timer

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LIBRARY_SHAPES = {
    **SHAPES, "lm_head": (128256, 4096),
    "tp2-qkv": (3072, 4096), "tp2-o": (4096, 2048), "tp2-gate_up": (14336, 4096), "tp2-down": (4096, 7168),
    "70b-tp2-qkv": (5120, 8192), "70b-tp2-o": (8192, 4096), "70b-tp2-gate_up": (28672, 8192),
    "70b-tp2-down": (8192, 14336),
}
LIBRARY = {"q4f16_1": "lab.gemv.q4", "q8f16_1": "lab.gemv.q8"}
VARIANTS = {"fp32_inline": "decode", "fp16_stage": "batch"}  # engine.model.kernels phases


def build(out: Path, quants: list[str]) -> None:
    import tvm
    from tvm.relax.frontend import nn

    from engine.compile import BuildSpec, _pipeline
    from engine.config import preset
    from engine.model.kernels import KernelPlan, Linear
    from engine.quantize import quant_spec
    from runtime_patch.cuda_compile import CudaSourceRecorder, compile_cubin, cubin_name

    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for quant in quants:
        for shape_name, (n, k) in SHAPES.items():
            for variant, phase in VARIANTS.items():
                class One(nn.Module):
                    def __init__(self):
                        self.l = Linear(k, n, quant_spec(quant), KernelPlan())

                    def forward(self, x):
                        return self.l(x, phase)

                mod, _ = One().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, 1, k], "float16"),
                                                            "$": {"param_mode": "packed", "effect_mode": "none"}}})
                spec = BuildSpec(preset("llama3-8b"), quant, 1, "cuda", "sm_90", cuda_graph=False)
                target = spec.tvm_target()
                with CudaSourceRecorder() as sources:
                    ex = tvm.compile(mod, target, relax_pipeline=_pipeline(spec, target))
                name = f"{quant}-{shape_name}-{variant}"
                ex.export_library(str(out / f"{name}.so"))
                for code in sources.sources:
                    compile_cubin(code, "sm_90", out / "kernels" / cubin_name(code, "sm_90"))
                manifest.append({"name": name, "quant": quant, "shape": shape_name, "n": n, "k": k, "variant": variant})
                print(name, flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


L2_BYTES = 50 * 2**20  # timed calls rotate over weight copies of at least 4x this: each reads HBM


def weight_copies(packed, scale, moved_bytes: int) -> list[list]:
    """Copies of a packed weight and its scales (tvm_ffi tensors) enough for a call that moves
    `moved_bytes` to read each from HBM when the calls rotate over them."""
    import tvm_ffi

    copies = max(1, -(-4 * L2_BYTES // moved_bytes))
    return [[tvm_ffi.from_dlpack(packed.clone()), tvm_ffi.from_dlpack(scale.clone())] for _ in range(copies)]


def per_call_seconds(call, params: list, warmup: int, calls: int, samples: int = 5) -> list[float]:
    """Seconds per `call(p)` (CUDA events around `calls` launches rotating over `params`), one
    figure per sample, after `warmup` calls."""
    import torch

    for i in range(warmup):
        call(params[i % len(params)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(samples):
        torch.cuda.synchronize()
        start.record()
        for i in range(calls):
            call(params[i % len(params)])
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / calls)
    return out


# Largest relative error of a GEMV's output against NumPy's float32 product of the dequantized
# weight (max |error| / max |reference|) that passes: the kernels' measured 2e-4 to 5e-4 have room
GEMV_TOLERANCE = 2e-3


def run(folder: Path, out: Path, sha: str | None, quants: list[str], rows: list[int]) -> None:
    """Every GEMV and check above into the record `out` (bench.records.write_checked_record); exit 1
    where any check fails."""
    import numpy as np
    import torch
    import tvm
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine

    from engine.quantize import quant_spec, quantize_torch
    from harness import device_probe
    from runtime_patch import cuda_compile, functions

    cuda_compile.ensure_cuda_compiler("sm_90", [folder / "kernels"])
    dev = tvm.cuda(0)
    bandwidth = device_probe.copy_bandwidth("cuda")
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else []
    manifest = [m for m in manifest if m["quant"] in quants]
    functions.register("cuda", [functions.GEMV_Q4, functions.GEMV_Q8, functions.GEMV_ROWS])
    manifest += [{"name": f"{quant}-{shape}-library" + (f"-rows{r}" if r else ""), "quant": quant, "shape": shape,
                  "variant": "library", "rows": r, "n": n, "k": k}
                 for r in rows for quant in quants for shape, (n, k) in LIBRARY_SHAPES.items()]
    set_rows = tvm_ffi.get_global_func(functions.GEMV_ROWS)
    results, reference = [], {}
    for entry in manifest:
        set_rows(entry.get("rows", 0))
        spec = quant_spec(entry["quant"])
        n, k = entry["n"], entry["k"]
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) * 0.02
        packed, scale = quantize_torch(w, spec)
        weight_bytes = packed.numel() * 4 + scale.numel() * 2
        params = weight_copies(packed, scale, weight_bytes)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.float16, generator=g)
        xt = tvm_ffi.from_dlpack(x)
        if entry["variant"] == "library":
            y_out = torch.empty(1, 1, n, device="cuda", dtype=torch.float16)
            yt = tvm_ffi.from_dlpack(y_out)

            library = tvm_ffi.get_global_func(LIBRARY[entry["quant"]])

            def fn(x_arg, p, library=library):
                library(x_arg, p[0], p[1], yt)
                return yt
        else:
            fn = VirtualMachine(tvm.runtime.load_module(str(folder / f"{entry['name']}.so")), dev)["forward"]
        y = torch.from_dlpack(fn(xt, params[0])).float().cpu().numpy().ravel()
        key = (entry["quant"], entry["shape"])
        if key not in reference:
            deq = (packed, scale)
            from engine.quantize import dequantize

            wd = dequantize(deq[0].cpu().numpy(), deq[1].cpu().numpy(), spec)
            reference[key] = wd @ x.float().cpu().numpy().ravel()
        err = float(np.abs(y - reference[key]).max() / (np.abs(reference[key]).max() + 1e-6))
        samples = per_call_seconds(lambda p: fn(xt, p), params, warmup=10, calls=200)
        t = float(np.median(samples))
        r = dict(entry, rel_error=err, ok=err <= GEMV_TOLERANCE, us=t * 1e6, gb_s=weight_bytes / t / 1e9,
                 bandwidth_fraction=weight_bytes / t / bandwidth["bytes_per_s"], raw_s=samples)
        print(f"{entry['name']:28s} {r['us']:8.1f} us {r['gb_s']:7.0f} GB/s ({r['bandwidth_fraction']:.0%}) err {err:.1e}"
              f"{'' if r['ok'] else ' NOT OK'}", flush=True)
        results.append(r)
        del params
    set_rows(0)
    results += dequant_results(quants, bandwidth["bytes_per_s"])
    for r in rows:
        set_rows(r)
        results += fused_results(quants, r)
    set_rows(0)
    results += norm_results()
    from .records import write_checked_record

    if not write_checked_record(out, "gemv", results, sha, extra={"bandwidth": bandwidth}):
        sys.exit(1)


# lab.norm.rms (the decode's RMSNorm, decode_norm=library, and the library prefill's): (hidden, rows,
# dtype) cases; a step of Llama-3-8B calls it 65 times on one 4096-wide float16 row, a 4096-token
# prefill 65 times on 4096 rows (from 512 rows on the kernel of 128 threads a row: the last five cases)
NORM_CASES = ((4096, 1, "float16"), (4096, 16, "float16"), (8192, 1, "float16"), (4096, 1, "bfloat16"),
              (2048, 4, "float32"), (128, 3, "float16"),
              (4096, 4096, "float16"), (8192, 1024, "float16"), (4096, 600, "bfloat16"), (2048, 700, "float32"),
              (128, 520, "float16"))
NORM_CALLS = 65  # calls per timed graph
# lab.norm.add_rms (the library prefill's residual add with the norm after it): (hidden, rows,
# dtype); 16384 float16 is 2048 vectors a row, more than the kernel's threads hold (its read-back path)
ADD_NORM_CASES = ((4096, 4096, "float16"), (4096, 3, "float16"), (8192, 1024, "float16"), (2048, 700, "float32"),
                  (128, 520, "float16"), (4096, 600, "bfloat16"), (16384, 64, "float16"))


def per_call_in_graph(warm, issue, calls: int) -> list[float]:
    """Seconds per call of a CUDA graph of `calls` calls: `warm()` once on a side stream, `issue()`
    (the calls) captured there, the graph replayed 10 times (attention_bench.timed)."""
    import torch

    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        warm()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            issue()
    torch.cuda.synchronize()
    return [t / calls for t in attention_bench.timed(graph.replay, repeats=10)]


def norm_error(got, want) -> float:
    """The largest difference of a GPU norm's output (a tensor) from its CPU version's (an array),
    relative to the largest of the latter."""
    import numpy as np

    want = want.astype(np.float32)
    return float(np.abs(got.float().cpu().numpy() - want).max() / (np.abs(want).max() + 1e-6))


def norm_tolerance(dtype: str) -> float:
    return 1.6e-2 if dtype == "bfloat16" else 1e-3  # bfloat16: two roundings of 2^-8 apart at most


def norm_results() -> list[dict]:
    """`lab.norm.rms` against its CPU version (runtime_patch.cpu_functions, transformers'
    LlamaRMSNorm rounding; bfloat16 against the float32 formula) on NORM_CASES, each timed as a
    decode step calls it: NORM_CALLS calls in one CUDA graph, per call."""
    import numpy as np
    import torch
    import tvm_ffi

    from runtime_patch import cpu_functions, functions

    functions.register("cuda", [functions.RMS_NORM])
    norm = tvm_ffi.get_global_func(functions.RMS_NORM)
    results = []
    for hidden, rows, dtype in NORM_CASES:
        g = torch.Generator(device="cuda").manual_seed(hidden + rows)
        x = (torch.randn(rows, hidden, device="cuda", generator=g) * 3).to(getattr(torch, dtype))
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(getattr(torch, dtype))
        out = torch.empty_like(x)

        def call():
            with tvm_ffi.use_torch_stream():
                norm(tvm_ffi.from_dlpack(x), tvm_ffi.from_dlpack(weight), 1e-5, tvm_ffi.from_dlpack(out))

        call()
        torch.cuda.synchronize()
        if dtype == "bfloat16":  # NumPy has no bfloat16: the float32 formula, bfloat16's rounding apart
            want = cpu_functions._rms_norm(x.float().cpu().numpy(), weight.float().cpu().numpy(), 1e-5)
        else:
            want = np.zeros(tuple(x.shape), x.cpu().numpy().dtype)
            cpu_functions.IMPLEMENTATIONS[functions.RMS_NORM](x.cpu().numpy(), weight.cpu().numpy(), 1e-5, want)
        err = norm_error(out, want)
        raw = per_call_in_graph(call, lambda: [call() for _ in range(NORM_CALLS)], NORM_CALLS)
        row = {"name": f"rms_norm-{hidden}-rows{rows}-{dtype}", "variant": "rms_norm_in_graph", "hidden": hidden,
               "rows": rows, "dtype": dtype, "rel_error_vs_cpu": err, "ok": err <= norm_tolerance(dtype),
               "us": float(np.median(raw)) * 1e6, "raw_s": raw}
        print(f"{functions.RMS_NORM:24s} {hidden:5d} x {rows:4d} {dtype:8s} {row['us']:7.2f} us per call in a graph; "
              f"error against the CPU version {err:.1e}{'' if row['ok'] else ' NOT OK'}", flush=True)
        results.append(row)
    return results


def add_norm_results() -> list[dict]:
    """`lab.norm.add_rms` against its CPU version on ADD_NORM_CASES (the sum and the norm), each
    timed as a 4096-token prefill calls it: NORM_CALLS calls in one CUDA graph, per call."""
    import numpy as np
    import torch
    import tvm_ffi

    from runtime_patch import cpu_functions, functions

    functions.register("cuda", [functions.ADD_RMS_NORM])
    add_norm = tvm_ffi.get_global_func(functions.ADD_RMS_NORM)
    results = []
    for hidden, rows, dtype in ADD_NORM_CASES:
        g = torch.Generator(device="cuda").manual_seed(hidden + 7 * rows)
        partial = (torch.randn(rows, hidden, device="cuda", generator=g) * 3).to(getattr(torch, dtype))
        residual = (torch.randn(rows, hidden, device="cuda", generator=g) * 3).to(getattr(torch, dtype))
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(getattr(torch, dtype))
        total, normed = torch.empty_like(partial), torch.empty_like(partial)

        def call():
            with tvm_ffi.use_torch_stream():
                add_norm(*[tvm_ffi.from_dlpack(t) for t in (partial, residual, weight)], 1e-5,
                         tvm_ffi.from_dlpack(total), tvm_ffi.from_dlpack(normed))

        call()
        torch.cuda.synchronize()
        as_np = (lambda t: t.float().cpu().numpy()) if dtype == "bfloat16" else (lambda t: t.cpu().numpy())
        want_total, want_normed = np.zeros(tuple(partial.shape), as_np(partial).dtype), np.zeros(tuple(partial.shape),
                                                                                                 as_np(partial).dtype)
        # bfloat16: NumPy has none; the float32 formula, bfloat16's rounding apart
        cpu_functions.IMPLEMENTATIONS[functions.ADD_RMS_NORM](as_np(partial), as_np(residual), as_np(weight), 1e-5,
                                                              want_total, want_normed)
        errors = [norm_error(total, want_total), norm_error(normed, want_normed)]
        raw = per_call_in_graph(call, lambda: [call() for _ in range(NORM_CALLS)], NORM_CALLS)
        row = {"name": f"add_rms_norm-{hidden}-rows{rows}-{dtype}", "variant": "add_rms_norm_in_graph",
               "hidden": hidden, "rows": rows, "dtype": dtype, "rel_error_vs_cpu": max(errors),
               "total_rel_error_vs_cpu": errors[0], "normed_rel_error_vs_cpu": errors[1],
               "ok": max(errors) <= norm_tolerance(dtype), "us": float(np.median(raw)) * 1e6, "raw_s": raw,
               "bytes_moved": 4 * rows * hidden * partial.element_size()}
        print(f"{functions.ADD_RMS_NORM:24s} {hidden:5d} x {rows:4d} {dtype:8s} {row['us']:7.2f} us per call in a graph "
              f"({row['bytes_moved'] / row['us'] / 1e3:.0f} GB/s); error against the CPU version: sum {errors[0]:.1e}, "
              f"norm {errors[1]:.1e}{'' if row['ok'] else ' NOT OK'}", flush=True)
        results.append(row)
    return results


def run_norm(out: Path, sha: str | None) -> None:
    from .records import write_checked_record

    if not write_checked_record(out, "gemv", norm_results() + add_norm_results(), sha):
        sys.exit(1)


IN_GRAPH_LAYERS = 8  # layers of weights a timed graph rotates over (> 4x L2 at q4: each call reads HBM)


# The fused GEMVs (runtime_patch.functions.GEMV_FUSIONS) that the model calls, by SHAPES entry
FUSIONS = {"qkv": ("rms",), "o": ("add", "add_sq"), "gate_up": ("swiglu", "swiglu_rms"), "down": ("add", "add_sq")}
NORM_EPS = 1e-5  # the split norm's epsilon (Llama-3's)
NORM_SITE = 0  # the norm site the add_sq GEMVs add into and the rms GEMVs read


def _set_norm_site(bits: int, width: int, g, site: int = NORM_SITE) -> None:
    """Norm site `site` of the GPU's GEMV plugin and of the CPU versions holding the same sum (up
    to its order), the other zero: an add_sq GEMV of `width` outputs into the other site, which
    zeroes `site`, then one into `site`, run on both."""
    import numpy as np
    import torch
    import tvm_ffi

    from engine.quantize import quant_spec, quantize_torch
    from runtime_patch import cpu_functions, functions

    k = 32
    weights = quantize_torch(torch.randn(width, k, device="cuda", dtype=torch.float16, generator=g) * 0.1,
                             quant_spec(f"q{bits}f16_1"))
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.float16, generator=g)
    residual = torch.randn(1, 1, width, device="cuda", dtype=torch.float16, generator=g)
    norm_weight = torch.ones(width, device="cuda", dtype=torch.float16)
    outs = [torch.empty(1, 1, width, device="cuda", dtype=torch.float16) for _ in range(2)]
    name = functions.GEMV[bits, "add_sq"]
    for s in (1 - site, site):
        with tvm_ffi.use_torch_stream():
            tvm_ffi.get_global_func(name)(*[tvm_ffi.from_dlpack(a) for a in (x, *weights, residual, norm_weight)], s,
                                          *[tvm_ffi.from_dlpack(o) for o in outs])
        cpu_functions.IMPLEMENTATIONS[name](*[a.cpu().numpy() for a in (x, *weights, residual, norm_weight)], s,
                                            *[np.zeros(tuple(o.shape), np.float16) for o in outs])
    torch.cuda.synchronize()


def fused_results(quants: list[str], rows: int = 0) -> list[dict]:
    """The fused GEMVs (the residual add, SiLU after gate_up, the split norm's halves: FUSIONS) checked against
    their CPU versions (runtime_patch.cpu_functions, the CPU tests' oracle-checked ones) on the
    8B's shapes; then, per shape, the plain GEMV and each fused one timed as the model calls them:
    IN_GRAPH_LAYERS calls (one per layer's weights) in one CUDA graph, per call (a separately
    launched call under ~8 us is timed by its launch)."""
    import numpy as np
    import torch
    import tvm_ffi

    from engine.quantize import quant_spec, quantize_torch
    from runtime_patch import cpu_functions, functions

    results = []
    for quant in quants:
        bits = quant_spec(quant).bits
        functions.register("cuda", [functions.GEMV[bits, f] for f in functions.GEMV_FUSIONS])
        g = torch.Generator(device="cuda").manual_seed(2)
        for shape, fusions in FUSIONS.items():
            n, k = SHAPES[shape]
            layers = [quantize_torch(torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) * 0.02,
                                     quant_spec(quant)) for _ in range(IN_GRAPH_LAYERS)]
            x = torch.randn(1, 1, k, device="cuda", dtype=torch.float16, generator=g)
            residual = torch.randn(1, 1, n, device="cuda", dtype=torch.float16, generator=g)
            norm_weight = 1 + 0.1 * torch.randn(n, device="cuda", dtype=torch.float16, generator=g)
            outs = {f: torch.empty(1, 1, n // 2 if "swiglu" in f else n, device="cuda", dtype=torch.float16)
                    for f in ("", *fusions)}
            scaled = torch.empty(1, 1, n, device="cuda", dtype=torch.float16)

            def extra(fusion):
                return {"add": [residual], "add_sq": [residual, norm_weight, NORM_SITE],
                        "rms": [NORM_SITE, NORM_EPS], "swiglu_rms": [NORM_SITE, NORM_EPS]}.get(fusion, [])

            def written(fusion):
                return [outs[fusion], scaled] if fusion == "add_sq" else [outs[fusion]]

            def call(fusion, weights):
                args = [x, *weights, *extra(fusion), *written(fusion)]
                with tvm_ffi.use_torch_stream():
                    tvm_ffi.get_global_func(functions.GEMV[bits, fusion])(
                        *[tvm_ffi.from_dlpack(a) if isinstance(a, torch.Tensor) else a for a in args])

            def in_graph_us(fusion):
                return per_call_in_graph(lambda: call(fusion, layers[0]),
                                         lambda: [call(fusion, weights) for weights in layers], IN_GRAPH_LAYERS)

            plain = in_graph_us("")
            for fusion in fusions:
                if fusion in ("rms", "swiglu_rms"):  # x stands for a pending norm's scaled row
                    _set_norm_site(bits, k, g)
                call(fusion, layers[0])
                torch.cuda.synchronize()
                wants = [np.zeros(tuple(t.shape), np.float16) for t in written(fusion)]
                cpu_args = [a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in extra(fusion)]
                cpu_functions.IMPLEMENTATIONS[functions.GEMV[bits, fusion]](
                    x.cpu().numpy(), *(t.cpu().numpy() for t in layers[0]), *cpu_args, *wants)
                # the largest relative error of what the call writes (add_sq: the sum and its scaled row)
                err = max(float(np.abs(t.float().cpu().numpy() - w.astype(np.float32)).max()
                                / (np.abs(w.astype(np.float32)).max() + 1e-6)) for t, w in zip(written(fusion), wants))
                fused = in_graph_us(fusion)
                row = {"name": f"{quant}-{shape}-{fusion}" + (f"-rows{rows}" if rows else ""), "quant": quant,
                       "shape": shape, "variant": f"{fusion}_in_graph", "fusion": fusion, "rows": rows, "n": n, "k": k,
                       "rel_error_vs_cpu": err,
                       "ok": err <= 4e-3, "plain_us": float(np.median(plain)) * 1e6,
                       "fused_us": float(np.median(fused)) * 1e6, "raw_plain_s": plain, "raw_fused_s": fused}
                print(f"{functions.GEMV[bits, fusion]:24s} {shape:8s} rows {rows} {row['fused_us']:7.1f} us per call in a graph "
                      f"(plain {row['plain_us']:.1f}); error against the CPU version {err:.1e}"
                      f"{'' if row['ok'] else ' NOT OK'}", flush=True)
                results.append(row)
        # the sites as a decode step leaves them (site 0 zero: a model's first o projection adds into it)
        _set_norm_site(bits, SHAPES["o"][0], g, site=1)
    return results


def dequant_results(quants: list[str], bandwidth: float) -> list[dict]:
    """`lab.dequant.q4` / `q8` (the prefill's dequantize before its cuBLAS GEMM) on SHAPES: checked
    bit for bit against engine.quantize.dequantize rounded to float16, timed over weight copies
    (> 4x L2); the bytes are the packed weight and scales read plus the float16 weight written."""
    import numpy as np
    import torch
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize_torch
    from runtime_patch import functions

    functions.register("cuda", list(functions.DEQUANT_BY_BITS.values()))
    results = []
    for quant in quants:
        spec = quant_spec(quant)
        library = tvm_ffi.get_global_func(functions.DEQUANT_BY_BITS[spec.bits])
        for shape, (n, k) in SHAPES.items():
            g = torch.Generator(device="cuda").manual_seed(1)
            packed, scale = quantize_torch(torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) * 0.02, spec)
            out = torch.empty(n, k, device="cuda", dtype=torch.float16)
            moved = packed.numel() * 4 + scale.numel() * 2 + out.numel() * 2
            params = weight_copies(packed, scale, moved)
            out_t = tvm_ffi.from_dlpack(out)
            library(*params[0], out_t)
            expected = dequantize(packed.cpu().numpy(), scale.cpu().numpy(), spec).astype(np.float16)
            exact = bool(np.array_equal(out.cpu().numpy(), expected))
            samples = per_call_seconds(lambda p: library(*p, out_t), params, warmup=5, calls=50)
            t = float(np.median(samples))
            r = {"name": f"{quant}-{shape}-dequant", "quant": quant, "shape": shape, "variant": "dequant", "n": n, "k": k,
                 "exact": exact, "ok": exact, "us": t * 1e6, "gb_s": moved / t / 1e9, "bandwidth_fraction": moved / t / bandwidth,
                 "raw_s": samples}
            print(f"{r['name']:28s} {r['us']:8.1f} us {r['gb_s']:7.0f} GB/s ({r['bandwidth_fraction']:.0%}) "
                  f"{'exact' if exact else 'NOT EXACT'}", flush=True)
            results.append(r)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--quants", default="q4f16_1,q8f16_1")
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--sha", default=None, help="git SHA of the code that built --dir")
    r.add_argument("--quants", default="q4f16_1,q8f16_1")
    r.add_argument("--rows", default="0", help="rows per warp of the library GEMVs to time, comma-separated: 0 (the "
                   "plugin's rule), 1, 2, 4 (lab.gemv.rows; a shape a kernel lacks falls back to the rule)")
    n = sub.add_parser("norm", help="only lab.norm.rms (NORM_CASES): checked and timed")
    n.add_argument("--out", type=Path, required=True)
    n.add_argument("--sha", default=None, help="git SHA of the code that built the plugin")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.quants.split(","))
    elif args.cmd == "norm":
        run_norm(args.out, args.sha)
    else:
        from runtime_patch import functions

        rows = args.rows.split(",")
        if not set(args.quants.split(",")) <= set(LIBRARY):
            ap.error(f"--quants {args.quants}: each must be one of {', '.join(LIBRARY)}")
        if not set(rows) <= {str(r) for r in functions.GEMV_ROWS_CHOICES}:
            ap.error(f"--rows {args.rows}: each must be 0 (the rule), 1, 2 or 4")
        run(args.dir, args.out, args.sha, args.quants.split(","), [int(r) for r in rows])


if __name__ == "__main__":
    main()
