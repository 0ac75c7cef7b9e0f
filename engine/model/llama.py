"""Llama in `tvm.relax.frontend.nn`, for one tensor-parallel rank, over TVM's paged KV cache.

Exported functions (parameters packed into one tuple argument, as MLC does):
  prefill(input_ids[1, s], kv)          -> (next_token[1], logits[1, vocab], kv)   last position
                                        (the last layer's o projection, MLP and, on the static
                                        cache, attention on that row only: LlamaModel.forward,
                                        last_row_only)
  prefill_logits(input_ids[1, s], kv)   -> (logits[s, vocab], kv)                  every position
  decode(input_ids[1, 1], kv)           -> (next_token[1], logits[1, vocab], kv)   static batch 1
  batch_decode(input_ids[b, 1], kv)     -> (next_token[b], logits[b, vocab], kv)
  batch_decode_pair(input_ids[2, m, 1], kv_a, kv_b) -> (next_token[2, m], logits[2, m, vocab], kv_a, kv_b)
                                        (with `microbatch_decode`: two micro-batches of m sequences,
                                        one per KV cache, interleaved layer by layer; see below)
  create_kv_cache(max_batch, max_total_len, prefill_chunk, page_size, sliding_window) -> kv
Greedy sampling (argmax) happens on the device; logits stay there unless read.

Pipeline stages (pp > 1, engine.sharding.stage_layers): each stage is a module of its own with the
same functions. The first stage embeds the tokens, every other one receives the previous stage's
activations (runtime.disco.recv_from_prev_group); every stage but the last sends its output on
(PP_SEND_NEXT) and returns placeholders in place of the tokens and logits, which only the last
computes. Two more functions bring those to the first stage, whose worker 0 the host reads:
  collect_tokens(tokens[n]) -> tokens
  collect_logits(logits[n, vocab]) -> logits
(the last stage sends, the first receives, the others pass them through). Kept apart from the step
so that only what is read travels (greedy decoding reads the tokens, not the logits) and so that a
stage can start the next micro-batch before the results of the previous one are brought back.

The shapes of a rank's weights come from the sharding table (engine.sharding); which kernel
computes each product from the build's KernelPlan (engine.model.kernels); the KV cache and its
attention kernels from engine.model.kv_cache.

`batch_decode_pair` (build option `microbatch_decode`) is the decode of `full_overlap`
(runtime_patch.stream_overlap): at tp > 1 each allreduce is begun by `lab.ccl.allreduce_begin` (on
a communication stream of its own) and waited for by `lab.ccl.allreduce_wait` only just before
its sum is needed, with the other micro-batch's half-layer computed in between: attention(A)
begin(A) | attention(B) begin(B) | wait(A) mlp(A) begin(A) | wait(B) mlp(B) begin(B) | wait(A)
attention(A) of the next layer, ... The wait returns a token that the residual add takes as an
(unread) input, so the add is ordered after the wait in the graph, and the wait takes the
allreduce's input too, so that memory planning keeps it alive until the collective has read it.
"""

from __future__ import annotations

from tvm import te, topi
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from runtime_patch import functions

from ..sharding import ShardPlan
from . import static_kv
from .kernels import BATCH, DECODE, PREFILL, Embedding, KernelPlan, Linear, PendingNorm, RMSNorm, extern
from .kv_cache import create_paged_kv_cache


