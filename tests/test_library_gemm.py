"""prefill_gemm=library: the prefill linears call `lab.gemm.nt` (cuBLAS on CUDA; NumPy here),
and the model still computes what transformers computes."""

import collections

import numpy as np
import pytest

from engine.config import from_hf_folder
from engine.generate import Generator
from engine.session import VMSession, open_session
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from runtime_patch import functions

PROMPT, STEPS = 24, 8


@pytest.fixture
def gemm_calls(library_calls):
    """The weight shape of each call of lab.gemm.nt in this process."""
    return library_calls(functions.GEMM_NT, lambda x, w, out: tuple(w.shape))


@pytest.fixture
def quant_gemm_calls(library_calls):
    """The packed weight shape of each call of lab.gemm.q4 / q8 in this process, by name."""
    return {name: library_calls(name, lambda x, w, scale, out, workspace: tuple(w.shape))
            for name in functions.GEMM_BY_BITS.values()}


@pytest.fixture
def prefill_fusion_calls(library_calls):
    """The calls of lab.swiglu and lab.norm.add_rms in this process, by name."""
    return {name: library_calls(name) for name in (functions.SWIGLU, functions.ADD_RMS_NORM)}


def prefill_calls_per_layer(quantized: bool, gemm: str) -> dict[str, int]:
    """The library calls of one layer of a tp=1 prefill with prefill_gemm=library: the four linears
    through the weight's GEMM, SiLU through lab.swiglu, each residual add with the norm after it
    through lab.norm.add_rms (the next layer's input norm, or the model's final one, after the
    down projection's add)."""
    return {gemm: 4, functions.SWIGLU: 1, functions.ADD_RMS_NORM: 2}


def prefill_calls_last_row(layers: int, gemm: str) -> dict[str, int]:
    """The same calls of a whole `prefill` chunk, which returns only its last position's logits:
    every layer's as above but the last one's, whose o projection, MLP and the final norm run on
    the last row alone, as in a decode step (LlamaModel.forward, last_row_only): of that layer only
    the qkv GEMM goes through the prefill's library calls."""
    per_layer = prefill_calls_per_layer(False, gemm)
    return {name: count * (layers - 1) + (1 if name == gemm else 0) for name, count in per_layer.items()}


@pytest.mark.parametrize("quant,tolerance", [("q0f32", 1e-4), ("q4f16_1", 1e-2), ("q8f16_1", 1e-2)])
def test_library_prefill_matches_transformers(compiled, tiny_checkpoint, gemm_calls, quant_gemm_calls,
                                             prefill_fusion_calls, library_calls, quant, tolerance):
    """The prefill's linears through lab.gemm.nt, a quantized weight's through the library's GEMM of
    its width (lab.gemm.q4 / q8), one call per linear; with the RMSNorms (lab.norm.rms), SiLU
    (lab.swiglu) and each residual add with the norm after it (lab.norm.add_rms) in the library too."""
    from engine.quantize import quant_spec

    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, quant, prefill_gemm="library")
    norms = library_calls(functions.RMS_NORM)
    bits = quant_spec(quant).bits
    gemm = functions.GEMM_BY_BITS.get(bits, functions.GEMM_NT)
    assert artifact.spec.prefill_gemm == "library" and gemm in artifact.functions
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=64)
    reference = Reference(tiny_checkpoint, quant_spec(quant) if quant != "q0f32" else None)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]

    logits = gen.teacher_forced_logits(tokens, PROMPT)
    assert relative_error(logits, reference.logits(tokens)) <= tolerance
    # prefill_logits: the layers' linears and the LM head (untied), all through the library
    layers = config.num_hidden_layers
    per_layer = prefill_calls_per_layer(quant_spec(quant).quantized, gemm)
    calls = {functions.GEMM_NT: gemm_calls, **quant_gemm_calls, **prefill_fusion_calls}
    assert len(calls[gemm]) >= per_layer[gemm] * layers + (0 if config.tie_word_embeddings else 1)

    for each in (*calls.values(), norms):
        each.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation
    # prefill: the layers' linears but the last layer's after its qkv (its last row and the one-row
    # LM head are GEMVs); decode steps: none; no other GEMM
    last_row = prefill_calls_last_row(layers, gemm)
    assert {name: len(each) for name, each in calls.items()} == {name: last_row.get(name, 0) for name in calls}
    assert len(norms) == 1  # the prefill's first norm (one chunk; the others come with the adds); decode: TVM's on llvm


