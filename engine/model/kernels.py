"""Which kernel computes each linear layer, by the phase of the function being traced.

A phase is what an exported function does with its rows: `PREFILL` (many tokens of one
sequence), `DECODE` (one token: the batch-1 GEMV), `BATCH` (a decode step of several sequences).
`KernelPlan` (from the BuildSpec, immutable) says where each phase's products come from:

- PREFILL with `prefill_gemm="library"`: `lab.gemm.nt` (cuBLAS on CUDA, NumPy on CPU) through
  call_dps_packed; a quantized weight through `lab.gemm.q4` / `q8` (a tensor-core kernel that
  dequantizes in shared memory for short prompts, a dequantize pass and cuBLAS for long ones).
  What surrounds the products is the library's too: SiLU after gate_up is `lab.swiglu`
  (`Linear.swiglu`); the first RMSNorm is `lab.norm.rms`, and at tp=1 each residual add comes with
  the RMSNorm after it in one call, `lab.norm.add_rms` (`library_add_norm`: the layers run as
  LlamaModel.forward_normed, the o and down projections plain GEMMs), rounded as transformers
  rounds (the sum to float16, then the norm). (TVM's kernels for these took 244 us (SiLU), 2 x 63
  us (adds) and 2 x 35 us (norms) a layer of a 4096-token Llama-3-8B prefill on an H200; ours
  94 us and 2 x 35 us (add and norm).)
- DECODE: a TIR GEMV that computes a quantized weight in float32 inside its reduction (no fp16
  round trip; engine.quantize.te_linear); with `decode_gemv="library"` a q4f16_1 or q8f16_1
  weight goes to `lab.gemv.q4` / `lab.gemv.q8` instead, with what follows it inside where the
  model has it (runtime_patch.functions.GEMV): SiLU after gate_up (`Linear.swiglu`), and at tp=1
  the residual adds after the o and down projections (`Linear.plus`); with the library norm as
  well (`KernelPlan.gemv_norms`), the RMSNorm after each of those adds split over the GEMVs around
  it: the o or down projection's GEMV writes the sum and sum * the norm's weight and adds up the
  sum's squares (`Linear.plus_norm_start`, a `PendingNorm`), the GEMV that reads it divides its
  products by the root mean square (the next qkv, gate_up or LM head; the layers run as
  LlamaModel.forward_normed; no norm kernel in a step but the first). The o projection after the
  static cache's attention and the down projection after gate_up's GEMV start before the kernel
  ahead has finished (`early`: functions.GEMV_EARLY).
- BATCH and TIR prefills: a quantized weight through an fp16 producer stage that dlight's
  tensor-core matmul can use.

The RMSNorms (`RMSNorm`) are `lab.norm.rms` (one memory round trip a row where TVM's kernel takes
two) in the DECODE and BATCH phases with `decode_norm="library"` and in the PREFILL phase with
`prefill_gemm="library"` (TVM's took 35-36 us a norm of 4096 rows of Llama-3-8B on an H200, 65 of
them a prefill), TVM's `rms_norm` otherwise.
"""

from __future__ import annotations

import dataclasses

from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.core import wrap_nested
from tvm.relax.frontend.nn import Tensor, op

from runtime_patch import functions

from ..quantize import GROUP_SIZE, QuantSpec, te_embedding, te_linear

PREFILL, DECODE, BATCH = "prefill", "decode", "batch"


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    library_prefill_gemm: bool = False
    library_decode_gemv: bool = False
    library_allreduce: bool = False  # lab.ccl.allreduce (one-shot over CUDA IPC) instead of TVM's CCL
    library_decode_norm: bool = False

    @staticmethod
    def of(spec) -> "KernelPlan":
        return KernelPlan(spec.prefill_gemm == "library", spec.decode_gemv == "library", spec.allreduce == "library",
                          spec.decode_norm == "library")

    def library_norm(self, phase: str) -> bool:
        """The RMSNorm through `lab.norm.rms`: the decode phases' (batch 1 and batched) with
        decode_norm=library, the prefill's with the library prefill (prefill_gemm=library)."""
        if phase == PREFILL:
            return self.library_prefill_gemm
        return phase in (DECODE, BATCH) and self.library_decode_norm

    def library_gemm(self, phase: str) -> bool:
        return phase == PREFILL and self.library_prefill_gemm

    def library_add_norm(self, phase: str) -> bool:
        """Each residual add and the RMSNorm after it in one call of `lab.norm.add_rms` (the library
        prefill at tp=1; the o and down projections are then plain GEMMs)."""
        return self.library_gemm(phase)

    def library_gemv(self, phase: str, quant: QuantSpec) -> bool:
        """The batch-1 decode GEMV of a q4 or q8 weight through `lab.gemv.q4` / `lab.gemv.q8`."""
        return phase == DECODE and self.library_decode_gemv and quant.bits in functions.GEMV_BY_BITS

    def gemv_norms(self, phase: str, quant: QuantSpec) -> bool:
        """The RMSNorms after the residual adds split over the library GEMVs around them (at tp=1:
        Linear.plus_norm_start, PendingNorm): the library GEMV and the library norm in this phase."""
        return self.library_gemv(phase, quant) and self.library_norm(phase)

    @staticmethod
    def fp16_weights(phase: str) -> bool:
        """Quantized weights through an fp16 producer stage, except in the batch-1 decode GEMV."""
        return phase != DECODE


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last axis (the parameter `weight`, as nn.RMSNorm names it): TVM's
    `rms_norm`, or the library's in the phases KernelPlan.library_norm gives it."""

    def __init__(self, hidden_size: int, epsilon: float, dtype: str, plan: KernelPlan):
        self.weight = nn.Parameter((hidden_size,), dtype)
        self.epsilon, self.plan = epsilon, plan

    def forward(self, x: Tensor, phase: str) -> Tensor:
        if self.plan.library_norm(phase):
            return extern(functions.RMS_NORM, [x, self.weight, float(self.epsilon)], [Tensor.placeholder(x.shape, x.dtype)])
        return op.rms_norm(x, weight=self.weight, axes=-1, epsilon=self.epsilon)


