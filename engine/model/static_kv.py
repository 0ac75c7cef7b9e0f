"""The project's own KV cache (build option `kv_cache="static"`): pre-allocated tensors, no page
tables, no `vm.builtin` calls, so that a decode step is one CUDA graph.

TVM's paged KV cache drives attention through `vm.builtin.attention_kv_cache_*` calls on a cache
object; TVM's CUDA-graph rewrite (RewriteCUDAGraph) leaves every `vm.builtin` call out of the
captured regions, so each layer's attention split the decode graph (65 graph segments and ~100
host round trips a step for Llama-3-8B). Here the cache is plain tensors handed to the step
functions as static arguments (with the weights, after `num_input`: the rewrite captures what only
depends on them), and attention is `call_dps_packed` of library functions (runtime_patch.functions)
that the rewrite captures:

  cache      [layers, 2 (K, V), slots, kv_heads, max_len, head_dim]  one sequence per slot, its
             tokens at positions 0..length-1 (contiguous: a batch-1 step reads one block of keys)
  positions  [slots] int32   each slot's length (the position of its next token)
  ids        [slots, 1] int32  each slot's next input token (written by the previous step on the
             device: decode steps are fed without the host)

Prefill (one slot, a chunk of tokens at `start`): `lab.kv.prefill_attention_rope` on the layer's
fused qkv projection: q and k rotated at positions start.. and the chunk's rotated keys and values
written into the slot in one pass over qkv (on a GPU, a kernel that computes each row's cos/sin
once for all its heads, where TVM's llama_rope_with_position_map took 153 us a layer of a
4096-token Llama-3-8B prefill on an H200 and the append 21 more), then causal attention over the
slot's positions 0..start+len.
Decode (every slot, one token each): `lab.kv.decode_attention_rope` on the layer's fused qkv
projection: q and k rotated at `positions` (RoPE inside the attention kernel, in place of a RoPE
kernel of 1.7 us a layer on an H200; the rotation adds ~1.1 us to the attention), the token's key and
value written at its position, attention over 0..position (split over the keys on a GPU, merged in
the same kernel). Both rotate as TVM's llama_rope_with_position_map (tests/test_static_kv.py holds
them to it), with the arguments `rope_arguments` makes. After the LM head and the argmax
(`lab.kv.argmax`), `lab.kv.advance` writes the tokens into `ids` and adds 1 to `positions` (on the
device), so the next step needs nothing from the host; `lab.kv.set_ids` writes host tokens into
`ids` where the host feeds the step (teacher forcing). Prefill's last chunk sets the slot's `ids`
and `positions` (`lab.kv.settle_prefill`).
"""

from __future__ import annotations

from tvm.relax.frontend.nn import Tensor, op

from runtime_patch import functions

PREFILL, DECODE = "prefill", "decode"


class StaticKV:
    """A view of the static cache for one traced function: what `Attention` calls in place of
    TVM's PagedKVCache (`attention_with_fused_qkv`, same arguments and result)."""

    def __init__(self, build, cache: Tensor, kind: str, positions: Tensor, slot=None, start=None):
        c, plan = build.config, build.plan
        self.cache, self.kind, self.positions = cache, kind, positions
        self.invariant = int(build.batch_invariant)
        self.slot, self.start = slot, start
        self.q_heads, self.kv_heads, self.head_dim = plan.q_heads, plan.kv_heads, c.head_dim
        self.rope_args = rope_arguments(c.rope_theta, c.rope_scaling)

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_qo_heads: int, sm_scale: float,
                                 last_row_only: bool = False) -> Tensor:
        """[b, s, q_heads, d]; with `last_row_only` (a prefill chunk) [1, 1, q_heads, d], the
        attention of the chunk's last row (every row's keys and values still written)."""
        b, s, heads, d = qkv.shape
        if last_row_only and self.kind != PREFILL:
            raise ValueError("the static cache's attention of the last row only is a prefill's")
        flat = op.reshape(qkv, (b * s, heads, d))
        b, s = (1, 1) if last_row_only else (b, s)  # the rows asked for
        out = Tensor.placeholder((b * s, self.q_heads, d), qkv.dtype)
        if self.kind == DECODE:
            out = op.extern(functions.KV_DECODE_ATTENTION_ROPE, [flat, self.cache, layer_id, self.positions,
                                                                 *self.rope_args, float(sm_scale), self.invariant], out)
        else:
            out = op.extern(functions.KV_PREFILL_ATTENTION_ROPE, [flat, self.cache, layer_id, self.slot, self.start,
                                                                  *self.rope_args, float(sm_scale)], out)
        return op.reshape(out, (b, s, self.q_heads, d))


def rope_arguments(theta: float, scaling: dict | None) -> tuple[float, float, float, float, float]:
    """The RoPE arguments of lab.kv.prefill_attention_rope and decode_attention_rope: (theta, factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings), factor 0 without scaling
    (the config allows none or Llama-3's, engine.config)."""
    if not scaling or scaling.get("rope_type") != "llama3":
        return float(theta), 0.0, 0.0, 0.0, 0.0
    return (float(theta), float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), float(scaling["original_max_position_embeddings"]))


def argmax(logits: Tensor) -> Tensor:
    """The greedy tokens [rows] int32 of float32 logits [rows, vocab] (lab.kv.argmax: TVM's argmax
    kernel ran a block per row, 24 us for Llama-3's vocabulary on an H200)."""
    return op.extern(functions.KV_ARGMAX, [logits], Tensor.placeholder([logits.shape[0]], "int32"))


def advance(next_ids: Tensor, ids: Tensor, positions: Tensor) -> Tensor:
    """After a decode step: ids[:, 0] = next_ids, positions += 1, on the device; returns a copy of
    next_ids (the step's result)."""
    return op.extern(functions.KV_ADVANCE, [next_ids, ids, positions],
                     Tensor.placeholder(next_ids.shape, next_ids.dtype))


def settle_prefill(next_ids: Tensor, ids: Tensor, positions: Tensor, slot, length) -> Tensor:
    """After a prefill chunk: ids[slot] = next_ids[-1] (the token after the chunk's last),
    positions[slot] = length; returns a copy of next_ids."""
    return op.extern(functions.KV_SETTLE_PREFILL, [next_ids, ids, positions, slot, length],
                     Tensor.placeholder(next_ids.shape, next_ids.dtype))


def set_ids(new_ids: Tensor, ids: Tensor) -> Tensor:
    """ids = new_ids (host tokens for the next step); returns a copy of new_ids."""
    return op.extern(functions.KV_SET_IDS, [new_ids, ids], Tensor.placeholder(new_ids.shape, new_ids.dtype))
