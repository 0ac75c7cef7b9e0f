"""prefill_attention / decode_attention = library: the KV cache's attention kernels are
`lab.attention.prefill_ragged` and `lab.attention.decode_paged` (CUDA kernels and cuBLAS on the
GPU; NumPy here), and the model still computes what transformers computes, also when a later
prompt chunk attends to earlier ones in the cache (TVM merges the two attentions by their
log-sum-exp, which the library functions must give in TVM's base 2)."""

import collections

import numpy as np
import pytest

from engine.config import from_hf_folder
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from runtime_patch import functions

PROMPT, CHUNK, STEPS = 40, 16, 6  # three prefill chunks: the 2nd and 3rd have a prefix in the cache
LIBRARY = {"prefill_attention": "library", "decode_attention": "library"}


class _Counts:
    """Calls of each library attention function in this process, as a Counter."""

    def __init__(self, library_calls):
        self.calls = {name: library_calls(name) for name in (functions.PREFILL_RAGGED, functions.DECODE_PAGED)}

    def counts(self) -> collections.Counter:
        return collections.Counter({name: len(c) for name, c in self.calls.items() if c})

    def clear(self) -> None:
        for c in self.calls.values():
            c.clear()


@pytest.fixture
def attention_calls(library_calls):
    return _Counts(library_calls)


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "gqa_checkpoint"])
def test_library_attention_matches_transformers(compiled, request, attention_calls, checkpoint):
    path = request.getfixturevalue(checkpoint)
    config = from_hf_folder(path)
    artifact = compiled(config, "q0f32", **LIBRARY)
    assert {k: getattr(artifact.spec, k) for k in LIBRARY} == LIBRARY
    gen = Generator(VMSession(artifact, open_source(config, path)), max_batch=2, max_total_len=128,
                    prefill_chunk=CHUNK)
    reference = Reference(path)
    prompt = np.random.default_rng(5).integers(0, config.vocab_size, PROMPT).tolist()
    continuation = reference.greedy(prompt, STEPS)
    tokens = prompt + continuation[:-1]

    logits = gen.teacher_forced_logits(tokens, PROMPT)
    assert relative_error(logits, reference.logits(tokens)) <= 1e-4
    layers, chunks = config.num_hidden_layers, -(-PROMPT // CHUNK)
    # every prefill chunk's self-attention; every decode step's attention over the pages
    assert attention_calls.counts() == {functions.PREFILL_RAGGED: chunks * layers,
                                        functions.DECODE_PAGED: (STEPS - 1) * layers}

    attention_calls.clear()
    assert gen.generate([prompt], STEPS).tokens[0] == continuation


def test_batched_decode_over_pages_of_different_lengths(compiled, gqa_checkpoint):
    """Two sequences of different lengths decoded together: each attends to its own pages."""
    config = from_hf_folder(gqa_checkpoint)
    reference = Reference(gqa_checkpoint)
    gen = Generator(VMSession(compiled(config, "q0f32", **LIBRARY), open_source(config, gqa_checkpoint)),
                    max_batch=2, max_total_len=128, prefill_chunk=64)
    prompts = [list(range(3, 40)), list(range(50, 61))]
    result = gen.generate(prompts, STEPS)
    assert result.tokens == [reference.greedy(p, STEPS) for p in prompts]


def test_tir_attention_calls_no_library(compiled, tiny_checkpoint, attention_calls):
    config = from_hf_folder(tiny_checkpoint)
    artifact = compiled(config, "q0f32", prefill_attention="tir", decode_attention="tir")
    gen = Generator(VMSession(artifact, open_source(config, tiny_checkpoint)), max_batch=2, max_total_len=128,
                    prefill_chunk=CHUNK)
    gen.generate([[1, 2, 3, 4]], 2)
    assert not attention_calls.counts()


def test_library_attention_in_disco_workers(compiled, tiny_checkpoint):
    """tp=2 over the CPU CCL: every worker registers the library attention itself."""
    from engine.disco import DiscoSession

    config = from_hf_folder(tiny_checkpoint)
    reference = Reference(tiny_checkpoint)
    prompt = list(range(7, 7 + PROMPT))
    session = DiscoSession(compiled(config, "q0f32", tp=2, **LIBRARY), open_source(config, tiny_checkpoint))
    try:
        gen = Generator(session, max_batch=2, max_total_len=128, prefill_chunk=CHUNK)
        assert gen.generate([prompt], STEPS).tokens[0] == reference.greedy(prompt, STEPS)
    finally:
        session.close()


def test_attention_choice(tiny_config):
    from engine.compile import BuildSpec, export
    from engine.config import ConfigError

    for option in LIBRARY:
        with pytest.raises(ConfigError, match=option):
            BuildSpec(tiny_config, "q0f32", **{option: "flash"})
    cpu = BuildSpec(tiny_config, "q0f32")
    assert (cpu.prefill_attention, cpu.decode_attention) == ("tir", "tir")
    assert BuildSpec(tiny_config, "q0f16", target="cuda").kv_cache == "static"
    cuda = BuildSpec(tiny_config, "q0f16", target="cuda", kv_cache="paged")  # the library kernels in TVM's cache
    assert (cuda.prefill_attention, cuda.decode_attention) == ("library", "library")
    assert cuda.key() != BuildSpec(tiny_config, "q0f16", target="cuda", kv_cache="paged", decode_attention="tir").key()
    create = export(cuda)[0]["create_kv_cache"].script()
    assert f'R.ExternFunc("{functions.PREFILL_RAGGED}")' in create
    assert f'R.ExternFunc("{functions.DECODE_PAGED}")' in create
    assert "batch_prefill_paged_kv" in create  # a prefill's attention over cached pages stays TVM's
    only_decode = export(BuildSpec(tiny_config, "q0f16", target="cuda", kv_cache="paged", prefill_attention="tir"))[0]
    assert functions.PREFILL_RAGGED not in only_decode["create_kv_cache"].script()


def test_prefill_path_choice():
    """`lab.attention.prefill_path` switches the CUDA prefill between the fused kernel (its
    warpgroup-MMA version where it applies), the fused kernel on mma.sync only and the cuBLAS +
    softmax path (the benchmarks time them): it returns the previous choice and refuses any other
    name, on every target."""
    import tvm_ffi

    functions.register("llvm", [functions.PREFILL_PATH])
    choose = tvm_ffi.get_global_func(functions.PREFILL_PATH)
    assert choose("unfused") == "fused"
    assert choose("fused_mma") == "unfused"
    assert choose("fused") == "fused_mma"
    with pytest.raises(Exception, match="flash"):
        choose("flash")
    assert choose("fused") == "fused"


def test_decode_cluster_choice():
    """`lab.kv.decode_cluster` sets the static decode's cluster size for a process (the benchmarks
    time several): it returns the previous size and refuses sizes outside 0..8."""
    import tvm_ffi

    functions.register("llvm", [functions.KV_DECODE_CLUSTER])
    choose = tvm_ffi.get_global_func(functions.KV_DECODE_CLUSTER)
    assert choose(4) == 0
    assert choose(1) == 4
    with pytest.raises(Exception, match="2..8"):
        choose(9)
    assert choose(0) == 1


def test_decode_tensor_cores_choice():
    """`lab.kv.decode_tensor_cores` picks the static decode's cluster kernel for a process (the
    benchmarks time both): it returns the previous choice, on (1) by default, and refuses anything
    but 1 and 0."""
    import tvm_ffi

    functions.register("llvm", [functions.KV_DECODE_TENSOR_CORES])
    choose = tvm_ffi.get_global_func(functions.KV_DECODE_TENSOR_CORES)
    assert choose(0) == 1
    assert choose(1) == 0
    with pytest.raises(Exception, match="not one of 1, 0"):
        choose(2)
    assert choose(1) == 1
