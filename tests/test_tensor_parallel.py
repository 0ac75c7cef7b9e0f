"""Tensor parallelism on the CPU (disco ProcessSession + the cpu_shm CCL): the same model at every tp."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError, from_hf_folder
from engine.disco import DiscoSession
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from runtime_patch import functions

ROOT = Path(__file__).resolve().parents[1]
PROMPT, STEPS = 16, 8


def _logits_and_tokens(compiled, folder, quant, tp, lm_head="replicated", **kernels):
    config = from_hf_folder(folder)
    artifact = compiled(config, quant, tp, lm_head=lm_head, **kernels)
    source = open_source(config, folder)
    with (VMSession(artifact, source) if tp == 1 else DiscoSession(artifact, source)) as session:
        gen = Generator(session, max_batch=2, max_total_len=128, prefill_chunk=32)
        rng = np.random.default_rng(11)
        tokens = rng.integers(0, config.vocab_size, PROMPT + STEPS).tolist()
        logits = gen.teacher_forced_logits(tokens, PROMPT)
        prompts = [tokens[:PROMPT], tokens[3:PROMPT]]
        generated = gen.generate(prompts, STEPS).tokens
    return tokens, logits, generated


CASES = [("tiny", q, tp, "replicated") for q in ("q0f32", "q0f16", "q8f16_1", "q4f16_1") for tp in (2, 4)]
CASES += [("gqa", "q0f32", 2, "replicated"), ("gqa", "q0f32", 4, "replicated"), ("gqa", "q4f16_1", 2, "replicated")]
CASES += [("tiny", "q0f32", 4, "vocab_parallel"), ("tiny", "q4f16_1", 2, "vocab_parallel")]


@pytest.mark.parametrize("quant,tp", [("q0f32", 2), ("q0f16", 4), ("q4f16_1", 2)])
def test_norms_in_the_library_allreduce(compiled, gqa_checkpoint, quant, tp):
    """allreduce=library at tp > 1: each allreduce also adds the residual and computes the next
    RMSNorm (lab.ccl.allreduce_add_rms_norm; its CPU version over cpu_shm here), the model's final
    norm included: the same model as tp=1 and transformers."""
    tokens, base, base_tokens = _logits_and_tokens(compiled, gqa_checkpoint, quant, 1)
    config = from_hf_folder(gqa_checkpoint)
    artifact = compiled(config, quant, tp, allreduce="library")
    called = artifact.functions
    assert functions.ALLREDUCE_ADD_RMS_NORM in called and functions.ALLREDUCE not in called
    with DiscoSession(artifact, open_source(config, gqa_checkpoint)) as session:
        # the session tried to open the one-shot's regions for it (on the CPU there is none)
        assert session.allreduce == "cpu_shm (CPU): no one-shot"
    _, logits, generated = _logits_and_tokens(compiled, gqa_checkpoint, quant, tp, allreduce="library")
    assert relative_error(logits, base) <= (1e-5 if quant == "q0f32" else 1e-2)
    assert generated == base_tokens
    if quant != "q4f16_1":
        assert relative_error(logits, Reference(gqa_checkpoint).logits(tokens)) <= (1e-4 if quant == "q0f32" else 1e-2)


def test_library_gemvs_on_sharded_weights(compiled, gqa_checkpoint):
    """decode_gemv=library at tp=2: each rank's gate_up shard is [its gate rows; its up rows], and
    lab.gemv.q4_swiglu pairs row i with row I + i of the shard (I its half): the same model as
    tp=1 with TVM's GEMVs, the SiLU inside gate_up's GEMV."""
    tokens, base, base_tokens = _logits_and_tokens(compiled, gqa_checkpoint, "q4f16_1", 1)
    config = from_hf_folder(gqa_checkpoint)
    artifact = compiled(config, "q4f16_1", 2, decode_gemv="library", allreduce="library")
    assert functions.GEMV[4, "swiglu"] in artifact.functions
    _, logits, generated = _logits_and_tokens(compiled, gqa_checkpoint, "q4f16_1", 2, decode_gemv="library",
                                              allreduce="library")
    assert relative_error(logits, base) <= 1e-2
    assert generated == base_tokens


@pytest.mark.parametrize("model,quant,tp,lm_head", CASES)
def test_tp_is_the_same_model_as_tp1(compiled, tiny_checkpoint, gqa_checkpoint, model, quant, tp, lm_head):
    folder = tiny_checkpoint if model == "tiny" else gqa_checkpoint
    tokens, base, base_tokens = _logits_and_tokens(compiled, folder, quant, 1)
    _, logits, generated = _logits_and_tokens(compiled, folder, quant, tp, lm_head)
    tolerance = 1e-5 if quant == "q0f32" else 1e-2
    assert relative_error(logits, base) <= tolerance
    assert generated == base_tokens  # greedy tokens identical, batch of two
    if quant in ("q0f32", "q0f16"):  # and the same as transformers
        assert relative_error(logits, Reference(folder).logits(tokens)) <= (1e-4 if quant == "q0f32" else 1e-2)


def test_lm_head_auto_is_vocab_parallel_on_cuda_where_it_applies(tiny_config, gqa_config):
    """lm_head=auto (the default): the vocabulary-parallel head on cuda at tp > 1 without pipeline
    stages where the head is not tied and the vocabulary divides by tp; replicated otherwise, and
    on the CPU. A run's points settle it each for its own tp (RunSpec.build_for)."""
    import dataclasses

    from engine.compile import BuildSpec
    from harness.spec import RunSpec

    def head(config, tp, target="cuda", pp=1):
        return BuildSpec(config, "q0f16", tp, target, pp=pp).lm_head

    assert head(tiny_config, 2) == "vocab_parallel" and head(tiny_config, 1) == "replicated"
    assert head(tiny_config, 2, "llvm") == "replicated"
    assert head(tiny_config, 2, pp=2) == "replicated"
    assert head(dataclasses.replace(tiny_config, tie_word_embeddings=True), 2) == "replicated"
    assert head(dataclasses.replace(tiny_config, vocab_size=1001), 2) == "replicated"
    assert BuildSpec(tiny_config, "q0f16", 2, "cuda", lm_head="replicated").lm_head == "replicated"
    run = RunSpec("tensor_parallel", tiny_config, None, BuildSpec(tiny_config, "q0f16", 1, "cuda"), None, ROOT,
                  requested=(("lm_head", "auto"),))
    assert run.build.lm_head == "replicated" and run.build_for(tp=2).lm_head == "vocab_parallel"


