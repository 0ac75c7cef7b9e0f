"""python -m experiments.pipeline_parallel 'pp=[1,2]': the same workload with the layers split
over pp stages (each on `tp` devices); 'layout=[tp2,pp2]' compares layouts of the same devices.

Per point: TTFT, ITL, decode tokens/s, speedup over the first point, efficiency (speedup over
the device ratio), the share of a decode step spent passing activations between stages (a probe
timed inside the workers, as tensor_parallel's allreduce share), and the predicted memory of every
stage's device (measured per GPU on CUDA). With `microbatches` > 1 a batch is split into that many
request groups whose decode steps are interleaved, so that while the last stage runs micro-batch A
the first runs B (runtime_patch.stream_overlap's double_buffer scheduler over that many groups).
The default is 1, the stages one after another: a memory-bound decode step costs each stage the
time to read its weights whatever the micro-batch's size, so M micro-batches over P stages take
at best (M + P - 1) / P of one device's step, never less (measured: docs/BENCHMARKS.md). Pipeline
parallelism here buys memory per device (a model that fits no single device), not decode speed.
"""

from __future__ import annotations

import logging
import re

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

log = logging.getLogger("experiments.pipeline_parallel")

_LAYOUT = re.compile(r"^(?:tp(\d+))?(?:pp(\d+))?$")


