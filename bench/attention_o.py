"""A decode layer's attention and the o projection after it, on one GPU, in CUDA graphs as the
model runs them: what overlapping the two buys (the attention lets the GEMV start while it runs:
lab::AllowNext and the early GEMV, `lab.gemv.<q>_add_early`, launched by LaunchAfterPrevious;
runtime_patch/native/cuda_common.h).

    python -m bench.attention_o --out F.json [--contexts 256,1024] [--quants q8f16_1]

Llama-3-8B's shapes at tp=1 (32 query / 8 KV heads of 128, o 4096 x 4096), batch 1, RoPE in the
attention. Per quantization (q4f16_1, q8f16_1) and context, graphs of 32 layers: each layer's
`lab.kv.decode_attention_rope` (its own cache layer) then the o projection's GEMV with the
residual add on its own o weight (32 distinct weights: nothing stays in L2 from one replay to the
next), early (`_add_early`, as the model calls it) and plain (`_add`); beside them graphs of the
attention alone and of each GEMV alone. Timed per layer (CUDA events around replays, after
warm-up). Each pair's output is checked against a PyTorch float32 reference of the GEMV on the
attention's output (the attention itself: bench.static_kv); the process exits 1 where it differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import engine  # noqa: F401  (prepares a runtime-only TVM before anything imports tvm)

from . import attention as attention_bench
from .records import write_checked_record

LAYERS = 32
Q_HEADS, KV_HEADS, D, HIDDEN = 32, 8, 128, 4096
ROPE = (500000.0, 0.0, 0.0, 0.0, 0.0)  # Llama-3-8B's (engine.model.static_kv.rope_arguments)
QUANTS = ("q4f16_1", "q8f16_1")


def run_case(quant: str, context: int) -> dict:
    import torch
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize_torch
    from runtime_patch import functions

    spec = quant_spec(quant)
    names = [functions.KV_DECODE_ATTENTION_ROPE, functions.GEMV_EARLY[spec.bits, "add"], functions.GEMV[spec.bits, "add"]]
    functions.register("cuda", names)
    attend, early_gemv, plain_gemv = (tvm_ffi.get_global_func(n) for n in names)
    g = torch.Generator(device="cuda").manual_seed(context)
    max_len = context + 16
    weights = [quantize_torch(torch.randn(HIDDEN, Q_HEADS * D, device="cuda", dtype=torch.float16, generator=g) * 0.02,
                              spec) for _ in range(LAYERS)]
    cache = torch.randn(LAYERS, 2, 1, KV_HEADS, max_len, D, device="cuda", dtype=torch.float16, generator=g)
    qkv = torch.randn(1, Q_HEADS + 2 * KV_HEADS, D, device="cuda", dtype=torch.float16, generator=g)
    positions = torch.full((1,), context - 1, device="cuda", dtype=torch.int32)
    attn = torch.empty(1, Q_HEADS, D, device="cuda", dtype=torch.float16)
    residual = torch.randn(1, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    out = torch.empty(1, HIDDEN, device="cuda", dtype=torch.float16)
    wrap = tvm_ffi.from_dlpack

    def attention(layer: int) -> None:
        attend(wrap(qkv), wrap(cache), layer, wrap(positions), *ROPE, D**-0.5, 0, wrap(attn))

    def projection(layer: int, gemv=early_gemv) -> None:
        gemv(wrap(attn.view(1, Q_HEADS * D)), *(wrap(t) for t in weights[layer]), wrap(residual), wrap(out))

    def plain_projection(layer: int) -> None:
        projection(layer, plain_gemv)

    def graph_of(*steps):
        stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
            for step in steps:
                step(0)  # buffers made outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                for layer in range(LAYERS):
                    for step in steps:
                        step(layer)
        torch.cuda.synchronize()
        return graph

    graphs = {"pair": graph_of(attention, projection), "pair_plain": graph_of(attention, plain_projection),
              "attention": graph_of(attention), "gemv": graph_of(projection), "gemv_plain": graph_of(plain_projection)}
    last = torch.from_numpy(dequantize(*(t.cpu().numpy() for t in weights[-1]), spec)).float().cuda()
    errors = []
    for name in ("pair", "pair_plain"):
        out.zero_()
        graphs[name].replay()  # the cache's token row is rewritten alike at every replay
        torch.cuda.synchronize()
        want = residual.float() + attn.view(1, -1).float() @ last.T
        errors.append(float((out.float() - want).abs().max() / want.abs().max()))
    row = {"quant": quant, "context": context, "rel_errors_vs_float32": errors, "ok": max(errors) < 2e-3}
    for name, graph in graphs.items():
        row[f"{name}_s"] = [t / LAYERS for t in attention_bench.timed(graph.replay, warmup=5, repeats=30)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", default="256,1024", help="keys in the cache, comma separated")
    ap.add_argument("--quants", default=",".join(QUANTS), help=f"comma separated, of {', '.join(QUANTS)}")
    args = ap.parse_args()
    quants = args.quants.split(",")
    if not quants or any(q not in QUANTS for q in quants):
        ap.error(f"--quants {args.quants}: choose from {', '.join(QUANTS)}")
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        ap.error("--contexts takes comma-separated integers, e.g. --contexts 256,1024")
    if min(contexts) < 1:
        ap.error("contexts of at least 1 key")
    from harness import stats

    results = []
    for quant in quants:
        for context in contexts:
            r = run_case(quant, context)
            for key in [k for k in r if k.endswith("_s")]:
                r[key + "_summary"] = stats.summarize(r[key])
            us = {k: r[f"{k}_s_summary"]["p50"] * 1e6 for k in ("pair", "pair_plain", "attention", "gemv", "gemv_plain")}
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {quant} context {context:5d}: attention + o {us['pair']:6.2f} us a "
                  f"layer early, {us['pair_plain']:6.2f} plain (attention alone {us['attention']:5.2f}, o GEMV alone "
                  f"{us['gemv']:5.2f} early, {us['gemv_plain']:5.2f} plain); error {max(r['rel_errors_vs_float32']):.1e}",
                  flush=True)
            results.append(r)
    ok = write_checked_record(args.out, "attention_o", results)
    print(f"wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
