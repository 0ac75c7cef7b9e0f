"""The compiled engine against transformers, on real tiny models compiled for llvm."""

import numpy as np
import pytest

from engine.config import from_hf_folder
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import open_source
from harness.oracle import Reference, confident_agreement, relative_error

PROMPT, STEPS = 24, 16


def _run(compiled, folder, quant, prefill_chunk=64):
    config = from_hf_folder(folder)
    session = VMSession(compiled(config, quant), open_source(config, folder))
    return config, Generator(session, max_batch=4, max_total_len=256, prefill_chunk=prefill_chunk)


def _stream(folder, reference, config, seed=0):
    prompt = np.random.default_rng(seed).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    return prompt, continuation, prompt + continuation[:-1]


@pytest.fixture(params=["tiny", "gqa"])
def checkpoint(request, tiny_checkpoint, gqa_checkpoint):
    return tiny_checkpoint if request.param == "tiny" else gqa_checkpoint


@pytest.mark.parametrize("quant,tolerance", [("q0f32", 1e-4), ("q0f16", 1e-2)])
def test_unquantized_matches_transformers(compiled, checkpoint, quant, tolerance):
    config, gen = _run(compiled, checkpoint, quant)
    reference = Reference(checkpoint)
    prompt, continuation, tokens = _stream(checkpoint, reference, config)
    logits = gen.teacher_forced_logits(tokens, PROMPT)
    ref = reference.logits(tokens)
    assert logits.shape == ref.shape == (len(tokens), config.vocab_size)
    assert relative_error(logits, ref) <= tolerance
    assert confident_agreement(logits, ref)[0] == 1.0
    assert gen.generate([prompt], STEPS).tokens[0] == continuation


@pytest.mark.parametrize("quant", ["q8f16_1", "q4f16_1"])
def test_quantized_kernels_compute_the_dequantized_model(compiled, tiny_checkpoint, quant):
    """Against transformers run with quantized-then-dequantized weights: tests the fused kernels."""
    from engine.quantize import quant_spec

    config, gen = _run(compiled, tiny_checkpoint, quant)
    reference = Reference(tiny_checkpoint, quant_spec(quant))
    prompt, continuation, tokens = _stream(tiny_checkpoint, reference, config)
    logits = gen.teacher_forced_logits(tokens, PROMPT)
    assert relative_error(logits, reference.logits(tokens)) <= 1e-2
    assert gen.generate([prompt], STEPS).tokens[0] == continuation


def test_quantization_error_q8_well_under_q4(compiled, tiny_checkpoint):
    """Error against the original (unquantized) weights. Measured on this checkpoint (2026-11-26):
    q8f16_1 3.3e-2, q4f16_1 4.9e-1 relative max logits error."""
    reference = Reference(tiny_checkpoint)
    config = from_hf_folder(tiny_checkpoint)
    _, _, tokens = _stream(tiny_checkpoint, reference, config)
    ref = reference.logits(tokens)
    errors = {q: relative_error(_run(compiled, tiny_checkpoint, q)[1].teacher_forced_logits(tokens, PROMPT), ref)
              for q in ("q8f16_1", "q4f16_1")}
    assert errors["q8f16_1"] < 0.08
    assert errors["q4f16_1"] < 1.0
    assert errors["q8f16_1"] * 5 < errors["q4f16_1"]


def test_decode_steps_equal_a_full_sequence_forward(compiled, tiny_checkpoint):
    """KV cache correctness: logits from decode steps over cached K/V equal one prefill of everything."""
    config, gen = _run(compiled, tiny_checkpoint, "q0f32")
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, 40).tolist()
    stepwise = gen.teacher_forced_logits(tokens, 8)
    gen.reset()
    gen.add_sequence(0)
    whole = gen.prefill(0, tokens, all_logits=True)
    np.testing.assert_allclose(stepwise, whole, rtol=0, atol=1e-4 * np.abs(whole).max())


def test_chunked_prefill_equals_one_prefill(compiled, tiny_checkpoint):
    config, one = _run(compiled, tiny_checkpoint, "q0f32", prefill_chunk=64)
    _, chunked = _run(compiled, tiny_checkpoint, "q0f32", prefill_chunk=7)
    prompt = np.random.default_rng(4).integers(0, config.vocab_size, 30).tolist()
    a, b = one.generate([prompt], 6), chunked.generate([prompt], 6)
    assert a.tokens == b.tokens
    assert len(b.prefill_steps) == 5 and len(a.prefill_steps) == 1


