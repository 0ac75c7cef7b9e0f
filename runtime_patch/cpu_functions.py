"""CPU (llvm) versions of the library functions in runtime_patch.functions, under the same names
and with the same arguments as the CUDA plugins': NumPy in float32, so that the CPU test suite
runs the graph the GPU runs and compares it with `transformers`. Registered by
`runtime_patch.functions.register("llvm", ...)`.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from runtime_patch import functions


def _numpy_gemm_nt(x, w, out) -> None:
    xa, wa, oa = np.from_dlpack(x), np.from_dlpack(w), np.from_dlpack(out)
    product = xa.reshape(-1, xa.shape[-1]).astype(np.float32) @ wa.astype(np.float32).T
    np.copyto(oa.reshape(-1, oa.shape[-1]), product.astype(oa.dtype, copy=False))


def _dequantized(wa, sa, bits: int):
    """[N, K * bits / 32] uint32 words and [N, K / 32] scales -> float32 [N, K]: (q - offset) * scale,
    32 / bits values per word lowest bits first (engine/quantize.py's layout)."""
    per_word, offset = 32 // bits, 2 ** (bits - 1) - 1
    q = (wa[:, :, None] >> (bits * np.arange(per_word, dtype=np.uint32))) & np.uint32((1 << bits) - 1)
    return (q.reshape(wa.shape[0], -1).astype(np.float32) - offset) * np.repeat(sa.astype(np.float32), 32, axis=1)


def _numpy_dequant(bits: int):
    """lab.dequant.q4 / q8: the whole weight as the model dtype."""
    def dequant(q_weight, q_scale, out) -> None:
        oa = np.from_dlpack(out)
        np.copyto(oa, _dequantized(np.from_dlpack(q_weight), np.from_dlpack(q_scale), bits).astype(oa.dtype))

    return dequant


def _numpy_gemm_quant(bits: int):
    """lab.gemm.q4 / q8 (x, q_weight, q_scale, out, workspace): out = x W^T with W dequantized and
    rounded to float16 first, as both CUDA paths compute it (the workspace is the CUDA paths'
    scratch: left as it is)."""
    def gemm(x, q_weight, q_scale, out, workspace) -> None:
        xa, oa = np.from_dlpack(x), np.from_dlpack(out)
        w = _dequantized(np.from_dlpack(q_weight), np.from_dlpack(q_scale), bits).astype(np.float16)
        product = xa.reshape(-1, xa.shape[-1]).astype(np.float32) @ w.astype(np.float32).T
        np.copyto(oa.reshape(-1, oa.shape[-1]), product.astype(oa.dtype, copy=False))

    return gemm


def _rms_norm(xa, norm_weight, eps: float):
    """x / sqrt(mean(x^2) + eps) over the last axis, rounded to x's dtype, times the norm's weight,
    rounded again (transformers' LlamaRMSNorm; the CUDA kernels round alike)."""
    xf = xa.astype(np.float32)
    normed = (xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))).astype(xa.dtype)
    return (normed.astype(np.float32) * norm_weight.astype(np.float32)).astype(xa.dtype)


def _rms_norm_out(x, weight, eps, out) -> None:
    """`lab.norm.rms` on the CPU."""
    np.copyto(np.from_dlpack(out), _rms_norm(np.from_dlpack(x), np.from_dlpack(weight), eps))


def _add_rms_norm(partial, residual, weight, eps, total, normed) -> None:
    """`lab.norm.add_rms` on the CPU: total = residual + partial rounded to their dtype, then
    normed = its RMSNorm (as _rms_norm)."""
    pa, ra = np.from_dlpack(partial), np.from_dlpack(residual)
    ta = (pa.astype(np.float32) + ra.astype(np.float32)).astype(pa.dtype)
    np.copyto(np.from_dlpack(total), ta)
    np.copyto(np.from_dlpack(normed), _rms_norm(ta, np.from_dlpack(weight), eps))


def _silu_times(gate, up):
    """silu(gate) * up of rows of one dtype (float16 in the GPU's model), rounded as transformers'
    LlamaMLP, the separate kernels and the CUDA GEMV and lab.swiglu do: silu(gate) in float32 to the
    dtype, then the float32 product to the dtype."""
    g = gate.astype(np.float32)
    silu = (g / (1 + np.exp(-g))).astype(gate.dtype)
    return (silu.astype(np.float32) * up.astype(np.float32)).astype(gate.dtype)