def test_library_prefill_on_the_static_cache_matches_transformers(compiled, gqa_checkpoint, library_calls):
    """q0f16 on the static KV cache with prefill_gemm=library, the CUDA default's layout: every
    layer's prefill through lab.kv.prefill_attention_rope, lab.swiglu and lab.norm.add_rms (their
    NumPy versions here, rounding as the CUDA kernels round) computes what transformers computes in
    float16, chunk after chunk."""
    config = from_hf_folder(gqa_checkpoint)
    artifact = compiled(config, "q0f16", kv_cache="static", prefill_gemm="library")
    layers = config.num_hidden_layers
    per_layer = {**prefill_calls_per_layer(False, functions.GEMM_NT), functions.KV_PREFILL_ATTENTION_ROPE: 1}
    assert {name for name, count in per_layer.items() if count} <= set(artifact.functions)
    assert functions.KV_PREFILL_ATTENTION not in artifact.functions
    calls = {name: library_calls(name) for name in per_layer}
    norms = library_calls(functions.RMS_NORM)
    reference = Reference(gqa_checkpoint)
    prompt = np.random.default_rng(6).integers(0, config.vocab_size, 40).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]
    with open_session(artifact, open_source(config, gqa_checkpoint)) as session:
        gen = Generator(session, max_batch=2, max_total_len=96, prefill_chunk=16)
        assert relative_error(gen.teacher_forced_logits(tokens, 40), reference.logits(tokens)) <= 1e-2
        for each in (*calls.values(), norms):
            each.clear()
        assert gen.generate([prompt], STEPS).tokens[0] == continuation
    chunks = -(-len(prompt) // 16)  # the prompt's chunks (at 0, 16 and 32: the later ones attend to the earlier)
    last_row = {**prefill_calls_last_row(layers, functions.GEMM_NT), functions.KV_PREFILL_ATTENTION_ROPE: layers}
    assert {name: len(each) for name, each in calls.items()} == {name: count * chunks for name, count in last_row.items()}
    assert len(norms) == chunks  # each chunk's first norm (the others come with the adds; decode_norm is tir on llvm)


def test_tir_prefill_calls_no_library(compiled, tiny_checkpoint, gemm_calls):
    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, "q0f32", prefill_gemm="tir")
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=64)
    gen.generate([[1, 2, 3, 4]], 2)
    assert gemm_calls == []


def test_library_prefill_in_disco_workers(compiled, tiny_checkpoint):
    """tp=2 over the CPU CCL: every worker registers the library GEMM itself."""
    from engine.disco import DiscoSession

    config = from_hf_folder(tiny_checkpoint)
    reference = Reference(tiny_checkpoint)
    prompt = list(range(5, 5 + PROMPT))
    session = DiscoSession(compiled(config, "q0f32", tp=2, prefill_gemm="library"), open_source(config, tiny_checkpoint))
    try:
        gen = Generator(session, max_batch=2, max_total_len=128, prefill_chunk=64)
        assert gen.generate([prompt], STEPS).tokens[0] == reference.greedy(prompt, STEPS)
    finally:
        session.close()


