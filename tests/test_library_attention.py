"""prefill_attention=library: the KV cache's prefill self-attention is `lab.attention.prefill_ragged`
(cuBLAS + a softmax kernel on CUDA; NumPy here), and the model still computes what transformers
computes, also when a later prompt chunk attends to earlier ones in the cache (TVM merges the two
attentions by their log-sum-exp, which the library function must give in TVM's base 2)."""

import numpy as np
import pytest
import tvm_ffi

from engine.config import from_hf_folder
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import open_source
from experiments.oracle import Reference, relative_error
from runtime_patch import attention

PROMPT, CHUNK, STEPS = 40, 16, 6  # three prefill chunks: the 2nd and 3rd have a prefix in the cache


@pytest.fixture
def attention_calls():
    """Counts the calls of lab.attention.prefill_ragged in this process (the NumPy one, wrapped)."""
    attention.register("llvm")
    calls = []

    def counting(q, q_indptr, k, *rest):
        calls.append((tuple(q.shape), tuple(k.shape)))
        attention._numpy_prefill_ragged(q, q_indptr, k, *rest)

    tvm_ffi.register_global_func(attention.FUNCTION, counting, override=True)
    yield calls
    tvm_ffi.register_global_func(attention.FUNCTION, attention._numpy_prefill_ragged, override=True)


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "gqa_checkpoint"])
def test_library_attention_matches_transformers(compiled, request, attention_calls, checkpoint):
    path = request.getfixturevalue(checkpoint)
    config = from_hf_folder(path)
    artifact = compiled(config, "q0f32", prefill_attention="library")
    assert artifact.metadata["prefill_attention"] == "library"
    gen = Generator(VMSession(artifact, open_source(config, path)), max_batch=2, max_total_len=128,
                    prefill_chunk=CHUNK)
    reference = Reference(path)
    prompt = np.random.default_rng(5).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]

    logits = gen.teacher_forced_logits(tokens, PROMPT)
    assert relative_error(logits, reference.logits(tokens)) <= 1e-4
    chunks = -(-PROMPT // CHUNK)
    assert len(attention_calls) == chunks * config.num_hidden_layers  # every prefill chunk, no decode step
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert attention_calls[0] == ((CHUNK, q_heads, config.head_dim), (CHUNK, kv_heads, config.head_dim))

    attention_calls.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation
    assert len(attention_calls) == chunks * config.num_hidden_layers


def test_tir_attention_calls_no_library(compiled, tiny_checkpoint, attention_calls):
    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, "q0f32", prefill_attention="tir")
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=CHUNK)
    gen.generate([[1, 2, 3, 4]], 2)
    assert attention_calls == []


def test_library_attention_in_disco_workers(compiled, tiny_checkpoint):
    """tp=2 over the CPU CCL: every worker registers the library attention itself."""
    from engine.disco import DiscoSession

    config = from_hf_folder(tiny_checkpoint)
    reference = Reference(tiny_checkpoint)
    prompt = list(range(7, 7 + PROMPT))
    session = DiscoSession(compiled(config, "q0f32", tp=2, prefill_attention="library"),
                           open_source(config, tiny_checkpoint))
    try:
        gen = Generator(session, max_batch=2, max_total_len=128, prefill_chunk=CHUNK)
        assert gen.generate([prompt], STEPS).tokens[0] == reference.greedy(prompt, STEPS)
    finally:
        session.close()


def test_prefill_attention_choice(tiny_config):
    from engine.compile import BuildSpec, export
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="prefill_attention"):
        BuildSpec(tiny_config, "q0f32", prefill_attention="flash")
    assert BuildSpec(tiny_config, "q0f32").prefill_attention == "tir"
    cuda = BuildSpec(tiny_config, "q0f16", target="cuda")
    assert cuda.prefill_attention == "library"
    assert cuda.key() != BuildSpec(tiny_config, "q0f16", target="cuda", prefill_attention="tir").key()
    mod, _ = export(cuda)
    create = mod["create_kv_cache"].script()
    assert f'R.ExternFunc("{attention.FUNCTION}")' in create
    assert "batch_prefill_paged_kv" in create  # attention over cached pages stays TVM's
