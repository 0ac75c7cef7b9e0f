"""Decode benchmark on one GPU: the compiled engine beside PyTorch peers, against the roofline.

    python -m bench.decode --model llama3-8b --quants q0f16,q8f16_1,q4f16_1 --prompts 128,1024 \
        --batches 1,16,64 --peers eager,compile --artifacts DIR --out docs/benchmarks

In one process on one card: the device's copy bandwidth; per (quant, prompt, batch) the engine's
TTFT and decode step times (median, p95, raw samples) and the fraction of the bandwidth roofline
(bytes read per step incl. KV / bandwidth over the measured step); the peers on the same shapes
and the same random weights (transformers eager, and with a static cache under torch.compile).
Writes `<out>/<date>-<card>-decode.json`. Artifacts must be compiled beforehand (on any machine)
with `python -m bench.build_artifacts`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.build_artifacts import add_kernel_args, kernel_flag, kernel_variants
from engine.compile import Artifact, BuildSpec
from engine.config import preset
from engine.generate import Generator
from engine.session import VMSession
from engine.weights import open_source
from harness import device_probe, measure, stats
from harness.results import atomic_write_text, git_info
from runtime_patch import functions


# The default of each per-process path switch the benchmark sets
DEFAULT_PATH = {functions.PREFILL_PATH: functions.PREFILL_PATHS[0], functions.QUANT_GEMM_PATH: functions.QUANT_GEMM_PATHS[0]}


def find_artifact(root: Path, spec: BuildSpec) -> Artifact:
    """An artifact under `root` built for `spec`'s model, quant, tp, target and kernel sources (its
    key may differ: the box has no compiler to check it with)."""
    for path in sorted(root.glob(f"{spec.config.name}-{spec.quant}-tp{spec.tp}-{spec.target}-*"), reverse=True):
        artifact = Artifact.load(path)
        if artifact.spec.kernels == spec.kernels:
            return artifact
    flags = " ".join(f"{kernel_flag(k)} {v}" for k, v in spec.kernels.items())
    raise SystemExit(f"no artifact for {spec.folder_name()} ({spec.kernels}) under {root}: run python -m "
                     f"bench.build_artifacts {flags}")


def time_engine(session, config, prompt_len: int, batch: int, new_tokens: int, warmup: int, repeats: int) -> dict:
    gen = Generator(session, max_batch=batch, max_total_len=prompt_len + new_tokens, prefill_chunk=prompt_len)
    prompts = measure.random_prompts(config.vocab_size, batch, prompt_len, seed=0)
    samples, _ = measure.timed_runs(gen, prompts, new_tokens, warmup, repeats)
    steps = [t for s in samples for t in s.itl_s]
    return {"ttft_s": stats.summarize([s.ttft_s for s in samples]), "step_s": stats.summarize(steps),
            "tokens_per_s": batch / float(np.median(steps)), "raw_step_s": steps,
            "raw_ttft_s": [s.ttft_s for s in samples], "raw_gc_s": [s.gc_s for s in samples]}


def time_peer(kind: str, source, config, prompt_len: int, batch: int, new_tokens: int, repeats: int) -> dict:
    """transformers on the same weights: `eager`, or `compile` (static cache + torch.compile)."""
    import torch
    import transformers

    hf = transformers.LlamaConfig(**config.to_hf_dict())
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(hf).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # the engine's weights, so both run the same model
        for name, tensor in model.state_dict().items():
            if name.endswith(".weight"):
                tensor.copy_(source.get(name))
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if kind == "compile":
        # generate() compiles the decoding forward itself when the cache is static (transformers
        # >= 4.50); compiling model.forward by hand as well made CUDA graphs overwrite outputs
        # still in use ("accessing tensor output of CUDAGraphs that has been overwritten").
        kwargs["cache_implementation"] = "static"
        kwargs["compile_config"] = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    first = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        first = time.perf_counter() - first
        per_token = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            per_token.append((time.perf_counter() - start) / new_tokens)
        prefill = []
        # the logits of the last position only, as a prefill that samples one token needs (and as
        # generate() asks for); older transformers compute them for every position
        import inspect

        last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        forward_kwargs = {"logits_to_keep": 1} if last_only else {}
        for _ in range(repeats):
            start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_ev.record()
            model(ids, **forward_kwargs)
            end_ev.record()
            torch.cuda.synchronize()
            prefill.append(start_ev.elapsed_time(end_ev) / 1e3)
    attention = getattr(model.config, "_attn_implementation", None)
    del model
    torch.cuda.empty_cache()
    return {"peer": f"transformers {kind}", "attention": attention, "prefill_logits": "last" if last_only else "all",
            "step_s_incl_prefill_amortised": stats.summarize(per_token),
            "tokens_per_s": batch / float(np.median(per_token)), "prefill_s": stats.summarize(prefill),
            "first_call_s": first, "raw_per_token_s": per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--quants", default="q0f16,q8f16_1,q4f16_1")
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peers", default="eager,compile", help="comma list of eager,compile; empty for none")
    ap.add_argument("--prefill-paths", default=functions.PREFILL_PATHS[0],
                    help=f"comma list of the library prefill attention's paths to time ({', '.join(functions.PREFILL_PATHS)})")
    ap.add_argument("--quant-gemm-paths", default=functions.QUANT_GEMM_PATHS[0],
                    help="comma list of the quantized prefill GEMM's paths to time "
                         f"({', '.join(functions.QUANT_GEMM_PATHS)}; quantized models with the library prefill GEMM)")
    add_kernel_args(ap)  # the engine runs once per artifact
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="", help="appended to the record's file name (several records a day)")
    ap.add_argument("--sha", default=None, help="git SHA of the code (when run outside a checkout)")
    args = ap.parse_args()
    for option, value, choices in (("--prefill-paths", args.prefill_paths, functions.PREFILL_PATHS),
                                   ("--quant-gemm-paths", args.quant_gemm_paths, functions.QUANT_GEMM_PATHS)):
        unknown = set(value.split(",")) - set(choices)
        if unknown:
            ap.error(f"{option}: {', '.join(sorted(unknown))} is not one of {', '.join(choices)}")

    import tvm
    import tvm_ffi

    config = preset(args.model)
    dev = tvm.cuda(0)
    card = dev.device_name
    bandwidth = device_probe.copy_bandwidth("cuda")
    record = {"model": args.model, "tp": 1, "card": card, "date": dt.date.today().isoformat(),
              "command": " ".join(["python", "-m", "bench.decode", *sys.argv[1:]]), "git_sha": args.sha or (git_info() or {}).get("sha"),
              "bandwidth": bandwidth, "engine": [], "peers": []}
    for quant, variant in [(q, v) for q in args.quants.split(",") for v in kernel_variants(args)]:
        spec = BuildSpec(config, quant, 1, "cuda", "sm_90", **variant)
        kernels = spec.kernels  # "auto" resolved for cuda
        artifact = find_artifact(args.artifacts, spec)
        source = open_source(config, None, seed=0, backend="torch", device="cuda:0")
        t0 = time.perf_counter()
        session = VMSession(artifact, source)
        load_s = time.perf_counter() - t0
        # the prefill attention's and the quantized GEMM's paths, each timed in this process
        switches = {}
        if kernels["prefill_attention"] == "library":
            switches[functions.PREFILL_PATH] = args.prefill_paths.split(",")
        if kernels["prefill_gemm"] == "library" and spec.quant_spec.bits in functions.GEMM_BY_BITS:
            switches[functions.QUANT_GEMM_PATH] = args.quant_gemm_paths.split(",")
        functions.register("cuda", list(switches))
        set_path = {name: tvm_ffi.get_global_func(name) for name in switches}
        paths = [dict(zip(switches, chosen)) for chosen in itertools.product(*switches.values())]
        for prompt, batch, chosen in [(p, b, c) for p in map(int, args.prompts.split(","))
                                      for b in map(int, args.batches.split(",")) for c in paths]:
            for name, path in chosen.items():
                set_path[name](path)
            r = time_engine(session, config, prompt, batch, args.new_tokens, args.warmup, args.repeats)
            context = prompt + args.new_tokens / 2
            per_step = measure.decode_bytes_per_step(artifact.spec, session.weight_bytes,
                                                     artifact.param_bytes("model.embed_tokens"), batch, context)
            r.update(quant=quant, **kernels, prefill_path=chosen.get(functions.PREFILL_PATH),
                     quant_gemm_path=chosen.get(functions.QUANT_GEMM_PATH), prompt=prompt, batch=batch, load_s=load_s,
                     bytes_per_step=per_step,
                     roofline_fraction=stats.roofline_fraction(per_step, bandwidth["bytes_per_s"],
                                                               r["step_s"]["p50"]))
            described = "".join(f", {name.rsplit('.', 1)[-1]} {path}" for name, path in chosen.items())
            print(f"{quant} ({', '.join(f'{k}={v}' for k, v in kernels.items())}{described}) prompt={prompt} "
                  f"batch={batch}: {r['tokens_per_s']:.1f} tok/s, step p50 {r['step_s']['p50'] * 1e3:.2f} ms, "
                  f"roofline {r['roofline_fraction']:.0%}, TTFT {r['ttft_s']['p50'] * 1e3:.1f} ms", flush=True)
            record["engine"].append(r)
        for name in switches:  # back to the defaults
            set_path[name](DEFAULT_PATH[name])
        session.close()
        del session
    peers = [p for p in args.peers.split(",") if p]
    if peers:
        source = open_source(config, None, seed=0, backend="torch", device="cuda:0")
        for kind in peers:
            for prompt in map(int, args.prompts.split(",")):
                try:
                    r = time_peer(kind, source, config, prompt, 1, args.new_tokens, args.repeats)
                except Exception as err:  # noqa: BLE001  (a peer that does not run is recorded as such)
                    r = {"peer": f"transformers {kind}", "error": f"{type(err).__name__}: {err}"}
                r.update(prompt=prompt, batch=1)
                print(json.dumps({k: v for k, v in r.items() if not k.startswith("raw")}), flush=True)
                record["peers"].append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out / f"{record['date']}-{card.replace(' ', '-')}-decode{tag}.json"
    atomic_write_text(path, json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
