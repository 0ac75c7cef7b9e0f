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
        point.summary["allreduce"] = {"message_elements": numel, "dtype": dtype, "seconds_each": seconds,
                                      "per_worker_seconds": per_worker, "per_decode_step_s": count * seconds,
                                      "count_per_step": count}
        point.summary["allreduce_share"] = count * seconds / point.summary["itl_s"]["p50"]
    return probe


def add_scaling(points) -> dict:
    ok = [p for p in points if p.ok and p.summary.get("decode_tokens_per_s")]
    if not ok:
        return {}
    base = min(ok, key=lambda p: p.params["tp"])
    for p in ok:
        p.summary["speedup"] = p.summary["decode_tokens_per_s"] / base.summary["decode_tokens_per_s"]
        p.summary["efficiency"] = p.summary["speedup"] * base.params["tp"] / p.params["tp"]
        p.summary["ttft_speedup"] = base.summary["ttft_s"]["p50"] / p.summary["ttft_s"]["p50"]
    return {"speedup_baseline_tp": base.params["tp"]}


COLUMNS = BASE_COLUMNS + [("speedup", "speedup", "{:.2f}x"), ("efficiency", "efficiency", "{:.0%}"),
                          ("allreduce_share", "allreduce share", "{:.0%}")]


@hydra.main(config_path="../conf", config_name="tensor_parallel", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    tps = tp_list(cfg.tp)
    spec = RunSpec.from_hydra(cfg, "tensor_parallel")
    spec.check_devices(max(tps))
    builds = {tp: spec.build_for(tp=tp) for tp in tps}  # validates every tp before anything runs
    bandwidth = sweep.measured_bandwidth(spec)
    w, config, quant, target = spec.workload, spec.config, spec.build.quant, spec.target
    points = []
    with tqdm(total=len(tps) * (w.warmup + w.repeats), desc=f"{config.name} {quant} tp={tps}", unit="run") as bar:
        for tp, build in builds.items():
            bar.set_postfix_str(f"tp={tp}")
            points.append(sweep.run_point(spec, f"tp={tp}", {"tp": tp, "quant": quant}, build,
                                          bandwidth=bandwidth and bandwidth["bytes_per_s"], progress=bar,
                                          after_load=allreduce_probe(spec, bool(cfg.measure_allreduce))))
    scaling = add_scaling(points)
    good = [p for p in points if p.ok and "speedup" in p.summary]
    if len(good) > 1:
        plots.speedup_vs_ideal([p.params["tp"] for p in good], [p.summary["speedup"] for p in good],
                               run_dir.path("speedup.png"), f"{config.name} {quant} on {target}: decode speedup")
    vocab_parallel = spec.build.lm_head == "vocab_parallel"
    notes = ("Speedup is decode tokens/s over the smallest tp measured; efficiency = speedup x tp_base / tp. "
             "Allreduce share = 2 x layers x (one allreduce of [batch, hidden], timed inside the workers) / "
             "median inter-token latency. KV heads are "
             + ("replicated past tp=" + str(config.num_key_value_heads) if max(tps) > config.num_key_value_heads
                else "split across ranks") + "; the embedding is replicated; the LM head is "
             + ("vocab-parallel (each rank computes its slice of the vocabulary, then an allgather)"
                if vocab_parallel else "replicated (every rank computes all logits)") + ".")
    status = write_report(run_dir, f"Tensor parallelism: {config.name} {quant} on {target}",
                          OmegaConf.to_container(cfg, resolve=True), points, columns=COLUMNS,
                          sections=[("Method", notes)], summary_extra=scaling, extra={"bandwidth": bandwidth})
    for p in points:
        if p.ok:
            s = p.summary
            share = f", allreduce {s['allreduce_share']:.0%}" if "allreduce_share" in s else ""
            print(f"tp={p.params['tp']}: {s['decode_tokens_per_s']:.1f} decode tokens/s, "
                  f"speedup {s.get('speedup', float('nan')):.2f}x, efficiency {s.get('efficiency', float('nan')):.0%}{share}")
        else:
            print(f"tp={p.params['tp']}: error: {p.error}")
    print(f"results: {run_dir.root}")
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    main()
