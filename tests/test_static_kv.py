"""kv_cache=static: the project's pre-allocated KV cache (engine/model/static_kv.py), on the CPU
with the NumPy versions of its functions, against transformers: prefill in chunks, teacher-forced
decode steps, greedy generation of sequences of different lengths together, at tp=1 and over the
cpu_shm CCL; and the compiled graph has what the GPU's one-graph decode step needs."""

from __future__ import annotations

import numpy as np
import pytest

from engine.compile import BuildSpec, export
from engine.config import ConfigError, from_hf_folder
from engine.generate import Generator
from engine.session import open_session
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from runtime_patch import functions

PROMPT, CHUNK, STEPS = 40, 16, 8  # three prefill chunks: the 2nd and 3rd attend to the slot's earlier tokens


@pytest.mark.parametrize("quant,tp,tolerance", [("q0f32", 1, 1e-4), ("q0f16", 1, 1e-2), ("q0f32", 2, 1e-4),
                                                ("q0f32", 4, 1e-4)])
def test_static_cache_is_the_model_transformers_computes(compiled, gqa_checkpoint, quant, tp, tolerance):
    config = from_hf_folder(gqa_checkpoint)
    artifact = compiled(config, quant, tp, kv_cache="static")
    assert artifact.spec.kv_cache == "static" and functions.KV_DECODE_ATTENTION_ROPE in artifact.functions
    reference = Reference(gqa_checkpoint)
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]
    with open_session(artifact, open_source(config, gqa_checkpoint)) as session:
        gen = Generator(session, max_batch=3, max_total_len=96, prefill_chunk=CHUNK)
        assert relative_error(gen.teacher_forced_logits(tokens, PROMPT), reference.logits(tokens)) <= tolerance
        assert gen.generate([prompt], STEPS).tokens[0] == continuation
        # three sequences of different lengths decoded together, each in its own slot
        others = [rng.integers(0, config.vocab_size, n).tolist() for n in (7, 23)]
        together = gen.generate([prompt, *others], STEPS).tokens
    assert together[0] == continuation
    assert together[1:] == [reference.greedy(p, STEPS) for p in others]


def test_static_and_paged_caches_give_the_same_tokens(compiled, tiny_checkpoint):
    config = from_hf_folder(tiny_checkpoint)
    prompts = [np.random.default_rng(s).integers(0, config.vocab_size, 12 + 5 * s).tolist() for s in range(2)]
    out = {}
    for kind in ("paged", "static"):
        with open_session(compiled(config, "q0f16", 1, kv_cache=kind), open_source(config, tiny_checkpoint)) as s:
            out[kind] = Generator(s, max_batch=2, max_total_len=64, prefill_chunk=16).generate(prompts, 10).tokens
    assert out["static"] == out["paged"]


def test_decode_step_is_fed_on_the_device(compiled, tiny_checkpoint, library_calls):
    """Greedy decoding writes each step's tokens into the device's ids: the host writes them
    (lab.kv.set_ids) only where it feeds other tokens (teacher forcing)."""
    config = from_hf_folder(tiny_checkpoint)
    set_ids = library_calls(functions.KV_SET_IDS)
    steps = library_calls(functions.KV_ADVANCE)
    with open_session(compiled(config, "q0f32", 1, kv_cache="static"), open_source(config, tiny_checkpoint)) as s:
        gen = Generator(s, max_batch=1, max_total_len=64, prefill_chunk=16)
        gen.generate([[1, 2, 3, 4]], 6)
        assert len(steps) == 5 and not set_ids
        gen.teacher_forced_logits([1, 2, 3, 4, 9, 8, 7], 4)
        assert len(set_ids) == 3


