"""Overlap schedulers: every mode yields exactly the tokens of `none` (CPU, tp=1 and tp=2)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.records import record_of
from engine.compile import BuildSpec, export
from engine.config import ConfigError
from engine.disco import DiscoSession
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import RandomSource
from harness.trace import validate
from runtime_patch import stream_overlap

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kv_cache", ["paged", "static"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode", [m for m in stream_overlap.MODES if m != "none"])
def test_every_mode_yields_the_tokens_of_none(compiled, tiny_config, tp, mode, kv_cache):
    static = kv_cache == "static"
    artifact = compiled(tiny_config, "q0f16", tp, microbatch_decode=tp > 1 and not static, kv_cache=kv_cache)
    source = RandomSource(tiny_config, seed=5)
    with (VMSession(artifact, source) if tp == 1 else DiscoSession(artifact, source)) as session:
        gen = Generator(session, max_batch=4, max_total_len=64, prefill_chunk=16)
        rng = np.random.default_rng(2)
        prompts = [rng.integers(0, tiny_config.vocab_size, n).tolist() for n in (4, 9, 6, 3)]
        reference = gen.generate(prompts, 10)
        scheduler = stream_overlap.install(mode)
        overlapped = gen.generate(prompts, 10, scheduler=scheduler)
    assert overlapped.tokens == reference.tokens
    assert len(overlapped.decode_steps) == 9
    decode = overlapped.decode_steps
    assert all(a.end <= b.start + 1e-9 for a, b in zip(decode, decode[1:]))  # consecutive, one per token
    if static:  # a step's inputs are on the device: nothing to prefetch, no pair decode (module doc)
        ran_as = {"prefetch": "pipeline", "full_overlap": "pipeline"}.get(mode)
        assert (scheduler.note is None) if ran_as is None else f"ran as {ran_as}" in scheduler.note
    elif mode == "full_overlap":  # at tp=2 the micro-batched decode ran (no note), at tp=1 it says why not
        assert (scheduler.note is None) if tp == 2 else "tp=1" in scheduler.note


def test_full_overlap_says_what_ran_instead(compiled, tiny_config):
    with DiscoSession(compiled(tiny_config, "q0f16", 2, microbatch_decode=True), RandomSource(tiny_config, seed=5)) as s:
        gen = Generator(s, max_batch=3, max_total_len=64, prefill_chunk=16)
        prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
        for batch, expected in ((1, "ran as pipeline"), (3, "ran as double_buffer")):
            scheduler = stream_overlap.install("full_overlap")
            got = gen.generate(prompts[:batch], 5, scheduler=scheduler)
            assert got.tokens == gen.generate(prompts[:batch], 5).tokens
            assert expected in scheduler.note
    with DiscoSession(compiled(tiny_config, "q0f16", 2), RandomSource(tiny_config, seed=5)) as s:
        gen = Generator(s, max_batch=2, max_total_len=64, prefill_chunk=16)
        with pytest.raises(ValueError, match="microbatch_decode=true"):
            gen.generate(prompts[:2], 5, scheduler=stream_overlap.install("full_overlap"))


def _calls(script: str) -> list[str]:
    """The split-allreduce calls of a Relax function's script, in order: ("begin"|"wait", tensor)."""
    found = []
    for line in script.splitlines():
        m = re.search(r'(\w+) = R\.call_dps_packed\("lab\.ccl\.allreduce_(begin|wait)", \((\w+)', line)
        if m:
            found.append((m.group(2), m.group(1) if m.group(2) == "begin" else m.group(3)))
    return found


def test_batch_decode_pair_interleaves_the_micro_batches(tiny_config):
    """Each allreduce is begun, then the other micro-batch's half-layer is computed, and only then
    waited for; the residual add takes the wait's token (orders it after the wait)."""
    mod, _ = export(BuildSpec(tiny_config, "q0f16", 2, "llvm", microbatch_decode=True))
    script = mod["batch_decode_pair"].script()
    calls = _calls(script)
    layers = tiny_config.num_hidden_layers
    assert len(calls) == 2 * 2 * 2 * layers  # per layer and micro-batch: attention and MLP, begin + wait
    kinds = [k for k, _ in calls]
    # begin A, begin B, then (wait, begin) alternating between the micro-batches, and two final waits
    assert kinds[:2] == ["begin", "begin"] and kinds[-2:] == ["wait", "wait"]
    assert kinds[2:-2] == ["wait", "begin"] * (2 * 2 * layers - 2)
    begun = [name for k, name in calls if k == "begin"]
    waited = [name for k, name in calls if k == "wait"]
    assert waited == begun  # waited for in the order begun: A, B, A, B, ...
    for name in begun[:1]:
        wait_line = next(l for l in script.splitlines() if f'allreduce_wait", ({name},' in l)
        token = wait_line.split("=")[0].strip()
        assert re.search(rf"R\.call_tir\(\w*residual_add\w*, \({name}, \w+, {token}\)", script)
    assert "batch_decode_pair" not in export(BuildSpec(tiny_config, "q0f16", 2, "llvm"))[0].get_global_vars().__str__()
    single, _ = export(BuildSpec(tiny_config, "q0f16", 1, "llvm", microbatch_decode=True))
    assert _calls(single["batch_decode_pair"].script()) == []  # tp=1: no collectives


