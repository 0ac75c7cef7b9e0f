"""prefill_gemm=library: the prefill linears call `lab.gemm.nt` (cuBLAS on CUDA; NumPy here),
and the model still computes what transformers computes."""

import numpy as np
import pytest

from engine.config import from_hf_folder
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from runtime_patch import functions

PROMPT, STEPS = 24, 8


@pytest.fixture
def gemm_calls(library_calls):
    """The weight shape of each call of lab.gemm.nt in this process."""
    return library_calls(functions.GEMM_NT, lambda x, w, out: tuple(w.shape))


@pytest.fixture
def dequant_calls(library_calls):
    """The packed weight shape of each call of lab.dequant.q4 / q8 in this process, by name."""
    return {name: library_calls(name, lambda w, scale, out: tuple(w.shape))
            for name in (functions.DEQUANT_Q4, functions.DEQUANT_Q8)}


@pytest.mark.parametrize("quant,tolerance", [("q0f32", 1e-4), ("q4f16_1", 1e-2), ("q8f16_1", 1e-2)])
def test_library_prefill_matches_transformers(compiled, tiny_checkpoint, gemm_calls, dequant_calls, quant, tolerance):
    """The prefill's linears through lab.gemm.nt; a quantized weight first through the library's
    dequantize of its width (lab.dequant.q4 / q8), one call per GEMM."""
    from engine.quantize import quant_spec

    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, quant, prefill_gemm="library")
    assert artifact.spec.prefill_gemm == "library" and functions.GEMM_NT in artifact.functions
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=64)
    reference = Reference(tiny_checkpoint, quant_spec(quant) if quant != "q0f32" else None)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]

    logits = gen.teacher_forced_logits(tokens, PROMPT)
    assert relative_error(logits, reference.logits(tokens)) <= tolerance
    # prefill_logits: four linears per layer and the LM head (untied), all through the library
    per_layer = 4 * config.num_hidden_layers
    assert len(gemm_calls) >= per_layer + (0 if config.tie_word_embeddings else 1)

    gemm_calls.clear()
    for calls in dequant_calls.values():
        calls.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation
    # prefill: the layers' linears (its one-row LM head stays a GEMV); decode steps: none
    assert len(gemm_calls) == per_layer
    bits = quant_spec(quant).bits
    for bits_of, name in functions.DEQUANT_BY_BITS.items():
        assert len(dequant_calls[name]) == (per_layer if bits_of == bits else 0)


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


def test_bad_prefill_gemm_is_refused(tiny_config):
    from engine.compile import BuildSpec
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="prefill_gemm"):
        BuildSpec(tiny_config, "q0f32", prefill_gemm="cutlass")
    assert BuildSpec(tiny_config, "q0f32").prefill_gemm == "tir"
    assert BuildSpec(tiny_config, "q0f32", target="cuda").prefill_gemm == "library"


@pytest.fixture
def gemv_calls(library_calls):
    """The calls of each library decode GEMV (every width and variant) in this process, by name."""
    return {functions.gemv_name(bits, *variant): library_calls(functions.gemv_name(bits, *variant))
            for bits in functions.GEMV_BY_BITS for variant in functions.GEMV_VARIANTS}


