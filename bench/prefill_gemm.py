"""The prefill's quantized GEMMs, `lab.gemm.q4` / `lab.gemm.q8`, per shape and row count, on both
of their paths, beside cuBLAS on the float16 weight (`lab.gemm.nt`, what a q0f16 prefill runs):

- `fused`: the tensor-core kernel that dequantizes the packed weight into its operand registers
  (runtime_patch/native/quant_gemm.cu);
- `dequant`: the dequantize pass into a float16 workspace, then cuBLAS;
- `auto`: what the model runs (fused up to the plugin's row limit, dequant above): reported as
  the plugin's own account of it (`lab.gemm.quant_plan`: the fused kernel's output tiles, and
  how many of them run with K split).

    python -m bench.prefill_gemm --out F.json [--sha SHA] [--quants q4f16_1,q8f16_1] [--rows 1,16,128,...]
    python -m bench.prefill_gemm --out F.json --section fusions [--fusion-rows 128,1024,4096]

Llama-3-8B's linears at tp=1 and tp=2 (the prefill's M x K activations against an N x K weight).
Each output is checked against float32 products of the same float16 dequantized weight
(relative error of the largest); each call is timed with CUDA events over weight copies of at
least 4x the L2 cache (every call reads its weight from HBM), median of 5 samples, TFLOP/s of
2 M N K. Run on a CUDA machine; writes one record (card, date, command, SHA, raw samples).

`--section fusions` (in the record's `fusions`; `all`, the default, runs both sections): what a
float16 prefill runs after its GEMMs, on Llama-3-8B's tp=1 shapes, each checked against PyTorch and
timed beside the path it replaced:
- `lab.swiglu` on gate_up [M, 2 x 14336]: against torch's float16 `silu(gate) * up` (the same
  roundings: at most one float16 ulp apart, from the last bit of expf); beside torch's silu and mul
  (TVM's fused split/silu/multiply kernel, which the model ran before, is not in this benchmark).
(The residual adds after the o and down projections come with the norms after them,
`lab.norm.add_rms`: checked and timed by `python -m bench.gemv norm`.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import engine  # noqa: F401  (prepares a runtime-only TVM before anything imports tvm)
from bench.gemv import L2_BYTES, per_call_seconds, weight_copies

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "tp2-qkv": (3072, 4096), "tp2-o": (4096, 2048), "tp2-gate_up": (14336, 4096), "tp2-down": (4096, 7168)}
ROWS = "1,16,64,128,200,256,512,1024,2048,4096"
TOLERANCE = 2e-3  # relative to the largest output: float32 sums in another order, one float16 rounding


def calls_per_sample(seconds_guess: float) -> int:
    """Enough calls that a sample lasts ~5 ms (at least 3)."""
    return max(3, min(200, int(5e-3 / max(seconds_guess, 1e-6))))


# Llama-3-8B's tp=1 fusion shape: gate_up's I
SWIGLU_WIDTH = 14336
FUSION_ROWS = "128,1024,4096"


def copies(make, moved_bytes: int) -> list:
    """`make()` called enough times that calls rotating over the results read each from HBM (at
    least 4x the L2 cache in all)."""
    return [make() for _ in range(max(1, -(-4 * L2_BYTES // moved_bytes)))]


def timing(call, params: list) -> dict:
    """Median and p95 microseconds per `call(p)` over `params` (CUDA events, warm-up first), and the samples."""
    from harness import stats

    guess = per_call_seconds(call, params, warmup=2, calls=3, samples=1)[0]
    samples = per_call_seconds(call, params, warmup=3, calls=calls_per_sample(guess), samples=11)
    t = stats.summarize(samples)
    return {"us": t["p50"] * 1e6, "p95_us": t["p95"] * 1e6, "raw_s": samples}


def run_fusions(rows: list[int]) -> list[dict]:
    """The fusions section (module doc): one result per function and row count."""
    import torch
    import tvm_ffi

    from runtime_patch import functions

    functions.register("cuda", [functions.SWIGLU])
    swiglu = tvm_ffi.get_global_func(functions.SWIGLU)
    results = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for m in rows:
        # lab.swiglu
        width = SWIGLU_WIDTH
        inputs = copies(lambda: torch.randn(m, 2 * width, device="cuda", dtype=torch.float16, generator=g) * 3,
                        m * width * 6)
        out = torch.empty(m, width, device="cuda", dtype=torch.float16)
        pairs = [(tvm_ffi.from_dlpack(x), x) for x in inputs]
        outt = tvm_ffi.from_dlpack(out)
        swiglu(pairs[0][0], outt)
        gate, up = inputs[0].chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        torch.cuda.synchronize()
        ulps = (out.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        row = {"function": "lab.swiglu", "m": m, "width": width, "max_ulps": int(ulps.max()),
               "ulps_differing": float((ulps > 0).float().mean()), "ok": bool(ulps.max() <= 1),
               "library": timing(lambda p: swiglu(p[0], outt), pairs),
               "torch_silu_mul": timing(lambda p: torch.mul(torch.nn.functional.silu(p[1][:, :width]),
                                                            p[1][:, width:]), pairs),
               "old_path_note": "torch's silu and mul stand in for TVM's fused split/silu/multiply kernel"}
        print(f"lab.swiglu      m={m:5d} I={width}: {row['library']['us']:8.1f} us "
              f"(p95 {row['library']['p95_us']:.1f}); torch silu*mul {row['torch_silu_mul']['us']:8.1f} us; max {row['max_ulps']} ulp"
              f"{'' if row['ok'] else '  WRONG'}", flush=True)
        results.append(row)
        del inputs, pairs
        torch.cuda.empty_cache()
    return results


def write_record(out: Path, sha: str | None, results: list[dict], fusions: list[dict]) -> None:
    import torch

    from harness.results import atomic_write_text

    atomic_write_text(out, json.dumps({
        "card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "git_sha": sha,
        "command": " ".join(["python", "-m", "bench.prefill_gemm", *sys.argv[1:]]), "tolerance": TOLERANCE,
        "all_ok": all(r[p]["ok"] for r in results for p in ("fused", "dequant", "fp16_cublas"))
        and all(r["ok"] for r in fusions), "results": results, "fusions": fusions}, indent=1))
    print(f"wrote {out}")


def run(quants: list[str], rows: list[int]) -> list[dict]:
    import numpy as np
    import torch
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize_torch
    from harness import stats
    from runtime_patch import functions

    functions.register("cuda", [functions.GEMM_NT, functions.QUANT_GEMM_PATH, functions.QUANT_GEMM_PLAN,
                                *functions.GEMM_BY_BITS.values()])
    set_path = tvm_ffi.get_global_func(functions.QUANT_GEMM_PATH)
    plan = tvm_ffi.get_global_func(functions.QUANT_GEMM_PLAN)
    gemm_nt = tvm_ffi.get_global_func(functions.GEMM_NT)
    results = []
    try:
        for quant in quants:
            spec = quant_spec(quant)
            gemm = tvm_ffi.get_global_func(functions.GEMM_BY_BITS[spec.bits])
            for shape, (n, k) in SHAPES.items():
                g = torch.Generator(device="cuda").manual_seed(0)
                packed, scale = quantize_torch(torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) * 0.02,
                                               spec)
                dense = torch.from_numpy(dequantize(packed.cpu().numpy(), scale.cpu().numpy(), spec)
                                         .astype(np.float16)).cuda()
                quantized_params = weight_copies(packed, scale, packed.numel() * 4 + scale.numel() * 2)
                dense_params = [[tvm_ffi.from_dlpack(dense.clone())]
                                for _ in range(max(1, -(-4 * L2_BYTES // (dense.numel() * 2))))]
                workspace = tvm_ffi.from_dlpack(torch.empty(n, k, device="cuda", dtype=torch.float16))
                for m in rows:
                    x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
                    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                    xt, yt = tvm_ffi.from_dlpack(x), tvm_ffi.from_dlpack(y)
                    want = x.float() @ dense.float().T
                    flop = 2.0 * m * n * k
                    row = {"name": f"{quant}-{shape}-m{m}", "quant": quant, "shape": shape, "m": m, "n": n, "k": k}
                    for path in ("fused", "dequant", "fp16_cublas"):
                        if path == "fp16_cublas":
                            def call(p):
                                gemm_nt(xt, p[0], yt)
                            params = dense_params
                        else:
                            set_path(path)
                            row[f"{path}_plan"] = str(plan(m, n, k, spec.bits))

                            def call(p):
                                gemm(xt, p[0], p[1], yt, workspace)
                            params = quantized_params
                        y.zero_()
                        call(params[0])
                        torch.cuda.synchronize()
                        err = float((y.float() - want).abs().max() / (want.abs().max() + 1e-6))
                        guess = per_call_seconds(call, params, warmup=2, calls=3, samples=1)[0]
                        samples = per_call_seconds(call, params, warmup=3, calls=calls_per_sample(guess))
                        t = stats.summarize(samples)
                        row[path] = {"us": t["p50"] * 1e6, "p95_us": t["p95"] * 1e6, "tflop_s": flop / t["p50"] / 1e12,
                                     "rel_error": err, "ok": err <= TOLERANCE, "raw_s": samples}
                    set_path("auto")
                    row["auto_path"] = str(plan(m, n, k, spec.bits))
                    print(f"{row['name']:26s} {row['fused_plan']:44s} {row['fused']['us']:9.1f} us ({row['fused']['tflop_s']:5.0f} TFLOP/s, "
                          f"err {row['fused']['rel_error']:.1e}) dequant+cuBLAS {row['dequant']['us']:9.1f} us "
                          f"fp16 cuBLAS {row['fp16_cublas']['us']:9.1f} us; auto: {row['auto_path']}"
                          f"{'' if row['fused']['ok'] and row['dequant']['ok'] else '  WRONG'}", flush=True)
                    results.append(row)
                del quantized_params, dense_params
                torch.cuda.empty_cache()
    finally:
        set_path("auto")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sha", default=None, help="git SHA of the code")
    ap.add_argument("--quants", default="q4f16_1,q8f16_1")
    ap.add_argument("--rows", default=ROWS, help="comma list of row counts M (prompt tokens) of the quant section")
    ap.add_argument("--section", choices=("quant", "fusions", "all"), default="all",
                    help="the quantized GEMMs, the fusion after the float16 gate_up GEMM (lab.swiglu), "
                    "or both")
    ap.add_argument("--fusion-rows", default=FUSION_ROWS, help="comma list of row counts M of the fusions section")
    args = ap.parse_args()

    def row_counts(text: str, flag: str) -> list[int]:
        try:
            counts = [int(r) for r in text.split(",")]
        except ValueError:
            ap.error(f"{flag}: {text!r} is not a comma list of integers")
        if any(r < 1 for r in counts):
            ap.error(f"{flag}: row counts must be at least 1")
        return counts

    rows, fusion_rows = row_counts(args.rows, "--rows"), row_counts(args.fusion_rows, "--fusion-rows")
    unknown = set(args.quants.split(",")) - {"q4f16_1", "q8f16_1"}
    if unknown:
        ap.error(f"--quants: {', '.join(sorted(unknown))} is not one of q4f16_1, q8f16_1")
    results = run(args.quants.split(","), rows) if args.section in ("quant", "all") else []
    fusions = run_fusions(fusion_rows) if args.section in ("fusions", "all") else []
    write_record(args.out, args.sha, results, fusions)


if __name__ == "__main__":
    main()
