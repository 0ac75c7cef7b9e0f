"""python -m experiments.tensor_parallel 'tp=[1,2,4]': the same workload at each tp.

Per tp: TTFT, ITL, decode tokens/s, speedup over the smallest tp measured (tp=1 when listed),
scaling efficiency (speedup / tp), the share of decode time spent in allreduce, and memory.
The allreduce share is measured: the model's allreduce message ([batch, hidden] in the model's
dtype) is timed inside the workers of the same session, times two allreduces per layer, over the
measured inter-token latency.
"""

from __future__ import annotations

import logging

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from engine.config import ConfigError
from harness import entry, plots, sweep
from harness.report import BASE_COLUMNS, write_report
from harness.results import RunDir
from harness.spec import RunSpec, positive
from runtime_patch import stream_overlap

log = logging.getLogger("experiments.tensor_parallel")


def tp_list(value) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise ConfigError("tp is empty; give e.g. 'tp=[1,2]'")
    for v in values:
        positive("every tp", v)
    if len(set(values)) != len(values):
        raise ConfigError(f"tp lists a value twice: {values}")
    return sorted(values)


def allreduce_probe(spec: RunSpec, measure: bool) -> sweep.AfterLoad:
    """An `after_load` hook: time the model's allreduce message ([batch, hidden] in the model's
    dtype) in the workers of the point's session."""
    def probe(loaded: sweep.Loaded) -> None:
        point, session = loaded.point, loaded.session
        if session.tp == 1 or not measure or not point.summary.get("itl_s"):
            return
        from engine.disco import allreduce_seconds

        numel = loaded.generator.max_batch * spec.config.hidden_size
        dtype = session.spec.quant_spec.model_dtype
        per_worker = allreduce_seconds(session, numel, dtype)
        seconds = float(np.median(per_worker))
        count = 2 * spec.config.num_hidden_layers
        share = count * seconds / point.summary["itl_s"]["p50"]
        point.summary["allreduce"] = {"message_elements": numel, "dtype": dtype, "seconds_each": seconds,
                                      "per_worker_seconds": per_worker, "per_decode_step_s": count * seconds,
                                      "count_per_step": count, "path": session.allreduce,
                                      "method": "calls launched one by one from the host, timed in each worker"}
        if share <= 1:
            point.summary["allreduce_share"] = share
        else:  # a probe slower than the step it is part of (e.g. under tracing) measures the probe, not the step
            point.summary["allreduce"]["note"] = (f"not reported: the probe's {count} calls took {share:.0%} of the "
                                                  "decode step they are part of")
    return probe


def add_scaling(points) -> dict:
    """Speedups over the smallest tp measured: decode (with efficiency) and TTFT; TTFT only where
    no decode step was timed (new_tokens=1)."""
    ok = [p for p in points if p.ok and p.summary.get("ttft_s")]
    if not ok:
        return {}
    base = min(ok, key=lambda p: p.params["tp"])
    for p in ok:
        p.summary["ttft_speedup"] = base.summary["ttft_s"]["p50"] / p.summary["ttft_s"]["p50"]
        if p.summary.get("decode_tokens_per_s") and base.summary.get("decode_tokens_per_s"):
            p.summary["speedup"] = p.summary["decode_tokens_per_s"] / base.summary["decode_tokens_per_s"]
            p.summary["efficiency"] = p.summary["speedup"] * base.params["tp"] / p.params["tp"]
    return {"speedup_baseline_tp": base.params["tp"]}


COLUMNS = BASE_COLUMNS + [("speedup", "speedup", "{:.2f}x"), ("efficiency", "efficiency", "{:.0%}"),
                          ("allreduce_share", "allreduce share (probe)", "{:.0%}"),
                          ("collectives_share_traced", "collectives (traced)", "{:.0%}"),
                          ("gpu_idle_share", "GPU idle (traced)", "{:.0%}")]


