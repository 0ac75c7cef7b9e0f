"""Allreduces that are begun and waited for separately: what `batch_decode_pair` (engine/model.py,
the decode of `full_overlap`) calls at tp > 1, so that one micro-batch's allreduce runs while the
other computes.

- `lab.ccl.allreduce_begin(partial, reduced)`: start the sum of `partial` over the workers into
  `reduced`.
- `lab.ccl.allreduce_wait(reduced, partial, token)`: what runs after this waits for that sum.
- `lab.ccl.overlap_init()`: once per worker, before the first begin.
- `lab.ccl.set_overlap(on)`: with `on` false, every begin is waited for at once (the same work,
  serialized), the reference against which the time overlap hides is measured.

CUDA (nccl CCL): ccl/nccl_overlap.cc, in the nccl plugin: a second NCCL communicator split off
TVM's, on a non-blocking stream, ordered with the compute stream by events. CPU (cpu_shm CCL):
Python functions here; begin runs TVM's allreduce through the CCL to completion and wait does
nothing (the CPU CCL has no streams: on CPU the micro-batches interleave but nothing overlaps).

Call `register(target)` in every disco worker (engine.runtime_loader.check_target does), then
`lab.ccl.overlap_init` on all of them (engine.disco.DiscoSession does).
"""

from __future__ import annotations

from runtime_patch import library

BEGIN = "lab.ccl.allreduce_begin"
WAIT = "lab.ccl.allreduce_wait"
INIT = "lab.ccl.overlap_init"
SET_OVERLAP = "lab.ccl.set_overlap"
_registered: set[str] = set()


def _cpu_begin(partial, reduced) -> None:
    import tvm
    from tvm.runtime import ShapeTuple

    tvm.get_global_func("runtime.disco.allreduce")(partial, ShapeTuple([0]), False, reduced)


def _cpu_functions() -> dict:
    return {BEGIN: _cpu_begin, WAIT: lambda reduced, partial, token: None, INIT: lambda: None,
            SET_OVERLAP: lambda on: None}


def register(target: str) -> None:
    """Make the functions callable in this process: on cuda the nccl plugin (which has them), on
    llvm the Python versions. Idempotent."""
    library.register(target, "nccl", _cpu_functions(), _registered, "split allreduce")
