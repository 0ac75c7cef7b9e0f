"""python -m experiments.baseline: one model, one configuration, measured end to end.

TTFT, inter-token latency (mean, std, p50, p95, p99), end-to-end latency, decode and prefill
tokens/s, peak memory, weight bytes, and the decode's fraction of the memory-bandwidth roofline
(bandwidth measured in the same run).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness import entry, sweep
from harness.report import write_report
from harness.results import RunDir
from harness.spec import RunSpec

log = logging.getLogger("experiments.baseline")


@hydra.main(config_path="../conf", config_name="baseline", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    spec = RunSpec.from_hydra(cfg, "baseline")
    bandwidth = sweep.measured_bandwidth(spec)
    build, w, name = spec.build, spec.workload, spec.config.name
    with tqdm(total=w.warmup + w.repeats, desc=f"{name} {build.quant}", unit="run") as bar:
        point = sweep.run_point(spec, f"{name} {build.quant}", {"quant": build.quant, "tp": 1}, build,
                                bandwidth=bandwidth and bandwidth["bytes_per_s"], progress=bar)
    status = write_report(run_dir, f"Baseline: {name} {build.quant} on {build.target}",
                          OmegaConf.to_container(cfg, resolve=True), [point], extra={"bandwidth": bandwidth})
    if point.ok:
        s = point.summary
        ttft = f"{name} {build.quant} on {build.target}: TTFT {s['ttft_s']['p50'] * 1e3:.1f} ms"
        if s.get("itl_s"):
            roof = f", {s['roofline_fraction']:.0%} of the bandwidth roofline" if "roofline_fraction" in s else ""
            print(f"{ttft}, ITL p50 {s['itl_s']['p50'] * 1e3:.2f} ms, {s['decode_tokens_per_s']:.1f} decode "
                  f"tokens/s{roof}")
        else:
            print(f"{ttft}; decode not measured (new_tokens=1: no decode step)")
    else:
        print(f"error: {point.error}", file=sys.stderr)
    print(f"results: {run_dir.root}")
    return entry.exit_status(status, [point])


if __name__ == "__main__":
    main()
