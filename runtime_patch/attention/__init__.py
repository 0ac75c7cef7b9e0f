"""Attention of the paged KV cache, put by engine/model.py in the slots where TVM puts its TIR
kernels; each takes that kernel's arguments and gives its results (the attention output and the
base-2 log-sum-exp that TVM's merge kernel uses to combine attentions):

- `lab.attention.prefill_ragged` (`prefill_attention="library"`): a prefill's self-attention over
  the tokens it appends. CUDA: S = Q K^T and O = P V as cuBLAS batched GEMMs on tensor cores, a
  causal softmax kernel of ours between them (TVM's kernel uses no tensor cores).
- `lab.attention.decode_paged` (`decode_attention="library"`): a decode step's attention over the
  pages, split over the keys so that a batch-1 step fills the GPU (TVM's kernel runs one block per
  sequence and KV head). How many splits depends on the batch, unless LAB_BATCH_INVARIANT=1 (the
  splits of a batch of 1 at any batch: the same sums per sequence whatever else is in the batch;
  experiments.overlap sets it when a mode splits the batch).

CUDA: `cuda_attention.cu`, built by nvcc on first use like the CCL plugins (into $LAB_CCL_DIR),
on the stream TVM's kernels use. CPU: NumPy in float32, so the CPU test suite runs the same
compiled graph as the GPU and compares it with `transformers`.

Call `register(target)` in every process that runs such an artifact, before it creates a KV cache
(engine.runtime_loader.check_target does, in the controller and in every disco worker).
"""

from __future__ import annotations

import math

from runtime_patch import library

FUNCTION = "lab.attention.prefill_ragged"
DECODE_FUNCTION = "lab.attention.decode_paged"
_registered: set[str] = set()


def _attend(q, k, v, sm_scale: float, causal: bool):
    """q [n, Hq, d], k and v [m, Hkv, d] (float32) -> (out [n, Hq, d], base-2 lse [n, Hq]); with
    `causal`, query i sees keys j <= i + (m - n)."""
    import numpy as np

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


def _numpy_prefill_ragged(q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, output, lse,
                          causal, rotary_mode, rope_scale, rope_theta, sm_scale) -> None:
    import numpy as np

    _no_inline_rope(rotary_mode, FUNCTION)
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
    import numpy as np

    _no_inline_rope(rotary_mode, DECODE_FUNCTION)
    if len(length_info.shape) != 1:
        raise ValueError(f"{DECODE_FUNCTION}: sliding-window KV caches are not supported")
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


NUMPY = {FUNCTION: _numpy_prefill_ragged, DECODE_FUNCTION: _numpy_decode_paged}


def register(target: str) -> None:
    """Make the attention functions available in this process for `target` ("cuda" or "llvm").
    Idempotent. Raises runtime_patch.ccl.CCLBuildError (naming what is missing) if the CUDA
    plugin cannot be built."""
    library.register(target, "cuda_attention", NUMPY, _registered, "attention")
