"""Measure one configuration (a `Point`): build, load, warm up, time. Shared by every experiment."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from typing import Any, Callable

from engine import memory
from engine.compile import Artifact, BuildSpec, compile_pipeline
from engine.config import ConfigError
from engine.generate import Generator
from engine.session import check_cluster, open_session

from . import device_probe, entry, measure, run_state, tracing
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


# The decode loops an experiment's points may run (`overlap=`): those that keep the batch whole
# (experiments.overlap compares all five modes).
DECODE_LOOPS = ("none", "prefetch", "pipeline")


def decode_loop(value, experiment: str) -> str:
    """The decode loop every point runs (`overlap=`): `none` (wait for each step's tokens) or a
    scheduler of experiments.overlap that keeps the batch whole, e.g. `pipeline` (step t+1
    launched before step t is read)."""
    if value not in DECODE_LOOPS:
        raise ConfigError(f"overlap={value!r}: {experiment} runs one of {', '.join(DECODE_LOOPS)} "
                          "(compare the batch-splitting modes with experiments.overlap)")
    return str(value)


def run_point(spec: RunSpec, label: str, params: dict, build: BuildSpec, workload: Workload | None = None,
              bandwidth: float | None = None, progress=None, after_load: AfterLoad | None = None,
              scheduler=None) -> Point:
    """Build (cached), load and time one configuration (`workload`, default the run's). Errors
    are caught into the point, so a failing sweep point does not sink the others. `after_load`
    runs after the timed runs, on the same session. `scheduler`: the decode loop
    (runtime_patch.stream_overlap; None: the engine's own); where it ran as another mode, its
    note is the point's `note`."""
    w = workload or spec.workload
    point = Point(label, params)
    point.summary["build"] = build.to_dict()
    state = run_state.current()
    if state is not None:
        state.begin(label)
    session = None
    try:
        session, artifact = load(spec, build, point, w.batch, w.max_total_len, w.prefill_chunk)
        t1, t2 = point.phases[-1][1:]
        gen = Generator(session, max_batch=w.batch, max_total_len=w.max_total_len, prefill_chunk=w.prefill_chunk)
        prompts = measure.random_prompts(spec.config.vocab_size, w.batch, w.prompt_len, spec.seed)
        samples, tokens = measure.timed_runs(gen, prompts, w.new_tokens, w.warmup, w.repeats, progress, scheduler)
        point.samples = samples
        if scheduler is not None and scheduler.note:  # the mode ran as another here (e.g. double_buffer at batch 1)
            point.summary["note"] = scheduler.note
        embed_bytes = artifact.param_bytes("model.embed_tokens")
        point.summary.update(measure.summarize(samples, build, session.weight_bytes, embed_bytes, bandwidth))
        point.summary["tokens_first_sequence"] = tokens[0]
        point.summary["peak_host_rss_bytes"] = device_probe.host_peak_rss_bytes()
        if build.target == "cuda":
            point.summary["gpu_memory_used_bytes"] = device_probe.gpu_memory_used_bytes()
        point.summary["load_seconds"] = t2 - t1
        point.summary["allreduce_path"] = session.allreduce
        if spec.breakdown:  # one more repeat under kernel-level tracing, after the timed ones
            floor = point.summary.get("roofline_step_s")
            point.summary["breakdown"] = tracing.traced_breakdown(session, gen, prompts, w.new_tokens, scheduler,
                                                                   floor * 1e6 if floor else None)
            point.summary.update(tracing.decode_shares(point.summary["breakdown"]))
        if w.new_tokens == 1:
            point.summary["note"] = NO_DECODE_NOTE
        if after_load is not None:
            after_load(Loaded(point, session, artifact, gen, prompts))
    except ConfigError as err:
        point.error, point.config_error = str(err), True
    except Exception as err:  # noqa: BLE001  (recorded in results; the sweep goes on)
        point.error, expected = failure(err)
        if not expected:
            log.error("%s failed:\n%s", label, traceback.format_exc())
    finally:
        if session is not None:
            session.close()
    if point.error:
        log.error("%s: %s", label, point.error)
    if state is not None:
        state.add(point)
    return point


def load(spec: RunSpec, build: BuildSpec, point: Point, batch: int, max_total_len: int, prefill_chunk: int):
    """Predict the point's memory per device (into its summary; refused on a GPU it does not fit),
    compile (cached) every pipeline stage and open a session with the run's weights; the phases go
    into the point. Returns (session, the first stage's artifact). With a cluster of several hosts,
    tp x pp must fill them (checked first: ConfigError)."""
    if spec.cluster.multi_host:
        check_cluster(spec.cluster, build.tp * build.pp)
    prediction = memory.predict(spec.config, build.quant_spec, build.tp, batch, max_total_len, prefill_chunk,
                                lm_head=build.lm_head, prefill_gemm=build.prefill_gemm,
                                prefill_attention=build.prefill_attention, pp=build.pp)
    point.summary["memory_predicted_bytes"] = prediction
    if build.target == "cuda":
        import tvm

        memory.check_fits(prediction, tvm.cuda(0).total_global_memory,
                          f"{spec.config.name} {build.quant} tp={build.tp}" + (f" pp={build.pp}" if build.pp > 1 else ""))
    t0 = time.perf_counter()
    stages = compile_pipeline(build, spec.cache_dir)
    t1 = time.perf_counter()
    point.phases.append(("compile (cached)" if t1 - t0 < 1 else "compile", t0, t1))
    session = open_session(stages, spec.weights.source(spec.config, build.target), spec.cluster)
    point.phases.append(("load + weights", t1, time.perf_counter()))
    return session, stages[0]


NO_DECODE_NOTE = ("new_tokens=1: the first token comes from the prefill, so there is no decode step; TTFT "
                  "is measured, decode figures (ITL, decode tokens/s, roofline) are not")


def failure(err: Exception) -> tuple[str, bool]:
    """A point's error as one line, and whether it is a known way for a run to fail (a disco
    worker that died or a collective that failed: no traceback is logged for those)."""
    from runtime_patch.disco import CCLError

    text = " ".join(str(err).split())
    if isinstance(err, CCLError):
        return f"CCLError: {text}", True
    if "disco worker processes exited while starting" in text:
        return text, True
    if "DiscoAction" in text:  # TVM read a broken reply from a worker's pipe: the worker died
        return ("a disco worker process died (the controller read a broken reply from its pipe: "
                f"{text.rstrip(': ')}); its stderr above may say why"), True
    return entry.describe(err), False


def measured_bandwidth(spec: RunSpec) -> dict | None:
    if not spec.measure_bandwidth:
        return None
    return device_probe.copy_bandwidth(spec.target)