def test_library_decode_norm_matches_transformers(compiled, tiny_checkpoint, library_calls):
    """decode_norm=library: every RMSNorm of a decode step (two a layer and the final one) is
    `lab.norm.rms` (its NumPy version here), the prefill's stay TVM's (prefill_gemm=tir) but on its
    last row, and the logits and greedy tokens match transformers."""
    from engine.quantize import quant_spec

    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, "q4f16_1", decode_norm="library")
    assert artifact.spec.decode_norm == "library" and functions.RMS_NORM in artifact.functions
    per_step = 2 * config.num_hidden_layers + 1
    calls = library_calls(functions.RMS_NORM, record=lambda x, weight, eps, out: tuple(x.shape))
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=64)
    reference = Reference(tiny_checkpoint, quant_spec("q4f16_1"))
    prompt = np.random.default_rng(5).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]
    assert relative_error(gen.teacher_forced_logits(tokens, PROMPT), reference.logits(tokens)) <= 1e-2
    assert len(calls) == (STEPS - 1) * per_step and all(shape[-1] == config.hidden_size for shape in calls)
    calls.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation
    # the prefill's are TVM's but for its last row's two (the last layer's post-attention norm and the
    # final one: that layer finishes on the last row as a decode step does, LlamaModel.forward)
    assert len(calls) == (STEPS - 1) * per_step + 2


def test_bad_prefill_gemm_is_refused(tiny_config):
    from engine.compile import BuildSpec
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="prefill_gemm"):
        BuildSpec(tiny_config, "q0f32", prefill_gemm="cutlass")
    assert BuildSpec(tiny_config, "q0f32").prefill_gemm == "tir"
    assert BuildSpec(tiny_config, "q0f32", target="cuda").prefill_gemm == "library"


@pytest.fixture
def gemv_calls(library_calls):
    """The calls of each library decode GEMV (every width, plain, fused and early) in this process, by name."""
    return {name: library_calls(name) for name in [*functions.GEMV.values(), *functions.GEMV_EARLY.values()]}


@pytest.mark.parametrize("quant, bits, kv_cache, norm", [("q4f16_1", 4, "paged", "tir"), ("q8f16_1", 8, "paged", "tir"),
                                                         ("q4f16_1", 4, "static", "tir"),
                                                         ("q4f16_1", 4, "static", "library")])
