"""Llama in `tvm.relax.frontend.nn`, per tensor-parallel rank, with TVM's paged KV cache.

Exported functions (parameters packed into one tuple argument, as MLC does):
  prefill(input_ids[1, s], kv)          -> (next_token[1], logits[1, vocab], kv)   last position
  prefill_logits(input_ids[1, s], kv)   -> (logits[s, vocab], kv)                  every position
  decode(input_ids[1, 1], kv)           -> (next_token[1], logits[1, vocab], kv)   static batch 1
  batch_decode(input_ids[b, 1], kv)     -> (next_token[b], logits[b, vocab], kv)
  batch_decode_pair(input_ids[2, m, 1], kv_a, kv_b) -> (next_token[2, m], logits[2, m, vocab], kv_a, kv_b)
                                        (with `microbatch_decode`: two micro-batches of m sequences,
                                        one per KV cache, interleaved layer by layer; see below)
  create_kv_cache(max_batch, max_total_len, prefill_chunk, page_size, sliding_window) -> kv
Greedy sampling (argmax) happens on the device; logits stay there unless read.

With `prefill_gemm="library"` the linears of the prefill functions (many rows) call the library
GEMM `lab.gemm.nt` (runtime_patch.gemm: cuBLAS on CUDA) instead of a TIR matmul; a quantized
weight is first dequantized by a TIR kernel. With `prefill_attention="library"` the KV cache's
attention of a prefill over the tokens it appends is `lab.attention.prefill_ragged`
(runtime_patch.attention: cuBLAS GEMMs and a softmax kernel on CUDA), and with
`decode_attention="library"` a decode step's attention over the pages is
`lab.attention.decode_paged` (split over the keys), instead of TVM's TIR kernels; a prefill's
attention over pages already in the cache stays TVM's. With `decode_gemv="library"` the `decode`
function's q4f16_1 linears (and LM head) call `lab.gemv.q4` (runtime_patch.gemm); otherwise
`decode` (batch 1) computes quantized weights in float32 inside its GEMV kernels; `batch_decode`
and TIR prefills dequantize them to fp16 in a producer stage, which tensor-core matmuls can use.

`batch_decode_pair` (build option `microbatch_decode`) is the decode of `full_overlap`
(runtime_patch.stream_overlap): at tp > 1 each allreduce is begun by `lab.ccl.allreduce_begin` (on
a communication stream of its own, runtime_patch.collectives) and waited for by
`lab.ccl.allreduce_wait` only just before its sum is needed, with the other micro-batch's
half-layer computed in between: attention(A) begin(A) | attention(B) begin(B) | wait(A) mlp(A)
begin(A) | wait(B) mlp(B) begin(B) | wait(A) attention(A) of the next layer, ... The wait returns a
token that the residual add takes as an (unread) input, so the add is ordered after the wait in
the graph, and the wait takes the allreduce's input too, so that memory planning keeps it alive
until the collective has read it.
"""

from __future__ import annotations

import contextlib

from tvm import ir, relax, te, topi
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from .config import KERNEL_SOURCES, ModelConfig
from .quantize import GROUP_SIZE, QuantSpec, te_dequantize, te_embedding, te_linear
from .sharding import ShardPlan


