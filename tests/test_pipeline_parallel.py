"""Pipeline parallelism on the CPU (disco groups + cpu_shm's in-group collectives and
point-to-point transfers): the layers split over pp stages give the tokens and logits of one
stage, at tp x pp up to 4, checked against transformers too."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.compile import Artifact, BuildSpec, compile_pipeline
from engine.config import ConfigError, from_hf_folder
from engine.disco import stages_of
from engine.generate import Generator
from engine.memory import predict, weight_bytes
from engine.sharding import stage_layers
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from test_tensor_parallel import run_module

ROOT = Path(__file__).resolve().parents[1]
PROMPT, STEPS = 12, 6


def _run(folder, quant, tp, pp, cache_dir, kv_cache="auto", cluster=None, check_session=None, prefill_gemm="auto",
         **build):
    """Teacher-forced logits and a batch of two greedy generations at (tp, pp) (on `cluster`;
    `check_session(session)` is called on the open session; `build`: more BuildSpec options).
    Shared with tests/test_multihost.py."""
    from engine.session import open_session

    config = from_hf_folder(folder)
    spec = BuildSpec(config, quant, tp, pp=pp, kv_cache=kv_cache, prefill_gemm=prefill_gemm, **build)
    stages = compile_pipeline(spec, cache_dir)
    with open_session(stages, open_source(config, folder), cluster) as session:
        if check_session is not None:
            check_session(session)
        gen = Generator(session, max_batch=2, max_total_len=64, prefill_chunk=8)  # prompts in two chunks
        tokens = np.random.default_rng(5).integers(0, config.vocab_size, PROMPT + STEPS).tolist()
        logits = gen.teacher_forced_logits(tokens, PROMPT)
        generated = gen.generate([tokens[:PROMPT], tokens[2:PROMPT]], STEPS).tokens
    return tokens, logits, generated


@pytest.fixture(scope="module")
def tiny_tp1(tiny_checkpoint, cache_dir):
    return _run(tiny_checkpoint, "q0f32", 1, 1, cache_dir)


@pytest.mark.parametrize("tp,pp,kv_cache", [(1, 2, "paged"), (2, 2, "paged"), (1, 2, "static"), (2, 2, "static")])
def test_stages_give_the_tokens_of_one(tiny_checkpoint, cache_dir, tiny_tp1, tp, pp, kv_cache):
    """On TVM's paged KV cache and on the static one (whose steps receive the last stage's tokens
    on the first stage in the step itself)."""
    tokens, reference, generated = tiny_tp1
    _, logits, got = _run(tiny_checkpoint, "q0f32", tp, pp, cache_dir, kv_cache)
    assert got == generated
    assert relative_error(logits, reference) < 1e-5
    # and the oracle: transformers on the same checkpoint
    oracle = Reference(tiny_checkpoint).logits(tokens)
    assert relative_error(logits, oracle) < 1e-4


def test_stages_with_the_library_prefill(tiny_checkpoint, cache_dir, tiny_tp1, library_calls):
    """pp=2 at tp=1 with prefill_gemm=library: each stage's prefill adds each residual and
    normalises in one call (lab.norm.add_rms, its NumPy version here), the first stage ending on a
    plain add (no norm after its last layer), the last on the model's final norm; the tokens and
    logits of one stage."""
    from runtime_patch import functions

    add_norms = library_calls(functions.ADD_RMS_NORM)
    tokens, reference, generated = tiny_tp1
    _, logits, got = _run(tiny_checkpoint, "q0f32", 1, 2, cache_dir, prefill_gemm="library")
    assert add_norms  # the prefills ran through it
    assert got == generated
    assert relative_error(logits, reference) < 1e-4


def test_stages_with_the_norms_in_the_decode_gemvs(gqa_checkpoint, cache_dir, library_calls):
    """pp=2 at tp=1 with the library decode GEMVs and norms: the RMSNorms after the residual adds
    split over the GEMVs around them (lab.gemv.q4_add_sq starts one, q4_rms / q4_swiglu_rms finish
    it) but in the first stage's last layer, which has no next norm (its adds and norm are
    lab.norm.add_rms and a plain add: the norm sites stay in step); the logits and tokens of one
    stage, and transformers' logits."""
    from engine.quantize import quant_spec
    from runtime_patch import functions

    starts = library_calls(functions.GEMV[4, "add_sq"])
    build = {"decode_gemv": "library", "decode_norm": "library"}
    tokens, ref_logits, ref_tokens = _run(gqa_checkpoint, "q4f16_1", 1, 1, cache_dir, "static", **build)
    assert starts
    _, logits, got = _run(gqa_checkpoint, "q4f16_1", 1, 2, cache_dir, "static", **build)
    assert got == ref_tokens
    assert relative_error(logits, ref_logits) < 1e-3
    assert relative_error(logits, Reference(gqa_checkpoint, quant_spec("q4f16_1")).logits(tokens)) < 1e-2


