"""python -m experiments.quant_compare: INT4 on one device vs INT8 on two, speed and accuracy.

Every (quantization, tp[, pp]) configuration runs on the same weights and prompts. Accuracy is measured
against the `reference` quantization (q0f16) on those weights: a random prompt is continued
greedily by the reference, and every configuration is teacher-forced over that token stream;
per position: KL(reference || config), top-1 agreement, logits error. With `eval.text` and a
tokenizer in the model folder, perplexity over the text too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine.config import ConfigError
from engine.compile import compile_model
from engine.generate import Generator
from engine.session import open_session
from harness import accuracy, entry, plots, sweep
from harness.report import write_report
from harness.results import RunDir
from harness.spec import RunSpec, positive
from runtime_patch import stream_overlap

log = logging.getLogger("experiments.quant_compare")


def pairs_of(cfg, spec: RunSpec) -> list[tuple[str, int, int]]:
    """(quant, tp, pp) of every configuration (pp: pipeline stages, 1 where a config names none)."""
    pairs = []
    for item in cfg.configs:
        build = spec.build_for(quant=item["quant"], tp=positive("configs[].tp", item.get("tp", 1)),
                               pp=positive("configs[].pp", item.get("pp", 1)))  # validates
        pairs.append((build.quant, build.tp, build.pp))
    if not pairs:
        raise ConfigError("configs is empty; list (quant, tp) pairs, e.g. configs='[{quant: q4f16_1, tp: 1}]'")
    return pairs


def config_key(quant: str, tp: int, pp: int) -> str:
    """How a configuration is named in the tables: q8f16_1@tp2, q8f16_1@pp2, q8f16_1@tp2pp2."""
    if pp == 1:
        return f"{quant}@tp{tp}"
    return f"{quant}@{'tp%d' % tp if tp > 1 else ''}pp{pp}"


def teacher_forced(session, stream: list[int], prompt_len: int):
    """Logits [len(stream), vocab] of `session`'s model over the token stream (prompt in one
    prefill, then one decode step per token)."""
    return Generator(session, 1, len(stream), prompt_len).teacher_forced_logits(stream, prompt_len)


def reference_session(spec: RunSpec):
    """A session of the reference quantization at tp=1, pp=1."""
    return open_session(compile_model(spec.build_for(tp=1, pp=1), spec.cache_dir), spec.source())


def eval_stream(cfg, spec: RunSpec) -> tuple[list[int], int]:
    """Token stream for accuracy: a text file through the model's tokenizer, or a random prompt
    continued greedily by the reference quantization."""
    config = spec.config
    if cfg.eval.text:
        text = Path(cfg.eval.text)
        folder = spec.weights.path
        if not text.is_file():
            raise ConfigError(f"eval.text={text} does not exist")
        if not folder or not (Path(folder) / "tokenizer.json").is_file():
            raise ConfigError("perplexity needs a tokenizer: eval.text works with model.path=DIR holding tokenizer.json")
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(text.read_text()).ids
        limit = min(config.max_position_embeddings, cfg.eval.prompt_len + cfg.eval.tokens)
        return ids[:limit], min(cfg.eval.prompt_len, len(ids[:limit]) - 1)
    import numpy as np

    prompt = np.random.default_rng(spec.seed).integers(0, config.vocab_size, cfg.eval.prompt_len).tolist()
    with reference_session(spec) as session:
        gen = Generator(session, 1, cfg.eval.prompt_len + cfg.eval.tokens, cfg.eval.prompt_len)
        continuation = gen.generate([prompt], cfg.eval.tokens).tokens[0]
    return prompt + continuation[:-1], len(prompt)


def accuracy_hook(stream: list[int], prompt_len: int, store: dict, key: tuple[str, int, int]) -> sweep.AfterLoad:
    def hook(loaded: sweep.Loaded) -> None:
        store[key] = teacher_forced(loaded.session, stream, prompt_len)
    return hook


def conclusion(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("tokens_per_s")]
    if not ok:
        return "No configuration completed."
    small, big = min(r["batch"] for r in ok), max(r["batch"] for r in ok)
    fastest = max((r for r in ok if r["batch"] == small), key=lambda r: r["tokens_per_s"])
    most = max((r for r in ok if r["batch"] == big), key=lambda r: r["tokens_per_s"])

    def acc(r):
        return f"KL {r['kl']:.2e}, top-1 {r['top1']:.1%}" if r.get("kl") is not None else "accuracy not measured"

    latency = (f"Lowest latency at batch {small}: {fastest['config']} ({fastest['tokens_per_s']:.1f} tok/s, "
               f"{acc(fastest)}).")
    if big == small:
        return latency
    return latency + f" Highest throughput at batch {big}: {most['config']} ({most['tokens_per_s']:.1f} tok/s, {acc(most)})."


def decode_note(mode: str) -> str:
    if mode == "none":
        return "Decode: each step's tokens are read before the next step is launched (overlap=none)."
    return (f"Decode: the tp points' loop is experiments.overlap's `{mode}` scheduler (overlap={mode}); pipeline "
            "stages (pp > 1) keep the engine's own loop.")


@hydra.main(config_path="../conf", config_name="quant_compare", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    spec = RunSpec.from_hydra(cfg, "quant_compare", quant=cfg.reference)  # the template: the reference at tp=1
    pairs = pairs_of(cfg, spec)
    mode = sweep.decode_loop(cfg.get("overlap", "none"), "quant_compare")
    batches = [positive("batches[]", b) for b in cfg.batches]
    if not batches:
        raise ConfigError("batches is empty; give e.g. 'batches=[1,16]'")
    spec.check_devices(max(tp * pp for _, tp, pp in pairs))
    if spec.workload.new_tokens < 2:
        raise ConfigError(f"quant_compare compares decode tokens/s, and workload.new_tokens={spec.workload.new_tokens} "
                          "makes no decode step; use workload.new_tokens >= 2")
    stream, prompt_len = eval_stream(cfg, spec)
    bandwidth = sweep.measured_bandwidth(spec)
    logits: dict = {}
    points = []
    w, config, target = spec.workload, spec.config, spec.target
    with tqdm(total=len(pairs) * len(batches) * (w.warmup + w.repeats), desc="quant_compare", unit="run") as bar:
        for quant, tp, pp in pairs:
            for batch in batches:
                hook = accuracy_hook(stream, prompt_len, logits, (quant, tp, pp)) if batch == batches[0] else None
                label = f"{config_key(quant, tp, pp)} b{batch}"
                bar.set_postfix_str(label)
                loop = mode if pp == 1 else "none"  # pipeline stages keep the engine's own loop
                points.append(sweep.run_point(spec, label, {"quant": quant, "tp": tp, "pp": pp, "batch": batch,
                                                            "overlap": loop},
                                              spec.build_for(quant=quant, tp=tp, pp=pp), w.replace(batch=batch),
                                              bandwidth and bandwidth["bytes_per_s"], bar, after_load=hook,
                                              scheduler=stream_overlap.install(loop)))
    ref_key = next((k for k in sorted(logits, key=lambda k: k[1] * k[2]) if k[0] == cfg.reference), None)
    if ref_key is None:  # the reference is not among the configurations: run it for its logits
        with reference_session(spec) as session:
            ref = teacher_forced(session, stream, prompt_len)
    else:
        ref = logits[ref_key]
    comparisons = {config_key(*k): accuracy.compare(v, ref) for k, v in logits.items()}
    if cfg.eval.text:
        for k, v in logits.items():
            comparisons[config_key(*k)]["perplexity"] = accuracy.perplexity(v, stream)
    rows = []
    for p in points:
        key = config_key(p.params["quant"], p.params["tp"], p.params["pp"])
        c = comparisons.get(key, {})
        p.summary.update({"kl": c.get("kl_mean"), "top1": c.get("top1")} if p.ok else {})
        rows.append({"config": key, "batch": p.params["batch"], "tokens_per_s": p.summary.get("decode_tokens_per_s"),
                     "kl": c.get("kl_mean"), "top1": c.get("top1"), "max_err": c.get("max_logits_error"),
                     "ttft_ms": p.summary["ttft_s"]["p50"] * 1e3 if p.ok else None,
                     "weight_gib": p.summary.get("weight_bytes", 0) / 2**30 if p.ok else None,
                     "perplexity": c.get("perplexity")})
    text = conclusion(rows)
    tradeoff = [{"label": f"{r['config']} b{r['batch']}", "x": r["tokens_per_s"], "y": r["kl"]}
                for r in rows if r["tokens_per_s"] and r["kl"] is not None]
    figures = [("tradeoff.png", lambda path: plots.scatter_tradeoff(
        tradeoff, "decode tokens/s", f"KL divergence vs {cfg.reference} (nats/token)",
        f"{config.name}: speed vs accuracy", path))] if tradeoff else []
    from harness import markdown

    acc_table = markdown.table(rows, [("config", "config", None), ("batch", "batch", None),
                                      ("tokens_per_s", "decode tok/s", "{:.1f}"), ("ttft_ms", "TTFT (ms)", "{:.1f}"),
                                      ("kl", "KL vs ref", "{:.3e}"), ("top1", "top-1", "{:.1%}"),
                                      ("max_err", "max logits err", "{:.3f}"), ("perplexity", "perplexity", "{:.2f}"),
                                      ("weight_gib", "weights/rank (GiB)", "{:.3f}")])
    summary_extra = {"comparisons": {k: {kk: vv for kk, vv in v.items() if kk != "kl_per_token"}
                                     for k, v in comparisons.items()},
                     "table": rows, "conclusion": text, "reference": cfg.reference}
    for quant in ("q4f16_1", "q8f16_1", "q0f16"):  # the keys a reader looks for
        summary_extra[quant] = {k: v for k, v in comparisons.items() if k.startswith(quant)}
    status = write_report(run_dir, f"Quantization: {config.name} on {target}",
                          OmegaConf.to_container(cfg, resolve=True), points,
                          sections=[("Speed and accuracy", acc_table), ("Conclusion", text),
                                    ("Method", decode_note(mode))],
                          summary_extra=summary_extra,
                          extra={"bandwidth": bandwidth, "eval_token_ids": stream, "eval_prompt_len": prompt_len,
                                 "kl_per_token": {k: v["kl_per_token"] for k, v in comparisons.items()}},
                          figures=figures)
    print(acc_table)
    print(text)
    print(f"results: {run_dir.root}")
    return entry.exit_status(status, points)


if __name__ == "__main__":
    main()