class Attention(nn.Module):
    def __init__(self, plan: ShardPlan, spec, kernels: KernelPlan):
        self.head_dim = plan.config.head_dim
        self.q_heads, self.kv_heads = plan.q_heads, plan.kv_heads
        self.qkv_proj = Linear(*plan.linear_shape("self_attn.qkv_proj"), spec, kernels)
        self.o_proj = Linear(*plan.linear_shape("self_attn.o_proj"), spec, kernels)

    def attend(self, x: Tensor | PendingNorm, kv: PagedKVCache, layer_id: int, phase: str,
               last_row_only: bool = False) -> Tensor:
        """attention(qkv_proj(x)) [b, s, q_heads * head_dim], x normalised (or its norm pending,
        finished by the qkv projection's library GEMV); every row's keys and
        values go into the KV cache. With `last_row_only` the last row's alone, [b, 1, ...]: the
        static cache computes only that row's attention, TVM's paged cache every row's."""
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x, phase), (b, s, self.q_heads + 2 * self.kv_heads, self.head_dim))
        scale = self.head_dim**-0.5
        if last_row_only and isinstance(kv, static_kv.StaticKV):
            out = kv.attention_with_fused_qkv(layer_id, qkv, self.q_heads, sm_scale=scale, last_row_only=True)
            return op.reshape(out, (1, 1, self.q_heads * self.head_dim))
        out = op.reshape(kv.attention_with_fused_qkv(layer_id, qkv, self.q_heads, sm_scale=scale),
                         (b, s, self.q_heads * self.head_dim))
        return _last_row(out) if last_row_only else out

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, phase: str, residual: Tensor | None = None) -> Tensor:
        """(residual +) o_proj(attention(qkv_proj(x))), x normalised."""
        out = self.attend(x, kv, layer_id, phase)
        # the static cache's decode attention lets the o projection's GEMV load its weight while it runs
        early = isinstance(kv, static_kv.StaticKV)
        return self.o_proj(out, phase, early) if residual is None else self.o_proj.plus(out, residual, phase, early)


class MLP(nn.Module):
    def __init__(self, plan: ShardPlan, spec, kernels: KernelPlan):
        self.gate_up_proj = Linear(*plan.linear_shape("mlp.gate_up_proj"), spec, kernels)
        self.down_proj = Linear(*plan.linear_shape("mlp.down_proj"), spec, kernels)

    def forward(self, x: Tensor, phase: str, residual: Tensor | None = None) -> Tensor:
        """(residual +) down_proj(silu(gate) * up), [gate, up] = gate_up_proj(x), x normalised (SiLU
        inside the library GEMV where the phase has one)."""
        hidden = self.gate_up_proj.swiglu(x, phase)
        # the library GEMV with SiLU lets the down projection's start early (in its last wave)
        return self.down_proj(hidden, phase, early=True) if residual is None else \
            self.down_proj.plus(hidden, residual, phase, early=True)

    def plus_norm_start(self, x: PendingNorm, residual: Tensor, norm: RMSNorm, phase: str) -> tuple[Tensor, PendingNorm]:
        """(residual + the MLP of x, norm of it pending): gate_up's GEMV finishes x's norm, the
        down projection's starts `norm` (Linear.plus_norm_start, the second norm site)."""
        hidden = self.gate_up_proj.swiglu(x, phase)
        return self.down_proj.plus_norm_start(hidden, residual, norm, functions.NORM_SITES[1], phase, early=True)


def _rms_norm(config, spec, kernels: KernelPlan) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps, spec.model_dtype, kernels)