def test_micro_batches_interleaved_over_the_stages(tiny_checkpoint, cache_dir):
    """A batch of 4 in 2 and 4 request groups, their steps interleaved (results fetched from the
    last stage only when read): the tokens of the batch run whole."""
    from engine.session import open_session
    from runtime_patch.stream_overlap import DoubleBufferDecode

    config = from_hf_folder(tiny_checkpoint)
    stages = compile_pipeline(BuildSpec(config, "q0f32", 1, pp=2), cache_dir)
    prompts = np.random.default_rng(9).integers(0, config.vocab_size, (4, 7)).tolist()
    with open_session(stages, open_source(config, tiny_checkpoint)) as session:
        gen = Generator(session, max_batch=4, max_total_len=32, prefill_chunk=8)
        whole = gen.generate(prompts, STEPS).tokens
        for groups in (2, 4):
            scheduler = DoubleBufferDecode(groups)
            assert gen.generate(prompts, STEPS, scheduler=scheduler).tokens == whole
            assert scheduler.note is None


def test_uneven_stages_and_quantized(gqa_checkpoint, cache_dir):
    """3 layers over 2 and 3 stages (tied embedding on the first and the last), q4f16_1; the
    static cache with stages of 2 and 1 layers (one cache shape on both)."""
    for kv_cache, stages in (("paged", (2, 3)), ("static", (2,))):
        _, ref_logits, ref_tokens = _run(gqa_checkpoint, "q4f16_1", 1, 1, cache_dir, kv_cache)
        for pp in stages:
            _, logits, tokens = _run(gqa_checkpoint, "q4f16_1", 1, pp, cache_dir, kv_cache)
            assert tokens == ref_tokens
            assert relative_error(logits, ref_logits) < 1e-3


def test_stage_layout_and_memory(tiny_config, gqa_config):
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(32, 4, s)) for s in range(4)] == [list(range(i, i + 8)) for i in (0, 8, 16, 24)]
    stages = [s.plan for s in BuildSpec(gqa_config, "q0f16", pp=2).stages]
    names = [[n for n, _ in plan.parameters()] for plan in stages]
    assert names[0][0] == "model.embed_tokens" and "model.norm" not in names[0]
    assert names[1][-1] == "model.norm" and "model.embed_tokens" in names[1]  # tied: the table on both ends
    # every layer on exactly one stage
    layer_params = [n for stage in names for n in stage if n.startswith("model.layers.")]
    assert layer_params == [n for n, _ in BuildSpec(gqa_config, "q0f16").plan.parameters() if n.startswith("model.layers.")]
    # memory: the stages' weights add up to the whole (less the tied table's second copy)
    whole = weight_bytes(tiny_config, BuildSpec(tiny_config).quant_spec, 1)
    parts = [weight_bytes(tiny_config, BuildSpec(tiny_config).quant_spec, 1, pp=2, stage=s) for s in range(2)]
    assert sum(parts) == whole
    prediction = predict(tiny_config, BuildSpec(tiny_config).quant_spec, 1, 1, 64, 16, pp=2)
    assert [s["weights"] for s in prediction["stages"]] == parts
    assert prediction["total"] == max(s["total"] for s in prediction["stages"])
    assert prediction["stages"][0]["kv_cache"] * 2 == predict(tiny_config, BuildSpec(tiny_config).quant_spec, 1, 1, 64,
                                                              16)["kv_cache"]


