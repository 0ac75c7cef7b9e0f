"""Tensor-parallel layout (Megatron style): the one table of the model's weights and which slice
of each a rank holds. The weights (engine.weights), the memory prediction (engine.memory) and the
model's shapes (engine.model) all read `PARAMETERS` through a `ShardPlan`.

Column-parallel: q/k/v and gate/up projections (output rows split by heads / channels).
Row-parallel: o and down projections (input columns split), followed by an allreduce.
Embedding and norms are replicated. The LM head is replicated (`lm_head="replicated"`, every
rank computes all logits) or vocab-parallel (`"vocab_parallel"`: rank r holds vocabulary rows
[r*V/tp, (r+1)*V/tp) and the ranks' logits are allgathered); a BuildSpec's `"auto"` picks one
(engine.compile.BuildSpec.resolved_lm_head) before a ShardPlan sees it. When tp exceeds the number of KV
heads, KV heads are replicated: rank r uses KV head r * kv_heads // tp (tp must be a multiple of
kv_heads).

Pipeline stages (`pp`, layer-split): stage s of pp holds layers `stage_layers(L, pp, s)`, an even
split (the first L % pp stages one layer more), with the embedding on the first stage and the
final norm and the LM head on the last (a tied LM head: the embedding table on both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .config import ConfigError, ModelConfig
from .quantize import GROUP_SIZE, QuantSpec


LM_HEAD_LAYOUTS = ("replicated", "vocab_parallel")


@dataclasses.dataclass(frozen=True)
class Part:
    """One Hugging Face tensor of an engine parameter (parts are concatenated along rows).
    `split`: the axis a rank takes a slice of ("rows", "cols", or None: replicated); `follows`:
    what the slice is of ("q" heads, "kv" heads, "mlp" channels, "vocab" rows)."""

    hf: str
    split: str | None = None
    follows: str | None = None


@dataclasses.dataclass(frozen=True)
class Parameter:
    """An engine parameter: `name` (per layer, without the `model.layers.{i}.` prefix, when
    `per_layer`), the HF tensors it is made of, and whether it is a matrix (quantized) or a
    vector (norm weights, kept in the model's dtype)."""

    name: str
    parts: tuple[Part, ...]
    per_layer: bool = False
    matrix: bool = True


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("model.embed_tokens", (Part("model.embed_tokens.weight"),)),
    Parameter("input_layernorm", (Part("input_layernorm.weight"),), per_layer=True, matrix=False),
    Parameter("self_attn.qkv_proj", (Part("self_attn.q_proj.weight", "rows", "q"),
                                     Part("self_attn.k_proj.weight", "rows", "kv"),
                                     Part("self_attn.v_proj.weight", "rows", "kv")), per_layer=True),
    Parameter("self_attn.o_proj", (Part("self_attn.o_proj.weight", "cols", "q"),), per_layer=True),
    Parameter("post_attention_layernorm", (Part("post_attention_layernorm.weight"),), per_layer=True, matrix=False),
    Parameter("mlp.gate_up_proj", (Part("mlp.gate_proj.weight", "rows", "mlp"),
                                   Part("mlp.up_proj.weight", "rows", "mlp")), per_layer=True),
    Parameter("mlp.down_proj", (Part("mlp.down_proj.weight", "cols", "mlp"),), per_layer=True),
    Parameter("model.norm", (Part("model.norm.weight"),), matrix=False),
    # vocab-parallel only with lm_head=vocab_parallel at tp > 1 (ShardPlan.span); absent when tied
    Parameter("lm_head", (Part("lm_head.weight", "rows", "vocab"),)),
)