class DecoderLayer(nn.Module):
    def __init__(self, plan: ShardPlan, spec, kernels: KernelPlan):
        self.tp, self.library_allreduce = plan.tp, kernels.library_allreduce
        self.spec, self.kernels = spec, kernels
        self.input_layernorm = _rms_norm(plan.config, spec, kernels)
        self.self_attn = Attention(plan, spec, kernels)
        self.post_attention_layernorm = _rms_norm(plan.config, spec, kernels)
        self.mlp = MLP(plan, spec, kernels)

    def _reduce(self, partial: Tensor) -> Tensor:
        if self.tp == 1:
            return partial
        if self.library_allreduce:  # the project's one-shot over CUDA IPC (NCCL where it cannot)
            return op.extern(functions.ALLREDUCE, [partial], Tensor.placeholder(partial.shape, partial.dtype))
        return op.ccl_allreduce(partial, "sum")

    def attention_partial(self, x: Tensor, kv: PagedKVCache, layer_id: int, phase: str) -> Tensor:
        """This rank's partial sum of the attention block's output (before the allreduce)."""
        return self.self_attn(self.input_layernorm(x, phase), kv, layer_id, phase)

    def mlp_partial(self, x: Tensor, phase: str) -> Tensor:
        return self.mlp(self.post_attention_layernorm(x, phase), phase)

    def _reduce_add_norm(self, partial: Tensor, residual: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """(residual + allreduce(partial), norm of that): one call of the library allreduce; at
        tp=1 (the library prefill) the add and the norm in one call of lab.norm.add_rms."""
        outs = [Tensor.placeholder(partial.shape, partial.dtype) for _ in range(2)]
        name = functions.ADD_RMS_NORM if self.tp == 1 else functions.ALLREDUCE_ADD_RMS_NORM
        total, normed = extern(name, [partial, residual, norm.weight, float(norm.epsilon)], outs)
        return total, normed

    def _rest_normed(self, x: Tensor, attention: Tensor, phase: str,
                     next_norm: RMSNorm | None) -> tuple[Tensor, Tensor | None]:
        """From the attention block's output (`attention`: this rank's partial) on, each residual
        add with the norm after it in one call (forward_normed): the layer's output and next_norm
        of it (None where next_norm is None)."""
        x, normed = self._reduce_add_norm(attention, x, self.post_attention_layernorm)
        partial = self.mlp(normed, phase)
        if next_norm is None:
            return x + self._reduce(partial), None
        return self._reduce_add_norm(partial, x, next_norm)

    def gemv_norms(self, phase: str) -> bool:
        """Whether the norms after the residual adds are split over the library GEMVs around them
        (tp=1, KernelPlan.gemv_norms)."""
        return self.tp == 1 and self.kernels.gemv_norms(phase, self.spec)

    def _rest_in_gemvs(self, x: Tensor, attended: Tensor, phase: str, next_norm: RMSNorm,
                       early: bool) -> tuple[Tensor, PendingNorm]:
        """As _rest_normed from the attention's output before the o projection (`attended`), each
        residual add with the norm after it started in the GEMV that ends its block (gemv_norms:
        the o projection, launched `early`, into the first norm site, the down projection into the
        second) and finished in the GEMV after it. Only with a next norm: each GEMV that adds into a
        site zeroes the other, so a graph's o and down projections must alternate and end with a
        down projection's (functions.NORM_SITES)."""
        x, pending = self.self_attn.o_proj.plus_norm_start(attended, x, self.post_attention_layernorm,
                                                           functions.NORM_SITES[0], phase, early)
        return self.mlp.plus_norm_start(pending, x, next_norm, phase)

    def _mlp_block(self, x: Tensor, phase: str) -> Tensor:
        """x + the MLP block of x (at tp=1 the residual add in the down projection's last
        products, a library GEMV's epilogue)."""
        if self.tp == 1:
            return self.mlp(self.post_attention_layernorm(x, phase), phase, residual=x)
        return x + self._reduce(self.mlp_partial(x, phase))

    def forward_normed(self, x: Tensor, normed: Tensor | PendingNorm, kv: PagedKVCache, layer_id: int, phase: str,
                       next_norm: RMSNorm | None) -> tuple[Tensor, Tensor | PendingNorm | None]:
        """The layer on x and input_layernorm(x) (`normed`, made by the previous layer's last add);
        returns its output and next_norm of it (None where next_norm is None), each residual add
        with the norm after it in one call (LlamaModel.adds_norms: tp > 1 with the library
        allreduce, inside the allreduces; the library prefill at tp=1, lab.norm.add_rms), or split
        over the GEMVs around it (the library decode GEMVs at tp=1, gemv_norms: the norm pending;
        not in a pipeline stage's last layer, which has no next norm: _rest_in_gemvs)."""
        if self.gemv_norms(phase) and next_norm is not None:
            # the static cache's decode attention lets the o projection's GEMV start early
            early = isinstance(kv, static_kv.StaticKV)
            return self._rest_in_gemvs(x, self.self_attn.attend(normed, kv, layer_id, phase), phase, next_norm, early)
        return self._rest_normed(x, self.self_attn(normed, kv, layer_id, phase), phase, next_norm)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, phase: str) -> Tensor:
        if self.tp == 1:  # the residual adds go into the blocks' last products (a library GEMV's epilogue)
            x = self.self_attn(self.input_layernorm(x, phase), kv, layer_id, phase, residual=x)
        else:
            x = x + self._reduce(self.attention_partial(x, kv, layer_id, phase))
        return self._mlp_block(x, phase)

    def finish(self, x: Tensor, attended: Tensor, phase: str, next_norm: RMSNorm,
               adds_norms: bool) -> Tensor | PendingNorm:
        """next_norm of the layer's output, from its attention on: on rows of its input `x` and of
        its attention's output `attended` (Attention.attend), x + o_proj(attended), then the MLP
        block, in `phase`; with `adds_norms` (LlamaModel.adds_norms of that phase: tp > 1 with the
        library allreduce) each residual add with the norm after it in the allreduce, as
        forward_normed; with the norms in the GEMVs (gemv_norms) the norm is pending."""
        if self.gemv_norms(phase):
            return self._rest_in_gemvs(x, attended, phase, next_norm, early=False)[1]
        if adds_norms:
            return self._rest_normed(x, self.self_attn.o_proj(attended, phase), phase, next_norm)[1]
        if self.tp == 1:
            x = self.self_attn.o_proj.plus(attended, x, phase)
        else:
            x = x + self._reduce(self.self_attn.o_proj(attended, phase))
        return next_norm(self._mlp_block(x, phase), phase)