def test_library_decode_gemv_matches_transformers(compiled, tiny_checkpoint, gemv_calls, library_calls, quant, bits,
                                                  kv_cache, norm):
    """decode_gemv=library: the batch-1 decode's quantized linears and LM head call the library's
    GEMVs of their width, with the SiLU after gate_up and the residual adds after the o and down
    projections inside them (lab.gemv.q4_swiglu, q4_add; the early one, q4_add_early, for the down
    projection after gate_up's and for the o projection after the static cache's attention); with
    decode_norm=library the RMSNorm after each add split over the GEMVs around it (q4_add_sq,
    q4_add_sq_early start it, q4_rms and q4_swiglu_rms finish it: no lab.norm.rms in a step but
    the first layer's); the logits match transformers on the quantized-then-dequantized weights."""
    from engine.quantize import quant_spec

    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, quant, decode_gemv="library", kv_cache=kv_cache, decode_norm=norm)
    layers = config.num_hidden_layers
    split = norm == "library"
    plain, swiglu = functions.GEMV[bits, ""], functions.GEMV[bits, "swiglu"]
    add = "add_sq" if split else "add"
    # qkv and the LM head; gate_up; o (early after the static cache's attention); down (early after gate_up)
    o = functions.GEMV_EARLY[bits, add] if kv_cache == "static" else functions.GEMV[bits, add]
    if split:  # the first layer's qkv takes lab.norm.rms's output; the others and the LM head a pending norm
        per_step = {plain: 1, functions.GEMV[bits, "rms"]: layers, functions.GEMV[bits, "swiglu_rms"]: layers}
    else:
        per_step = {plain: layers + 1, swiglu: layers}
    per_step[o] = layers
    per_step[functions.GEMV_EARLY[bits, add]] = per_step.get(functions.GEMV_EARLY[bits, add], 0) + layers
    assert artifact.spec.decode_gemv == "library" and set(per_step) <= set(artifact.functions)
    norms = library_calls(functions.RMS_NORM)
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=64)
    reference = Reference(tiny_checkpoint, quant_spec(quant))
    prompt = np.random.default_rng(4).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]
    for calls in [*gemv_calls.values(), norms]:
        calls.clear()
    assert relative_error(gen.teacher_forced_logits(tokens, PROMPT), reference.logits(tokens)) <= 1e-2
    assert {name: len(calls) for name, calls in gemv_calls.items() if calls} == \
        {name: (STEPS - 1) * count for name, count in per_step.items()}
    assert len(norms) == (STEPS - 1 if split else 0)  # the first layer's input norm alone

    for calls in [*gemv_calls.values(), norms]:
        calls.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation
    # the prefill's one-row LM head is a library GEMV too, and so are its last layer's o projection
    # (with its add; not early: a row copy is ahead of it), gate_up and down on the last row
    # (LlamaModel.forward, last_row_only); with the norms split, the norms after those adds in them
    prefill = collections.Counter({functions.GEMV[bits, "rms"] if split else plain: 1,
                                   functions.GEMV[bits, "swiglu_rms"] if split else swiglu: 1,
                                   functions.GEMV[bits, add]: 1, functions.GEMV_EARLY[bits, add]: 1})
    assert {name: len(calls) for name, calls in gemv_calls.items() if calls} == \
        {name: (STEPS - 1) * per_step.get(name, 0) + prefill[name] for name in {*per_step, *prefill}}
    assert len(norms) == (STEPS - 1 if split else 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_gemvs_compute_their_definitions(bits):
    """Each fused decode GEMV (functions.GEMV_FUSIONS) equals its definition computed here with
    NumPy from the dequantized weight: the plain product rounded once; _add the residual added to
    the float32 product before that rounding; _swiglu silu(gate) * up of the product's two halves,
    each rounded to float16 as the separate kernels round. (The CPU versions that the CUDA kernels
    are checked against on the box, bench.gemv.)"""
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize

    spec = quant_spec(f"q{bits}f16_1")
    rng = np.random.default_rng(bits)
    n, k = 48, 64
    q_weight, q_scale = quantize(rng.standard_normal((n, k)).astype(np.float32), spec)
    dense = dequantize(q_weight, q_scale, spec).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float16)
    residual = rng.standard_normal((1, n)).astype(np.float16)
    functions.register("llvm", [functions.GEMV[bits, f] for f in functions.GEMV_FUSIONS])

    def call(fusion, *extra, outputs=n):
        out = np.zeros((1, outputs), np.float16)
        args = [tvm_ffi.from_dlpack(a) for a in (x, q_weight, q_scale, *extra, out)]
        tvm_ffi.get_global_func(functions.GEMV[bits, fusion])(*args)
        return out

    product = x.astype(np.float32) @ dense.T
    gate, up = product[:, : n // 2].astype(np.float16).astype(np.float32), product[:, n // 2:].astype(np.float16)
    silu = (gate / (1 + np.exp(-gate))).astype(np.float16)
    swiglu = (silu.astype(np.float32) * up.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(call(""), product.astype(np.float16))
    np.testing.assert_array_equal(call("add", residual), (product + residual.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(call("swiglu", outputs=n // 2), swiglu)
    assert not np.array_equal(swiglu, gate.astype(np.float16))  # the SiLU changes the result: the test sees it


@pytest.mark.parametrize("bits", [4, 8])
def test_split_norm_gemvs_compute_their_definitions(bits):
    """The RMSNorm split over the GEMVs around it: _add_sq writes total = residual + W x (rounded),
    scaled = total * norm_weight (rounded) and adds sum(total^2) into its norm site, zeroing the
    other; _rms and _swiglu_rms multiply scaled's product by 1 / sqrt(site's sum / K + eps) before
    anything else. Computed here with NumPy from the dequantized weights; a site holds one add_sq's
    sum, and the one zeroed makes the product's scale 1 / sqrt(eps)."""
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize

    spec = quant_spec(f"q{bits}f16_1")
    rng = np.random.default_rng(20 + bits)
    k, h, n = 64, 96, 48  # the add_sq GEMV's input, its output (the norm's width), the next GEMV's output
    weights = [quantize(rng.standard_normal(shape).astype(np.float32), spec) for shape in ((h, k), (n, h))]
    dense = [dequantize(*w, spec).astype(np.float32) for w in weights]
    x = rng.standard_normal((1, k)).astype(np.float16)
    residual = rng.standard_normal((1, h)).astype(np.float16)
    norm_weight = (1 + 0.1 * rng.standard_normal(h)).astype(np.float16)
    eps = 1e-5
    functions.register("llvm", [functions.GEMV[bits, f] for f in functions.GEMV_FUSIONS])

    def fn(fusion):
        return tvm_ffi.get_global_func(functions.GEMV[bits, fusion])

    def arrays(*a):
        return [tvm_ffi.from_dlpack(t) if isinstance(t, np.ndarray) else t for t in a]

    def add_sq(site):
        total, scaled = np.zeros((1, h), np.float16), np.zeros((1, h), np.float16)
        fn("add_sq")(*arrays(x, *weights[0], residual, norm_weight, site, total, scaled))
        return total, scaled

    def finish(fusion, scaled, site, epsilon=eps):
        out = np.zeros((1, n // 2 if "swiglu" in fusion else n), np.float16)
        fn(fusion)(*arrays(scaled, *weights[1], site, epsilon, out))
        return out

    add_sq(1)  # site 1 holds a sum, site 0 is zero
    total, scaled = add_sq(0)  # site 0 holds this sum, site 1 is zero again
    expected_total = (x.astype(np.float32) @ dense[0].T + residual.astype(np.float32)).astype(np.float16)
    t32 = expected_total.astype(np.float32)
    np.testing.assert_array_equal(total, expected_total)
    np.testing.assert_array_equal(scaled, (t32 * norm_weight.astype(np.float32)).astype(np.float16))

    product = scaled.astype(np.float32) @ dense[1].T
    inv_rms = np.float32(1 / np.sqrt(np.float32(np.square(t32).sum(dtype=np.float32)) / h + eps))
    np.testing.assert_allclose(finish("rms", scaled, 0), (product * inv_rms).astype(np.float16), rtol=1e-3, atol=1e-3)
    gate, up = np.split((product * inv_rms).astype(np.float16), 2, axis=-1)
    silu = (gate.astype(np.float32) / (1 + np.exp(-gate.astype(np.float32)))).astype(np.float16)
    swiglu = (silu.astype(np.float32) * up.astype(np.float32)).astype(np.float16)
    np.testing.assert_allclose(finish("swiglu_rms", scaled, 0), swiglu, rtol=1e-3, atol=1e-3)
    # the zeroed site: the product scaled by 1 / sqrt(0 + epsilon), here 1 / 2
    np.testing.assert_allclose(finish("rms", scaled, 1, epsilon=4.0), (product / 2).astype(np.float16), rtol=1e-3,
                               atol=1e-3)
    with pytest.raises(Exception, match="norm site"):
        finish("rms", scaled, 2)
    add_sq(1)  # site 0 zero again, as a decode step leaves it: the next model's o projection adds into it


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_gemm_is_the_product_of_the_float16_weight(bits):
    """lab.gemm.q4 / q8 (the prefill's quantized linears) compute x W^T with W dequantized and
    rounded to float16 first (what both CUDA paths multiply: the fused kernel's shared tiles, the
    dequant path's workspace), float32 sums, one rounding; the workspace is scratch. Computed here
    with NumPy from the definitions (the CPU version the CUDA paths are checked against on the box,
    bench.prefill_gemm)."""
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize

    spec = quant_spec(f"q{bits}f16_1")
    rng = np.random.default_rng(10 + bits)
    m, n, k = 5, 48, 128
    q_weight, q_scale = quantize(rng.standard_normal((n, k)).astype(np.float32), spec)
    x = rng.standard_normal((1, m, k)).astype(np.float16)
    out = np.zeros((1, m, n), np.float16)
    workspace = np.zeros((n, k), np.float16)
    functions.register("llvm", [functions.GEMM_BY_BITS[bits]])
    tvm_ffi.get_global_func(functions.GEMM_BY_BITS[bits])(
        *[tvm_ffi.from_dlpack(a) for a in (x, q_weight, q_scale, out, workspace)])
    weight = dequantize(q_weight, q_scale, spec).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out, (x.astype(np.float32) @ weight.T).astype(np.float16))
    # float16 rounding of the weight matters: it is not the float32 product of the exact weight
    assert not np.array_equal(weight, dequantize(q_weight, q_scale, spec))


def test_quant_gemm_path_choice():
    """`lab.gemm.quant_path` chooses the CUDA quantized GEMM's path for a process (the benchmarks
    time each): it returns the previous choice and refuses any other name, on every target."""
    import tvm_ffi

    functions.register("llvm", [functions.QUANT_GEMM_PATH])
    choose = tvm_ffi.get_global_func(functions.QUANT_GEMM_PATH)
    assert choose("fused") == "auto"
    assert choose("dequant") == "fused"
    with pytest.raises(Exception, match="auto, fused, dequant"):
        choose("marlin")
    assert choose("auto") == "dequant"


def test_swiglu_is_llama_mlps_float16_activation():
    """lab.swiglu (its NumPy version; the CUDA kernel is held to torch on the box by
    bench.prefill_gemm) equals what transformers' LlamaMLP computes in float16 on gate_up's halves:
    act_fn(gate) * up, each op rounded to float16 (torch's silu and mul on the CPU: float32 inside).
    Not the float32 product rounded once: that rounding differs, and the test sees it."""
    import torch
    import tvm_ffi
    from transformers.activations import ACT2FN

    rng = np.random.default_rng(7)
    gate_up = (rng.standard_normal((2, 9, 2 * 48)) * 3).astype(np.float16)
    out = np.zeros((2, 9, 48), np.float16)
    functions.register("llvm", [functions.SWIGLU])
    tvm_ffi.get_global_func(functions.SWIGLU)(tvm_ffi.from_dlpack(gate_up), tvm_ffi.from_dlpack(out))
    gate, up = torch.from_numpy(gate_up).chunk(2, dim=-1)
    want = (ACT2FN["silu"](gate) * up).numpy()
    assert want.dtype == np.float16
    # torch's exp and NumPy's may differ in the last bit of a float32, which can move a float16
    # rounding by one ulp (rarely: a handful of 864 values at most)
    ulps = np.abs(out.view(np.int16).astype(np.int32) - want.view(np.int16).astype(np.int32))
    assert ulps.max() <= 1 and (ulps > 0).mean() < 0.01
    g, u = gate.float().numpy(), up.float().numpy()
    once = (g / (1 + np.exp(-g)) * u).astype(np.float16)
    assert not np.array_equal(once, want)


def test_add_rms_norm_rounds_as_transformers():
    """lab.norm.add_rms: total = residual + partial rounded to float16 (transformers' residual add),
    normed = LlamaRMSNorm(total) as transformers computes it in float16 (the normalised row rounded,
    then times the weight, rounded). The CPU version against transformers' module on the same
    values: the sum bit for bit, the norm within one float16 ulp (torch's and NumPy's float32 mean
    and rsqrt may differ in the last bit)."""
    import torch
    import tvm_ffi
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(8)
    partial = (rng.standard_normal((2, 9, 64)) * 3).astype(np.float16)
    residual = (rng.standard_normal((2, 9, 64)) * 3).astype(np.float16)
    weight = (1 + 0.1 * rng.standard_normal(64)).astype(np.float16)
    total, normed = np.zeros_like(partial), np.zeros_like(partial)
    functions.register("llvm", [functions.ADD_RMS_NORM])
    tvm_ffi.get_global_func(functions.ADD_RMS_NORM)(*[tvm_ffi.from_dlpack(a) for a in (partial, residual, weight)], 1e-5,
                                                    tvm_ffi.from_dlpack(total), tvm_ffi.from_dlpack(normed))
    want_total = torch.from_numpy(residual) + torch.from_numpy(partial)
    np.testing.assert_array_equal(total, want_total.numpy())
    norm = LlamaRMSNorm(64, eps=1e-5).half()
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(weight))
        want_normed = norm(want_total).numpy()
    ulps = np.abs(normed.view(np.int16).astype(np.int32) - want_normed.view(np.int16).astype(np.int32))
    assert ulps.max() <= 1 and (ulps > 0).mean() < 0.02
