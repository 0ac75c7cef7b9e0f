"""python -m experiments.overlap mode=pipeline: what overlapping the decode loop buys.

Each mode runs the same workload on the same weights; `none` always runs too (the baseline of
the comparison). Per mode: decode tokens/s, speedup over `none`, whether the tokens are exactly
`none`'s, the host time per step the mode hid (`none`'s inter-token latency minus the mode's), and
a trace with a track for the steps and one for the launches that run ahead of them. The device's
idle time between steps needs device timestamps: `./profile_gpu.sh -m timeline -s overlap`
(its kernels.md and summary.json give the GPU idle fraction during each mode's decode steps).

`full_overlap` at tp > 1 is measured twice on the same session: as is, and with its collectives
serialized (`lab.ccl.set_overlap(false)`: every allreduce waited for as soon as it is begun, the
same kernels otherwise). The allreduce time it hides per step is the difference of the two
inter-token latencies, set against the allreduce time measured in the workers (the micro-batch's
message, 2 per layer and micro-batch).
"""

from __future__ import annotations

import dataclasses
import logging

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from engine.config import ConfigError
from harness import entry, measure, sweep
from harness.report import BASE_COLUMNS, write_report
from harness.results import RunDir
from harness.spec import RunSpec, positive
from runtime_patch import functions, stream_overlap

log = logging.getLogger("experiments.overlap")
BATCH_SPLITTING = {"double_buffer", "full_overlap"}  # modes that run a batch as two request groups


def modes_of(value) -> list[str]:
    modes = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not modes:
        raise ConfigError("mode is empty; give e.g. mode=pipeline or 'mode=[prefetch,pipeline]'")
    known = stream_overlap.MODES
    for m in modes:
        if m not in known:
            raise ConfigError(f"unknown overlap mode {m!r}; choose from {', '.join(known)}")
    return ["none"] + [m for m in dict.fromkeys(modes) if m != "none"]


COLUMNS = BASE_COLUMNS + [("speedup", "speedup vs none", "{:.3f}x"), ("hidden_ms", "host ms hidden/step", "{:.3f}"),
                          ("allreduce_hidden_ms", "allreduce ms hidden/step", "{:.3f}"),
                          ("allreduce_hidden_fraction", "of allreduce", "{:.0%}"),
                          ("same_tokens", "tokens = none", None)]


