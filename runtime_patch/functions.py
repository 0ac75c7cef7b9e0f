"""The global functions the compiled model (and the sessions) call by name: every `lab.*` name,
which native plugin provides it on CUDA, and its CPU version (runtime_patch.cpu_functions).

The model (engine/model) puts these names into the compiled graph (`call_dps_packed`, the paged KV
cache's kernel slots); an artifact lists the ones it calls in its metadata, and every process that
runs it (the controller and each disco worker) calls `register(target, names)` before the first
call: on cuda the plugins are built (on first use) and loaded, on llvm the NumPy versions are
registered under the same names, so the CPU test suite runs the same compiled graph as the GPU.

Matrix products (plugin cuda_gemm):
  GEMM_NT(x, w, out)                    out = x @ w^T, the prefill linears (cuBLAS on CUDA)
  SWIGLU(gate_up, out)                  out [.., I] = silu(gate) * up of gate_up [.., 2I] = [gate, up]
                                        (float16, rounded as transformers' LlamaMLP: silu(gate) to
                                        float16, then the product): the prefill's SiLU after a library
                                        gate_up GEMM (runtime_patch/native/swiglu.cu)
  GEMV_Q4(x, q_weight, q_scale, out)    the batch-1 decode GEMV of a q4f16_1 weight
  GEMV_Q8(x, q_weight, q_scale, out)    the same of a q8f16_1 weight
  GEMV[bits, fusion]                    the same with more in the kernel (GEMV_FUSIONS, by name suffix):
    "add"  (x, q_weight, q_scale, residual, out)   out = residual + W x: the residual add after a
                                        layer's o and down projections at tp=1
    "swiglu" (x, q_weight, q_scale, out)   W = [W_gate; W_up] (2I rows), out [.., I] =
                                        silu(W_gate x) * (W_up x): the gate_up projection and SiLU
    "add_sq" (x, q_weight, q_scale, residual, norm_weight, site, out, scaled)   out = residual +
                                        W x (rounded), scaled = out * norm_weight (rounded), and the
                                        sum of out^2 added into norm site `site` (0 or 1; the site
                                        1 - site zeroed): at tp=1 the o and down projections with the
                                        first half of the RMSNorm after them
    "rms" (x, q_weight, q_scale, site, eps, out)   out = (W x) / sqrt(sum / K + eps), sum the norm
                                        site's: x is `scaled` of an add_sq, the product its norm's
                                        (the qkv projection, the LM head)
    "swiglu_rms" (x, q_weight, q_scale, site, eps, out)   swiglu of the same scaled product (gate_up)
                                        The norm sites live in the plugin (two, each zeroed by the
                                        add_sq into the other: the model alternates them, NORM_SITES,
                                        and a step ends with site 0 zero, where the next step's
                                        first add_sq adds; whoever calls these by hand must leave
                                        it so)
  GEMV_EARLY[bits, fusion]              GEMV[bits, fusion] ("", "add" or "add_sq") launched while the kernel
                                        before it still runs (programmatic dependent launch, sm_90:
                                        its weight loads overlap that kernel, which must let it start
                                        early): the o projection after the static decode attention,
                                        the down projection after gate_up's GEMV (every GEMV lets
                                        its successor start). The same function on the CPU
  GEMV_ROWS(r) -> previous              rows per warp of this process's GEMVs: 0 (the default: the
                                        plugin's rule) or 1, 2, 4, for the benchmarks; remembered on llvm
  RMS_NORM(x, weight, eps, out)        out = rms_norm(x) * weight over the last dimension, rounded as
                                        transformers' LlamaRMSNorm: the decode steps' norms
                                        (decode_norm=library) and the library prefill's first one
  ADD_RMS_NORM(partial, residual, weight, eps, total, normed)   total = residual + partial (rounded
                                        to their dtype, as transformers' residual add), normed =
                                        RMS_NORM of total: the library prefill's residual adds (tp=1),
                                        each with the norm after it, in one pass over the rows
  GEMM_Q4(x, q_weight, q_scale, out, workspace)   out = x @ W^T of a q4f16_1 weight, the prefill
                                        linears: up to a row count a tensor-core kernel that
                                        dequantizes the packed weight in registers ("fused": mma.sync
                                        up to 64 rows on sm_90, 128 elsewhere; on sm_90 the warpgroup
                                        MMA from 65 to 256), above it the weight dequantized into
                                        workspace [N, K] float16 and cuBLAS ("dequant";
                                        runtime_patch/native/quant_gemm.cu)
  GEMM_Q8(...)                          the same of a q8f16_1 weight
  QUANT_GEMM_PATH(name) -> previous     "auto" (the default: by the row count), "fused" or "dequant":
                                        which GEMM_Q4 / GEMM_Q8 run in this process, for the
                                        benchmarks; one path on llvm
  QUANT_GEMM_PLAN(m, n, k, bits) -> text   what GEMM_Q4 / GEMM_Q8 (bits 4 / 8) of m rows against
                                        an n x k weight runs here under the current path ("dequant",
                                        or the fused kernel's tiles and how many run with K split;
                                        "numpy" on llvm)
  DEQUANT_Q4(q_weight, q_scale, out)    a q4f16_1 weight as float16 [N, K] (GEMM_Q4's dequant path
                                        alone, for the benchmarks)
  DEQUANT_Q8(q_weight, q_scale, out)    the same of a q8f16_1 weight
Attention of TVM's paged KV cache, in the slots of its TIR kernels (plugin cuda_attention):
  PREFILL_RAGGED(...)                   a prefill's self-attention over the tokens it appends
  PREFILL_PATH(name) -> previous        "fused" (flash attention, the default; on sm_90 with head
                                        dim 128 its warpgroup-MMA kernel), "fused_mma" (the flash
                                        kernel on mma.sync only) or "unfused" (cuBLAS GEMMs and a
                                        softmax through memory): which the prefills run, for the
                                        benchmarks; one path on llvm
  DECODE_PAGED(...)                     a decode step's attention over the pages, split over the keys
  DECODE_PAGED_INVARIANT(...)           the same, split as for a batch of 1 whatever the batch
                                        (build option batch_invariant: bit-identical sums per sequence)
Split allreduce of `batch_decode_pair` (full_overlap; plugin nccl: a second communicator on a
stream of its own, runtime_patch/native/nccl_overlap.cc):
  ALLREDUCE_BEGIN(partial, reduced)     start the sum of `partial` over the workers into `reduced`
  ALLREDUCE_WAIT(reduced, partial, token)  what takes the token runs after that sum
  OVERLAP_INIT()                        once per worker before the first begin (sessions call it)
  SET_OVERLAP(on)                       on=false: every begin waited for at once (serialized reference)
One-shot allreduce over CUDA IPC, safe inside CUDA graphs (plugin cuda_allreduce,
runtime_patch/native/oneshot_allreduce.cu; on CPU, cpu_shm through TVM's allreduce):
  ALLREDUCE(input, output)              output = sum of input over the workers (float16, bfloat16,
                                        float32): our kernel once opened and up to the size limit,
                                        else TVM's CCL (runtime.disco.allreduce: NCCL / cpu_shm)
  ALLREDUCE_ADD_RMS_NORM(partial, residual, norm_weight, eps, output, normed)
                                        output = residual + the sum of partial over the workers,
                                        normed = rms_norm(output) * norm_weight (last dimension): the
                                        residual add and the next RMSNorm of a layer at tp > 1 in the
                                        allreduce's kernel (a block per row), else TVM's CCL and a
                                        kernel of ours for the add and norm
  IPC_CREATE(rank, world, max_bytes) -> text   this device's region for the peers to map
  IPC_OPEN(texts) -> bool               every rank's text in rank order, ";"-joined; false (TVM's CCL
                                        then) where the GPUs lack peer access
  IPC_STATUS() -> text                  what ALLREDUCE does here, in one line
  IPC_DISABLE(why)                      the one-shot off here (sessions: where a rank could not open)
The project's static KV cache (engine/model/static_kv.py: cache [layers, 2, slots, kv_heads,
max_len, d], positions [slots], ids [slots, 1]; plugin cuda_attention, runtime_patch/native/cuda_attention.cu):
  KV_PREFILL_ATTENTION(q, k, v, cache, layer, slot, start, sm_scale, out)
                                        a prompt chunk's k, v written at start.. of the slot, then
                                        causal attention of its q over positions 0..start+len
  KV_PREFILL_ATTENTION_ROPE(qkv, cache, layer, slot, start, rope_theta, rope_factor, low_freq_factor,
                            high_freq_factor, original_max_position_embeddings, sm_scale, out)
                                        the same from the layer's fused projection qkv [n, Hq + 2 Hkv,
                                        d]: q and k rotated at positions start.. as KV_DECODE_ATTENTION_ROPE
                                        rotates them, the rotated k and v written, then the attention:
                                        what the model's prefill calls (no RoPE kernel before it). out
                                        [r, Hq, d], 1 <= r <= n: the attention of the chunk's last r
                                        rows (the model's last layer in a prefill asks for its last row)
  KV_DECODE_ATTENTION(q, k, v, cache, layer, positions, sm_scale, invariant, out)
                                        one token per slot: k, v written at positions[slot], attention
                                        over 0..positions[slot]; launch shape fixed by the tensors'
                                        shapes (graph-safe: lengths are read on the device);
                                        invariant=1: keys split as for one slot (batch_invariant)
  KV_DECODE_ATTENTION_ROPE(qkv, cache, layer, positions, rope_theta, rope_factor, low_freq_factor,
                           high_freq_factor, original_max_position_embeddings, sm_scale, invariant, out)
                                        the same from the layer's fused projection qkv [b, Hq + 2 Hkv,
                                        d]: q and k rotated (RoPE at positions[slot], as TVM's
                                        llama_rope_with_position_map; rope_factor 0: no scaling, else
                                        Llama-3's) in the attention kernel, no RoPE kernel before it
  KV_SETTLE_PREFILL(next, ids, positions, slot, length, out)   ids[slot] = next[-1], positions[slot]
                                        = length; out = next
  KV_DECODE_CLUSTER(n) -> previous     the static decode's thread-block cluster size in this process
                                        (benchmarks): 0 the rule (default), 1 none, 2..8 that size
  KV_DECODE_TENSOR_CORES(on) -> previous   whether the static decode's clusters run the
                                        tensor-core kernel (head_dim 64, 128) in this process
                                        (benchmarks): 1 (default) or 0 (the SIMT kernel); remembered on llvm
  KV_ARGMAX(logits, out)               out[r] = the first index of row r's largest logit (float32
                                        [rows, vocab] -> int32 [rows]): the greedy tokens
  KV_ADVANCE(next, ids, positions, out) ids[:, 0] = next, positions += 1; out = next; and next into
                                        this device's mailbox where it has one
  KV_SET_IDS(new, ids, out)             ids = new; out = new
  KV_MAILBOX() -> address               this device's mailbox (made on the first call): host memory the
                                        advance calls write the steps' tokens into, so that the host
                                        reads a step while the next one runs (no stream-ordered copy)
Transfers between pipeline stages (pp > 1; Python on every target, runtime_patch/pipeline_p2p.py):
  PP_SEND_NEXT(x, *outs)                x to the next stage (outs: a non-last stage's placeholders)
  PP_SEND_FIRST(*ins, tp, pp, *outs)    the last stage's results to the first stage (outs: placeholders)
  PP_RECV_LAST(*ins, tp, pp, *outs)     the first stage receives them into outs
"""