def test_pipeline_options_are_checked(tiny_config, gqa_config):
    with pytest.raises(ConfigError, match="pp=3: tiny has 2 layers"):
        BuildSpec(tiny_config, pp=3)
    with pytest.raises(ConfigError, match="pp=2 runs with allreduce=tir"):
        BuildSpec(tiny_config, tp=2, pp=2, allreduce="library")
    spec = BuildSpec(tiny_config, target="cuda", pp=2)  # the static cache, each stage's step a CUDA graph
    assert (spec.kv_cache, spec.allreduce, spec.cuda_graph) == ("static", "tir", True)
    paged = BuildSpec(tiny_config, target="cuda", pp=2, kv_cache="paged")  # split by vm.builtin calls: no graph
    assert (paged.kv_cache, paged.cuda_graph) == ("paged", False)
    # the static cache tensor has one shape on every stage: the most layers a stage holds
    assert [s.plan.cache_layers for s in BuildSpec(gqa_config, pp=2).stages] == [2, 2]
    # a run's `auto` options are settled per point: its pp=1 build (static cache on cuda) does not
    # decide a pp=2 point's
    from harness.spec import RunSpec, Weights

    run = RunSpec("test", tiny_config, Weights(None), BuildSpec(tiny_config, target="cuda"), None, Path("."),
                  requested=(("kv_cache", "auto"), ("allreduce", "auto")))
    assert (run.build.kv_cache, run.build_for(tp=2).allreduce) == ("static", "library")
    assert (run.build_for(pp=2).kv_cache, run.build_for(pp=2).allreduce) == ("static", "tir")
    run = dataclasses.replace(run, requested=(("kv_cache", "auto"), ("allreduce", "library")))
    with pytest.raises(ConfigError, match="pp=2 runs with allreduce=tir"):
        run.build_for(pp=2)
    with pytest.raises(ConfigError, match="needs the artifacts of its 2 stages"):
        stages_of([Artifact(Path("."), {"spec": BuildSpec(tiny_config, pp=2).to_dict()})])


def test_cpu_shm_groups_and_point_to_point():
    """4 workers in 2 groups: in-group and global sums, send to the next group and back."""
    script = ROOT / "tests" / "fixtures" / "ccl_groups.py"
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["in_group"] == [3.0, 3.0, 7.0, 7.0]  # workers 1+2 and 3+4
    assert got["global"] == [10.0] * 4
    assert got["round_trip"] == [1.0, 2.0, 1.0, 2.0]  # group 0's values, there and back
    assert got["big_ok"]


@pytest.mark.slow
def test_pipeline_parallel_experiment(cache_dir, tmp_path):
    out = tmp_path / "pp"
    proc = run_module("experiments.pipeline_parallel", "layout=[tp1,pp2,tp2pp2]", "device=cpu",
                      "workload.prompt_len=8", "workload.new_tokens=4", "workload.repeats=1", "workload.warmup=0",
                      "workload.batch=2", "microbatches=auto", cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    s = results["summary"]
    labels = ["tp=1 pp=1", "tp=1 pp=2", "tp=2 pp=2"]
    assert [r["label"] for r in results["runs"]] == labels
    assert len({tuple(s[label]["tokens_first_sequence"]) for label in labels}) == 1
    two = s["tp=1 pp=2"]
    assert 0 < two["transfer_share"] < 1 and two["transfer"]["count_per_step"] == 1
    assert len(two["memory_predicted_bytes"]["stages"]) == 2
    assert s["tp=1 pp=1"]["speedup"] == 1.0
    assert [r["params"]["microbatches"] for r in results["runs"]] == [1, 2, 2]  # auto: one per stage
    from experiments.pipeline_parallel import microbatches

    assert [microbatches(v, 4, 3) for v in ("auto", 1, 2, 8)] == [3, 1, 2, 3]
    with pytest.raises(ConfigError, match="microbatches='two'"):
        microbatches("two", 2, 4)
    assert s["tp=2 pp=2"]["efficiency"] == pytest.approx(s["tp=2 pp=2"]["speedup"] / 4)
    assert (out / "layouts.png").is_file()
    assert "stage transfers (probe)" in (out / "summary.md").read_text()
    # a layout written wrong: one line, exit 2
    bad = run_module("experiments.pipeline_parallel", "layout=[tp2x]", "device=cpu", cache_dir=cache_dir,
                     out=tmp_path / "bad")
    assert bad.returncode == 2 and "write tpN, ppN or tpNppM" in bad.stderr
