"""The library GEMM of prefill: `lab.gemm.nt(x, w, out)`, out = x @ w^T, called by the compiled
model (engine/model.py, `prefill_gemm="library"`) through relax's call_dps_packed.

- CUDA: cuBLAS (`cublas_gemm.cc`, built on first use like the CCL plugins, into $LAB_CCL_DIR):
  float16 inputs, float32 accumulation, tensor cores; on the stream TVM's kernels use.
- CPU: NumPy's matmul (its BLAS), accumulating in float32. It lets the CPU test suite run the
  same compiled graph as the GPU, and compare it with `transformers`.

Call `register(target)` in every process that runs such an artifact, before its first prefill
(engine.runtime_loader.check_target does, in the controller and in every disco worker).
"""

from __future__ import annotations

FUNCTION = "lab.gemm.nt"
_registered: set[str] = set()


def _numpy_gemm_nt(x, w, out) -> None:
    import numpy as np

    xa, wa, oa = np.from_dlpack(x), np.from_dlpack(w), np.from_dlpack(out)
    product = xa.reshape(-1, xa.shape[-1]).astype(np.float32) @ wa.astype(np.float32).T
    np.copyto(oa.reshape(-1, oa.shape[-1]), product.astype(oa.dtype, copy=False))


def register(target: str) -> None:
    """Make `lab.gemm.nt` available in this process for `target` ("cuda" or "llvm"). Idempotent.
    Raises runtime_patch.ccl.CCLBuildError (naming what is missing) if cuBLAS cannot be built."""
    if target in _registered:
        return
    if target == "cuda":
        from runtime_patch.ccl.build import load

        load("cublas_gemm")
    elif target == "llvm":
        import tvm_ffi

        tvm_ffi.register_global_func(FUNCTION, _numpy_gemm_nt, override=True)
    else:
        raise ValueError(f"no library GEMM for target {target!r}")
    _registered.add(target)
