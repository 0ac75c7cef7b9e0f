"""The static KV cache's CUDA functions (runtime_patch/native/cuda_attention.cu, `lab.kv.*`) on one
GPU: checked against a float32 PyTorch reference, then timed beside PyTorch's SDPA.

    python -m bench.static_kv --out F.json
    python -m bench.static_kv --out F.json --profile 256   # one decode case, for ncu / nsys

Shapes: Llama-3-8B's heads at tp=1 (32 query / 8 KV heads of 128) and tp=2 (16 / 4); the decode
also at Llama-3.2-1B's (32 / 8 of 64).
- `lab.kv.prefill_attention`: a chunk of 128 tokens at positions 0.. and a chunk at 512.. of a
  slot (the rows are written into the cache, then causal attention over 0..start+n).
- `lab.kv.prefill_attention_rope` (the prefill the model runs: q and k of a fused qkv rotated by
  the function, the rotated keys and the values written, then the attention) against a float32
  reference (RoPE with transformers' Llama-3 frequencies, then causal attention): chunks at 0 and
  past 0 (and a whole 4096-token prompt at tp=1), with and without Llama-3 scaling, on the fused
  and the unfused attention (`lab.attention.prefill_path`), and with an out of the chunk's last
  rows only (1 of a 4096-token prompt: the model's last layer in a prefill; 1 of 128, 5 of 77);
  the rows written (rotated keys within
  float16 rounding, values exact, every other row untouched). Timed beside what the model ran
  before it, TVM's RoPE kernel then `lab.kv.prefill_attention`: TVM is not in this benchmark, so
  that RoPE is PyTorch's equivalent (elementwise ops on the same float16 qkv; `old_path_s`).
- `lab.kv.decode_attention_rope` (the decode the model runs: q and k of a fused qkv rotated in the
  kernel) on both paths (clusters and split), with and without Llama-3 RoPE scaling, against the
  reference on q and k rotated by runtime_patch.cpu_functions.rope_rotated; and at batch 1 and
  contexts 1-2000 per thread-block cluster size (`lab.kv.decode_cluster`: the rule, none, 2, 4, 8),
  and the rule's clusters on the SIMT kernel beside the tensor-core one (`lab.kv.decode_tensor_cores`).
- `lab.kv.decode_attention`: batch 1 and 16, each slot at its own position (contexts 1..max_len),
  for max_len 256 and 4096, and batch 1 at each of CONTEXTS (64..4096 keys) in a cache of
  that many keys (the clusters' path up to 2048 on sm_90) and two in a cache of 4112 (the split
  path); called directly, then captured in a CUDA graph and replayed with the
  positions advancing between replays (the graph must follow the lengths it reads on the device and
  reset its arrival counters), every replay checked.
- `lab.kv.argmax` against torch.argmax (one part and many, ties, a row of -inf, in a replayed graph),
  timed beside it.
- `lab.kv.advance`, `lab.kv.settle_prefill`, `lab.kv.set_ids`.
Outputs are compared by max |out - ref| / max |ref|; a case passes below 2e-3 (fp16 inputs, fp32
accumulation). The process exits 1 if any case fails.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import engine  # noqa: F401  (prepares a runtime-only TVM before anything imports tvm)

from . import attention as attention_bench
from .records import write_checked_record

HEADS = {"tp1": (32, 8), "tp2": (16, 4)}
D, LAYERS, LAYER = 128, 2, 1
TOLERANCE = 2e-3
CONTEXTS = (64, 128, 200, 256, 300, 512, 1024, 2048, 4096)
CALLS = 32  # decode calls per timed graph (Llama-3-8B's layers)
# lab.kv.decode_attention_rope's RoPE arguments (engine.model.static_kv.rope_arguments): Llama-3-8B's,
# and Llama-3.1's scaled one
ROPES = ((500000.0, 0.0, 0.0, 0.0, 0.0), (500000.0, 8.0, 1.0, 4.0, 8192.0))
CLUSTERS = (0, 1, 2, 4, 8)  # lab.kv.decode_cluster sizes timed at batch 1 (0: the rule)


def attention(q, keys, values, causal_shift: int | None):
    """q [n, Hq, d], keys/values [m, Hkv, d] -> [n, Hq, d] in float32; query i sees keys
    j <= i + causal_shift (None: all)."""
    import torch

    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q.float(), k) / math.sqrt(q.shape[-1])
    if causal_shift is not None:
        n, m = q.shape[0], keys.shape[0]
        mask = torch.arange(m, device=q.device)[None, :] > (torch.arange(n, device=q.device)[:, None] + causal_shift)
        s = s.masked_fill(mask, float("-inf"))
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v)


def rel_error(out, ref) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def timed(fn) -> list[float]:
    """Seconds per call of `fn` on the GPU (bench.attention's timer: CUDA events, after warm-up)."""
    return attention_bench.timed(fn, warmup=5, repeats=50)


class Functions:
    def __init__(self):
        import tvm_ffi

        from runtime_patch import functions

        names = [functions.KV_PREFILL_ATTENTION, functions.KV_DECODE_ATTENTION, functions.KV_DECODE_ATTENTION_ROPE,
                 functions.KV_ADVANCE, functions.KV_SETTLE_PREFILL, functions.KV_SET_IDS, functions.KV_DECODE_CLUSTER,
                 functions.KV_ARGMAX, functions.KV_DECODE_TENSOR_CORES, functions.KV_PREFILL_ATTENTION_ROPE,
                 functions.PREFILL_PATH]
        functions.register("cuda", names)
        self.tvm_ffi = tvm_ffi
        (self.prefill, self.decode, self.decode_rope, self.advance, self.settle, self.set_ids, self.cluster,
         self.argmax, self.tensor_cores, self.prefill_rope, self.prefill_path) = (tvm_ffi.get_global_func(n)
                                                                                  for n in names)

    def __call__(self, fn, *args):
        wrapped = [self.tvm_ffi.from_dlpack(a) if hasattr(a, "data_ptr") else a for a in args]
        with self.tvm_ffi.use_torch_stream():
            fn(*wrapped)


def check_prefill(f: Functions, hq: int, hkv: int, start: int, n: int, max_len: int) -> dict:
    import torch

    g = torch.Generator(device="cuda").manual_seed(start + n)
    cache = torch.randn(LAYERS, 2, 2, hkv, max_len, D, device="cuda", dtype=torch.float16, generator=g)
    q = torch.randn(n, hq, D, device="cuda", dtype=torch.float16, generator=g)
    k, v = (torch.randn(n, hkv, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    slot = 1
    f(f.prefill, q, k, v, cache, LAYER, slot, start, 1 / math.sqrt(D), out)
    torch.cuda.synchronize()
    written = bool(torch.equal(cache[LAYER, 0, slot, :, start:start + n].transpose(0, 1), k)
                   and torch.equal(cache[LAYER, 1, slot, :, start:start + n].transpose(0, 1), v))
    keys = cache[LAYER, 0, slot, :, :start + n].transpose(0, 1)
    values = cache[LAYER, 1, slot, :, :start + n].transpose(0, 1)
    err = rel_error(out, attention(q, keys, values, start))
    lib = timed(lambda: f(f.prefill, q, k, v, cache, LAYER, slot, start, 1 / math.sqrt(D), out))
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1).repeat_interleave(hq // hkv, 0)[None],
        values.transpose(0, 1).repeat_interleave(hq // hkv, 0)[None], is_causal=start == 0))
    return {"function": "lab.kv.prefill_attention", "q_heads": hq, "kv_heads": hkv, "start": start, "tokens": n,
            "max_len": max_len, "rel_error": err, "rows_written": written,
            "ok": written and err < TOLERANCE, "library_s": lib, "sdpa_s": sdpa}


def rope_reference(x, positions, rope):
    """x [n, H, d] (float16 on the GPU) rotated at `positions` in float32: frequencies and angles in
    float64 (transformers' Llama-3 scaling where rope's factor is not 0: (1 - s) f / factor + s f,
    s = clamp((original_max f / 2 pi - low) / (high - low), 0, 1)), x cos + rotate_half(x) sin in
    float32, not rounded."""
    import torch

    theta, factor, low, high, original_max = rope
    d = x.shape[-1]
    f = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    if factor:
        smooth = ((original_max * f / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
        f = (1 - smooth) * f / factor + smooth * f
    angle = positions.to(torch.float64)[:, None, None] * f  # [n, 1, d / 2]
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def torch_rope(x, cos, sin):
    """TVM's llama_rope_with_position_map's work in PyTorch ops on float16 x [n, H, d] with float32
    cos, sin [n, 1, d / 2] (the old path's RoPE kernel, for the timing only: TVM is not here)."""
    import torch

    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).half()


def check_prefill_rope(f: Functions, hq: int, hkv: int, start: int, n: int, max_len: int, rope: tuple,
                       path: str = "fused", rows: int | None = None) -> dict:
    """lab.kv.prefill_attention_rope on a chunk of n tokens at `start` of a slot, the attention on
    `path` (lab.attention.prefill_path); with `rows`, an out of that many rows: the attention of the
    chunk's last rows only (what the model's last layer asks in a prefill), the old path not timed."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(start + n + int(rope[1]))
    cache = torch.randn(LAYERS, 2, 2, hkv, max_len, D, device="cuda", dtype=torch.float16, generator=g)
    before = cache.clone()
    qkv = torch.randn(n, hq + 2 * hkv, D, device="cuda", dtype=torch.float16, generator=g)
    rows = n if rows is None else rows
    out = torch.full((rows, hq, D), float("nan"), device="cuda", dtype=torch.float16)
    slot, scale = 1, 1 / math.sqrt(D)
    positions = torch.arange(start, start + n, device="cuda")
    previous = f.prefill_path(path)
    try:
        f(f.prefill_rope, qkv, cache, LAYER, slot, start, *rope, scale, out)
        torch.cuda.synchronize()
        q, k = rope_reference(qkv[:, :hq], positions, rope), rope_reference(qkv[:, hq:hq + hkv], positions, rope)
        v = qkv[:, hq + hkv:]
        k_written = cache[LAYER, 0, slot, :, start:start + n].transpose(0, 1)
        k_err = float((k_written.float() - k).abs().max())
        v_ok = torch.equal(cache[LAYER, 1, slot, :, start:start + n].transpose(0, 1), v)
        others = before.clone()
        others[LAYER, :, slot, :, start:start + n] = cache[LAYER, :, slot, :, start:start + n]
        untouched = torch.equal(others, cache)
        keys = torch.cat([before[LAYER, 0, slot, :, :start].transpose(0, 1).float(), k])
        values = torch.cat([before[LAYER, 1, slot, :, :start].transpose(0, 1).float(), v.float()])
        err = rel_error(out, attention(q[n - rows:], keys, values, start + n - rows))
        lib = timed(lambda: f(f.prefill_rope, qkv, cache, LAYER, slot, start, *rope, scale, out))
        if rows < n:
            written = k_err <= 1.5e-2 and v_ok and untouched
            return {"function": "lab.kv.prefill_attention_rope", "q_heads": hq, "kv_heads": hkv, "start": start,
                    "tokens": n, "rows": rows, "max_len": max_len, "rope": list(rope), "path": path, "rel_error": err,
                    "k_abs_error": k_err, "rows_written": bool(written), "ok": bool(written and err < TOLERANCE),
                    "library_s": lib}
        # the old path: a RoPE kernel (PyTorch's ops standing in for TVM's), then lab.kv.prefill_attention
        cos, sin = (torch.rand(n, 1, D // 2, device="cuda", generator=g) for _ in range(2))  # values do not matter
        q16, k16 = q.half(), k.half()
        v16 = v.contiguous()

        def old():
            q_rot, k_rot = torch_rope(qkv[:, :hq], cos, sin), torch_rope(qkv[:, hq:hq + hkv], cos, sin)
            f(f.prefill, q_rot, k_rot, v16, cache, LAYER, slot, start, scale, out)

        old_s = timed(old)
        rope_only_s = timed(lambda: (torch_rope(qkv[:, :hq], cos, sin), torch_rope(qkv[:, hq:hq + hkv], cos, sin)))
        attention_only_s = timed(lambda: f(f.prefill, q16, k16, v16, cache, LAYER, slot, start, scale, out))
    finally:
        f.prefill_path(previous)
    # a rotated key: float16 rounding of a float32 value up to ~5 (an ulp of 0.004), and float32 angles
    written = k_err <= 1.5e-2 and v_ok and untouched
    return {"function": "lab.kv.prefill_attention_rope", "q_heads": hq, "kv_heads": hkv, "start": start, "tokens": n,
            "max_len": max_len, "rope": list(rope), "path": path, "rel_error": err, "k_abs_error": k_err,
            "rows_written": bool(written), "ok": bool(written and err < TOLERANCE), "library_s": lib,
            "old_path_s": old_s,
            "old_path_note": "PyTorch's RoPE ops (for TVM's RoPE kernel) + lab.kv.prefill_attention",
            "torch_rope_s": rope_only_s, "prefill_attention_s": attention_only_s}


def decode_reference(q, k_new, v_new, cache, positions):
    """What one decode step must give: each slot's token written at its position, attention over
    0..position."""
    outs = []
    for b, p in enumerate(positions.tolist()):
        keys = cache[LAYER, 0, b, :, :p + 1].transpose(0, 1).clone()
        values = cache[LAYER, 1, b, :, :p + 1].transpose(0, 1).clone()
        keys[p], values[p] = k_new[b], v_new[b]
        outs.append(attention(q[b:b + 1], keys, values, None))
    return __import__("torch").cat(outs)


def rotated(x, positions, rope):
    """x [b, H, d] on the GPU rotated at each slot's position as lab.kv.decode_attention_rope must
    (runtime_patch.cpu_functions.rope_rotated, which the CPU tests hold to TVM's RoPE)."""
    import torch

    from runtime_patch.cpu_functions import rope_rotated

    host = x.cpu().numpy()
    return torch.stack([torch.from_numpy(rope_rotated(host[b], p, *rope)) for b, p in enumerate(positions.tolist())]).cuda()


def check_decode(f: Functions, hq: int, hkv: int, batch: int, max_len: int, replays: int = 8,
                 context: int | None = None, rope: tuple | None = None, cluster: int = 0,
                 tensor_cores: bool = True, d: int = D) -> dict:
    """Slots at positions spread over 0..max_len (or every slot at `context` keys). With `rope`
    (engine.model.static_kv.rope_arguments), lab.kv.decode_attention_rope on a fused qkv; `cluster`:
    lab.kv.decode_cluster's size for the call (0: the rule); `tensor_cores`:
    lab.kv.decode_tensor_cores' choice of cluster kernel (off: the SIMT one); `d`: head_dim."""
    previous, previous_kernel = f.cluster(cluster), f.tensor_cores(int(tensor_cores))
    try:
        return {**_check_decode(f, hq, hkv, batch, max_len, replays, context, rope, d), "cluster": cluster,
                "cluster_kernel": "tensor cores" if tensor_cores else "simt"}
    finally:
        f.cluster(previous)
        f.tensor_cores(previous_kernel)


def _check_decode(f: Functions, hq: int, hkv: int, batch: int, max_len: int, replays: int,
                  context: int | None, rope: tuple | None, d: int) -> dict:
    import torch

    g = torch.Generator(device="cuda").manual_seed(batch * 7 + max_len)
    cache = torch.randn(LAYERS, 2, batch, hkv, max_len, d, device="cuda", dtype=torch.float16, generator=g)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.float16, generator=g)
    k, v = (torch.randn(batch, hkv, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(2))
    qkv = torch.cat([q, k, v], dim=1)
    # slots at different positions: short and long contexts in one batch, room for the replays
    positions = torch.linspace(0, max_len - replays - 1, batch, device="cuda").to(torch.int32)
    if context is not None:
        positions = torch.full((batch,), context - 1, device="cuda", dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)

    def call():
        if rope is None:
            f(f.decode, q, k, v, cache, LAYER, positions, scale, 0, out)
        else:
            f(f.decode_rope, qkv, cache, LAYER, positions, *rope, scale, 0, out)

    def expected():
        qkv.copy_(torch.cat([q, k, v], dim=1))
        if rope is None:
            return decode_reference(q, k, v, cache, positions), k
        k_rot = rotated(k, positions, rope)
        return decode_reference(rotated(q, positions, rope), k_rot, v, cache, positions), k_rot

    errors, written = [], True
    want, _ = expected()
    call()
    torch.cuda.synchronize()
    errors.append(rel_error(out, want))
    # captured once, replayed with new inputs and advancing positions: what the decode step's graph does
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        call()  # warm: buffers made outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            call()
    torch.cuda.synchronize()
    for step in range(replays):
        positions += 1
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=torch.float16, generator=g))
        want, k_written = expected()
        graph.replay()
        torch.cuda.synchronize()
        errors.append(rel_error(out, want))
        for b, p in enumerate(positions.tolist()):
            # a rotated key may differ from NumPy's in its last bits far out (test_static_kv)
            k_ok = (torch.equal(cache[LAYER, 0, b, :, p], k_written[b]) if rope is None else
                    bool((cache[LAYER, 0, b, :, p].float() - k_written[b].float()).abs().max() <= 1.5e-2))
            written &= k_ok and bool(torch.equal(cache[LAYER, 1, b, :, p], v[b]))
    # timed as the model runs it: CALLS calls in one graph (a layer each), per call; a graph of
    # one call is timed by its launch, not by the kernel
    many = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(many, stream=stream):
            for _ in range(CALLS):
                call()
    torch.cuda.synchronize()
    lib = [t / CALLS for t in timed(many.replay)]
    kv_bytes = int(2 * hkv * d * 2 * (positions + 1).sum())
    keys = cache[LAYER, 0]  # [slots, kv_heads, max_len, d]
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys.repeat_interleave(hq // hkv, 1), keys.repeat_interleave(hq // hkv, 1)))
    return {"function": "lab.kv.decode_attention" + ("_rope" if rope else ""), "q_heads": hq, "kv_heads": hkv,
            "head_dim": d,
            "batch": batch, "max_len": max_len, "context": context, "rope": list(rope) if rope else None,
            "positions": positions.tolist(), "rel_errors": errors, "rows_written": written,
            "ok": written and max(errors) < TOLERANCE, "library_in_graph_s": lib, "kv_bytes": kv_bytes,
            "sdpa_full_context_s": sdpa}


def check_argmax(f: Functions) -> list[dict]:
    """`lab.kv.argmax` against torch.argmax (the first index of the largest logit), in a replayed
    graph too (the multi-part rows reset their arrival counters): vocabularies of one part (1000)
    and of many (32000, Llama-3's 128256), rows 1 and 16, the maximum repeated in several parts
    (the first must win) and a row of -inf."""
    import torch

    results = []
    g = torch.Generator(device="cuda").manual_seed(11)
    for rows, vocab in ((1, 1000), (1, 32000), (1, 128256), (16, 128256)):
        logits = torch.randn(rows, vocab, device="cuda", generator=g)
        out = torch.full((rows,), -1, dtype=torch.int32, device="cuda")
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            f(f.argmax, logits, out)  # warm: buffers made outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                f(f.argmax, logits, out)
        ok = True
        for case in range(4):
            logits.copy_(torch.randn(rows, vocab, device="cuda", generator=g))
            if case == 1:  # the maximum at three places (in three parts of a long row): the first wins
                top = logits.max() + 1
                for index in (vocab - 1, vocab // 2, 7 % vocab):
                    logits[:, index] = top
            if case == 2:
                logits[0] = float("-inf")
            graph.replay()
            torch.cuda.synchronize()
            ok &= out.tolist() == torch.argmax(logits, dim=-1).int().tolist()
        many = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(many, stream=stream):
            for _ in range(CALLS):
                f(f.argmax, logits, out)
        torch.cuda.synchronize()
        times = [t / CALLS for t in timed(many.replay)]
        torch_times = timed(lambda: torch.argmax(logits, dim=-1))
        results.append({"function": "lab.kv.argmax", "batch": rows, "vocab": vocab, "ok": bool(ok),
                        "library_in_graph_s": times, "torch_s": torch_times})
    return results


def check_state(f: Functions) -> dict:
    import torch

    ids = torch.zeros(4, 1, dtype=torch.int32, device="cuda")
    positions = torch.tensor([5, 6, 7, 8], dtype=torch.int32, device="cuda")
    nxt = torch.tensor([11, 12, 13, 14], dtype=torch.int32, device="cuda")
    out = torch.zeros(4, dtype=torch.int32, device="cuda")
    f(f.advance, nxt, ids, positions, out)
    ok = ids[:, 0].tolist() == [11, 12, 13, 14] and positions.tolist() == [6, 7, 8, 9] and out.tolist() == nxt.tolist()
    chunk_tokens = torch.tensor([3, 4, 5], dtype=torch.int32, device="cuda")
    out3 = torch.zeros(3, dtype=torch.int32, device="cuda")
    f(f.settle, chunk_tokens, ids, positions, 2, 40, out3)
    ok &= ids[2, 0].item() == 5 and positions[2].item() == 40 and out3.tolist() == [3, 4, 5]
    new = torch.tensor([[7], [8], [9], [10]], dtype=torch.int32, device="cuda")
    f(f.set_ids, new, ids, torch.zeros_like(new))
    torch.cuda.synchronize()
    ok &= ids.tolist() == new.tolist()
    return {"function": "lab.kv.advance, settle_prefill, set_ids", "ok": bool(ok)}


def all_checks(f: Functions, prefill_only: bool = False) -> list[dict]:
    results = [] if prefill_only else [check_state(f), *check_argmax(f)]
    for name, (hq, hkv) in HEADS.items():
        for start, n, max_len in ((0, 128, 256), (512, 128, 1024)):
            results.append({"heads": name, **check_prefill(f, hq, hkv, start, n, max_len)})
        for rope in ROPES:
            for start, n, max_len in ((0, 128, 256), (512, 128, 1024), (1000, 77, 2048)):
                for path in ("fused", "unfused"):
                    results.append({"heads": name, **check_prefill_rope(f, hq, hkv, start, n, max_len, rope, path)})
        # a whole Llama-3-8B prompt of 4096 tokens (the TTFT(4096) the work aims at), and its second half
        for start, n in ((0, 4096), (2048, 2048)) if name == "tp1" else ():
            results.append({"heads": name, **check_prefill_rope(f, hq, hkv, start, n, 4096, ROPES[0])})
            # the last row's attention alone (the model's last layer in a prefill)
            results.append({"heads": name, **check_prefill_rope(f, hq, hkv, start, n, 4096, ROPES[0], rows=1)})
        for start, n, rows in ((0, 128, 1), (1000, 77, 5)):
            results.append({"heads": name, **check_prefill_rope(f, hq, hkv, start, n, 2048, ROPES[0], rows=rows)})
        if prefill_only:
            continue
        for batch in (1, 16):
            for max_len in (256, 4096):
                results.append({"heads": name, **check_decode(f, hq, hkv, batch, max_len)})
        # one sequence at a given context (timed at the context after the replays): the short
        # contexts of a decode benchmark, and where the kernel starts to split
        # (a cache sized to the context, as a run sizes it to prompt + new tokens; and one of 4112)
        for context, max_len in [(c, c + 16) for c in CONTEXTS] + [(128, 4096 + 16), (1024, 4096 + 16)]:
            results.append({"heads": name, **check_decode(f, hq, hkv, 1, max_len, context=context)})
        # the same with RoPE in the kernel (Llama-3-8B's, and Llama-3.1's scaled one), on both paths
        for rope in ROPES:
            for batch, max_len, context in ((1, 272, 256), (1, 4112, 1024), (16, 256, None)):
                results.append({"heads": name, **check_decode(f, hq, hkv, batch, max_len, context=context, rope=rope)})
        # batch 1 at a decode benchmark's contexts, per cluster size (1: the split kernel), and the
        # rule's clusters on the SIMT kernel
        for context in (1, 16, 128, 256, 512, 1024, 2000):
            for cluster, tensor_cores in [(c, True) for c in CLUSTERS] + [(0, False)]:
                results.append({"heads": name, **check_decode(f, hq, hkv, 1, context + 16, context=context,
                                                              rope=ROPES[0], cluster=cluster,
                                                              tensor_cores=tensor_cores)})
    if prefill_only:
        return results
    # head_dim 64 (Llama-3.2-1B's 32 / 8 heads): the tensor-core kernel's other instance
    for context, tensor_cores in ((1, True), (128, True), (256, True), (256, False), (1024, True)):
        results.append({"heads": "d64", **check_decode(f, 32, 8, 1, context + 16, context=context, rope=ROPES[0],
                                                       tensor_cores=tensor_cores, d=64)})
    results.append({"heads": "d64", **check_decode(f, 32, 8, 16, 256, rope=ROPES[0], d=64)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", type=int, metavar="CONTEXT",
                    help="only the batch-1 decode with RoPE at this context (tp=1 heads), for a profiler")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only the prefill functions (lab.kv.prefill_attention, prefill_attention_rope)")
    args = ap.parse_args()
    from harness import stats

    if args.profile is not None and args.profile < 1:
        ap.error(f"--profile {args.profile}: a context of at least 1 key")
    f = Functions()
    if args.profile is not None:
        hq, hkv = HEADS["tp1"]
        results = [check_decode(f, hq, hkv, 1, args.profile + 16, context=args.profile, rope=ROPES[0])]
    else:
        results = all_checks(f, prefill_only=args.prefill_only)
    for r in results:
        for key in [k for k in r if k.endswith("_s") and isinstance(r[k], list)]:
            r[key + "_summary"] = stats.summarize(r[key])
        time_s = r.get("library_in_graph_s_summary", r.get("library_s_summary"))
        when = f" {time_s['p50'] * 1e6:8.1f} us" if time_s else ""
        if "old_path_s_summary" in r:
            when += f" (old path {r['old_path_s_summary']['p50'] * 1e6:.1f} us)"
        err = max(r.get("rel_errors", [r.get("rel_error", 0.0)]))
        rows = f"tokens={r['tokens']} rows={r['rows']} " if "rows" in r else ""
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['function']:26s} {r.get('heads', ''):4s} "
              f"b={r.get('batch', '-')} max_len={r.get('max_len', '-')} start={r.get('start', '-')} "
              f"{rows}context={r.get('context') or '-'} cluster={r.get('cluster', '-')} "
              f"{r.get('cluster_kernel', '')}{r.get('path', '')}{when}  "
              f"err {err:.1e}", flush=True)
    ok = write_checked_record(args.out, "static_kv", results)
    print(f"wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
