"""python -m experiments.baseline: one model, one configuration, measured end to end.

TTFT, inter-token latency (mean, std, p50, p95, p99), end-to-end latency, decode and prefill
tokens/s, peak memory, weight bytes, and the decode's fraction of the memory-bandwidth roofline
(bandwidth measured in the same run).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine.quantize import quant_spec

from . import common, sweep
from .report import write_report
from .results import RunDir

log = logging.getLogger("experiments.baseline")


@hydra.main(config_path="../conf", config_name="baseline", version_base="1.3")
@common.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    plain = OmegaConf.to_container(cfg, resolve=True)
    config = common.model_config(cfg.model)
    quant = quant_spec(cfg.quant.name).name
    sweep.check_workload(cfg.workload, config)
    target, arch = common.resolve_target(cfg.device)
    bandwidth = sweep.measured_bandwidth(cfg, target)
    w = cfg.workload
    with tqdm(total=w.warmup + w.repeats, desc=f"{config.name} {quant}", unit="run") as bar:
        point = sweep.run_point(f"{config.name} {quant}", {"quant": quant, "tp": 1}, cfg, config, quant, 1,
                                target, arch, bandwidth and bandwidth["bytes_per_s"], bar)
    status = write_report(run_dir, f"Baseline: {config.name} {quant} on {target}", plain, [point],
                          extra={"bandwidth": bandwidth})
    if point.ok:
        s = point.summary
        roof = f", {s['roofline_fraction']:.0%} of the bandwidth roofline" if "roofline_fraction" in s else ""
        print(f"{config.name} {quant} on {target}: TTFT {s['ttft_s']['p50'] * 1e3:.1f} ms, "
              f"ITL p50 {s['itl_s']['p50'] * 1e3:.2f} ms, {s['decode_tokens_per_s']:.1f} decode tokens/s{roof}")
    else:
        print(f"error: {point.error}")
    print(f"results: {run_dir.root}")
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    main()