def test_static_decode_is_one_graph_on_cuda(tiny_config):
    """The CUDA build captures the whole decode step but the LM head: one run_or_capture region in
    decode_static whose capture function holds every layer's attention and allreduce; outside it
    only the LM head, the argmax and lab.kv.advance (no vm.builtin KV-cache call at all)."""
    import tvm

    from engine.compile import _pipeline

    spec = BuildSpec(tiny_config, "q0f16", 2, "cuda", "sm_90", kv_cache="static", allreduce="tir")
    mod, _ = export(spec)
    assert mod["decode_static"].attrs["num_input"] == 0
    mod = tvm.relax.transform.DeadCodeElimination(["decode_static", "prefill_static"])(mod)  # a faster build
    with tvm.transform.PassContext(opt_level=3, config={"relax.backend.use_cuda_graph": True}):
        lowered = _pipeline(spec, spec.tvm_target())(mod)
    step = lowered["decode_static"].script()
    assert step.count("vm.builtin.cuda_graph.run_or_capture") == 1
    assert "attention_kv_cache" not in step and "kv_state" not in step
    captured = lowered["decode_static_cuda_graph_capture"].script()
    layers = tiny_config.num_hidden_layers
    assert captured.count(functions.KV_DECODE_ATTENTION_ROPE) == layers
    # RoPE inside the attention functions: no RoPE kernel in the step, nor in the prefill
    prefill = lowered["prefill_static"].script()
    assert "fused_rope(" not in captured and "fused_rope(" not in prefill
    assert prefill.count(functions.KV_PREFILL_ATTENTION_ROPE) == layers
    assert captured.count("runtime.disco.allreduce") == 2 * layers
    assert "broadcast_from_worker0" not in captured  # every rank holds the same tokens
    outside = step.split("run_or_capture", 1)[1]
    assert functions.KV_ADVANCE in outside and functions.KV_DECODE_ATTENTION_ROPE not in outside


def test_kv_cache_option(tiny_config):
    assert BuildSpec(tiny_config, "q0f16", target="cuda").kv_cache == "static"
    assert BuildSpec(tiny_config, "q0f16").kv_cache == "paged"
    assert BuildSpec(tiny_config, "q0f16", kv_cache="static").key() != BuildSpec(tiny_config, "q0f16").key()
    with pytest.raises(ConfigError, match="kv_cache"):
        BuildSpec(tiny_config, "q0f16", kv_cache="flash")
    with pytest.raises(ConfigError, match="kv_cache=paged"):  # batch_decode_pair is the paged cache's
        BuildSpec(tiny_config, "q0f16", 2, "cuda", microbatch_decode=True)