from __future__ import annotations

from collections.abc import Iterable

GEMM_NT = "lab.gemm.nt"
SWIGLU = "lab.swiglu"
GEMV_Q4 = "lab.gemv.q4"
GEMV_Q8 = "lab.gemv.q8"
# The batch-1 decode GEMV of each quantized weight width (bits) that has one
GEMV_BY_BITS = {4: GEMV_Q4, 8: GEMV_Q8}
# What a decode GEMV may do besides its product (the docstring above), each a function named by
# its suffix: GEMV[bits, fusion], GEMV[bits, ""] = GEMV_BY_BITS[bits]
GEMV_FUSIONS = ("", "add", "swiglu", "add_sq", "rms", "swiglu_rms")
GEMV = {(bits, fusion): name + (f"_{fusion}" if fusion else "") for bits, name in GEMV_BY_BITS.items()
        for fusion in GEMV_FUSIONS}
# The plain and add GEMVs launched early (the docstring above), by the same key, name suffix "_early"
GEMV_EARLY = {(bits, fusion): GEMV[bits, fusion] + "_early" for bits in GEMV_BY_BITS
              for fusion in ("", "add", "add_sq")}
# The norm sites of GEMV[bits, "add_sq"] and the "rms" GEMVs: a layer's o projection adds into the
# first, its down projection into the second (each zeroes the other: they must alternate)
NORM_SITES = (0, 1)
GEMV_ROWS = "lab.gemv.rows"
GEMV_ROWS_CHOICES = (0, 1, 2, 4)  # what GEMV_ROWS accepts: 0 for the plugin's rule
RMS_NORM = "lab.norm.rms"
ADD_RMS_NORM = "lab.norm.add_rms"
GEMM_Q4 = "lab.gemm.q4"
GEMM_Q8 = "lab.gemm.q8"
# The prefill GEMM of each quantized weight width, by bits
GEMM_BY_BITS = {4: GEMM_Q4, 8: GEMM_Q8}
QUANT_GEMM_PATH = "lab.gemm.quant_path"
QUANT_GEMM_PATHS = ("auto", "fused", "dequant")
QUANT_GEMM_PLAN = "lab.gemm.quant_plan"
DEQUANT_Q4 = "lab.dequant.q4"
DEQUANT_Q8 = "lab.dequant.q8"
# The whole weight dequantized to float16 (GEMM_Q4 / GEMM_Q8's dequant path), by width
DEQUANT_BY_BITS = {4: DEQUANT_Q4, 8: DEQUANT_Q8}
PREFILL_RAGGED = "lab.attention.prefill_ragged"
PREFILL_PATH = "lab.attention.prefill_path"
PREFILL_PATHS = ("fused", "fused_mma", "unfused")
DECODE_PAGED = "lab.attention.decode_paged"
DECODE_PAGED_INVARIANT = "lab.attention.decode_paged_invariant"
ALLREDUCE_BEGIN = "lab.ccl.allreduce_begin"
ALLREDUCE_WAIT = "lab.ccl.allreduce_wait"
OVERLAP_INIT = "lab.ccl.overlap_init"
SET_OVERLAP = "lab.ccl.set_overlap"
ALLREDUCE = "lab.ccl.allreduce"
ALLREDUCE_ADD_RMS_NORM = "lab.ccl.allreduce_add_rms_norm"
# The model's calls that use the one-shot's IPC regions: a session opens them where an artifact calls any
ONE_SHOT_CALLS = (ALLREDUCE, ALLREDUCE_ADD_RMS_NORM)
IPC_CREATE = "lab.ccl.ipc_create"
IPC_OPEN = "lab.ccl.ipc_open"
IPC_STATUS = "lab.ccl.ipc_status"
IPC_DISABLE = "lab.ccl.ipc_disable"
KV_PREFILL_ATTENTION = "lab.kv.prefill_attention"
KV_PREFILL_ATTENTION_ROPE = "lab.kv.prefill_attention_rope"
KV_DECODE_ATTENTION = "lab.kv.decode_attention"
KV_DECODE_ATTENTION_ROPE = "lab.kv.decode_attention_rope"
KV_SETTLE_PREFILL = "lab.kv.settle_prefill"
KV_ADVANCE = "lab.kv.advance"
KV_ARGMAX = "lab.kv.argmax"
KV_DECODE_CLUSTER = "lab.kv.decode_cluster"
KV_DECODE_TENSOR_CORES = "lab.kv.decode_tensor_cores"
KV_SET_IDS = "lab.kv.set_ids"
KV_MAILBOX = "lab.kv.mailbox"
PP_SEND_NEXT = "lab.pp.send_next"
PP_SEND_FIRST = "lab.pp.send_first"
PP_RECV_LAST = "lab.pp.recv_last"
# The layout of a mailbox (int32 words): [0] advance calls written, then MAILBOX_RING entries of
# MAILBOX_SLOTS tokens (call k in entry k % MAILBOX_RING); batches above MAILBOX_SLOTS get none.
MAILBOX_RING, MAILBOX_SLOTS = 64, 256
MAILBOX_WORDS = 1 + MAILBOX_RING * MAILBOX_SLOTS


