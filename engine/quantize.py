"""Weight quantization with MLC-LLM's names: q0f16/q0f32 (none), q4f16_1 and q8f16_1.

`qNf16_1` is symmetric group quantization along the input (reduction) dimension: groups of 32
consecutive weights share one fp16 scale, and `32 // N` quantized values are packed into one
uint32, lowest bits first. A value `q` in [0, 2 * max_int] stands for `(q - max_int) * scale`
with `max_int = 2 ** (N - 1) - 1`.

On the TVM side, dequantization is written inline in the reduction of the matmul (and in the
embedding gather), so no fp16 copy of a weight is ever materialised.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import ConfigError

GROUP_SIZE = 32


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    name: str
    bits: int | None  # None: not quantized
    model_dtype: str  # activations and unquantized weights

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def per_word(self) -> int:
        """Quantized values packed in one uint32."""
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def bytes_per_weight(self) -> float:
        if not self.quantized:
            return np.dtype(self.model_dtype).itemsize
        return self.bits / 8 + 2 / GROUP_SIZE  # packed values + one fp16 scale per group


QUANTIZATIONS: dict[str, QuantSpec] = {
    "q0f32": QuantSpec("q0f32", None, "float32"),
    "q0f16": QuantSpec("q0f16", None, "float16"),
    "q4f16_1": QuantSpec("q4f16_1", 4, "float16"),
    "q8f16_1": QuantSpec("q8f16_1", 8, "float16"),
}


def quant_spec(name: str) -> QuantSpec:
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown quantization {name!r}; choose one of: {', '.join(QUANTIZATIONS)}") from None


def check_quantizable(spec: QuantSpec, shape: tuple[int, ...], name: str = "weight") -> None:
    if len(shape) != 2:
        raise ConfigError(f"{name}: only 2-D weights are quantized, got shape {shape}")
    if shape[1] % GROUP_SIZE:
        raise ConfigError(
            f"{name}: input dimension {shape[1]} is not a multiple of the group size {GROUP_SIZE}; "
            f"{spec.name} needs whole groups (use q0f16 for this model)"
        )


def quantize(weight: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float weights -> (packed uint32 [out, in / per_word], fp16 scales [out, in / 32])."""
    check_quantizable(spec, weight.shape)
    out_f, in_f = weight.shape
    groups = weight.astype(np.float32).reshape(out_f, in_f // GROUP_SIZE, GROUP_SIZE)
    scale = (np.abs(groups).max(axis=2) / spec.max_int).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)
    q = np.rint(groups / safe[:, :, None]) + spec.max_int
    q = np.clip(q, 0, 2 * spec.max_int).astype(np.uint32).reshape(out_f, in_f // spec.per_word, spec.per_word)
    shifts = (np.arange(spec.per_word, dtype=np.uint32) * spec.bits)[None, None, :]
    packed = np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)
    return packed, scale