def _listed(value, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise ConfigError(f"{name} is empty; give e.g. '{name}=[1,2]'")
    return values


def layouts(cfg) -> list[tuple[int, int]]:
    """The (tp, pp) of every point: `layout` names (tp2, pp2, tp2pp2) when given, else each pp of
    `pp` with the run's `tp`. Checked before anything runs."""
    if cfg.get("layout") is not None:
        out = []
        for name in _listed(cfg.layout, "layout"):
            match = _LAYOUT.match(str(name))
            if not match or not str(name):
                raise ConfigError(f"layout {name!r}: write tpN, ppN or tpNppM (e.g. 'layout=[tp2,pp2]')")
            out.append((int(match.group(1) or 1), int(match.group(2) or 1)))
    else:
        tp = positive("tp", cfg.get("tp", 1))
        out = [(tp, positive("every pp", pp)) for pp in _listed(cfg.pp, "pp")]
    for tp, pp in out:
        positive("tp", tp), positive("pp", pp)
    if len(set(out)) != len(out):
        raise ConfigError(f"a layout is listed twice: {[label(tp, pp) for tp, pp in out]}")
    return out


def microbatches(value, pp: int, batch: int) -> int:
    """How many request groups a point's batch is split into: `auto` is one per stage (at most
    the batch), else the number given (at most the batch)."""
    if value == "auto":
        return min(pp, batch)
    if isinstance(value, str):
        raise ConfigError(f"microbatches={value!r}: give a positive integer or auto")
    return min(positive("microbatches", value), batch)


def label(tp: int, pp: int) -> str:
    return f"tp={tp} pp={pp}"


def transfer_probe(spec: RunSpec, measure: bool) -> sweep.AfterLoad:
    """An `after_load` hook: time passing a decode step's activations ([batch, hidden] in the
    model's dtype) between two stages, in the workers of the point's session."""
    def probe(loaded: sweep.Loaded) -> None:
        point, session = loaded.point, loaded.session
        if getattr(session, "pp", 1) == 1 or not measure or not point.summary.get("itl_s"):
            return
        from engine.disco import stage_transfer_seconds

        numel = loaded.generator.max_batch * spec.config.hidden_size
        dtype = session.spec.quant_spec.model_dtype
        per_rank = stage_transfer_seconds(session, numel, dtype)
        seconds = float(np.median(per_rank))
        count = session.pp - 1  # activations passed on per step (the results' return is not counted)
        share = count * seconds / point.summary["itl_s"]["p50"]
        point.summary["transfer"] = {"message_elements": numel, "dtype": dtype, "seconds_each": seconds,
                                     "per_rank_seconds": per_rank, "count_per_step": count,
                                     "method": "half a round trip between the first two stages, timed in the workers"}
        if share <= 1:
            point.summary["transfer_share"] = share
        else:
            point.summary["transfer"]["note"] = f"not reported: the probe took {share:.0%} of the decode step"
    return probe


def add_scaling(points) -> dict:
    """Speedups over the first point measured (decode tokens/s, TTFT), efficiency over the ratio
    of devices."""
    ok = [p for p in points if p.ok and p.summary.get("ttft_s")]
    if not ok:
        return {}
    base = ok[0]
    for p in ok:
        p.summary["ttft_speedup"] = base.summary["ttft_s"]["p50"] / p.summary["ttft_s"]["p50"]
        if p.summary.get("decode_tokens_per_s") and base.summary.get("decode_tokens_per_s"):
            p.summary["speedup"] = p.summary["decode_tokens_per_s"] / base.summary["decode_tokens_per_s"]
            p.summary["efficiency"] = p.summary["speedup"] * base.params["devices"] / p.params["devices"]
    return {"speedup_baseline": base.label}


COLUMNS = BASE_COLUMNS[:-1] + [("devices", "devices", "{}"), ("device_memory_gib", "memory/device (GiB, predicted)", "{:.3f}"),
                               ("speedup", "speedup", "{:.2f}x"), ("efficiency", "efficiency", "{:.0%}"),
                               ("transfer_share", "stage transfers (probe)", "{:.1%}"),
                               ("gpu_idle_share", "GPU idle (traced)", "{:.0%}")]


@hydra.main(config_path="../conf", config_name="pipeline_parallel", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    points_wanted = layouts(cfg)
    spec = RunSpec.from_hydra(cfg, "pipeline_parallel")
    spec.check_devices(max(tp * pp for tp, pp in points_wanted))
    builds = {(tp, pp): spec.build_for(tp=tp, pp=pp) for tp, pp in points_wanted}  # validates every layout first
    w, config, quant, target = spec.workload, spec.config, spec.build.quant, spec.target
    groups = {layout: microbatches(cfg.get("microbatches", 1), layout[1], w.batch) for layout in builds}
    bandwidth = sweep.measured_bandwidth(spec)
    points = []
    with tqdm(total=len(builds) * (w.warmup + w.repeats), desc=f"{config.name} {quant}", unit="run") as bar:
        for (tp, pp), build in builds.items():
            bar.set_postfix_str(label(tp, pp))
            n = groups[(tp, pp)]
            point = sweep.run_point(spec, label(tp, pp), {"tp": tp, "pp": pp, "devices": tp * pp, "quant": quant,
                                                          "microbatches": n},
                                    build, bandwidth=bandwidth and bandwidth["bytes_per_s"], progress=bar,
                                    after_load=transfer_probe(spec, bool(cfg.measure_transfer)),
                                    scheduler=stream_overlap.DoubleBufferDecode(n) if n > 1 else None)
            points.append(point)
    scaling = add_scaling(points)
    good = [p for p in points if p.ok and p.summary.get("decode_tokens_per_s")]
    figures = [("layouts.png", lambda path: plots.throughput_bars(
        {p.label: p.summary["decode_tokens_per_s"] for p in good}, "decode tokens/s",
        f"{config.name} {quant} on {target}: layouts", path))] if good else []
    split = ", ".join(f"{label(*k)}: {n}" for k, n in groups.items())
    notes = ("Each stage holds a contiguous range of layers (engine.sharding.stage_layers: an even split, the "
             "embedding on the first stage, the final norm and the LM head on the last), on tp devices; a step runs "
             "the stages one after another and the last stage's tokens and logits return to the first stage's "
             f"worker 0. Micro-batches per point ({split}): the batch of {w.batch} split into that many request "
             "groups, each in its own KV cache, whose decode steps are interleaved (the double_buffer scheduler) so "
             "that one group's step runs on a stage while another's runs on the next; with one group the stages run "
             "one after another. A memory-bound decode step costs a stage the time to read its weights whatever the "
             "micro-batch's size, so M micro-batches over P stages take at best (M + P - 1) / P of one device's step: "
             "pp trades decode speed for memory per device. "
             "Speedup is decode tokens/s over the first point; efficiency = speedup x its "
             "devices / this point's devices. Stage transfers (probe) = (pp - 1) x (passing [batch, hidden] "
             "between two stages, timed inside the workers) / median inter-token latency. Memory/device: the "
             "fullest stage's prediction (engine.memory; every stage's is in results.json under "
             "memory_predicted_bytes.stages); measured GPU memory per device is in results.json on CUDA.")
    status = write_report(run_dir, f"Pipeline parallelism: {config.name} {quant} on {target}",
                          OmegaConf.to_container(cfg, resolve=True), points, columns=COLUMNS,
                          sections=[("Method", notes)], summary_extra=scaling, extra={"bandwidth": bandwidth},
                          figures=figures)
    for p in points:
        s = p.summary
        if p.ok and s.get("decode_tokens_per_s"):
            share = f", stage transfers {s['transfer_share']:.1%}" if "transfer_share" in s else ""
            print(f"{p.label}: {s['decode_tokens_per_s']:.1f} decode tokens/s, speedup "
                  f"{s.get('speedup', float('nan')):.2f}x, efficiency {s.get('efficiency', float('nan')):.0%}{share}, "
                  f"{s['memory_predicted_bytes']['total'] / 2**30:.3f} GiB per device (predicted)")
        elif p.ok:
            print(f"{p.label}: TTFT {s['ttft_s']['p50'] * 1e3:.2f} ms; decode not measured (new_tokens=1)")
        else:
            print(f"{p.label}: error: {p.error}")
    print(f"results: {run_dir.root}")
    return entry.exit_status(status, points)


if __name__ == "__main__":
    main()