def mailbox_entry(call: int) -> int:
    """The word where advance call `call`'s tokens start in a mailbox (cuda_attention.cu's Advance
    kernel writes them there: kMailboxRing, kMailboxSlots)."""
    return 1 + (call % MAILBOX_RING) * MAILBOX_SLOTS

PYTHON = "python"  # a PLUGIN entry: Python functions registered on every target
# The native plugin (runtime_patch.native.build) that provides each function on CUDA.
PLUGIN = {
    GEMM_NT: "cuda_gemm", SWIGLU: "cuda_gemm", DEQUANT_Q4: "cuda_gemm", DEQUANT_Q8: "cuda_gemm",
    GEMM_Q4: "cuda_gemm", GEMM_Q8: "cuda_gemm", QUANT_GEMM_PATH: "cuda_gemm", QUANT_GEMM_PLAN: "cuda_gemm",
    PREFILL_RAGGED: "cuda_attention", PREFILL_PATH: "cuda_attention", DECODE_PAGED: "cuda_attention", DECODE_PAGED_INVARIANT: "cuda_attention",
    ALLREDUCE_BEGIN: "nccl", ALLREDUCE_WAIT: "nccl", OVERLAP_INIT: "nccl", SET_OVERLAP: "nccl",
    ALLREDUCE: "cuda_allreduce", ALLREDUCE_ADD_RMS_NORM: "cuda_allreduce", IPC_CREATE: "cuda_allreduce", IPC_OPEN: "cuda_allreduce",
    IPC_STATUS: "cuda_allreduce", IPC_DISABLE: "cuda_allreduce",
    KV_PREFILL_ATTENTION: "cuda_attention", KV_PREFILL_ATTENTION_ROPE: "cuda_attention",
    KV_DECODE_ATTENTION: "cuda_attention",
    KV_DECODE_ATTENTION_ROPE: "cuda_attention",
    KV_SETTLE_PREFILL: "cuda_attention", KV_ADVANCE: "cuda_attention", KV_SET_IDS: "cuda_attention",
    KV_ARGMAX: "cuda_attention", KV_DECODE_CLUSTER: "cuda_attention", KV_DECODE_TENSOR_CORES: "cuda_attention",
    KV_MAILBOX: "cuda_attention",
    **{name: "cuda_gemm" for name in GEMV.values()}, **{name: "cuda_gemm" for name in GEMV_EARLY.values()},
    GEMV_ROWS: "cuda_gemm", RMS_NORM: "cuda_gemm", ADD_RMS_NORM: "cuda_gemm",
    # not a native plugin: Python over disco's point-to-point operations, on every target
    PP_SEND_NEXT: PYTHON, PP_SEND_FIRST: PYTHON, PP_RECV_LAST: PYTHON,
}
PREFIX = "lab."
_registered: dict[str, set[str]] = {}