def test_double_buffer_splits_the_batch_and_says_when_it_cannot(compiled, tiny_config):
    artifact = compiled(tiny_config, "q0f16", 1)
    with VMSession(artifact, RandomSource(tiny_config, seed=5)) as session:
        gen = Generator(session, max_batch=4, max_total_len=64, prefill_chunk=16)
        prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
        scheduler = stream_overlap.install("double_buffer")
        result = gen.generate(prompts, 6, scheduler=scheduler)
        assert gen.groups_of([0, 1, 2, 3]) == [[0, 1], [2, 3]]  # two KV caches, two request groups
        assert result.tokens == gen.generate(prompts, 6).tokens and scheduler.note is None
        single = stream_overlap.install("double_buffer")
        assert gen.generate([[1, 2, 3]], 6, scheduler=single).tokens == gen.generate([[1, 2, 3]], 6).tokens
        assert "ran as pipeline" in single.note


def test_unknown_modes_say_so():
    with pytest.raises(ValueError, match="choose one of"):
        stream_overlap.install("warp")


def test_a_mode_that_ran_as_another_says_so_in_the_results(cache_dir, tmp_path):
    """The scheduler's note reaches the point's results (harness.sweep.run_point)."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "experiments.overlap", f"hydra.run.dir={out}", "mode=double_buffer",
           "device=cpu", "workload.batch=1", "workload.prompt_len=4", "workload.new_tokens=3",
           "workload.warmup=0", "workload.repeats=1", "measure_bandwidth=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "LAB_CACHE_DIR": str(cache_dir)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["double_buffer"]["note"] == "batch 1: a single request group, so double_buffer ran as pipeline"
    assert "note" not in summary["none"]


@pytest.mark.slow
def test_overlap_experiment_compares_against_none_and_traces_two_tracks(cache_dir, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "experiments.overlap", f"hydra.run.dir={out}", "mode=[pipeline,full_overlap]",
           "device=cpu", "tp=2", "workload.batch=2", "workload.prompt_len=8", "workload.new_tokens=6",
           "workload.warmup=1", "workload.repeats=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "LAB_CACHE_DIR": str(cache_dir)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    comparison = results["summary"]["comparison"]
    for mode in ("pipeline", "full_overlap"):
        assert comparison[mode]["same_tokens"] is True and comparison[mode]["speedup"] > 0
    assert comparison["full_overlap"]["note"] is None  # the micro-batched decode ran
    overlap = results["summary"]["full_overlap"]["allreduce_overlap"]
    assert overlap["serialized_same_tokens"] is True and overlap["count_per_step"] == 2 * 2 * 2  # tiny: 2 layers
    assert overlap["message_elements"] == 1 * 128 and overlap["seconds_each"] > 0
    assert comparison["full_overlap"]["allreduce_hidden_ms"] is not None
    pipeline_row = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| pipeline |"))
    cells = [c.strip() for c in pipeline_row.strip("|").split("|")]
    assert cells[-2] == "True" and cells[-5] != "—"  # tokens = none, host ms hidden/step
    trace = json.loads((out / "trace.json").read_text())
    validate(trace)
    tracks = {(e["pid"], e["tid"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert len(tracks) > 2  # none's host track, the modes' step and launch tracks
    record = record_of(out)  # the benchmark record keeps the overlap figures and raw samples
    full = next(p for p in record["points"] if p["label"] == "full_overlap")
    assert full["same_tokens"] is True and "allreduce_hidden_fraction" in full
    assert len(full["allreduce_overlap"]["serialized_raw_itl_s"]) == 2 * 5  # repeats x decode steps
    assert "serialized_samples" not in full["allreduce_overlap"] and record["batch_invariant_attention"] is True
    assert full["decode_breakdown_us"].startswith("the CPU has no kernel-level tracer")  # kept, with why not
    assert "- full_overlap: breakdown not measured" in (out / "summary.md").read_text()


def test_microbatch_decode_is_a_build_option(tiny_config, compiled):
    with pytest.raises(ConfigError, match="microbatch_decode must be true or false"):
        BuildSpec(tiny_config, "q0f16", 2, microbatch_decode="yes")
    plain, paired = BuildSpec(tiny_config, "q0f16", 2), BuildSpec(tiny_config, "q0f16", 2, microbatch_decode=True)
    assert plain.key() != paired.key()
    artifact = compiled(tiny_config, "q0f16", 2, microbatch_decode=True)
    assert artifact.spec.microbatch_decode is True and artifact.spec == paired