def _swiglu(gate_up, out) -> None:
    """lab.swiglu: out [.., I] = silu(gate) * up of gate_up [.., 2I] = [gate, up]."""
    ga, oa = np.from_dlpack(gate_up), np.from_dlpack(out)
    gate, up = np.split(ga, 2, axis=-1)
    np.copyto(oa, _silu_times(gate, up).astype(oa.dtype, copy=False))


# The pending RMSNorms' sums (functions.GEMV[bits, "add_sq"] and the "rms" GEMVs), one per norm
# site, by the calling thread's id (as the CUDA plugin keeps them per thread and device). Not a
# threading.local: a disco worker's thread calls in from C++, and its Python thread state (with
# what a threading.local holds) does not outlive a call.
_norm_sums: dict[int, list[np.ndarray]] = {}


def _norm_site(site: int) -> np.ndarray:
    """The one-element float32 sum of norm site `site` (0 or 1) of the calling thread."""
    if site not in functions.NORM_SITES:
        raise ValueError(f"norm site {site} is not one of {functions.NORM_SITES}")
    sites = _norm_sums.setdefault(threading.get_ident(), [np.zeros(1, np.float32) for _ in functions.NORM_SITES])
    return sites[site]


def _numpy_gemv(bits: int, fusion: str = ""):
    """lab.gemv.q4 / q8 (x, q_weight, q_scale, out) and their fused forms (functions.GEMV_FUSIONS):
    _add (..., residual, out), _swiglu (..., out), _add_sq (..., residual, norm_weight, site, out,
    scaled), _rms and _swiglu_rms (..., site, eps, out). q_weight [N, K * bits / 32] uint32, 32 / bits
    values per word lowest bits first; value = (q - (2^(bits-1) - 1)) * scale; float32 products;
    the residual added to the float32 product before its rounding; add_sq's scaled = the rounded
    sum times the norm's weight, rounded, and the sum of its squares into the site (the other
    zeroed); rms's products times 1 / sqrt(site's sum / K + eps) before anything else; swiglu's
    [gate; up] products rounded to float16 before silu(gate) * up."""
    def gemv(x, q_weight, q_scale, *rest) -> None:
        out = rest[3] if fusion == "add_sq" else rest[-1]
        xa, wa, sa, oa = (np.from_dlpack(t) for t in (x, q_weight, q_scale, out))
        product = xa.reshape(-1, xa.shape[-1]).astype(np.float32) @ _dequantized(wa, sa, bits).T
        if fusion in ("add", "add_sq"):
            product += np.from_dlpack(rest[0]).reshape(product.shape).astype(np.float32)
        if fusion in ("rms", "swiglu_rms"):
            site, eps = int(rest[0]), float(rest[1])
            product *= np.float32(1 / math.sqrt(float(_norm_site(site)[0]) / xa.shape[-1] + eps))
        if fusion in ("swiglu", "swiglu_rms"):
            gate, up = np.split(product.astype(np.float16), 2, axis=-1)
            product = _silu_times(gate, up)
        total = product.astype(oa.dtype, copy=False)
        np.copyto(oa.reshape(-1, oa.shape[-1]), total)
        if fusion == "add_sq":
            weight, site, scaled = np.from_dlpack(rest[1]), int(rest[2]), np.from_dlpack(rest[4])
            h = total.astype(np.float32)
            _norm_site(site)[0] += np.float32(np.square(h).sum(dtype=np.float32))
            _norm_site(1 - site)[0] = 0
            np.copyto(scaled.reshape(h.shape), (h * weight.astype(np.float32)).astype(scaled.dtype))

    return gemv