def quantize_torch(weight, spec: QuantSpec):
    """`quantize` for a torch tensor, on its device; the same bits as the numpy version."""
    import torch

    check_quantizable(spec, tuple(weight.shape))
    out_f, in_f = weight.shape
    groups = weight.float().reshape(out_f, in_f // GROUP_SIZE, GROUP_SIZE)
    scale = (groups.abs().amax(dim=2) / spec.max_int).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.round(groups / safe[:, :, None]) + spec.max_int
    q = q.clamp_(0, 2 * spec.max_int).to(torch.int64).reshape(out_f, in_f // spec.per_word, spec.per_word)
    shifts = torch.arange(spec.per_word, device=weight.device, dtype=torch.int64) * spec.bits
    packed = (q << shifts).sum(dim=2)  # disjoint bit fields: the sum is the bitwise or
    return packed.to(torch.uint32), scale


def dequantize(packed: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Inverse of `quantize` (up to rounding), as float32 [out, in]."""
    out_f, words = packed.shape
    shifts = (np.arange(spec.per_word, dtype=np.uint32) * spec.bits)[None, None, :]
    q = (packed[:, :, None] >> shifts) & np.uint32((1 << spec.bits) - 1)
    values = q.reshape(out_f, words * spec.per_word).astype(np.float32) - spec.max_int
    return values * np.repeat(scale.astype(np.float32), GROUP_SIZE, axis=1)


# ---- TVM tensor expressions (dequantize fused into the consumer) ------------------------------

# float32 bits 0x4B000000 | q (q < 2^23) are the float 2^23 + q: an OR and a subtraction turn the
# unsigned integer q into a float, where a conversion instruction would be slower (decode GEMVs of
# int4 weights are bound by instructions per weight, not by memory).
_FLOAT_2P23_BITS = 0x4B000000


def _te_weight_value(spec: QuantSpec, weight, n, k):
    """The dequantized weight w[n, k] in float32, exactly (q - max_int) * scale; `weight` is a
    tuple of te tensors."""
    from tvm import tirx

    if not spec.quantized:
        return weight[0][n, k].astype("float32")
    packed, scale = weight
    word = packed[n, k // spec.per_word]
    shift = (k % spec.per_word).astype("uint32") * tirx.const(spec.bits, "uint32")
    q = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const((1 << spec.bits) - 1, "uint32"))
    as_float = tirx.reinterpret("float32", tirx.bitwise_or(q, tirx.const(_FLOAT_2P23_BITS, "uint32")))
    return (as_float - float(2**23 + spec.max_int)) * scale[n, k // GROUP_SIZE].astype("float32")


def te_linear(spec: QuantSpec, out_dtype: str, fp16_weights: bool = True):
    """x[..., K] @ W[N, K]^T; accumulates in float32. With `fp16_weights` a quantized W is
    dequantized to the model dtype by a producer stage of the same kernel, so that dlight's
    tensor-core matmul sees an fp16 x fp16 product it can tensorize (prefill, batched decode);
    without, the float32 weight value is computed inside the reduction (the batch-1 GEMV: two
    conversions per weight fewer)."""
    from tvm import te

    def compute(x, *weight):
        k_in, n_out = x.shape[-1], weight[0].shape[0]
        if spec.quantized and fp16_weights:
            w = te_dequantize(spec)(*weight)
            value = lambda n, k: w[n, k].astype("float32")  # noqa: E731
        else:
            value = lambda n, k: _te_weight_value(spec, weight, n, k)  # noqa: E731
        k = te.reduce_axis((0, k_in), name="k")

        def body(*idx):
            *lead, n = idx
            return te.sum(x[(*lead, k)].astype("float32") * value(n, k), axis=k)

        acc = te.compute((*x.shape[:-1], n_out), body, name="linear_acc")
        if out_dtype == "float32":
            return acc
        return te.compute(acc.shape, lambda *i: acc[i].astype(out_dtype), name="linear_out")

    return compute


def te_dequantize(spec: QuantSpec):
    """The whole weight W[N, K], dequantized to the model dtype (for a library GEMM)."""
    from tvm import te

    def compute(*weight):
        n_out, k_in = weight[0].shape[0], weight[0].shape[1] * spec.per_word
        return te.compute((n_out, k_in), lambda n, k: _te_weight_value(spec, weight, n, k).astype(spec.model_dtype),
                          name="dequantize")

    return compute


def te_embedding(spec: QuantSpec, out_dtype: str):
    """Rows `ids` of the (de)quantized embedding table."""
    from tvm import te

    def compute(ids, *weight):
        hidden = weight[0].shape[1] * (1 if not spec.quantized else spec.per_word)
        return te.compute(
            (*ids.shape, hidden),
            lambda *idx: _te_weight_value(spec, weight, ids[idx[:-1]], idx[-1]).astype(out_dtype),
            name="embedding",
        )

    return compute