def allreduce_hidden(spec: RunSpec, used) -> sweep.AfterLoad:
    """An `after_load` hook for `full_overlap` at tp > 1 (`used`: the scheduler of the timed runs):
    run it again with serialized collectives and time the micro-batch's allreduce message (module
    doc). Nothing where the mode ran as another (its `note`)."""
    def hook(loaded: sweep.Loaded) -> None:
        point, session, gen, prompts = loaded.point, loaded.session, loaded.generator, loaded.prompts
        if used.note or session.tp == 1 or not point.summary.get("itl_s"):
            return
        scheduler = stream_overlap.install("full_overlap")
        from engine.disco import allreduce_seconds

        w, build = spec.workload, session.spec
        session.call_workers(functions.SET_OVERLAP, False)
        try:
            samples, tokens = measure.timed_runs(gen, prompts, w.new_tokens, w.warmup, w.repeats, None, scheduler)
        finally:
            session.call_workers(functions.SET_OVERLAP, True)
        serial = measure.summarize(samples, build, session.weight_bytes, 0, None)["itl_s"]
        numel = (w.batch // 2) * spec.config.hidden_size
        dtype = build.quant_spec.model_dtype
        seconds_each = float(np.median(allreduce_seconds(session, numel, dtype)))
        count = 2 * 2 * spec.config.num_hidden_layers
        hidden = serial["p50"] - point.summary["itl_s"]["p50"]
        point.summary["allreduce_overlap"] = {
            "serialized_itl_s": serial, "serialized_same_tokens": tokens[0] == point.summary["tokens_first_sequence"],
            "message_elements": numel, "dtype": dtype, "seconds_each": seconds_each, "count_per_step": count,
            "allreduce_s_per_step": seconds_each * count, "hidden_s_per_step": hidden,
            "serialized_samples": [r.to_dict() for r in samples]}
        point.summary["allreduce_hidden_ms"] = hidden * 1e3
        point.summary["allreduce_hidden_fraction"] = hidden / (seconds_each * count)
    return hook


@hydra.main(config_path="../conf", config_name="overlap", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    modes = modes_of(cfg.mode)
    tp = positive("tp", cfg.tp)
    # One artifact for every mode, so that all run the same kernels: with full_overlap at tp > 1 it
    # also exports batch_decode_pair; when a mode splits the batch, the CUDA decode attention splits
    # a sequence's keys as at batch 1 (batch_invariant), so the modes can be compared token for token.
    invariant = bool(BATCH_SPLITTING & set(modes))
    spec = RunSpec.from_hydra(cfg, "overlap", tp=tp, batch_invariant=invariant)
    if "full_overlap" in modes and tp > 1 and spec.build.kv_cache == "paged":  # the static cache has no pair decode
        spec = dataclasses.replace(spec, build=spec.build_for(microbatch_decode=True))
    spec.check_devices(tp)
    if spec.workload.new_tokens < 2:
        raise ConfigError(f"the overlap modes differ only in their decode steps, and workload.new_tokens="
                          f"{spec.workload.new_tokens} makes none; use workload.new_tokens >= 2")
    bandwidth = sweep.measured_bandwidth(spec)
    w, config, quant, target = spec.workload, spec.config, spec.build.quant, spec.target
    points = []
    with tqdm(total=len(modes) * (w.warmup + w.repeats), desc=f"{config.name} overlap", unit="run") as bar:
        for mode in modes:
            bar.set_postfix_str(mode)
            scheduler = stream_overlap.install(mode)
            hook = allreduce_hidden(spec, scheduler) if mode == "full_overlap" else None
            point = sweep.run_point(spec, mode, {"mode": mode, "tp": tp}, spec.build,
                                    bandwidth=bandwidth and bandwidth["bytes_per_s"], progress=bar,
                                    scheduler=scheduler, after_load=hook)
            if point.ok and scheduler is not None:
                point.summary["token_reader"] = scheduler.reader_kind
            points.append(point)
    base = points[0]
    for p in points:
        if p.ok and base.ok:
            p.summary["speedup"] = p.summary["decode_tokens_per_s"] / base.summary["decode_tokens_per_s"]
            p.summary["hidden_ms"] = (base.summary["itl_s"]["p50"] - p.summary["itl_s"]["p50"]) * 1e3
            p.summary["same_tokens"] = p.summary["tokens_first_sequence"] == base.summary["tokens_first_sequence"]
            launches = [s.seconds for r in p.samples for s in r.steps if s.kind == "launch"]
            if launches:
                p.summary["launch_s_p50"] = float(np.median(launches))
    notes = ("`none` waits for every step's tokens, then does its bookkeeping, copies the next ids in and "
             "launches. `prefetch` does the next step's KV-cache bookkeeping while the step computes and stages the "
             "ids through a pinned buffer and a copy stream (CUDA VM sessions). `pipeline` launches step t+1 from "
             "step t's device-resident tokens and does step t's bookkeeping while step t+1 computes; on a GPU it "
             "waits for step t before launching t+1, because TVM 0.27's paged KV cache refreshes one device buffer "
             "of attention metadata per step on its own copy stream (docs/ARCHITECTURE.md). `double_buffer` splits "
             "the batch into two request groups with a KV cache each and interleaves their steps, so one group's "
             "next step is launched while the other's runs (at batch 1 it runs as pipeline and says so). "
             "`full_overlap` runs the two groups as the micro-batches of one `batch_decode_pair` call per step, "
             "interleaved half-layer by half-layer, each allreduce begun on a communication stream of its own "
             "(a second NCCL communicator) and waited for where its sum is needed, so one micro-batch's "
             "allreduce runs while the other computes; each micro-batch reads the weights, so a memory-bound "
             "step reads them twice. At tp > 1 it also runs with its collectives serialized: the difference is "
             "the allreduce time it hides (`allreduce ms hidden/step`, and its share of the measured allreduce "
             "time). On CPU the allreduces run when begun (no streams). Where a mode cannot apply (batch 1, an "
             "odd batch, tp=1 for full_overlap) its note says what ran instead. With double_buffer or full_overlap "
             "in the run, every mode runs the CUDA decode attention batch-invariant (build option batch_invariant: "
             "a sequence's keys split as at batch 1), so that splitting the batch does not change the order of its "
             "floating-point sums and the tokens can be compared exactly.")
    rows_extra = {p.label: {k: p.summary.get(k) for k in ("speedup", "hidden_ms", "same_tokens", "note",
                                                           "allreduce_hidden_ms", "allreduce_hidden_fraction")}
                  for p in points}
    status = write_report(run_dir, f"Overlap: {config.name} {quant} tp={tp} on {target}",
                          OmegaConf.to_container(cfg, resolve=True), points,
                          columns=COLUMNS, sections=[("Method", notes)],
                          summary_extra={"comparison": rows_extra, "batch_invariant_attention": invariant},
                          extra={"bandwidth": bandwidth})
    for p in points:
        if p.ok:
            s = p.summary
            speedup = f"{s['speedup']:.3f}x" if "speedup" in s else "not measured (none failed)"
            print(f"{p.label}: {s['decode_tokens_per_s']:.1f} decode tokens/s, speedup {speedup}, "
                  f"tokens identical to none: {s.get('same_tokens')}")
        else:
            print(f"{p.label}: {p.error}")
    print(f"results: {run_dir.root}")
    if any(p.ok and not p.summary.get("same_tokens", True) for p in points):
        print("error: a mode produced other tokens than `none`", flush=True)
        return 1
    return entry.exit_status(status, points)


if __name__ == "__main__":
    main()