def _attend(q, k, v, sm_scale: float, causal: bool):
    """q [n, Hq, d], k and v [m, Hkv, d] (float32) -> (out [n, Hq, d], base-2 lse [n, Hq]); with
    `causal`, query i sees keys j <= i + (m - n)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    n, m = len(q), len(k)
    scores = np.einsum("ihd,jhd->hij", q, k) * (sm_scale * math.log2(math.e))
    if causal:
        scores = np.where(np.arange(m)[None, :] <= np.arange(n)[:, None] + (m - n), scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    lse = top + np.log2(np.exp2(scores - top).sum(axis=-1, keepdims=True))
    return np.einsum("hij,jhd->ihd", np.exp2(scores - lse), v), lse[..., 0].T


def _no_inline_rope(rotary_mode, name: str) -> None:
    if rotary_mode:
        raise ValueError(f"{name}: inline RoPE is not supported (the model applies RoPE before the KV cache)")


def _path_switch(name: str, paths: tuple):
    """A CUDA plugin's per-process choice of kernel path or shape (`name`, one of `paths`, the
    first the default): NumPy has one path (exact in float32), so the switch only remembers the
    choice."""
    chosen = [paths[0]]

    def switch(path: str) -> str:
        if path not in paths:
            raise ValueError(f"{name}: {path} is not one of {', '.join(map(str, paths))}")
        previous, chosen[0] = chosen[0], path
        return previous

    return switch


def _numpy_prefill_ragged(q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, output, lse,
                          causal, rotary_mode, rope_scale, rope_theta, sm_scale) -> None:
    _no_inline_rope(rotary_mode, functions.PREFILL_RAGGED)
    qa, ka, va = (np.from_dlpack(t).astype(np.float32) for t in (q, k, v))
    out, lse_out = np.from_dlpack(output), np.from_dlpack(lse)
    qo, kvo = np.from_dlpack(q_indptr), np.from_dlpack(kv_indptr)
    for b in range(len(qo) - 1):
        o, row_lse = _attend(qa[qo[b]:qo[b + 1]], ka[kvo[b]:kvo[b + 1]], va[kvo[b]:kvo[b + 1]], sm_scale, bool(causal))
        out[qo[b]:qo[b + 1]], lse_out[qo[b]:qo[b + 1]] = o.astype(out.dtype), row_lse


def _numpy_decode_paged(q, pages, page_indptr, page_values, length_info, k_rope_pos_offset, q_rope_position,
                        output, lse, rotary_mode, rope_scale, rope_theta, sm_scale) -> None:
    """pages [num_pages, 2 (K, V), Hkv, page_size, d]; sequence b owns pages
    page_values[page_indptr[b]:page_indptr[b+1]], the last filled to length_info[b]."""
    _no_inline_rope(rotary_mode, functions.DECODE_PAGED)
    if len(length_info.shape) != 1:
        raise ValueError(f"{functions.DECODE_PAGED}: sliding-window KV caches are not supported")
    qa, kv = np.from_dlpack(q).astype(np.float32), np.from_dlpack(pages)
    out, lse_out = np.from_dlpack(output), np.from_dlpack(lse)
    indptr, values, last = np.from_dlpack(page_indptr), np.from_dlpack(page_values), np.from_dlpack(length_info)
    page_size = kv.shape[3]
    for b in range(qa.shape[0]):
        own = values[indptr[b]:indptr[b + 1]]
        length = (len(own) - 1) * page_size + int(last[b]) if len(own) else 0
        # [pages, 2, Hkv, page_size, d] -> [2, tokens, Hkv, d]
        seq = kv[own].astype(np.float32).transpose(1, 0, 3, 2, 4).reshape(2, -1, kv.shape[2], kv.shape[4])[:, :length]
        o, row_lse = _attend(qa[b:b + 1], seq[0], seq[1], sm_scale, causal=False)
        out[b], lse_out[b] = o[0].astype(out.dtype), row_lse[0]


def _allreduce_begin(partial, reduced) -> None:
    """Run TVM's allreduce (through the session's CCL, cpu_shm) to completion: on the CPU nothing
    overlaps, the micro-batches only interleave."""
    import tvm
    from tvm.runtime import ShapeTuple

    tvm.get_global_func("runtime.disco.allreduce")(partial, ShapeTuple([0]), False, reduced)


def _allreduce(x, out) -> None:
    """`lab.ccl.allreduce` on the CPU: out = the sum of x over the workers, by TVM's allreduce
    through the session's CCL (cpu_shm), to completion; there is no one-shot to open."""
    _allreduce_begin(x, out)


