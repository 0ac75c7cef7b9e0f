"""The model's KV cache: TVM's paged KV cache (`TIRPagedKVCache`), with the project's attention
functions in its kernel slots where the build asks for them.

TVM's TIR kernels in the cache (by the names TIRPagedKVCache gives them, cuda and llvm) and the
runtime_patch.functions that replace them (same arguments and results: the attention output and
the base-2 log-sum-exp TVM's merge kernel uses):
  prefill_attention="library"   the ragged prefill slot -> lab.attention.prefill_ragged
  decode_attention="library"    the decode slot         -> lab.attention.decode_paged
                                (…_invariant with the build option batch_invariant)
A prefill's attention over pages already in the cache stays TVM's.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from runtime_patch import functions

from .tvm_fixes import paged_kv_cache_class, prefill_attention_blocks

# Thread blocks per KV head of TVM's prefill attention kernels (a persistent loop over query tiles
# of 32 rows). TVM's default, 16, gives a 1024-token Llama-3-8B prefill 128 blocks of 4 warps on
# an H100's 132 SMs: the kernel took 2.9 ms per layer, 79% of the prefill. 128 blocks per head
# cover such a prefill's 128 tiles per head in one wave.
PREFILL_ATTENTION_BLOCKS = 128

_PREFILL_SLOTS = ("tir_attention_prefill_ragged", "tir_attention_prefill_ragged_cpu")
_DECODE_SLOTS = ("tir_attention_decode", "tir_attention_decode_cpu")


def kernel_swaps(spec) -> dict[str, str]:
    """TVM's kernel slot names -> the library function in each, for a BuildSpec."""
    swaps = {}
    if spec.prefill_attention == "library":
        swaps.update({slot: functions.PREFILL_RAGGED for slot in _PREFILL_SLOTS})
    if spec.decode_attention == "library":
        decode = functions.DECODE_PAGED_INVARIANT if spec.batch_invariant else functions.DECODE_PAGED
        swaps.update({slot: decode for slot in _DECODE_SLOTS})
    return swaps


def create_paged_kv_cache(spec, target, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                          support_sliding_window) -> PagedKVCache:
    """The KV cache of one rank (its query and KV heads), with the kernels the BuildSpec asks for.
    A pipeline stage's cache holds that stage's layers only, numbered from 0 (TVM's own layer
    partition by disco worker group does not work in apache-tvm 0.27: the KV cache, in
    libtvm_runtime, does not see the disco worker of libtvm_runtime_extra, so it takes every
    process for group 0 of 1)."""
    c, plan = spec.config, spec.plan
    blocks = PREFILL_ATTENTION_BLOCKS if target.kind.name == "cuda" else None
    with prefill_attention_blocks(blocks):
        return paged_kv_cache_class(kernel_swaps(spec))(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, len(plan.layers)]),
            num_hidden_layers=len(plan.layers),
            num_attention_heads=plan.q_heads,
            num_key_value_heads=plan.kv_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling or {}),
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=spec.quant_spec.model_dtype,
            target=target,
        )
