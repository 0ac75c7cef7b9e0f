"""python -m experiments.verify: the engine against `transformers` on the same checkpoint.

The token stream is a seeded random prompt followed by the reference's own greedy continuation.
Both models are run teacher-forced over it (prompt in one prefill, then one decode step per
token), and the engine also generates freely from the prompt. The reference runs the weights the
engine runs: for a quantized model, transformers gets the quantized-then-dequantized weights, so
the comparison tests the compiled kernels; the error that quantization itself adds (against the
original weights) is reported beside it.
"""

from __future__ import annotations

import logging

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from engine.config import ConfigError
from engine.generate import Generator
from engine.quantize import quant_spec
from engine.weights import open_source

from . import common, oracle
from .results import RunDir, atomic_save_npy

log = logging.getLogger("experiments.verify")


def checkpoint_folder(cfg: DictConfig, config) -> str:
    if cfg.model.get("path"):
        return cfg.model.path
    folder = common.cache_dir(cfg) / "hf-random" / f"{config.name}-seed{cfg.model.seed}-std{cfg.random_checkpoint_std}"
    return str(oracle.random_checkpoint(config, folder, seed=int(cfg.model.seed), std=float(cfg.random_checkpoint_std)))


def run(cfg: DictConfig, run_dir: RunDir) -> dict:
    prompt_len = common.positive("prompt_len", cfg.prompt_len)
    steps = common.positive("decode_steps", cfg.decode_steps)
    tp = common.positive("tp", cfg.tp)
    spec = quant_spec(cfg.quant.name)
    config = common.model_config(cfg.model)
    if prompt_len + steps > config.max_position_embeddings:
        raise ConfigError(f"prompt_len + decode_steps = {prompt_len + steps} exceeds the model's context "
                          f"{config.max_position_embeddings}")
    folder = checkpoint_folder(cfg, config)
    from engine.config import from_hf_folder

    config = from_hf_folder(folder)
    target, arch = common.resolve_target(cfg.device)
    artifact = common.build(config, spec.name, tp, target, arch, cfg)

    rng = np.random.default_rng(int(cfg.seed))
    prompt = rng.integers(0, config.vocab_size, prompt_len).tolist()
    reference = oracle.Reference(folder, spec)
    continuation = reference.greedy(prompt, steps)
    tokens = prompt + continuation[:-1]  # every token fed; the last prediction needs no feed
    ref_logits = reference.logits(tokens)

    with common.open_session(artifact, open_source(config, folder)) as session:
        gen = Generator(session, max_batch=1, max_total_len=min(config.max_position_embeddings, 4096),
                        prefill_chunk=max(prompt_len, 16))
        engine_logits = gen.teacher_forced_logits(tokens, prompt_len)
        free = gen.generate([prompt], steps).tokens[0]

    atomic_save_npy(run_dir.path("engine_logits.npy"), engine_logits.astype(np.float32))
    atomic_save_npy(run_dir.path("reference_logits.npy"), ref_logits.astype(np.float32))
    err = oracle.relative_error(engine_logits, ref_logits)
    agree, confident_rows = oracle.confident_agreement(engine_logits, ref_logits)
    summary = {
        "relative_logits_error": err,
        "tolerance": float(cfg.tolerance),
        "top1_agreement": float((engine_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "top1_agreement_confident": agree,
        "confident_rows": confident_rows,
        "greedy_tokens_identical": free == continuation,
        "greedy_steps": steps,
        "engine_greedy": free,
        "reference_greedy": continuation,
    }
    if spec.quantized:  # what quantization itself costs, against the original weights
        original = oracle.Reference(folder).logits(tokens)
        summary["quantization_error_vs_original"] = oracle.relative_error(engine_logits, original)
    ok = err <= cfg.tolerance and agree == 1.0 and summary["greedy_tokens_identical"]
    summary["passed"] = ok
    extra = {"token_ids": tokens, "prompt_len": prompt_len, "checkpoint": folder, "artifact": str(artifact.path)}
    run_dir.write_results(OmegaConf.to_container(cfg, resolve=True), [], summary, "ok" if ok else "failed", extra)
    return summary


@hydra.main(config_path="../conf", config_name="verify", version_base="1.3")
@common.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    summary = run(cfg, run_dir)
    run_dir.update_latest_link()
    line = (f"{cfg.quant.name} tp={cfg.tp}: relative logits error {summary['relative_logits_error']:.2e} "
            f"(tolerance {summary['tolerance']:.0e}), top-1 agreement {summary['top1_agreement']:.3f}, "
            f"greedy {'identical' if summary['greedy_tokens_identical'] else 'DIFFERENT'} over "
            f"{summary['greedy_steps']} steps")
    if "quantization_error_vs_original" in summary:
        line += f"; quantization error vs original weights {summary['quantization_error_vs_original']:.2e}"
    log.info(line)
    print(("PASS " if summary["passed"] else "FAIL ") + line + f"\nresults: {run_dir.path('results.json')}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    main()