def test_library_allreduce_in_the_model_over_cpu_shm(compiled, tiny_checkpoint):
    """allreduce=library: the model calls lab.ccl.allreduce_add_rms_norm (the residual add and the
    next norm with each sum; on the CPU, TVM's cpu_shm allreduce underneath, on a GPU the one-shot
    over CUDA IPC); the session says which path ran. The vocabulary-parallel LM head (an allgather
    after the graph) decodes the same tokens."""
    config = from_hf_folder(tiny_checkpoint)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, 12).tolist()
    tokens = {}
    for allreduce, lm_head in (("tir", "replicated"), ("library", "replicated"), ("library", "vocab_parallel")):
        artifact = compiled(config, "q0f32", 2, kv_cache="static", allreduce=allreduce, lm_head=lm_head)
        assert bool(set(functions.ONE_SHOT_CALLS) & set(artifact.functions)) == (allreduce == "library")
        with open_session(artifact, open_source(config, tiny_checkpoint)) as session:
            assert ("cpu_shm" in session.allreduce) if allreduce == "library" else session.allreduce == "TVM's CCL (cpu_shm)"
            tokens[allreduce, lm_head] = Generator(session, 1, 64, 16).generate([prompt], 6).tokens[0]
    assert len(set(map(tuple, tokens.values()))) == 1
    assert tokens["tir", "replicated"] == Reference(tiny_checkpoint).greedy(prompt, 6)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def tvm_rope(qkv: np.ndarray, positions: np.ndarray, theta: float, q_heads: int, kv_heads: int, scaling):
    """(q, k, v) of qkv [rows, q_heads + 2 kv_heads, d] by TVM's llama_rope_with_position_map (the
    RoPE kernel TVM's KV cache runs, and the static cache's prefill ran before
    lab.kv.prefill_attention_rope), compiled for the CPU: row r rotated at positions[r]."""
    import tvm
    from tvm import tirx
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    d = qkv.shape[-1]
    rope = llama_rope_with_position_map(theta, 1.0, d, q_heads, kv_heads, "float16", dict(scaling or {}))
    rope = rope.specialize({rope.params[-1]: tirx.IntImm("int64", 1)})  # apply_rope
    kernel = tvm.compile(tvm.IRModule({"main": rope}), target="llvm")["main"]
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in
               (qkv, positions.astype(np.int32), *(np.zeros((len(qkv), h, d), np.float16)
                                                   for h in (q_heads, kv_heads, kv_heads)))]
    kernel(*tensors)
    return tuple(t.numpy() for t in tensors[2:])


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_decode_rope_is_the_prefills_rope(scaling):
    """The decode's attention rotates q and k itself (lab.kv.decode_attention_rope; its NumPy
    version's rope_rotated has the formula of cuda_attention.cu's RopeTable / RotateHalf), and so
    does the prefill's (lab.kv.prefill_attention_rope, the same formula); TVM's
    llama_rope_with_position_map is what they replace. They must rotate alike: bit for bit at short
    positions, within a few float16 ulps far out (float32 cos/sin of angles of 10^4-10^5 radians
    differ in their last bits between libraries). A wrong sign, pairing or frequency is off by O(1)."""
    from engine.model.static_kv import rope_arguments
    from runtime_patch.cpu_functions import rope_rotated

    theta, hq, hkv, d = 500000.0, 4, 2, 64
    positions = np.array([0, 1, 17, 200, 4095, 70000], np.int32)
    qkv = np.random.default_rng(0).standard_normal((len(positions), hq + 2 * hkv, d)).astype(np.float16)
    want_q, want_k, _ = tvm_rope(qkv, positions, theta, hq, hkv, scaling)
    args = rope_arguments(theta, scaling)
    for b, position in enumerate(positions.tolist()):
        q = rope_rotated(qkv[b, :hq], position, *args)
        k = rope_rotated(qkv[b, hq:hq + hkv], position, *args)
        if position <= 17:
            assert np.array_equal(q, want_q[b]) and np.array_equal(k, want_k[b])
        np.testing.assert_allclose(q.astype(np.float32), want_q[b], rtol=0, atol=1.5e-2)
        np.testing.assert_allclose(k.astype(np.float32), want_k[b], rtol=0, atol=1.5e-2)


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
@pytest.mark.parametrize("start", [0, 23, 4000])
def test_prefill_attention_rope_is_tvm_rope_then_prefill_attention(scaling, start):
    """lab.kv.prefill_attention_rope (what the static cache's prefill calls; its NumPy version here,
    which the CUDA kernel is held to on the box by bench.static_kv) gives what the prefill computed
    before it: TVM's llama_rope_with_position_map at positions start.., then
    lab.kv.prefill_attention on the rotated q, k and the v: the same output and the same cache rows
    (the rotated keys, the values), the slot's earlier rows and the other slot untouched."""
    import tvm_ffi

    from engine.model.static_kv import rope_arguments

    theta, hq, hkv, d, n, max_len, layer, slot = 500000.0, 8, 2, 64, 16, 4032, 1, 1
    rng = np.random.default_rng(start)
    qkv = rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float16)
    earlier = rng.standard_normal((2, 2, 2, hkv, max_len, d)).astype(np.float16)  # what the cache held before
    functions.register("llvm", [functions.KV_PREFILL_ATTENTION, functions.KV_PREFILL_ATTENTION_ROPE])
    call = lambda name, *args: tvm_ffi.get_global_func(name)(  # noqa: E731
        *[tvm_ffi.from_dlpack(a) if isinstance(a, np.ndarray) else a for a in args])
    scale = d ** -0.5

    want_cache, want = earlier.copy(), np.full((n, hq, d), np.nan, np.float16)
    q, k, v = tvm_rope(qkv, np.arange(start, start + n), theta, hq, hkv, scaling)
    call(functions.KV_PREFILL_ATTENTION, q, k, v, want_cache, layer, slot, start, scale, want)
    cache, out = earlier.copy(), np.full((n, hq, d), np.nan, np.float16)
    call(functions.KV_PREFILL_ATTENTION_ROPE, qkv, cache, layer, slot, start, *rope_arguments(theta, scaling), scale,
         out)

    # the rotated keys within a few float16 ulps (TVM's compiled kernel rounds an odd element of
    # its k an ulp away from its q's formula even at position 2; far out, the float32 cos/sin differ:
    # test_decode_rope_is_the_prefills_rope), the values and every other row exact
    written = (layer, 0, slot, slice(None), slice(start, start + n))
    np.testing.assert_allclose(cache[written].astype(np.float32), want_cache[written], rtol=0, atol=1.5e-2)
    cache[written] = want_cache[written]
    assert np.array_equal(cache, want_cache)
    assert not np.array_equal(want_cache, earlier)  # the chunk's rows were written
    np.testing.assert_allclose(out.astype(np.float32), want, rtol=0, atol=2e-3)
    # without the rotation (or at other positions) the attention is another one: the check above sees it
    unrotated = np.full((n, hq, d), np.nan, np.float16)
    call(functions.KV_PREFILL_ATTENTION, np.ascontiguousarray(qkv[:, :hq]), np.ascontiguousarray(qkv[:, hq:hq + hkv]),
         np.ascontiguousarray(qkv[:, hq + hkv:]), earlier.copy(), layer, slot, start, scale, unrotated)
    assert np.abs(unrotated.astype(np.float32) - want).max() > 0.05