def test_tp_that_does_not_divide_the_heads_is_refused(compiled, tiny_config):
    with pytest.raises(ConfigError, match="choose tp from"):
        compiled(tiny_config, "q0f16", 3)


def test_vocab_parallel_head_is_refused_where_it_cannot_apply(compiled, gqa_config, tiny_config):
    with pytest.raises(ConfigError, match="ties its LM head .* use lm_head=replicated"):
        compiled(gqa_config, "q0f32", 2, lm_head="vocab_parallel")
    with pytest.raises(ConfigError, match="unknown lm_head layout 'rows'"):
        compiled(tiny_config, "q0f32", 2, lm_head="rows")
    from engine.compile import BuildSpec

    # at tp=1 there is one layout: both names build (and cache) the same artifact
    assert BuildSpec(tiny_config, "q0f32", 1, lm_head="vocab_parallel").key() == BuildSpec(tiny_config, "q0f32", 1).key()


def run_module(module, *overrides, cache_dir, out, timeout=900):
    env = {**os.environ, "LAB_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", module, f"hydra.run.dir={out}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tensor_parallel_sweep_reports_scaling(cache_dir, tmp_path):
    out = tmp_path / "tp"
    proc = run_module("experiments.tensor_parallel", "tp=[1,2]", "device=cpu", "workload.prompt_len=8",
                      "workload.new_tokens=6", "workload.warmup=1", "workload.repeats=2", "overlap=pipeline",
                      cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    s = results["summary"]
    assert s["tp=1"]["speedup"] == 1.0 and s["tp=2"]["speedup"] > 0
    assert 0 < s["tp=2"]["allreduce_share"] < 1 and s["tp=2"]["allreduce"]["count_per_step"] == 4
    assert s["tp=2"]["efficiency"] == pytest.approx(s["tp=2"]["speedup"] / 2)
    assert s["tp=1"]["tokens_first_sequence"] == s["tp=2"]["tokens_first_sequence"]
    assert (out / "speedup.png").stat().st_size > 5000 and (out / "trace.json").is_file()
    summary_md = (out / "summary.md").read_text()
    assert "overlap=pipeline" in summary_md  # the decode loop it ran, named
    # the time breakdown: not measured on the CPU, and the report says why (no plot)
    assert s["tp=2"]["breakdown"] == {"measured": False,
                                      "reason": "the CPU has no kernel-level tracer (CUPTI is for NVIDIA GPUs)"}
    assert "## Where the time goes" in summary_md and "- tp=2: breakdown not measured: the CPU" in summary_md
    assert not (out / "breakdown.png").exists()


@pytest.mark.parametrize("override,message", [("tp=[1,64]", "at most 16"), ("tp=[1,3]", "choose tp from"),
                                              ("tp=[]", "tp is empty"), ("tp=[2,2]", "twice")])
def test_bad_tp_lists_are_refused_up_front(cache_dir, tmp_path, override, message):
    proc = run_module("experiments.tensor_parallel", override, "device=cpu", cache_dir=cache_dir, out=tmp_path / "r")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("lm_head", ["replicated", "vocab_parallel"])
def test_verify_accepts_tp(cache_dir, tmp_path, lm_head):
    out = tmp_path / "v"
    proc = run_module("experiments.verify", "tp=2", f"lm_head={lm_head}", "prompt_len=8", "decode_steps=6",
                      cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["greedy_tokens_identical"] and results["config"]["lm_head"] == lm_head


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from engine.compile import Artifact
    from engine.disco import DiscoSession
    from engine.generate import Generator
    from engine.weights import RandomSource
    from runtime_patch.disco import worker_pids
    artifact = Artifact.load(sys.argv[1])
    session = DiscoSession(artifact, RandomSource(artifact.spec.config))
    gen = Generator(session, 1, 64, 16)
    gen.generate([[1, 2, 3]], 2)
    os.kill(worker_pids(session.sess)[1], signal.SIGKILL)
    try:
        gen.generate([[1, 2, 3]], 4)
    except Exception as err:
        print("CLEAN ERROR:", type(err).__name__, err)
        session.close()
        sys.exit(0)
    sys.exit(1)
""")


def test_a_killed_worker_gives_a_clean_error_and_no_hang(compiled, tiny_config, tmp_path):
    artifact = compiled(tiny_config, "q0f16", 2)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(artifact.path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "CLEAN ERROR" in proc.stdout
