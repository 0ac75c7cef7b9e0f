"""Measure one configuration (a `Point`): build, load, warm up, time. Shared by every experiment."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from typing import Any, Callable

from engine import memory
from engine.compile import Artifact, BuildSpec, compile_model
from engine.config import ConfigError
from engine.generate import Generator
from engine.session import open_session

from . import device_probe, measure
from .report import Point
from .spec import RunSpec, Workload

log = logging.getLogger("experiments")


@dataclasses.dataclass
class Loaded:
    """What an `after_load` hook gets: the point measured, its open session and artifact, the
    generator the timed runs used and their prompts."""

    point: Point
    session: Any
    artifact: Artifact
    generator: Generator
    prompts: list[list[int]]


AfterLoad = Callable[[Loaded], None]


def run_point(spec: RunSpec, label: str, params: dict, build: BuildSpec, workload: Workload | None = None,
              bandwidth: float | None = None, progress=None, after_load: AfterLoad | None = None,
              scheduler=None) -> Point:
    """Build (cached), load and time one configuration (`workload`, default the run's). Errors
    are caught into the point, so a failing sweep point does not sink the others. `after_load`
    runs after the timed runs, on the same session."""
    w = workload or spec.workload
    point = Point(label, params)
    point.summary["build"] = build.to_dict()
    session = None
    try:
        prediction = memory.predict(spec.config, build.quant_spec, build.tp, w.batch, w.max_total_len,
                                    w.prefill_chunk, lm_head=build.lm_head, prefill_gemm=build.prefill_gemm,
                                    prefill_attention=build.prefill_attention)
        point.summary["memory_predicted_bytes"] = prediction
        if build.target == "cuda":
            import tvm

            memory.check_fits(prediction, tvm.cuda(0).total_global_memory,
                              f"{spec.config.name} {build.quant} tp={build.tp}")
        t0 = time.perf_counter()
        artifact = compile_model(build, spec.cache_dir)
        t1 = time.perf_counter()
        point.phases.append(("compile (cached)" if t1 - t0 < 1 else "compile", t0, t1))
        session = open_session(artifact, spec.weights.source(spec.config, build.target))
        t2 = time.perf_counter()
        point.phases.append(("load + weights", t1, t2))
        gen = Generator(session, max_batch=w.batch, max_total_len=w.max_total_len, prefill_chunk=w.prefill_chunk)
        prompts = measure.random_prompts(spec.config.vocab_size, w.batch, w.prompt_len, spec.seed)
        samples, tokens = measure.timed_runs(gen, prompts, w.new_tokens, w.warmup, w.repeats, progress, scheduler)
        point.samples = samples
        embed_bytes = artifact.param_bytes("model.embed_tokens")
        point.summary.update(measure.summarize(samples, build, session.weight_bytes, embed_bytes, bandwidth))
        point.summary["tokens_first_sequence"] = tokens[0]
        point.summary["peak_host_rss_bytes"] = device_probe.host_peak_rss_bytes()
        if build.target == "cuda":
            point.summary["gpu_memory_used_bytes"] = device_probe.gpu_memory_used_bytes()
        point.summary["load_seconds"] = t2 - t1
        if after_load is not None:
            after_load(Loaded(point, session, artifact, gen, prompts))
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


def measured_bandwidth(spec: RunSpec) -> dict | None:
    if not spec.measure_bandwidth:
        return None
    return device_probe.copy_bandwidth(spec.target)
