"""The library attention functions (runtime_patch/attention) on one GPU: checked against a
float32 PyTorch reference, timed beside PyTorch's fused attention (SDPA).

    python -m bench.attention --out F.json [--sha SHA]

Shapes: Llama-3-8B's heads at tp=1 (32 query / 8 KV heads of 128) and tp=2 (16 / 4).
`lab.attention.prefill_ragged`: one sequence of 128, 1024 and 4096 tokens (causal
self-attention: what a first prefill does), and a ragged batch of three sequences whose queries
are the last tokens of longer key ranges (what a chunked prefill with a prefix does); each of its
paths in the same process (`lab.attention.prefill_path`: the fused flash kernel — its warpgroup-MMA
version on sm_90 at head dim 128 —, the same on mma.sync only, and the cuBLAS + softmax one it
replaced), beside PyTorch's SDPA. Also head dims 64 and 32 (the fused kernel's other instances; the
tiny test model's heads are 32 wide), a non-causal case, and odd GQA groups (MHA, 3) at head dim
128, checked and timed.
`lab.attention.decode_paged`: batch 1 and 16 at contexts of 1024 and 4096 tokens, over pages of
16 tokens in shuffled order. Output and the base-2 log-sum-exp are compared; each case is timed
with CUDA events (median and p95 of repeated calls, after warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import engine  # noqa: F401  (prepares a runtime-only TVM before anything imports tvm)

HEADS = {"tp1": (32, 8), "tp2": (16, 4)}
HEAD_DIM = 128
# (name, [(query tokens, key tokens)] per sequence)
CASES = [("n128", [(128, 128)]), ("n1024", [(1024, 1024)]), ("n4096", [(4096, 4096)]),
         ("ragged3", [(300, 700), (17, 17), (512, 1536)])]
# (head dim, causal, name, sequences, (query heads, KV heads)): the fused kernel's other instances,
# the full mask, and for the warpgroup kernel (head dim 128 on sm_90) row counts off its 64-row
# tiles and odd GQA groups (MHA, 3), which it runs as 128 rows of one head instead of two heads
OTHER_CASES = [(64, True, "n1000-d64", [(1000, 1000)], (32, 8)),
               (32, True, "ragged2-d32", [(77, 300), (200, 200)], (32, 8)),
               (128, False, "full-n500", [(500, 700)], (32, 8)),
               (128, True, "ragged2-mha", [(1000, 1000), (77, 300)], (8, 8)),
               (128, True, "ragged2-g3", [(999, 999), (130, 200)], (12, 4))]


def reference(q, k, v, seqs, sm_scale, causal: bool = True):
    """float32 (causal) attention per sequence; returns (out [n, Hq, d], lse2 [n, Hq])."""
    import torch

    group = q.shape[1] // k.shape[1]
    outs, lses, qo, ko = [], [], 0, 0
    for n, m in seqs:
        qs = q[qo:qo + n].float().transpose(0, 1)                                 # [Hq, n, d]
        ks = k[ko:ko + m].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, m, d]
        vs = v[ko:ko + m].float().repeat_interleave(group, dim=1).transpose(0, 1)
        s = qs @ ks.transpose(1, 2) * sm_scale
        mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        if causal:
            s = s.masked_fill(~mask, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
        lses.append((torch.logsumexp(s, -1) / math.log(2)).transpose(0, 1))
        qo, ko = qo + n, ko + m
    return torch.cat(outs), torch.cat(lses)


def sdpa(q, k, v, seqs, causal: bool = True):
    """PyTorch's fused attention on the same sequences (its flash kernel where it applies)."""
    import torch.nn.functional as F

    group, qo, ko = q.shape[1] // k.shape[1], 0, 0
    for n, m in seqs:
        qs = q[qo:qo + n].transpose(0, 1)[None]
        ks = k[ko:ko + m].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        vs = v[ko:ko + m].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        # is_causal aligns the mask to the top left; a prefix (m > n) needs it at the bottom right
        if not causal:
            F.scaled_dot_product_attention(qs, ks, vs)
        elif n == m:
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            import torch

            mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
            F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        qo, ko = qo + n, ko + m


DECODE_CASES = [("b1-ctx1024", 1, 1024), ("b1-ctx4096", 1, 4096), ("b16-ctx1024", 16, 1024), ("b16-ctx4096", 16, 4096)]
PAGE = 16


