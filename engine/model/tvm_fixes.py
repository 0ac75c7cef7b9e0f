"""Where the model reaches into TVM 0.27 beyond its public API, each in one place with the reason.

- `SwapAttentionKernels`: TVM's paged KV cache takes its attention kernels as arguments of
  `vm.builtin.paged_attention_kv_cache_create`, each a `("tirx", <prim func>)` pair, with no
  public way to give it others. A class between `TIRPagedKVCache` and `PagedKVCache` in a cache
  class's method order receives that create call and puts a library function
  (`relax.ExternFunc`) in the slots it is told to.
- `prefill_attention_blocks`: TVM's paged prefill attention kernels run a fixed 16 thread
  blocks per KV head; the number comes from a private function (`_get_prefill_kernel_config`),
  wrapped here while the KV cache's kernels are made.
"""

from __future__ import annotations

import contextlib

from tvm import ir, relax
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, TIRPagedKVCache


class SwapAttentionKernels(PagedKVCache):
    """In each kernel slot ("tirx", <prim func>) named in `swaps` (TVM's function name -> the
    library function's name) of the create call TIRPagedKVCache builds, the library function."""

    swaps: dict[str, str] = {}

    def __init__(self, *, _expr, _name):
        args, found = [], set()
        for arg in _expr.args:
            if isinstance(arg, relax.Tuple) and len(arg.fields) == 2 and isinstance(arg.fields[1], ir.GlobalVar) \
                    and arg.fields[1].name_hint in self.swaps:
                found.add(self.swaps[arg.fields[1].name_hint])
                arg = relax.Tuple([arg.fields[0], relax.ExternFunc(self.swaps[arg.fields[1].name_hint])])
            args.append(arg)
        missing = set(self.swaps.values()) - found
        if missing:
            raise RuntimeError(f"TVM's paged KV cache has no kernel slot for {sorted(missing)} (a TVM version this "
                               "lab does not know): build with prefill_attention=tir decode_attention=tir")
        super().__init__(_expr=relax.Call(_expr.op, args, _expr.attrs, _expr.ty_args), _name=_name)


def paged_kv_cache_class(swaps: dict[str, str]) -> type:
    """TVM's TIR paged KV cache, with the kernel slots in `swaps` taken by library functions."""
    if not swaps:
        return TIRPagedKVCache
    return type("LibraryAttentionKVCache", (TIRPagedKVCache, SwapAttentionKernels), {"swaps": swaps})


@contextlib.contextmanager
def prefill_attention_blocks(blocks: int | None):
    """While TVM builds the KV cache's prefill attention kernels, give them `blocks` thread blocks
    per KV head (the first field of `_get_prefill_kernel_config`); None leaves TVM's choice."""
    from tvm.relax.frontend.nn.llm import _prefill_kernels

    original = _prefill_kernels._get_prefill_kernel_config
    if blocks is None:
        yield
        return

    def config(*args, **kwargs):
        return (blocks, *original(*args, **kwargs)[1:])

    _prefill_kernels._get_prefill_kernel_config = config
    try:
        yield
    finally:
        _prefill_kernels._get_prefill_kernel_config = original