Span = tuple[int, int] | None


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage` of `pp` (consecutive; the first num_layers % pp stages
    one more)."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _leaf(hf_name: str) -> str:
    """"model.layers.3.self_attn.q_proj.weight" -> "q_proj"; "model.norm.weight" -> "norm"."""
    return hf_name.split(".")[-2] if hf_name.endswith(".weight") else hf_name


def hf_shape(config: ModelConfig, hf_name: str) -> tuple[int, ...]:
    """The shape of a Hugging Face Llama tensor (unsharded) for `config`."""
    c, d = config, config.head_dim
    shapes = {
        "embed_tokens": (c.vocab_size, c.hidden_size), "lm_head": (c.vocab_size, c.hidden_size),
        "q_proj": (c.num_attention_heads * d, c.hidden_size),
        "k_proj": (c.num_key_value_heads * d, c.hidden_size),
        "v_proj": (c.num_key_value_heads * d, c.hidden_size),
        "o_proj": (c.hidden_size, c.num_attention_heads * d),
        "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }
    return shapes.get(_leaf(hf_name), (c.hidden_size,))


def split_axis(hf_name: str) -> str | None:
    """The axis of a Hugging Face tensor that tensor parallelism slices ("rows", "cols" or None)."""
    leaf = _leaf(hf_name)
    for param in PARAMETERS:
        for part in param.parts:
            if _leaf(part.hf) == leaf:
                return part.split
    return None


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig
    tp: int
    lm_head: str = "replicated"
    pp: int = 1     # pipeline stages
    stage: int = 0  # which of them this plan's rank belongs to

    def __post_init__(self) -> None:
        c, tp = self.config, self.tp
        if tp < 1:
            raise ConfigError(f"tp must be >= 1, got {tp}")
        if not 1 <= self.pp <= c.num_hidden_layers:
            raise ConfigError(f"pp={self.pp}: {c.name} has {c.num_hidden_layers} layers to split into stages; "
                              f"choose pp from 1 to {c.num_hidden_layers}")
        if not 0 <= self.stage < self.pp:
            raise ConfigError(f"stage {self.stage} does not exist with pp={self.pp}")
        if self.lm_head not in LM_HEAD_LAYOUTS:
            raise ConfigError(f"unknown lm_head layout {self.lm_head!r}; choose one of: {', '.join(LM_HEAD_LAYOUTS)}")
        if self.lm_head == "vocab_parallel":
            if c.tie_word_embeddings:
                raise ConfigError(f"{c.name} ties its LM head to the embedding table, which stays replicated; "
                                  "use lm_head=replicated")
            if c.vocab_size % tp:
                raise ConfigError(f"{c.name}: vocab_size {c.vocab_size} is not divisible by tp={tp}; "
                                  "use lm_head=replicated")
        if tp == 1:
            return
        valid = [t for t in range(1, 65) if c.num_attention_heads % t == 0
                 and (c.num_key_value_heads % t == 0 or t % c.num_key_value_heads == 0)
                 and c.intermediate_size % t == 0]
        if c.num_attention_heads % tp:
            raise ConfigError(f"{c.name}: num_attention_heads {c.num_attention_heads} is not divisible by "
                              f"tp={tp}; choose tp from {valid}")
        if c.num_key_value_heads % tp and tp % c.num_key_value_heads:
            raise ConfigError(f"{c.name}: tp={tp} neither divides nor is a multiple of num_key_value_heads "
                              f"{c.num_key_value_heads}; choose tp from {valid}")
        if c.intermediate_size % tp:
            raise ConfigError(f"{c.name}: intermediate_size {c.intermediate_size} is not divisible by "
                              f"tp={tp}; choose tp from {valid}")

    def check_quant(self, spec: QuantSpec) -> None:
        """Quantized row-parallel weights must be split along whole groups."""
        if not spec.quantized:
            return
        for what, k in (("o_proj input", self.q_heads * self.config.head_dim),
                        ("down_proj input", self.intermediate)):
            if k % GROUP_SIZE:
                raise ConfigError(
                    f"{self.config.name}: with tp={self.tp} the {what} shard is {k} wide, not a multiple of "
                    f"{spec.name}'s group size {GROUP_SIZE}; use a smaller tp or q0f16")
        if self.config.hidden_size % GROUP_SIZE:
            raise ConfigError(f"{self.config.name}: hidden_size {self.config.hidden_size} is not a multiple of "
                              f"the group size {GROUP_SIZE}; use q0f16")

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def layers(self) -> range:
        """The layers this stage holds (all of them without pipeline stages)."""
        return stage_layers(self.config.num_hidden_layers, self.pp, self.stage)

    @property
    def cache_layers(self) -> int:
        """Layers in every stage's static KV cache tensor: the most any stage holds (the same
        shape on every worker; a stage with fewer leaves the last unused)."""
        return len(stage_layers(self.config.num_hidden_layers, self.pp, 0))

    def holds(self, name: str) -> bool:
        """Whether this stage holds non-layer parameter `name` (a stem of PARAMETERS)."""
        if name == "model.embed_tokens":
            return self.first_stage or (self.last_stage and self.config.tie_word_embeddings)
        if name in ("model.norm", "lm_head"):
            return self.last_stage
        return True

    @property
    def q_heads(self) -> int:
        return self.config.num_attention_heads // self.tp

    @property
    def kv_heads(self) -> int:
        return max(1, self.config.num_key_value_heads // self.tp)

    @property
    def kv_replicated(self) -> bool:
        return self.tp > self.config.num_key_value_heads

    @property
    def vocab_parallel(self) -> bool:
        return self.lm_head == "vocab_parallel" and self.tp > 1

    @property
    def lm_head_layout(self) -> str:
        """The layout in effect: at tp=1 there is only the replicated one."""
        return "vocab_parallel" if self.vocab_parallel else "replicated"

    @property
    def vocab(self) -> int:
        """LM head rows per rank."""
        return self.config.vocab_size // self.tp if self.vocab_parallel else self.config.vocab_size

    @property
    def intermediate(self) -> int:
        return self.config.intermediate_size // self.tp

    def kv_head_range(self, rank: int) -> tuple[int, int]:
        if self.kv_replicated:
            h = rank * self.config.num_key_value_heads // self.tp
            return h, h + 1
        return rank * self.kv_heads, (rank + 1) * self.kv_heads

    def span(self, follows: str | None, rank: int) -> Span:
        """The range (in the logical, unsharded weight) of what rank `rank` holds of a split that
        follows `follows`; None: the whole axis."""
        d = self.config.head_dim
        if follows is None:
            return None
        if follows == "q":
            return rank * self.q_heads * d, (rank + 1) * self.q_heads * d
        if follows == "kv":
            lo, hi = self.kv_head_range(rank)
            return lo * d, hi * d
        if follows == "mlp":
            return rank * self.intermediate, (rank + 1) * self.intermediate
        if follows == "vocab":
            return (rank * self.vocab, (rank + 1) * self.vocab) if self.vocab_parallel else None
        raise KeyError(follows)

    def parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(full engine name, Parameter) of every weight of this stage (of the model without
        pipeline stages), in the exported order: the table's order, with the per-layer parameters
        repeated for each layer where the first of them stands."""
        layer = [p for p in PARAMETERS if p.per_layer]
        for param in PARAMETERS:
            if param.per_layer:
                if param is layer[0]:
                    for i in self.layers:
                        yield from ((f"model.layers.{i}.{p.name}", p) for p in layer)
            elif not (param.name == "lm_head" and self.config.tie_word_embeddings) and self.holds(param.name):
                yield param.name, param

    def tensors(self, rank: int) -> Iterator[tuple[str, list[tuple[str, Span, Span]]]]:
        """(engine parameter stem, [(HF tensor name, rows, cols) to concatenate along rows]) of
        rank `rank`; rows/cols None: the whole axis."""
        for name, param in self.parameters():
            prefix = name[: -len(param.name)] if param.per_layer else ""
            parts = []
            for part in param.parts:
                span = self.span(part.follows, rank)
                rows, cols = (span, None) if part.split == "rows" else (None, span) if part.split == "cols"                     else (None, None)
                parts.append((prefix + part.hf, rows, cols))
            yield name, parts

    def local_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one rank's engine parameter `name` (a stem of PARAMETERS), unquantized."""
        param = next(p for p in PARAMETERS if p.name == name)
        shapes = []
        for part in param.parts:
            shape = list(hf_shape(self.config, part.hf))
            span = self.span(part.follows, 0)
            if span is not None:
                shape[0 if part.split == "rows" else 1] = span[1] - span[0]
            shapes.append(shape)
        if len(shapes[0]) == 1:
            return tuple(shapes[0])
        return sum(s[0] for s in shapes), shapes[0][1]

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of the linear layer holding parameter `name`."""
        rows, cols = self.local_shape(name)
        return cols, rows