def decode_case(fn, hq: int, hkv: int, batch: int, context: int, sm_scale: float) -> dict:
    """Random pages in shuffled order; sequence b has context - 7 * b tokens (ragged last pages)."""
    import numpy as np
    import torch
    import tvm_ffi

    g = torch.Generator(device="cuda").manual_seed(1)
    lengths = [context - 7 * b for b in range(batch)]
    counts = [-(-n // PAGE) for n in lengths]
    order = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(2)).to(torch.int32)
    pages = torch.randn(sum(counts), 2, hkv, PAGE, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    q = torch.randn(batch, hq, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    indptr = torch.tensor(np.cumsum([0] + counts), dtype=torch.int32, device="cuda")
    values = order.cuda()
    last = torch.tensor([n - (c - 1) * PAGE for n, c in zip(lengths, counts)], dtype=torch.int32, device="cuda")
    zeros = torch.zeros(batch, dtype=torch.int32, device="cuda")
    o = torch.empty_like(q)
    lse = torch.empty(batch, hq, device="cuda", dtype=torch.float32)
    args = [tvm_ffi.from_dlpack(t) for t in (q, pages, indptr, values, last, zeros, zeros, o, lse)]

    def call():
        fn(*args, 0, 1.0, 500000.0, sm_scale)

    call()
    torch.cuda.synchronize()
    want_o, want_lse, ks, vs = [], [], [], []
    for b, n in enumerate(lengths):
        own = values[indptr[b]:indptr[b + 1]].long()
        kv = pages[own].permute(1, 0, 3, 2, 4).reshape(2, -1, hkv, HEAD_DIM)[:, :n]  # [2, n, Hkv, d]
        out, l2 = reference(q[b:b + 1], kv[0], kv[1], [(1, n)], sm_scale)
        want_o.append(out)
        want_lse.append(l2)
        ks.append(kv[0])
        vs.append(kv[1])
    want_o, want_lse = torch.cat(want_o), torch.cat(want_lse)
    lib = timed(call)
    group = hq // hkv
    dense_k = [k.repeat_interleave(group, dim=1).transpose(0, 1)[None] for k in ks]
    dense_v = [v.repeat_interleave(group, dim=1).transpose(0, 1)[None] for v in vs]

    def peer():
        import torch.nn.functional as F

        for b in range(batch):
            F.scaled_dot_product_attention(q[b:b + 1].transpose(0, 1)[None], dense_k[b], dense_v[b])

    peer_s = timed(peer)
    kv_bytes = sum(lengths) * hkv * HEAD_DIM * 2 * 2
    return {"out_rel_error": float((o.float() - want_o).abs().max() / want_o.abs().max()),
            "lse_abs_error": float((lse - want_lse).abs().max()), "library_s": lib, "sdpa_s": peer_s,
            "kv_bytes": kv_bytes}


def prefill_case(fn, set_path, heads_name: str, hq: int, hkv: int, d: int, causal: bool, case: str, seqs) -> dict:
    """`lab.attention.prefill_ragged` on random sequences, each path checked against the float32
    reference and timed, and SDPA timed on the same tensors."""
    import numpy as np
    import torch
    import tvm_ffi

    from harness import stats
    from runtime_patch import functions

    sm_scale = 1 / math.sqrt(d)
    g = torch.Generator(device="cuda").manual_seed(0)
    n_total, m_total = sum(n for n, _ in seqs), sum(m for _, m in seqs)
    q = torch.randn(n_total, hq, d, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(m_total, hkv, d, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(m_total, hkv, d, device="cuda", dtype=torch.float16, generator=g)
    qo = torch.tensor(np.cumsum([0] + [n for n, _ in seqs]), dtype=torch.int32, device="cuda")
    ko = torch.tensor(np.cumsum([0] + [m for _, m in seqs]), dtype=torch.int32, device="cuda")
    pos = torch.zeros(n_total, dtype=torch.int32, device="cuda")
    offset = torch.zeros(len(seqs), dtype=torch.int32, device="cuda")
    want_o, want_lse = reference(q, k, v, seqs, sm_scale, causal)
    r = {"function": functions.PREFILL_RAGGED, "heads": heads_name, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
         "causal": causal, "case": case, "seqs": seqs}
    line = f"{heads_name} {case:12s}"
    for path in functions.PREFILL_PATHS:
        o = torch.full_like(q, float("nan"))
        lse = torch.full((n_total, hq), float("nan"), device="cuda", dtype=torch.float32)
        args = [tvm_ffi.from_dlpack(t) for t in (q, qo, k, v, ko, pos, offset, o, lse)]

        def call():
            fn(*args, int(causal), 0, 1.0, 500000.0, sm_scale)

        set_path(path)
        call()
        torch.cuda.synchronize()
        samples = timed(call)
        r[path] = {"out_rel_error": float((o.float() - want_o).abs().max() / want_o.abs().max()),
                   "lse_abs_error": float((lse - want_lse).abs().max()), "seconds": stats.summarize(samples),
                   "raw_seconds": samples}
        line += (f" {path} {r[path]['seconds']['p50'] * 1e6:8.1f} us (err {r[path]['out_rel_error']:.1e}, "
                 f"lse {r[path]['lse_abs_error']:.1e})")
    set_path(functions.PREFILL_PATHS[0])
    peer = timed(lambda: sdpa(q, k, v, seqs, causal))
    # QK^T and PV over the (query, key) pairs the mask keeps
    pairs = sum(n * m - (n * (n - 1) // 2 if causal else 0) for n, m in seqs)
    r.update(sdpa_s=stats.summarize(peer), raw_sdpa_s=peer, flops=4 * pairs * d * hq)
    for path in functions.PREFILL_PATHS:
        r[path]["tflops"] = r["flops"] / r[path]["seconds"]["p50"] / 1e12
    print(f"{line}, SDPA {r['sdpa_s']['p50'] * 1e6:8.1f} us; fused {r['fused']['tflops']:.0f} TFLOP/s", flush=True)
    return r


def timed(fn, warmup: int = 3, repeats: int = 20) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


def run(out: Path, sha: str | None) -> None:
    import numpy as np
    import torch
    import tvm_ffi

    from harness import stats
    from harness.results import atomic_write_text
    from runtime_patch import functions

    functions.register("cuda", [functions.PREFILL_RAGGED, functions.DECODE_PAGED, functions.PREFILL_PATH])
    fn = tvm_ffi.get_global_func(functions.PREFILL_RAGGED)
    decode_fn = tvm_ffi.get_global_func(functions.DECODE_PAGED)
    set_path = tvm_ffi.get_global_func(functions.PREFILL_PATH)
    sm_scale = 1 / math.sqrt(HEAD_DIM)
    results = []
    for d, causal, case, seqs, (hq, hkv) in OTHER_CASES:
        results.append(prefill_case(fn, set_path, f"{hq}/{hkv}", hq, hkv, d, causal, case, seqs))
    for heads_name, (hq, hkv) in HEADS.items():
        for case, seqs in CASES:
            results.append(prefill_case(fn, set_path, heads_name, hq, hkv, HEAD_DIM, True, case, seqs))
        for case, batch, context in DECODE_CASES:
            d = decode_case(decode_fn, hq, hkv, batch, context, sm_scale)
            raw_lib, raw_peer = d.pop("library_s"), d.pop("sdpa_s")
            lib, peer = stats.summarize(raw_lib), stats.summarize(raw_peer)
            r = {"function": functions.DECODE_PAGED, "heads": heads_name, "q_heads": hq, "kv_heads": hkv,
                 "head_dim": HEAD_DIM, "case": case, **d, "library_s": lib, "sdpa_s": peer,
                 "library_gb_s": d["kv_bytes"] / lib["p50"] / 1e9, "raw_library_s": raw_lib, "raw_sdpa_s": raw_peer}
            print(f"{heads_name} decode {case:12s} library {lib['p50'] * 1e6:8.1f} us (p95 {lib['p95'] * 1e6:.1f}, "
                  f"{r['library_gb_s']:.0f} GB/s of KV), SDPA per sequence {peer['p50'] * 1e6:8.1f} us; "
                  f"out err {d['out_rel_error']:.1e}, lse err {d['lse_abs_error']:.1e}", flush=True)
            results.append(r)
    atomic_write_text(out, json.dumps({
        "card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "git_sha": sha,
        "command": " ".join(["python", "-m", "bench.attention", *sys.argv[1:]]),
        "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sha", default=None, help="git SHA of the code")
    args = ap.parse_args()
    run(args.out, args.sha)


if __name__ == "__main__":
    main()