def _allreduce_add_rms_norm(partial, residual, norm_weight, eps, out, normed) -> None:
    """`lab.ccl.allreduce_add_rms_norm` on the CPU: TVM's allreduce into out, then out += residual
    and normed = rms_norm(out) * norm_weight, rounded where the CUDA kernel rounds."""
    _allreduce_begin(partial, out)
    _add_rms_norm(out, residual, norm_weight, eps, out, normed)


def _kv_prefill_attention(q, k, v, cache, layer, slot, start, sm_scale, out) -> None:
    """Write the chunk's k, v into the slot at start.., then causal attention over 0..start+n."""
    qa, ka, va = (np.from_dlpack(t) for t in (q, k, v))  # [n, H, d]
    if not qa.shape[0] == ka.shape[0] == va.shape[0]:
        raise ValueError(f"{functions.KV_PREFILL_ATTENTION}: q, k and v must have a row per token")
    _append_attend(qa, ka, va, cache, layer, slot, start, sm_scale, out)


def _append_attend(qa, ka, va, cache, layer, slot, start, sm_scale, out) -> None:
    """k, v [n, Hkv, d] written into the slot at start.., then causal attention over 0..start+n of
    the chunk's last len(qa) rows (qa [r, Hq, d], r <= n)."""
    kv, o = np.from_dlpack(cache), np.from_dlpack(out)  # [layers, 2, slots, Hkv, max_len, d]
    end = start + ka.shape[0]
    if end > kv.shape[4]:
        raise ValueError(f"{functions.KV_PREFILL_ATTENTION}: positions up to {end} past the cache's {kv.shape[4]}")
    kv[layer, 0, slot, :, start:end] = ka.transpose(1, 0, 2)
    kv[layer, 1, slot, :, start:end] = va.transpose(1, 0, 2)
    keys, values = (kv[layer, i, slot, :, :end].transpose(1, 0, 2).astype(np.float32) for i in (0, 1))
    np.copyto(o, _attend(qa.astype(np.float32), keys, values, sm_scale, causal=True)[0].astype(o.dtype))


def _kv_decode_attention(q, k, v, cache, layer, positions, sm_scale, invariant, out) -> None:
    """Per slot b: write its token's k, v at positions[b], attention over 0..positions[b] (each
    slot on its own: batch-invariant whatever `invariant` says)."""
    qa, ka, va = (np.from_dlpack(t) for t in (q, k, v))  # [b, H, d]
    kv, o, pos = np.from_dlpack(cache), np.from_dlpack(out), np.from_dlpack(positions)
    for b in range(qa.shape[0]):
        p = int(pos[b])
        if not 0 <= p < kv.shape[4]:
            raise ValueError(f"{functions.KV_DECODE_ATTENTION}: slot {b} at position {p}, the cache holds {kv.shape[4]}")
        kv[layer, 0, b, :, p], kv[layer, 1, b, :, p] = ka[b], va[b]
        keys, values = (kv[layer, i, b, :, :p + 1].transpose(1, 0, 2).astype(np.float32) for i in (0, 1))
        o[b] = _attend(qa[b:b + 1].astype(np.float32), keys, values, sm_scale, causal=False)[0][0].astype(o.dtype)


def _rope_rows(x: np.ndarray, positions: np.ndarray, theta: float, factor: float, low_freq_factor: float,
               high_freq_factor: float, original_max: float) -> np.ndarray:
    """x [rows, heads, d], row r rotated at positions[r] as TVM's llama_rope_with_position_map
    computes it (float32 angles, cos and sin; x * cos + rotate_half(x) * sin rounded once to x's
    dtype); factor 0: no scaling, else Llama-3's."""
    d = x.shape[-1]
    half = d // 2
    exponent = (2 * np.arange(half)).astype(np.float32) / np.float32(d)
    s = np.asarray(positions).astype(np.float32)[:, None, None]  # [rows, 1 (heads), 1 (elements)]
    if factor:
        inv_diff = 1.0 / (high_freq_factor - low_freq_factor)
        alpha, beta = np.float32(original_max / (2 * np.pi) * inv_diff), np.float32(low_freq_factor * inv_diff)
        f = np.float32(1) / np.power(np.float32(theta), exponent)
        smooth = np.clip(alpha * f - beta, np.float32(0), np.float32(1))
        angle = s * ((np.float32(1) - smooth) * f * np.float32(1.0 / factor) + smooth * f)
    else:
        angle = s / np.power(np.float32(theta), exponent)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    xf = x.astype(np.float32)
    first, second = xf[..., :half], xf[..., half:]
    return np.concatenate([cos * first - sin * second, cos * second + sin * first], axis=-1).astype(x.dtype)


