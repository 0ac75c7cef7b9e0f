"""Timed generation runs and what is derived from them (latency, throughput, roofline)."""

from __future__ import annotations

import dataclasses
import gc
import time

import numpy as np

from engine.generate import Generator, StepTiming
from runtime_patch.profiler_range import profiler_range

from . import stats


@dataclasses.dataclass
class RunSample:
    """One timed generation: a batch of prompts prefilled, then decoded together."""

    repeat: int
    batch: int
    prompt_len: int
    new_tokens: int
    start: float
    end: float
    steps: list[StepTiming]
    gc_s: float = 0.0  # how long Python's cyclic collector ran during the run (timed_runs)

    @property
    def ttft_s(self) -> float:
        """From the start to the first token of the last sequence (all prompts prefilled)."""
        return max(s.end for s in self.steps if s.kind == "prefill") - self.start

    @property
    def itl_s(self) -> list[float]:
        return [s.seconds for s in self.steps if s.kind == "decode"]

    @property
    def e2e_s(self) -> float:
        return self.end - self.start

    @property
    def prefill_s(self) -> float:
        return sum(s.seconds for s in self.steps if s.kind == "prefill")

    def to_dict(self) -> dict:
        return {"repeat": self.repeat, "batch": self.batch, "prompt_len": self.prompt_len,
                "new_tokens": self.new_tokens, "ttft_s": self.ttft_s, "e2e_s": self.e2e_s,
                "prefill_s": self.prefill_s, "itl_s": self.itl_s, "gc_s": self.gc_s}


def random_prompts(vocab: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, prompt_len).tolist() for _ in range(batch)]


class _CollectorClock:
    """Seconds Python's cyclic collector ran while installed (gc.callbacks): a run's host time that
    is neither the engine's nor the GPU's. (The last of seven TTFT(4096) runs was often 10-15 ms
    slower on the GPU box; the collector ran 0 ms in every timed run there, 2026-12-02, so it is
    not that; docs/BENCHMARKS.md seventeenth round.)"""

    def __init__(self):
        self.seconds, self._started = 0.0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def timed_runs(gen: Generator, prompts: list[list[int]], new_tokens: int, warmup: int, repeats: int,
               progress=None, scheduler=None) -> tuple[list[RunSample], list[list[int]]]:
    """`warmup` untimed generations, then `repeats` timed ones. Returns samples and the tokens.
    `scheduler`: how decode steps are ordered (runtime_patch.stream_overlap), default synchronous.
    Each sample records how long Python's cyclic collector ran in it (gc_s)."""
    samples, tokens = [], []

    def one_run():
        with _CollectorClock() as collector:
            start = time.perf_counter()
            result = gen.generate(prompts, new_tokens, scheduler)
            end = time.perf_counter()
        if progress is not None:
            progress.update(1)
        return start, end, result, collector.seconds

    for _ in range(warmup):
        one_run()
    with profiler_range():  # what `profile_gpu.sh -m nsight` captures (LAB_PROFILER_RANGE=1)
        for i in range(repeats):
            start, end, result, gc_s = one_run()
            samples.append(RunSample(i, len(prompts), len(prompts[0]), new_tokens, start, end, result.steps, gc_s))
            tokens = result.tokens
    return samples, tokens


def decode_bytes_per_step(build, weight_bytes: int, embed_bytes: int, batch: int, context: float) -> float:
    """Bytes one rank of `build` (a BuildSpec) reads from memory per decode step: its weights
    (less the embedding table of `embed_bytes`, of which one row per token is read) plus the KV
    cache of every sequence at `context`."""
    c = build.config
    # A tied table is read whole as the LM head; with pipeline stages the first stage's copy only
    # gathers rows (weight_bytes: every stage's, the bytes a step reads along the pipeline).
    weights = weight_bytes - (0 if c.tie_word_embeddings and build.pp == 1 else embed_bytes)
    dtype_bytes = np.dtype(build.quant_spec.model_dtype).itemsize
    kv = 2 * c.num_hidden_layers * build.plan.kv_heads * c.head_dim * dtype_bytes * context * batch
    return weights + kv


def summarize(samples: list[RunSample], build, weight_bytes: int, embed_bytes: int, bandwidth: float | None) -> dict:
    itl = [t for s in samples for t in s.itl_s]
    batch, prompt_len, new_tokens = samples[0].batch, samples[0].prompt_len, samples[0].new_tokens
    out = {
        "ttft_s": stats.summarize([s.ttft_s for s in samples]),
        "itl_s": stats.summarize(itl) if itl else None,
        "e2e_s": stats.summarize([s.e2e_s for s in samples]),
        "prefill_tokens_per_s": float(np.median([batch * prompt_len / s.prefill_s for s in samples])),
        "decode_tokens_per_s": float(batch / np.median(itl)) if itl else None,
        "weight_bytes": weight_bytes,
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": len(samples),
    }
    if itl and bandwidth:
        context = prompt_len + new_tokens / 2  # the mean context over the decode steps
        per_step = decode_bytes_per_step(build, weight_bytes, embed_bytes, batch, context)
        out["decode_bytes_per_step"] = per_step
        out["memory_bandwidth_bytes_per_s"] = bandwidth
        out["roofline_step_s"] = per_step / bandwidth
        out["roofline_fraction"] = stats.roofline_fraction(per_step, bandwidth, float(np.median(itl)))
        note = stats.roofline_note(out["roofline_fraction"], bandwidth)
        if note is not None:
            out["roofline_note"] = note
    return out
