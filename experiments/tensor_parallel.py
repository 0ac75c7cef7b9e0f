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
from engine.disco import MAX_CPU_WORKERS
from engine.quantize import quant_spec
from engine.sharding import ShardPlan

from . import common, plots, sweep
from .report import BASE_COLUMNS, write_report
from .results import RunDir

log = logging.getLogger("experiments.tensor_parallel")


def tp_list(value) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise ConfigError("tp is empty; give e.g. 'tp=[1,2]'")
    for v in values:
        common.positive("every tp", v)
    if len(set(values)) != len(values):
        raise ConfigError(f"tp lists a value twice: {values}")
    return sorted(values)


def check_devices(tps: list[int], target: str) -> None:
    if target == "cuda":
        from engine.session import visible_cuda_devices

        found = visible_cuda_devices()
        if max(tps) > found:
            raise ConfigError(f"tp={max(tps)} needs {max(tps)} GPUs but {found} are visible; "
                              f"use tp values <= {found}")
    elif max(tps) > MAX_CPU_WORKERS:
        raise ConfigError(f"tp={max(tps)} on the CPU would start {max(tps)} worker processes; at most {MAX_CPU_WORKERS}")


def allreduce_probe(cfg, config, quant: str):
    """An `after_load` hook: time the model's allreduce message in the workers."""
    def probe(point, session, artifact, gen, prompts):
        if session.tp == 1 or not cfg.measure_allreduce or not point.summary.get("itl_s"):
            return
        from engine.disco import allreduce_seconds

        numel = cfg.workload.batch * config.hidden_size
        dtype = quant_spec(quant).model_dtype
        per_worker = allreduce_seconds(session, numel, dtype)
        seconds = float(np.median(per_worker))
        per_step = 2 * config.num_hidden_layers * seconds
        point.summary["allreduce"] = {"message_elements": numel, "dtype": dtype, "seconds_each": seconds,
                                      "per_worker_seconds": per_worker, "per_decode_step_s": per_step,
                                      "count_per_step": 2 * config.num_hidden_layers}
        point.summary["allreduce_share"] = per_step / point.summary["itl_s"]["p50"]
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
@common.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    plain = OmegaConf.to_container(cfg, resolve=True)
    tps = tp_list(cfg.tp)
    config = common.model_config(cfg.model)
    quant = quant_spec(cfg.quant.name).name
    sweep.check_workload(cfg.workload, config)
    target, arch = common.resolve_target(cfg.device)
    check_devices(tps, target)
    for tp in tps:
        ShardPlan(config, tp, cfg.lm_head).check_quant(quant_spec(quant))
    bandwidth = sweep.measured_bandwidth(cfg, target)
    w = cfg.workload
    points = []
    with tqdm(total=len(tps) * (w.warmup + w.repeats), desc=f"{config.name} {quant} tp={tps}", unit="run") as bar:
        for tp in tps:
            bar.set_postfix_str(f"tp={tp}")
            points.append(sweep.run_point(f"tp={tp}", {"tp": tp, "quant": quant}, cfg, config, quant, tp, target,
                                          arch, bandwidth and bandwidth["bytes_per_s"], bar,
                                          after_load=allreduce_probe(cfg, config, quant)))
    scaling = add_scaling(points)
    good = [p for p in points if p.ok and "speedup" in p.summary]
    if len(good) > 1:
        plots.speedup_vs_ideal([p.params["tp"] for p in good], [p.summary["speedup"] for p in good],
                               run_dir.path("speedup.png"), f"{config.name} {quant} on {target}: decode speedup")
    notes = ("Speedup is decode tokens/s over the smallest tp measured; efficiency = speedup x tp_base / tp. "
             "Allreduce share = 2 x layers x (one allreduce of [batch, hidden], timed inside the workers) / "
             "median inter-token latency. KV heads are "
             + ("replicated past tp=" + str(config.num_key_value_heads) if max(tps) > config.num_key_value_heads
                else "split across ranks") + "; the embedding is replicated; the LM head is "
             + ("vocab-parallel (each rank computes its slice of the vocabulary, then an allgather)"
                if cfg.lm_head == "vocab_parallel" else "replicated (every rank computes all logits)") + ".")
    status = write_report(run_dir, f"Tensor parallelism: {config.name} {quant} on {target}", plain, points,
                          columns=COLUMNS, sections=[("Method", notes)], summary_extra=scaling,
                          extra={"bandwidth": bandwidth})
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
