"""python -m experiments.verify: the engine against `transformers` on the same checkpoint.

The token stream is a seeded random prompt followed by the reference's own greedy continuation.
Both models are run teacher-forced over it (prompt in one prefill, then one decode step per
token), and the engine also generates freely from the prompt. It passes when the logits are within
the tolerance, the top-1 tokens agree wherever the reference is not at a near-tie (its top-2 margin
above twice the logits difference: harness.oracle.confident_rows), and the free continuation
equals the reference's, or first leaves it at a near-tie (after which the two go their own ways).
The reference runs the weights the engine runs: for a quantized model, transformers gets the
quantized-then-dequantized weights, so the comparison tests the compiled kernels; the error that
quantization itself adds (against the original weights) is reported beside it.
"""

from __future__ import annotations

import logging

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from engine.compile import compile_pipeline
from engine.config import ConfigError, from_hf_folder
from engine.generate import Generator
from engine.session import open_session
from engine.weights import check_checkpoint, open_source
from harness import entry, oracle
from harness.results import RunDir, atomic_save_npy
from harness.spec import RunSpec, positive

log = logging.getLogger("experiments.verify")


def checkpoint_folder(cfg: DictConfig, spec: RunSpec) -> str:
    """The checkpoint at model.path, or a seeded random HF checkpoint of the preset (written once
    under the cache dir)."""
    if spec.weights.path:
        return spec.weights.path
    std = float(cfg.random_checkpoint_std)
    folder = spec.cache_dir / "hf-random" / f"{spec.config.name}-seed{spec.weights.seed}-std{std}"
    return str(oracle.random_checkpoint(spec.config, folder, seed=spec.weights.seed, std=std))


def run(cfg: DictConfig, run_dir: RunDir) -> dict:
    prompt_len = positive("prompt_len", cfg.prompt_len)
    steps = positive("decode_steps", cfg.decode_steps)
    spec = RunSpec.from_hydra(cfg, "verify", tp=positive("tp", cfg.tp), pp=positive("pp", cfg.get("pp", 1)))
    config = spec.config
    if prompt_len + steps > config.max_position_embeddings:
        raise ConfigError(f"prompt_len + decode_steps = {prompt_len + steps} exceeds the model's context "
                          f"{config.max_position_embeddings}")
    spec.check_devices(spec.build.tp * spec.build.pp)
    folder = checkpoint_folder(cfg, spec)
    build = spec.build_for(config=from_hf_folder(folder))
    config, quant = build.config, build.quant_spec
    check_checkpoint(folder, config)  # names the file and the tensor, before anything slow
    reference = oracle.Reference(folder, quant)  # transformers' refusal is a ConfigError too, before compiling
    stages = compile_pipeline(build, spec.cache_dir)

    rng = np.random.default_rng(spec.seed)
    prompt = rng.integers(0, config.vocab_size, prompt_len).tolist()
    continuation = reference.greedy(prompt, steps)
    tokens = prompt + continuation[:-1]  # every token fed; the last prediction needs no feed
    ref_logits = reference.logits(tokens)

    with open_session(stages, open_source(config, folder), spec.cluster) as session:
        gen = Generator(session, max_batch=1, max_total_len=min(config.max_position_embeddings, 4096),
                        prefill_chunk=max(prompt_len, 16))
        engine_logits = gen.teacher_forced_logits(tokens, prompt_len)
        free = gen.generate([prompt], steps).tokens[0]

    atomic_save_npy(run_dir.path("engine_logits.npy"), engine_logits.astype(np.float32))
    atomic_save_npy(run_dir.path("reference_logits.npy"), ref_logits.astype(np.float32))
    err = oracle.relative_error(engine_logits, ref_logits)
    agree, confident_rows = oracle.confident_agreement(engine_logits, ref_logits)
    first_difference, at_near_tie = oracle.greedy_divergence(free, continuation, engine_logits, ref_logits,
                                                             prompt_len - 1)
    summary = {
        "relative_logits_error": err,
        "tolerance": float(cfg.tolerance),
        "top1_agreement": float((engine_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "top1_agreement_confident": agree,
        "confident_rows": confident_rows,
        "greedy_tokens_identical": free == continuation,
        "greedy_steps": steps,
        "greedy_first_difference": first_difference,
        "greedy_difference_at_near_tie": at_near_tie,
        "engine_greedy": free,
        "reference_greedy": continuation,
    }
    if quant.quantized:  # what quantization itself costs, against the original weights
        original = oracle.Reference(folder).logits(tokens)
        summary["quantization_error_vs_original"] = oracle.relative_error(engine_logits, original)
    ok = err <= cfg.tolerance and agree == 1.0 and (summary["greedy_tokens_identical"] or at_near_tie)
    summary["passed"] = ok
    extra = {"token_ids": tokens, "prompt_len": prompt_len, "checkpoint": folder, "artifact": str(stages[0].path),
             "artifacts": [str(a.path) for a in stages],
             "build": build.to_dict()}
    run_dir.write_results(OmegaConf.to_container(cfg, resolve=True), [], summary, "ok" if ok else "failed", extra)
    return summary


def greedy_words(summary: dict) -> str:
    """How the free continuation compared, in words."""
    steps, first = summary["greedy_steps"], summary["greedy_first_difference"]
    if summary["greedy_tokens_identical"]:
        return f"identical over {steps} steps"
    if summary["greedy_difference_at_near_tie"]:
        return (f"identical over {first} of {steps} steps, then a near-tie (the reference's top-2 margin "
                "within twice the logits difference: a legitimate flip)")
    return f"DIFFERENT from step {first} of {steps}"


@hydra.main(config_path="../conf", config_name="verify", version_base="1.3")
@entry.guarded
def main(cfg: DictConfig, run_dir: RunDir) -> int:
    summary = run(cfg, run_dir)
    run_dir.update_latest_link()
    pp = f" pp={cfg.pp}" if cfg.get("pp", 1) > 1 else ""
    line = (f"{cfg.quant.name} tp={cfg.tp}{pp}: relative logits error {summary['relative_logits_error']:.2e} "
            f"(tolerance {summary['tolerance']:.0e}), top-1 agreement {summary['top1_agreement']:.3f}, "
            f"greedy {greedy_words(summary)}")
    if "quantization_error_vs_original" in summary:
        line += f"; quantization error vs original weights {summary['quantization_error_vs_original']:.2e}"
    log.info(line)
    print(("PASS " if summary["passed"] else "FAIL ") + line + f"\nresults: {run_dir.path('results.json')}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    main()