class _InFlight:
    """A block's partial output whose allreduce has been begun (tp > 1), and the residual its sum
    is added to."""

    def __init__(self, partial: Tensor, residual: Tensor, tp: int):
        self.partial, self.residual = partial, residual
        self.reduced = None
        if tp > 1:
            self.reduced = op.extern(functions.ALLREDUCE_BEGIN, [partial],
                                     Tensor.placeholder(partial.shape, partial.dtype))

    def settle(self) -> Tensor:
        """residual + the reduced sum, after waiting for the allreduce (see the module doc)."""
        if self.reduced is None:
            return self.residual + self.partial
        token = op.extern(functions.ALLREDUCE_WAIT, [self.reduced, self.partial], Tensor.placeholder([1], "int32"))
        return op.tensor_expr_op(lambda r, x, _token: topi.add(x, r), "residual_add", [self.reduced, self.residual, token])


class LlamaModel(nn.Module):
    """The layers of one pipeline stage (all of them for pp=1), named by their index in the whole
    model, with the embedding on the first stage and the final norm on the last."""

    def __init__(self, plan: ShardPlan, spec, kernels: KernelPlan):
        c = plan.config
        if plan.holds("model.embed_tokens"):
            self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, spec, kernels)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(plan, spec, kernels) for i in plan.layers})
        self.last_stage = plan.last_stage
        if plan.last_stage:
            self.norm = _rms_norm(c, spec, kernels)
        # tp > 1 with the library allreduce: each allreduce also adds the residual and computes the
        # next RMSNorm (lab.ccl.allreduce_add_rms_norm), the model's final norm included
        self.norms_in_allreduce = plan.tp > 1 and kernels.library_allreduce
        self.kernels, self.tp, self.spec = kernels, plan.tp, spec

    def adds_norms(self, phase: str) -> bool:
        """Whether each residual add comes with the RMSNorm after it in one call (forward_normed):
        in the allreduce (above), or at tp=1 in the library prefill's lab.norm.add_rms or split over
        the library decode GEMVs (KernelPlan.gemv_norms)."""
        return self.norms_in_allreduce or (self.tp == 1 and (self.kernels.library_add_norm(phase)
                                                             or self.kernels.gemv_norms(phase, self.spec)))

    def _numbered(self):
        """(index in this stage's KV cache, layer): a stage's cache holds its own layers only."""
        return enumerate(self.layers.modules.values())

    def forward(self, hidden: Tensor, kv: PagedKVCache, phase: str, last_row_only: bool = False) -> Tensor | PendingNorm:
        """The stage's layers on `hidden` [b, s, h] (the final norm on the last stage: pending where
        the norms are in the decode GEMVs, KernelPlan.gemv_norms, for the LM head's GEMV). With
        `last_row_only` (a prefill that returns only its last position's logits) the last stage's
        last layer finishes on the last row alone, as a decode step does: its qkv projection runs on
        every row (their keys and values go into the cache), but what follows would feed nothing
        but the logits of positions never read, so its attention (on the static cache; TVM's paged
        cache attends every row: Attention.attend), o projection, MLP and final norm take the last
        row only (DECODE phase after the attention: the batch-1 GEMVs), and the result is
        [b, 1, h]. On Llama-3-8B that is most of a layer's GEMMs of a long prompt (o, gate_up,
        down: 88% of a layer's weights)."""
        layers = list(self._numbered())
        cut = last_row_only and self.last_stage and bool(layers)
        if self.adds_norms(phase) and layers:
            normed = layers[0][1].input_layernorm(hidden, phase)
            for i, (layer_id, layer) in enumerate(layers):
                if cut and i + 1 == len(layers):
                    return self._finish_last_row(layer, hidden, layer.self_attn.attend(normed, kv, layer_id, phase,
                                                                                      last_row_only=True))
                if i + 1 < len(layers):
                    next_norm = layers[i + 1][1].input_layernorm
                else:
                    next_norm = self.norm if self.last_stage else None
                hidden, normed = layer.forward_normed(hidden, normed, kv, layer_id, phase, next_norm)
            return normed if self.last_stage else hidden
        for i, (layer_id, layer) in enumerate(layers):
            if cut and i + 1 == len(layers):
                attended = layer.self_attn.attend(layer.input_layernorm(hidden, phase), kv, layer_id, phase,
                                                  last_row_only=True)
                return self._finish_last_row(layer, hidden, attended)
            hidden = layer(hidden, kv, layer_id, phase)
        return self.norm(hidden, phase) if self.last_stage else hidden

    def _finish_last_row(self, layer: DecoderLayer, hidden: Tensor, attended: Tensor) -> Tensor | PendingNorm:
        """The last layer after its attention (`attended`: the last row's), and the final norm, on
        the last row (forward)."""
        return layer.finish(_last_row(hidden), attended, DECODE, self.norm, self.adds_norms(DECODE))

    def forward_pair(self, hidden: list[Tensor], kvs: list[PagedKVCache], tp: int, phase: str) -> list[Tensor]:
        """Two micro-batches, each in its own KV cache, interleaved half-layer by half-layer so
        that one's allreduce runs while the other computes (module doc)."""
        hidden = list(hidden)
        flight: list[_InFlight | None] = [None, None]
        for layer_id, layer in self._numbered():
            for block in ("attention", "mlp"):
                for m in (0, 1):
                    if flight[m] is not None:
                        hidden[m] = flight[m].settle()
                    partial = layer.attention_partial(hidden[m], kvs[m], layer_id, phase) if block == "attention" \
                        else layer.mlp_partial(hidden[m], phase)
                    flight[m] = _InFlight(partial, hidden[m], tp)
        return [self.norm(f.settle(), phase) for f in flight]