def test_batched_decode_equals_single_sequences(compiled, tiny_checkpoint):
    config, gen = _run(compiled, tiny_checkpoint, "q0f32")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 17, 11)]
    batched = gen.generate(prompts, 8)
    assert all(s.tokens == 3 for s in batched.decode_steps)
    for prompt, tokens in zip(prompts, batched.tokens):
        assert gen.generate([prompt], 8).tokens[0] == tokens


def test_timing_hooks_see_every_step(compiled, tiny_checkpoint):
    config, gen = _run(compiled, tiny_checkpoint, "q0f16")
    seen = []
    gen.hooks.append(seen.append)
    result = gen.generate([[1, 2, 3, 4]], 5)
    assert [s.kind for s in seen] == ["prefill"] + ["decode"] * 4
    assert all(s.end > s.start for s in seen) and result.steps == seen


def test_context_overflow_is_refused(compiled, tiny_checkpoint):
    from engine.config import ConfigError

    _, gen = _run(compiled, tiny_checkpoint, "q0f16")
    with pytest.raises(ConfigError, match="KV cache"):
        gen.generate([list(range(250))], 10)


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["tiny", "llama3-8b"])
def test_cuda_target_compiles_without_a_gpu(tmp_path, monkeypatch, preset_name):
    """Build on a CPU host: the CUDA artifact is written here and loads on a GPU node."""
    from engine.compile import BuildSpec, compile_model
    from engine.config import preset

    monkeypatch.setenv("LAB_PRECOMPILE_CUBINS", "0")  # nvcc'ing every kernel takes minutes on 2 cores
    artifact = compile_model(BuildSpec(preset(preset_name), "q4f16_1", 1, "cuda", "sm_90"), tmp_path)
    assert artifact.library.stat().st_size > 100_000
    assert artifact.spec.target == "cuda" and artifact.spec.cuda_arch == "sm_90"
    names = artifact.param_names
    assert "model.layers.0.mlp.down_proj.q_weight" in names and "lm_head.q_scale" in names


def test_a_runtime_only_tvm_names_the_missing_artifact(tiny_config, tmp_path, monkeypatch):
    """On a GPU node's runtime-only TVM a cache miss is one line naming the fix, not an import
    error from deep inside TVM's compiler."""
    from engine.compile import BuildSpec, compile_model
    from engine.config import ConfigError

    monkeypatch.setenv("TVM_USE_RUNTIME_LIB", "1")
    with pytest.raises(ConfigError, match="no compiled artifact tiny-q0f32-tp1-llvm-.* runtime-only .* bench.build_artifacts"):
        compile_model(BuildSpec(tiny_config, "q0f32"), tmp_path)


def test_greedy_divergence_is_judged_at_its_first_step():
    """experiments.verify's greedy criterion (harness.oracle.greedy_divergence): continuations that
    first differ where the reference's top-2 margin is within twice the logits difference are a
    near-tie (a legitimate float16 flip); a difference at a confident row is not, and later steps
    are not judged (after a flip the continuations go their own ways)."""
    from harness.oracle import greedy_divergence

    vocab, first_row = 8, 3
    reference = np.zeros((first_row + 4, vocab), np.float32)
    reference[:, 1] = 1.0  # every row: token 1 by a margin of 1
    engine = reference + 0.01
    tokens = [1, 1, 1, 1]
    assert greedy_divergence(tokens, tokens, engine, reference, first_row) == (None, False)
    # step 2 differs where the reference is confident: not a near-tie
    assert greedy_divergence([1, 1, 5, 5], tokens, engine, reference, first_row) == (2, False)
    # the same step at a near-tie: tokens 1 and 5 within 0.005, the engine 0.01 off
    reference[first_row + 2, 5] = 0.995
    assert greedy_divergence([1, 1, 5, 7], tokens, engine, reference, first_row) == (2, True)
    # a confident difference before the near-tie decides
    assert greedy_divergence([1, 6, 5, 7], tokens, engine, reference, first_row) == (1, False)
