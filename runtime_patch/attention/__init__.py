"""The prefill self-attention of the paged KV cache: `lab.attention.prefill_ragged`, put by
engine/model.py (`prefill_attention="library"`) in the KV cache's "ragged prefill" slot where TVM
puts its TIR kernel; it takes that kernel's arguments and gives its results (the attention output
and the base-2 log-sum-exp that TVM's merge kernel combines with attention over cached pages).

- CUDA: `cublas_attention.cu` (built on first use like the CCL plugins, into $LAB_CCL_DIR):
  S = Q K^T and O = P V as cuBLAS batched GEMMs on tensor cores, a causal softmax kernel of ours
  between them, on the stream TVM's kernels use. TVM's TIR kernel uses no tensor cores.
- CPU: NumPy, in float32. It lets the CPU test suite run the same compiled graph as the GPU, and
  compare it with `transformers`.

Call `register(target)` in every process that runs such an artifact, before it creates a KV cache
(engine.runtime_loader.check_target does, in the controller and in every disco worker).
"""

from __future__ import annotations

import math

FUNCTION = "lab.attention.prefill_ragged"
_registered: set[str] = set()


def _numpy_prefill_ragged(q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, output, lse,
                          causal, rotary_mode, rope_scale, rope_theta, sm_scale) -> None:
    import numpy as np

    if rotary_mode:
        raise ValueError(f"{FUNCTION}: inline RoPE is not supported (the model applies RoPE before the KV cache)")
    qa, ka, va = (np.from_dlpack(t).astype(np.float32) for t in (q, k, v))
    out, lse_out = np.from_dlpack(output), np.from_dlpack(lse)
    qo, kvo = np.from_dlpack(q_indptr), np.from_dlpack(kv_indptr)
    group = qa.shape[1] // ka.shape[1]
    for b in range(len(qo) - 1):
        qs = qa[qo[b]:qo[b + 1]]                                   # [n, Hq, d]
        ks = np.repeat(ka[kvo[b]:kvo[b + 1]], group, axis=1)       # [m, Hq, d]
        vs = np.repeat(va[kvo[b]:kvo[b + 1]], group, axis=1)
        n, m = len(qs), len(ks)
        scores = np.einsum("ihd,jhd->hij", qs, ks) * (sm_scale * math.log2(math.e))  # base 2
        if causal:  # query i sees keys j <= i + (m - n)
            scores = np.where(np.arange(m)[None, :] <= np.arange(n)[:, None] + (m - n), scores, -np.inf)
        top = scores.max(axis=-1, keepdims=True)
        row_lse = top + np.log2(np.exp2(scores - top).sum(axis=-1, keepdims=True))
        out[qo[b]:qo[b + 1]] = np.einsum("hij,jhd->ihd", np.exp2(scores - row_lse), vs).astype(out.dtype)
        lse_out[qo[b]:qo[b + 1]] = row_lse[..., 0].T


def register(target: str) -> None:
    """Make `lab.attention.prefill_ragged` available in this process for `target` ("cuda" or
    "llvm"). Idempotent. Raises runtime_patch.ccl.CCLBuildError (naming what is missing) if the
    CUDA plugin cannot be built."""
    if target in _registered:
        return
    if target == "cuda":
        from runtime_patch.ccl.build import load

        load("cublas_attention")
    elif target == "llvm":
        import tvm_ffi

        tvm_ffi.register_global_func(FUNCTION, _numpy_prefill_ragged, override=True)
    else:
        raise ValueError(f"no library prefill attention for target {target!r}")
    _registered.add(target)