def _weight_params(spec: QuantSpec, rows: int, cols: int) -> dict[str, nn.Parameter]:
    if not spec.quantized:
        return {"weight": nn.Parameter((rows, cols), spec.model_dtype)}
    return {"q_weight": nn.Parameter((rows, cols // spec.per_word), "uint32"),
            "q_scale": nn.Parameter((rows, cols // GROUP_SIZE), "float16")}


LIBRARY_GEMM = "lab.gemm.nt"
LIBRARY_GEMV_Q4 = "lab.gemv.q4"
ALLREDUCE_BEGIN = "lab.ccl.allreduce_begin"
ALLREDUCE_WAIT = "lab.ccl.allreduce_wait"


class _GemmChoice:
    """Shared by every Linear of a model: which function is being traced. In a prefill with the
    library GEMM, the linears call it; in the batch-1 decode they compute quantized weights in
    float32 inside the GEMV; elsewhere a quantized weight goes through an fp16 producer stage
    that tensor-core matmuls can use (engine.quantize.te_linear)."""

    def __init__(self, library_in_prefill: bool, library_in_decode: bool = False):
        self.library_in_prefill, self.library_in_decode, self.mode = library_in_prefill, library_in_decode, None

    @contextlib.contextmanager
    def tracing(self, mode: str):
        self.mode = mode
        try:
            yield
        finally:
            self.mode = None

    @property
    def library(self) -> bool:
        return self.mode == "prefill" and self.library_in_prefill

    def library_gemv(self, spec: QuantSpec) -> bool:
        """The batch-1 decode GEMV of a q4 weight through `lab.gemv.q4`."""
        return self.mode == "decode" and self.library_in_decode and spec.bits == 4


class Linear(nn.Module):
    """y = x W^T, W [out, in], (de)quantized inline in the reduction (or by a kernel of its own
    before a library GEMM)."""

    gemm: _GemmChoice | None = None  # set on every Linear by LlamaForCausalLM

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, out_dtype: str | None = None):
        self.spec = spec
        self.out_dtype = out_dtype or spec.model_dtype
        for name, param in _weight_params(spec, out_features, in_features).items():
            setattr(self, name, param)

    def _weights(self) -> list[Tensor]:
        return [self.weight] if not self.spec.quantized else [self.q_weight, self.q_scale]

    def _fp16_weights(self) -> bool:
        """Quantized weights through an fp16 producer stage, except in the batch-1 decode GEMV."""
        return self.gemm is None or self.gemm.mode != "decode"

    def forward(self, x: Tensor) -> Tensor:
        if self.gemm is not None and self.gemm.library:
            return self._library_gemm(x)
        if self.gemm is not None and self.gemm.library_gemv(self.spec):
            return self._library_gemv(x, self.out_dtype)
        return op.tensor_expr_op(te_linear(self.spec, self.out_dtype, self._fp16_weights()), "linear",
                                 [x, *self._weights()])

    def _library_gemv(self, x: Tensor, out_dtype: str) -> Tensor:
        out = Tensor.placeholder([*x.shape[:-1], self.q_weight.shape[0]], out_dtype)
        return op.extern(LIBRARY_GEMV_Q4, [x, self.q_weight, self.q_scale], out)

    def _library_gemm(self, x: Tensor) -> Tensor:
        w = self.weight if not self.spec.quantized else \
            op.tensor_expr_op(te_dequantize(self.spec), "dequantize", self._weights())
        out = Tensor.placeholder([*x.shape[:-1], w.shape[0]], self.out_dtype)
        return op.extern(LIBRARY_GEMM, [x, w], out)


class Embedding(Linear):
    """Token embedding; `forward` gathers rows, `lm_head` multiplies by the table (tied head)."""

    def __init__(self, vocab: int, hidden: int, spec: QuantSpec):
        super().__init__(hidden, vocab, spec)

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return op.tensor_expr_op(te_embedding(self.spec, self.spec.model_dtype), "embedding", [ids, *self._weights()])

    def lm_head(self, x: Tensor) -> Tensor:
        if self.gemm is not None and self.gemm.library_gemv(self.spec):
            return self._library_gemv(x, "float32")
        return op.tensor_expr_op(te_linear(self.spec, "float32", self._fp16_weights()), "lm_head",
                                 [x, *self._weights()])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, plan: ShardPlan, spec: QuantSpec):
        self.head_dim = config.head_dim
        self.q_heads, self.kv_heads = plan.q_heads, plan.kv_heads
        d = self.head_dim
        self.qkv_proj = Linear(config.hidden_size, (self.q_heads + 2 * self.kv_heads) * d, spec)
        self.o_proj = Linear(self.q_heads * d, config.hidden_size, spec)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.q_heads + 2 * self.kv_heads, self.head_dim))
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.q_heads, sm_scale=self.head_dim**-0.5)
        return self.o_proj(op.reshape(out, (b, s, self.q_heads * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, plan: ShardPlan, spec: QuantSpec):
        self.gate_up_proj = Linear(config.hidden_size, 2 * plan.intermediate, spec)
        self.down_proj = Linear(plan.intermediate, config.hidden_size, spec)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, plan: ShardPlan, spec: QuantSpec):
        self.tp = plan.tp
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False, dtype=spec.model_dtype)
        self.self_attn = Attention(config, plan, spec)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False, dtype=spec.model_dtype)
        self.mlp = MLP(config, plan, spec)

    def _reduce(self, partial: Tensor) -> Tensor:
        return op.ccl_allreduce(partial, "sum") if self.tp > 1 else partial

    def attention_partial(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        """This rank's partial sum of the attention block's output (before the allreduce)."""
        return self.self_attn(self.input_layernorm(x), kv, layer_id)

    def mlp_partial(self, x: Tensor) -> Tensor:
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self._reduce(self.attention_partial(x, kv, layer_id))
        return x + self._reduce(self.mlp_partial(x))


class _InFlight:
    """A block's partial output whose allreduce has been begun (tp > 1), and the residual its sum
    is added to."""

    def __init__(self, partial: Tensor, residual: Tensor, tp: int):
        self.partial, self.residual = partial, residual
        self.reduced = None
        if tp > 1:
            self.reduced = op.extern(ALLREDUCE_BEGIN, [partial], Tensor.placeholder(partial.shape, partial.dtype))

    def settle(self) -> Tensor:
        """residual + the reduced sum, after waiting for the allreduce (see the module doc)."""
        if self.reduced is None:
            return self.residual + self.partial
        token = op.extern(ALLREDUCE_WAIT, [self.reduced, self.partial], Tensor.placeholder([1], "int32"))
        return op.tensor_expr_op(lambda r, x, _token: topi.add(x, r), "residual_add", [self.reduced, self.residual, token])


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, plan: ShardPlan, spec: QuantSpec):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, spec)
        self.layers = nn.ModuleList([DecoderLayer(config, plan, spec) for _ in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False, dtype=spec.model_dtype)

    def forward(self, hidden: Tensor, kv: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            hidden = layer(hidden, kv, layer_id)
        return self.norm(hidden)

    def forward_pair(self, hidden: list[Tensor], kvs: list[PagedKVCache], tp: int) -> list[Tensor]:
        """Two micro-batches, each in its own KV cache, interleaved half-layer by half-layer so
        that one's allreduce runs while the other computes (module doc)."""
        hidden = list(hidden)
        flight: list[_InFlight | None] = [None, None]
        for layer_id, layer in enumerate(self.layers):
            for block in ("attention", "mlp"):
                for m in (0, 1):
                    if flight[m] is not None:
                        hidden[m] = flight[m].settle()
                    partial = layer.attention_partial(hidden[m], kvs[m], layer_id) if block == "attention" \
                        else layer.mlp_partial(hidden[m])
                    flight[m] = _InFlight(partial, hidden[m], tp)
        return [self.norm(f.settle()) for f in flight]


def _argmax_last(logits: Tensor) -> Tensor:
    return op.tensor_expr_op(lambda x: topi.argmax(x, axis=-1).astype("int32"), "argmax", [logits])


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, spec: QuantSpec, tp: int, target, lm_head: str = "replicated",
                 prefill_gemm: str = "tir", prefill_attention: str = "tir", decode_attention: str = "tir",
                 decode_gemv: str = "tir", microbatch_decode: bool = False):
        for name, value in (("prefill_gemm", prefill_gemm), ("prefill_attention", prefill_attention),
                            ("decode_attention", decode_attention), ("decode_gemv", decode_gemv)):
            if value not in KERNEL_SOURCES:
                raise ValueError(f"{name} must be one of {KERNEL_SOURCES}, got {value!r}")
        # TVM's kernel slots (names of its functions) -> the library function that replaces each
        self._attention_swaps = {**(_PREFILL_SLOTS if prefill_attention == "library" else {}),
                                 **(_DECODE_SLOTS if decode_attention == "library" else {})}
        self.config, self.spec, self.target = config, spec, target
        self.microbatch_decode = microbatch_decode
        self.plan = ShardPlan(config, tp, lm_head)
        self.plan.check_quant(spec)
        self.model = LlamaModel(config, self.plan, spec)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, self.plan.vocab, spec, out_dtype="float32")
        self._gemm = _GemmChoice(prefill_gemm == "library", decode_gemv == "library")
        for module in _submodules(self):
            if isinstance(module, Linear):
                module.gemm = self._gemm

    def _logits(self, hidden: Tensor) -> Tensor:
        """[n, hidden] -> float32 logits [n, vocab] on every rank."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.lm_head(hidden)
        logits = self.lm_head(hidden)
        if not self.plan.vocab_parallel:
            return logits
        # Rank r holds vocabulary slice r: allgather stacks the slices as [tp * n, V/tp]; put the
        # vocabulary back in order as [n, tp * V/tp].
        tp, n = self.plan.tp, logits.shape[0]
        gathered = op.reshape(op.ccl_allgather(logits, tp), (tp, n, self.plan.vocab))
        return op.reshape(op.permute_dims(gathered, [1, 0, 2]), (n, self.config.vocab_size))

    def _embed(self, input_ids: Tensor) -> Tensor:
        if self.plan.tp > 1:  # the controller writes token ids to worker 0 only
            input_ids = op.ccl_broadcast_from_worker0(input_ids)
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_ids: Tensor, kv: PagedKVCache):
        with self._gemm.tracing("prefill"):
            hidden = self.model(self._embed(input_ids), kv)
        with self._gemm.tracing("decode"):  # one row: the GEMV
            logits = self._logits(_take_last(hidden))
        return _argmax_last(logits), logits, kv

    def prefill_logits(self, input_ids: Tensor, kv: PagedKVCache):
        with self._gemm.tracing("prefill"):
            hidden = self.model(self._embed(input_ids), kv)
            _, s, h = hidden.shape
            return self._logits(op.reshape(hidden, (s, h))), kv

    def decode(self, input_ids: Tensor, kv: PagedKVCache):
        with self._gemm.tracing("decode"):
            return self.batch_decode(input_ids, kv)

    def batch_decode(self, input_ids: Tensor, kv: PagedKVCache):
        hidden = self.model(self._embed(input_ids), kv)
        b, _, h = hidden.shape
        logits = self._logits(op.reshape(hidden, (b, h)))
        return _argmax_last(logits), logits, kv

    def batch_decode_pair(self, input_ids: Tensor, kv_a: PagedKVCache, kv_b: PagedKVCache):
        _, m, _ = input_ids.shape
        halves = [op.reshape(half, (m, 1)) for half in op.split(input_ids, 2, axis=0)]
        hidden = self.model.forward_pair([self._embed(ids) for ids in halves], [kv_a, kv_b], self.plan.tp)
        # The LM head per micro-batch: dlight cannot schedule a matmul over 2 * m rows.
        logits = [self._logits(op.reshape(x, (m, x.shape[-1]))) for x in hidden]
        stack = lambda parts: op.concat([op.reshape(t, (1, *t.shape)) for t in parts], dim=0)  # noqa: E731
        return stack([_argmax_last(x) for x in logits]), stack(logits), kv_a, kv_b

    def create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                        support_sliding_window) -> PagedKVCache:
        with _prefill_attention_blocks(PREFILL_ATTENTION_BLOCKS if self.target.kind.name == "cuda" else None):
            return self._paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                        support_sliding_window)

    def _paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                        support_sliding_window) -> PagedKVCache:
        c = self.config
        kv_cache = _library_kv_cache(self._attention_swaps) if self._attention_swaps else TIRPagedKVCache
        return kv_cache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=self.plan.q_heads,
            num_key_value_heads=self.plan.kv_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling or {}),
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.spec.model_dtype,
            target=self.target,
        )

    def export_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        ids = lambda *shape: nn.spec.Tensor(list(shape), "int32")  # noqa: E731
        pair = {"batch_decode_pair": {"input_ids": ids(2, "micro_batch", 1), "kv_a": kv, "kv_b": kv, "$": packed}} \
            if self.microbatch_decode else {}
        return nn.spec.ModuleSpec.from_raw({
            "prefill": {"input_ids": ids(1, "seq_len"), "kv": kv, "$": packed},
            "prefill_logits": {"input_ids": ids(1, "seq_len"), "kv": kv, "$": packed},
            "decode": {"input_ids": ids(1, 1), "kv": kv, "$": packed},
            "batch_decode": {"input_ids": ids("batch_size", 1), "kv": kv, "$": packed},
            **pair,
            "create_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }, self)


# TVM's TIR kernels in the KV cache (by the names TIRPagedKVCache gives them, cuda and llvm) and
# the runtime_patch.attention functions with the same arguments that replace them.
LIBRARY_PREFILL_ATTENTION = "lab.attention.prefill_ragged"
LIBRARY_DECODE_ATTENTION = "lab.attention.decode_paged"
_PREFILL_SLOTS = {name: LIBRARY_PREFILL_ATTENTION
                  for name in ("tir_attention_prefill_ragged", "tir_attention_prefill_ragged_cpu")}
_DECODE_SLOTS = {name: LIBRARY_DECODE_ATTENTION for name in ("tir_attention_decode", "tir_attention_decode_cpu")}


class _SwapAttentionKernels(PagedKVCache):
    """Between TIRPagedKVCache and PagedKVCache in a _library_kv_cache class's method order, so it
    receives the `vm.builtin.paged_attention_kv_cache_create` call TIRPagedKVCache builds: in each
    kernel slot ("tirx", <prim func>) named in `swaps` it puts the library function instead."""

    swaps: dict[str, str] = {}

    def __init__(self, *, _expr, _name):
        args, found = [], set()
        for arg in _expr.args:
            if isinstance(arg, relax.Tuple) and len(arg.fields) == 2 and isinstance(arg.fields[1], ir.GlobalVar) \
                    and arg.fields[1].name_hint in self.swaps:
                found.add(self.swaps[arg.fields[1].name_hint])
                arg = relax.Tuple([arg.fields[0], relax.ExternFunc(self.swaps[arg.fields[1].name_hint])])
            args.append(arg)
        missing = set(self.swaps.values()) - found
        if missing:
            raise RuntimeError(f"TVM's paged KV cache has no kernel slot for {sorted(missing)} (a TVM version this "
                               "lab does not know): build with prefill_attention=tir decode_attention=tir")
        super().__init__(_expr=relax.Call(_expr.op, args, _expr.attrs, _expr.ty_args), _name=_name)


def _library_kv_cache(swaps: dict[str, str]) -> type:
    """TVM's TIR paged KV cache with the kernel slots in `swaps` taken by runtime_patch.attention."""
    return type("LibraryAttentionKVCache", (TIRPagedKVCache, _SwapAttentionKernels), {"swaps": swaps})