@hydra.main(config_path="../conf", config_name="tensor_parallel", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    tps = tp_list(cfg.tp)
    mode = sweep.decode_loop(cfg.get("overlap", "none"), "tensor_parallel")
    spec = RunSpec.from_hydra(cfg, "tensor_parallel")
    spec.check_devices(max(tps))
    builds = {tp: spec.build_for(tp=tp) for tp in tps}  # validates every tp before anything runs
    bandwidth = sweep.measured_bandwidth(spec)
    w, config, quant, target = spec.workload, spec.config, spec.build.quant, spec.target
    points = []
    with tqdm(total=len(tps) * (w.warmup + w.repeats), desc=f"{config.name} {quant} tp={tps}", unit="run") as bar:
        for tp, build in builds.items():
            bar.set_postfix_str(f"tp={tp}")
            points.append(sweep.run_point(spec, f"tp={tp}", {"tp": tp, "quant": quant, "overlap": mode}, build,
                                          bandwidth=bandwidth and bandwidth["bytes_per_s"], progress=bar,
                                          after_load=allreduce_probe(spec, bool(cfg.measure_allreduce)),
                                          scheduler=stream_overlap.install(mode)))
    scaling = add_scaling(points)
    good = [p for p in points if p.ok and "speedup" in p.summary]
    figures = [("speedup.png", lambda path: plots.speedup_vs_ideal(
        [p.params["tp"] for p in good], [p.summary["speedup"] for p in good], path,
        f"{config.name} {quant} on {target}: decode speedup"))] if len(good) > 1 else []
    vocab_parallel = any(b.plan.vocab_parallel for b in builds.values())
    loop = ("each step's tokens are read before the next step is launched (overlap=none)" if mode == "none" else
            f"the decode loop is experiments.overlap's `{mode}` scheduler (overlap={mode})")
    notes = (f"Decode: {loop}. "
             "Speedup is decode tokens/s over the smallest tp measured; efficiency = speedup x tp_base / tp. "
             "Allreduce share (probe) = 2 x layers x (one allreduce of [batch, hidden] with the model's allreduce, "
             "launched one by one from the host and timed inside the workers: an upper bound, the decode step "
             "replays them in a CUDA graph) / median inter-token latency; collectives and GPU idle (traced): "
             "their shares of the decode step in the traced repeat (Where the time goes). KV heads are "
             + ("replicated past tp=" + str(config.num_key_value_heads) if max(tps) > config.num_key_value_heads
                else "split across ranks") + "; the embedding is replicated; the LM head is "
             + ("vocab-parallel at tp > 1 (each rank computes its slice of the vocabulary, then an allgather)"
                if vocab_parallel else "replicated (every rank computes all logits)") + ".")
    status = write_report(run_dir, f"Tensor parallelism: {config.name} {quant} on {target}",
                          OmegaConf.to_container(cfg, resolve=True), points, columns=COLUMNS,
                          sections=[("Method", notes)], summary_extra=scaling, extra={"bandwidth": bandwidth},
                          figures=figures)
    for p in points:
        if p.ok and p.summary.get("decode_tokens_per_s"):
            s = p.summary
            share = f", allreduce {s['allreduce_share']:.0%}" if "allreduce_share" in s else ""
            print(f"tp={p.params['tp']}: {s['decode_tokens_per_s']:.1f} decode tokens/s, "
                  f"speedup {s.get('speedup', float('nan')):.2f}x, efficiency {s.get('efficiency', float('nan')):.0%}{share}")
        elif p.ok:
            s = p.summary
            print(f"tp={p.params['tp']}: TTFT {s['ttft_s']['p50'] * 1e3:.2f} ms, TTFT speedup "
                  f"{s.get('ttft_speedup', float('nan')):.2f}x; decode not measured (new_tokens=1: no decode step)")
        else:
            print(f"tp={p.params['tp']}: error: {p.error}")
    print(f"results: {run_dir.root}")
    return entry.exit_status(status, points)


if __name__ == "__main__":
    main()
