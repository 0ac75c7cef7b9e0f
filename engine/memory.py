"""Predict one rank's device memory before a run: weights, KV cache, workspace."""

from __future__ import annotations

import numpy as np

from .config import ConfigError, ModelConfig
from .quantize import GROUP_SIZE, QuantSpec
from .sharding import ShardPlan


def _matrix_bytes(rows: int, cols: int, spec: QuantSpec) -> int:
    if not spec.quantized:
        return rows * cols * np.dtype(spec.model_dtype).itemsize
    return rows * (cols // spec.per_word) * 4 + rows * (cols // GROUP_SIZE) * 2


def weight_bytes(config: ModelConfig, spec: QuantSpec, tp: int, lm_head: str = "replicated", pp: int = 1,
                 stage: int = 0) -> int:
    """Bytes of one rank's parameters (of pipeline stage `stage` of `pp`), exactly as
    `engine.weights.rank_params` lays them out (the sharding table's local shapes, quantized)."""
    plan = ShardPlan(config, tp, lm_head, pp, stage)
    act = np.dtype(spec.model_dtype).itemsize
    total = 0
    for name, param in plan.parameters():
        shape = plan.local_shape(param.name)
        total += _matrix_bytes(*shape, spec) if param.matrix else int(np.prod(shape)) * act
    return total


def predict(config: ModelConfig, spec: QuantSpec, tp: int, max_batch: int, max_total_len: int,
            prefill_chunk: int, page_size: int = 16, lm_head: str = "replicated",
            prefill_gemm: str = "tir", prefill_attention: str = "tir", pp: int = 1) -> dict:
    """Per-device bytes: weights (exact), KV cache (the pages `Generator` allocates: every sequence
    at max_total_len), workspace (an estimate: the largest activations of a prefill chunk, the
    float32 logits of a decode batch, for a quantized model with the library prefill GEMM the
    largest weight matrix dequantized to fp16, and the library prefill attention's scores). With
    pipeline stages: the fullest stage's device, and every stage's under "stages"."""
    stages = [_predict_stage(config, spec, tp, max_batch, max_total_len, prefill_chunk, page_size, lm_head,
                             prefill_gemm, prefill_attention, pp, s) for s in range(pp)]
    fullest = dict(max(stages, key=lambda d: d["total"]))
    if pp > 1:
        fullest["stages"] = stages
    return fullest


def _predict_stage(config: ModelConfig, spec: QuantSpec, tp: int, max_batch: int, max_total_len: int,
                   prefill_chunk: int, page_size: int, lm_head: str, prefill_gemm: str, prefill_attention: str,
                   pp: int, stage: int) -> dict[str, int]:
    plan, c = ShardPlan(config, tp, lm_head, pp, stage), config
    act = np.dtype(spec.model_dtype).itemsize
    pages = max_batch * -(-max_total_len // page_size)
    kv = 2 * len(plan.layers) * plan.kv_heads * c.head_dim * act * pages * page_size
    tokens = max(prefill_chunk, max_batch)
    widest = max((plan.q_heads + 2 * plan.kv_heads) * c.head_dim, 2 * plan.intermediate, c.hidden_size)
    workspace = tokens * (3 * c.hidden_size + widest) * 4 + max_batch * c.vocab_size * 4 * 2
    if spec.quantized and prefill_gemm == "library":
        # the largest matrix dequantized to fp16: in prefill_logits, the LM head's
        workspace += max(widest, plan.vocab) * c.hidden_size * act
    if prefill_attention == "library":
        workspace += attention_workspace_bytes(plan.q_heads, prefill_chunk)
    weights = weight_bytes(config, spec, tp, lm_head, pp, stage)
    return {"weights": weights, "kv_cache": kv, "workspace": workspace, "total": weights + kv + workspace}


def check_fits(prediction: dict[str, int], capacity: int, what: str) -> None:
    """Refuse, with the numbers, a run whose predicted memory exceeds 95% of `capacity`."""
    if prediction["total"] > 0.95 * capacity:
        gib = {k: v / 2**30 for k, v in prediction.items()}
        raise ConfigError(
            f"{what} needs about {gib['total']:.1f} GiB per device (weights {gib['weights']:.1f}, KV cache "
            f"{gib['kv_cache']:.1f}, workspace {gib['workspace']:.1f}) but the device has {capacity / 2**30:.1f} GiB; "
            "use a larger tp or pp, a smaller quantization, or a shorter context/batch")


# runtime_patch/attention/cuda_attention.cu: a chunk of query rows' float32 scores and float16
# probabilities, at most this many bytes (unless one row alone needs more).
ATTENTION_WORKSPACE_CAP = 256 << 20


def attention_workspace_bytes(q_heads: int, prefill_chunk: int) -> int:
    row = q_heads * prefill_chunk * 6
    return max(row, min(ATTENTION_WORKSPACE_CAP, row * prefill_chunk))