def _weight_params(spec: QuantSpec, rows: int, cols: int) -> dict[str, nn.Parameter]:
    if not spec.quantized:
        return {"weight": nn.Parameter((rows, cols), spec.model_dtype)}
    return {"q_weight": nn.Parameter((rows, cols // spec.per_word), "uint32"),
            "q_scale": nn.Parameter((rows, cols // GROUP_SIZE), "float16")}


@dataclasses.dataclass(frozen=True)
class PendingNorm:
    """rms_norm(h) * w, not yet divided by rms(h): `scaled` = h * w (rounded to float16), the sum of
    h^2 in the GEMV plugin's norm site `site` (functions.GEMV[bits, "add_sq"]); the library GEMV
    that takes it as x divides its products by sqrt(sum / hidden + epsilon) (Linear.forward,
    Linear.swiglu, Embedding.lm_head)."""
    scaled: Tensor
    site: int
    epsilon: float

    @property
    def shape(self):
        return self.scaled.shape

    def reshape(self, shape) -> "PendingNorm":
        return dataclasses.replace(self, scaled=op.reshape(self.scaled, shape))


class Linear(nn.Module):
    """y = x W^T, W [out, in], (de)quantized inline in the reduction (or by a kernel of its own
    before a library GEMM)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, plan: KernelPlan,
                 out_dtype: str | None = None):
        self.spec, self.plan = spec, plan
        self.out_dtype = out_dtype or spec.model_dtype
        for name, param in _weight_params(spec, out_features, in_features).items():
            setattr(self, name, param)

    def _weights(self) -> list[Tensor]:
        return [self.weight] if not self.spec.quantized else [self.q_weight, self.q_scale]

    def forward(self, x: Tensor | PendingNorm, phase: str, early: bool = False) -> Tensor:
        """`early`: the library GEMV may start while the kernel before it runs (functions.GEMV_EARLY;
        only after a kernel that lets it: the static decode attention, a library GEMV). x a
        PendingNorm: the library GEMV that finishes the norm (functions.GEMV[bits, "rms"])."""
        if isinstance(x, PendingNorm):
            return self._gemv_normed("rms", x)
        if self.plan.library_gemv(phase, self.spec):
            return self._gemv("", x, early=early)
        if self.plan.library_gemm(phase):
            return self._library_gemm(x)
        return op.tensor_expr_op(te_linear(self.spec, self.out_dtype, self.plan.fp16_weights(phase)), "linear",
                                 [x, *self._weights()])

    def swiglu(self, x: Tensor | PendingNorm, phase: str) -> Tensor:
        """silu(gate) * up, [gate, up] = W x (this linear's rows: the gate's, then the up's): one
        library GEMV where the phase has one (`lab.gemv.q4_swiglu` / `q8_swiglu`; of a PendingNorm
        `q4_swiglu_rms` / `q8_swiglu_rms`); after the library's prefill GEMM, `lab.swiglu`."""
        if isinstance(x, PendingNorm):
            return self._gemv_normed("swiglu_rms", x)
        if self.plan.library_gemv(phase, self.spec):
            return self._gemv("swiglu", x)
        gate_up = self(x, phase)
        if self.plan.library_gemm(phase):
            *rows, width = gate_up.shape
            return op.extern(functions.SWIGLU, [gate_up], Tensor.placeholder([*rows, width // 2], gate_up.dtype))
        gate, up = op.split(gate_up, 2, axis=-1)
        return op.silu(gate) * up

    def plus(self, x: Tensor, residual: Tensor, phase: str, early: bool = False) -> Tensor:
        """residual + W x: the add inside the library GEMV where the phase has one
        (`lab.gemv.q4_add` / `q8_add`), else a separate add (which TVM may fuse into its own GEMV;
        the library prefill's adds come with the norms after them instead: KernelPlan.library_add_norm);
        `early` as in forward."""
        if self.plan.library_gemv(phase, self.spec):
            return self._gemv("add", x, [residual], early=early)
        return residual + self(x, phase)

    def plus_norm_start(self, x: Tensor, residual: Tensor, norm: RMSNorm, site: int, phase: str,
                        early: bool = False) -> tuple[Tensor, PendingNorm]:
        """(residual + W x, norm of it pending) in one library GEMV (functions.GEMV[bits, "add_sq"]:
        the sum, the sum times norm's weight, and the sum's squares into norm site `site`;
        KernelPlan.gemv_norms says where); `early` as in forward."""
        assert self.plan.gemv_norms(phase, self.spec), "plus_norm_start: no library GEMV and norm in this phase"
        shape = [*x.shape[:-1], self.q_weight.shape[0]]
        outs = [Tensor.placeholder(shape, self.out_dtype) for _ in range(2)]
        name = (functions.GEMV_EARLY if early else functions.GEMV)[self.spec.bits, "add_sq"]
        total, scaled = extern(name, [x, self.q_weight, self.q_scale, residual, norm.weight, site], outs)
        return total, PendingNorm(scaled, site, float(norm.epsilon))

    def _gemv_normed(self, fusion: str, x: PendingNorm, out_dtype: str | None = None) -> Tensor:
        """The library GEMV functions.GEMV[bits, fusion] ("rms" or "swiglu_rms") of a pending norm."""
        assert self.spec.quantized and self.spec.bits in functions.GEMV_BY_BITS, "a PendingNorm needs a library GEMV"
        return self._gemv(fusion, x.scaled, [x.site, x.epsilon], out_dtype)

    def _gemv(self, fusion: str, x: Tensor, extra: list | tuple = (), out_dtype: str | None = None,
              early: bool = False) -> Tensor:
        """The library GEMV functions.GEMV[bits, fusion] (GEMV_EARLY where `early`) of x (one row)
        with this linear's weight and the function's `extra` arguments (functions.GEMV_FUSIONS)."""
        rows = self.q_weight.shape[0] // (2 if fusion.startswith("swiglu") else 1)
        out = Tensor.placeholder([*x.shape[:-1], rows], out_dtype or self.out_dtype)
        name = (functions.GEMV_EARLY if early else functions.GEMV)[self.spec.bits, fusion]
        return op.extern(name, [x, self.q_weight, self.q_scale, *extra], out)

    def _library_gemm(self, x: Tensor) -> Tensor:
        n = self.weight.shape[0] if not self.spec.quantized else self.q_weight.shape[0]
        out = Tensor.placeholder([*x.shape[:-1], n], self.out_dtype)
        if not self.spec.quantized:
            return op.extern(functions.GEMM_NT, [x, self.weight], out)
        # The whole weight as float16 [N, K]: the dequant path's scratch (long prompts), in TVM's
        # memory plan; the fused path leaves it untouched.
        workspace = Tensor.placeholder([n, self.q_weight.shape[1] * self.spec.per_word], self.spec.model_dtype)
        return extern(functions.GEMM_BY_BITS[self.spec.bits], [x, self.q_weight, self.q_scale], [out, workspace])[0]


def extern(name: str, args: list, outs: list[Tensor]):
    """call_dps_packed of library function `name` with tensor, float and int arguments and one
    output (a Tensor) or several (a tuple): nn's op.extern takes one (with several it hands
    call_dps_packed a tuple type where it needs a list of tensor types: apache-tvm 0.27)."""
    if len(outs) == 1:
        return op.extern(name, args, outs[0])

    def convert(a):
        if isinstance(a, Tensor):
            return a._expr
        if isinstance(a, float):
            return relax.prim_value(tirx.FloatImm("float64", a))
        return relax.prim_value(tirx.IntImm("int64", a))

    call = relax.op.call_dps_packed(name, relax.Tuple([convert(a) for a in args]), [o._expr.ty for o in outs])
    return wrap_nested(call, name)


class Embedding(Linear):
    """Token embedding; `forward` gathers rows, `lm_head` multiplies by the table (tied head)."""

    def __init__(self, vocab: int, hidden: int, spec: QuantSpec, plan: KernelPlan):
        super().__init__(hidden, vocab, spec, plan)

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return op.tensor_expr_op(te_embedding(self.spec, self.spec.model_dtype), "embedding", [ids, *self._weights()])

    def lm_head(self, x: Tensor | PendingNorm, phase: str) -> Tensor:
        if isinstance(x, PendingNorm):
            return self._gemv_normed("rms", x, out_dtype="float32")
        if self.plan.library_gemv(phase, self.spec):
            return self._gemv("", x, out_dtype="float32")
        return op.tensor_expr_op(te_linear(self.spec, "float32", self.plan.fp16_weights(phase)), "lm_head",
                                 [x, *self._weights()])
