"""Library matrix products called by the compiled model (engine/model.py) through relax's
call_dps_packed:

- `lab.gemm.nt(x, w, out)`, out = x @ w^T, the prefill linears (`prefill_gemm="library"`). CUDA:
  cuBLAS (`cublas_gemm.cc`), float16 inputs, float32 accumulation, tensor cores.
- `lab.gemv.q4(x, q_weight, q_scale, out)`, the batch-1 decode GEMV of a q4f16_1 weight
  (`decode_gemv="library"`). CUDA: `q4_gemv.cu`, two weights per instruction in half2.

On CUDA both live in the `cuda_gemm` plugin (built on first use like the CCL plugins, into
$LAB_CCL_DIR) and run on the stream TVM's kernels use. On CPU they are NumPy, accumulating in
float32, so the CPU test suite runs the same compiled graph as the GPU and compares it with
`transformers`.

Call `register(target)` in every process that runs such an artifact, before its first call
(engine.runtime_loader.check_target does, in the controller and in every disco worker).
"""

from __future__ import annotations

from runtime_patch import library

FUNCTION = "lab.gemm.nt"
GEMV_Q4 = "lab.gemv.q4"
_registered: set[str] = set()


def _numpy_gemm_nt(x, w, out) -> None:
    import numpy as np

    xa, wa, oa = np.from_dlpack(x), np.from_dlpack(w), np.from_dlpack(out)
    product = xa.reshape(-1, xa.shape[-1]).astype(np.float32) @ wa.astype(np.float32).T
    np.copyto(oa.reshape(-1, oa.shape[-1]), product.astype(oa.dtype, copy=False))


def _numpy_gemv_q4(x, q_weight, q_scale, out) -> None:
    """q_weight [N, K/8] uint32, 8 values per word lowest bits first; value = (q - 7) * scale."""
    import numpy as np

    xa, wa, sa, oa = (np.from_dlpack(t) for t in (x, q_weight, q_scale, out))
    q = (wa[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    weight = (q.reshape(wa.shape[0], -1).astype(np.float32) - 7) * np.repeat(sa.astype(np.float32), 32, axis=1)
    product = xa.reshape(-1, xa.shape[-1]).astype(np.float32) @ weight.T
    np.copyto(oa.reshape(-1, oa.shape[-1]), product.astype(oa.dtype, copy=False))


NUMPY = {FUNCTION: _numpy_gemm_nt, GEMV_Q4: _numpy_gemv_q4}


def register(target: str) -> None:
    """Make the functions available in this process for `target` ("cuda" or "llvm"). Idempotent.
    Raises runtime_patch.ccl.CCLBuildError (naming what is missing) if the plugin cannot be built."""
    library.register(target, "cuda_gemm", NUMPY, _registered, "GEMM")