def _argmax_last(logits: Tensor) -> Tensor:
    return op.tensor_expr_op(lambda x: topi.argmax(x, axis=-1).astype("int32"), "argmax", [logits])


class LlamaForCausalLM(nn.Module):
    """One rank of the model a BuildSpec (engine.compile) describes."""

    def __init__(self, build):
        self.config, self.quant, self.target = build.config, build.quant_spec, build.tvm_target()
        self.build = build
        self.plan = build.plan
        self.plan.check_quant(self.quant)
        kernels = KernelPlan.of(build)
        self.model = LlamaModel(self.plan, self.quant, kernels)
        if not self.config.tie_word_embeddings and self.plan.holds("lm_head"):
            self.lm_head = Linear(*self.plan.linear_shape("lm_head"), self.quant, kernels, out_dtype="float32")

    def _logits(self, hidden: Tensor | PendingNorm, phase: str) -> Tensor:
        """[n, hidden] -> float32 logits [n, vocab] on every rank."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.lm_head(hidden, phase)
        logits = self.lm_head(hidden, phase)
        if not self.plan.vocab_parallel:
            return logits
        # Rank r holds vocabulary slice r: allgather stacks the slices as [tp * n, V/tp]; put the
        # vocabulary back in order as [n, tp * V/tp].
        tp, n = self.plan.tp, logits.shape[0]
        gathered = op.reshape(op.ccl_allgather(logits, tp), (tp, n, self.plan.vocab))
        return op.reshape(op.permute_dims(gathered, [1, 0, 2]), (n, self.config.vocab_size))

    def _embed(self, input_ids: Tensor) -> Tensor:
        if self.plan.tp > 1:  # the controller writes token ids to worker 0 only
            if self.plan.pp > 1:  # within the first stage's group only
                input_ids = op.extern("runtime.disco.broadcast_from_worker0", [input_ids, True],
                                      Tensor.placeholder(input_ids.shape, input_ids.dtype))
            else:
                input_ids = op.ccl_broadcast_from_worker0(input_ids)
        return self.model.embed_tokens(input_ids)

    def _enter(self, input_ids: Tensor) -> Tensor:
        """The stage's input activations [b, s, hidden]: the embedded tokens on the first stage,
        the previous stage's output on the others."""
        if self.plan.first_stage:
            return self._embed(input_ids)
        b, s = input_ids.shape
        return op.extern("runtime.disco.recv_from_prev_group", [],
                         Tensor.placeholder([b, s, self.config.hidden_size], self.quant.model_dtype))

    def _pass_on(self, hidden: Tensor, *results: tuple[list, str]):
        """A non-last stage: `hidden` to the next stage; placeholders of the (shape, dtype)
        `results` the last stage computes (module doc)."""
        return extern(functions.PP_SEND_NEXT, [hidden], [Tensor.placeholder(shape, dtype) for shape, dtype in results])

    def _one_row(self, hidden: Tensor | PendingNorm) -> Tensor | PendingNorm:
        """The last stage's output of a last-row prefill ([1, 1, h]: LlamaModel.forward,
        last_row_only) as the LM head's [1, h]."""
        return _reshape(hidden, (1, self.config.hidden_size))

    def prefill(self, input_ids: Tensor, kv: PagedKVCache):
        hidden = self.model(self._enter(input_ids), kv, PREFILL, last_row_only=True)
        if not self.plan.last_stage:
            return (*self._pass_on(hidden, ([1], "int32"), ([1, self.config.vocab_size], "float32")), kv)
        logits = self._logits(self._one_row(hidden), DECODE)  # one row: the GEMV
        return _argmax_last(logits), logits, kv

    def prefill_logits(self, input_ids: Tensor, kv: PagedKVCache):
        hidden = self.model(self._enter(input_ids), kv, PREFILL)
        _, s, h = hidden.shape
        if not self.plan.last_stage:
            return self._pass_on(hidden, ([s, self.config.vocab_size], "float32")), kv
        return self._logits(op.reshape(hidden, (s, h)), PREFILL), kv

    def _decode(self, input_ids: Tensor, kv: PagedKVCache, phase: str):
        hidden = self.model(self._enter(input_ids), kv, phase)
        b, _, h = hidden.shape
        if not self.plan.last_stage:
            return (*self._pass_on(hidden, ([b], "int32"), ([b, self.config.vocab_size], "float32")), kv)
        logits = self._logits(_reshape(hidden, (b, h)), phase)
        return _argmax_last(logits), logits, kv

    def _to_first_stage(self, *values: Tensor):
        """The last stage's `values` on the first stage (module doc: collect_tokens, collect_logits)."""
        plan = self.plan
        if not (plan.first_stage or plan.last_stage):
            return values if len(values) > 1 else values[0]
        name = functions.PP_SEND_FIRST if plan.last_stage else functions.PP_RECV_LAST
        return extern(name, [*values, plan.tp, plan.pp], [Tensor.placeholder(v.shape, v.dtype) for v in values])

    def collect_tokens(self, tokens: Tensor):
        return self._to_first_stage(tokens)

    def collect_logits(self, logits: Tensor):
        return self._to_first_stage(logits)

    def decode(self, input_ids: Tensor, kv: PagedKVCache):
        return self._decode(input_ids, kv, DECODE)

    def batch_decode(self, input_ids: Tensor, kv: PagedKVCache):
        return self._decode(input_ids, kv, BATCH)

    def batch_decode_pair(self, input_ids: Tensor, kv_a: PagedKVCache, kv_b: PagedKVCache):
        _, m, _ = input_ids.shape
        halves = [op.reshape(half, (m, 1)) for half in op.split(input_ids, 2, axis=0)]
        hidden = self.model.forward_pair([self._embed(ids) for ids in halves], [kv_a, kv_b], self.plan.tp, BATCH)
        # The LM head per micro-batch: dlight cannot schedule a matmul over 2 * m rows.
        logits = [self._logits(op.reshape(x, (m, x.shape[-1])), BATCH) for x in hidden]
        stack = lambda parts: op.concat([op.reshape(t, (1, *t.shape)) for t in parts], dim=0)  # noqa: E731
        return stack([_argmax_last(x) for x in logits]), stack(logits), kv_a, kv_b

    def create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                        support_sliding_window) -> PagedKVCache:
        return create_paged_kv_cache(self.build, self.target, max_batch_size, max_total_seq_len, prefill_chunk_size,
                                     page_size, support_sliding_window)

    # --- the static KV cache (kv_cache="static", engine/model/static_kv.py) -------------------------

    def _static_results(self, hidden: Tensor, logits_of, rows) -> tuple[Tensor, Tensor]:
        """A static-cache step's next tokens [rows] and logits [rows, vocab] on this stage. The last
        stage computes them and (with pipeline stages) sends the tokens to the first, which
        receives them after passing its activations on: every stage then settles or advances its
        own positions (and the first its ids and the mailbox) in the same step. A middle stage's
        tokens and every non-last stage's logits are placeholders (module doc)."""
        plan = self.plan
        token = lambda: Tensor.placeholder([rows], "int32")  # noqa: E731
        if plan.last_stage:
            logits = logits_of(hidden)
            tokens = static_kv.argmax(logits)
            if plan.pp > 1:
                tokens = extern(functions.PP_SEND_FIRST, [tokens, plan.tp, plan.pp], [token()])
            return tokens, logits
        tokens, logits = self._pass_on(hidden, ([rows], "int32"), ([rows, self.config.vocab_size], "float32"))
        if plan.first_stage:
            tokens = extern(functions.PP_RECV_LAST, [tokens, plan.tp, plan.pp], [token()])
        return tokens, logits

    def prefill_static(self, input_ids: Tensor, cache: Tensor, positions: Tensor, ids: Tensor, slot, start):
        """A chunk of one slot's prompt at `start`; the slot's ids and positions are set for decoding."""
        kv = static_kv.StaticKV(self.build, cache, static_kv.PREFILL, positions, slot, start)
        hidden = self.model(self._enter(input_ids), kv, PREFILL, last_row_only=True)
        _, s = input_ids.shape
        tokens, logits = self._static_results(hidden, lambda h: self._logits(self._one_row(h), DECODE), 1)
        return static_kv.settle_prefill(tokens, ids, positions, slot, start + s), logits

    def prefill_logits_static(self, input_ids: Tensor, cache: Tensor, positions: Tensor, ids: Tensor, slot, start):
        kv = static_kv.StaticKV(self.build, cache, static_kv.PREFILL, positions, slot, start)
        hidden = self.model(self._enter(input_ids), kv, PREFILL)
        _, s = input_ids.shape
        h = self.config.hidden_size
        tokens, logits = self._static_results(hidden, lambda x: self._logits(op.reshape(x, (s, h)), PREFILL), s)
        return static_kv.settle_prefill(tokens, ids, positions, slot, start + s), logits

    def _decode_static(self, cache: Tensor, positions: Tensor, ids: Tensor, phase: str):
        kv = static_kv.StaticKV(self.build, cache, static_kv.DECODE, positions)
        # every rank's ids hold the same tokens (each ran the same argmax, or received it): no broadcast
        b, _ = ids.shape
        x = self.model.embed_tokens(ids) if self.plan.first_stage else self._enter(ids)
        hidden = self.model(x, kv, phase)
        h = self.config.hidden_size
        tokens, logits = self._static_results(hidden, lambda y: self._logits(_reshape(y, (b, h)), phase), b)
        return static_kv.advance(tokens, ids, positions), logits

    def decode_static(self, cache: Tensor, positions: Tensor, ids: Tensor):
        return self._decode_static(cache, positions, ids, DECODE)

    def batch_decode_static(self, cache: Tensor, positions: Tensor, ids: Tensor):
        return self._decode_static(cache, positions, ids, BATCH)

    def set_ids(self, input_ids: Tensor, ids: Tensor):
        """The next decode step's input tokens from the host (teacher forcing)."""
        if self.plan.tp > 1:
            input_ids = op.ccl_broadcast_from_worker0(input_ids)
        return static_kv.set_ids(input_ids, ids)

    # Functions whose every argument is static (state tensors created once per generator, and the
    # weights): their CUDA graph captures the whole decode step (engine.compile sets num_input=0).
    STATIC_ARGUMENT_FUNCTIONS = ("decode_static", "batch_decode_static")

    def _collect_export(self, ids) -> dict:
        """collect_tokens / collect_logits (module doc) with pipeline stages; none without."""
        if self.plan.pp == 1:
            return {}
        logits = nn.spec.Tensor(["n", self.config.vocab_size], "float32")
        no_params = {"param_mode": "none", "effect_mode": "none"}
        return {"collect_tokens": {"tokens": ids("n"), "$": no_params},
                "collect_logits": {"logits": logits, "$": no_params}}

    def export_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        ids = lambda *shape: nn.spec.Tensor(list(shape), "int32")  # noqa: E731
        if self.build.kv_cache == "static":
            return nn.spec.ModuleSpec.from_raw({**self._collect_export(ids), **self._static_export(ids, packed)}, self)
        kv = nn.spec.Object(object_type=PagedKVCache)
        pair = {"batch_decode_pair": {"input_ids": ids(2, "micro_batch", 1), "kv_a": kv, "kv_b": kv, "$": packed}} \
            if self.build.microbatch_decode else {}
        return nn.spec.ModuleSpec.from_raw({
            **self._collect_export(ids),
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

    def _static_export(self, ids, packed) -> dict:
        c, plan = self.config, self.plan
        dtype = self.quant.model_dtype

        def state(slots):
            return {"cache": nn.spec.Tensor([plan.cache_layers, 2, slots, plan.kv_heads, "max_len", c.head_dim], dtype),
                    "positions": ids(slots), "ids": ids(slots, 1)}

        prefill = {"input_ids": ids(1, "seq_len"), **state("slots"), "slot": int, "start": int, "$": packed}
        return {
            "prefill_static": prefill,
            "prefill_logits_static": dict(prefill),
            "decode_static": {**state(1), "$": packed},
            "batch_decode_static": {**state("batch_size"), "$": packed},
            "set_ids": {"input_ids": ids("batch_size", 1), "ids": ids("batch_size", 1), "$": packed},
        }


def _reshape(x: Tensor | PendingNorm, shape) -> Tensor | PendingNorm:
    """op.reshape of a tensor or of a pending norm's rows."""
    return x.reshape(shape) if isinstance(x, PendingNorm) else op.reshape(x, shape)


def _last_row(x: Tensor) -> Tensor:
    """x[:, -1:, :] of x [b, s, h]: [b, 1, h] (its kernel named take_last_row, which
    harness.breakdown counts with the embedding and sampling)."""
    def compute(t):
        s = t.shape[1]
        return te.compute((t.shape[0], 1, t.shape[2]), lambda i, _, j: t[i, s - 1, j], name="take_last_row")

    return op.tensor_expr_op(compute, "take_last_row", [x])