def rope_rotated(x: np.ndarray, position: int, theta: float, factor: float, low_freq_factor: float,
                 high_freq_factor: float, original_max: float) -> np.ndarray:
    """x [heads, d] rotated at `position` (_rope_rows of one row)."""
    return _rope_rows(x[None], np.array([position]), theta, factor, low_freq_factor, high_freq_factor,
                      original_max)[0]


def _rotated_qkv(qkv: np.ndarray, positions: np.ndarray, q_heads: int, kv_heads: int, rope: tuple):
    """A layer's fused projection qkv [rows, q_heads + 2 kv_heads, d] as (q, k, v), q and k rotated
    at each row's position."""
    rotated = _rope_rows(qkv[:, :q_heads + kv_heads], positions, *rope)
    return rotated[:, :q_heads], rotated[:, q_heads:], np.ascontiguousarray(qkv[:, q_heads + kv_heads:])


def _kv_prefill_attention_rope(qkv, cache, layer, slot, start, theta, factor, low_freq_factor, high_freq_factor,
                               original_max, sm_scale, out) -> None:
    """Split the fused projection, rotate q and k at positions start.., then as
    _kv_prefill_attention, for the chunk's last len(out) rows (1 <= len(out) <= the chunk's)."""
    x, o = np.from_dlpack(qkv), np.from_dlpack(out)
    if not (1 <= o.shape[0] <= x.shape[0] or o.shape[0] == x.shape[0] == 0):
        raise ValueError(f"{functions.KV_PREFILL_ATTENTION_ROPE}: out has {o.shape[0]} rows for a chunk of "
                         f"{x.shape[0]} (1 to {x.shape[0]}: the attention of its last rows)")
    rope = (theta, factor, low_freq_factor, high_freq_factor, original_max)
    q, k, v = _rotated_qkv(x, np.arange(start, start + x.shape[0]), o.shape[1], np.from_dlpack(cache).shape[3], rope)
    _append_attend(q[x.shape[0] - o.shape[0]:], k, v, cache, layer, slot, start, sm_scale, out)


def _kv_decode_attention_rope(qkv, cache, layer, positions, theta, factor, low_freq_factor, high_freq_factor,
                              original_max, sm_scale, invariant, out) -> None:
    """Split the fused projection, rotate q and k at each slot's position, then as
    _kv_decode_attention."""
    x, o, pos = np.from_dlpack(qkv), np.from_dlpack(out), np.from_dlpack(positions)
    rope = (theta, factor, low_freq_factor, high_freq_factor, original_max)
    q, k, v = _rotated_qkv(x, pos, o.shape[1], np.from_dlpack(cache).shape[3], rope)
    _kv_decode_attention(q, k, v, cache, layer, positions, sm_scale, invariant, out)


def _kv_settle_prefill(next_ids, ids, positions, slot, length, out) -> None:
    nxt = np.from_dlpack(next_ids)
    np.from_dlpack(ids)[slot, 0] = nxt[-1]
    np.from_dlpack(positions)[slot] = length
    np.copyto(np.from_dlpack(out), nxt)


_mailbox: np.ndarray | None = None  # this process's (the CPU's) mailbox, as lab.kv.mailbox makes it


def _kv_mailbox() -> int:
    global _mailbox
    if _mailbox is None:
        _mailbox = np.zeros(functions.MAILBOX_WORDS, dtype=np.int32)
    return int(_mailbox.ctypes.data)


def _kv_advance(next_ids, ids, positions, out) -> None:
    nxt = np.from_dlpack(next_ids)
    np.from_dlpack(ids)[:, 0] = nxt
    np.from_dlpack(positions)[:] += 1
    np.copyto(np.from_dlpack(out), nxt)
    if _mailbox is not None and len(nxt) <= functions.MAILBOX_SLOTS:
        call = int(_mailbox[0])
        entry = functions.mailbox_entry(call)
        _mailbox[entry:entry + len(nxt)] = nxt
        _mailbox[0] = call + 1


