"""Kernel choices the model makes for cuda, checked on the exported IR (no GPU needed)."""

import re

import pytest
import tvm

from engine.compile import BuildSpec, export
from runtime_patch import functions


def _prefill_attention_blocks(mod) -> dict[str, int]:
    blocks = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith("batch_prefill"):
            blocks[gv.name_hint] = int(re.findall(r'T.thread_binding\((\d+), thread="blockIdx.x"\)', func.script())[0])
    return blocks


def test_prefill_attention_gets_more_thread_blocks_on_cuda(tiny_config):
    from tvm.relax.frontend.nn.llm import _prefill_kernels

    from engine.model.kv_cache import PREFILL_ATTENTION_BLOCKS

    original = _prefill_kernels._get_prefill_kernel_config
    mod, _ = export(BuildSpec(tiny_config, "q0f16", 1, "cuda", "sm_90", kv_cache="paged"))  # TVM's cache's kernels
    blocks = _prefill_attention_blocks(mod)
    assert blocks.get("batch_prefill_ragged_kv") == PREFILL_ATTENTION_BLOCKS
    assert blocks.get("batch_prefill_paged_kv") == PREFILL_ATTENTION_BLOCKS
    assert _prefill_kernels._get_prefill_kernel_config is original  # TVM's function is put back


# The exported functions' names on each KV cache (the static cache's take `_static`).
SUFFIX = {"paged": "", "static": "_static"}


@pytest.mark.parametrize("kv_cache", SUFFIX)
def test_library_prefill_calls_the_gemm_and_decode_does_not(tiny_config, kv_cache):
    """prefill_gemm=library: the prefills' linears call the library's GEMM (lab.gemm.nt on float16
    weights, lab.gemm.q4 / q8 on quantized ones, with no separate dequantize), SiLU after gate_up
    is lab.swiglu, and at tp=1 each residual add comes with the norm after it (lab.norm.add_rms,
    every weight width); decode steps none of them. `prefill`, which returns the last position's
    logits only, finishes its last layer on the last row as a decode step does (its o projection
    and MLP the decode's GEMVs: no lab.swiglu, no lab.norm.add_rms there); `prefill_logits` keeps
    every row of every layer."""
    s = SUFFIX[kv_cache]
    fusions = (functions.SWIGLU, functions.ADD_RMS_NORM)
    for quant, gemm in (("q0f16", "lab.gemm.nt"), ("q4f16_1", "lab.gemm.q4"), ("q8f16_1", "lab.gemm.q8")):
        mod, _ = export(BuildSpec(tiny_config, quant, 1, "cuda", "sm_90", kv_cache=kv_cache))
        others = {"lab.gemm.nt", "lab.gemm.q4", "lab.gemm.q8", "lab.dequant."} - {gemm}
        layers = tiny_config.num_hidden_layers
        for name, full_layers in ((f"prefill{s}", layers - 1), (f"prefill_logits{s}", layers)):
            script = mod[name].script()
            assert gemm in script and not any(other in script for other in others)
            assert script.count(functions.SWIGLU) == full_layers, (quant, name)
            assert script.count(functions.ADD_RMS_NORM) == 2 * full_layers, (quant, name)
        if quant != "q0f16":  # the last row's gate_up: the decode's GEMV with SiLU (q4 and q8 under auto)
            bits = 4 if quant == "q4f16_1" else 8
            assert functions.GEMV[bits, "swiglu"] in mod[f"prefill{s}"].script()
            assert functions.GEMV[bits, "swiglu"] not in mod[f"prefill_logits{s}"].script()
        for name in (f"decode{s}", f"batch_decode{s}"):
            script = mod[name].script()
            assert "lab.gemm." not in script and not any(f in script for f in fusions), (quant, name)
        tir, _ = export(BuildSpec(tiny_config, quant, 1, "cuda", "sm_90", kv_cache=kv_cache, prefill_gemm="tir"))
        assert not any(name in tir[f"prefill{s}"].script() for name in ("lab.gemm.", *fusions))


