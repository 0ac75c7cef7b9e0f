"""python -m experiments.generate: text from a local checkpoint, with its tokenizer.

    python -m experiments.generate model.path=DIR prompt="Explain tensor parallelism in 5 bullet points." \
        workload.new_tokens=128 [tp=2] [device=cpu|cuda] [quant=...] [sampling.temperature=0.8 sampling.top_p=0.95]

The prompt is encoded with the checkpoint's tokenizer.json (BOS added by its post-processor),
prefilled, then decoded one token at a time until an EOS token of the checkpoint (unless
ignore_eos=true) or workload.new_tokens tokens. Greedy (the default) takes the device's argmax;
sampling (harness.sampling) reads each step's logits. The text is printed as it is generated,
then a summary line (tokens, TTFT, decode tokens/s, memory); results.json holds the prompt, the
token ids, the text, the sampling settings, why it stopped, the timings and the build.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from engine.config import ConfigError
from engine.generate import Generator, StepTiming
from harness import device_probe, entry, measure, run_state, sweep, text
from harness.report import Point, write_report
from harness.results import RunDir
from harness.sampling import Sampler, SamplingParams
from harness.spec import RunSpec, Workload, positive

log = logging.getLogger("experiments.generate")


@dataclasses.dataclass
class Settled:
    """A generate run, checked: everything here was validated before anything is compiled."""

    spec: RunSpec  # its workload: batch 1, the prompt's length, new_tokens
    tokenizer: object
    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    eos: list[int]  # the token ids that stop the generation ([] with ignore_eos)
    ignore_eos: bool


def prompt_text(value) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError('the prompt is empty; pass prompt="some text"')
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f'prompt must be text, got {value!r}; pass prompt="some text" (quoted)')
    return str(value)


def settle(cfg: DictConfig) -> Settled:
    """Every check of a generate run, cheapest first, all before anything is compiled."""
    text.tokenizer_file(cfg.model.get("path"))
    prompt = prompt_text(cfg.get("prompt"))
    sampling = SamplingParams.from_config(cfg.get("sampling"))
    ignore_eos = cfg.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ConfigError(f"ignore_eos must be true or false, got {ignore_eos!r}")
    new_tokens = positive("workload.new_tokens", cfg.workload.new_tokens)
    # The workload's prompt_len is not this run's: the prompt sets its length (checked below).
    spec = RunSpec.from_hydra(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "workload"]), "generate",
                              tp=positive("tp", cfg.tp), pp=positive("pp", cfg.get("pp", 1)))
    config = spec.config
    tokenizer = text.load_tokenizer(spec.weights.path)
    prompt_ids = text.encode(tokenizer, prompt)
    if not prompt_ids:
        raise ConfigError(f"the prompt {prompt!r} encodes to no tokens; pass a longer prompt")
    if max(prompt_ids) >= config.vocab_size:
        raise ConfigError(f"tokenizer.json encodes the prompt with token id {max(prompt_ids)}, outside the model's "
                          f"vocabulary of {config.vocab_size}; {text.NEEDS_TOKENIZER} that belongs to the checkpoint")
    total = len(prompt_ids) + new_tokens
    if total > config.max_position_embeddings:
        raise ConfigError(f"the prompt's {len(prompt_ids)} tokens + workload.new_tokens={new_tokens} = {total} exceed "
                          f"{config.name}'s context of {config.max_position_embeddings} tokens; shorten the prompt "
                          "or lower workload.new_tokens")
    eos = text.eos_token_ids(spec.weights.path, config.vocab_size)
    workload = Workload.from_hydra(cfg.workload, config, batch=1, prompt_len=len(prompt_ids),
                                   warmup=0, repeats=1)
    spec = dataclasses.replace(spec, workload=workload)
    spec.check_devices(spec.build.tp * spec.build.pp)
    return Settled(spec, tokenizer, prompt, prompt_ids, sampling, [] if ignore_eos else eos, ignore_eos)


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # generated, the first from the prefill; an EOS that stopped it included
    text: str
    stop_reason: str  # "eos" | "max_new_tokens"
    sample: measure.RunSample  # the timed run: prefill and every decode step
    first_token_at: float  # time.perf_counter() when the first token was on the host, chosen

    @property
    def stream_tokens_per_s(self) -> float | None:
        """Tokens after the first per second, from the first on the host to the last printed
        (the decode steps with sampling, detokenization and printing)."""
        n = len(self.token_ids) - 1
        return n / (self.sample.end - self.first_token_at) if n else None


def generate(gen: Generator, prompt_ids: list[int], new_tokens: int, sampler: Sampler, eos, stream: text.TextStream,
             out=None) -> Generation:
    """Prefill `prompt_ids`, then decode until a token in `eos` or `new_tokens` tokens, each token
    chosen by `sampler` and its text written to `out` (default: nothing) as it comes."""
    session, vocab = gen.session, gen.session.spec.config.vocab_size
    steps: list[StepTiming] = []

    def show(piece: str) -> None:
        if out is not None and piece:
            out.write(piece)
            out.flush()

    def reader(logits):
        return lambda: session.to_numpy(logits).reshape(-1)[:vocab]

    gen.hooks.append(steps.append)
    try:
        gen.reset(batch=1)
        gen.add_sequence(0)
        start = time.perf_counter()
        token, logits = gen.prefill(0, prompt_ids)
        tokens: list[int] = []
        first_at = None
        while True:
            token = sampler.pick(token, reader(logits))
            tokens.append(token)
            first_at = first_at or time.perf_counter()
            show(stream.add(token))
            if token in eos:
                stop = "eos"
                break
            if len(tokens) >= new_tokens:
                stop = "max_new_tokens"
                break
            (token,), logits = gen.decode([0], [token], len(tokens) - 1)
        show(stream.finish())
        end = time.perf_counter()
    finally:
        gen.hooks.remove(steps.append)
    sample = measure.RunSample(0, 1, len(prompt_ids), len(tokens), start, end, steps)
    return Generation(tokens, stream.text, stop, sample, first_at)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_line(summary: dict, tp: int) -> str:
    """Memory as the summary line shows it: each GPU used (NVML), or this process's peak RSS."""
    used = summary.get("gpu_memory_used_bytes")
    if used:
        return "GPU memory used: " + ", ".join(f"GPU {i} {_gib(b)}" for i, b in enumerate(used[:tp]))
    rss = f"peak RSS {_gib(summary['peak_host_rss_bytes'])}"
    return rss + (" (this process; the tp workers' not counted)" if tp > 1 else "")


