"""One more repeat of a sweep point under kernel-level tracing, after its timed repeats (never
during them): where each decode and prefill step's time goes on every GPU (harness/breakdown.py).

    summary["breakdown"] = traced_breakdown(session, generator, prompts, workload, scheduler, floor_us)

One device (a VM session): CUPTI in this process (runtime_patch.cupti_tracer.Window). A disco
session (tp > 1 or pp > 1): every disco worker traces itself (worker 0 runs in this process) through `lab.cupti.window_start/stop`. Where CUPTI cannot
trace (no cupti-python, no GPU, the CPU), the breakdown says "not measured" and why; the timed
figures never depend on it. The traced repeat's own decode tokens/s is recorded beside it, so the
tracing's perturbation is visible.
"""

from __future__ import annotations

import json
import logging
import time
import traceback

import numpy as np

from runtime_patch.cupti_tracer import TracerUnavailable

from . import breakdown

log = logging.getLogger("experiments")


def _workers_trace(session, run) -> list[dict]:
    """Run `run()` with every disco worker of `session` tracing; their documents."""
    session.call_workers("lab.engine.register_cupti_window")
    session.call_workers("lab.cupti.window_start")
    try:
        run()
    finally:
        stopped = session.from_workers("lab.cupti.window_stop")
    docs = [json.loads(str(d)) for d in stopped]
    missing = [d["unavailable"] for d in docs if "unavailable" in d]
    if missing:
        raise TracerUnavailable("; ".join(sorted(set(missing))))
    return docs


def traced_breakdown(session, gen, prompts, new_tokens: int, scheduler, floor_us: float | None) -> dict:
    """Trace one generation of `prompts`; the point's breakdown (or why it was not measured)."""
    if session.spec.target != "cuda":
        return breakdown.not_measured("the CPU has no kernel-level tracer (CUPTI is for NVIDIA GPUs)")
    result = {}

    def run() -> None:
        start = time.perf_counter()
        result["generation"] = gen.generate(prompts, new_tokens, scheduler)
        result["seconds"] = time.perf_counter() - start

    try:
        if getattr(session, "workers", 1) == 1:  # a VMSession; a DiscoSession has tp x pp workers
            from runtime_patch.cupti_tracer import Window

            window = Window("controller")
            window.start()
            try:
                run()
            finally:
                docs = [window.stop()]
        else:
            docs = _workers_trace(session, run)
    except TracerUnavailable as err:
        return breakdown.not_measured(str(err))
    except Exception as err:  # noqa: BLE001  (the extra repeat must not cost the point its timed figures)
        log.error("the traced repeat failed:\n%s", traceback.format_exc())
        return breakdown.not_measured(f"the traced repeat failed: {type(err).__name__}: {err}")
    steps = result["generation"].steps
    decode = [(s.start, s.end) for s in steps if s.kind == "decode"]
    prefill = [(s.start, s.end) for s in steps if s.kind == "prefill"]
    records = breakdown.records_from_documents(docs)
    devices = sorted({r["device"] for r in records})
    point = breakdown.point_breakdown(records, decode, prefill, devices)
    itl = [s.seconds for s in steps if s.kind == "decode"]  # as measure.summarize rates the timed repeats
    point["traced_decode_tokens_per_s"] = float(len(prompts) / np.median(itl)) if itl else None
    point["floor_us"] = floor_us
    point["kernel_map"] = breakdown.kernel_map(sorted({r["name"] for r in records if r["kind"] == "kernel"}))
    return point


def decode_shares(point: dict) -> dict:
    """The report's short form of a measured breakdown: the largest share of the decode step any
    GPU spent idle, and in exposed collectives."""
    decodes = [d["decode"] for d in point.get("devices", []) if d.get("decode")]
    if not decodes:
        return {}
    return {"gpu_idle_share": max(d["shares"][breakdown.IDLE] for d in decodes),
            "collectives_share_traced": max(d["shares"][breakdown.COLLECTIVES] for d in decodes)}


INTRO = ("One more repeat per point after the timed ones, traced with CUPTI (never during the timed "
         "repeats): each step's wall time on the host split, per GPU, into what the GPU ran by category "
         "of kernel (harness/breakdown.py RULES) and the time it ran nothing (GPU idle: host, launch and VM "
         "work the device waited through); the categories and the idle time add up to the traced step. "
         "`floor` is the weight and KV reads of a decode step over the copy bandwidth measured in the run. "
         "Tracing slows the host: the traced repeat's own decode tokens/s is in results.json "
         "(`breakdown.traced_decode_tokens_per_s`).")


def report_section(points, title: str):
    """The "Where the time goes" section of a report from the points' `breakdown`, and the
    function that draws its figure (a stacked bar per point and GPU, the bandwidth floor marked;
    None where no point was measured); None where no point has a breakdown."""
    rows = [{"label": p.label, "breakdown": p.summary["breakdown"], "floor_us": p.summary["breakdown"].get("floor_us")}
            for p in points if p.ok and "breakdown" in p.summary]
    if not rows:
        return None
    body = INTRO + "\n\n" + breakdown.markdown_table(rows)
    if not any(r["breakdown"].get("measured") for r in rows):
        return body, None
    return body + "\n\nbreakdown.png: a stacked bar per point and GPU, the bandwidth floor marked.", \
        lambda path: breakdown.plot(rows, path, title)
