"""Measure one configuration (a `Point`): build, load, warm up, time. Shared by every experiment."""

from __future__ import annotations

import logging
import time
import traceback

from engine import memory
from engine.compile import compile_model
from engine.config import ConfigError, ModelConfig
from engine.generate import Generator

from . import common, device_probe, measure
from .report import Point

log = logging.getLogger("experiments")


def check_workload(workload, config: ModelConfig) -> None:
    for key in ("batch", "prompt_len", "new_tokens", "repeats"):
        common.positive(f"workload.{key}", workload[key])
    if not isinstance(workload.warmup, int) or workload.warmup < 0:
        raise ConfigError(f"workload.warmup must be a non-negative integer, got {workload.warmup!r}")
    total = workload.prompt_len + workload.new_tokens
    if total > config.max_position_embeddings:
        raise ConfigError(f"workload.prompt_len + workload.new_tokens = {total} exceeds {config.name}'s context of "
                          f"{config.max_position_embeddings} tokens; lower workload.prompt_len or workload.new_tokens")


def run_point(label: str, params: dict, cfg, config: ModelConfig, quant: str, tp: int, target: str, arch: str,
              bandwidth: float | None, progress=None, after_load=None, workload=None, scheduler=None,
              microbatch_decode: bool = False) -> Point:
    """Build (cached), load and time one configuration (`workload`, default cfg.workload). Errors
    are caught into the point, so a failing sweep point does not sink the others. `after_load`
    (point, session, artifact, gen, prompts) runs after the timed runs, on the same session."""
    w = workload or cfg.workload
    point = Point(label, params)
    session = None
    try:
        spec = common.build_spec(config, quant, tp, target, arch, cfg, microbatch_decode)
        prediction = memory.predict(config, spec.quant_spec, tp, w.batch, w.prompt_len + w.new_tokens,
                                    min(w.prompt_len, 2048), lm_head=spec.lm_head, prefill_gemm=spec.prefill_gemm,
                                    prefill_attention=spec.prefill_attention)
        point.summary["memory_predicted_bytes"] = prediction
        if target == "cuda":
            import tvm

            memory.check_fits(prediction, tvm.cuda(0).total_global_memory, f"{config.name} {quant} tp={tp}")
        t0 = time.perf_counter()
        artifact = compile_model(spec, common.cache_dir(cfg))
        t1 = time.perf_counter()
        point.phases.append(("compile (cached)" if t1 - t0 < 1 else "compile", t0, t1))
        session = common.open_session(artifact, common.weights_source(cfg.model, config, target))
        t2 = time.perf_counter()
        point.phases.append(("load + weights", t1, t2))
        gen = Generator(session, max_batch=w.batch, max_total_len=w.prompt_len + w.new_tokens,
                        prefill_chunk=min(w.prompt_len, 2048))
        prompts = measure.random_prompts(config.vocab_size, w.batch, w.prompt_len, int(cfg.get("seed", 0)))
        samples, tokens = measure.timed_runs(gen, prompts, w.new_tokens, w.warmup, w.repeats, progress, scheduler)
        point.samples = samples
        point.summary.update(measure.summarize(samples, artifact.metadata, session.weight_bytes, bandwidth))
        point.summary["tokens_first_sequence"] = tokens[0]
        point.summary["peak_host_rss_bytes"] = device_probe.host_peak_rss_bytes()
        if target == "cuda":
            point.summary["gpu_memory_used_bytes"] = device_probe.gpu_memory_used_bytes()
        point.summary["load_seconds"] = t2 - t1
        if after_load is not None:
            after_load(point, session, artifact, gen, prompts)
    except ConfigError as err:
        point.error = str(err)
    except Exception as err:  # noqa: BLE001  (recorded in results; the sweep goes on)
        point.error = f"{type(err).__name__}: {err}"
        log.error("%s failed:\n%s", label, traceback.format_exc())
    finally:
        if session is not None:
            session.close()
    if point.error:
        log.error("%s: %s", label, point.error)
    return point


def measured_bandwidth(cfg, target: str) -> dict | None:
    if not cfg.get("measure_bandwidth", True):
        return None
    return device_probe.copy_bandwidth(target)