def summary_line(summary: dict, tp: int) -> str:
    n, stop = summary["tokens_generated"], summary["stop_reason"]
    parts = [f"{n} token{'s' * (n != 1)} (stop: {stop})", f"TTFT {summary['ttft_s']['p50'] * 1e3:.1f} ms"]
    if summary.get("decode_tokens_per_s"):
        parts.append(f"decode {summary['decode_tokens_per_s']:.1f} tokens/s "
                     f"({summary['stream_tokens_per_s']:.1f} with sampling and printing)")
    else:
        parts.append("decode not measured (one token)")
    return ", ".join(parts + [memory_line(summary, tp)])


def _fenced(body: str) -> str:
    return f"~~~~text\n{body}\n~~~~\n"


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    run = settle(cfg)
    spec, w = run.spec, run.spec.workload
    build, name = spec.build, spec.config.name
    label = f"{name} {build.quant} tp={build.tp}" + (f" pp={build.pp}" if build.pp > 1 else "")
    point = Point(label, {"quant": build.quant, "tp": build.tp, "pp": build.pp})
    point.summary["build"] = build.to_dict()
    state = run_state.current()
    if state is not None:
        state.begin(label)
    session, artifact = sweep.load(spec, build, point, 1, w.max_total_len, w.prefill_chunk)
    t1, t2 = point.phases[-1][1:]
    with session:
        gen = Generator(session, max_batch=1, max_total_len=w.max_total_len, prefill_chunk=w.prefill_chunk)
        try:
            done = generate(gen, run.prompt_ids, w.new_tokens, Sampler(run.sampling), set(run.eos),
                            text.TextStream(run.tokenizer), out=sys.stdout)
        finally:
            print(flush=True)  # the text's line ends, also where the run is cut short
        s = point.summary
        s.update(measure.summarize([done.sample], build, session.weight_bytes,
                                   artifact.param_bytes("model.embed_tokens"), None))
        s["peak_host_rss_bytes"] = device_probe.host_peak_rss_bytes()
        if build.target == "cuda":
            s["gpu_memory_used_bytes"] = device_probe.gpu_memory_used_bytes()
        s.update(tokens_generated=len(done.token_ids), stop_reason=done.stop_reason,
                 stream_tokens_per_s=done.stream_tokens_per_s, load_seconds=t2 - t1,
                 allreduce_path=session.allreduce)
    point.samples = [done.sample]
    if len(done.token_ids) == 1:
        s["note"] = (f"one token generated (stop: {done.stop_reason}), from the prefill: TTFT is measured, "
                     "the decode figures are not")
    if state is not None:
        state.add(point)
    generation = {
        "prompt": run.prompt, "prompt_token_ids": run.prompt_ids, "token_ids": done.token_ids, "text": done.text,
        "stop_reason": done.stop_reason, "max_new_tokens": w.new_tokens, "sampling": run.sampling.to_dict(),
        "eos_token_ids": run.eos, "ignore_eos": run.ignore_eos, "checkpoint": spec.weights.path,
    }
    how = "greedy" if run.sampling.greedy else ", ".join(f"{k}={v}" for k, v in
                                                        dataclasses.asdict(run.sampling).items())
    sections = [("Prompt", _fenced(run.prompt)), ("Generated text", _fenced(done.text)),
                ("Generation", f"{len(done.token_ids)} tokens after a {len(run.prompt_ids)}-token prompt, "
                               f"{how}, stopped by {done.stop_reason}\n")]
    status = write_report(run_dir, f"Generate: {label} on {build.target}", OmegaConf.to_container(cfg, resolve=True),
                          [point], sections=sections, extra={"generation": generation})
    print(summary_line(s, build.tp * build.pp))
    print(f"results: {run_dir.root}")
    return entry.exit_status(status, [point])


if __name__ == "__main__":
    main()