@pytest.mark.parametrize("quant, bits", [("q4f16_1", 4), ("q8f16_1", 8)])
def test_library_decode_gemv_matches_transformers(compiled, tiny_checkpoint, gemv_calls, quant, bits):
    """decode_gemv=library: the batch-1 decode's quantized linears and LM head call the library's
    GEMVs of their width, each layer's RMSNorms, SiLU-and-multiply and residual adds inside them
    (lab.gemv.q4_rms_norm for qkv and gate_up, q4_add for o, q4_silu_mul_add for down; plain q4 for
    the LM head), and the logits match transformers on the quantized-then-dequantized weights."""
    from engine.quantize import quant_spec

    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, quant, decode_gemv="library")
    layers = config.num_hidden_layers
    per_step = {functions.gemv_name(bits, "rms_norm"): 2 * layers, functions.gemv_name(bits, add=True): layers,
                functions.gemv_name(bits, "silu_mul", True): layers, functions.gemv_name(bits): 1}
    assert artifact.spec.decode_gemv == "library" and set(per_step) <= set(artifact.functions)
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=64)
    reference = Reference(tiny_checkpoint, quant_spec(quant))
    prompt = np.random.default_rng(4).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]
    for calls in gemv_calls.values():
        calls.clear()
    assert relative_error(gen.teacher_forced_logits(tokens, PROMPT), reference.logits(tokens)) <= 1e-2
    # per decode step; the prefill's one-row LM head is a plain GEMV too
    assert {name: len(calls) for name, calls in gemv_calls.items() if calls} == \
        {name: (STEPS - 1) * count for name, count in per_step.items()}

    for calls in gemv_calls.values():
        calls.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation
    plain = functions.gemv_name(bits)
    assert {name: len(calls) for name, calls in gemv_calls.items() if calls} == \
        {name: (STEPS - 1) * count + (name == plain) for name, count in per_step.items()}


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_gemv_inputs_and_residual(bits):
    """Each fused GEMV equals the separate operations it replaces, computed here with NumPy from
    their definitions (transformers' RMSNorm and SiLU roundings): the CPU versions the CUDA kernels
    are checked against on the box (bench.gemv)."""
    import tvm_ffi

    from engine.quantize import dequantize, quant_spec, quantize

    spec = quant_spec(f"q{bits}f16_1")
    rng = np.random.default_rng(bits)
    n, k, eps = 48, 64, 1e-5
    q_weight, q_scale = quantize(rng.standard_normal((n, k)).astype(np.float32), spec)
    dense = dequantize(q_weight, q_scale, spec).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float16)
    gate_up = rng.standard_normal((1, 2 * k)).astype(np.float16)
    norm_weight = rng.standard_normal(k).astype(np.float16)
    residual = rng.standard_normal((1, n)).astype(np.float16)
    functions.register("llvm", list(functions.GEMV_FUSED) + [functions.gemv_name(bits)])

    def run(name, *args):
        out = np.zeros((1, n), np.float16)
        tvm_ffi.get_global_func(name)(*[tvm_ffi.from_dlpack(a) if isinstance(a, np.ndarray) else a for a in args],
                                      tvm_ffi.from_dlpack(out))
        return out.astype(np.float32)

    xf = x.astype(np.float32)
    normed = (xf / np.sqrt((xf * xf).mean() + eps)).astype(np.float16).astype(np.float32) * norm_weight
    gate, up = gate_up[:, :k].astype(np.float32), gate_up[:, k:].astype(np.float32)
    silu_mul = ((gate / (1 + np.exp(-gate))).astype(np.float16).astype(np.float32) * up).astype(np.float16)
    want = {
        functions.gemv_name(bits): xf @ dense.T,
        functions.gemv_name(bits, "rms_norm"): normed.astype(np.float16).astype(np.float32) @ dense.T,
        functions.gemv_name(bits, add=True): xf @ dense.T + residual,
        functions.gemv_name(bits, "silu_mul"): silu_mul.astype(np.float32) @ dense.T,
        functions.gemv_name(bits, "silu_mul", True): silu_mul.astype(np.float32) @ dense.T + residual,
    }
    args = {
        functions.gemv_name(bits): (x, q_weight, q_scale),
        functions.gemv_name(bits, "rms_norm"): (x, norm_weight, eps, q_weight, q_scale),
        functions.gemv_name(bits, add=True): (x, q_weight, q_scale, residual),
        functions.gemv_name(bits, "silu_mul"): (gate_up, q_weight, q_scale),
        functions.gemv_name(bits, "silu_mul", True): (gate_up, q_weight, q_scale, residual),
    }
    assert set(want) == {functions.gemv_name(bits, *v) for v in functions.GEMV_VARIANTS}
    for name, expected in want.items():
        got = run(name, *args[name])
        assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max() + 1e-3, name