# Thread blocks per KV head of TVM's prefill attention kernels (a persistent loop over query tiles
# of 32 rows). TVM's default, 16, gives a 1024-token Llama-3-8B prefill 128 blocks of 4 warps on
# an H100's 132 SMs: the kernel took 2.9 ms per layer, 79% of the prefill. 128 blocks per head
# cover such a prefill's 128 tiles per head in one wave.
PREFILL_ATTENTION_BLOCKS = 128


@contextlib.contextmanager
def _prefill_attention_blocks(blocks: int | None):
    """While TVM builds the KV cache's prefill attention kernels, give them `blocks` thread blocks
    per KV head (the first field of `_get_prefill_kernel_config`); None leaves TVM's choice."""
    from tvm.relax.frontend.nn.llm import _prefill_kernels

    original = _prefill_kernels._get_prefill_kernel_config
    if blocks is None:
        yield
        return

    def config(*args, **kwargs):
        return (blocks, *original(*args, **kwargs)[1:])

    _prefill_kernels._get_prefill_kernel_config = config
    try:
        yield
    finally:
        _prefill_kernels._get_prefill_kernel_config = original


def _submodules(module: nn.Module):
    for value in vars(module).values():
        children = value if isinstance(value, nn.ModuleList) else [value]
        for child in children:
            if isinstance(child, nn.Module):
                yield child
                yield from _submodules(child)


def _take_last(hidden: Tensor) -> Tensor:
    """hidden[0, -1, :] as [1, h]."""
    def compute(x):
        s = x.shape[1]
        return te.compute((1, x.shape[2]), lambda i, j: x[0, s - 1, j], name="take_last")

    return op.tensor_expr_op(compute, "take_last", [hidden])