@pytest.mark.parametrize("start", [0, 37])
def test_prefill_attention_rope_of_the_last_rows(start):
    """lab.kv.prefill_attention_rope with an `out` of r < n rows (the model's last layer in a prefill
    asks for its last row, LlamaModel.forward): the chunk's last r rows of the full call's output,
    and the same cache (every row's keys and values written); an out of 0 rows, or of more rows than
    the chunk has, is refused."""
    import tvm_ffi

    from engine.model.static_kv import rope_arguments

    theta, hq, hkv, d, n, max_len, layer, slot = 500000.0, 8, 2, 64, 16, 128, 0, 1
    rng = np.random.default_rng(11 + start)
    qkv = rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float16)
    earlier = rng.standard_normal((1, 2, 2, hkv, max_len, d)).astype(np.float16)
    functions.register("llvm", [functions.KV_PREFILL_ATTENTION_ROPE])
    call = lambda *args: tvm_ffi.get_global_func(functions.KV_PREFILL_ATTENTION_ROPE)(  # noqa: E731
        *[tvm_ffi.from_dlpack(a) if isinstance(a, np.ndarray) else a for a in args])
    rope, scale = rope_arguments(theta, LLAMA3_SCALING), d ** -0.5
    full_cache, full = earlier.copy(), np.full((n, hq, d), np.nan, np.float16)
    call(qkv, full_cache, layer, slot, start, *rope, scale, full)
    for rows in (1, 5):
        cache, out = earlier.copy(), np.full((rows, hq, d), np.nan, np.float16)
        call(qkv, cache, layer, slot, start, *rope, scale, out)
        assert np.array_equal(cache, full_cache)
        np.testing.assert_array_equal(out, full[n - rows:])
        # not the chunk's first rows (their attention sees fewer keys)
        assert not np.allclose(out.astype(np.float32), full[:rows].astype(np.float32), atol=1e-2)
    for rows in (0, n + 1):
        with pytest.raises(Exception, match="rows"):
            call(qkv, earlier.copy(), layer, slot, start, *rope, scale, np.zeros((rows, hq, d), np.float16))