def register(target: str, names: Iterable[str]) -> None:
    """Make `names` callable in this process for `target` ("cuda" or "llvm"). Idempotent. Raises
    runtime_patch.native.toolchain.PluginBuildError (naming what is missing) where a CUDA plugin
    cannot be built, and KeyError for a name this module does not know."""
    done = _registered.setdefault(target, set())
    names = [n for n in dict.fromkeys(names) if n not in done]
    unknown = [n for n in names if n not in PLUGIN]
    if unknown:
        raise KeyError(f"unknown library functions {unknown}: declare them in runtime_patch.functions")
    in_python = [n for n in names if PLUGIN[n] == PYTHON]
    if in_python:
        import tvm_ffi

        from runtime_patch import pipeline_p2p

        for name in in_python:
            tvm_ffi.register_global_func(name, pipeline_p2p.IMPLEMENTATIONS[name], override=True)
        done.update(in_python)
        names = [n for n in names if n not in in_python]
    if target == "cuda":
        from runtime_patch.native.build import load

        for plugin in dict.fromkeys(PLUGIN[n] for n in names):
            load(plugin)
    elif target == "llvm":
        import tvm_ffi

        from runtime_patch import cpu_functions

        for name in names:
            tvm_ffi.register_global_func(name, cpu_functions.IMPLEMENTATIONS[name], override=True)
    else:
        raise ValueError(f"no library functions for target {target!r}")
    done.update(names)