@pytest.mark.parametrize("kv_cache", SUFFIX)
def test_library_gemv_only_in_the_batch1_decode(tiny_config, kv_cache):
    s = SUFFIX[kv_cache]
    # auto: the library's q4 GEMV on cuda, TVM's q8 GEMV (slower end to end) and TVM's on llvm
    assert BuildSpec(tiny_config, "q4f16_1", 1, "cuda", "sm_90").decode_gemv == "library"
    assert BuildSpec(tiny_config, "q8f16_1", 1, "cuda", "sm_90").decode_gemv == "library"
    assert BuildSpec(tiny_config, "q4f16_1", 1, "llvm").decode_gemv == "tir"
    # nothing to choose for unquantized weights: one artifact whatever is asked
    assert BuildSpec(tiny_config, "q0f16", 1, "cuda", "sm_90", decode_gemv="library").decode_gemv == "tir"
    for quant, name, other in (("q4f16_1", "lab.gemv.q4", "lab.gemv.q8"), ("q8f16_1", "lab.gemv.q8", "lab.gemv.q4")):
        mod, _ = export(BuildSpec(tiny_config, quant, 1, "cuda", "sm_90", kv_cache=kv_cache, decode_gemv="library"))
        decode = mod[f"decode{s}"].script()
        assert name in decode and other not in decode
        # the SiLU after gate_up and (at tp=1) the residual adds are inside the GEMVs
        assert f"{name}_swiglu" in decode and f"{name}_add" in decode and "R.nn.silu(" not in decode
        assert "R.nn.silu(" in mod[f"batch_decode{s}"].script()
        assert name not in mod[f"batch_decode{s}"].script()
        assert name not in mod[f"prefill_logits{s}"].script()
        tir, _ = export(BuildSpec(tiny_config, quant, 1, "cuda", "sm_90", kv_cache=kv_cache, decode_gemv="tir"))
        assert name not in tir[f"decode{s}"].script()
    # TVM's GEMVs for unquantized weights
    spec = BuildSpec(tiny_config, "q0f16", 1, "cuda", "sm_90", kv_cache=kv_cache, decode_gemv="library")
    assert "lab.gemv." not in export(spec)[0][f"decode{s}"].script()


@pytest.mark.parametrize("kv_cache", SUFFIX)
def test_library_norm_by_phase(tiny_config, kv_cache):
    """decode_norm: library on cuda under auto, TVM's on llvm; with the library's, the decode steps
    (batch 1 and batched) call lab.norm.rms for every RMSNorm and no TVM rms_norm, but with the
    library GEMVs the batch-1 step's norms after the residual adds are split over its GEMVs. The prefills'
    RMSNorms follow prefill_gemm, whatever decode_norm says: the library prefill's first norm is
    lab.norm.rms and every other comes with the residual add before it (lab.norm.add_rms, no TVM
    add or norm left), but in `prefill` the last row's two (its last layer finishes on that row as
    a decode step: decode_norm's); TVM's prefill keeps TVM's."""
    s = SUFFIX[kv_cache]
    norms = 2 * tiny_config.num_hidden_layers + 1
    assert BuildSpec(tiny_config, "q0f16", 1, "cuda", "sm_90").decode_norm == "library"
    assert BuildSpec(tiny_config, "q4f16_1", 1, "llvm").decode_norm == "tir"
    mod, _ = export(BuildSpec(tiny_config, "q4f16_1", 1, "cuda", "sm_90", kv_cache=kv_cache, decode_norm="library",
                              prefill_gemm="tir", decode_gemv="tir"))
    for name in (f"decode{s}", f"batch_decode{s}"):
        script = mod[name].script()
        assert script.count('"lab.norm.rms"') == norms and "R.nn.rms_norm(" not in script
    # with the library GEMVs (the default on cuda) the batch-1 step's norms but the first are split
    # over the GEMVs around them: the o and down projections' (with the residual add) start them,
    # the next qkv, gate_up and LM head GEMVs finish them
    layers = tiny_config.num_hidden_layers
    library, _ = export(BuildSpec(tiny_config, "q4f16_1", 1, "cuda", "sm_90", kv_cache=kv_cache,
                                  decode_norm="library", prefill_gemm="tir"))
    script = library[f"decode{s}"].script()
    assert script.count('"lab.norm.rms"') == 1 and "R.nn.rms_norm(" not in script
    assert script.count('"lab.gemv.q4_add_sq') == norms - 1
    assert script.count('"lab.gemv.q4_rms"') == layers and script.count('"lab.gemv.q4_swiglu_rms"') == layers
    assert '"lab.gemv.q4_add"' not in script and '"lab.gemv.q4_add_early"' not in script
    assert library[f"batch_decode{s}"].script().count('"lab.norm.rms"') == norms
    # the prefill's last row finishes as a decode step does: its two norms in its GEMVs
    script = library[f"prefill{s}"].script()
    assert script.count('"lab.gemv.q4_add_sq') == 2 and script.count("R.nn.rms_norm(") == norms - 2
    assert "lab.norm.rms" not in mod[f"prefill_logits{s}"].script() and "R.nn.rms_norm(" in mod[f"prefill_logits{s}"].script()
    tir, _ = export(BuildSpec(tiny_config, "q4f16_1", 1, "cuda", "sm_90", kv_cache=kv_cache, decode_norm="tir",
                              prefill_gemm="library"))
    assert "lab.norm.rms" not in tir[f"decode{s}"].script()
    script = tir[f"prefill_logits{s}"].script()
    assert script.count('"lab.norm.rms"') == 1 and script.count('"lab.norm.add_rms"') == norms - 1
    assert "R.nn.rms_norm(" not in script and "R.add(" not in script
    # prefill: the last row's post-attention and final norms are the decode's (TVM's here)
    script = tir[f"prefill{s}"].script()
    assert script.count('"lab.norm.rms"') == 1 and script.count('"lab.norm.add_rms"') == norms - 3
    assert script.count("R.nn.rms_norm(") == 2