_decode_cluster = [0]


def _kv_decode_cluster(n: int) -> int:
    """The CUDA plugin's cluster size for the static decode; NumPy has none (kept for symmetry)."""
    if not 0 <= n <= 8:
        raise ValueError(f"{functions.KV_DECODE_CLUSTER}: {n} is not 0 (the rule), 1 (no cluster) or 2..8")
    previous, _decode_cluster[0] = _decode_cluster[0], n
    return previous


def _kv_argmax(logits, out) -> None:
    np.copyto(np.from_dlpack(out), np.argmax(np.from_dlpack(logits), axis=-1).astype(np.int32))  # the first maximum


def _kv_set_ids(new_ids, ids, out) -> None:
    new = np.from_dlpack(new_ids)
    np.copyto(np.from_dlpack(ids), new)
    np.copyto(np.from_dlpack(out), new)


IMPLEMENTATIONS = {
    functions.GEMM_NT: _numpy_gemm_nt,
    functions.SWIGLU: _swiglu,
    **{name: _numpy_gemv(bits, fusion) for (bits, fusion), name in functions.GEMV.items()},
    # an early launch is a GPU's scheduling: the same product
    **{name: _numpy_gemv(bits, fusion) for (bits, fusion), name in functions.GEMV_EARLY.items()},
    **{name: _numpy_gemm_quant(bits) for bits, name in functions.GEMM_BY_BITS.items()},
    functions.DEQUANT_Q4: _numpy_dequant(4),
    functions.DEQUANT_Q8: _numpy_dequant(8),
    functions.PREFILL_RAGGED: _numpy_prefill_ragged,
    functions.PREFILL_PATH: _path_switch(functions.PREFILL_PATH, functions.PREFILL_PATHS),
    functions.QUANT_GEMM_PATH: _path_switch(functions.QUANT_GEMM_PATH, functions.QUANT_GEMM_PATHS),
    functions.QUANT_GEMM_PLAN: lambda m, n, k, bits: "numpy",
    # NumPy attends each sequence on its own: its sums never depend on the batch
    functions.DECODE_PAGED: _numpy_decode_paged,
    functions.DECODE_PAGED_INVARIANT: _numpy_decode_paged,
    functions.ALLREDUCE_BEGIN: _allreduce_begin,
    functions.ALLREDUCE_WAIT: lambda reduced, partial, token: None,
    functions.OVERLAP_INIT: lambda: None,
    functions.SET_OVERLAP: lambda on: None,
    functions.ALLREDUCE: _allreduce,
    functions.ALLREDUCE_ADD_RMS_NORM: _allreduce_add_rms_norm,
    functions.RMS_NORM: _rms_norm_out,
    functions.ADD_RMS_NORM: _add_rms_norm,
    functions.IPC_CREATE: lambda rank, world, max_bytes: "",
    functions.IPC_OPEN: lambda handles: False,
    functions.IPC_STATUS: lambda: "cpu_shm (CPU): no one-shot",
    functions.IPC_DISABLE: lambda why: None,
    functions.KV_PREFILL_ATTENTION: _kv_prefill_attention,
    functions.KV_PREFILL_ATTENTION_ROPE: _kv_prefill_attention_rope,
    functions.KV_DECODE_ATTENTION: _kv_decode_attention,
    functions.KV_DECODE_ATTENTION_ROPE: _kv_decode_attention_rope,
    functions.KV_SETTLE_PREFILL: _kv_settle_prefill,
    functions.KV_ADVANCE: _kv_advance,
    functions.KV_ARGMAX: _kv_argmax,
    functions.KV_DECODE_CLUSTER: _kv_decode_cluster,
    functions.KV_DECODE_TENSOR_CORES: _path_switch(functions.KV_DECODE_TENSOR_CORES, (1, 0)),
    functions.GEMV_ROWS: _path_switch(functions.GEMV_ROWS, functions.GEMV_ROWS_CHOICES),
    functions.KV_SET_IDS: _kv_set_ids,
    functions.KV_MAILBOX: _kv_mailbox,
}
